"""Fused operations of docs/algorithms.md §6 and the dispatch point that picks their implementation."""

from kldwrm_fast.ops.backends import BACKENDS, validate_backend
from kldwrm_fast.ops.dispatch import operations, operations_for, resolve_backend
from kldwrm_fast.ops.operations import Operations
from kldwrm_fast.ops.tracing import tracing

__all__ = [
    "BACKENDS", "Operations", "operations", "operations_for", "resolve_backend", "tracing", "validate_backend",
]  # fmt: skip
