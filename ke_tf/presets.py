"""Named settings, all derived from the paper's (sec. 4.1), which are `ke_tf.config`'s defaults.

- `paper(**flags)`: the paper's setup for a paper dataset (`RunConfig()` is Flowers-102);
  with task="metric" the changes of sec. 4.2 (128-d embedding, P x K = 25 x 5 batches, lr/10).
- `digits(**flags)`: the embedded scikit-learn digits, offline, about 2 minutes on a 2-core
  CPU: a 0.25-wide ResNet18 at 32 px, 5 generations of 40 epochs, batch 25 (the 100 training
  images are 4 full batches), lr 0.05, weight decay 5e-4, label smoothing. The command line's
  default (`python -m ke_tf.main` with no flags).
- `complete(flags)`: the command line's rule: flags left unset (None) take the dataset's
  preset, then the derived defaults (warm-up min(5, epochs - 1), the run directory's name);
  a preset value that a method or regularizer cannot use is replaced by one it can, and said
  (`notes`): --regularizer=cskd pairs anchors with partners, so an odd preset batch (digits'
  25) becomes DIGITS_EVEN_BATCH (20: the 100 training images in 5 full batches).

Each takes flat flags ({flag name: value}, as config.json holds them) and returns them, or a
validated `RunConfig`; an explicit flag always wins.

The paper's experiments are absl flagfiles, `flags/NAME.flags` in the repository, shipped inside
the package as `ke_tf/flags/` (a link to `flags/` in the checkout: one source): `flagfile(NAME)`
finds one, and the command line's `--preset=NAME` reads it (`expand_preset`).
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional

from ke_tf import rules
from ke_tf.config import KERAS_ARCH, ConfigError, RunConfig

FLAGFILE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "flags")

PAPER: Dict[str, object] = RunConfig().to_flags()  # every default, flat

# What the digits preset changes of the paper's settings.
DIGITS = dict(dataset="digits", image_size=32, width_multiplier=0.25, generations=5, epochs=40,
              lr=0.05, weight_decay=5e-4, regularizer="smooth", batch_size=25)
DIGITS_P_CLASSES = 5  # --task=metric on digits: 5 training classes (0-4) per batch
DIGITS_EVEN_BATCH = 20  # digits batches that must be even (CS-KD): 5 full batches of 100 images
METRIC_LR_DIVISOR = 10  # sec. 4.2: "a small learning rate lr = 0.0256"


def complete(flags: Dict[str, object], notes: Optional[List[str]] = None) -> Dict[str, object]:
    """Every flag set: unset (None or missing) ones from the dataset's preset, then derived.
    `notes` (a list) receives a line for every preset value a method or regularizer changed."""
    v = {k: val for k, val in flags.items() if val is not None}
    dataset = v.setdefault("dataset", "digits")
    preset = dict(PAPER, **(DIGITS if dataset == "digits" else {}))
    if v.get("task") == "metric":  # sec. 4.2: P x K batches, lr / 10, an embedding head
        p = v.get("p_classes") or (DIGITS_P_CLASSES if dataset == "digits" else PAPER["p_classes"])
        k = v.get("k_images") or PAPER["k_images"]
        preset.update(lr=preset["lr"] / METRIC_LR_DIVISOR, p_classes=p, batch_size=p * k)
    v["head"] = "embedding" if v.get("task") == "metric" else "logits"
    if str(v.get("arch", "")).startswith(KERAS_ARCH) and "width_multiplier" not in v:
        preset["width_multiplier"] = 1.0  # a keras.applications network has its own widths
    regularizer = v.get("regularizer", preset["regularizer"])
    if regularizer == "cskd" and "batch_size" not in v and preset["batch_size"] % 2:
        preset["batch_size"] = DIGITS_EVEN_BATCH
        if notes is not None:
            notes.append(f"--batch_size={DIGITS_EVEN_BATCH}: --regularizer=cskd needs an even "
                         "batch (anchors and their partners)")
    for name, default in preset.items():
        if name not in v and name != "run_dir":
            v[name] = default
    if "warmup_epochs" not in flags or flags["warmup_epochs"] is None:
        v["warmup_epochs"] = min(PAPER["warmup_epochs"], v["epochs"] - 1)
    if v.get("run_dir") is None:
        slug = dataset.replace("folder:", "folder-").replace("/", "_").strip("_")
        task = "-metric" if v["task"] == "metric" else ""
        v["run_dir"] = os.path.join(
            "runs", f"{slug}{task}-{v['arch']}-{v['method']}-{v['regularizer']}-s{v['seed']}")
    return v


def config(flags: Dict[str, object], notes: Optional[List[str]] = None) -> RunConfig:
    """The RunConfig of flat `flags` completed by `complete`, checked by every rule
    (`ke_tf.rules.check`)."""
    return rules.check(RunConfig.from_flags(complete(flags, notes)))


def paper(**flags) -> RunConfig:
    """The paper's setup (sec. 4.1; sec. 4.2 with task="metric"), e.g.
    `paper(dataset="stanford_dogs", run_dir="runs/dogs")`."""
    return config(dict(dataset=PAPER["dataset"], **flags))


def digits(**flags) -> RunConfig:
    """The digits preset, e.g. `digits(generations=3, run_dir="runs/try")`."""
    return config(dict(dataset="digits", **flags))


def flagfiles() -> Dict[str, str]:
    """{name: path} of every bundled preset (`flags/NAME.flags`), sorted by name."""
    names = sorted(f[:-len(".flags")] for f in os.listdir(FLAGFILE_DIR) if f.endswith(".flags"))
    return {name: os.path.join(FLAGFILE_DIR, f"{name}.flags") for name in names}


def flagfile(name: str) -> str:
    """The path of the bundled preset `name` (with or without `.flags`), from any directory."""
    found = flagfiles()
    path = found.get(name[:-len(".flags")] if name.endswith(".flags") else name)
    if path is None:
        raise ConfigError(f"--preset={name}: no such preset. The presets are "
                          f"{', '.join(found)}. Received: preset={name!r}")
    return path


def expand_preset(argv: List[str]) -> List[str]:
    """argv with `--preset=NAME` (or `--preset NAME`) turned into the bundled flagfile's
    `--flagfile=PATH`, moved first: an explicit flag wins over the preset wherever it stands."""
    args, names, rest = list(argv[1:]), [], []
    while args:
        arg = args.pop(0)
        if arg == "--preset" and args:
            names.append(args.pop(0))
        elif arg.startswith("--preset="):
            names.append(arg[len("--preset="):])
        else:
            rest.append(arg)
    return argv[:1] + [f"--flagfile={flagfile(name)}" for name in names] + rest
