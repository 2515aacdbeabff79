"""The command line: flags -> RunConfig, exit statuses, nothing written on bad usage."""
import csv
import json
import os
import subprocess
import sys

import pytest

import conftest
from ke_tf import config as C

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def run_cli(args, cwd, module="ke_tf.main", timeout=600):
    return subprocess.run([sys.executable, "-m", module] + args, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("args,flag", [
    (["--split_rate=1.5"], "split_rate"),
    (["--split_rate=0"], "split_rate"),
    (["--arch=resnet9"], "arch"),
    (["--dataset=imagenet21k"], "dataset"),
    (["--epochs=0"], "epochs"),
    (["--epochs=3", "--warmup_epochs=3"], "warmup_epochs"),
    (["--regularizer=smooth", "--label_smoothing=0"], "label_smoothing"),
    (["--no_such_flag=1"], "no_such_flag"),
    (["--image_size=abc"], "image_size"),
    (["--arch=vgg11_bn", "--image_size=16"], "image_size"),
    (["positional"], "positional"),
    (["--wels_rand"], "wels_rand"),
])
def test_bad_usage_exits_2_naming_the_flag_and_writes_nothing(tmp_path, args, flag, capsys,
                                                              monkeypatch):
    run_dir = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    code, _, err = conftest.ke_main_in_process(args + [f"--run_dir={run_dir}"], capsys)
    assert code == 2, err
    assert flag in err
    assert "Traceback" not in err
    assert not run_dir.exists() and os.listdir(tmp_path) == []


@pytest.mark.slow
def test_unwritable_run_dir_exits_2(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permissions: use a file as the parent
            target = tmp_path / "a_file"
            target.write_text("x")
            run_dir = target / "run"
        else:
            run_dir = locked / "run"
        proc = run_cli([f"--run_dir={run_dir}"], cwd=tmp_path)
    finally:
        locked.chmod(0o700)
    assert proc.returncode == 2, proc.stderr
    assert "--run_dir" in proc.stderr


def test_dataset_aware_defaults_and_explicit_flags_win():
    from ke_tf import main

    base = main.flag_values(defaults=True)
    digits = main.config_from_flags(dict(base, dataset="digits"))
    assert (digits.data.image_size, digits.model.width_multiplier, digits.train.epochs) == (32, 0.25, 40)
    assert digits.data.batch_size == 25  # 100 images = 4 full batches
    assert digits.train.regularizer == "smooth"
    dogs = main.config_from_flags(dict(base, dataset="stanford_dogs"))
    assert (dogs.data.image_size, dogs.train.lr, dogs.train.epochs, dogs.train.generations) == \
        (224, 0.256, 200, 10)
    assert (dogs.split.split_mode, dogs.split.split_rate, dogs.train.weight_decay) == ("kels", 0.8, 1e-4)
    assert dogs.data.batch_size == 32
    metric = main.config_from_flags(dict(base, dataset="cars196", task="metric"))
    assert (metric.data.batch_size, metric.train.lr, metric.model.head) == (125, 0.0256, "embedding")
    assert dogs.train.warmup_epochs == 5
    assert dogs.run_dir == os.path.join("runs", "stanford_dogs-resnet18-ke-none-s0")
    assert main.config_from_flags(dict(base, method="long", seed=2)).run_dir == \
        os.path.join("runs", "digits-resnet18-long-smooth-s2")
    mine = main.config_from_flags(dict(base, dataset="stanford_dogs", lr=0.1, epochs=3))
    assert (mine.train.lr, mine.train.epochs, mine.train.warmup_epochs) == (0.1, 3, 2)


def test_config_errors_name_the_flag():
    with pytest.raises(C.ConfigError, match="--split_rate"):
        C.SplitConfig(split_rate=1.01).validate()
    with pytest.raises(C.ConfigError, match="--batch_size"):
        C.DataConfig(task="metric", batch_size=10, p_classes=3, k_images=3).validate()
    with pytest.raises(C.ConfigError, match="--head"):
        C.RunConfig(data=C.DataConfig(task="metric", batch_size=125)).validate()


@pytest.mark.slow
def test_main_job_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    # Even batches: TF 2.21's oneDNN CPU kernels abort training 4-channel nets on odd ones.
    proc = run_cli(["--generations=2", "--epochs=2", "--width_multiplier=0.0625",
                    "--image_size=16", "--digits_per_class=3", "--batch_size=10",
                    "--recal_images=16", f"--run_dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "generation 2/2" in proc.stdout and "slim_recal" in proc.stdout
    assert "I0000" not in proc.stderr and "INFO:tensorflow" not in proc.stderr
    for name in ("results.csv", "hypotheses.csv", "config.json", "masks.npz",
                 "tensorboard/generations", "export/dense/saved_model.pb",
                 "export/slim/saved_model.pb"):
        assert (run_dir / name).exists(), name


@pytest.mark.slow
def test_console_script_is_the_same_program(tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "ke-tf")
    proc = subprocess.run([script, "--split_rate=2", f"--run_dir={tmp_path / 'r'}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--split_rate" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "I0000" not in proc.stderr  # TensorFlow's native start-up noise is filtered
    helpfull = subprocess.run([script, "--helpfull"], capture_output=True, text=True, timeout=300)
    assert helpfull.returncode == 0
    assert "--split_rate" in helpfull.stdout and "--generations" in helpfull.stdout


def test_help_lists_every_flag_of_a_run_and_the_presets(capsys):
    from ke_tf import main

    for arg in ("--help", "-h"):
        code, out, err = conftest.ke_main_in_process([arg], capsys)
        assert (code, err) == (0, "")
        assert out.startswith("`python -m ke_tf.main`: train a network with Knowledge Evolution")
        for name in main.flag_values():
            assert f"--{name}:" in out or f"--[no]{name}:" in out, name
        assert "--preset: A paper preset by name" in out
        assert "--logtostderr" not in out  # absl's own flags: --helpfull


@pytest.mark.slow
def test_missing_tfds_data_offline_is_one_clear_message(tmp_path):
    data_dir = tmp_path / "tfds"
    data_dir.mkdir()
    proc = run_cli(["--dataset=stanford_dogs", f"--data_dir={data_dir}", "--image_size=32",
                    f"--run_dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "--manual_dir" in proc.stderr and str(data_dir) in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_helpfull_groups_the_flags_by_topic_with_short_help():
    from ke_tf import main

    proc = subprocess.run([sys.executable, "-m", "ke_tf.main", "--helpfull"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0
    out = proc.stdout
    topics = sorted(main.TOPICS)  # absl lists the groups alphabetically
    positions = [out.index(f"\nke_tf {t}:\n") for t in topics]
    assert positions == sorted(positions)
    sections = dict(zip(topics, [out[p:q] for p, q in zip(positions, positions[1:] + [len(out)])]))
    for topic in main.TOPICS:
        names = [f.name for f in main.FLAGS.get_flags_for_module(f"ke_tf {topic}")]
        assert names, topic
        for flag in main.FLAGS.get_flags_for_module(f"ke_tf {topic}"):
            assert f"--{flag.name}:" in sections[topic] or f"--[no]{flag.name}:" in \
                sections[topic], (topic, flag.name)
            text = flag.help.split(": ", 1)[-1] if flag.help.startswith("<") else flag.help
            assert len(text) <= 110, (flag.name, text)  # one line of help each
    assert set(main.flag_values()) == {f.name for t in main.TOPICS
                                       for f in main.FLAGS.get_flags_for_module(f"ke_tf {t}")}


@pytest.mark.slow
@pytest.mark.parametrize("flag", [f"--method={m}" for m in C.METHODS] + [
    f"--regularizer={r}" for r in C.REGULARIZERS] + [f"--loss={l}" for l in C.LOSSES])
def test_every_method_and_regularizer_composes_with_the_default_command(tmp_path, flag, capsys):
    """Each method/regularizer/loss flag alone added to the default command: the defaults it
    cannot use are replaced, and said; the run ends with status 0. The network and the data are
    made tiny (16 px, 1/16 width, 3 training digits a class) and the epochs few; every other flag,
    the digits preset's batch of 25 among them, keeps its default. A regularizer or a loss trains
    one generation (with KE, whose generation 2 the --method=ke run trains)."""
    generations = 2 if flag.startswith("--method=") else 1
    code, out, err = conftest.ke_main_in_process(
        [flag, f"--generations={generations}", "--epochs=2", "--warmup_epochs=1", "--noexport",
         "--image_size=16", "--width_multiplier=0.0625", "--digits_per_class=3",
         "--recal_images=16", f"--run_dir={tmp_path / 'run'}"], capsys)
    assert code == 0, err[-2000:]
    assert (tmp_path / "run" / "results.csv").is_file()
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    if flag == "--regularizer=cskd":  # digits' batch 25 is odd: CS-KD pairs need an even one
        assert "default --batch_size=20: --regularizer=cskd needs an even batch" in out
        assert config["batch_size"] == 20
    else:
        assert config["batch_size"] == 25


def test_an_explicit_invalid_batch_still_names_the_flag():
    from ke_tf import main

    base = main.flag_values(defaults=True)
    with pytest.raises(C.ConfigError, match="--batch_size must be even"):
        main.config_from_flags(dict(base, regularizer="cskd", batch_size=25))
    notes = []
    cfg = main.config_from_flags(dict(base, regularizer="cskd"), notes)
    assert cfg.data.batch_size == 20 and notes
    assert main.config_from_flags(dict(base, dataset="stanford_dogs", regularizer="cskd")
                                  ).data.batch_size == 32  # already even: left as it is


@pytest.mark.slow
@pytest.mark.parametrize("peer", [["--method=repr"], ["--method=dsd_only"], ["--method=bans"],
                                  ["--loss=adacos"]], ids=lambda p: p[0])
def test_the_papers_peers_run_from_the_cli_on_a_folder_dataset(tmp_path, peer, capsys):
    root = conftest.image_folder(tmp_path / "imgs")
    code, _, err = conftest.ke_main_in_process(
        peer + [f"--dataset=folder:{root}", "--image_size=16", "--batch_size=6",
                "--width_multiplier=0.0625", "--generations=2", "--epochs=2", "--warmup_epochs=1",
                "--recal_images=12", "--regularizer=none", f"--run_dir={tmp_path / 'run'}",
                "--quiet"], capsys)
    assert code == 0, err[-2000:]
    with open(tmp_path / "run" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(0 <= float(r["test_top1"]) <= 100 for r in rows)
    assert (tmp_path / "run" / "export" / "dense").is_dir()
    # only KE (here with AdaCos) has a slim network; BANs, RePr and DSD ship the dense one
    assert (tmp_path / "run" / "export" / "slim").is_dir() == (peer == ["--loss=adacos"])
