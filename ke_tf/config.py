"""Plain, frozen, typed configuration for a Knowledge Evolution run.

`ke_tf.main` turns absl flags into these objects once; every library module takes them as
arguments and never reads `absl.flags.FLAGS`, so tests and Python users build them directly.
Each `validate()` raises `ConfigError` naming the offending flag (the flag's name is the field's).

The defaults are the paper's settings (sec. 4.1): `RunConfig()` trains ResNet18 on Flowers-102
for 10 generations of 200 epochs, batch 32, lr 0.256 with cosine decay, weight decay 1e-4,
KELS with s = 0.8. `ke_tf.presets` derives the other named settings from these (the embedded
digits preset the command line runs by default, the metric-learning changes of sec. 4.2).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, Optional


class ConfigError(ValueError):
    """Bad usage or bad input: the message names the flag or file. The CLI exits with status 2."""


class RunError(RuntimeError):
    """A run that failed while running (e.g. the loss became NaN): the message says what
    happened and what was kept. The CLI exits with status 1, without a traceback."""


def _require(cond: bool, flag: str, msg: str, value) -> None:
    if not cond:
        raise ConfigError(f"--{flag} {msg}. Received: {flag}={value!r}")


PAPER_DATASETS = ("oxford_flowers102", "caltech_birds2011", "stanford_dogs", "cars196")
DATASETS = ("digits",) + PAPER_DATASETS  # plus "folder:PATH"
IN_MEMORY = "memory"  # data given from Python (`ke_tf.evolve`), not loaded by ke_tf.data
TASKS = ("classification", "metric")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which data, how it is cut into batches and augmented (see `ke_tf.data`).

    dataset: "digits" (embedded, offline), a tfds name from PAPER_DATASETS, "folder:PATH", or
      IN_MEMORY ("memory": tf.data.Datasets given from Python, see `ke_tf.evolve`).
    data_dir / manual_dir: tfds directories (None: tfds' defaults).
    image_size: side of the square images fed to the network, in pixels.
    batch_size: training batch size; for task="metric" it must equal p_classes * k_images.
    task: "classification" (logits) or "metric" (class-disjoint train/test, P x K batches).
    digits_per_class: training images per class in the embedded digits subset (the rest is test).
    recal_images: training images (no augmentation) used to re-estimate the slim network's
      BatchNorm statistics.
    val_fraction: a validation split for a dataset without one of its own (0: none): this
      stratified share of the training split (task="metric": of the training classes), drawn
      with a fixed seed; digits draws it from the non-training pool instead (`ke_tf.data`).
    seed: shuffling and augmentation seed.
    """

    dataset: str = "oxford_flowers102"
    data_dir: Optional[str] = None
    manual_dir: Optional[str] = None
    image_size: int = 224
    batch_size: int = 32
    task: str = "classification"
    p_classes: int = 25
    k_images: int = 5
    digits_per_class: int = 10
    recal_images: int = 512
    val_fraction: float = 0.0
    seed: int = 0
    class_pairs: bool = False  # CS-KD batches: b/2 anchors, then a partner of each one's class
    skip_corrupt_images: bool = False  # folder datasets: leave out (and list) undecodable images

    def validate(self) -> "DataConfig":
        ds = self.dataset
        _require(ds in DATASETS + (IN_MEMORY,) or (ds.startswith("folder:")
                                                   and len(ds) > len("folder:")),
                 "dataset", f"must be one of {', '.join(DATASETS)} or folder:PATH", ds)
        _require(self.task in TASKS, "task", f"must be one of {', '.join(TASKS)}", self.task)
        _require(8 <= self.image_size <= 1024, "image_size", "must be in [8, 1024]", self.image_size)
        _require(self.batch_size >= 1, "batch_size", "must be >= 1", self.batch_size)
        _require(self.digits_per_class >= 1, "digits_per_class", "must be >= 1", self.digits_per_class)
        _require(self.recal_images >= 1, "recal_images", "must be >= 1", self.recal_images)
        _require(isinstance(self.val_fraction, (int, float)) and 0 <= self.val_fraction < 1,
                 "val_fraction", "must be in [0, 1)", self.val_fraction)
        _require(ds != IN_MEMORY or not self.val_fraction, "val_fraction",
                 "cannot split data given from Python: pass validation= instead",
                 self.val_fraction)
        if self.task == "metric":
            _require(self.p_classes >= 2, "p_classes", "must be >= 2", self.p_classes)
            _require(self.k_images >= 2, "k_images", "must be >= 2", self.k_images)
            _require(self.batch_size == self.p_classes * self.k_images, "batch_size",
                     f"must equal --p_classes * --k_images = {self.p_classes * self.k_images} "
                     "for --task=metric", self.batch_size)
        return self


