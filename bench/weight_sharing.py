"""K-FAC-expand against K-FAC-reduce (``weight_sharing``) on a character model of real text, beside AdamW.

The text is the licence collection Debian's ``base-files`` installs in ``/usr/share/common-licenses`` (about 250 KB
of English; nothing is downloaded). The model reads 16 characters and predicts the next: an embedding (an
``nn.Embedding`` block since 2026-12-07; the table in docs/benchmarks.md was measured when it was routed to AdamW
with ``others=``, which now routes nothing here), one ``nn.Linear`` applied at every position (its weight shared
over the sequence, the layer ``weight_sharing`` concerns), tanh, and a head over the flattened positions. Every
optimizer takes the same batches; the held-out loss is measured on the last 10% of the text.

    python bench/weight_sharing.py [--steps 600] [--seeds 2] [--json FILE]
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

CORPUS = pathlib.Path("/usr/share/common-licenses")
CONTEXT, EMBED, HIDDEN, BATCH = 16, 16, 64, 128


def corpus() -> tuple[torch.Tensor, int]:
    """The text as character codes (a shared vocabulary), and the vocabulary size."""
    text = "\n".join(path.read_text(errors="replace") for path in sorted(CORPUS.iterdir()) if path.is_file())
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    return torch.tensor([index[c] for c in text]), len(vocab)


class CharModel(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, EMBED)
        self.shared = nn.Linear(EMBED, HIDDEN)  # applied at every position: weight sharing over the sequence
        self.head = nn.Linear(CONTEXT * HIDDEN, vocab)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(self.embed(x))).flatten(1))


def windows(codes: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = torch.arange(CONTEXT)
    return codes[starts[:, None] + offsets], codes[starts + CONTEXT]


def make(name: str, model: nn.Module):
    adamw = dict(others=torch.optim.AdamW, others_kwargs=dict(lr=3e-3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "adamw":
            return torch.optim.AdamW(model.parameters(), lr=3e-3)
        cls, mode = {"kfac": KFAC, "q": QKLDWRM}[name.split("-")[0]], name.split("-")[1]
        return cls(model, lr=0.01, stat_freq=10, inv_freq=10, weight_sharing=mode, **adamw)


def run(name: str, seed: int, steps: int, codes: torch.Tensor, vocab: int) -> dict:
    split = int(0.9 * len(codes))
    torch.manual_seed(seed)
    model = CharModel(vocab)
    opt = make(name, model)
    gen = torch.Generator().manual_seed(seed)
    held_out = windows(codes, torch.arange(split, len(codes) - CONTEXT - 1, 7))
    start = time.perf_counter()
    for _ in range(steps):
        x, y = windows(codes, torch.randint(0, split - CONTEXT - 1, (BATCH,), generator=gen))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        loss = F.cross_entropy(model(held_out[0]), held_out[1]).item()
    if hasattr(opt, "remove_hooks"):
        opt.remove_hooks()
    return {"optimizer": name, "seed": seed, "held_out_loss": loss, "ms_per_step": 1e3 * seconds / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--optimizers", default="adamw,kfac-expand,kfac-reduce,q-expand,q-reduce")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    codes, vocab = corpus()
    rows = []
    for seed in range(args.seeds):  # the optimizers take turns, seed by seed, so machine drift spreads over all
        for name in args.optimizers.split(","):
            rows.append(run(name, seed, args.steps, codes, vocab))
    print(f"{len(codes)} characters, vocabulary {vocab}, {args.steps} steps of {BATCH}, {args.seeds} seed(s)")
    print("| optimizer | held-out loss (mean over seeds) | ms per step |")
    print("|---|---|---|")
    for name in args.optimizers.split(","):
        mine = [r for r in rows if r["optimizer"] == name]
        loss = sum(r["held_out_loss"] for r in mine) / len(mine)
        ms = sum(r["ms_per_step"] for r in mine) / len(mine)
        print(f"| {name} | {loss:.3f} | {ms:.1f} |")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
