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
