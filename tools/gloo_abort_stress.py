"""Stress for the random gloo abort of the data-parallel tests (issue 34): spawn the tests' worker sequence (gloo
process group, a DDP model, seven K-FAC steps with factor all-reduces and decomposition broadcasts) ``--spawns``
times with 2 ranks and count the runs in which a rank died by a signal (the CI symptom: SIGABRT after
"terminate called without an active exception"), for each way a worker can end:

* ``os-exit``: the tests' ``finish()`` (destroy the process group, then ``os._exit(0)``: no interpreter teardown);
* ``destroy``: destroy the process group, then return (the interpreter's teardown runs);
* ``teardown``: return with the process group alive (what a worker did before ``finish()``).

    python tools/gloo_abort_stress.py [--spawns 200] [--endings os-exit,destroy,teardown] [--world 2]
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import sys
import time

import torch.multiprocessing as mp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))


def worker(rank: int, world: int, port: int, ending: str) -> None:
    import os

    import torch.distributed as dist
    from helpers import distributed_worker as w
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = DistributedDataParallel(w.build_model())
    opt = w.make_optimizer("KFAC", model, {})
    w.train(model, opt, rank, world, shard=True)
    if ending == "os-exit":
        w.finish()
    if ending == "destroy":
        dist.destroy_process_group()


def main() -> None:
    from helpers.spawn import free_port

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spawns", type=int, default=200)
    parser.add_argument("--endings", default="os-exit,destroy,teardown")
    parser.add_argument("--world", type=int, default=2)
    args = parser.parse_args()
    for ending in args.endings.split(","):
        outcomes: collections.Counter = collections.Counter()
        start = time.perf_counter()
        for _ in range(args.spawns):
            try:
                mp.spawn(worker, args=(args.world, free_port(), ending), nprocs=args.world, join=True)
                outcomes["clean"] += 1
            except mp.ProcessExitedException as error:
                outcomes[f"signal {error.signal_name}" if error.signal_name else f"exit {error.exit_code}"] += 1
            except mp.ProcessRaisedException as error:
                outcomes[f"raised {str(error).strip().splitlines()[-1][:60]}"] += 1
        seconds = time.perf_counter() - start
        print(f"{ending}: {args.spawns} spawns of {args.world} ranks in {seconds:.0f} s: {dict(outcomes)}", flush=True)


if __name__ == "__main__":
    main()
