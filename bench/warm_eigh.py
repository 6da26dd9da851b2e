"""Exact against warm-started eigendecompositions of one size group (docs/algorithms.md §6.5), side by side.

For each size ``n`` and batch ``b``: ``torch.linalg.eigh`` of the stack, the CUDA extension's batched cuSOLVER call
when it is built and on a GPU, and :func:`kldwrm_fast.curvature.warm.orthogonal_iteration` with 0 and 1 iterations
from the eigenbasis of a factor 5% away (an exponential average's step at ρ = 0.95), with its residual. Each cell is
the median of ``--repeats`` calls, taken in turn.

    python bench/warm_eigh.py [--sizes 256,512,1024,2048] [--batch 1,8] [--repeats 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics

import machine
import torch

from kldwrm_fast.curvature.lowrank import OVERSAMPLE, range_finder
from kldwrm_fast.curvature.warm import orthogonal_iteration
from kldwrm_fast.ops.backends import unavailable_reason


def factors(n: int, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(X, Q₀)``: float32 (batch, n, n) SPD factors and the eigenbasis of the factors they moved from."""
    gen = torch.Generator().manual_seed(n)
    old = torch.randn(batch, n, 2 * n, generator=gen)
    new = torch.randn(batch, n, 2 * n, generator=gen)
    before = old @ old.mT / (2 * n)
    after = 0.95 * before + 0.05 * (new @ new.mT / (2 * n))
    basis = torch.linalg.eigh(before.double()).eigenvectors.float()
    return (0.5 * (after + after.mT)).to(device), basis.to(device)


def low_rank_start(basis: torch.Tensor, rank: int) -> torch.Tensor:
    """The range finder's start as the optimizer builds it: the top ``rank`` eigenvectors, largest first, and
    :data:`OVERSAMPLE` Gaussian columns."""
    gen = torch.Generator().manual_seed(rank)
    fresh = torch.randn(*basis.shape[:-1], OVERSAMPLE, generator=gen).to(basis.device)
    return torch.cat([basis[..., -rank:].flip(-1), fresh], -1)


def solvers(device: torch.device, ranks: list[int]) -> dict:
    calls = {"eigh (torch)": lambda x, q: torch.linalg.eigh(x)}
    if unavailable_reason("cuda", device) is None:
        from kldwrm_fast.ops import cuda_ext

        calls["eigh (cuSOLVER)"] = lambda x, q: cuda_ext.eigh(x)
    calls["warm, 0 iterations"] = lambda x, q: orthogonal_iteration(x, q, 0)
    calls["warm, 1 iteration"] = lambda x, q: orthogonal_iteration(x, q, 1)
    for rank in ranks:
        calls[f"rank {rank}"] = lambda x, q, r=rank: range_finder(x, low_rank_start(q, r), r)
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="256,512,1024,2048")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--ranks", default="16,64", help="low-rank widths r to time (skipped where r >= n)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=pathlib.Path)
    args = parser.parse_args()
    device = machine.DEVICE
    ranks = [int(r) for r in args.ranks.split(",") if r]
    calls = solvers(device, ranks)
    rows = []
    for n in map(int, args.sizes.split(",")):
        for batch in map(int, args.batch.split(",")):
            x, q = factors(n, batch, device)
            here = {name: call for name, call in calls.items() if not name.startswith("rank ")}
            here.update({f"rank {r}": calls[f"rank {r}"] for r in ranks if r < n})
            times: dict = {name: [] for name in here}
            for _ in range(args.repeats + 1):  # the first round warms up
                for name, call in here.items():
                    times[name].append(machine.ms_per_call(lambda: call(x, q), 1, 1))
            residuals = {it: orthogonal_iteration(x, q, it)[2].max().item() for it in (0, 1)}
            rows.append({"n": n, "batch": batch, "ms": {k: statistics.median(v[1:]) for k, v in times.items()},
                         "residual": residuals})  # fmt: skip
    env = machine.environment()
    print(f"{env['device']}, torch {env['torch']}, {torch.get_num_threads()} threads, float32; median ms of "
          f"{args.repeats}; ratio to eigh (torch)")  # fmt: skip
    print("| n | batch | " + " | ".join(calls) + " | residual (0 / 1 iterations) |")
    print("|---|---|" + "---|" * len(calls) + "---|")
    for row in rows:
        base = row["ms"]["eigh (torch)"]
        cells = [f"{row['ms'][name]:.2f} ({row['ms'][name] / base:.2f}×)" if name in row["ms"] else "—"
                 for name in calls]  # fmt: skip
        print(f"| {row['n']} | {row['batch']} | " + " | ".join(cells)
              + f" | {row['residual'][0]:.3f} / {row['residual'][1]:.3f} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
