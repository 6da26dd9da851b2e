"""How far warm-started eigenbases move a training run (docs/algorithms.md §6.5): the study's paper CNN on the MNIST
sample with its default hyperparameters, one seed, the same batches and dropout masks for every variant; after each
epoch the relative distance of the parameters from the exact run's, the test accuracy, and the decompositions taken;
beside them, as the yardstick, the exact run started from weights moved by a relative 1e-6.

    python bench/warm_trajectory.py [--optimizers kfac,q] [--epochs 10] [--cadence 10/10] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import warnings

import torch
import torch.nn.functional as F

from kldwrm_fast.experiments.datasets import Split, load_mnist_sample
from kldwrm_fast.experiments.mnist import OPTIMIZERS, PAPER_HYPERPARAMETERS, evaluate
from kldwrm_fast.experiments.models import paper_cnn

VARIANTS = {
    "exact": {},
    "warm": dict(eigensolver="warm"),
    "warm, 0 iterations": dict(eigensolver="warm", warm_iters=0),
    "exact, initial weights moved by 1e-6": dict(perturb=1e-6),
}
"""The last is the yardstick: how far the exact run itself goes from a relative 1e-6 change of its start."""


def train(name: str, variant: dict, data: Split, epochs: int, cadence: tuple[int, int], batch: int) -> list[dict]:
    torch.manual_seed(0)
    model = paper_cnn()
    variant = dict(variant)
    perturb = variant.pop("perturb", 0.0)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + perturb * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    settings = dict(PAPER_HYPERPARAMETERS[name], stat_freq=cadence[0], inv_freq=cadence[1], **variant)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = OPTIMIZERS[name](model, **settings)
    order = torch.Generator().manual_seed(1)
    epochs_out = []
    for _ in range(epochs):
        for index in torch.randperm(len(data.train_y), generator=order).split(batch):
            opt.zero_grad()
            F.cross_entropy(model(data.train_x[index]), data.train_y[index]).backward()
            opt.step()
        _, accuracy = evaluate(model, data.test_x, data.test_y)
        params = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
        epochs_out.append({"params": params, "test_acc": accuracy, **opt.estimator.decompositions})
    return epochs_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizers", default="kfac,q")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--cadence", default="10/10", help="stat_freq/inv_freq")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--json", type=pathlib.Path)
    args = parser.parse_args()
    cadence = tuple(int(c) for c in args.cadence.split("/"))
    torch.set_num_threads(1)
    print(f"paper CNN, MNIST sample, batch {args.batch}, cadence {args.cadence}, torch {torch.__version__}, one thread")
    print("| optimizer | variant | ‖θ − θ_exact‖ / ‖θ_exact‖ after epochs 1, 5, 10 | test accuracy | exact / warm |")
    print("|---|---|---|---|---|")
    data = load_mnist_sample()
    results = {}
    for name in args.optimizers.split(","):
        runs = {label: train(name, variant, data, args.epochs, cadence, args.batch)
                for label, variant in VARIANTS.items()}  # fmt: skip
        exact = runs["exact"]
        for label, run in runs.items():
            gaps = [(e["params"] - x["params"]).norm().item() / x["params"].norm().item() for e, x in zip(run, exact)]
            shown = [gaps[i] for i in sorted({0, min(4, len(gaps) - 1), len(gaps) - 1})]
            print(f"| {name} | {label} | " + ", ".join(f"{g:.2e}" for g in shown)
                  + f" | {run[-1]['test_acc']:.4f} | {run[-1]['exact']} / {run[-1]['warm']} |")  # fmt: skip
            results[f"{name} {label}"] = [{"gap": g, "test_acc": e["test_acc"], "exact": e["exact"], "warm": e["warm"]}
                                          for g, e in zip(gaps, run)]  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"cadence": args.cadence, "batch": args.batch, "runs": results}, indent=1))


if __name__ == "__main__":
    main()
