"""`python -m ke_tf.main`: train a network with Knowledge Evolution and evaluate every generation.

    python -m ke_tf.main                                   # embedded digits, minutes on a CPU
    python -m ke_tf.main --dataset=stanford_dogs           # the paper's settings (Table 2)
    python -m ke_tf.main --flagfile=flags/table2_flower102_smth.flags

The flags are defined here and turned once into a frozen `RunConfig`; nothing below reads them.
Flags left at None take a dataset-aware default (`dataset_defaults`): the paper's settings for
the paper datasets and folder datasets, a small fast setting for digits. Explicit flags win.
Exit status: 0 done, 1 the run failed, 2 bad usage or bad input (the message names the flag).
"""
from __future__ import annotations

import os
import sys

from ke_tf import cli  # first: quiets TensorFlow's C++ logging before it is imported

from absl import flags  # noqa: E402

from ke_tf import config as C  # noqa: E402

# Flags are grouped by topic in --helpfull (absl groups by the module name given here).
TOPICS = ("data", "network", "split", "method", "training", "execution", "run")
DATA, NETWORK, SPLIT, METHOD, TRAINING, EXECUTION, RUN = (f"ke_tf {t}" for t in TOPICS)

flags.DEFINE_string("dataset", "digits", "digits (embedded, offline), a tfds dataset of the paper "
                    "or folder:PATH (PATH/{train,test[,val]}/<class>/*).", module_name=DATA)
flags.DEFINE_string("data_dir", None, "tfds data directory [default: ~/tensorflow_datasets].",
                    module_name=DATA)
flags.DEFINE_string("manual_dir", None, "Directory of manually downloaded tfds archives.",
                    module_name=DATA)
flags.DEFINE_boolean("skip_corrupt_images", False, "folder:PATH: skip (and count) corrupt or "
                     "non-image files instead of stopping.", module_name=DATA)
flags.DEFINE_integer("image_size", None, "Square input side in pixels [default: 32 digits, 224 "
                     "otherwise].", lower_bound=8, upper_bound=1024, module_name=DATA)
flags.DEFINE_enum("task", "classification", C.TASKS, "classification (top-1/top-5) or metric "
                  "(triplet loss, Recall@K, NMI; sec. 4.2).", module_name=DATA)
flags.DEFINE_integer("batch_size", None, "Training batch size [default: 32 (paper), 25 digits; "
                     "P*K with --task=metric].", lower_bound=1, module_name=DATA)
flags.DEFINE_integer("p_classes", None, "--task=metric: classes per batch P [default: 25 (paper), "
                     "5 digits].", lower_bound=2, module_name=DATA)
flags.DEFINE_integer("k_images", 5, "--task=metric: images per class in a batch K.", lower_bound=2,
                     module_name=DATA)
flags.DEFINE_integer("digits_per_class", 10, "digits: training images per class (the rest is the "
                     "test split).", lower_bound=1, upper_bound=150, module_name=DATA)
flags.DEFINE_integer("recal_images", 512, "Training images that re-estimate the slim network's "
                     "BatchNorm statistics.", lower_bound=1, module_name=DATA)

flags.DEFINE_enum("arch", "resnet18", C.ARCHS, "Architecture.", module_name=NETWORK)
flags.DEFINE_enum("stem", None, C.STEMS, "imagenet (7x7/2 conv + max-pool) or small (3x3 "
                  "conv) [default: small <= 64 px].", module_name=NETWORK)
flags.DEFINE_integer("embedding_dim", 128, "--task=metric: embedding size (paper: 128).",
                     lower_bound=2, module_name=NETWORK)
flags.DEFINE_float("width_multiplier", None, "Scales every internal channel count [default: "
                   "0.25 digits, 1 otherwise].", lower_bound=1e-3, upper_bound=4.0,
                   module_name=NETWORK)

flags.DEFINE_enum("split_mode", "kels", C.SPLIT_MODES, "kels: kernel-level, gives a slim "
                  "network; wels: weight-level, random (sec. 3.2).", module_name=SPLIT)
flags.DEFINE_float("split_rate", 0.8, "Split rate s in (0, 1]: share of filters (KELS) or "
                   "weights (WELS) in the fit hypothesis.", module_name=SPLIT)
flags.DEFINE_boolean("wels_rand", False, "--split_mode=wels: a new random mask every generation "
                     "(appendix D(1)).", module_name=SPLIT)
flags.DEFINE_enum("evolve_mode", "rand", C.EVOLVE_MODES, "rand: re-draw the reset hypothesis; "
                  "zero: set it to zero (an ablation).", module_name=SPLIT)
flags.DEFINE_boolean("fix_reset_seed", False, "The same random reset values in every generation "
                     "(LLF's ablation).", module_name=SPLIT)
flags.DEFINE_enum("reset_init", "layer", C.RESET_INITS, "Reset draws from the layer's own "
                  "initializer, or PyTorch's default.", module_name=SPLIT)

