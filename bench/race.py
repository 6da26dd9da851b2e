"""Time to a validation target: our optimizers against AdamW, SGD, heavyball's SOAP, PSGD-Kron and KL-Shampoo, and the
reference K-FAC, on four workloads (issue 33; AlgoPerf's measure, on small workloads).

Protocol. Every run of a workload draws the same batches for a seed (a seeded index stream) from a model
initialised by that seed, and evaluates the validation split every ``every`` steps. Only training is timed (forward,
backward and step; evaluation excluded; heavyball's compilation included and reported apart). Each optimizer's
declared grid (bench/race_optimizers.py) is searched on seed 0, a setting ranked by its time to the target, or,
where none reaches it, by its final validation metric; then seeds 1 and 2 run at the best setting. Reported per
workload and optimizer: seconds and steps to the target (median and range over the seeds; "not reached" is a
result), the ratio to AdamW's median, milliseconds per step, and the final validation and test metric.

With ``--jobs 2`` (the default) two runs go side by side, each in a fresh process with one thread, so that no run
sees another's settings (heavyball sets global torch options) and both cores are busy; every optimizer is timed
under the same load. ``--quick`` runs every workload and optimizer for a few steps at one setting and two seeds in
one process (the CI smoke test; its times mean nothing).

    python bench/race.py --out DIR [--quick] [--workloads paper-cnn,mlp,resnet,lm] [--optimizers ...] [--jobs 2]

Writes ``DIR/race.json`` (every run), ``DIR/race.md`` (the tables) and ``DIR/race-<workload>.png`` (validation
metric against wall-clock and against steps: mean over seeds and min–max band).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import pathlib
import platform
import statistics
import time

import machine
import race_optimizers as optimizers
import torch
from race_workloads import TARGETS, Workload

from kldwrm_fast.experiments.report import plot_band

SEEDS = 3
CADENCE = ("stat_freq", "inv_freq")
_WORKLOADS: dict = {}  # loaded once per process


def _workload(name: str, quick: bool) -> Workload:
    if (name, quick) not in _WORKLOADS:
        _WORKLOADS[(name, quick)] = Workload(name, quick)
    return _WORKLOADS[(name, quick)]


def run_one(job: dict) -> dict:
    """One training run: ``job`` names the workload, optimizer, settings, seed and stage; returns its record."""
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    work = _workload(job["workload"], job["quick"])
    record = {**{k: job[k] for k in ("workload", "optimizer", "settings", "seed", "stage")}, "trace": [],
              "status": "ok", "reason": None, "steps": 0, "train_seconds": 0.0, "compile_s": None,
              "seconds_to_target": None, "steps_to_target": None}  # fmt: skip
    torch.manual_seed(job["seed"])
    model = work.model().to(machine.DEVICE)
    why = optimizers.not_applicable(job["optimizer"], model)
    if why:
        return {**record, "status": why.split(":")[0], "reason": why}
    try:
        return _train(job, work, model, record)
    except (ValueError, RuntimeError) as error:  # a refusal or a failure is a result, reported in one line
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return {**record, "status": "error", "reason": f"error: {type(error).__name__}: {first[:300]}"}


def _train(job: dict, work: Workload, model, record: dict) -> dict:
    opt = optimizers.make(job["optimizer"], model, dict(job["settings"]), job["compile_heavyball"])
    gen = torch.Generator().manual_seed(job["seed"])
    step_seconds: list[float] = []

    def evaluate():
        value = work.evaluate(model, work.validation)
        record["trace"].append({"step": record["steps"], "seconds": record["train_seconds"], **value})
        if record["seconds_to_target"] is None and work.reached(value[work.metric]):
            record["seconds_to_target"], record["steps_to_target"] = record["train_seconds"], record["steps"]
        return math.isfinite(value["loss"])

    evaluate()
    for step in range(1, work.steps + 1):
        x, y = (t.to(machine.DEVICE) for t in work.batch(gen))
        machine.synchronize()
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        work.loss(model(x), y).backward()
        opt.step()
        machine.synchronize()
        step_seconds.append(time.perf_counter() - start)
        record["steps"], record["train_seconds"] = step, record["train_seconds"] + step_seconds[-1]
        last = step == work.steps or record["train_seconds"] > job["time_cap"]
        if (step % work.every == 0 or last) and not evaluate():
            record["status"], record["reason"] = "diverged", f"validation loss not finite at step {step}"
            break
        if last and step < work.steps:
            record["status"], record["reason"] = "time cap", f"stopped at the {job['time_cap']:.0f} s cap"
            break
    if job["optimizer"] in optimizers.HEAVYBALL and job["compile_heavyball"] and len(step_seconds) > 3:
        steady = statistics.median(step_seconds[3:])
        record["compile_s"] = sum(max(0.0, s - steady) for s in step_seconds[:3])
    record["ms_per_step"] = 1e3 * record["train_seconds"] / max(record["steps"], 1)
    record["final_validation"] = record["trace"][-1]
    record["final_test"] = work.evaluate(model, work.test)
    return record


def rank(record: dict, work: Workload) -> tuple:
    """Smaller is better: reached sooner, else a better final validation metric; failures last."""
    if record["status"] not in ("ok", "time cap"):
        return (2, 0.0)
    if record["seconds_to_target"] is not None:
        return (0, record["seconds_to_target"])
    value = record["final_validation"][work.metric]
    return (1, -value if work.metric == "accuracy" else value)


class Race:
    def __init__(self, args):
        self.args = args
        self.records: list[dict] = []
        self.works = {name: _workload(name, args.quick) for name in args.workloads}
        self.pool = None
        if args.jobs > 1:
            context = multiprocessing.get_context("spawn")
            self.pool = concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context, max_tasks_per_child=1)

    def job(self, workload, optimizer, settings, seed, stage) -> dict:
        return dict(workload=workload, optimizer=optimizer, settings=settings, seed=seed, stage=stage,
                    quick=self.args.quick, compile_heavyball=self.args.compile_heavyball,
                    threads=1 if self.args.jobs > 1 else 0,
                    time_cap=self.args.time_cap or self.works[workload].time_cap)  # fmt: skip

    def round(self, jobs: list[dict]) -> list[dict]:
        done = list(self.pool.map(run_one, jobs)) if self.pool else [run_one(job) for job in jobs]
        self.records += done
        return done

    def best(self, workload: str, optimizer: str) -> dict:
        grid = [r for r in self.records if (r["workload"], r["optimizer"], r["seed"]) == (workload, optimizer, 0)]
        return min(grid, key=lambda r: rank(r, self.works[workload]))

    def cells(self):
        return [(w, o) for w in self.args.workloads for o in self.args.optimizers]

    def run(self) -> None:
        quick = self.args.quick
        jobs = []
        for w, o in self.cells():
            lrs = optimizers.grid(o)["lr"]
            for lr in lrs[1:2] if quick else lrs:
                jobs.append(self.job(w, o, optimizers.base_settings(o, lr), 0, "lr"))
        self.round(jobs)
        ran = ("ok", "time cap")
        ours = [(w, o) for w, o in self.cells() if o in optimizers.OURS and self.best(w, o)["status"] in ran]
        if not quick:
            for stage in ("damping", "cadence"):
                jobs = []
                for w, o in ours:
                    best = self.best(w, o)["settings"]
                    for value in optimizers.grid(o)[stage]:
                        change = {"damping": value} if stage == "damping" else dict(zip(CADENCE, value))
                        jobs.append(self.job(w, o, {**best, **change}, 0, stage))
                self.round(jobs)
        seeds = 2 if quick else SEEDS
        jobs = [self.job(w, o, self.best(w, o)["settings"], seed, "seeds")
                for w, o in self.cells() if self.best(w, o)["status"] in ("ok", "time cap", "diverged")
                for seed in range(1, seeds)]  # fmt: skip
        self.round(jobs)
        if self.pool:
            self.pool.shutdown()

    def seed_runs(self, workload: str, optimizer: str) -> list[dict]:
        best = self.best(workload, optimizer)
        same = [r for r in self.records if (r["workload"], r["optimizer"], r["stage"]) == (workload, optimizer, "seeds")
                and r["settings"] == best["settings"]]  # fmt: skip
        return [best, *same]


def _median_range(values: list) -> tuple:
    """Median and range with None (not reached) as +inf."""
    finite = [math.inf if v is None else v for v in values]
    return statistics.median(finite), min(finite), max(finite)


def summary(race: Race) -> dict:
    """Per workload and optimizer: the best setting and its statistics over the seeds."""
    out: dict = {}
    for w, o in race.cells():
        runs = race.seed_runs(w, o)
        work = race.works[w]
        cell = {"settings": runs[0]["settings"], "status": runs[0]["status"], "reason": runs[0]["reason"],
                "seeds": len(runs)}  # fmt: skip
        if runs[0]["status"] in ("ok", "time cap", "diverged"):
            cell.update(
                seconds=_median_range([r["seconds_to_target"] for r in runs]),
                steps=_median_range([r["steps_to_target"] for r in runs]),
                reached=sum(r["seconds_to_target"] is not None for r in runs),
                ms_per_step=statistics.median(r["ms_per_step"] for r in runs),
                compile_s=statistics.median(r["compile_s"] for r in runs) if runs[0]["compile_s"] is not None else None,
                validation=statistics.median(r["final_validation"][work.metric] for r in runs),
                test=statistics.median(r["final_test"][work.metric] for r in runs),
                statuses=sorted({r["status"] for r in runs}),
            )
        out.setdefault(w, {})[o] = cell
    return out


def _settings(settings: dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in settings.items())


def _seconds(cell: dict) -> str:
    median, low, high = cell["seconds"]
    if math.isinf(median):
        return f"not reached ({cell['reached']}/{cell['seeds']})"
    span = "" if cell["seeds"] == 1 else f" [{low:.1f}–{'∞' if math.isinf(high) else f'{high:.1f}'}]"
    return f"{median:.1f}{span} ({cell['reached']}/{cell['seeds']})"


def markdown(race: Race, table: dict) -> str:
    lines = [f"Machine: {machine_line(race.args)}", ""]
    for w, cells in table.items():
        work = race.works[w]
        goal = f"validation {work.metric} {'≥' if work.metric == 'accuracy' else '≤'} {work.target:g}"
        lines += [f"### {w}: {goal} within {work.steps} steps", "", work.description, "",
                  "| optimizer | best setting | s to target, median [range] (reached) | × AdamW | steps to target | "
                  f"ms/step | compile s | final val {work.metric} | final test {work.metric} |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        adamw = cells.get("adamw", {}).get("seconds", (math.inf,))[0]
        for o, cell in cells.items():
            label = optimizers.LABELS[o]
            if "seconds" not in cell:
                lines.append(f"| {label} | — | {cell['reason']} | | | | | | |")
                continue
            compiled = "—" if cell["compile_s"] is None else f"{cell['compile_s']:.1f}"
            ratio = cell["seconds"][0] / adamw if math.isfinite(adamw) and math.isfinite(cell["seconds"][0]) else None
            steps = cell["steps"][0]
            lines.append(
                f"| {label} | {_settings(cell['settings'])} | {_seconds(cell)} | "
                f"{'—' if ratio is None else f'{ratio:.2f}'} | {'—' if math.isinf(steps) else f'{steps:.0f}'} | "
                f"{cell['ms_per_step']:.1f} | {compiled} | "
                f"{cell['validation']:.4f} | {cell['test']:.4f} |"
            )
        lines += ["", verdict(cells), "", f"Grid on seed 0 ({w}):", "",
                  "| optimizer | stage | setting | s to target | final val |", "|---|---|---|---|---|"]  # fmt: skip
        for r in race.records:
            if r["workload"] == w and r["seed"] == 0 and "final_validation" in r:
                reached = "not reached" if r["seconds_to_target"] is None else f"{r['seconds_to_target']:.1f}"
                status = "" if r["status"] == "ok" else f" ({r['status']})"
                lines.append(f"| {optimizers.LABELS[r['optimizer']]} | {r['stage']} | {_settings(r['settings'])} | "
                             f"{reached}{status} | {r['final_validation'][work.metric]:.4f} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def verdict(cells: dict) -> str:
    """Where the time to target goes: the best of ours against AdamW as (steps to target) × (time per step)."""
    ours = {o: c for o, c in cells.items() if o in optimizers.OURS and "seconds" in c}
    adamw = cells.get("adamw", {})
    if not ours or "seconds" not in adamw or math.isinf(adamw["seconds"][0]):
        return "No comparison with AdamW: it or all of ours did not run or did not reach the target."
    name, cell = min(ours.items(), key=lambda item: item[1]["seconds"][0])
    if math.isinf(cell["seconds"][0]):
        return f"None of ours reached the target in the median seed; AdamW did in {adamw['seconds'][0]:.1f} s."
    steps, cost = cell["steps"][0] / adamw["steps"][0], cell["ms_per_step"] / adamw["ms_per_step"]
    outcome = "beats" if cell["seconds"][0] < adamw["seconds"][0] else "loses to"
    return (f"Best of ours: {optimizers.LABELS[name]} {outcome} AdamW, {cell['seconds'][0] / adamw['seconds'][0]:.2f}× "
            f"its time = {steps:.2f}× its steps to target × {cost:.2f}× its time per step.")


def machine_line(args) -> str:
    info = machine.environment()
    try:
        import heavyball

        info["heavyball"] = getattr(heavyball, "__version__", "installed")
    except ImportError:
        info["heavyball"] = None
    load = f"{args.jobs} runs side by side, one thread each" if args.jobs > 1 else f"{torch.get_num_threads()} threads"
    versions = ", ".join(f"{k} {v}" for k, v in info.items() if v)
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads available; {load}; "
            f"{versions}; heavyball compiled: {args.compile_heavyball}")  # fmt: skip


def figures(race: Race, out: pathlib.Path) -> list[str]:
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for w in race.args.workloads:
        work = race.works[w]
        figure, (by_time, by_step) = plt.subplots(1, 2, figsize=(11, 4.2))
        for i, o in enumerate(race.args.optimizers):
            runs = [r for r in race.seed_runs(w, o) if len(r["trace"]) > 1]
            if not runs:
                continue
            length = min(len(r["trace"]) for r in runs)
            values = np.array([[t[work.metric] for t in r["trace"][:length]] for r in runs])
            steps = np.array([t["step"] for t in runs[0]["trace"][:length]])
            label = f"{optimizers.LABELS[o]} (n={len(runs)})"
            plot_band(by_step, steps, values, f"C{i % 10}", label)
            end = min(r["trace"][length - 1]["seconds"] for r in runs)
            grid = np.linspace(0.0, end, 50)
            on_grid = np.array([np.interp(grid, *zip(*((t["seconds"], t[work.metric]) for t in r["trace"])))
                                for r in runs])  # fmt: skip
            plot_band(by_time, grid, on_grid, f"C{i % 10}", label)
        for axis, xlabel in ((by_time, "training wall-clock (s; evaluation excluded)"), (by_step, "step")):
            axis.axhline(work.target, color="k", linestyle="--", linewidth=1, label=f"target {work.target:g}")
            axis.set_xlabel(xlabel)
            axis.set_ylabel(f"validation {work.metric}")
            axis.grid(alpha=0.3)
            if work.metric == "loss":
                axis.set_ylim(top=min(axis.get_ylim()[1], 4.0))
            else:
                axis.set_ylim(bottom=max(axis.get_ylim()[0], 0.5))
        by_step.legend(fontsize=7, loc="best")
        figure.suptitle(f"{w}: {work.description}; mean over seeds, band min–max", fontsize=8)
        figure.tight_layout()
        path = out / f"race-{w}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(str(path))
    return written


def _finite(value):
    """``value`` with every infinite float (a target not reached) as None, so that the file is strict JSON."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for race.json, race.md and the figures")
    parser.add_argument("--quick", action="store_true", help="a few steps of every workload and optimizer (smoke)")
    parser.add_argument("--workloads", default=",".join(TARGETS))
    parser.add_argument("--optimizers", default=",".join(optimizers.NAMES))
    parser.add_argument("--jobs", type=int, default=None, help="runs side by side (default 2; 1 with --quick)")
    parser.add_argument("--time-cap", type=float, default=None,
                        help="training seconds after which a run stops (default: the workload's, race_workloads.py)")
    parser.add_argument("--compile-heavyball", choices=("on", "off"), default=None,
                        help="let heavyball torch.compile its steps (default: on with CUDA, off on a CPU)")
    args = parser.parse_args(argv)
    args.workloads, args.optimizers = args.workloads.split(","), args.optimizers.split(",")
    for name, known, flag in ((args.workloads, TARGETS, "--workloads"), (args.optimizers, list(optimizers.LABELS),
                                                                         "--optimizers")):  # fmt: skip
        unknown = [n for n in name if n not in known]
        if unknown:
            parser.error(f"{flag}: unknown {', '.join(unknown)}; accepted: {', '.join(known)}")
    args.jobs = args.jobs or (1 if args.quick else 2)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1; got {args.jobs}")
    default = "on" if machine.FULL else "off"
    args.compile_heavyball = (args.compile_heavyball or default) == "on"
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    race = Race(args)
    start = time.perf_counter()
    race.run()
    table = summary(race)
    text = markdown(race, table)
    (out / "race.md").write_text(text)
    works = {w: {"metric": x.metric, "target": x.target, "steps": x.steps, "every": x.every,
                 "description": x.description} for w, x in race.works.items()}  # fmt: skip
    result = {"machine": machine_line(args), "quick": args.quick, "workloads": works, "grids": optimizers.GRIDS,
              "summary": table, "runs": race.records, "wall_seconds": time.perf_counter() - start}  # fmt: skip
    (out / "race.json").write_text(json.dumps(_finite(result), indent=1, default=str, allow_nan=False))
    figures(race, out)
    print(text, flush=True)


if __name__ == "__main__":
    main()