ARCHS = ("resnet18", "resnet34", "resnet50", "vgg11_bn", "densenet121", "densenet169", "googlenet")
KERAS_ARCH = "keras:"  # "keras:NAME": any keras.applications constructor (networks/applications.py)
CUSTOM_ARCH = "custom"  # a functional keras.Model given from Python (`ke_tf.evolve`)
STEMS = ("imagenet", "small")
HEADS = ("logits", "embedding")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture (see `ke_tf.networks.build`). stem=None picks "small" for images <= 64 px."""

    arch: str = "resnet18"
    stem: Optional[str] = None
    width_multiplier: float = 1.0
    head: str = "logits"
    embedding_dim: int = 128

    def validate(self) -> "ModelConfig":
        _require(self.arch in ARCHS + (CUSTOM_ARCH,) or (self.arch.startswith(KERAS_ARCH) and
                                                          len(self.arch) > len(KERAS_ARCH)),
                 "arch", f"must be one of {', '.join(ARCHS)} or keras:NAME (a "
                 "keras.applications constructor, e.g. keras:MobileNetV2)", self.arch)
        _require(self.stem is None or self.stem in STEMS, "stem",
                 f"must be one of {', '.join(STEMS)}", self.stem)
        _require(0 < self.width_multiplier <= 4, "width_multiplier", "must be in (0, 4]",
                 self.width_multiplier)
        if self.arch not in ARCHS:  # keras:NAME or a network given from Python
            _require(self.width_multiplier == 1.0, "width_multiplier", "applies to ke_tf's own "
                     f"architectures only, not --arch={self.arch}", self.width_multiplier)
            _require(self.stem is None, "stem", "applies to ke_tf's own architectures only, "
                     f"not --arch={self.arch}", self.stem)
        _require(self.head in HEADS, "head", f"must be one of {', '.join(HEADS)}", self.head)
        _require(self.embedding_dim >= 2, "embedding_dim", "must be >= 2", self.embedding_dim)
        return self


SPLIT_MODES = ("kels", "wels")
RESET_INITS = ("layer", "torch_default")
EVOLVE_MODES = ("rand", "zero")
# The --method values: `ke_tf.methods.REGISTRY` maps each to its class (a test checks they are
# the same names); each method's own settings and rules live in its file (ke_tf/methods/).
METHODS = ("ke", "long", "slim_scratch", "llf", "dsd", "dnr", "repr", "bans", "dsd_only")


@dataclasses.dataclass(frozen=True)
class SplitConfig:
    """How the network is split into fit / reset hypotheses (sec. 3.2) and how the reset part is
    re-drawn (Eq. 1). reset_init="layer": each layer's own initializer; "torch_default":
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) as the official PyTorch code. wels_rand: a new WELS mask
    every generation (appendix D(1)). evolve_mode="zero": reset to zero instead of random (the
    paper warns it is inferior); fix_reset_seed: the same random reset values in every generation
    (LLF's ablation)."""

    split_mode: str = "kels"
    split_rate: float = 0.8
    reset_init: str = "layer"
    wels_rand: bool = False
    evolve_mode: str = "rand"
    fix_reset_seed: bool = False

    def validate(self) -> "SplitConfig":
        _require(self.split_mode in SPLIT_MODES, "split_mode",
                 f"must be one of {', '.join(SPLIT_MODES)}", self.split_mode)
        _require(isinstance(self.split_rate, (int, float)) and not math.isnan(self.split_rate)
                 and 0.0 < self.split_rate <= 1.0, "split_rate", "must be in (0, 1]",
                 self.split_rate)
        _require(not self.wels_rand or self.split_mode == "wels", "wels_rand",
                 "needs --split_mode=wels", self.wels_rand)
        _require(self.reset_init in RESET_INITS, "reset_init",
                 f"must be one of {', '.join(RESET_INITS)}", self.reset_init)
        _require(self.evolve_mode in EVOLVE_MODES, "evolve_mode",
                 f"must be one of {', '.join(EVOLVE_MODES)}", self.evolve_mode)
        return self


REGULARIZERS = ("none", "smooth", "cskd")
LOSSES = ("ce", "adacos")
STRATEGIES = ("none", "mirrored", "multi_worker")
# --mixed_precision: off; auto (the bare flag: float16 on a GPU, bfloat16 on a CPU where it
# helps, float32 elsewhere with a warning: `precision.decide_precision`); force (bfloat16 on any
# CPU). Old config.json files hold true/false: auto/off.
MIXED_PRECISION = ("off", "auto", "force")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimization of every generation (sec. 4.1; all generations use the same settings).

    SGD momentum 0.9 with PyTorch-style (coupled) weight decay; lr set per epoch: linear
    warm-up for warmup_epochs, then cosine decay (see `ke_tf.model`)."""

    generations: int = 10
    epochs: int = 200
    lr: float = 0.256
    warmup_epochs: int = 5
    momentum: float = 0.9
    weight_decay: float = 1e-4
    regularizer: str = "none"
    label_smoothing: float = 0.1
    triplet_margin: float = 0.2
    cskd_temperature: float = 4.0
    cskd_lambda: float = 3.0
    slim_bn_recalibration: bool = True
    loss: str = "ce"  # "adacos": cosine logits with AdaCos's adaptive scale (Zhang et al. 2019)

    def validate(self) -> "TrainConfig":
        _require(1 <= self.generations <= 10000, "generations", "must be in [1, 10000]",
                 self.generations)
        _require(self.epochs >= 1, "epochs", "must be >= 1", self.epochs)
        _require(self.lr > 0 and math.isfinite(self.lr), "lr", "must be > 0", self.lr)
        _require(0 <= self.warmup_epochs < self.epochs,
                 "warmup_epochs", f"must be in [0, --epochs) = [0, {self.epochs})",
                 self.warmup_epochs)
        _require(0 <= self.momentum < 1, "momentum", "must be in [0, 1)", self.momentum)
        _require(0 <= self.weight_decay < 1, "weight_decay", "must be in [0, 1)", self.weight_decay)
        _require(self.regularizer in REGULARIZERS, "regularizer",
                 f"must be one of {', '.join(REGULARIZERS)}", self.regularizer)
        _require(0 <= self.label_smoothing < 1, "label_smoothing", "must be in [0, 1)",
                 self.label_smoothing)
        _require(self.triplet_margin > 0, "triplet_margin", "must be > 0", self.triplet_margin)
        _require(self.cskd_temperature > 0, "cskd_temperature", "must be > 0",
                 self.cskd_temperature)
        _require(self.cskd_lambda >= 0, "cskd_lambda", "must be >= 0", self.cskd_lambda)
        if self.regularizer == "smooth":
            _require(self.label_smoothing > 0, "label_smoothing",
                     "must be > 0 with --regularizer=smooth", self.label_smoothing)
        _require(self.loss in LOSSES, "loss", f"must be one of {', '.join(LOSSES)}", self.loss)
        _require(not (self.loss == "adacos" and self.regularizer == "cskd"), "loss",
                 "adacos cannot be combined with --regularizer=cskd (CS-KD distills logits, "
                 "AdaCos trains cosines)", self.loss)
        return self


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything one `python -m ke_tf.main` run needs; `to_flags()` is what config.json holds.

    deterministic: TensorFlow op determinism (same seed and flags: bit-identical results, also
      across a crash and resume). keep_generations: how many per-generation checkpoints to keep
      (the most recent; None keeps all). strategy: "mirrored" trains on every local GPU (or
      logical CPU device) with `tf.distribute.MirroredStrategy`, "multi_worker" on the machines
      of the TF_CONFIG cluster with `tf.distribute.MultiWorkerMirroredStrategy`
      (`ke_tf.distribution`), the global batch split among them.
      mixed_precision: one of MIXED_PRECISION ("off", "auto": float16 on GPU, bfloat16
      on a CPU where it is faster, "force": bfloat16 on any CPU; True/False mean auto/off),
      float32 master weights.
      jit_compile: XLA-compile the train step.
    select_by: which generation the run ships, exports and returns, chosen separately for the
      dense and the slim network: "last", or a validation column of results.csv ("val_top1",
      "val_loss", "val_recall_at_1", ...; `ke_tf.selection`). patience: stop after this many
      generations without a gain of more than min_delta on it (0: train every generation).
    method_flags: the values of the method's own flags ({"dsd_sparsity": 0.3, ...}); each
      method declares its flags, their defaults and rules in its file (`ke_tf.methods`), so this
      module knows none of them: a flag missing here takes the method's default.
    """

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    split: SplitConfig = SplitConfig()
    train: TrainConfig = TrainConfig()
    seed: int = 0
    run_dir: str = "runs/default"
    export: bool = True
    overwrite: bool = False
    method: str = "ke"
    deterministic: bool = False
    keep_generations: Optional[int] = None
    strategy: str = "none"
    mixed_precision: str = "off"
    jit_compile: bool = False
    select_by: str = "last"
    patience: int = 0
    min_delta: float = 0.0
    method_flags: Dict[str, object] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.mixed_precision, bool):  # the boolean flag of older runs
            object.__setattr__(self, "mixed_precision", "auto" if self.mixed_precision else "off")
        # One run seed: it also seeds the data pipeline's shuffling and augmentation; CS-KD
        # needs its batches of class pairs.
        object.__setattr__(self, "data", dataclasses.replace(
            self.data, seed=self.seed, class_pairs=self.train.regularizer == "cskd"))

    def validate(self) -> "RunConfig":
        self.data.validate(), self.model.validate(), self.split.validate(), self.train.validate()
        _require(self.seed >= 0, "seed", "must be >= 0", self.seed)
        if self.train.regularizer == "cskd":
            _require(self.data.task == "classification", "regularizer",
                     "cskd needs --task=classification", self.train.regularizer)
            _require(self.data.batch_size % 2 == 0 and self.data.batch_size >= 2, "batch_size",
                     "must be even with --regularizer=cskd (anchors + partners)",
                     self.data.batch_size)
        _require(bool(self.run_dir), "run_dir", "must not be empty", self.run_dir)
        _require(self.keep_generations is None or self.keep_generations >= 1, "keep_generations",
                 "must be >= 1 (or unset: keep all)", self.keep_generations)
        _require(self.strategy in STRATEGIES, "strategy",
                 f"must be one of {', '.join(STRATEGIES)}", self.strategy)
        _require(self.mixed_precision in MIXED_PRECISION, "mixed_precision",
                 f"must be one of {', '.join(MIXED_PRECISION)}", self.mixed_precision)
        _require(self.patience >= 0, "patience", "must be >= 0 (0: no early stop)", self.patience)
        _require(self.min_delta >= 0 and math.isfinite(self.min_delta), "min_delta",
                 "must be >= 0", self.min_delta)
        _require(self.patience == 0 or self.select_by != "last", "patience",
                 "needs --select_by naming a validation metric (e.g. val_top1): the run stops "
                 "when that metric stops gaining", self.patience)
        if self.data.task == "metric":
            _require(self.model.head == "embedding", "head",
                     "must be embedding with --task=metric", self.model.head)
        else:
            _require(self.model.head == "logits", "head",
                     "must be logits with --task=classification", self.model.head)
        _require(self.train.loss == "ce" or self.data.task == "classification", "loss",
                 f"{self.train.loss} needs --task=classification", self.train.loss)
        return self

    def to_flags(self) -> dict:
        """One flat {flag name: value} dict (field names are the flag names)."""
        flat = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in _PARTS and f.name != "method_flags"}
        for part in _PARTS:
            flat.update(dataclasses.asdict(getattr(self, part)))
        flat.update(self.method_flags)
        return flat

    @classmethod
    def from_flags(cls, flat: dict) -> "RunConfig":
        """The inverse of `to_flags` (config.json back to a RunConfig); missing keys take the
        defaults, keys of no part are the method's flags (`method_flags`: `ke_tf.rules.check`
        refuses a name no method declares)."""
        parts = {name: dataclasses.fields(typ) for name, typ in _PARTS.items()}
        known = {f.name for fs in parts.values() for f in fs} | {
            f.name for f in dataclasses.fields(cls) if f.name not in _PARTS}
        kwargs = {name: _PARTS[name](**{f.name: _tuple(flat[f.name]) for f in fs
                                        if f.name in flat})
                  for name, fs in parts.items()}
        kwargs.update({f.name: flat[f.name] for f in dataclasses.fields(cls)
                       if f.name not in _PARTS and f.name in flat})
        kwargs["method_flags"] = {k: _tuple(v) for k, v in flat.items() if k not in known}
        return cls(**kwargs)


