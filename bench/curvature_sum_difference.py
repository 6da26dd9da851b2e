"""What the re-weighting approximation changes: Q's exact and re-weighted steps from the same state, along a run.

Trains the paper's CNN on the MNIST sample with ``QKLDWRM(curvature_sum="exact")`` (the paper's
hyperparameters, docs/algorithms.md §7; batch 128, cadence 30/30 unless told otherwise). At every step the
re-weighted mode's step is computed from the same ``Ĝ_k`` and factors (float64): on an inverse step
``−lr P_{Â,Γ̂}(Ĝ)`` with ``Â = Ā + lr A`` (= ``ρĀ_{k−1} + c A``), on the other steps the eq. (20) scaling
``(1 + lr)²`` in place of ``(1 + lr)``. Reported: the relative difference ``‖S_rw − S_exact‖ / ‖S_exact‖`` over
all layers (median and max over steps, inverse steps apart), and the conjugate-gradient iterations the exact
mode ran per inverse step.

    python bench/curvature_sum_difference.py [--epochs 2] [--cadence 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

from kldwrm_fast import QKLDWRM
from kldwrm_fast.curvature import joint
from kldwrm_fast.experiments.datasets import load_mnist_sample
from kldwrm_fast.experiments.models import paper_cnn
from kldwrm_fast.ops import reference
from kldwrm_fast.optim import q as q_module


def relative(a: list, b: list) -> float:
    num = sum((x.double() - y.double()).pow(2).sum() for x, y in zip(a, b))
    den = sum(y.double().pow(2).sum() for y in b)
    return float((num / den).sqrt())


def reweighted_inverse_steps(states, g_hats, damping, lr):
    steps = []
    for state, g_hat in zip(states, g_hats):
        hats = [state[f"{side}_ea"].double() + lr * state[side].double() for side in ("G", "A")]
        (d_g, q_g), (d_a, q_a) = (torch.linalg.eigh(h) for h in hats)
        d_g, d_a = d_g.clamp_min(0), d_a.clamp_min(0)
        steps.append(-lr * reference.precondition(q_g, d_g, q_a, d_a, g_hat.double(), damping))
    return steps


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--cadence", type=int, default=30)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    differences = {"inverse": [], "other": []}
    iterations = []
    exact_steps, cached_steps, solve = q_module.q_exact_steps, q_module.q_cached_steps, joint._conjugate_gradient

    def counting_solve(*a):
        solution, count = solve(*a)
        iterations.append(count)
        return solution, count

    def exact_recorded(batches, ops, states, g_hats, damping, lr, max_iterations):
        steps, products = exact_steps(batches, ops, states, g_hats, damping, lr, max_iterations)
        differences["inverse"].append(relative(reweighted_inverse_steps(states, g_hats, damping, lr), steps))
        return steps, products

    def cached_recorded(batches, ops, states, rotated, damping, lr, scales):
        steps, products = cached_steps(batches, ops, states, rotated, damping, lr, scales)
        reweighted = [(1.0 + lr, 1.0 + lr)] * len(scales)
        other, _ = cached_steps(batches, ops, states, rotated, damping, lr, reweighted)
        differences["other"].append(relative(other, steps))
        return steps, products

    q_module.q_exact_steps, q_module.q_cached_steps, joint._conjugate_gradient = (
        exact_recorded, cached_recorded, counting_solve,
    )  # fmt: skip
    torch.manual_seed(0)
    data = load_mnist_sample()
    model = paper_cnn()
    opt = QKLDWRM(
        model, lr=0.01, rho=0.5, damping=0.01, weight_decay=1e-3, stat_freq=args.cadence, inv_freq=args.cadence,
        curvature_sum="exact",
    )  # fmt: skip
    x, y = data.train_x, data.train_y
    for _ in range(args.epochs):
        for batch in torch.randperm(len(x)).split(128):
            opt.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            opt.step()
    summary = {
        kind: {"steps": len(values), "median": statistics.median(values), "max": max(values)}
        for kind, values in differences.items()
        if values
    }
    summary["cg_iterations"] = {"median": statistics.median(iterations), "max": max(iterations)} if iterations else {}
    line = "; ".join(
        f"{kind}: median {v['median']:.2e}, max {v['max']:.2e} over {v['steps']} steps"
        for kind, v in summary.items()
        if kind != "cg_iterations"
    )
    print(f"relative difference re-weighted vs exact step — {line}; CG iterations {summary['cg_iterations']}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(summary, handle, indent=2)


if __name__ == "__main__":
    main()
