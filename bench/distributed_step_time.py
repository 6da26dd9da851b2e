"""Step time of data-parallel QKLDWRM on gloo for 1, 2 and 4 processes on this machine.

    python bench/distributed_step_time.py [--steps 60] [--cadence 30]

The paper's CNN with a global batch of 512 split across the processes (one thread each); a step is
forward + backward + optimizer step, timed on rank 0 after warm-up; the median is reported.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from kldwrm_fast import QKLDWRM
from kldwrm_fast.experiments.models import paper_cnn

GLOBAL_BATCH = 512


def worker(rank: int, world: int, port: int, steps: int, cadence: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = DistributedDataParallel(paper_cnn())
    opt = QKLDWRM(model, stat_freq=cadence, inv_freq=cadence)
    local = GLOBAL_BATCH // world
    x, y = torch.randn(local, 1, 28, 28), torch.randint(0, 10, (local,))
    times = []
    for k in range(steps + 5):
        dist.barrier()
        start = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if k >= 5:
            times.append(time.perf_counter() - start)
    if rank == 0:
        torch.save(times, out)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--cadence", type=int, default=30, help="stat_freq = inv_freq")
    args = parser.parse_args()
    print(
        f"QKLDWRM, paper CNN, global batch {GLOBAL_BATCH}, stat/inv every {args.cadence} steps; "
        f"{os.cpu_count()} CPU cores"
    )
    print(f"{'processes':>9} {'median ms/step':>15} {'mean ms/step':>13}")
    for world in (1, 2, 4):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        out = f"/tmp/kldwrm_step_times_{world}.pt"
        mp.spawn(worker, args=(world, port, args.steps, args.cadence, out), nprocs=world, join=True)
        times = torch.load(out)
        print(f"{world:>9} {1e3 * statistics.median(times):>15.1f} {1e3 * statistics.fmean(times):>13.1f}")


if __name__ == "__main__":
    main()
