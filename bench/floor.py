"""Iteration time against the linear-algebra floor: ours ÷ (SGD + the bare linear algebra our step must do).

For a workload and cadence, the floor of an optimizer is the arithmetic its step cannot avoid, on the same
shapes, called directly with torch (no capture, im2col, recursion, checks or bookkeeping), per iteration:

- every ``stat_freq`` steps, per layer, the two local-factor Grams ``xᵀx`` (rows = batch × locations);
- every ``inv_freq`` steps, per layer, the eigendecompositions: of ``Ā, Γ̄`` (KFAC, SO), of ``Â, Γ̂`` and, when
  steps without one follow, also of ``Ā, Γ̄`` plus the four GEMMs that move Q's recursion out of and into their
  eigenbasis (Q);
- every step, per layer, the four GEMMs of the preconditioning (Q: two more for ``M`` on inverse steps).

QE's figure of merit is the issue's: QE's iteration ÷ (Q's iteration + ``n_inner`` forward/backward passes of the
model, each timed as a forward, the loss and its backward); listing ``qe`` times Q as well. That budget leaves out
two things QE's step cannot skip (docs/algorithms.md §3): each inner step's ``B s = Γ S A`` (two GEMMs per
layer) and the ``n_cap`` forwards of the stored networks. A second figure adds them, timed directly
(``ours/(Q + inner steps + stored)``).

SGD's iteration (forward, backward, update) and each floor are timed in the same process, in turns with our
optimizers, for ``--repeats`` rounds. Reported per optimizer: median ms per iteration and the figure of merit
``ours / (SGD + floor)`` (median and range over rounds), and the same figure from each time's fastest round
(``best``, :func:`best_of_rounds`: on a shared machine noise only adds time). The ``--json`` file is written after
every round, so a run stopped by a time limit keeps the rounds it finished. A ratio of 1 means our step costs
nothing beyond that arithmetic. With ``--compiled`` our optimizers take their plain steps through
``opt.compiled_step()`` (SGD stays eager): on small models the plain step's host time is most of what separates us
from the floor. With ``--fisher empirical`` our optimizers take their statistics from the training backward: the
floor leaves out the sampled Fisher's second backward (labels drawn from the model), and this shows what it costs.

    python bench/floor.py --workload mlp --cadence 30/30 [--optimizers kfac,so,q,qe] [--repeats 3] [--compiled]
        [--backend B] [--fisher sampled|empirical] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import warnings
from typing import Callable, Optional

import machine
import torch
import torch.nn.functional as F
from entries import CADENCES, make_step
from torch import nn
from workloads import WORKLOADS, build

OPTIMIZERS = ("kfac", "so", "q", "qe")


def merit(ratios: list[float]) -> str:
    """Median and range of per-round ratios, as printed."""
    return f"{statistics.median(ratios):5.2f} [{min(ratios):.2f}, {max(ratios):.2f}]"


def best_of_rounds(ours_ms: list[float], *budget_ms: list[float]) -> float:
    """``min(ours) / Σ min(each budget term)``: each time taken at its fastest round. On a shared machine, noise
    only adds time, and a round's ratio divides times taken seconds apart (one side slowed, the other not), so
    the per-round ratios scatter more than either side's minimum does."""
    return min(ours_ms) / sum(min(term) for term in budget_ms)


