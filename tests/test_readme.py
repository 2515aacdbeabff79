"""The README is a front page (at most 250 lines, every docs page it links exists); its two
set-up commands are the ones CI runs, and its examples run as written."""
import os
import re

import numpy as np
import pytest

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


def python_block(containing):
    """The README's one ```python block that contains `containing`."""
    blocks = [b for b in re.findall(r"```python\n(.*?)```", read("README.md"), re.S)
              if containing in b]
    assert len(blocks) == 1, blocks
    return blocks[0]


def test_readme_is_a_front_page_linking_pages_that_exist():
    readme = read("README.md")
    assert len(readme.splitlines()) <= 250
    links = set(re.findall(r"\]\(([\w/.-]+\.md)(?:#[\w-]+)?\)", readme))
    assert {"docs/guide.md", "docs/fidelity.md", "docs/reliability.md", "docs/performance.md",
            "docs/architecture.md", "docs/development.md"} <= links
    for page in links:
        assert os.path.isfile(os.path.join(ROOT, page)), page
    for page in ["README.md"] + sorted(links):  # a fence left open swallows the rest of a page
        assert len(re.findall(r"^```", read(page), re.M)) % 2 == 0, page
    for page, anchor in re.findall(r"\]\(([\w/.-]+\.md)#([\w-]+)\)", readme):
        headings = re.findall(r"^#+ (.+)$", read(page), re.M)
        slugs = {re.sub(r"[^\w -]", "", h).strip().lower().replace(" ", "-") for h in headings}
        assert anchor in slugs, (page, anchor)


def test_readme_flag_files_and_presets_exist():
    readme = read("README.md")
    for name in re.findall(r"flags/([\w.]+\.flags)", readme):
        assert os.path.exists(os.path.join(ROOT, "flags", name)), name
    for name in re.findall(r"--preset=(\w+)", readme):
        assert os.path.exists(os.path.join(ROOT, "flags", f"{name}.flags")), name


def test_python_api_example_runs(capsys):
    code = python_block("masks.compute(")
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "(11228838, 1813613568) (2825094, 482919936)" in printed  # Table 6


@pytest.mark.slow
def test_training_from_python_example_runs(capsys, tmp_path, monkeypatch):
    """The README's "Training from Python" example, as written, in a fresh directory."""
    import keras

    code = python_block("presets.digits(")
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
    code = python_block("ke_tf.evolve(")
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    lines = [line.split() for line in capsys.readouterr().out.strip().splitlines()]
    assert [(g, net) for g, net, _, _ in lines] == [
        (str(g), net) for g in (1, 2, 3) for net in ("dense", "slim", "slim_recal")]
    assert all(0 <= float(top1) <= 100 for _, _, top1, _ in lines)
    dense_params, slim_params = int(lines[-3][3]), int(lines[-1][3])
    assert slim_params < dense_params / 2  # half the filters: about a quarter of the weights
    assert sum(int(np.prod(w.shape)) for w in scope["slim"].trainable_weights) == slim_params
    assert (tmp_path / "runs" / "my-model" / "network.json").is_file()
