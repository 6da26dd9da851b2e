"""Curvature blocks for ``nn.MultiheadAttention``'s projections (docs/algorithms.md §1, "attention").

Note [attention projections]
    ``nn.MultiheadAttention`` computes its projections inside ``F.multi_head_attention_forward`` with
    ``F.linear`` on its own parameters, never calling a module, so no module hook sees them. While the forward of
    an attention module runs on a statistics step (train mode, gradients enabled), ``torch.nn.functional.linear`` —
    the name that function's code looks up at every call — is a pass-through that, for a call whose weight *is*
    one of that module's projection weights, keeps the input and puts a tensor hook on the output, as a Linear
    layer's hooks do. The computation is the module's own: same calls, same results, nothing run twice; other
    calls of ``F.linear`` (other threads' too) pass straight through; the hooks leave it as it was, also when the
    forward raises. Outside statistics steps, in eval mode (the inference fast path) and without gradients nothing
    is installed.

    Blocks, with ``E = embed_dim``:

    * ``in_proj``: with query, key and value of one width (the packed ``in_proj_weight``, 3E × E, and its bias),
      one block for the packed projection: when query, key and value are one tensor (self-attention, every
      ``nn.TransformerEncoderLayer`` and a decoder's self-attention) it *is* ``Linear(E, 3E)`` applied to that
      tensor, whose K-FAC block is exact in its own terms; three blocks would drop the correlations between the
      q, k and v output gradients that this one keeps, for the same cost class. When query and key differ
      (cross-attention), the packed weight's rows see different inputs, which no single Kronecker block describes:
      the module's ``in_proj`` then takes plain gradient descent, with a warning naming it.
    * ``q_proj``, ``k_proj``, ``v_proj``: with ``kdim``/``vdim`` other than ``E`` the weights are separate, and each
      is a weight-only block on its own input (query, key, value); their packed bias ``in_proj_bias`` takes plain
      gradient descent (named at construction).
    * ``out_proj``: a Linear block on the attention output.

    Inside the function the tensors are sequence-first (``(T, B, E)``; the out projection sees ``(T·B, E)``); the
    captured pairs are turned batch-first (``(B, T, ·)``), so that ``weight_sharing`` reads the batch from the first
    dimension as for any Linear layer. ``bias_k``/``bias_v`` (``add_bias_kv``) take plain gradient descent.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch.nn.functional as F
from torch import Tensor, nn

from kldwrm_fast.curvature.blocks import KroneckerBlock


class ProjectionBlock(KroneckerBlock):
    """A projection of ``nn.MultiheadAttention`` (Note [attention projections]): a Linear-layer block over the given
    ``weight`` (n_out × n_in) and ``bias`` of the attention ``module``, captured from its ``F.linear`` calls."""

    def __init__(self, name: str, module: nn.MultiheadAttention, weight: Tensor, bias: Optional[Tensor]):
        super().__init__(name, module, parameters=(weight, bias))
        self.weight = weight


def attention_blocks(name: str, module: nn.MultiheadAttention) -> list[KroneckerBlock]:
    """The blocks of one attention module's trainable projections (Note [attention projections])."""
    prefix = f"{name}." if name else ""
    trainable: list[KroneckerBlock] = []
    if module._qkv_same_embed_dim:
        if module.in_proj_weight.requires_grad:
            bias = _trainable(module.in_proj_bias)
            trainable.append(ProjectionBlock(prefix + "in_proj", module, module.in_proj_weight, bias))
    else:
        for side in ("q", "k", "v"):
            weight = getattr(module, f"{side}_proj_weight")
            if weight.requires_grad:
                trainable.append(ProjectionBlock(f"{prefix}{side}_proj", module, weight, None))
    out = module.out_proj
    if out.weight.requires_grad:
        block = ProjectionBlock(prefix + "out_proj", module, out.weight, _trainable(out.bias))
        block.modules.append(out)  # (the module that holds its parameters)
        trainable.append(block)
    return trainable


def _trainable(bias: Optional[Tensor]) -> Optional[Tensor]:
    return bias if bias is not None and bias.requires_grad else None


class ProjectionCalls:
    """The pass-through ``F.linear`` of Note [attention projections], installed while attention forwards run.

    ``record(block, x, output, arrange)`` is called for every projection call of an active module, with the input
    already batch-first and ``arrange`` turning a gradient of ``output`` batch-first."""

    def __init__(self, record: Callable[[KroneckerBlock, Tensor, Tensor, Callable], None]) -> None:
        self.record = record
        self.original: Optional[Callable] = None
        self.active: dict[int, tuple[KroneckerBlock, tuple]] = {}  # id(weight) -> (block, (T, B) or None)
        self.seen: set[int] = set()  # the blocks that recorded a call in the forwards running now

    def enter(self, blocks: list[ProjectionBlock], query: Tensor, batch_first: bool) -> None:
        """Start recording the calls of ``blocks`` for a forward with this ``query``."""
        layout = None
        if query.dim() == 3:
            layout = (query.shape[1], query.shape[0]) if batch_first else (query.shape[0], query.shape[1])
        for block in blocks:
            self.active[id(block.weight)] = (block, layout)
        if self.original is None:
            self.original = F.linear
            F.linear = self._linear

    def exit(self, blocks: list[ProjectionBlock]) -> list[ProjectionBlock]:
        """Stop recording ``blocks``; return those that recorded nothing in this forward."""
        missed = [block for block in blocks if id(block) not in self.seen]
        for block in blocks:
            self.active.pop(id(block.weight), None)
            self.seen.discard(id(block))
        if not self.active and self.original is not None:
            F.linear = self.original
            self.original = None
        return missed

    def _linear(self, input: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        output = self.original(input, weight, bias)
        entry = self.active.get(id(weight))
        if entry is None or not output.requires_grad:
            return output
        block, layout = entry
        self.seen.add(id(block))
        self.record(block, _batch_first(input.detach(), layout), output, lambda grad: _batch_first(grad, layout))
        return output


def _batch_first(t: Tensor, layout: Optional[tuple]) -> Tensor:
    """A projection call's input or output (gradient) batch-first: ``(T, B, ·)`` transposed, the out projection's
    ``(T·B, ·)`` unflattened first; unbatched calls as they are."""
    if layout is None:
        return t
    if t.dim() == 2 and t.shape[0] == layout[0] * layout[1]:
        t = t.view(layout[0], layout[1], -1)
    return t.transpose(0, 1) if t.dim() == 3 else t