flags.DEFINE_enum("method", "ke", C.METHODS, "ke, or a method KE is compared with (README: "
                  "Methods to compare with).", module_name=METHOD)
flags.DEFINE_float("dsd_sparsity", 0.3, "--method=dsd: share of each kernel held at zero in the "
                   "sparse generations.", module_name=METHOD)
flags.DEFINE_float("dnr_data_fraction", 0.2, "--method=dnr: share of the training images that "
                   "score the weights.", module_name=METHOD)
flags.DEFINE_enum("dnr_threshold", "global", C.DNR_THRESHOLDS, "--method=dnr: keep the top "
                  "--split_rate over the network or per layer.", module_name=METHOD)
flags.DEFINE_string("reset_from", "layer4", "--method=llf: name prefix of the first layer reset.",
                    module_name=METHOD)

flags.DEFINE_integer("generations", None, "Number of generations g [default: 5 digits, 10 "
                     "otherwise].", lower_bound=1, module_name=TRAINING)
flags.DEFINE_integer("epochs", None, "Epochs per generation e [default: 40 digits, 200 "
                     "otherwise].", lower_bound=1, module_name=TRAINING)
flags.DEFINE_float("lr", None, "Peak learning rate [default: 0.05 digits, 0.256 otherwise; /10 "
                   "with --task=metric].", module_name=TRAINING)
flags.DEFINE_integer("warmup_epochs", None, "Linear warm-up epochs [default: min(5, epochs-1)].",
                     lower_bound=0, module_name=TRAINING)
flags.DEFINE_float("momentum", 0.9, "SGD momentum.", module_name=TRAINING)
flags.DEFINE_float("weight_decay", None, "PyTorch-style (coupled) L2 weight decay [default: "
                   "5e-4 digits, 1e-4 otherwise].", module_name=TRAINING)
flags.DEFINE_enum("regularizer", None, C.REGULARIZERS, "none, smooth (label smoothing) or cskd "
                  "[default: smooth digits, none otherwise].", module_name=TRAINING)
flags.DEFINE_float("label_smoothing", 0.1, "Label smoothing alpha with --regularizer=smooth.",
                   module_name=TRAINING)
flags.DEFINE_float("cskd_temperature", 4.0, "--regularizer=cskd: temperature T (paper: 4).",
                   module_name=TRAINING)
flags.DEFINE_float("cskd_lambda", 3.0, "--regularizer=cskd: weight lambda_cls (paper: 3).",
                   module_name=TRAINING)
flags.DEFINE_float("triplet_margin", 0.2, "--task=metric: triplet margin m (Eq. 3; FaceNet's "
                   "0.2, the paper does not state it).", module_name=TRAINING)
flags.DEFINE_boolean("slim_bn_recalibration", True, "Also evaluate and export the slim network "
                     "with re-estimated BatchNorm statistics.", module_name=TRAINING)

flags.DEFINE_enum("strategy", "none", C.STRATEGIES, "mirrored: data-parallel over every local "
                  "GPU (or logical CPU device).", module_name=EXECUTION)
flags.DEFINE_boolean("mixed_precision", False, "float16 on GPU, bfloat16 on CPU, float32 master "
                     "weights.", module_name=EXECUTION)
flags.DEFINE_boolean("jit_compile", False, "XLA-compile the train step (slow on CPU).",
                     module_name=EXECUTION)
flags.DEFINE_boolean("deterministic", False, "TensorFlow op determinism: bit-identical results "
                     "for the same flags, also after a resume.", module_name=EXECUTION)

flags.DEFINE_integer("seed", 0, "Run seed: initial weights, masks, reset draws, data order.",
                     lower_bound=0, module_name=RUN)
flags.DEFINE_string("run_dir", None, "Output directory; an interrupted run there is resumed "
                    "[default: runs/<dataset>-<arch>-<method>-...].", module_name=RUN)
flags.DEFINE_boolean("overwrite", False, "Replace the run already in --run_dir instead of "
                     "resuming it.", module_name=RUN)
flags.DEFINE_integer("keep_generations", None, "Per-generation checkpoints to keep, the most "
                     "recent [default: all].", lower_bound=1, module_name=RUN)
flags.DEFINE_boolean("export", True, "Export the last generation's networks as SavedModels.",
                     module_name=RUN)
flags.DEFINE_boolean("quiet", False, "No progress bars or tables on the console.",
                     module_name=RUN)
FLAGS = flags.FLAGS

# digits: 100 training images = 4 full batches of 25 (a ragged last batch of 4 images made the
# BatchNorm statistics, and so the last generation's accuracy, noisy).
DIGITS_DEFAULTS = dict(image_size=32, width_multiplier=0.25, generations=5, epochs=40, lr=0.05,
                       weight_decay=5e-4, regularizer="smooth", batch_size=25)
