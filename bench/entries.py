"""The benchmark entries (baselines and our optimizers on each available backend) and how one iteration of each
is run: shared by the pytest-benchmark suites and ``compare_step_time.py``."""

import functools

import torch
import torch.nn.functional as F
from machine import DEVICE, FULL

from kldwrm_fast import KFAC, QEKLDWRM, QKLDWRM, SOKLDWRM
from kldwrm_fast.baselines import ReferenceKFAC
from kldwrm_fast.ops.backends import IMPLEMENTATIONS, unavailable_reason

CADENCES = {"every-step": (1, 1), "10/100": (10, 100), "30/30": (30, 30)}
OURS = {
    "kfac": KFAC,
    "so": SOKLDWRM,
    "q": QKLDWRM,
    "qexact": functools.partial(QKLDWRM, curvature_sum="exact"),
    "qe": QEKLDWRM,
    # warm-started eigenbases (docs/algorithms.md §6.5): one orthogonal-iteration step, and none (eigenvalues only)
    "kfacwarm": functools.partial(KFAC, eigensolver="warm"),
    "kfacwarm0": functools.partial(KFAC, eigensolver="warm", warm_iters=0),
    "qwarm": functools.partial(QKLDWRM, eigensolver="warm"),
    "qwarm0": functools.partial(QKLDWRM, eigensolver="warm", warm_iters=0),
    "kfacfactored": functools.partial(KFAC, damping_form="factored"),  # two GEMMs per block (§6.6)
    "kfacrank64": functools.partial(KFAC, rank=64),  # sides at least 64 wide kept to 64 pairs and a tail (§6.7)
    "kfacrank16": functools.partial(KFAC, rank=16),
}
BACKENDS = [b for b in IMPLEMENTATIONS if unavailable_reason(b, DEVICE) is None and (FULL or b == "torch")]
ENTRIES = ["sgd", "adam", "kfac-reference"] + [f"{name}-{backend}" for name in OURS for backend in BACKENDS]


def make_step(entry, model, x, y, cadence, **options):
    """``(optimizer, step)`` for ``entry``: ``step()`` runs one training iteration. ``options`` go to our optimizers'
    constructors (``fisher="empirical"``, say); the baselines take none."""
    stat_freq, inv_freq = cadence
    if entry in ("sgd", "adam"):
        opt = (
            torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            if entry == "sgd"
            else torch.optim.Adam(model.parameters(), lr=1e-3)
        )

        def step():
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

        return opt, step
    if entry == "kfac-reference":
        opt = ReferenceKFAC(model, stat_freq=stat_freq, inv_freq=inv_freq)

        def step():
            opt.zero_grad()
            output = model(x)
            opt.sampled_statistics_backward(output)
            F.cross_entropy(output, y).backward()
            opt.step()

        return opt, step
    compiled = entry.endswith("-compiled")  # plain steps through opt.compiled_step()
    name, backend = entry.removesuffix("-compiled").rsplit("-", 1)
    opt = OURS[name](model, stat_freq=stat_freq, inv_freq=inv_freq, backend=backend, **options)
    optimizer_step = opt.compiled_step() if compiled else opt.step

    def step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer_step()

    return opt, step
