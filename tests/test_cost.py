"""Parameter and MAC counts, and the profile tool (appendix Table 6)."""
import json
import os
import subprocess
import sys

import keras
import pytest

from ke_tf import cost, masks

L = keras.layers
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_counts_by_hand():
    i = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, padding="same", use_bias=False, name="conv")(i)  # 8*8 * 3*3*3*4
    x = L.BatchNormalization(name="bn")(x)  # 8 trainable, 8 moving statistics
    x = L.DepthwiseConv2D(3, strides=2, padding="same", name="dw")(x)  # 4*4 * 3*3*4 (+4 bias)
    x = L.SeparableConv2D(6, 1, name="sep")(x)  # 4*4 * (1*1*4 + 4*6) (+6 bias)
    x = L.GlobalAveragePooling2D()(x)
    model = keras.Model(i, L.Dense(5, name="fc")(x))  # 6*5 (+5 bias)
    rows = {r.name: r for r in cost.layer_costs(model, masks.compute(model, "kels", 0.5))}
    assert rows["conv"].macs == 64 * 108 and rows["conv"].params == 108
    assert rows["bn"].params == 8 and rows["bn"].macs == 0
    assert rows["dw"].macs == 16 * 36 and rows["dw"].params == 40
    assert rows["sep"].macs == 16 * (4 + 24) and rows["sep"].params == 4 + 24 + 6
    assert rows["fc"].macs == 30 and rows["fc"].params == 35
    assert rows["conv"].fit_share == 0.5 and rows["bn"].fit_share is None
    assert cost.total(model) == (108 + 8 + 40 + 34 + 35, 64 * 108 + 16 * 36 + 16 * 28 + 30)


@pytest.mark.slow
def test_profile_tool_reproduces_table6():
    proc = subprocess.run(
        [sys.executable, "tools/profile.py", "--arch=resnet18", "--split_rate=0.5",
         "--num_classes=102", "--image_size=224", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    totals = json.loads(lines[-1])
    assert totals == {"dense_params": 11228838, "slim_params": 2825094,
                      "dense_macs": 1813613568, "slim_macs": 482919936}
    conv1 = next(line for line in lines if line.startswith("conv1 "))
    assert "7x7x3x64" in conv1 and "7x7x3x32" in conv1
    fc = next(line for line in lines if line.startswith("fc "))
    assert "512x102" in fc and "256x102" in fc
