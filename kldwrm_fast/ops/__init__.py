"""Fused operations of docs/algorithms.md §6 and the dispatch point that picks their implementation."""

from kldwrm_fast.ops.dispatch import (
    BACKENDS,
    Operations,
    operations,
    operations_for,
    resolve_backend,
    validate_backend,
)

__all__ = ["BACKENDS", "Operations", "operations", "operations_for", "resolve_backend", "validate_backend"]
