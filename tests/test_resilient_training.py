"""A killed rank (issue 34): examples/resilient_training.py under torchrun (2 ranks, gloo), rank 1 SIGKILLed
mid-run, torchrun restarting the job, which resumes from its last complete checkpoint; the final parameters and
optimizer state equal an uninterrupted run's bit for bit."""

import os
import pathlib
import signal
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "examples" / "resilient_training.py"
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def launch(directory, *extra):
    directory.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts",
               "3", str(SCRIPT), "--dir", str(directory), "--steps", "10", "--every", "3", *extra]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(directory / "final.pt")


def same(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    return a == b


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
@pytest.mark.parametrize("optimizer", ["kfac", "q"])
def test_a_killed_rank_resumes_from_its_last_checkpoint_and_ends_bit_identical(tmp_path, optimizer):
    whole = launch(tmp_path / "whole", "--optimizer", optimizer)
    killed = launch(tmp_path / "killed", "--optimizer", optimizer, "--kill-at", "7")
    # Either run may also be restarted by a worker that died on its own (seen once in CI, in the uninterrupted run:
    # issue 34's random gloo abort is the suspect); the restart resumes it, and the comparison below still holds.
    # 3: the kill cut rank 0's write of step 6; more than one restart: a restarted attempt can fail too (seen once)
    assert killed["restarts"] >= 1 and killed["resumed_from"] in (3, 6, 9)
    assert all(torch.equal(a, b) for a, b in zip(whole["params"], killed["params"]))
    assert same(whole["optimizer"], killed["optimizer"])