PAPER_DEFAULTS = dict(image_size=224, width_multiplier=1.0, generations=10, epochs=200, lr=0.256,
                      weight_decay=1e-4, regularizer="none", batch_size=32)


def dataset_defaults(dataset: str) -> dict:
    """Defaults of the flags left unset: digits runs fast; every other dataset gets sec. 4.1."""
    return dict(DIGITS_DEFAULTS if dataset == "digits" else PAPER_DEFAULTS)


def config_from_flags(values: dict) -> C.RunConfig:
    """Turns {flag: value} (None = unset) into a validated RunConfig. Pure: tests call it."""
    v = dict(values)
    defaults = dataset_defaults(v["dataset"])
    if v["task"] == "metric":  # sec. 4.2: P x K batches, lr / 10
        p = v.get("p_classes") or (5 if v["dataset"] == "digits" else 25)
        defaults.update(lr=defaults["lr"] / 10, p_classes=p, batch_size=p * v["k_images"])
    for name, default in defaults.items():
        if v.get(name) is None:
            v[name] = default
    if v.get("warmup_epochs") is None:
        v["warmup_epochs"] = min(5, v["epochs"] - 1)
    if v.get("run_dir") is None:
        slug = v["dataset"].replace("folder:", "folder-").replace("/", "_").strip("_")
        task = "-metric" if v["task"] == "metric" else ""
        v["run_dir"] = os.path.join(
            "runs", f"{slug}{task}-{v['arch']}-{v['method']}-{v['regularizer']}-s{v['seed']}")
    data = C.DataConfig(dataset=v["dataset"], data_dir=v["data_dir"], manual_dir=v["manual_dir"],
                        image_size=v["image_size"], batch_size=v["batch_size"], task=v["task"],
                        p_classes=v["p_classes"] or 25, k_images=v["k_images"],
                        digits_per_class=v["digits_per_class"], recal_images=v["recal_images"],
                        seed=v["seed"], skip_corrupt_images=v.get("skip_corrupt_images", False))
    model = C.ModelConfig(arch=v["arch"], stem=v["stem"], width_multiplier=v["width_multiplier"],
                          head="embedding" if v["task"] == "metric" else "logits",
                          embedding_dim=v["embedding_dim"])
    split = C.SplitConfig(split_mode=v["split_mode"], split_rate=v["split_rate"],
                          reset_init=v["reset_init"], wels_rand=v["wels_rand"],
                          evolve_mode=v["evolve_mode"], fix_reset_seed=v["fix_reset_seed"],
                          reset_from=v["reset_from"])
    train = C.TrainConfig(generations=v["generations"], epochs=v["epochs"], lr=v["lr"],
                          warmup_epochs=v["warmup_epochs"], momentum=v["momentum"],
                          weight_decay=v["weight_decay"], regularizer=v["regularizer"],
                          label_smoothing=v["label_smoothing"],
                          triplet_margin=v["triplet_margin"], dsd_sparsity=v["dsd_sparsity"],
                          cskd_temperature=v["cskd_temperature"], cskd_lambda=v["cskd_lambda"],
                          dnr_data_fraction=v["dnr_data_fraction"],
                          dnr_threshold=v["dnr_threshold"],
                          slim_bn_recalibration=v["slim_bn_recalibration"])
    return C.RunConfig(data=data, model=model, split=split, train=train, seed=v["seed"],
                       run_dir=v["run_dir"], export=v["export"],
                       overwrite=v["overwrite"], method=v["method"],
                       deterministic=v.get("deterministic", False),
                       keep_generations=v.get("keep_generations"),
                       strategy=v.get("strategy", "none"),
                       mixed_precision=v.get("mixed_precision", False),
                       jit_compile=v.get("jit_compile", False)).validate()


def check_run_dir(path: str) -> None:
    """Refuse (exit 2) a run directory that cannot be created or written, before any work."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise C.ConfigError(f"--run_dir is not writable: {probe} does not allow creating "
                            f"{path}. Received: run_dir={path!r}")


def flag_values(defaults: bool = False) -> dict:
    """{flag name: value} (or default) of every training flag defined above, all topics."""
    return {flag.name: flag.default if defaults else flag.value
            for topic in (DATA, NETWORK, SPLIT, METHOD, TRAINING, EXECUTION, RUN)
            for flag in FLAGS.get_flags_for_module(topic)}


def main(argv) -> None:
    values = flag_values()
    cfg = config_from_flags(values)
    check_run_dir(cfg.run_dir)
    from ke_tf.generations import GenerationRunner  # heavy imports after the usage checks

    GenerationRunner(cfg, verbose=not FLAGS.quiet).run()
    print(f"results: {os.path.join(cfg.run_dir, 'results.csv')}")


def run() -> None:
    """Console entry point `ke-tf`."""
    cli.run(main, sys.argv)


if __name__ == "__main__":
    run()
