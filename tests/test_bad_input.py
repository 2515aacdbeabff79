"""Bad input, each case through the command line (run in this process: `conftest.cli_in_process`):
exit status 2, one message naming the flag or file, no traceback, nothing written. docs/reliability.md's bad-input table shows every message; this
test keeps the two in step."""
import os

import numpy as np
import pytest

import conftest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--image_size=16", "--width_multiplier=0.0625", "--generations=1", "--epochs=1",
        "--quiet"]


def png(path, size=20):
    import tensorflow as tf

    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = tf.io.encode_png(np.full((size, size, 3), 128, np.uint8)).numpy()
    with open(path, "wb") as f:
        f.write(data)
    return data


def folder(root, corrupt=False, per_class=3, classes=("a", "b"), splits=("train", "test")):
    for split in splits:
        for c in classes:
            for i in range(per_class):
                data = png(os.path.join(root, split, c, f"{i}.png"))
    if corrupt:
        with open(os.path.join(root, "train", "a", "broken.png"), "wb") as f:
            f.write(data[: len(data) // 2])  # a copy cut short
    return root


def metric_folder(root):
    for split, classes in (("train", {"a": 3, "b": 1}), ("test", {"x": 2, "y": 2})):
        for c, n in classes.items():
            for i in range(n):
                png(os.path.join(root, split, c, f"{i}.png"))
    return root


# id: (arguments (tmp = the test's directory), message fragment shown in stderr and docs/reliability.md)
CASES = {
    "out_of_range": (["--split_rate=1.5"], "--split_rate must be in (0, 1]. Received: split_rate=1.5"),
    "below_bound": (["--epochs=0"], "flag --epochs=0: 0 is not a positive integer"),
    "inconsistent": (["--wels_rand"], "--wels_rand needs --split_mode=wels. Received: wels_rand=True"),
    "warmup": (["--epochs=5", "--warmup_epochs=5"],
               "--warmup_epochs must be in [0, --epochs) = [0, 5). Received: warmup_epochs=5"),
    "unknown_dataset": (["--dataset=imagenet"], "--dataset must be one of digits, "
                        "oxford_flowers102, caltech_birds2011, stanford_dogs, cars196 or "
                        "folder:PATH. Received: dataset='imagenet'"),
    "unknown_arch": (["--arch=resnet9"], "--arch must be one of resnet18, resnet34, resnet50, "
                     "vgg11_bn, densenet121, densenet169, googlenet or keras:NAME (a "
                     "keras.applications constructor, e.g. keras:MobileNetV2). "
                     "Received: arch='resnet9'"),
    "unknown_keras_arch": (["--arch=keras:ResNet9", "--width_multiplier=1"], "--arch=keras:ResNet9: keras.applications "
                           "has no constructor 'ResNet9'"),
    "missing_folder": (["--dataset=folder:{tmp}/nowhere"], "/nowhere/train is not a directory; "
                       "expected"),
    "missing_data_dir": (["--dataset=oxford_flowers102", "--data_dir={tmp}/tfds"],
                         "/tfds does not exist (it holds the tfds datasets, "
                         "<data_dir>/oxford_flowers102/<version>/)"),
    "corrupt_image": (["--dataset=folder:{corrupt}", "--batch_size=4"],
                      "/train/a/broken.png is a truncated PNG (no IEND chunk); remove it or "
                      "pass --skip_corrupt_images"),
    "fewer_than_k": (["--dataset=folder:{metric}", "--task=metric", "--p_classes=2",
                      "--k_images=2", "--batch_size=4"],
                     "--k_images=2: training class 'b' of --dataset=folder:"),
    "image_too_small": (["--arch=vgg11_bn", "--image_size=16"],
                        "--image_size must be >= 32 for --arch=vgg11_bn with the small stem. "
                        "Received: image_size=16"),
    "unwritable_run_dir": (["--run_dir={tmp}/a_file/run"], "--run_dir is not writable: "),
    "select_by_unknown": (["--select_by=val_acc"], "--select_by must be one of last, val_top1, "
                          "val_top5, val_loss for --task=classification. Received: "
                          "select_by='val_acc'"),
    "select_by_without_validation": (["--select_by=val_top1"], "--select_by=val_top1 needs a "
                                     "validation split, and --dataset=digits has none: pass "
                                     "--val_fraction"),
    "patience_without_select_by": (["--patience=3"], "--patience needs --select_by naming a "
                                   "validation metric (e.g. val_top1)"),
    "val_fraction_empties_a_class": (["--val_fraction=0.001"], "--val_fraction=0.001 leaves "
                                     "class '0' (168 non-training images) without a "
                                     "validation image"),
    "val_fraction_with_own_validation": (["--dataset=folder:{withval}", "--val_fraction=0.5",
                                          "--batch_size=4"], "has a validation split of its "
                                          "own, which the run uses; leave --val_fraction at 0"),
    "missing_tf_config": (["--strategy=multi_worker"], "--strategy=multi_worker: the environment "
                          "variable TF_CONFIG is not set"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exits_2_names_the_problem_and_writes_nothing(case, tmp_path, capsys,
                                                                 monkeypatch):
    args, message = CASES[case]
    tmp = str(tmp_path)
    paths = {"tmp": tmp}
    if any("{corrupt}" in a for a in args):
        paths["corrupt"] = folder(os.path.join(tmp, "images"), corrupt=True)
    if any("{withval}" in a for a in args):
        paths["withval"] = folder(os.path.join(tmp, "images"), splits=("train", "val", "test"))
    if any("{metric}" in a for a in args):
        paths["metric"] = metric_folder(os.path.join(tmp, "images"))
    (tmp_path / "a_file").write_text("not a directory")
    before = sorted(os.listdir(tmp))
    args = [a.format(**paths) for a in args]
    if not any(a.startswith("--run_dir=") for a in args):
        args.append(f"--run_dir={tmp}/run")
    monkeypatch.chdir(tmp)
    monkeypatch.delenv("TF_CONFIG", raising=False)
    code, _, err = conftest.ke_main_in_process(TINY + args, capsys)
    assert code == 2, err
    assert message in err
    assert err.startswith("error: ") and "Traceback" not in err
    assert sorted(os.listdir(tmp)) == before  # nothing written: no run directory, no file
    with open(os.path.join(ROOT, "docs", "reliability.md")) as f:
        assert message in f.read().replace("\\|", "|"), f"docs/reliability.md lacks: {message}"


def test_skip_corrupt_images_leaves_out_and_counts_them(tmp_path):
    from ke_tf import data
    from ke_tf.config import DataConfig

    root = folder(str(tmp_path / "images"), corrupt=True)
    with open(os.path.join(root, "test", "b", "notes.txt"), "w") as f:
        f.write("not an image")
    d = data.load(DataConfig(dataset=f"folder:{root}", image_size=16, batch_size=4,
                             skip_corrupt_images=True))
    assert (d.info.num_train, d.info.num_test) == (6, 6)
    assert sorted(os.path.basename(p) for p in d.info.skipped_files) == ["broken.png",
                                                                          "notes.txt"]
    assert data.image_problem(os.path.join(root, "train", "a", "0.png")) is None
