"""TensorBoard logs of a run, read back with TensorBoard's own readers (and its HParams plugin)."""
import csv
import json
import os
import types

import numpy as np
import pytest
import tensorflow as tf
from tensorboard import context as tb_context
from tensorboard.backend.event_processing import data_provider
from tensorboard.backend.event_processing import plugin_event_multiplexer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins import base_plugin
from tensorboard.plugins.hparams import api_pb2, backend_context, list_session_groups
from tensorboard.plugins.hparams import plugin_data_pb2

import conftest
from ke_tf import config as C
from ke_tf import monitor as monitor_lib
from ke_tf.generations import GenerationRunner
from ke_tf.monitor import Monitor
from ke_tf.state import RunState

FLAGS = {"dataset": "digits", "task": "classification", "arch": "resnet18", "method": "ke",
         "split_mode": "kels", "split_rate": 0.5, "regularizer": "smooth", "seed": 3,
         "generations": 2, "epochs": 4, "lr": 0.05, "batch_size": 16, "stem": None,
         "width_multiplier": 0.0625, "image_size": 16, "weight_decay": 5e-4,
         "evolve_mode": "rand", "reset_init": "layer", "run_dir": "runs/x", "overwrite": False}
COLUMNS = ("test_top1", "test_top5", "val_top1", "val_top5")


def accumulator(path):
    acc = EventAccumulator(str(path), size_guidance={"tensors": 0})
    acc.Reload()
    return acc


def values(acc, tag):
    """[(step, value)] of a scalar (TF2 summaries are stored as tensors)."""
    return [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]


def rows_of(g):
    return [{"net": "dense", "test_top1": 50.0 + g, "test_top5": 90.0, "val_top1": "",
             "val_top5": "", "seconds": 1.0},
            {"net": "slim", "test_top1": 10.0 * g, "test_top5": 60.0, "val_top1": "",
             "val_top5": ""},
            {"net": "slim_recal", "test_top1": 40.0 + g, "test_top5": 80.0, "val_top1": "",
             "val_top5": ""}]


def hypotheses_of(g):
    return {"conv1/kernel": (np.full(6, 0.5 * g), np.full(2, 0.25 / g)),
            "fc/kernel": (np.array([1.0, 3.0]), np.zeros(0))}  # a layer without reset entries


def fake_model(lr):
    return types.SimpleNamespace(optimizer=types.SimpleNamespace(learning_rate=tf.Variable(lr)))


def log_epochs(monitor, generation, epochs, first_loss=1.0, first_epoch=0, upto=None):
    """Epochs [first_epoch, upto or epochs) of one generation through the monitor's hooks, as
    the runner calls them (a generation resumed after epoch k starts with state.epoch = k)."""
    run = types.SimpleNamespace(model=fake_model(0.1), generations=2, epochs=epochs)
    state = RunState(generation=generation, epoch=first_epoch)
    monitor.generation_start(run, state)
    for e in range(first_epoch, epochs if upto is None else upto):
        state.end_epoch(e + 1, {"loss": first_loss - 0.1 * e, "top1": 0.5})
        monitor.epoch_end(run, state)


@pytest.fixture
def logged(tmp_path):
    """Two generations of fabricated rows, as GenerationRunner.run logs them."""
    log_dir = tmp_path / "tensorboard"
    mon = Monitor(str(log_dir), FLAGS, verbose=False)
    for g in (1, 2):
        log_epochs(mon, g, epochs=3)
        mon.log_generation(g, rows_of(g), COLUMNS,
                           {"train_loss": 0.5 / g, "train_top1": 70.0 + g, "train_top5": 99.0},
                           hypotheses_of(g))
    mon.close()
    return log_dir


def test_generations_run_scalars(logged):
    acc = accumulator(logged / "generations")
    tags = set(acc.Tags()["tensors"])
    assert {"dense/test_top1", "slim/test_top1", "slim_recal/test_top1", "dense/test_top5",
            "slim/test_top5", "slim_recal/test_top5",
            "train/loss", "train/top1", "train/top5", "fit/conv1/kernel", "reset/conv1/kernel",
            "fit/fc/kernel", "hypotheses/fit", "hypotheses/reset", "flags"} == tags
    assert not any(t.startswith(("dense/val", "slim/val")) for t in tags)  # empty cells skipped
    assert values(acc, "dense/test_top1") == [(1, 51.0), (2, 52.0)]
    assert values(acc, "slim/test_top1") == [(1, 10.0), (2, 20.0)]
    assert values(acc, "slim_recal/test_top1") == [(1, 41.0), (2, 42.0)]
    assert values(acc, "train/top1") == [(1, 71.0), (2, 72.0)]
    assert values(acc, "train/loss") == [(1, 0.5), (2, 0.25)]
    assert values(acc, "fit/conv1/kernel") == [(1, 0.5), (2, 1.0)]  # paper Fig. 7: mean |w|
    assert values(acc, "reset/conv1/kernel") == [(1, 0.25), (2, 0.125)]
    assert values(acc, "fit/fc/kernel") == [(1, 2.0), (2, 2.0)]
    for tag in ("dense/test_top1", "fit/conv1/kernel"):
        assert acc.SummaryMetadata(tag).plugin_data.plugin_name == "scalars"


