"""One home for each rule: config.py is a leaf, every cross-flag rule runs in `ke_tf.rules.check`,
each method owns its flags, and a new method is one file plus one registration."""
import ast
import json
import os
import sys

import numpy as np
import pytest

import conftest
from ke_tf import config as C, methods, rules
from ke_tf.hooks import Hook
from ke_tf.methods.base import Method, Setting

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def imported_modules(path):
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield (node.module or "").split(".")[0]


def test_config_imports_only_the_standard_library():
    found = set(imported_modules(os.path.join(ROOT, "ke_tf", "config.py")))
    assert found and found <= set(sys.stdlib_module_names) | {"__future__"}, found


def test_the_method_names_of_config_are_the_registry():
    assert C.METHODS == methods.NAMES == tuple(methods.REGISTRY)
    for name in C.METHODS:
        assert methods.get(name).name == name


def test_every_method_flag_is_declared_by_its_method_and_defined_on_the_command_line():
    from ke_tf import main

    declared = methods.settings()
    assert set(declared) == {"dsd_sparsity", "dnr_data_fraction", "dnr_threshold", "repr_s1",
                             "repr_s2", "repr_prune", "bans_temperature", "bans_lambda",
                             "reset_from"}
    method_topic = {f.name for f in main.FLAGS.get_flags_for_module("ke_tf method")}
    assert set(declared) <= method_topic
    for name, setting in declared.items():
        assert main.FLAGS[name].default == setting.default, name
        assert main.FLAGS[name].help.endswith(setting.help), name  # enums: "<a|b>: " first
    assert not {f.name for f in __import__("dataclasses").fields(C.TrainConfig)} & set(declared)
    assert rules.defaults()["dsd_sparsity"] == 0.3 and rules.defaults()["lr"] == 0.256


@pytest.mark.parametrize("flags,message", [
    ({"dsd_sparsity": 1.5}, "--dsd_sparsity must be in (0, 1). Received: dsd_sparsity=1.5"),
    ({"dnr_data_fraction": 0}, "--dnr_data_fraction must be in (0, 1]"),
    ({"dnr_threshold": "row"}, "--dnr_threshold must be one of global, layer"),
    ({"repr_s1": 0}, "--repr_s1 must be >= 1 (or unset)"),
    ({"repr_prune": 1}, "--repr_prune must be in (0, 1)"),
    ({"bans_temperature": 0}, "--bans_temperature must be > 0"),
    ({"bans_lambda": -1}, "--bans_lambda must be >= 0"),
    ({"reset_from": ""}, "--reset_from must name a layer prefix"),
    ({"no_such_flag": 1}, "unknown flags: no_such_flag"),
])
def test_a_method_flag_breaking_its_rule_is_named(flags, message):
    with pytest.raises(C.ConfigError) as err:
        rules.check(C.RunConfig(method_flags=flags))
    assert message in str(err.value)


def test_every_entry_point_runs_the_same_rules(tmp_path):
    """The command line (presets.config), the presets and the runner refuse the same config."""
    from ke_tf import presets
    from ke_tf.generations import GenerationRunner

    for check in (lambda: presets.digits(dsd_sparsity=2.0, run_dir=str(tmp_path)),
                  lambda: GenerationRunner(conftest.tiny_config(
                      tmp_path, method_flags={"dsd_sparsity": 2.0}), verbose=False),
                  lambda: presets.digits(method="slim_scratch", split_mode="wels")):
        with pytest.raises(C.ConfigError, match="--dsd_sparsity|--split_mode"):
            check()
    assert not os.listdir(tmp_path)  # refused before anything was written
    with pytest.raises(C.ConfigError, match="--image_size must be >= 32 for --arch=vgg11_bn"):
        presets.digits(arch="vgg11_bn", image_size=16)


