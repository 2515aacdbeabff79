"""Every preset in flags/ parses and validates into a RunConfig, without training; the package
carries them (`--preset=NAME` from any directory)."""
import glob
import os
import re

import pytest

import conftest
from ke_tf import main, presets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Table 2's peers: (method, loss, generations, epochs) of their preset (sec. 4.1, "Baselines").
PEERS = {"adacos": ("ke", "adacos", 1, 200), "repr": ("repr", "ce", 1, 200),
         "dsd": ("dsd_only", "ce", 1, 400), "bans": ("bans", "ce", 10, 200)}
FLAGFILES = sorted(glob.glob(os.path.join(ROOT, "flags", "*.flags")))


def parse(path):
    flags = main.FLAGS
    args = flags.read_flags_from_files([f"--flagfile={path}"], force_gnu=True)
    try:
        flags(["ke_tf.main"] + args)
        return main.config_from_flags(main.flag_values())
    finally:
        flags.unparse_flags()


def test_there_is_a_preset_per_experiment():
    names = {os.path.basename(p) for p in FLAGFILES}
    # 5 datasets x (CE/Smth/CS-KD + KE and the peers AdaCos, RePr, DSD, BANs)
    assert len([n for n in names if n.startswith("table2_")]) == 5 * (3 + 4)
    assert len([n for n in names if n.startswith("table3_")]) == 5 * 3  # DenseNet169, WELS
    assert len([n for n in names if n.startswith("table4_")]) == 4
    assert len([n for n in names if n.startswith("table5_")]) == 5
    methods = {n[len("compare_digits_"):-len(".flags")] for n in names if n.startswith("compare_")}
    assert methods >= {"ke", "long", "slim_scratch", "llf", "dsd", "dnr", "cskd", "wels_rand",
                       "evolve_zero", "fix_reset_seed", "repr", "dsd_only", "bans", "adacos"}
    assert "digits_default.flags" in names


@pytest.mark.parametrize("path", FLAGFILES, ids=os.path.basename)
def test_preset_validates_and_documents_itself(path):
    text = open(path).read()
    header = [line for line in text.splitlines() if line.startswith("#")]
    name = os.path.basename(path)
    assert any(f"ke-tf --preset={name[:-len('.flags')]} " in line and f"--flagfile=flags/{name}"
               in line for line in header)
    assert any(line.startswith("# Runtime:") for line in header)
    assert any(re.match(r"# (Paper|Expected):", line) for line in header)
    cfg = parse(path)
    if name.startswith("table4_"):
        assert cfg.data.task == "metric" and cfg.model.head == "embedding"
        assert (cfg.data.batch_size, cfg.train.lr, cfg.split.split_rate) == (125, 0.0256, 0.8)
    elif name.startswith("table2_") and name.endswith(tuple(f"_{p}.flags" for p in PEERS)):
        peer = name[:-len(".flags")].rsplit("_", 1)[1]
        method, loss, generations, epochs = PEERS[peer]
        assert (cfg.method, cfg.train.loss, cfg.train.regularizer) == (method, loss, "none")
        assert (cfg.train.generations, cfg.train.epochs, cfg.model.arch) == (generations, epochs,
                                                                             "resnet18")
    elif name.startswith("table2_"):
        assert (cfg.model.arch, cfg.split.split_rate, cfg.train.generations) == ("resnet18", 0.8, 10)
        assert cfg.train.regularizer == ("smooth" if "smth" in name else
                                         "cskd" if "cskd" in name else "none")
    elif name.startswith("table3_"):  # sec. 4.1: "For DenseNet169, we use s_r = 0.7 and WELS"
        assert (cfg.model.arch, cfg.split.split_mode, cfg.split.split_rate) == (
            "densenet169", "wels", 0.7)
        assert (cfg.train.generations, cfg.train.epochs, cfg.method) == (10, 200, "ke")
        assert cfg.train.regularizer == ("smooth" if "smth" in name else
                                         "cskd" if "cskd" in name else "none")
    elif name.startswith("compare_digits_"):  # equal total epochs for every method
        gens, epochs = cfg.train.generations, cfg.train.epochs
        assert gens * epochs == 100 and cfg.data.dataset == "digits"
        assert cfg.method == name[len("compare_digits_"):-len(".flags")] or cfg.method == "ke"
    if name == "digits_default.flags":  # the preset is the no-flag default
        assert cfg == main.config_from_flags(
            main.flag_values(defaults=True))


def test_the_package_carries_every_preset_of_flags():
    bundled = presets.flagfiles()
    assert sorted(f"{name}.flags" for name in bundled) == sorted(map(os.path.basename, FLAGFILES))
    for name, path in bundled.items():
        with open(path) as mine, open(os.path.join(ROOT, "flags", f"{name}.flags")) as source:
            assert mine.read() == source.read()
    assert presets.flagfile("digits_default.flags") == bundled["digits_default"]


def test_preset_is_the_flagfile_first_so_explicit_flags_win():
    path = presets.flagfile("table2_flower102_smth")
    assert presets.expand_preset(["ke-tf", "--epochs=3", "--preset=table2_flower102_smth"]) == [
        "ke-tf", f"--flagfile={path}", "--epochs=3"]
    assert presets.expand_preset(["ke-tf", "--preset", "digits_default", "--seed=1"]) == [
        "ke-tf", f"--flagfile={presets.flagfile('digits_default')}", "--seed=1"]
    args = presets.expand_preset(["ke-tf", "--epochs=30", "--preset=table2_flower102_smth"])
    flags = main.FLAGS
    try:
        flags(flags.read_flags_from_files(args, force_gnu=True))
        cfg = main.config_from_flags(main.flag_values())
    finally:
        flags.unparse_flags()
    assert (cfg.data.dataset, cfg.train.regularizer, cfg.train.epochs) == (
        "oxford_flowers102", "smooth", 30)


def test_an_unknown_preset_exits_2_listing_the_presets(capsys, tmp_path):
    code, _, err = conftest.ke_main_in_process(["--preset=table9_mnist", f"--run_dir={tmp_path}/r"],
                                               capsys)
    assert code == 2
    assert err.startswith("error: --preset=table9_mnist: no such preset. The presets are ")
    assert "digits_default, " in err and "table2_flower102_smth" in err
    assert "Traceback" not in err and not os.path.exists(tmp_path / "r")


def test_a_preset_inside_a_flagfile_is_refused_not_ignored(capsys, tmp_path):
    flagfile = tmp_path / "mine.flags"
    flagfile.write_text("--preset=digits_default\n--epochs=3\n")
    code, _, err = conftest.ke_main_in_process([f"--flagfile={flagfile}",
                                                f"--run_dir={tmp_path}/r"], capsys)
    assert code == 2
    assert err == (f"error: --preset=digits_default inside a --flagfile does not take effect; put "
                   f"--flagfile={presets.flagfile('digits_default')} there instead\n")
    assert not os.path.exists(tmp_path / "r")
