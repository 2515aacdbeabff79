"""What setup.py claims and what CI proves agree: the supported Pythons, the version ranges, their
lower bounds (CI's oldest leg installs exactly those, .ci/lowest.txt), the tested exact set
(constraints.txt, the README's commands), and the presets inside the package."""
import ast
import os
import re
import subprocess
import sys
import zipfile

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def setup_keywords():
    """The keyword arguments of setup.py's setup(...) call, as literals."""
    call = next(node for node in ast.walk(ast.parse(read("setup.py")))
                if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup")
    return {k.arg: ast.literal_eval(k.value) for k in call.keywords
            if k.arg in ("python_requires", "classifiers", "install_requires", "extras_require",
                         "package_data", "entry_points")}


def pins(name):
    """{package: version} of a constraints file's `name==version` lines."""
    out = {}
    for line in read(name).splitlines():
        if line and not line.startswith("#"):
            package, version = line.split("==")
            out[canonical(package)] = Version(version)
    return out


def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements():
    kw = setup_keywords()
    return [Requirement(r) for r in kw["install_requires"] + kw["extras_require"]["test"]]


def test_python_3_10_to_3_13_as_tensorflow_2_21():
    kw = setup_keywords()
    python = SpecifierSet(kw["python_requires"])
    assert [v for v in ("3.9", "3.10", "3.11", "3.12", "3.13", "3.14") if Version(v) in python] == [
        "3.10", "3.11", "3.12", "3.13"]
    assert {c.rsplit(" :: ", 1)[1] for c in kw["classifiers"]
            if c.startswith("Programming Language :: Python :: 3.")} == {
        "3.10", "3.11", "3.12", "3.13"}


def test_every_requirement_is_a_range_with_both_bounds():
    for req in requirements():
        operators = {s.operator for s in req.specifier}
        assert ">=" in operators, req  # a tested lower bound
        assert "==" not in operators, req  # exact pins belong to constraints.txt
        if canonical(req.name) != "importlib-resources":  # a backport: its API only grows
            assert "<" in operators, req
    bounds = {canonical(r.name): str(r.specifier) for r in requirements()}
    assert bounds["tensorflow"] == "<2.22,>=2.21.0" and bounds["keras"] == "<3.16,>=3.12.0"


def test_the_oldest_leg_installs_every_lower_bound():
    lowest = pins(".ci/lowest.txt")
    for req in requirements():
        lower = next(Version(s.version) for s in req.specifier if s.operator == ">=")
        assert lowest[canonical(req.name)] == lower, req


def test_the_pinned_set_is_inside_every_range():
    pinned = pins("constraints.txt")
    for req in requirements():
        assert pinned[canonical(req.name)] in req.specifier, (req, pinned[canonical(req.name)])
    assert "ke-tf" not in pinned and "ke_tf" not in pinned


def test_ci_runs_the_pinned_the_newest_and_the_oldest_leg():
    ci = read(".ci/run")
    assert 'pip install -c constraints.txt ".[test]"' in ci  # leg 1, the README's command
    assert re.search(r'leg newest "\$\(pyenv_python 3\.13\)" "\$\(ls "\$wheel_dir"/ke_tf-\*\.whl\)'
                     r'\[test\]"', ci)
    assert 'leg oldest "$(pyenv_python 3.10)" -c .ci/lowest.txt ".[test]"' in ci


def test_the_wheel_carries_the_presets_and_the_console_script():
    kw = setup_keywords()
    assert kw["package_data"] == {"ke_tf": ["flags/*.flags"]}
    assert os.path.realpath(os.path.join(ROOT, "ke_tf", "flags")) == os.path.join(ROOT, "flags")
    assert kw["entry_points"] == {"console_scripts": ["ke-tf=ke_tf.main:run"]}


@pytest.mark.slow
def test_the_built_wheel_holds_the_package_and_every_preset(tmp_path):
    import shutil

    source = tmp_path / "source"  # a copy: building leaves build/ and *.egg-info behind
    shutil.copytree(ROOT, source, symlinks=True,
                    ignore=shutil.ignore_patterns(".venv", ".git", "runs", "build", "*.egg-info",
                                                  "__pycache__", ".pytest_cache"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(tmp_path / "dist"), str(source)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = (tmp_path / "dist").glob("ke_tf-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    flagfiles = sorted(os.listdir(os.path.join(ROOT, "flags")))
    assert sorted(n[len("ke_tf/flags/"):] for n in names if n.startswith("ke_tf/flags/")) == flagfiles
    assert {"ke_tf/main.py", "ke_tf/methods/ke.py", "ke_tf/data/sources.py"} <= set(names)
    assert not [n for n in names if n.startswith(("tests/", "tools/"))]