def _tuple(value):
    return tuple(value) if isinstance(value, list) else value


_PARTS = {"data": DataConfig, "model": ModelConfig, "split": SplitConfig, "train": TrainConfig}


# Flags that change where or how a run executes, not what it trains: a run may be resumed with
# other values (a moved run directory, another machine's data directory, more devices).
NOT_TRAINING = ("overwrite", "keep_generations", "run_dir", "data_dir", "manual_dir", "export",
                "strategy", "mixed_precision", "jit_compile", "deterministic")


def differences(saved: dict, current: dict, ignore=NOT_TRAINING,
                defaults: Optional[dict] = None) -> list:
    """The training flags whose values differ between two `to_flags()` dicts, as
    "--flag: a -> b"; a flag missing from either counts as its default (`defaults`:
    RunConfig()'s flags and, from `ke_tf.rules.defaults`, the methods')."""
    defaults = RunConfig().to_flags() if defaults is None else defaults
    keys = sorted((set(saved) | set(current)) - set(ignore))
    old = {k: saved.get(k, defaults.get(k)) for k in keys}
    new = {k: current.get(k, defaults.get(k)) for k in keys}
    return [f"--{k}: {old[k]!r} -> {new[k]!r}" for k in keys if _tuple(old[k]) != _tuple(new[k])]
