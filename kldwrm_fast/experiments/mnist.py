"""Reproduce the paper's MNIST study: train the 4,712-parameter CNN with K-FAC, SO-, Q- and QE-KLD-WRM and
write Table 1 and the test curves.

    python -m kldwrm_fast.experiments.mnist [--paper | --protocol notebooks] [--optimizers kfac,so,q,qe] ...

Protocols (:data:`PROTOCOLS`): ``default`` (the paper's text, quick sizes), ``paper`` (the author's published
notebooks where the text is silent: :data:`AUTHOR_HYPERPARAMETERS`, dropout 0.5, normalised inputs, the paper's
sizes), ``notebooks`` (as ``paper`` with the notebooks' unnormalised test set).

Under ``torchrun --nproc_per_node=N`` the runs are data parallel (DDP; gloo on CPU, NCCL on GPU): the
global ``--batch-size`` is split across ranks and rank 0 writes the outputs.

Outputs in ``--out``: ``results.json`` (one entry per run with its settings and per-epoch train/test loss,
test accuracy as a fraction, and seconds), ``summary.md`` (Table 1 beside the paper's numbers),
``accuracy.png``, ``loss.png`` and ``final.png``. A run already complete in ``results.json`` with identical
settings (:func:`run_settings`) is reused, so an interrupted study resumes; any other is trained anew. Bad
input is one line on stderr and exit status 2, before anything is written.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import os
import platform
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from kldwrm_fast import KFAC, QEKLDWRM, QKLDWRM, SOKLDWRM
from kldwrm_fast.experiments import report
from kldwrm_fast.experiments.datasets import DatasetError, Split, load_dataset
from kldwrm_fast.experiments.models import DROPOUT, paper_cnn
from kldwrm_fast.ops import BACKENDS

COMMON = dict(lr=0.01, damping=0.01, weight_decay=1e-3, stat_freq=30, inv_freq=30, fisher="sampled")
PAPER_HYPERPARAMETERS = {
    "kfac": dict(COMMON, rho=0.95, momentum=0.9, kl_clip=0.1),
    "so": dict(COMMON, rho=0.33, kl_clip=0.1),
    "q": dict(COMMON, rho=0.5, clip=2.0),
    "qe": dict(COMMON, rho=0.5, clip=2.0, n_inner=10, inner_lr_ratio=0.07, n_cap=4, kl_scale=1 / 330),
}
OPTIMIZERS = {"kfac": KFAC, "so": SOKLDWRM, "q": QKLDWRM, "qe": QEKLDWRM}
QUICK = dict(epochs=10, seeds=2, batch_size=128)
PAPER = dict(epochs=50, seeds=10, batch_size=512)

AUTHOR_CHOICES = dict(fisher="empirical", damping=0.011, bias="separate", eigenvalue_floor=1e-6)
"""What the paper's published notebooks settle that the text leaves open (docs/algorithms.md §7): the empirical
Fisher, damping 0.01 plus the weight decay on eigenvalue products, each bias its own block, eigenvalues below 1e-6
set to zero; momentum 0 for K-FAC too, and the KL clip 0.1 on Q's step."""
AUTHOR_HYPERPARAMETERS = {
    "kfac": dict(AUTHOR_CHOICES, momentum=0.0),
    "so": dict(AUTHOR_CHOICES),
    "q": dict(AUTHOR_CHOICES, kl_clip=0.1),
    "qe": dict(AUTHOR_CHOICES),
}
MEAN, STD = 0.1307, 0.3081  # the notebooks' input normalisation


@dataclass(frozen=True)
class Protocol:
    """How the study is run: dropout rate, hyperparameters on top of the paper's, which inputs are normalised."""

    name: str
    sizes: dict
    dropout: float
    hyperparameters: dict
    normalise_train: bool
    normalise_test: bool


PROTOCOLS = {
    "default": Protocol("default", QUICK, DROPOUT, {}, False, False),
    "paper": Protocol("paper", PAPER, 0.5, AUTHOR_HYPERPARAMETERS, True, True),
    # The notebooks' test loader is not normalised (a quirk): reproduced only here.
    "notebooks": Protocol("notebooks", PAPER, 0.5, AUTHOR_HYPERPARAMETERS, True, False),
}


