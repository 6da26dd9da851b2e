"""Run a function in ``world`` processes on gloo (``function(rank, world, port, *args)``)."""

import socket

import torch.multiprocessing as mp


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(function, world, *args):
    mp.spawn(function, args=(world, free_port(), *args), nprocs=world, join=True)
