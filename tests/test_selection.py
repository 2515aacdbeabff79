"""--select_by, --patience, --min_delta and the validation split they read (`ke_tf.selection`):
the rule on rows, then real runs that stop early and ship a generation other than the last."""
import csv
import os

import numpy as np
import pytest
import tensorflow as tf

import conftest
from ke_tf import checkpoint, config as C, methods, selection
from ke_tf.config import ConfigError


def rows(values, net="dense", metric="val_top1"):
    return [{"generation": g, "net": net, metric: v} for g, v in enumerate(values, 1)]


def cfg(**run):
    return C.RunConfig(**run)


def test_best_generation_first_to_reach_it_lower_is_better_for_loss_nan_never():
    assert selection.best(rows([50, 70, 70, 60]), "dense", "val_top1") == 2  # ties: the first
    assert selection.best(rows([50, 70, 70.4, 60]), "dense", "val_top1", 0.5) == 2  # min_delta
    assert selection.best(rows([50, 70, 70.6, 60]), "dense", "val_top1", 0.5) == 3
    assert selection.best(rows([2.0, 1.0, 1.5], metric="val_loss"), "dense", "val_loss") == 2
    assert selection.best(rows([float("nan"), 40, float("nan")]), "dense", "val_top1") == 2
    assert selection.best(rows([50, 70, 60]), "dense", "last") == 3
    assert selection.best(rows([50, 70]), "slim", "val_top1") is None


def test_dense_and_slim_are_selected_apart_and_patience_waits_for_both():
    both = rows([50, 70, 60, 65]) + rows([40, 45, 48, 47], net="slim_recal")
    config = cfg(select_by="val_top1", patience=2)
    selected = selection.select(both, {"dense": "dense", "slim": "slim_recal"}, config)
    assert selected == {"dense": 2, "slim": 3}
    assert selection.stop_reason(selected, 4, 10, config) == ""  # the slim one gained at 3
    assert selection.stop_reason(selected, 5, 5, config) == ""  # the last: nothing cut short
    reason = selection.stop_reason(selected, 5, 10, config)
    assert reason == ("early stop after generation 5: no gain in val_top1 for 2 generations "
                      "(--patience=2); selected dense N_2, slim H_3")
    assert selection.stop_reason(selected, 5, 10, cfg(select_by="val_top1")) == ""  # patience 0


@pytest.mark.parametrize("run, message", [
    (dict(select_by="test_top1"), "(a validation metric: selecting on the test split"),
    (dict(select_by="val_acc"), "--select_by must be one of last, val_top1, val_top5, val_loss "
                                "for --task=classification. Received: select_by='val_acc'"),
    (dict(select_by="val_loss", train=C.TrainConfig(loss="adacos")),
     "must be one of last, val_top1, val_top5 for --task=classification with --loss=adacos"),
    (dict(select_by="val_top1", data=C.DataConfig(task="metric", batch_size=125),
          model=C.ModelConfig(head="embedding")),
     "must be one of last, val_recall_at_1, val_recall_at_2, val_recall_at_4, "
     "val_recall_at_8, val_nmi for --task=metric"),
    (dict(patience=2), "--patience needs --select_by naming a validation metric"),
    (dict(min_delta=-1.0), "--min_delta must be >= 0"),
    (dict(data=C.DataConfig(val_fraction=1.0)), "--val_fraction must be in [0, 1)"),
    (dict(data=C.DataConfig(dataset=C.IN_MEMORY, val_fraction=0.2)),
     "--val_fraction cannot split data given from Python: pass validation= instead"),
])
def test_selection_flags_are_checked_against_the_task(run, message):
    from ke_tf import rules

    with pytest.raises(ConfigError) as err:
        rules.check(cfg(**run))
    assert message in str(err.value)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


# min_delta 1000 points: no generation after the first can gain, so --patience=1 stops the
# run after generation 2 and generation 1 is selected: a real early stop whose shipped
# networks are not the last trained, whatever the accuracies.
NEVER_GAINS = dict(select_by="val_top1", patience=1, min_delta=1000.0)


