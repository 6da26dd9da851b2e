"""The paper's Table 1 and test curves for a list of runs (the ``results.json`` format)."""

from __future__ import annotations

import statistics

OPTIMIZER_LABELS = {"kfac": "K-FAC", "so": "SO", "q": "Q", "qe": "QE"}

# Table 1 of the paper (test set, epoch 50, 10 runs each).
PAPER_TABLE = {
    name: dict(zip(("acc_ge_98", "acc_gt_98", "acc_ge_985", "loss_le_025", "loss_le_02"), counts), **stats)
    for name, counts, stats in (
        ("kfac", (3, 3, 1, 5, 2), dict(acc_mean=96.19, acc_sd=3.2, loss_mean=0.26, loss_sd=0.10)),
        ("so", (4, 2, 0, 7, 0), dict(acc_mean=97.60, acc_sd=0.85, loss_mean=0.25, loss_sd=0.04)),
        ("q", (5, 4, 0, 4, 0), dict(acc_mean=97.69, acc_sd=0.69, loss_mean=0.26, loss_sd=0.04)),
        ("qe", (6, 4, 1, 8, 0), dict(acc_mean=97.73, acc_sd=0.63, loss_mean=0.24, loss_sd=0.03)),
    )
}

COLUMNS = [
    ("acc_ge_98", "N acc ≥ 98%"),
    ("acc_gt_98", "N acc > 98%"),
    ("acc_ge_985", "N acc ≥ 98.5%"),
    ("loss_le_025", "N loss ≤ 0.25"),
    ("loss_le_02", "N loss ≤ 0.2"),
    ("acc_mean", "μ acc (%)"),
    ("acc_sd", "σ acc (%)"),
    ("loss_mean", "μ loss"),
    ("loss_sd", "σ loss"),
]


def _sd(values: list[float]) -> float:
    """Sample standard deviation (n − 1); 0 for a single run."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def table_row(runs: list[dict]) -> dict:
    """Table 1 statistics of the final epoch of ``runs`` (accuracy as a fraction in the runs, % here)."""
    accuracy = [100.0 * run["epochs"][-1]["test_acc"] for run in runs]
    loss = [run["epochs"][-1]["test_loss"] for run in runs]
    return dict(
        runs=len(runs),
        acc_ge_98=sum(a >= 98.0 for a in accuracy),
        acc_gt_98=sum(a > 98.0 for a in accuracy),
        acc_ge_985=sum(a >= 98.5 for a in accuracy),
        loss_le_025=sum(v <= 0.25 for v in loss),
        loss_le_02=sum(v <= 0.2 for v in loss),
        acc_mean=statistics.fmean(accuracy),
        acc_sd=_sd(accuracy),
        loss_mean=statistics.fmean(loss),
        loss_sd=_sd(loss),
    )


def by_optimizer(runs: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for run in runs:
        if run["epochs"]:
            groups.setdefault(run["optimizer"], []).append(run)
    return groups


def _format(key: str, value) -> str:
    if key.startswith(("acc_ge", "acc_gt", "loss_le")):
        return str(value)
    return f"{value:.2f}" if key.startswith("acc") else f"{value:.3f}"


def summary_markdown(runs: list[dict], context: str) -> str:
    """``summary.md``: Table 1 for ``runs`` beside the paper's own numbers."""
    header = "| optimizer | source | runs | " + " | ".join(label for _, label in COLUMNS) + " |"
    lines = ["# KLD-WRM MNIST study: Table 1", "", context, "", header, "|" + "---|" * (len(COLUMNS) + 3)]
    for name, group in by_optimizer(runs).items():
        row = table_row(group)
        epochs = group[0]["epochs"][-1]["epoch"]
        cells = " | ".join(_format(key, row[key]) for key, _ in COLUMNS)
        lines.append(f"| {OPTIMIZER_LABELS.get(name, name)} | this run (epoch {epochs}) | {row['runs']} | {cells} |")
        if name in PAPER_TABLE:
            paper = " | ".join(_format(key, PAPER_TABLE[name][key]) for key, _ in COLUMNS)
            lines.append(f"| {OPTIMIZER_LABELS[name]} | paper (epoch 50) | 10 | {paper} |")
    lines += ["", "Counts are numbers of runs; σ is the sample standard deviation over runs (0 for one run)."]
    return "\n".join(lines) + "\n"


