"""What an optimizer's state occupies: bytes per block and per kind of state (``opt.memory_usage()``)."""

from __future__ import annotations

from torch import Tensor

KINDS = {
    "A": "local factors", "G": "local factors",
    "A_ea": "averages", "G_ea": "averages",
    "QA": "eigenvectors", "QG": "eigenvectors", "QA_hat": "eigenvectors", "QG_hat": "eigenvectors",
    "QA_joint": "eigenvectors", "QG_joint": "eigenvectors",
    "dA": "eigenvalues", "dG": "eigenvalues", "dA_hat": "eigenvalues", "dG_hat": "eigenvalues",
    "dA_joint": "eigenvalues", "dG_joint": "eigenvalues",
    "momentum_buffer": "momentum", "v_prev": "recursion", "g_hat": "recursion", "m": "recursion",
}  # fmt: skip
"""The kind of each per-block state key (:class:`~kldwrm_fast.curvature.state.BlockState`)."""


def memory_usage(optimizer) -> dict:
    """``{"by_block": {block name: {kind: bytes}}, "by_kind": {kind: bytes}, "other": bytes, "total": bytes}``.

    Blocks count the bytes of their own tensors (a block of a batched group holds views of one stacked tensor:
    its share). ``other`` is the optimizer-wide state (QE's snapshots, Q's device-side verdict; a routed optimizer's
    state is not included); ``total`` counts every storage once. Read at any time; the kinds follow
    :data:`KINDS` (a key not listed there counts as ``"other state"``)."""
    by_block, by_kind, storages = {}, {}, {}

    def counted(value: Tensor) -> int:
        storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
        return value.numel() * value.element_size()

    for block in optimizer.curvature.blocks:
        usage: dict[str, int] = {}
        for key, value in optimizer.state[block.key].items():
            if isinstance(value, Tensor):
                kind, size = KINDS.get(key, "other state"), counted(value)
                usage[kind] = usage.get(kind, 0) + size
                by_kind[kind] = by_kind.get(kind, 0) + size
        by_block[block.name] = usage
    keys = {block.key for block in optimizer.curvature.blocks}
    others = [state for key, state in optimizer.state.items() if key not in keys]
    other = sum(counted(value) for state in others for value in _tensors(state))
    return {"by_block": by_block, "by_kind": by_kind, "other": other, "total": sum(storages.values())}


def _tensors(state):
    for value in state.values() if isinstance(state, dict) else ():
        if isinstance(value, Tensor):
            yield value
