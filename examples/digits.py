"""Train a small CNN on scikit-learn's 8×8 digits with each optimizer and print held-out loss and accuracy.

Run: python examples/digits.py [--steps 300]
"""

import argparse
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from kldwrm_fast import KFAC, QKLDWRM, SOKLDWRM


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(128, 32), nn.ReLU(), nn.Linear(32, 10),
    )  # fmt: skip


def evaluate(model, x, y):
    model.eval()
    with torch.no_grad():
        logits = model(x)
    model.train()
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1297], perm[1297:]

    optimizers = {
        "SGD": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
        "KFAC": lambda m: KFAC(m, lr=0.03, stat_freq=10, inv_freq=10),
        "SOKLDWRM": lambda m: SOKLDWRM(m, lr=0.03, stat_freq=10, inv_freq=10),
        "QKLDWRM": lambda m: QKLDWRM(m, lr=0.03, stat_freq=10, inv_freq=10),
    }
    print(f"{'optimizer':<10} {'test loss':>10} {'test acc':>9} {'seconds':>8}")
    for name, make_optimizer in optimizers.items():
        torch.manual_seed(0)
        model = make_model()
        opt = make_optimizer(model)
        gen = torch.Generator().manual_seed(1)
        start = time.perf_counter()
        for _ in range(args.steps):
            idx = train[torch.randint(0, len(train), (64,), generator=gen)]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        seconds = time.perf_counter() - start
        loss, accuracy = evaluate(model, x[test], y[test])
        print(f"{name:<10} {loss:>10.4f} {accuracy:>9.3f} {seconds:>8.2f}")


if __name__ == "__main__":
    main()
