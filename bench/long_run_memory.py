"""Memory over a long run (issue 34): resident set size and live tensors of a small model trained for ``--steps``
steps per optimizer and cadence, sampled every ``--every`` steps; reported: the values after warm-up and their
least-squares slope per 1,000 steps (a leak of one tensor per step would read 1,000 tensors per 1,000 steps).

    python bench/long_run_memory.py [--steps 20000] [--every 1000] [--optimizers kfac,so,q,qe] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import pathlib
import resource
import statistics

import machine
import torch
import torch.nn.functional as F
from torch import nn

from kldwrm_fast import KFAC, QEKLDWRM, QKLDWRM, SOKLDWRM

OPTIMIZERS = {"kfac": KFAC, "so": SOKLDWRM, "q": QKLDWRM, "qe": QEKLDWRM}
CADENCES = {"every step": (1, 1), "10/100": (10, 100)}


def resident_mib() -> float:
    """The process's resident set size now (``/proc/self/statm``), MiB."""
    pages = int(pathlib.Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def live_tensors() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if torch.is_tensor(obj))


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ``ys`` against ``xs``."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def run(cls, cadence: tuple[int, int], steps: int, every: int) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 5))
    opt = cls(model, lr=0.01, stat_freq=cadence[0], inv_freq=cadence[1])
    data = [(torch.randn(32, 20), torch.randint(0, 5, (32,))) for _ in range(16)]
    samples = []
    for k in range(steps):
        x, y = data[k % len(data)]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if (k + 1) % every == 0:
            samples.append((k + 1, resident_mib(), live_tensors()))
    kept = samples[len(samples) // 5 :]  # the first fifth is warm-up (allocator pools, first decompositions)
    at = [s[0] / 1000 for s in kept]
    return {"samples": samples, "rss_mib": [kept[0][1], kept[-1][1]], "tensors": [kept[0][2], kept[-1][2]],
            "rss_slope_mib_per_1k": slope(at, [s[1] for s in kept]),
            "tensor_slope_per_1k": slope(at, [s[2] for s in kept])}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--every", type=int, default=1000)
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--json", type=pathlib.Path)
    args = parser.parse_args()
    rows = []
    for name in args.optimizers.split(","):
        for cadence_name, cadence in CADENCES.items():
            rows.append({"optimizer": name, "cadence": cadence_name,
                         **run(OPTIMIZERS[name], cadence, args.steps, args.every)})  # fmt: skip
    env = machine.environment()
    print(f"{env['device']}, torch {env['torch']}; {args.steps} steps, sampled every {args.every}, the first fifth "
          "left out as warm-up")  # fmt: skip
    print("| optimizer | cadence | RSS MiB (first → last kept) | RSS slope MiB/1k steps | live tensors | slope /1k "
          "steps |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['optimizer']} | {r['cadence']} | {r['rss_mib'][0]:.1f} → {r['rss_mib'][1]:.1f} | "
              f"{r['rss_slope_mib_per_1k']:+.3f} | {r['tensors'][0]} → {r['tensors'][1]} | "
              f"{r['tensor_slope_per_1k']:+.2f} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
