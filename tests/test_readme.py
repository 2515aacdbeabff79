"""The README's two set-up commands are the ones CI runs and the package provides."""
import os
import re

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def test_ci_runs_the_readme_test_command():
    readme, ci = read("README.md"), read(".ci/run")
    blocks = re.findall(r"```\n(python3\.11 -m venv .*?)\n```", readme)
    assert len(blocks) == 2, blocks
    main_cmd, test_cmd = blocks
    assert main_cmd.endswith("python -m ke_tf.main")
    assert test_cmd in ci.splitlines()


def test_readme_flag_files_exist():
    for name in re.findall(r"flags/([\w.]+\.flags)", read("README.md")):
        assert os.path.exists(os.path.join(ROOT, "flags", name)), name


def test_python_api_example_runs(capsys):
    code = re.search(r"```python\n(.*?)```", read("README.md"), re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "(11228838, 1813613568) (2825094, 482919936)" in printed  # Table 6


def test_training_from_python_example_runs(capsys, tmp_path, monkeypatch):
    """The README's "Training from Python" example, as written, in a fresh directory."""
    import keras

    code = re.findall(r"```python\n(.*?)```", read("README.md"), re.S)[1]
    assert "presets.digits(" in code
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    rows = eval(capsys.readouterr().out.strip().splitlines()[-1])
    assert [(g, net) for g, net, _ in rows] == [
        (g, net) for g in (1, 2) for net in ("dense", "slim", "slim_recal")]
    assert all(0 <= top1 <= 100 for _, _, top1 in rows)
    assert isinstance(scope["slim_net"], keras.Model)
    assert (tmp_path / "runs" / "python-digits" / "export" / "slim").is_dir()
    assert scope["runner"].state.finished and scope["runner"].state.generation == 2


def test_your_own_model_example_runs(capsys, tmp_path, monkeypatch):
    """The README's "Your own model" example, as written, in a fresh directory."""
    block = [b for b in re.findall(r"```python\n(.*?)```", read("README.md"), re.S)
             if "ke_tf.evolve(" in b]
    assert len(block) == 1
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(block[0], "README.md", "exec"), scope)
    lines = [line.split() for line in capsys.readouterr().out.strip().splitlines()]
    assert [(g, net) for g, net, _, _ in lines] == [
        (str(g), net) for g in (1, 2, 3) for net in ("dense", "slim", "slim_recal")]
    assert all(0 <= float(top1) <= 100 for _, _, top1, _ in lines)
    dense_params, slim_params = int(lines[-3][3]), int(lines[-1][3])
    assert slim_params < dense_params / 2  # half the filters: about a quarter of the weights
    assert sum(int(np.prod(w.shape)) for w in scope["slim"].trainable_weights) == slim_params
    assert (tmp_path / "runs" / "my-model" / "network.json").is_file()