def test_hypothesis_histograms(logged):
    acc = accumulator(logged / "generations")
    for tag, counts in (("hypotheses/fit", 8), ("hypotheses/reset", 2)):
        assert acc.SummaryMetadata(tag).plugin_data.plugin_name == "histograms"
        events = acc.Tensors(tag)
        assert [e.step for e in events] == [1, 2]
        buckets = tf.make_ndarray(events[1].tensor_proto)  # [k, 3]: left, right, count
        assert buckets[:, 2].sum() == counts  # every fit (reset) weight of every layer
    fit2 = tf.make_ndarray(acc.Tensors("hypotheses/fit")[1].tensor_proto)
    assert fit2[:, 0].min() == pytest.approx(1.0) and fit2[:, 1].max() == pytest.approx(3.0)


def test_hypothesis_histograms_draw_from_at_most_histogram_values_weights(tmp_path, monkeypatch):
    from ke_tf import monitor

    monkeypatch.setattr(monitor, "HISTOGRAM_VALUES", 3)  # 8 fit weights: every 3rd, 3 of them
    mon = Monitor(str(tmp_path / "tb"), FLAGS, verbose=False)
    mon.log_generation(1, rows_of(1), COLUMNS, {"train_loss": 0.5}, hypotheses_of(1))
    mon.close()
    acc = accumulator(tmp_path / "tb" / "generations")
    counts = {tag: tf.make_ndarray(acc.Tensors(tag)[0].tensor_proto)[:, 2].sum()
              for tag in ("hypotheses/fit", "hypotheses/reset")}
    assert counts == {"hypotheses/fit": 3, "hypotheses/reset": 2}


def test_flags_text(logged):
    acc = accumulator(logged / "generations")
    (event,) = acc.Tensors("flags")
    assert event.step == 0
    assert acc.SummaryMetadata("flags").plugin_data.plugin_name == "text"
    text = tf.make_ndarray(event.tensor_proto).item().decode()
    assert text.startswith("```\n") and text.endswith("\n```")
    assert json.loads(text[4:-4]) == FLAGS


def test_epoch_curves(logged):
    for g in (1, 2):
        acc = accumulator(logged / f"generation_{g:03d}")
        assert set(acc.Tags()["tensors"]) == {"loss", "top1", "lr"}
        assert [s for s, _ in values(acc, "loss")] == [1, 2, 3]
        np.testing.assert_allclose([v for _, v in values(acc, "loss")], [1.0, 0.9, 0.8], rtol=1e-6)
        np.testing.assert_allclose([v for _, v in values(acc, "lr")], [0.1] * 3, rtol=1e-6)


def session_start_info(acc):
    (event,) = acc.Tensors("_hparams_/session_start_info")
    data = plugin_data_pb2.HParamsPluginData.FromString(
        acc.SummaryMetadata("_hparams_/session_start_info").plugin_data.content)
    return event, data.session_start_info


def test_hparams_session_and_experiment(logged):
    acc = accumulator(logged)  # the log directory itself is the HParams session
    assert set(acc.Tags()["tensors"]) == {"_hparams_/experiment", "_hparams_/session_start_info"}
    event, info = session_start_info(acc)
    assert event.step == 0
    hparams = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
               for k, v in info.hparams.items()}
    assert hparams == {"dataset": "digits", "task": "classification", "arch": "resnet18",
                       "method": "ke", "split_mode": "kels", "split_rate": 0.5,
                       "regularizer": "smooth", "seed": 3, "generations": 2, "epochs": 4,
                       "lr": 0.05, "batch_size": 16, "width_multiplier": 0.0625,
                       "image_size": 16, "weight_decay": 5e-4, "evolve_mode": "rand",
                       "reset_init": "layer"}
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        acc.SummaryMetadata("_hparams_/experiment").plugin_data.content).experiment
    assert [h.name for h in experiment.hparam_infos] == [h.name for h in monitor_lib.HPARAMS]
    assert all(h.type != api_pb2.DATA_TYPE_UNSET for h in experiment.hparam_infos)
    method = next(h for h in experiment.hparam_infos if h.name == "method")
    assert sorted(v.string_value for v in method.domain_discrete.values) == sorted(C.METHODS)
    metrics = {(m.name.group, m.name.tag) for m in experiment.metric_infos}
    assert {("generations", "dense/test_top1"), ("generations", "slim/test_top1"),
            ("generations", "slim_recal/test_top1"), ("generations", "dense/recall_at_1"),
            ("generations", "train/top1")} <= metrics


