"""Q's step cap (``max_step_rms``; issue 36.4, docs/algorithms.md §3 "Step cap"): Q trains past its default lr."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from kldwrm_fast import QEKLDWRM, QKLDWRM
from kldwrm_fast.experiments.datasets import load_mnist_sample
from kldwrm_fast.experiments.models import paper_cnn


def train_paper_cnn(lr, steps=93, **options):
    """Q on the paper CNN, batches of 128 from the embedded MNIST sample: test accuracy after ``steps``."""
    data = load_mnist_sample()
    torch.manual_seed(0)
    model = paper_cnn()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = QKLDWRM(model, lr=lr, **options)
        order = torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(0))
        for k in range(steps):
            rows = order[(k % 31) * 128 : (k % 31 + 1) * 128]
            opt.zero_grad()
            F.cross_entropy(model(data.train_x[rows]), data.train_y[rows]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return (model(data.test_x).argmax(1) == data.test_y).float().mean().item()


def test_q_trains_the_paper_cnn_at_three_times_its_default_lr():
    """Without the cap the same run ends at 0.088 (every ReLU dead); with it, 0.96 (0.94 at the default lr)."""
    assert train_paper_cnn(0.03) > 0.85


def test_without_the_cap_q_dies_at_three_times_its_default_lr():
    """The failure the cap prevents, so that the test above cannot pass for another reason."""
    assert train_paper_cnn(0.03, max_step_rms=None) < 0.3


def small_run(lr, **options):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    opt = QKLDWRM(model, lr=lr, stat_freq=2, inv_freq=2, **options)
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        x, y = torch.randn(16, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (16,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_at_the_default_lr_the_cap_changes_nothing():
    assert torch.equal(small_run(0.01), small_run(0.01, max_step_rms=None))


def test_above_it_the_cap_is_said_once_and_bounds_every_step():
    with pytest.warns(UserWarning, match=r"steps are capped at RMS max_step_rms=0.02 \(clip 0.4 at this lr\)") as seen:
        capped = small_run(0.05)
    assert sum("steps are capped" in str(w.message) for w in seen) == 1
    assert not torch.equal(capped, small_run(0.05, max_step_rms=None))


@pytest.mark.parametrize("cls", [QKLDWRM, QEKLDWRM])
def test_an_invalid_max_step_rms_is_refused_with_one_line(cls):
    with pytest.raises(ValueError, match=r"Invalid max_step_rms: 0; expected max_step_rms > 0 or None"):
        cls(torch.nn.Linear(2, 2), max_step_rms=0)