def test_method_flags_round_trip_through_config_json_and_compare_with_defaults():
    cfg = C.RunConfig(method="dsd", method_flags={"dsd_sparsity": 0.5})
    flat = json.loads(json.dumps(cfg.to_flags()))
    assert flat["dsd_sparsity"] == 0.5 and C.RunConfig.from_flags(flat) == cfg
    defaults = rules.defaults()
    # a run saved by the command line (every method flag) and the same run given from Python
    saved = dict(C.RunConfig().to_flags(), **{k: v for k, v in defaults.items()
                                              if k in methods.settings()})
    assert C.differences(saved, C.RunConfig().to_flags(), defaults=defaults) == []
    assert C.differences(saved, cfg.to_flags(), defaults=defaults) == [
        "--dsd_sparsity: 0.3 -> 0.5", "--method: 'ke' -> 'dsd'"]


class HalfReset(Method):
    """A method defined outside the package: KELS masks, and after every generation the reset
    hypothesis is scaled by its own flag --half_reset_scale instead of re-drawn."""

    name = "half_reset"
    settings = {"half_reset_scale": Setting(0.5, "--method=half_reset: scale of the reset "
                                            "hypothesis.", ok=lambda v: 0 <= v <= 1,
                                            rule="must be in [0, 1]")}

    def initial_masks(self, network):
        from ke_tf import masks as masks_lib

        return masks_lib.compute(network, "kels", self.config.split.split_rate)

    def between_generations(self, run, generation):
        scale = self.setting("half_reset_scale")
        for v in run.network.weights:
            if v.path in run.masks:
                m = run.masks[v.path]
                v.assign(np.where(m, v.numpy(), scale * v.numpy()).astype(v.dtype))
        return run.masks

    def split_columns(self):
        return {"split_mode": "kels", "split_rate": self.config.split.split_rate}


class Snapshots(Hook):
    """The network's weights when every generation starts and after its last epoch."""

    def __init__(self):
        self.starts, self.ends = [], []

    def generation_start(self, run, state):
        self.starts.append({v.path: v.numpy().copy() for v in run.network.weights})
        self.masks = run.masks

    def generation_end(self, run, state, evaluation):
        self.ends.append({v.path: v.numpy().copy() for v in run.network.weights})


@pytest.fixture
def half_reset():
    methods.register(HalfReset)
    yield HalfReset
    methods._REGISTERED.pop(HalfReset.name)  # noqa: SLF001 - the test's own registration


@pytest.mark.slow
def test_a_new_method_is_one_class_and_one_registration(tmp_path, half_reset):
    """Defined in this file, registered, trained end to end by the unchanged runner, its flag
    checked by the same rules and read back from config.json."""
    from ke_tf.generations import GenerationRunner

    with pytest.raises(C.ConfigError, match="--half_reset_scale must be in"):
        rules.check(C.RunConfig(method="half_reset", method_flags={"half_reset_scale": 2}))
    cfg = conftest.tiny_config(tmp_path, method="half_reset", export=False,
                               method_flags={"half_reset_scale": 0.25})
    seen = Snapshots()
    rows = GenerationRunner(cfg, verbose=False, hooks=[seen]).run()
    assert [(r["generation"], r["net"], r["method"]) for r in rows] == [
        (1, "dense", "half_reset"), (2, "dense", "half_reset")]
    assert all(0 <= r["test_top1"] <= 100 for r in rows)
    assert json.loads((tmp_path / "config.json").read_text())["half_reset_scale"] == 0.25
    # generation 2 starts from generation 1's weights, the reset hypothesis scaled by 0.25
    m = seen.masks["conv1/kernel"]
    end_1, start_2 = seen.ends[0]["conv1/kernel"], seen.starts[1]["conv1/kernel"]
    assert (~m).any() and m.any()
    np.testing.assert_array_equal(start_2[m], end_1[m])
    np.testing.assert_allclose(start_2[~m], 0.25 * end_1[~m], rtol=1e-6)
    with pytest.raises(ValueError, match="one of ke_tf's own methods"):
        methods.register(type("KE2", (Method,), {"name": "ke"}))
