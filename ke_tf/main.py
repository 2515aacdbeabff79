"""`python -m ke_tf.main`: train a network with Knowledge Evolution and evaluate every generation.

    python -m ke_tf.main                                   # embedded digits, minutes on a CPU
    python -m ke_tf.main --dataset=stanford_dogs           # the paper's settings (Table 2)
    python -m ke_tf.main --preset=table2_flower102_smth   # a paper preset, from any directory
    ke-tf --flagfile=flags/table2_flower102_smth.flags      # the same file, from the checkout

The flags are defined here and turned once into a frozen `RunConfig`; nothing below reads them.
Every default is `ke_tf.config`'s (the paper's, sec. 4.1) or, for the flags left at None, the
dataset's preset (`ke_tf.presets.complete`: the paper's settings for the paper and folder
datasets, the fast digits preset for digits). Explicit flags win.
Exit status: 0 done, 1 the run failed, 2 bad usage or bad input (the message names the flag).
"""
from __future__ import annotations

import os
import sys
from typing import Optional

from ke_tf import cli  # first: quiets TensorFlow's C++ logging before it is imported

from absl import flags  # noqa: E402

from ke_tf import config as C, methods, presets  # noqa: E402

D = presets.PAPER  # the paper's defaults, flat: one default per number
P = presets.DIGITS  # what the digits preset changes
# Flags are grouped by topic in --helpfull (absl groups by the module name given here).
TOPICS = ("data", "network", "split", "method", "training", "execution", "run")
DATA, NETWORK, SPLIT, METHOD, TRAINING, EXECUTION, RUN = (f"ke_tf {t}" for t in TOPICS)

flags.DEFINE_string("dataset", P["dataset"], "digits (embedded, offline), a tfds dataset of the paper "
                    "or folder:PATH (PATH/{train,test[,val]}/<class>/*).", module_name=DATA)
flags.DEFINE_string("data_dir", None, "tfds data directory [default: ~/tensorflow_datasets].",
                    module_name=DATA)
flags.DEFINE_string("manual_dir", None, "Directory of manually downloaded tfds archives.",
                    module_name=DATA)
flags.DEFINE_boolean("skip_corrupt_images", D["skip_corrupt_images"], "folder:PATH: decode every file up front; leave "
                     "out (and list) corrupt or non-image ones instead of stopping.", module_name=DATA)
flags.DEFINE_integer("image_size", None, f"Square input side in pixels [default: {P['image_size']} "
                     f"digits, {D['image_size']} otherwise].", lower_bound=8, upper_bound=1024, module_name=DATA)
flags.DEFINE_enum("task", D["task"], C.TASKS, "classification (top-1/top-5) or metric "
                  "(triplet loss, Recall@K, NMI; sec. 4.2).", module_name=DATA)
flags.DEFINE_integer("batch_size", None, f"Training batch size [default: {D['batch_size']} (paper), "
                     f"{P['batch_size']} digits; P*K with --task=metric].", lower_bound=1, module_name=DATA)
flags.DEFINE_integer("p_classes", None, f"--task=metric: classes per batch P [default: "
                     f"{D['p_classes']} (paper), {presets.DIGITS_P_CLASSES} digits].", lower_bound=2, module_name=DATA)
flags.DEFINE_integer("k_images", D["k_images"], "--task=metric: images per class in a batch K.", lower_bound=2,
                     module_name=DATA)
flags.DEFINE_integer("digits_per_class", D["digits_per_class"], "digits: training images per class (the rest is the "
                     "test split).", lower_bound=1, upper_bound=150, module_name=DATA)
flags.DEFINE_float("val_fraction", D["val_fraction"], "Validation share held out of each training "
                   "class (digits: of its test pool; metric: of the classes).",
                   lower_bound=0.0, upper_bound=0.99, module_name=DATA)
flags.DEFINE_integer("recal_images", D["recal_images"], "Training images that re-estimate the slim network's "
                     "BatchNorm statistics.", lower_bound=1, module_name=DATA)

