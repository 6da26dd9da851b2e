"""KFAC and Q-KLD-WRM on the layers of today's models, beside AdamW: a character-level transformer on real text and a
small ResNet with BatchNorm on Fashion-MNIST (issue 32's "Show").

* ``lm``: the licence texts Debian's ``base-files`` installs in ``/usr/share/common-licenses`` (about 250 KB of
  English), 32 characters of context, next-character loss at every position: token and position embeddings
  (``nn.Embedding``), two ``nn.TransformerEncoderLayer(64, 4, 128, batch_first=True)`` under a causal mask, a
  ``nn.LayerNorm`` and a ``nn.Linear`` head (the shape of the issue's model). Held-out loss on the last 10%.
* ``resnet``: Fashion-MNIST from Debian's ``dataset-fashion-mnist``: a stem convolution and three residual blocks
  of ``Conv2d`` + ``BatchNorm2d`` (16, 16, 32 channels), global average pooling and a ``nn.Linear`` head. Held-out
  loss and accuracy on 2,000 test images.

The optimizers take the same batches and take turns step by step (one interleaved run, so that machine drift
spreads over all); each step is timed alone, evaluations are not. After ``--steps`` steps each, the optimizers
that took less time go on alone until their time reaches the slowest one's: the table gives the held-out loss
after equal steps and after equal wall-clock time. Nothing is downloaded.

    python bench/modern_layers.py [--workloads lm,resnet] [--steps 300] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from kldwrm_fast import KFAC, QKLDWRM
from kldwrm_fast.experiments.datasets import load_fashion_mnist

CORPUS = pathlib.Path("/usr/share/common-licenses")
CONTEXT, WIDTH, LM_BATCH, IMAGE_BATCH = 32, 64, 32, 128
SETTINGS = {
    "adamw": dict(lr=3e-3),
    "kfac": dict(lr=0.01, stat_freq=10, inv_freq=10),
    "q": dict(lr=0.01, stat_freq=10, inv_freq=10),
}


class CharTransformer(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.tokens = nn.Embedding(vocab, WIDTH)
        self.positions = nn.Embedding(CONTEXT, WIDTH)
        layer = nn.TransformerEncoderLayer(WIDTH, 4, 128, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, vocab)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(CONTEXT), persistent=False)

    def forward(self, x):
        h = self.tokens(x) + self.positions(torch.arange(x.shape[1]))
        return self.head(self.norm(self.encoder(h, mask=self.causal[: x.shape[1], : x.shape[1]], is_causal=True)))


def load_corpus() -> tuple[torch.Tensor, int]:
    """The corpus as symbol codes (int64, one per character, sorted-vocabulary order) and the vocabulary size."""
    text = "\n".join(p.read_text(errors="replace") for p in sorted(CORPUS.iterdir()) if p.is_file())
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    return torch.tensor([index[c] for c in text]), len(vocab)


def windows(codes: torch.Tensor, starts: torch.Tensor):
    """Inputs and next-symbol targets, both (len(starts), CONTEXT), of the windows starting at ``starts``."""
    chunk = codes[starts[:, None] + torch.arange(CONTEXT + 1)]
    return chunk[:, :-1], chunk[:, 1:]


def next_symbol_loss(output, y):
    """Cross-entropy over every position: ``output`` (..., classes), ``y`` (...)."""
    return F.cross_entropy(output.flatten(0, -2), y.flatten())


class Residual(nn.Module):
    def __init__(self, channels_in: int, channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels, 3, stride, 1, bias=False)
        self.norm1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(channels)
        self.skip = None if stride == 1 and channels_in == channels else nn.Conv2d(channels_in, channels, 1, stride)

    def forward(self, x):
        h = self.norm2(self.conv2(torch.relu(self.norm1(self.conv1(x)))))
        return torch.relu(h + (x if self.skip is None else self.skip(x)))


def resnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        Residual(16, 16, 2), Residual(16, 16, 1), Residual(16, 32, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip


class Workload:
    """A model factory, a batch stream and a held-out evaluation."""

    def __init__(self, name: str):
        self.name = name
        if name == "lm":
            self.codes, self.vocab = load_corpus()
            self.split = int(0.9 * len(self.codes))
            starts = torch.arange(self.split, len(self.codes) - CONTEXT - 1, 97)
            self.held_out = self._windows(starts)
            self.description = f"{len(self.codes)} characters of /usr/share/common-licenses, vocabulary {self.vocab}"
        else:
            data = load_fashion_mnist()
            self.train_x, self.train_y = data.train_x, data.train_y
            self.held_out = (data.test_x[:2000], data.test_y[:2000])
            self.description = f"Fashion-MNIST, {len(self.train_y)} training images, 2000 held out"

    def _windows(self, starts):
        return windows(self.codes, starts)

    def model(self) -> nn.Module:
        return CharTransformer(self.vocab) if self.name == "lm" else resnet()

    def batch(self, gen: torch.Generator):
        if self.name == "lm":
            return self._windows(torch.randint(0, self.split - CONTEXT - 1, (LM_BATCH,), generator=gen))
        picked = torch.randint(0, len(self.train_y), (IMAGE_BATCH,), generator=gen)
        return self.train_x[picked], self.train_y[picked]

    loss = staticmethod(next_symbol_loss)

    def evaluate(self, model: nn.Module) -> dict:
        model.eval()
        with torch.no_grad():
            output = model(self.held_out[0])
            result = {"loss": self.loss(output, self.held_out[1]).item()}
            if self.name == "resnet":
                result["accuracy"] = (output.argmax(1) == self.held_out[1]).double().mean().item()
        model.train()
        return result


def optimizer(name: str, model: nn.Module):
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), **SETTINGS[name])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {"kfac": KFAC, "q": QKLDWRM}[name](model, **SETTINGS[name])


def preconditioned_fraction(opt) -> float:
    params = [p for group in opt.param_groups for p in group["params"]]
    covered = {id(p) for block in opt.curvature.blocks for p in block.params}
    return sum(p.numel() for p in params if id(p) in covered) / sum(p.numel() for p in params)


class Runner:
    def __init__(self, name: str, workload: Workload, seed: int):
        torch.manual_seed(seed)
        self.name, self.workload = name, workload
        self.model = workload.model()
        self.opt = optimizer(name, self.model)
        self.gen = torch.Generator().manual_seed(seed)
        self.seconds, self.steps, self.trace = 0.0, 0, []

    def step(self) -> None:
        x, y = self.workload.batch(self.gen)
        start = time.perf_counter()
        self.opt.zero_grad()
        self.workload.loss(self.model(x), y).backward()
        self.opt.step()
        self.seconds += time.perf_counter() - start
        self.steps += 1

    def record(self) -> None:
        self.trace.append({"step": self.steps, "seconds": self.seconds, **self.workload.evaluate(self.model)})


def run(workload: Workload, names: list[str], steps: int, every: int, seed: int) -> dict:
    runners = [Runner(name, workload, seed) for name in names]
    for runner in runners:
        runner.record()
    for k in range(steps):
        for runner in runners:
            runner.step()
            if (k + 1) % every == 0 or k + 1 == steps:
                runner.record()
    at_equal_steps = {r.name: r.trace[-1] for r in runners}
    budget = max(r.seconds for r in runners)
    for runner in runners:  # the faster ones go on alone up to the slowest one's time
        while runner.seconds < budget and runner.steps < 50 * steps:
            runner.step()
            if runner.steps % every == 0:
                runner.record()
        runner.record()
    rows = []
    for runner in runners:
        within = [t for t in runner.trace if t["seconds"] <= budget * 1.02] or runner.trace[:1]
        rows.append({
            "optimizer": runner.name,
            "preconditioned": preconditioned_fraction(runner.opt) if runner.name != "adamw" else None,
            "ms_per_step": 1e3 * at_equal_steps[runner.name]["seconds"] / steps,
            "equal_steps": at_equal_steps[runner.name],
            "equal_time": within[-1],
            "settings": SETTINGS[runner.name],
        })  # fmt: skip
    return {"workload": workload.name, "description": workload.description, "steps": steps, "budget_s": budget,
            "rows": rows}  # fmt: skip


def table(result: dict) -> str:
    adamw = next((r["ms_per_step"] for r in result["rows"] if r["optimizer"] == "adamw"), None)
    accuracy = result["workload"] == "resnet"
    head = "| optimizer | preconditioned | ms/step (× AdamW) | after equal steps | after equal time |"
    lrs = ", ".join(f"{r['optimizer']} lr {r['settings']['lr']:g}" for r in result["rows"])
    lines = [f"{result['description']}; {result['steps']} steps; {lrs}; equal time = {result['budget_s']:.1f} s", head,
             "|---|---|---|---|---|"]  # fmt: skip
    for r in result["rows"]:
        def cell(t):
            extra = f", acc {t['accuracy']:.3f}" if accuracy else ""
            return f"{t['loss']:.3f}{extra} ({t['step']} steps)"

        share = "—" if r["preconditioned"] is None else f"{100 * r['preconditioned']:.1f}%"
        ratio = f" ({r['ms_per_step'] / adamw:.1f}×)" if adamw else ""
        lines.append(f"| {r['optimizer']} | {share} | {r['ms_per_step']:.1f}{ratio} | {cell(r['equal_steps'])} | "
                     f"{cell(r['equal_time'])} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="lm,resnet")
    parser.add_argument("--optimizers", default="adamw,kfac,q")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=25, help="evaluate every this many steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", default="", help="learning rates by optimizer, e.g. kfac=0.03,q=0.03")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    for item in filter(None, args.lr.split(",")):
        name, value = item.split("=")
        SETTINGS[name] = {**SETTINGS[name], "lr": float(value)}
    results = []
    for name in args.workloads.split(","):
        result = run(Workload(name), args.optimizers.split(","), args.steps, args.every, args.seed)
        results.append(result)
        print(table(result), flush=True)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