@pytest.mark.slow
def test_early_stop_ships_exports_and_keeps_the_selected_generation(tmp_path):
    from ke_tf import evolution

    run_dir = tmp_path / "run"
    config = conftest.tiny_config(run_dir, data=dict(val_fraction=0.2),
                                  train=dict(generations=4), keep_generations=1, **NEVER_GAINS)
    result = evolution.run(config, verbose=False)
    assert result.selected == {"dense": 1, "slim": 1}
    assert result.stopped.startswith("early stop after generation 2: no gain of more than "
                                     "1000 in val_top1 for 1 generations")
    table = read_csv(run_dir / "results.csv")
    assert [(r["generation"], r["net"]) for r in table] == [
        (str(g), n) for g in (1, 2) for n in ("dense", "slim", "slim_recal")]  # 2 of 4 trained
    assert [(r["generation"], r["net"]) for r in table if r["selected"] == "1"] == [
        ("1", "dense"), ("1", "slim_recal")]
    assert all((r["stopped"] == result.stopped) == (r["generation"] == "2") for r in table)
    assert all(float(r["val_loss"]) > 0 and r["val_top1"] != "" for r in table)
    assert result.rows[0]["selected"] == 1 and result.runner.state.finished
    # --keep_generations=1 keeps the last generation and the selected one
    assert checkpoint.kept_generations(str(run_dir)) == [1, 2]
    # exported, returned and checkpointed: the same generation-1 networks
    kept = checkpoint.load_networks(str(run_dir), generation=1).nets
    last = checkpoint.load_networks(str(run_dir), generation=2).nets
    x = tf.random.stateless_normal((6, 16, 16, 3), seed=(4, 5))
    for name, shipped in (("dense", result.dense), ("slim", result.slim)):
        exported = tf.saved_model.load(str(run_dir / "export" / name))
        out = exported.signatures["serving_default"](images=x)["logits"].numpy()
        np.testing.assert_allclose(out, kept[name](x, training=False).numpy(), atol=1e-5)
        np.testing.assert_allclose(out, shipped(x, training=False).numpy(), atol=1e-5)
        assert not np.allclose(out, last[name](x, training=False).numpy(), atol=1e-3)
    # `python -m ke_tf.export RUN_DIR` exports the selected generation too, unless told another
    from ke_tf import export

    path = export.export_run(str(run_dir), "keras", "slim")
    np.testing.assert_allclose(export.load_keras(path)(x, training=False).numpy(),
                               kept["slim"](x, training=False).numpy(), atol=1e-5)
    # TensorBoard: the selected generations and the reason, by generation
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard" / "generations"),
                           size_guidance={"tensors": 0})
    acc.Reload()
    assert [(e.step, float(tf.make_ndarray(e.tensor_proto)))
            for e in acc.Tensors("selected/slim")] == [(1, 1.0), (2, 1.0)]
    [stopped] = acc.Tensors("stopped")
    assert stopped.step == 2
    assert tf.make_ndarray(stopped.tensor_proto).item().decode() == result.stopped
    # a stopped run is a finished run: run again, it ships the same selected networks
    again = evolution.run(config, verbose=False)
    assert again.selected == result.selected and again.stopped == result.stopped
    np.testing.assert_allclose(again.slim(x, training=False).numpy(),
                               kept["slim"](x, training=False).numpy(), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("method", methods.names())
def test_every_method_selects_and_stops(tmp_path, method):
    """Every method, with a validation split, --select_by and --patience: what it ships is the
    selected generation (one-generation methods: that one), the rest as usual."""
    from ke_tf import evolution

    split = {"split_mode": "wels"} if method in ("dnr",) else {}
    train = dict(generations=3, **({"repr_s1": 1, "repr_s2": 1} if method == "repr" else {}))
    if method in ("dsd_only",):
        train["epochs"] = 2
    config = conftest.tiny_config(tmp_path / "run", data=dict(val_fraction=0.1), split=split,
                                  train=train, method=method, export=False, **NEVER_GAINS)
    result = evolution.run(config, verbose=False)
    generations = result.runner.generations
    trained = sorted({r["generation"] for r in result.rows})
    assert trained == list(range(1, min(generations, 2) + 1))
    assert set(result.selected.values()) == {1}
    assert set(result.selected) == set(result.runner.shipped())
    assert bool(result.stopped) == (generations > 1)


@pytest.mark.slow
def test_metric_learning_validates_on_classes_of_its_own(tmp_path):
    from ke_tf import evolution

    config = conftest.tiny_config(
        tmp_path / "run", data=dict(task="metric", p_classes=2, k_images=2, batch_size=4,
                                    val_fraction=0.4),
        model=dict(head="embedding", embedding_dim=8), train=dict(generations=3),
        select_by="val_recall_at_1", patience=1, min_delta=1000.0, export=False)
    result = evolution.run(config, verbose=False)
    assert result.runner.data.info.num_classes == 3  # 2 of digits' 5 training classes validate
    assert result.selected == {"dense": 1, "slim": 1}
    assert all(0 <= r["val_recall_at_1"] <= 100 and 0 <= r["val_nmi"] <= 100
               and 0 <= r["recall_at_1"] <= 100 for r in result.rows)
    assert len(result.rows) == 2 * 3 and result.stopped


def test_a_validation_metric_needs_a_validation_split(tmp_path):
    from ke_tf.generations import GenerationRunner

    with pytest.raises(ConfigError, match="--select_by=val_top1 needs a validation split, and "
                                          "--dataset=digits has none: pass --val_fraction"):
        GenerationRunner(conftest.tiny_config(tmp_path / "run", select_by="val_top1"),
                         verbose=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_early_stopping_tool_tabulates_both_runs(tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tiny = ("--image_size=16,--width_multiplier=0.0625,--epochs=1,--digits_per_class=4,"
            "--batch_size=20,--min_delta=1000")
    done = subprocess.run([sys.executable, os.path.join(root, "tools", "early_stopping.py"),
                           "--seeds=0", f"--out={tmp_path}", "--generations=3", "--patience=1",
                           f"--extra={tiny}"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [l for l in done.stdout.splitlines() if l.startswith("| 0 |")]
    assert [l.split(" | ")[1:3] for l in lines] == [["dense", "2 of 3"], ["slim", "2 of 3"]]
    assert all("(g1)" in l.split(" | ")[3] for l in lines)  # min_delta 1000: generation 1
    replayed = [l.split(" | ")[:3] for l in done.stdout.splitlines() if l.startswith("| 1 | 0 |")]
    assert replayed and replayed[0][2] in ("2", "3")  # patience 1 stops after 2, or runs all 3


@pytest.mark.slow
def test_select_by_alone_ships_the_lowest_validation_loss_of_a_folders_own_split(tmp_path):
    """--select_by alone (no --patience): every generation is trained, and each shipped network
    is the generation with the lowest val_loss of its own row, on the folder's own val/."""
    from ke_tf import evolution

    root = conftest.image_folder(tmp_path / "images", sizes=(("train", 6), ("val", 3),
                                                             ("test", 3)))
    config = conftest.tiny_config(tmp_path / "run", data=dict(dataset=f"folder:{root}",
                                                              batch_size=6),
                                  train=dict(generations=3), select_by="val_loss", export=False)
    result = evolution.run(config, verbose=False)
    assert not result.stopped and len(result.rows) == 3 * 3
    for name, row in (("dense", "dense"), ("slim", "slim_recal")):
        losses = {r["generation"]: r["val_loss"] for r in result.rows if r["net"] == row}
        assert result.selected[name] == min(losses, key=losses.get)
        assert [r["generation"] for r in result.rows
                if r["net"] == row and r["selected"] == 1] == [result.selected[name]]