flags.DEFINE_string("arch", D["arch"], "resnet18/34/50, vgg11_bn, densenet121/169, googlenet, or "
                    "keras:NAME (a keras.applications constructor).", module_name=NETWORK)
flags.DEFINE_enum("stem", None, C.STEMS, "imagenet (7x7/2 conv + max-pool) or small (3x3 "
                  "conv) [default: small <= 64 px].", module_name=NETWORK)
flags.DEFINE_integer("embedding_dim", D["embedding_dim"], "--task=metric: embedding size (paper: 128).",
                     lower_bound=2, module_name=NETWORK)
flags.DEFINE_float("width_multiplier", None, f"Scales every internal channel count [default: "
                   f"{P['width_multiplier']} digits, {D['width_multiplier']} otherwise].", lower_bound=1e-3, upper_bound=4.0,
                   module_name=NETWORK)

flags.DEFINE_enum("split_mode", D["split_mode"], C.SPLIT_MODES, "kels: kernel-level, gives a slim "
                  "network; wels: weight-level, random (sec. 3.2).", module_name=SPLIT)
flags.DEFINE_float("split_rate", D["split_rate"], "Split rate s in (0, 1]: share of filters (KELS) or "
                   "weights (WELS) in the fit hypothesis.", module_name=SPLIT)
flags.DEFINE_boolean("wels_rand", D["wels_rand"], "--split_mode=wels: a new random mask every generation "
                     "(appendix D(1)).", module_name=SPLIT)
flags.DEFINE_enum("evolve_mode", D["evolve_mode"], C.EVOLVE_MODES, "rand: re-draw the reset hypothesis; "
                  "zero: set it to zero (an ablation).", module_name=SPLIT)
flags.DEFINE_boolean("fix_reset_seed", D["fix_reset_seed"], "The same random reset values in every generation "
                     "(LLF's ablation).", module_name=SPLIT)
flags.DEFINE_enum("reset_init", D["reset_init"], C.RESET_INITS, "Reset draws from the layer's own "
                  "initializer, or PyTorch's default.", module_name=SPLIT)

flags.DEFINE_enum("method", D["method"], C.METHODS, "ke, or a method KE is compared with (docs/guide.md: "
                  "Methods to compare with).", module_name=METHOD)
flags.DEFINE_enum("loss", D["loss"], C.LOSSES, "ce (cross entropy on logits) or adacos (cosine "
                  "logits, adaptive scale; combines with any --method).", module_name=METHOD)


def _define_method_flag(name: str, setting) -> None:
    """A method's own flag (`ke_tf.methods.base.Setting`), declared in the method's file."""
    if setting.kind == "enum":
        flags.DEFINE_enum(name, setting.default, setting.choices, setting.help, module_name=METHOD)
    elif setting.kind == "integer":
        flags.DEFINE_integer(name, setting.default, setting.help, module_name=METHOD)
    elif setting.kind == "string":
        flags.DEFINE_string(name, setting.default, setting.help, module_name=METHOD)
    else:
        flags.DEFINE_float(name, setting.default, setting.help, module_name=METHOD)


for _name, _setting in methods.settings().items():
    _define_method_flag(_name, _setting)

flags.DEFINE_integer("generations", None, f"Number of generations g [default: {P['generations']} "
                     f"digits, {D['generations']} otherwise].", lower_bound=1, module_name=TRAINING)
flags.DEFINE_integer("epochs", None, f"Epochs per generation e [default: {P['epochs']} digits, "
                     f"{D['epochs']} otherwise].", lower_bound=1, module_name=TRAINING)
flags.DEFINE_float("lr", None, f"Peak learning rate [default: {P['lr']} digits, {D['lr']} otherwise; "
                   "/10 with --task=metric].", module_name=TRAINING)
