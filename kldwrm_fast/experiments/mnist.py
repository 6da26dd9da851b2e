"""Reproduce the paper's MNIST study: train the 4,712-parameter CNN with K-FAC, SO-, Q- and QE-KLD-WRM and
write Table 1 and the test curves.

    python -m kldwrm_fast.experiments.mnist [--paper] [--optimizers kfac,so,q,qe] [--out DIR] ...

Under ``torchrun --nproc_per_node=N`` the runs are data parallel (DDP; gloo on CPU, NCCL on GPU): the
global ``--batch-size`` is split across ranks and rank 0 writes the outputs.

Outputs in ``--out``: ``results.json`` (one entry per run with per-epoch train/test loss, test accuracy as a
fraction, and seconds), ``summary.md`` (Table 1 beside the paper's numbers), ``accuracy.png``, ``loss.png``.
Runs already complete in ``results.json`` are skipped, so an interrupted study resumes.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from kldwrm_fast import KFAC, QEKLDWRM, QKLDWRM, SOKLDWRM
from kldwrm_fast.experiments import report
from kldwrm_fast.experiments.datasets import Split, load_dataset
from kldwrm_fast.experiments.models import paper_cnn
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


def parse_overrides(items: list[str]) -> dict[str, dict]:
    """``["q.rho=0.33", "kfac.lr=0.02"]`` → ``{"q": {"rho": 0.33}, "kfac": {"lr": 0.02}}``."""
    overrides: dict[str, dict] = {}
    for item in items:
        name, _, assignment = item.partition(".")
        key, _, value = assignment.partition("=")
        if name not in OPTIMIZERS or not key or not value:
            raise SystemExit(f"--set {item!r}: expected OPT.NAME=VALUE with OPT in {', '.join(OPTIMIZERS)}")
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = value
        overrides.setdefault(name, {})[key] = parsed
    return overrides


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="kldwrm-mnist", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--optimizers", default="kfac,so,q,qe", help="comma-separated subset of kfac,so,q,qe")
    parser.add_argument("--paper", action="store_true", help="the paper's protocol: 50 epochs, 10 seeds, batch 512")
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
    protocol = PAPER if args.paper else QUICK
    for key, value in protocol.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.optimizers = [name.strip() for name in args.optimizers.split(",") if name.strip()]
    unknown = [name for name in args.optimizers if name not in OPTIMIZERS]
    if unknown:
        parser.error(f"unknown optimizers {unknown}; choose from {', '.join(OPTIMIZERS)}")
    args.overrides = parse_overrides(args.overrides)
    return args


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
    model = paper_cnn().to(args.device)
    network = DistributedDataParallel(model) if args.world > 1 else model
    opt = OPTIMIZERS[name](network, backend=args.backend, **hyper)
    shuffle = torch.Generator().manual_seed(seed)
    run = {"optimizer": name, "seed": seed, "hyperparameters": hyper, "dataset": args.dataset,
           "batch_size": args.batch_size, "epochs": []}  # fmt: skip
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


def run_key(run: dict) -> str:
    return json.dumps(
        [run["optimizer"], run["seed"], run["hyperparameters"], run.get("dataset"), run.get("batch_size")],
        sort_keys=True,
    )


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
        f"Dataset {args.dataset} ({len(data.train_y)} train / {len(data.test_y)} test images), "
        f"{args.epochs} epochs, batch {args.batch_size}, {args.seeds} seeds, {args.world} process(es); {machine}; "
        f"torch {torch.__version__}."
    )


def main(argv=None) -> None:
    args = parse_args(argv)
    args.rank, args.world = init_data_parallel(args)
    os.makedirs(args.out, exist_ok=True)
    data = load_dataset(args.dataset)
    if args.max_train:
        data = Split(data.train_x[: args.max_train], data.train_y[: args.max_train], data.test_x, data.test_y)
    if args.max_test:
        data = Split(data.train_x, data.train_y, data.test_x[: args.max_test], data.test_y[: args.max_test])
    data = Split(*(t.to(args.device) for t in (data.train_x, data.train_y, data.test_x, data.test_y)))
    results_path = os.path.join(args.out, "results.json")
    runs = load_results(results_path)
    done = {run_key(run) for run in runs if len(run["epochs"]) >= args.epochs}
    planned = [(name, seed) for name in args.optimizers for seed in range(args.seeds)]
    for name, seed in tqdm(planned, desc="runs", disable=None if args.rank == 0 else True):
        hyper = dict(PAPER_HYPERPARAMETERS[name], **args.overrides.get(name, {}))
        candidate = {
            "optimizer": name,
            "seed": seed,
            "hyperparameters": hyper,
            "dataset": args.dataset,
            "batch_size": args.batch_size,
        }
        if run_key(candidate) in done:
            continue
        runs = [run for run in runs if run_key(run) != run_key(candidate)]
        runs.append(train_run(name, seed, hyper, data, args, position=1))
        if args.rank == 0:
            save_json(results_path, runs)
    if args.rank != 0:
        return
    selected = [run for run in runs if run["optimizer"] in args.optimizers and run.get("dataset") == args.dataset]
    with open(os.path.join(args.out, "summary.md"), "w") as handle:
        handle.write(report.summary_markdown(selected, context_line(args, data)))
    report.plot_curves(selected, args.out)


if __name__ == "__main__":
    main()
