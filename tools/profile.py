"""Parameters and multiply-accumulates of a dense network and its slim KELS fit hypothesis.

    python tools/profile.py --arch=resnet18 --split_rate=0.5 --num_classes=102 --image_size=224

prints one row per weighted layer (dense and slim shapes, parameters, MACs, fit share) and the
totals; with --json the last stdout line is one JSON object with integer keys dense_params,
slim_params, dense_macs, slim_macs. Paper appendix Table 6 (ResNet18, s=0.5, 102 classes, 224 px,
ImageNet stem): about 11.2 M / 1.81 GMACs dense and 2.82 M / 0.48 GMACs slim; the paper prints
twice these (see ke_tf/cost.py).
"""
import json

from absl import flags

from ke_tf import cli, config, cost, masks, networks, slim

flags.DEFINE_enum("arch", "resnet18", config.ARCHS, "Architecture.")
flags.DEFINE_float("split_rate", 0.5, "KELS split rate s in (0, 1].", lower_bound=1e-6, upper_bound=1.0)
flags.DEFINE_integer("num_classes", 102, "Number of classes (logits).", lower_bound=1)
flags.DEFINE_integer("image_size", 224, "Input image side in pixels.", lower_bound=8)
flags.DEFINE_enum("stem", None, config.STEMS, "Network stem; default: small for <= 64 px.")
flags.DEFINE_float("width_multiplier", 1.0, "Scales every internal channel count.", lower_bound=1e-3)
flags.DEFINE_boolean("json", False, "End with one JSON line of the totals.")
FLAGS = flags.FLAGS


def _shape(layer) -> str:
    w = layer.weights[0] if layer.weights else None
    return "x".join(str(d) for d in w.shape) if w is not None else "-"


def main(_):
    stem = FLAGS.stem or networks.default_stem(FLAGS.image_size)
    if FLAGS.image_size < networks.min_image_size(FLAGS.arch, stem):
        raise config.ConfigError(
            f"--image_size must be >= {networks.min_image_size(FLAGS.arch, stem)} for "
            f"--arch={FLAGS.arch} with the {stem} stem. Received: image_size={FLAGS.image_size}")
    dense = networks.build(FLAGS.arch, FLAGS.num_classes, FLAGS.image_size, stem=stem,
                           width_multiplier=FLAGS.width_multiplier)
    m = masks.compute(dense, "kels", FLAGS.split_rate)
    small = slim.architecture(dense, m)
    slim_rows = {r.name: r for r in cost.layer_costs(small)}
    print(f"{'layer':32s} {'dense kernel':>16s} {'slim kernel':>16s} {'params':>10s} "
          f"{'slim':>10s} {'MACs':>13s} {'slim':>13s} {'fit':>6s}")
    for r in cost.layer_costs(dense, m):
        s = slim_rows[r.name]
        share = f"{r.fit_share:6.1%}" if r.fit_share is not None else "     -"
        print(f"{r.name:32s} {_shape(dense.get_layer(r.name)):>16s} "
              f"{_shape(small.get_layer(r.name)):>16s} {r.params:10,d} {s.params:10,d} "
              f"{r.macs:13,d} {s.macs:13,d} {share}")
    (dp, dm), (sp, sm) = cost.total(dense), cost.total(small)
    print(f"{'total':32s} {'':16s} {'':16s} {dp:10,d} {sp:10,d} {dm:13,d} {sm:13,d}")
    print(f"dense: {dp / 1e6:.2f} M parameters, {dm / 1e9:.2f} GMACs; "
          f"slim: {sp / 1e6:.2f} M parameters, {sm / 1e9:.2f} GMACs "
          f"({sp / dp:.1%} of the parameters, {sm / dm:.1%} of the MACs)")
    if FLAGS.json:
        print(json.dumps({"dense_params": dp, "slim_params": sp, "dense_macs": dm, "slim_macs": sm}))


if __name__ == "__main__":
    cli.run(main)
