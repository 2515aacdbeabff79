"""Which generation a run ships, and when it stops: the paper's own remedy for KE's cost.

The paper names KE's main limitation (sec. 6): 100 generations take about 8 hours on
Flower-102, and "this long training time can be reduced by monitoring the performance on a
validation split"; after its peak, KE's performance fluctuates (sec. 4.1). So:

- `--select_by=METRIC` (a validation column of results.csv, `metrics`): the run ships, exports
  and returns the generation with the best METRIC, chosen separately for the dense network N_g
  and for the slim one H_g (they can peak at different generations). "last" (the default, the
  paper's) ships the last generation trained.
- `--patience=P` with `--min_delta=D`: the run stops once neither network has gained more
  than D on METRIC for P generations (Keras's `EarlyStopping` rule, per generation).

Both are pure functions of the rows of results.csv that `RunState` holds, so a resumed run, and
every worker of --strategy=multi_worker, decides exactly as an uninterrupted run: nothing here
has a state of its own. The best generation is the first to reach its value: a later one is
better only by more than D.
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Tuple

from ke_tf.config import IN_MEMORY, ConfigError, RunConfig

LAST = "last"
LOWER_IS_BETTER = ("val_loss",)


def metrics(config: RunConfig) -> Tuple[str, ...]:
    """The --select_by values a run of `config` can use: "last" and the validation columns of
    its task (`ke_tf.tasks`); val_loss only with --loss=ce (AdaCos's network outputs cosines,
    whose cross entropy means nothing)."""
    from ke_tf import tasks

    columns = [c for c in tasks.TASKS[config.data.task].columns if c.startswith("val_")]
    if config.train.loss != "ce":
        columns.remove("val_loss")
    return (LAST,) + tuple(columns)


def check(config: RunConfig) -> None:
    """--select_by names a metric the task produces (and a validation one: choosing on test
    data would make the test score meaningless); ConfigError otherwise."""
    choices = metrics(config)
    if config.select_by in choices:
        return
    why = f"must be one of {', '.join(choices)} for --task={config.data.task}"
    if config.select_by == "val_loss" and config.data.task == "classification":
        why += f" with --loss={config.train.loss}"
    elif not config.select_by.startswith("val_"):
        why += " (a validation metric: selecting on the test split would bias its score)"
    raise ConfigError(f"--select_by {why}. Received: select_by={config.select_by!r}")


def check_validation(config: RunConfig, has_val: bool, dataset: str) -> None:
    """Once the data are read: a metric other than "last" needs a validation split."""
    if config.select_by != LAST and not has_val:
        flags = f"--select_by={config.select_by}" + (
            f" (with --patience={config.patience})" if config.patience else "")
        remedy = ("pass validation= to ke_tf.evolve" if dataset == IN_MEMORY else
                  "pass --val_fraction (e.g. 0.2) to hold out part of its training data")
        raise ConfigError(f"{flags} needs a validation split, and --dataset={dataset} has none: "
                          f"{remedy}")


def _better(value: float, best: float, metric: str, min_delta: float) -> bool:
    """`value` beats `best` by more than `min_delta` (NaN, a diverged or missing value, never
    beats anything and anything beats it)."""
    if math.isnan(value):
        return False
    if math.isnan(best):
        return True
    if metric in LOWER_IS_BETTER:
        return value < best - min_delta
    return value > best + min_delta


def best(rows: List[Dict], net: str, metric: str, min_delta: float = 0.0) -> Optional[int]:
    """The generation whose row of network `net` ("dense", "slim_recal", ...) is best by
    `metric` (the last generation for "last"); None if `rows` hold no row of `net`."""
    generations = sorted(((int(r["generation"]), r.get(metric, "")) for r in rows
                          if r["net"] == net), key=lambda gv: gv[0])
    if not generations:
        return None
    if metric == LAST:
        return generations[-1][0]
    chosen, value = generations[0][0], float("nan")
    for g, cell in generations:
        current = float("nan") if cell == "" else float(cell)
        if _better(current, value, metric, min_delta):
            chosen, value = g, current
    return chosen


def select(rows: List[Dict], shipped_rows: Mapping[str, str], config: RunConfig) -> Dict[str, int]:
    """{shipped network ("dense", "slim"): its selected generation}; `shipped_rows` maps each
    shipped network to its row name in results.csv (the slim one: "slim_recal" when the run
    re-estimates BatchNorm statistics)."""
    chosen = {name: best(rows, row, config.select_by, config.min_delta)
              for name, row in shipped_rows.items()}
    return {name: g for name, g in chosen.items() if g is not None}


def stop_reason(selected: Mapping[str, int], generation: int, generations: int,
                config: RunConfig) -> str:
    """Why the run stops early after `generation` of `generations` with --patience ("" to go
    on, and after the last generation: nothing is cut short): no shipped network gained for
    `patience` generations."""
    if config.patience <= 0 or not selected or generation >= generations:
        return ""
    newest = max(selected.values())
    if generation - newest < config.patience:
        return ""
    gain = f"gain of more than {config.min_delta:g}" if config.min_delta else "gain"
    return (f"early stop after generation {generation}: no {gain} in {config.select_by} "
            f"for {generation - newest} generations (--patience={config.patience}); "
            f"selected {describe(selected)}")


def describe(selected: Mapping[str, int]) -> str:
    """"dense N_4, slim H_3": the selected generation of each shipped network."""
    symbol = {"dense": "N", "slim": "H"}
    return ", ".join(f"{name} {symbol.get(name, name)}_{g}" for name, g in selected.items())
