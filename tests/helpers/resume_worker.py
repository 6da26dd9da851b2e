"""Helper for the fresh-process resume test: train, optionally save or resume, print final parameters."""

import sys

import torch
import torch.nn.functional as F
from torch import nn

from kldwrm_fast import KFAC, QEKLDWRM, QKLDWRM, SOKLDWRM

OPTIMIZERS = {"KFAC": KFAC, "SOKLDWRM": SOKLDWRM, "QKLDWRM": QKLDWRM, "QEKLDWRM": QEKLDWRM}


def build(name):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Dropout(0.2), nn.Linear(48, 10), nn.Tanh(), nn.Linear(10, 3)
    )
    extra = dict(n_inner=2) if name == "QEKLDWRM" else {}
    opt = OPTIMIZERS[name](model, lr=0.05, stat_freq=2, inv_freq=4, **extra)
    return model, opt


def batch(k):
    gen = torch.Generator().manual_seed(100 + k)
    return torch.randn(8, 1, 6, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)


def train(model, opt, start, stop):
    for k in range(start, stop):
        x, y = batch(k)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def straight_run_saving_at(name, path, split, total):
    """Train ``total`` steps in this process, saving a checkpoint after ``split``; return final parameters."""
    model, opt = build(name)
    torch.manual_seed(1)
    train(model, opt, 0, split)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state()}, path)
    train(model, opt, split, total)
    return [p.detach() for p in model.parameters()]


def resume(name, path, split, total):
    """Fresh-process half: load the checkpoint, train to ``total``, save the parameters next to it."""
    model, opt = build(name)
    checkpoint = torch.load(path, weights_only=False)
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["opt"])
    torch.set_rng_state(checkpoint["rng"])
    train(model, opt, split, total)
    torch.save([p.detach() for p in model.parameters()], path + ".params")


if __name__ == "__main__":
    resume(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