def hyperparameters(name: str, protocol: Protocol, overrides: dict) -> dict:
    """The paper's setting for ``name``, then the protocol's choices, then ``--set`` overrides."""
    return dict(PAPER_HYPERPARAMETERS[name], **protocol.hyperparameters.get(name, {}), **overrides.get(name, {}))


class UsageError(Exception):
    """Bad input to the command: reported as one line on stderr with exit status 2, before any training."""


def parse_overrides(items: list[str]) -> dict[str, dict]:
    """``["q.rho=0.33", "kfac.lr=0.02"]`` → ``{"q": {"rho": 0.33}, "kfac": {"lr": 0.02}}``."""
    overrides: dict[str, dict] = {}
    for item in items:
        name, _, assignment = item.partition(".")
        key, _, value = assignment.partition("=")
        if name not in OPTIMIZERS or not key or not value:
            raise UsageError(f"--set {item!r}: expected OPT.NAME=VALUE with OPT in {', '.join(OPTIMIZERS)}")
        accepted = [p for p in inspect.signature(OPTIMIZERS[name]).parameters if p not in ("model", "backend")]
        if key not in accepted:
            raise UsageError(f"--set {item!r}: {name} has no setting {key!r}; valid: {', '.join(accepted)}")
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = value
        overrides.setdefault(name, {})[key] = parsed
    return overrides


class _Parser(argparse.ArgumentParser):
    """argparse, with its own errors (a non-integer count, an unknown option) as one line too."""

    def error(self, message: str):
        raise UsageError(message)