def test_hparams_dashboard_compares_methods_and_split_rates(tmp_path):
    """Two runs under one --logdir: the HParams plugin lists one session each, with its
    method, split rate and last-generation metrics."""
    for name, method, rate in (("ke-s05", "ke", 0.5), ("long-s08", "long", 0.8)):
        mon = Monitor(str(tmp_path / name / "tensorboard"),
                      dict(FLAGS, method=method, split_rate=rate), verbose=False)
        for g in (1, 2):
            rows = [dict(r, test_top1=r["test_top1"] + 100 * rate) for r in rows_of(g)]
            mon.log_generation(g, rows, COLUMNS, {"train_top1": 70.0}, {})
        mon.close()
    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(tmp_path))
    mux.Reload()
    provider = data_provider.MultiplexerDataProvider(mux, str(tmp_path))
    tb = base_plugin.TBContext(logdir=str(tmp_path), multiplexer=mux, data_provider=provider)
    request = api_pb2.ListSessionGroupsRequest(start_index=0, slice_size=10,
                                               allowed_statuses=[api_pb2.STATUS_UNKNOWN])
    response = list_session_groups.Handler(tb_context.RequestContext(),
                                           backend_context.Context(tb), "", request).run()
    seen = {}
    for group in response.session_groups:
        (session,) = group.sessions
        metrics = {(m.name.group, m.name.tag): (m.training_step, m.value)
                   for m in group.metric_values}
        seen[session.name] = (group.hparams["method"].string_value,
                              group.hparams["split_rate"].number_value,
                              metrics[("generations", "dense/test_top1")],
                              metrics[("generations", "slim_recal/test_top1")])
    assert seen == {"ke-s05/tensorboard": ("ke", 0.5, (2, 102.0), (2, 92.0)),
                    "long-s08/tensorboard": ("long", 0.8, (2, 132.0), (2, 122.0))}


def test_metric_learning_rows(tmp_path):
    mon = Monitor(str(tmp_path), dict(FLAGS, task="metric"), verbose=False)
    columns = ("recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8", "nmi")
    row = {"net": "dense", "recall_at_1": 61.0, "recall_at_2": 70.0, "recall_at_4": 80.0,
           "recall_at_8": 90.0, "nmi": 40.0}
    mon.log_generation(1, [row, dict(row, net="slim", recall_at_1=float("nan"))], columns,
                       {"train_loss": 0.2}, {})
    mon.close()
    acc = accumulator(tmp_path / "generations")
    assert values(acc, "dense/recall_at_1") == [(1, 61.0)]
    assert values(acc, "dense/nmi") == [(1, 40.0)]
    assert values(acc, "train/loss") == [(1, pytest.approx(0.2))]
    assert np.isnan(values(acc, "slim/recall_at_1")[0][1])  # a diverged net is recorded as NaN
    _, info = session_start_info(accumulator(tmp_path))
    assert info.hparams["task"].string_value == "metric"


def test_resumed_monitor_appends_without_writing_flags_again(tmp_path):
    """A run interrupted in generation 2 after logging epoch 3, whose checkpoint holds 2 epochs:
    flags and hparams once; the epoch logged after the checkpoint is not drawn twice."""
    first = Monitor(str(tmp_path), FLAGS, verbose=False)
    log_epochs(first, 1, epochs=4)
    first.log_generation(1, rows_of(1), COLUMNS, {"train_top1": 71.0}, hypotheses_of(1))
    log_epochs(first, 2, epochs=4, first_loss=9.0, upto=3)  # crash after epoch 3
    first.close()
    again = Monitor(str(tmp_path), FLAGS, verbose=False, resumed=True)
    log_epochs(again, 2, epochs=4, first_loss=5.0, first_epoch=2)  # epochs 3 and 4 again
    again.log_generation(2, rows_of(2), COLUMNS, {"train_top1": 72.0}, hypotheses_of(2))
    again.close()
    # Both writers run in one process within one second here, so their event files' names
    # (time, pid, then a counter compared as text) need not sort in writing order: compare
    # the points by step. (A real resume is a later process: its files sort after.)
    acc = accumulator(tmp_path / "generations")
    assert len(acc.Tensors("flags")) == 1
    assert sorted(values(acc, "dense/test_top1")) == [(1, 51.0), (2, 52.0)]
    assert len(accumulator(tmp_path).Tensors("_hparams_/session_start_info")) == 1
    curve = sorted(values(accumulator(tmp_path / "generation_002"), "loss"))
    assert [s for s, _ in curve] == [1, 2, 3, 4]
    np.testing.assert_allclose([v for _, v in curve], [9.0, 8.9, 4.8, 4.7], rtol=1e-6)
    assert [s for s, _ in values(accumulator(tmp_path / "generation_001"), "loss")] == [1, 2, 3, 4]
    assert not [f for f in os.listdir(tmp_path / "generation_002") if not f.startswith("events")]


