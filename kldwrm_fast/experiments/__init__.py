"""Reproduction of the paper's MNIST study (``python -m kldwrm_fast.experiments.mnist``)."""
