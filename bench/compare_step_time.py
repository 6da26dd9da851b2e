"""Step-time ratios that survive a noisy machine: the entries of ``test_step_time.py`` timed in turn.

pytest-benchmark times one entry after another, so a machine whose speed drifts (shared cores, clock
changes) shifts whole entries against each other. Here every entry is built once and the entries take
turns, one cadence cycle each, for ``--repeats`` rounds; each round gives every entry a ratio to the first
entry measured minutes, not tens of minutes, apart. Reported: median ms/iteration and the median and range
of the per-round ratios.

    python bench/compare_step_time.py --workload mlp --cadence 10/100 \\
        --entries kfac-reference,kfac-torch,so-torch,q-torch --repeats 5 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import warnings

import machine
from entries import CADENCES, ENTRIES, make_step
from workloads import WORKLOADS, build


def measure(workload: str, cadence: str, entries: list[str], repeats: int, min_steps: int) -> dict:
    """``{entry: {"ms": [per round], "ratio": [per round, to entries[0]]}}``."""
    steps = {}
    for entry in entries:
        model, x, y = build(workload, machine.FULL, machine.DEVICE)
        _, step = make_step(entry, model, x, y, CADENCES[cadence])
        for _ in range(2):  # first statistics and decompositions, kernel compilation
            step()
        steps[entry] = step
    n_steps = max(CADENCES[cadence][1], min_steps)
    times: dict = {entry: [] for entry in entries}
    for _ in range(repeats):
        for entry, step in steps.items():
            times[entry].append(machine.ms_per_call(step, n_steps, n_steps))
    base = times[entries[0]]
    return {e: {"ms": t, "ratio": [a / b for a, b in zip(t, base)]} for e, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=list(WORKLOADS), required=True)
    parser.add_argument("--cadence", choices=list(CADENCES), required=True)
    parser.add_argument("--entries", required=True, help=f"comma-separated; the first is the baseline. {ENTRIES}")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-steps", type=int, default=10, help="steps per turn when the cycle is shorter")
    parser.add_argument("--json", type=pathlib.Path)
    args = parser.parse_args()
    entries = args.entries.split(",")
    unknown = [e for e in entries if e not in ENTRIES]
    if unknown:
        parser.error(f"unknown entries {unknown}; available here: {ENTRIES}")
    if args.repeats < 1 or args.min_steps < 1:
        parser.error("--repeats and --min-steps must be >= 1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random data: Q's growth guard and the hooks' notices are expected
        result = measure(args.workload, args.cadence, entries, args.repeats, args.min_steps)
    env = machine.environment()
    print(f"{args.workload} {args.cadence} on {env['device']}, torch {env['torch']}, "
          f"{args.repeats} rounds; ratio to {entries[0]}: median [min, max]")  # fmt: skip
    for entry, r in result.items():
        ratios = r["ratio"]
        print(f"  {entry:18s} {statistics.median(r['ms']):9.2f} ms   "
              f"{statistics.median(ratios):5.2f} [{min(ratios):.2f}, {max(ratios):.2f}]")  # fmt: skip
    if args.json:
        meta = dict(env, workload=args.workload, cadence=args.cadence, repeats=args.repeats)
        args.json.write_text(json.dumps({"environment": meta, "entries": result}, indent=1))


if __name__ == "__main__":
    main()
