"""The peer training steps on alexnet_cifar in PyTorch (bench venv: torch + brevitas).

(i) float BN step (CE + Adam); (ii) brevitas W4A4 QAT distillation step: the BN teacher
forward under no_grad for targets, the W4A4 student (QuantConv2d/QuantLinear 4-bit
weights, QuantReLU 4-bit, first/last layer 8-bit weights) forward/backward on CE + KD,
Adam update. torch.set_num_threads(2). Prints images/s JSON.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _common import emit, machine, rate, time_per_call  # noqa: E402

CONVS = [(3, 64, True), (64, 128, True), (128, 256, False), (256, 256, True)]  # (in, out, pool)


def float_net(num_classes: int = 10) -> nn.Sequential:
    layers = []
    for cin, cout, pool in CONVS:
        layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        if pool:
            layers.append(nn.MaxPool2d(2))
    layers += [nn.Flatten(), nn.Linear(256 * 4 * 4, 512, bias=False), nn.BatchNorm1d(512), nn.ReLU(),
               nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


def brevitas_net(w_bits: int = 4, a_bits: int = 4, edge_bits: int = 8, num_classes: int = 10) -> nn.Sequential:
    """The W4A4 QAT student: no BN (as our student), scale folded into the quant layers."""
    import brevitas.nn as qnn

    layers = []
    for i, (cin, cout, pool) in enumerate(CONVS):
        layers += [qnn.QuantConv2d(cin, cout, 3, padding=1, bias=True, weight_bit_width=edge_bits if i == 0 else w_bits),
                   qnn.QuantReLU(bit_width=a_bits)]
        if pool:
            layers.append(nn.MaxPool2d(2))
    layers += [nn.Flatten(), qnn.QuantLinear(256 * 4 * 4, 512, bias=True, weight_bit_width=w_bits),
               qnn.QuantReLU(bit_width=a_bits),
               qnn.QuantLinear(512, num_classes, bias=True, weight_bit_width=edge_bits)]
    return nn.Sequential(*layers)


def _data(batch: int):
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (batch, 3, 32, 32), generator=g, dtype=torch.uint8)
    return (pixels.float() - 120.0) / 64.0, torch.randint(0, 10, (batch,), generator=g)


def float_step(batch: int, repeats: int, inner: int):
    net = float_net().train()
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    x, y = _data(batch)

    def one():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        opt.step()

    return time_per_call(one, repeats=repeats, inner=inner, warmup=2)


def distill_step(batch: int, repeats: int, inner: int, temperature: float = 4.0):
    teacher, student = float_net().eval(), brevitas_net().train()
    opt = torch.optim.Adam(student.parameters(), 1e-3)
    x, y = _data(batch)

    def one():
        with torch.no_grad():
            t_logits = teacher(x)
        opt.zero_grad(set_to_none=True)
        logits = student(x)
        kd = F.kl_div(F.log_softmax(logits / temperature, -1), F.softmax(t_logits / temperature, -1),
                      reduction="batchmean") * temperature ** 2
        (F.cross_entropy(logits, y) + kd).backward()
        opt.step()

    return time_per_call(one, repeats=repeats, inner=inner, warmup=2)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--inner", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import brevitas

    t_float, runs_float = float_step(args.batch, args.repeats, args.inner)
    t_dist, runs_dist = distill_step(args.batch, args.repeats, args.inner)
    emit({"bench": "train_step_torch", "batch": args.batch, "model": "alexnet_cifar", "threads": args.threads,
          "torch_float_step_images_per_s": rate(args.batch, t_float),
          "brevitas_w4a4_distill_step_images_per_s": rate(args.batch, t_dist),
          "runs_s": {"float": runs_float, "brevitas_distill": runs_dist},
          "torch": torch.__version__, "brevitas": brevitas.__version__, "machine": machine()})


if __name__ == "__main__":
    main()