def parse_args(argv=None) -> argparse.Namespace:
    parser = _Parser(prog="kldwrm-mnist", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizers", default="kfac,so,q,qe", help="comma-separated subset of kfac,so,q,qe")
    parser.add_argument(
        "--protocol",
        choices=list(PROTOCOLS),
        help="default: quick settings; paper: the author's protocol (see docs/guide.md)",
    )
    parser.add_argument("--paper", action="store_true", help="the author's protocol: --protocol paper")
    parser.add_argument(
        "--seeds", type=int, help=f"runs per optimizer (default {QUICK['seeds']}; --paper {PAPER['seeds']})"
    )
    parser.add_argument("--epochs", type=int, help=f"default {QUICK['epochs']}; --paper {PAPER['epochs']}")
    parser.add_argument("--batch-size", type=int, help=f"default {QUICK['batch_size']}; --paper {PAPER['batch_size']}")
    parser.add_argument("--dataset", default="mnist-sample", help="mnist-sample | fashion-mnist | idx:DIR")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="auto", choices=BACKENDS)
    parser.add_argument("--out", default="mnist-study", help="output directory (default ./mnist-study)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="OPT.NAME=VALUE",
                        help="hyperparameter override, e.g. --set q.rho=0.33 (repeatable)")  # fmt: skip
    parser.add_argument("--max-train", type=int, help="use only the first N training images (smoke runs)")
    parser.add_argument("--max-test", type=int, help="use only the first N test images")
    args = parser.parse_args(argv)
    if args.paper and args.protocol not in (None, "paper", "notebooks"):
        raise UsageError(f"--paper contradicts --protocol {args.protocol}")
    args.protocol = PROTOCOLS[args.protocol or ("paper" if args.paper else "default")]
    for key, value in args.protocol.sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.optimizers = [name.strip() for name in args.optimizers.split(",") if name.strip()]
    unknown = [name for name in args.optimizers if name not in OPTIMIZERS]
    if unknown or not args.optimizers:
        raise UsageError(f"--optimizers: unknown {unknown or 'empty list'}; choose from {', '.join(OPTIMIZERS)}")
    for option in ("seeds", "epochs", "batch_size", "max_train", "max_test"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise UsageError(f"--{option.replace('_', '-')} {value}: expected an integer >= 1")
    args.overrides = parse_overrides(args.overrides)
    for name in dict.fromkeys([*args.optimizers, *args.overrides]):
        check_hyperparameters(name, hyperparameters(name, args.protocol, args.overrides))
    return args


def check_hyperparameters(name: str, hyper: dict) -> None:
    """Build the optimizer once on the network, so a bad value fails here, before any training, in one line."""
    try:
        OPTIMIZERS[name](paper_cnn(), **hyper).remove_hooks()
    except (ValueError, TypeError) as error:
        raise UsageError(f"--set {name}: {error}") from None


def prepare_output(directory: str) -> None:
    """Create ``directory`` (and check it can be written) only once every other check has passed."""
    existed = os.path.isdir(directory)
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, ".write-test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as error:
        if not existed and os.path.isdir(directory) and not os.listdir(directory):
            os.rmdir(directory)
        raise UsageError(f"--out {directory!r}: cannot write there ({error.strerror})") from None


def evaluate(model, x, y, batch_size: int = 1000) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (fraction) of ``model`` in eval mode."""
    model.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(y), batch_size):
            logits = model(x[start : start + batch_size])
            loss += F.cross_entropy(logits, y[start : start + batch_size], reduction="sum").item()
            correct += (logits.argmax(1) == y[start : start + batch_size]).sum().item()
    model.train()
    return loss / len(y), correct / len(y)


def init_data_parallel(args) -> tuple[int, int]:
    """``(rank, world_size)``; under torchrun, join the process group (gloo on CPU, NCCL on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if str(args.device).startswith("cuda"):
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(args.device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if str(args.device).startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size()


def train_run(name: str, seed: int, hyper: dict, data: Split, args, position: int = 0) -> dict:
    """One run: the paper CNN from ``seed`` trained for ``args.epochs`` epochs; returns its results entry.

    With several ranks each takes its slice of every global batch; all ranks end with the same model.
    """
    torch.manual_seed(seed)
    model = paper_cnn(args.protocol.dropout).to(args.device)
    network = DistributedDataParallel(model) if args.world > 1 else model
    opt = OPTIMIZERS[name](network, backend=args.backend, **hyper)
    shuffle = torch.Generator().manual_seed(seed)
    settings = run_settings(name, seed, hyper, data, args)
    run = {"optimizer": name, "seed": seed, "hyperparameters": hyper, "dataset": args.dataset,
           "batch_size": args.batch_size, "settings": settings, "epochs": []}  # fmt: skip
    quiet = None if args.rank == 0 else True
    bar = tqdm(range(1, args.epochs + 1), desc=f"{name} seed {seed}", position=position, leave=False, disable=quiet)
    for epoch in bar:
        order = torch.randperm(len(data.train_y), generator=shuffle).to(args.device)
        start, total, batches = time.perf_counter(), 0.0, 0
        for index in tqdm(order.split(args.batch_size), desc=f"epoch {epoch}", leave=False, disable=quiet):
            index = index.tensor_split(args.world)[args.rank]
            opt.zero_grad()
            loss = F.cross_entropy(network(data.train_x[index]), data.train_y[index])
            loss.backward()
            opt.step()
            total, batches = total + loss.item(), batches + 1
        seconds = time.perf_counter() - start
        test_loss, test_acc = evaluate(model, data.test_x, data.test_y)
        run["epochs"].append(
            dict(epoch=epoch, train_loss=total / batches, test_loss=test_loss, test_acc=test_acc, seconds=seconds)
        )
        bar.set_postfix(test_acc=f"{test_acc:.4f}", test_loss=f"{test_loss:.3f}")
    return run


def normalised(data: Split, protocol: Protocol) -> Split:
    """Inputs standardised with the notebooks' mean and standard deviation where the protocol says so."""

    def scale(x, on):
        return (x - MEAN) / STD if on else x

    return Split(
        scale(data.train_x, protocol.normalise_train), data.train_y, scale(data.test_x, protocol.normalise_test),
        data.test_y,
    )  # fmt: skip


def run_settings(name: str, seed: int, hyper: dict, data: Split, args) -> dict:
    """Everything that changes a run's result; a stored run is reused only when all of it matches."""
    return {
        "optimizer": name, "seed": seed, "hyperparameters": hyper, "dataset": args.dataset,
        "protocol": args.protocol.name,
        "train_images": len(data.train_y), "test_images": len(data.test_y), "epochs": args.epochs,
        "batch_size": args.batch_size, "backend": args.backend, "device": torch.device(args.device).type,
        "processes": args.world,
    }  # fmt: skip


def run_key(run: dict) -> str:
    """The stored run's settings (runs saved before settings were recorded have none and never match)."""
    return json.dumps(run.get("settings"), sort_keys=True)


def load_results(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        return json.load(handle)


def save_json(path: str, runs: list[dict]) -> None:
    temporary = path + ".tmp"
    with open(temporary, "w") as handle:
        json.dump(runs, handle, indent=1)
    os.replace(temporary, path)


def context_line(args, data: Split) -> str:
    machine = (
        torch.cuda.get_device_name()
        if str(args.device).startswith("cuda")
        else f"{platform.processor() or platform.machine()} CPU ({os.cpu_count()} cores)"
    )
    return (
        f"Protocol {args.protocol.name}. "
        f"Dataset {args.dataset} ({len(data.train_y)} train / {len(data.test_y)} test images), "
        f"{args.epochs} epochs, batch {args.batch_size}, {args.seeds} seeds, {args.world} process(es); {machine}; "
        f"torch {torch.__version__}."
    )


def main(argv=None) -> None:
    try:
        args = parse_args(argv)
        data = load_dataset(args.dataset)
        prepare_output(args.out)
    except (UsageError, DatasetError, ValueError) as error:
        print(f"kldwrm-mnist: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    args.rank, args.world = init_data_parallel(args)
    if args.max_train:
        data = Split(data.train_x[: args.max_train], data.train_y[: args.max_train], data.test_x, data.test_y)
    if args.max_test:
        data = Split(data.train_x, data.train_y, data.test_x[: args.max_test], data.test_y[: args.max_test])
    data = normalised(data, args.protocol)
    data = Split(*(t.to(args.device) for t in (data.train_x, data.train_y, data.test_x, data.test_y)))
    results_path = os.path.join(args.out, "results.json")
    runs = load_results(results_path)
    done = {run_key(run) for run in runs if len(run["epochs"]) >= args.epochs}
    planned = [(name, seed) for name in args.optimizers for seed in range(args.seeds)]
    selected, reused = [], 0
    talk = args.rank == 0
    for name, seed in tqdm(planned, desc="runs", disable=None if talk else True):
        hyper = hyperparameters(name, args.protocol, args.overrides)
        key = json.dumps(run_settings(name, seed, hyper, data, args), sort_keys=True)
        if key in done:
            selected.append(next(run for run in runs if run_key(run) == key))
            reused += 1
            continue
        runs = [run for run in runs if run_key(run) != key]
        run = train_run(name, seed, hyper, data, args, position=1)
        runs.append(run)
        selected.append(run)
        if talk:
            save_json(results_path, runs)
            if not sys.stderr.isatty():  # no progress bars: one line per finished run instead
                last = run["epochs"][-1]
                seconds = sum(epoch["seconds"] for epoch in run["epochs"])
                print(f"{name} seed {seed}: test accuracy {100 * last['test_acc']:.2f}%, test loss "
                      f"{last['test_loss']:.3f}, {seconds:.0f} s", flush=True)  # fmt: skip
    if not talk:
        return
    context = context_line(args, data)
    if reused:
        context += f" {reused} of these {len(selected)} runs were reused from an earlier invocation (same settings)."
    summary = report.summary_markdown(selected, context)
    summary_path = os.path.join(args.out, "summary.md")
    with open(summary_path, "w") as handle:
        handle.write(summary)
    title = f"{args.dataset}, {args.protocol.name} protocol, {args.epochs} epochs"
    figures = report.plot_curves(selected, args.out, title)
    rows = [line for line in summary.splitlines() if line.startswith("| optimizer") or "| this run" in line]
    print("\n".join(rows))
    print("Wrote " + ", ".join([results_path, summary_path, *figures]))


if __name__ == "__main__":
    main()
