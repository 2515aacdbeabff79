"""The PyTorch reference of tools/benchmark.py: a plain PyTorch ResNet18 (the paper's architecture,
ImageNet stem, 120 classes) training step on this CPU from an in-memory batch, SGD momentum 0.9,
wd 1e-4, 64 px, batch 32, channels_last; `--bf16` runs it under torch.autocast("cpu",
bfloat16), PyTorch's own mixed precision.

    ../torchvenv/bin/python tools/torch_resnet18_step.py [--bf16] [--threads 2]

Prints one JSON line: {"images_per_s", "cpu_seconds_per_image", "threads", "interop_threads"}:
the medians over 3 timed blocks of 8 steps (after 3 warm-up steps) of wall-clock images/s and
of process CPU seconds (all threads) per image. Run it with a Python that has torch (its own
venv: `pip install torch numpy`); torch is not a dependency of ke_tf, and this script does not
import ke_tf.
"""
import argparse
import contextlib
import json
import os
import statistics
import sys
import time

# tools/ holds profile.py, which would shadow the standard library's (torch imports cProfile)
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--bf16", action="store_true")
parser.add_argument("--threads", type=int, default=os.cpu_count())
parser.add_argument("--blocks", type=int, default=3)
parser.add_argument("--steps", type=int, default=8)
args = parser.parse_args()
torch.set_num_threads(args.threads)
torch.set_num_interop_threads(args.threads)


class Block(nn.Module):
    def __init__(self, cin, c, stride):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, c, 3, stride, 1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.short = None if stride == 1 and cin == c else nn.Sequential(
            nn.Conv2d(cin, c, 1, stride, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        y = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
        return torch.relu(y + (x if self.short is None else self.short(x)))


class ResNet18(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], 64
        for c, s in [(64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
                     (512, 1)]:
            blocks.append(Block(cin, c, s))
            cin = c
        self.blocks, self.fc = nn.Sequential(*blocks), nn.Linear(512, n)

    def forward(self, x):
        features = nn.functional.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1)
        return self.fc(torch.flatten(features, 1))


model = ResNet18(120).to(memory_format=torch.channels_last)
opt = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9, weight_decay=1e-4)
loss_fn = nn.CrossEntropyLoss()
batch = 32
x = torch.rand(batch, 3, 64, 64).to(memory_format=torch.channels_last)
y = torch.randint(0, 120, (batch,))
amp = ((lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.bf16
       else contextlib.nullcontext)


def step():
    opt.zero_grad()
    with amp():
        loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()


for _ in range(3):
    step()
rates, cpu = [], []
for _ in range(args.blocks):
    wall, proc = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        step()
    images = batch * args.steps
    rates.append(images / (time.perf_counter() - wall))
    cpu.append((time.process_time() - proc) / images)
print(json.dumps({"images_per_s": statistics.median(rates),
                  "cpu_seconds_per_image": statistics.median(cpu),
                  "threads": torch.get_num_threads(),
                  "interop_threads": torch.get_num_interop_threads()}))