flags.DEFINE_integer("warmup_epochs", None, f"Linear warm-up epochs [default: "
                     f"min({D['warmup_epochs']}, epochs-1)].",
                     lower_bound=0, module_name=TRAINING)
flags.DEFINE_float("momentum", D["momentum"], "SGD momentum.", module_name=TRAINING)
flags.DEFINE_float("weight_decay", None, f"PyTorch-style (coupled) L2 weight decay [default: "
                   f"{P['weight_decay']} digits, {D['weight_decay']} otherwise].", module_name=TRAINING)
flags.DEFINE_enum("regularizer", None, C.REGULARIZERS, f"none, smooth (label smoothing) or cskd "
                  f"[default: {P['regularizer']} digits, {D['regularizer']} otherwise].", module_name=TRAINING)
flags.DEFINE_float("label_smoothing", D["label_smoothing"], "Label smoothing alpha with --regularizer=smooth.",
                   module_name=TRAINING)
flags.DEFINE_float("cskd_temperature", D["cskd_temperature"], "--regularizer=cskd: temperature T (paper: 4).",
                   module_name=TRAINING)
flags.DEFINE_float("cskd_lambda", D["cskd_lambda"], "--regularizer=cskd: weight lambda_cls (paper: 3).",
                   module_name=TRAINING)
flags.DEFINE_float("triplet_margin", D["triplet_margin"], "--task=metric: triplet margin m (Eq. 3; FaceNet's "
                   "0.2, the paper does not state it).", module_name=TRAINING)
flags.DEFINE_boolean("slim_bn_recalibration", D["slim_bn_recalibration"], "Also evaluate and export the slim network "
                     "with re-estimated BatchNorm statistics.", module_name=TRAINING)

flags.DEFINE_enum("strategy", D["strategy"], C.STRATEGIES, "mirrored: every GPU (or logical CPU "
                  "device) of this machine; multi_worker: the machines of TF_CONFIG.",
                  module_name=EXECUTION)


class _MixedPrecisionParser(flags.ArgumentParser):
    """off|auto|force; true/false (the bare --mixed_precision / --nomixed_precision, older
    command lines) mean auto/off."""

    ALIASES = {"true": "auto", "1": "auto", "yes": "auto", "on": "auto",
               "false": "off", "0": "off", "no": "off"}
    syntactic_help = "|".join(C.MIXED_PRECISION)

    def parse(self, argument):
        if isinstance(argument, bool):
            return "auto" if argument else "off"
        value = str(argument).strip().lower()
        value = self.ALIASES.get(value, value)
        if value not in C.MIXED_PRECISION:
            raise ValueError(f"value should be one of <{self.syntactic_help}>")
        return value

    def flag_type(self):
        return "enum"


class _MixedPrecisionFlag(flags.Flag):
    """A flag that is both boolean (--mixed_precision, --nomixed_precision) and an enum
    (--mixed_precision=force)."""

    def __init__(self, default, help_string):
        super().__init__(_MixedPrecisionParser(), flags.ArgumentSerializer(), "mixed_precision",
                         default, help_string, boolean=True)

    def _serialize(self, value):
        return "" if value is None else f"--{self.name}={value}"


flags.DEFINE_flag(_MixedPrecisionFlag(
    D["mixed_precision"], "auto (bare flag): fp16 on GPU, bf16 on a CPU where faster, else fp32 "
    "+ warning; force: bf16 on any CPU; off."),
    module_name=EXECUTION)
flags.DEFINE_boolean("jit_compile", D["jit_compile"], "XLA-compile the train step (slow on CPU).",
                     module_name=EXECUTION)
flags.DEFINE_boolean("deterministic", D["deterministic"], "TensorFlow op determinism: bit-identical results "
                     "for the same flags, also after a resume.", module_name=EXECUTION)

flags.DEFINE_integer("seed", D["seed"], "Run seed: initial weights, masks, reset draws, data order.",
                     lower_bound=0, module_name=RUN)