def plot_band(axis, x, curves, colour: str, label: str, band: str = "range") -> None:
    """The mean of ``curves`` (runs × len(x), a NumPy array) as a line labelled ``label`` and a band around it: the
    runs' minimum to maximum (``band="range"``) or ±1 sample SD (``"sd"``; none for a single run)."""
    import numpy as np

    mean = curves.mean(axis=0)
    if band == "sd":
        sd = curves.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros_like(mean)
        low, high = mean - sd, mean + sd
    else:
        low, high = curves.min(axis=0), curves.max(axis=0)
    axis.fill_between(x, low, high, color=colour, alpha=0.15, linewidth=0)
    axis.plot(x, mean, color=colour, linewidth=2, label=label)


def plot_curves(runs: list[dict], out_dir: str, title: str = "") -> list[str]:
    """Write the study's figures and return their paths.

    ``accuracy.png`` and ``loss.png``: every optimizer on shared axes, the mean over seeds as a line with a
    ±1 SD band and each run as a thin line; ``final.png``: the final-epoch accuracy and loss of every run per
    optimizer (the distribution Table 1 summarises). Accuracy in percent, as in the table; ``title`` names
    the dataset, protocol and epochs.
    """
    import matplotlib
    import matplotlib.ticker
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = by_optimizer(runs)
    colours = {name: f"C{i}" for i, name in enumerate(groups)}
    scale = {"test_acc": 100.0, "test_loss": 1.0}
    written = []
    for metric, label, filename in (
        ("test_acc", "test accuracy (%)", "accuracy.png"),
        ("test_loss", "test loss", "loss.png"),
    ):
        figure, axis = plt.subplots(figsize=(6.4, 4.2))
        for name, group in groups.items():
            length = min(len(run["epochs"]) for run in group)
            epochs = np.arange(1, length + 1)
            curves = np.array([[e[metric] * scale[metric] for e in run["epochs"][:length]] for run in group])
            for curve in curves:
                axis.plot(epochs, curve, color=colours[name], linewidth=0.6, alpha=0.35)
            plot_band(axis, epochs, curves, colours[name], f"{OPTIMIZER_LABELS.get(name, name)} (n={len(group)})",
                      band="sd")  # fmt: skip
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        axis.set_ylabel(label)
        axis.set_title(title, fontsize=9)
        axis.grid(alpha=0.3)
        axis.legend()
        figure.tight_layout()
        path = f"{out_dir}/{filename}"
        figure.savefig(path, dpi=120)
        plt.close(figure)
        written.append(path)
    figure, axes = plt.subplots(1, 2, figsize=(8, 3.6))
    names = list(groups)
    for axis, (metric, label) in zip(axes, (("test_acc", "final test accuracy (%)"), ("test_loss", "final test loss"))):
        for position, name in enumerate(names):
            values = [run["epochs"][-1][metric] * scale[metric] for run in groups[name]]
            offsets = np.linspace(-0.12, 0.12, len(values)) if len(values) > 1 else np.zeros(1)
            axis.scatter(position + offsets, values, color=colours[name], s=18, alpha=0.8)
            axis.hlines(np.mean(values), position - 0.25, position + 0.25, color=colours[name], linewidth=2)
        axis.set_xticks(range(len(names)), [OPTIMIZER_LABELS.get(name, name) for name in names])
        axis.set_ylabel(label)
        axis.grid(alpha=0.3, axis="y")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    path = f"{out_dir}/final.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    written.append(path)
    return written