def test_generation_trained_again_from_its_start(tmp_path):
    """first_epoch=0: the interrupted generation's whole curve is replaced; a cut-off last
    record (a crash while writing) is dropped."""
    mon = Monitor(str(tmp_path), FLAGS, verbose=False)
    log_epochs(mon, 1, epochs=3, first_loss=9.0)
    mon.close()
    (event_file,) = (tmp_path / "generation_001").iterdir()
    with open(event_file, "ab") as f:
        f.write(b"\x10\x00\x00")  # half a record
    mon = Monitor(str(tmp_path), FLAGS, verbose=False, resumed=True)
    log_epochs(mon, 1, epochs=2, first_epoch=0)
    mon.close()
    curve = values(accumulator(tmp_path / "generation_001"), "loss")
    np.testing.assert_allclose([v for _, v in curve], [1.0, 0.9], rtol=1e-6)
    assert [s for s, _ in curve] == [1, 2]


def test_console_table_and_quiet(capsys, tmp_path):
    mon = Monitor(str(tmp_path / "v"), FLAGS, verbose=True)
    mon.print_table([{"generation": 1, "net": "dense", "test_top1": 51.234}],
                    ["generation", "net", "test_top1"])
    mon.close()
    mon.close()  # idempotent
    out = capsys.readouterr().out
    assert "test_top1" in out and "51.23" in out
    quiet = Monitor(str(tmp_path / "q"), FLAGS, verbose=False)
    quiet.print_table([{"generation": 1}], ["generation"])
    quiet.close()
    assert capsys.readouterr().out == ""


@pytest.mark.slow
def test_real_tiny_run(tmp_path):
    """GenerationRunner's TensorBoard directory, against its results.csv and hypotheses.csv."""
    cfg = conftest.tiny_config(tmp_path / "run", train=dict(epochs=2, warmup_epochs=1), seed=1,
                               export=False)
    GenerationRunner(cfg, verbose=False).run()
    run_dir = tmp_path / "run"
    tb = run_dir / "tensorboard"
    entries = set(os.listdir(tb))
    assert {"generations", "generation_001", "generation_002"} <= entries
    assert [e for e in entries if e.startswith("events.out.tfevents")]  # the HParams session
    with open(run_dir / "results.csv") as f:
        results = list(csv.DictReader(f))
    with open(run_dir / "hypotheses.csv") as f:
        hypotheses = list(csv.DictReader(f))
    acc = accumulator(tb / "generations")
    for net in ("dense", "slim", "slim_recal"):
        expected = [(int(r["generation"]), float(r["test_top1"]))
                    for r in results if r["net"] == net]
        got = values(acc, f"{net}/test_top1")
        assert [s for s, _ in got] == [1, 2]
        np.testing.assert_allclose([v for _, v in got], [v for _, v in expected], atol=1e-4)
    dense = [r for r in results if r["net"] == "dense"]
    np.testing.assert_allclose([v for _, v in values(acc, "train/top1")],
                               [float(r["train_top1"]) for r in dense], atol=1e-4)
    for r in hypotheses:
        fit = dict(values(acc, f"fit/{r['variable']}"))[int(r["generation"])]
        assert fit == pytest.approx(float(r["fit_mean_abs"]), rel=1e-5)
        if r["reset_mean_abs"]:
            reset = dict(values(acc, f"reset/{r['variable']}"))[int(r["generation"])]
            assert reset == pytest.approx(float(r["reset_mean_abs"]), rel=1e-5)
    assert {"hypotheses/fit", "hypotheses/reset", "flags"} <= set(acc.Tags()["tensors"])
    text = tf.make_ndarray(acc.Tensors("flags")[0].tensor_proto).item().decode()
    with open(run_dir / "config.json") as f:
        assert json.loads(text[4:-4]) == json.load(f)
    for g in (1, 2):
        curve = accumulator(tb / f"generation_{g:03d}")
        assert {"loss", "top1", "top5", "lr"} <= set(curve.Tags()["tensors"])
        np.testing.assert_allclose([v for _, v in values(curve, "lr")], [0.05, 0.05], rtol=1e-6)
    _, info = session_start_info(accumulator(tb))
    assert info.hparams["method"].string_value == "ke"
    assert info.hparams["split_rate"].number_value == 0.5
    assert info.hparams["seed"].number_value == 1