flags.DEFINE_string("run_dir", None, "Output directory; an interrupted run there is resumed "
                    "[default: runs/<dataset>-<arch>-<method>-...].", module_name=RUN)
flags.DEFINE_boolean("overwrite", D["overwrite"], "Replace the run already in --run_dir instead of "
                     "resuming it.", module_name=RUN)
flags.DEFINE_integer("keep_generations", None, "Per-generation checkpoints to keep, the most "
                     "recent [default: all].", lower_bound=1, module_name=RUN)
flags.DEFINE_boolean("export", D["export"], "Export the shipped networks (--select_by) as "
                     "SavedModels.", module_name=RUN)
flags.DEFINE_string("select_by", D["select_by"], "The generation to ship: last, or a validation "
                    "column (val_top1, val_loss, val_recall_at_1, ...).",
                    module_name=RUN)
flags.DEFINE_integer("patience", D["patience"], "Stop after this many generations without a "
                     "gain on --select_by (0: train every generation).", lower_bound=0,
                     module_name=RUN)
flags.DEFINE_float("min_delta", D["min_delta"], "The smallest change of --select_by that counts "
                   "as a gain (percent points; val_loss: nats).", lower_bound=0.0,
                   module_name=RUN)
flags.DEFINE_boolean("quiet", False, "No progress bars or tables on the console.",
                     module_name=RUN)
# Read before parsing (presets.expand_preset turns it into the bundled --flagfile); defined for --help.
flags.DEFINE_string("preset", None, "A paper preset by name, from any directory: flags/NAME.flags, "
                    "bundled with the package (e.g. table2_flower102_smth). Explicit flags win.",
                    module_name="ke_tf presets")
FLAGS = flags.FLAGS

def config_from_flags(values: dict, notes: Optional[list] = None) -> C.RunConfig:
    """Turns {flag: value} (None = unset) into a validated RunConfig. Pure: tests call it.
    `notes` receives the defaults that a method or regularizer chose (`presets.complete`)."""
    return presets.config({k: v for k, v in values.items() if k != "quiet"}, notes)


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
    if FLAGS.preset is not None:  # only a flagfile can get it here: run() expands the command's
        raise C.ConfigError(f"--preset={FLAGS.preset} inside a --flagfile does not take effect; "
                            f"put --flagfile={presets.flagfile(FLAGS.preset)} there instead")
    notes: list = []
    cfg = config_from_flags(flag_values(), notes)  # pure Python: no TensorFlow op
    from ke_tf import distribution

    if cfg.strategy == "multi_worker":  # before any other TensorFlow op of the process
        distribution.start_multi_worker(cfg, verbose=not FLAGS.quiet)
    chief = distribution.is_chief(cfg)
    if chief:
        check_run_dir(cfg.run_dir)
    if not FLAGS.quiet:
        for note in notes:  # the defaults a method or regularizer chose
            print(f"default {note}")
    from ke_tf import evolution  # heavy imports after the usage checks

    evolution.run(cfg, verbose=not FLAGS.quiet)
    print(f"results: {os.path.join(cfg.run_dir, 'results.csv')}"
          + ("" if chief else " (written by the chief)"))


def usage() -> str:
    """`--help`: what the program does and every flag of a run, by topic (absl's own flags, and
    TensorFlow's, are left to --helpfull)."""
    topics = [f"ke_tf {t}" for t in TOPICS] + ["ke_tf presets"]
    return "\n\n".join([__doc__.strip()] + [FLAGS.module_help(t) for t in topics])


def run(argv: Optional[list] = None) -> None:
    """Console entry point `ke-tf` (and `python -m ke_tf.main`)."""
    argv = sys.argv if argv is None else argv
    if {"-h", "-?", "--help", "--helpshort"} & set(argv[1:]):
        print(usage())
        sys.exit(0)
    cli.run(main, argv, prepare=presets.expand_preset)


if __name__ == "__main__":
    run()
