"""Data-parallel training that survives a killed worker: checkpoints every ``--every`` steps, and a restarted job
resumes from the last complete one and continues exactly as if nothing had happened.

Run (2 ranks, gloo, CPU; torchrun restarts every worker when one dies):

    torchrun --standalone --nproc-per-node 2 --max-restarts 3 examples/resilient_training.py --dir DIR

Every rank calls :func:`kldwrm_fast.save_checkpoint` and rank 0 writes ``DIR/checkpoint.pt`` (atomic rename, SHA-256
digest): the ranks hold the same factors, decompositions and buffers (factors all-reduced, each decomposition
computed by its owner and broadcast) and the optimizer's ``state_dict()`` gathers the one per-rank piece, the Fisher
sampler's generator, so one file is the whole job's state, and a file torn by a crash is never half-read. Each batch
is a function of the step, so a resumed run sees the batches the lost steps would have seen. ``--kill-at K`` makes
rank 1 kill itself with SIGKILL at step K on the job's first attempt (a test of the restart). At the end rank 0
writes ``DIR/final.pt``: the parameters, the optimizer's state_dict, the step it resumed from and the restart count.
"""

import argparse
import os
import pathlib
import signal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kldwrm_fast import KFAC, QKLDWRM, SOKLDWRM, load_checkpoint, save_checkpoint

OPTIMIZERS = {"kfac": KFAC, "so": SOKLDWRM, "q": QKLDWRM}
LOCAL_BATCH = 8


def batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of step ``step``'s global batch (the same on every attempt)."""
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(LOCAL_BATCH * world, 10, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (LOCAL_BATCH * world,), generator=gen)
    share = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    return x[share], y[share]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=pathlib.Path, required=True)
    parser.add_argument("--optimizer", choices=list(OPTIMIZERS), default="kfac")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=3, help="checkpoint every this many steps")
    parser.add_argument("--kill-at", type=int, default=None, help="rank 1 SIGKILLs itself at this step, first attempt")
    args = parser.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    # torchrun's store outlives a restart; gloo would read the dead attempt's addresses from it: a fresh prefix
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False)
    dist.init_process_group("gloo", store=dist.PrefixStore(f"attempt-{attempt}", store), rank=rank, world_size=world)
    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 4)).double())
    opt = OPTIMIZERS[args.optimizer](model, lr=0.05, stat_freq=1, inv_freq=2)
    path = args.dir / "checkpoint.pt"
    start = load_checkpoint(path, model, opt)["step"] if path.exists() else 0
    for step in range(start, args.steps):
        if step == args.kill_at and rank == 1 and attempt == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        x, y = batch(step, rank, world)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if (step + 1) % args.every == 0:  # on every rank (it gathers the ranks' sampler states); rank 0 writes
            save_checkpoint(path, model, opt, step=step + 1)
    state = opt.state_dict()  # a collective under data parallelism
    if rank == 0:
        params = [p.detach() for p in model.module.parameters()]
        final = {"params": params, "optimizer": state, "resumed_from": start, "restarts": attempt}
        torch.save(final, args.dir / "final.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
