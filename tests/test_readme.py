"""The README's two set-up commands are the ones CI runs and the package provides."""
import os
import re

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