def layer_shapes(model: nn.Module, x: torch.Tensor) -> list[tuple[int, int, int]]:
    """``(rows, n_in with the bias column, n_out)`` of every Linear and Conv2d layer for input ``x``."""
    shapes, hooks = [], []

    def record(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            rows = output.shape[0] * output.shape[2] * output.shape[3]
            n_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
        else:
            rows, n_in = output.numel() // output.shape[-1], module.in_features
        n_out = module.out_features if isinstance(module, nn.Linear) else module.out_channels
        shapes.append((rows, n_in + int(module.bias is not None), n_out))

    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            hooks.append(module.register_forward_hook(record))
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return shapes


def floor_cycle(kind: str, shapes, cadence: tuple[int, int], device, dtype=torch.float32):
    """A function running one cadence cycle (``inv_freq`` steps) of ``kind``'s bare linear algebra."""
    stat_freq, inv_freq = cadence
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype).to(device)

    layers = []
    for rows, n_in, n_out in shapes:
        a_rows, g_rows = rand(rows, n_in), rand(rows, n_out)
        a, g = a_rows.T @ a_rows / rows, g_rows.T @ g_rows / rows
        layers.append(dict(a_rows=a_rows, g_rows=g_rows, a=a, g=g, q_a=torch.linalg.eigh(a)[1],
                           q_g=torch.linalg.eigh(g)[1], v=rand(n_out, n_in)))  # fmt: skip
    decompositions = 4 if kind == "q" and inv_freq > 1 else 2

    def precondition(layer, extra_gemms):
        middle = layer["q_g"].T @ layer["v"] @ layer["q_a"]
        out = layer["q_g"] @ middle @ layer["q_a"].T
        for _ in range(extra_gemms // 2):
            out = layer["g"] @ out @ layer["a"]
        return out

    def cycle():
        for step in range(inv_freq):
            for layer in layers:
                if step % stat_freq == 0:
                    layer["a_rows"].T @ layer["a_rows"]
                    layer["g_rows"].T @ layer["g_rows"]
                if step == 0:
                    for _ in range(decompositions // 2):
                        torch.linalg.eigh(layer["a"])
                        torch.linalg.eigh(layer["g"])
                    if kind == "q" and inv_freq > 1:
                        precondition(layer, 0)  # the basis change out of and into the eigenbasis: four GEMMs
                precondition(layer, 2 if kind == "q" and step == 0 else 0)

    return cycle


def measure(
    workload: str,
    cadence: str,
    optimizers: list[str],
    repeats: int,
    min_steps: int = 10,
    compiled: bool = False,
    backend: str = "auto",
    fisher: str = "sampled",
    on_round: Optional[Callable[[dict], None]] = None,
) -> dict:
    """The figures of merit (see the module docstring) over ``repeats`` rounds; ``on_round`` (optional) gets the
    figures over the rounds so far after each round, so that a run cut short (a time limit) keeps them."""
    stat_inv = CADENCES[cadence]
    model, x, y = build(workload, machine.FULL, machine.DEVICE)
    shapes = layer_shapes(model, x)
    suffix = f"-{backend}-compiled" if compiled else f"-{backend}"
    if "qe" in optimizers and "q" not in optimizers:
        optimizers = [*optimizers, "q"]  # QE's floor is Q's iteration plus its passes
    if compiled:  # every optimizer's step is one function to the compiler: they share its recompile limit
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8 * len(optimizers))
    runners, n_inner, n_cap = {}, 0, 0
    for entry in ["sgd"] + [f"{name}{suffix}" for name in optimizers]:
        model, x, y = build(workload, machine.FULL, machine.DEVICE)
        opt, step = make_step(entry, model, x, y, stat_inv, **({} if entry == "sgd" else {"fisher": fisher}))
        if entry.startswith("qe-"):
            n_inner, n_cap = opt.param_groups[0]["n_inner"], opt.param_groups[0]["n_cap"]
        # compiled: a whole cycle and two steps, so that every variant the compiler makes (before and after an
        # inverse step, before and after the first plain step's state) is made before the timing
        for _ in range(stat_inv[1] + 2 if compiled else 3):
            step()
        runners[entry.removesuffix("-compiled")] = step
    if n_inner:
        runners["pass"], runners["forward"] = forward_backward(workload)
        runners["matvec"] = kronecker_matvecs(shapes, machine.DEVICE)
    floors = {name: floor_cycle(name, shapes, stat_inv, machine.DEVICE) for name in optimizers if name != "qe"}
    cycles = -(-min_steps // stat_inv[1])  # whole cadence cycles, at least min_steps steps
    n_steps = cycles * stat_inv[1]
    times: dict = {key: [] for key in [*runners, *(f"floor-{name}" for name in floors)]}
    for _ in range(repeats):
        for entry, step in runners.items():
            times[entry].append(machine.ms_per_call(step, n_steps, n_steps))
        for name, cycle in floors.items():
            times[f"floor-{name}"].append(machine.ms_per_call(cycle, cycles, n_steps))
        # copies of the lists: a caller keeping a round's figures must not see later rounds appended to them
        result = figures({key: list(ms) for key, ms in times.items()}, optimizers, backend, n_inner, n_cap)
        if on_round is not None:
            on_round(result)
    return result


def figures(times: dict, optimizers: list[str], backend: str, n_inner: int, n_cap: int) -> dict:
    """Per optimizer its ms per iteration, floor and figures of merit, from the per-round ``times`` (ms)."""
    result = {}
    for name in optimizers:
        ours_ms = times[f"{name}-{backend}"]
        if name == "qe":
            q_ms = times[f"q-{backend}"]
            passes = [n_inner * one for one in times["pass"]]
            inner_steps = [n_inner * (one + matvec) for one, matvec in zip(times["pass"], times["matvec"])]
            stored = [n_cap * forward for forward in times["forward"]]
            floor_ms = [q + p for q, p in zip(q_ms, passes)]
            ratios = [ours / floor for ours, floor in zip(ours_ms, floor_ms)]
            full = [q + inner + forwards for q, inner, forwards in zip(q_ms, inner_steps, stored)]
            result["qe_passes"] = {
                "n_inner": n_inner, "n_cap": n_cap, "pass_ms": times["pass"], "matvec_ms": times["matvec"],
                "forward_ms": times["forward"], "floor_ms": full,
                "ratio": [ours / floor for ours, floor in zip(ours_ms, full)],
                "best": best_of_rounds(ours_ms, q_ms, inner_steps, stored),
            }  # fmt: skip
            best = best_of_rounds(ours_ms, q_ms, passes)
        else:
            floor_ms = times[f"floor-{name}"]
            ratios = [ours / (sgd + floor) for ours, sgd, floor in zip(ours_ms, times["sgd"], floor_ms)]
            best = best_of_rounds(ours_ms, times["sgd"], floor_ms)
        result[name] = {"ms": ours_ms, "floor_ms": floor_ms, "ratio": ratios, "best": best}
    result["sgd"] = {"ms": times["sgd"]}
    return result


def forward_backward(workload: str):
    """Two functions: one forward/backward pass of the workload's model (forward, the loss, its backward, no
    update), and one forward alone (no autograd graph)."""
    model, x, y = build(workload, machine.FULL, machine.DEVICE)

    def run():
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()

    def forward():
        with torch.no_grad():
            model(x)

    run()
    return run, forward


def kronecker_matvecs(shapes, device, dtype=torch.float32):
    """A function computing ``Γ S A`` once per layer (QE's ``B s``, one inner step's), on the layers' shapes."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    operands = [
        [torch.randn(*shape, generator=gen, dtype=dtype).to(device) for shape in ((o, o), (o, i), (i, i))]
        for _, i, o in shapes
    ]

    def run():
        for g, s, a in operands:
            g @ s @ a

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=list(WORKLOADS), required=True)
    parser.add_argument("--cadence", choices=list(CADENCES), required=True)
    parser.add_argument("--optimizers", default="kfac,so,q", help="comma-separated subset of kfac,so,q")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-steps", type=int, default=10, help="steps per turn (whole cadence cycles)")
    parser.add_argument("--compiled", action="store_true", help="our plain steps through opt.compiled_step()")
    parser.add_argument("--backend", default="auto", help="our optimizers' backend (auto: torch on a CPU)")
    parser.add_argument(
        "--fisher", choices=("sampled", "empirical"), default="sampled",
        help="our optimizers' Fisher: empirical takes the statistics from the training backward (no second backward)",
    )  # fmt: skip
    parser.add_argument("--json", type=pathlib.Path)
    args = parser.parse_args()
    optimizers = args.optimizers.split(",")
    unknown = [name for name in optimizers if name not in OPTIMIZERS]
    if unknown or args.repeats < 1 or args.min_steps < 1:
        parser.error(f"--optimizers takes {', '.join(OPTIMIZERS)} (got {unknown}); --repeats and --min-steps >= 1")
    if args.compiled and "qe" in optimizers:
        parser.error("--compiled applies to kfac, so and q: QEKLDWRM has no compiled_step (its step runs autograd)")
    env = machine.environment()
    meta = dict(env, workload=args.workload, cadence=args.cadence, repeats=args.repeats, compiled=args.compiled)
    meta.update(backend=args.backend, fisher=args.fisher)

    def write(result: dict) -> None:  # after every round: a run cut short keeps the rounds it finished
        if args.json:  # whole or not at all: written beside it, then renamed over it
            partial = args.json.with_name(args.json.name + ".partial")
            partial.write_text(json.dumps({"environment": meta, "optimizers": result}, indent=1))
            partial.replace(args.json)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random data: Q's growth guard and the hooks' notices are expected
        result = measure(
            args.workload, args.cadence, optimizers, args.repeats, args.min_steps, args.compiled, args.backend,
            args.fisher, on_round=write,
        )  # fmt: skip
    sgd = statistics.median(result["sgd"]["ms"])
    how = ("compiled plain steps" if args.compiled else "eager") + f", {args.fisher} Fisher"
    print(f"{args.workload} {args.cadence} on {env['device']}, torch {env['torch']}, {args.repeats} rounds, {how}; "
          f"SGD {sgd:.2f} ms/iteration")  # fmt: skip
    for name in [name for name in OPTIMIZERS if name in result]:
        r = result[name]
        ms, floor = statistics.median(r["ms"]), statistics.median(r["floor_ms"])
        of = "ours/(Q + n_inner passes)" if name == "qe" else "ours/(SGD+floor)"
        print(f"  {name:5s} {ms:9.2f} ms  floor {floor:8.2f} ms  {of} {merit(r['ratio'])} best {r['best']:.2f}")
        if name == "qe":
            full = result["qe_passes"]
            print(f"  {'':5s} {'':9s}     with B s and the stored forwards {statistics.median(full['floor_ms']):8.2f} "
                  f"ms  ours/(Q + inner steps + stored) {merit(full['ratio'])} best {full['best']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
