"""Curvature blocks: the unit on which the optimizers precondition (docs/algorithms.md §1–§2).

A block owns some parameters, maps their gradients to a block-form matrix ``V`` (n_out × n_in) and holds
its Kronecker factors, the input factor ``A`` (n_in × n_in) and the output factor ``Γ`` (n_out × n_out,
``G`` in keys), in the optimizer's per-block state, whose keys :class:`kldwrm_fast.curvature.state.BlockState`
defines. Blocks write the local factors and the averages.

:class:`KroneckerBlock` is one Linear/Conv2d layer. :class:`DenseBlock` is the exact oracle: any set of
parameters with an explicit curvature matrix as ``A`` and a constant ``Γ = [[1]]``, so that the same
optimizer code computes exact (non-Kronecker) natural-gradient steps.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kldwrm_fast.curvature import layers
from kldwrm_fast.curvature.state import INPUT, OUTPUT, SIDES, BlockState, average_key
from kldwrm_fast.ops import Operations, reference

State = BlockState

HALF_DTYPES = (torch.float16, torch.bfloat16)


def state_dtype(param: Tensor) -> torch.dtype:
    """Dtype of factors, steps and optimizer state: float32 for half-precision parameters, else theirs."""
    return torch.float32 if param.dtype in HALF_DTYPES else param.dtype


class FactoredBlock:
    """Shared machinery of a block whose curvature is ``Γ ⊗ A`` in the row-major block form.

    :attr:`diagonal` names the sides ("A", "G") kept as their diagonals (Note [diagonal sides] in
    :mod:`kldwrm_fast.ops.reference`): vectors in the state instead of matrices, set when the curvature is built
    (an embedding's input side; a side wider than ``max_factor_dim``)."""

    name: str
    params: list[Tensor]
    diagonal: tuple[str, ...] = ()
    why_plain: Optional[str] = None
    """Set when the capture found that this block cannot have curvature: why it takes plain gradient descent."""

    @property
    def key(self) -> Tensor:
        """The parameter under which the optimizer keeps this block's state."""
        return self.params[0]

    @property
    def shape(self) -> tuple[int, int]:
        """Block-form shape (n_out, n_in): ``V``, ``Ĝ`` and steps have it; factors are n_in² and n_out²."""
        raise NotImplementedError

    def matrix(self, tensors: list[Tensor]) -> Tensor:
        """Block-form matrix (n_out, n_in) of parameter-shaped ``tensors`` (aligned with ``params``); a new
        tensor when :attr:`matrix_copies`, else possibly a view of ``tensors[0]``."""
        raise NotImplementedError

    @property
    def matrix_copies(self) -> bool:
        """Whether :meth:`matrix` always returns a new tensor (then :meth:`gradient` need not copy it)."""
        return False

    def unflatten(self, matrix: Tensor) -> list[Tensor]:
        """Parameter-shaped views of a block-form matrix (inverse of :meth:`matrix`)."""
        raise NotImplementedError

    def statistics_rows(self, grad_factor: float = 1.0, grad_unscale: Optional[Tensor] = None) -> dict:
        """``{side: (rows, scale)}`` with the new local factor of ``side`` ("A", "G") ``= scale · rowsᵀrows``.

        ``grad_factor`` multiplies the captured output gradients (k for training-loss gradients of k
        accumulated passes, each loss divided by k); ``grad_unscale`` is a loss scaler's ``1/scale``.
        """
        raise NotImplementedError

    def reweighted_pair(self, state: State, hats: dict) -> tuple[Tensor, Tensor]:
        """``(Â, Γ̂)`` from the reweighted factors ``hats`` by side."""
        return hats["A"], hats["G"]

    def cached_reweight(self, lr: float) -> tuple[float, float]:
        """``(output, input)`` factors by which a step without new statistics scales the averages' eigenvalues:
        ``Γ̂_k = (1 + lr_k) Γ̄_q``, ``Â_k = (1 + lr_k) Ā_q`` (docs/algorithms.md §2, eq. (20))."""
        return 1.0 + lr, 1.0 + lr

    def update_statistics(
        self,
        state: State,
        ops: Operations,
        rho: float,
        reweight: Optional[float],
        grad_factor: float = 1.0,
        grad_unscale: Optional[Tensor] = None,
    ) -> Optional[tuple[Tensor, Tensor]]:
        """Fold the new local statistics into the averages; return ``(Â, Γ̂)`` when ``reweight`` is given."""
        hats = {
            side: self._fold(state, ops, side, rows, scale, rho, reweight)
            for side, (rows, scale) in self.statistics_rows(grad_factor, grad_unscale).items()
        }
        return None if reweight is None else self.reweighted_pair(state, hats)

    def repeat_statistics(self, state: State, rho: float, reweight: Optional[float]) -> Optional[tuple[Tensor, Tensor]]:
        """A due step on which this block captured nothing: the averages stand in for the local factors, so they
        stay as they are and ``X̂ = (ρ + c) X̄`` (eq. (20)); return ``(Â, Γ̂)`` when ``reweight`` is given."""
        hats = {}
        for side in SIDES:
            average = state[average_key(side)]
            state[side] = average.clone()
            hats[side] = average * (rho + reweight) if reweight is not None else None
        return None if reweight is None else self.reweighted_pair(state, hats)

    def fold_local(self, state: State, side: str, local: Tensor, rho: float, reweight: Optional[float]):
        """Fold an already computed (e.g. all-reduced) local factor of ``side``; return its ``X̂`` or None."""
        ea_key = average_key(side)
        first = ea_key not in state
        if first:
            state[ea_key] = torch.empty_like(local)
        reweighted = torch.empty_like(local) if reweight is not None else local.new_empty(0)
        reference.fold(local, state[ea_key], reweighted, rho, reweight or 0.0, first, reweight is not None)
        state[side] = local
        return reweighted if reweight is not None else None

    def captured(self) -> list[Tensor]:
        """The captured tensors that feed the next statistics (checked for NaN/Inf before a step)."""
        return []

    def has_statistics(self) -> bool:
        """Whether new statistics are available for :meth:`update_statistics`."""
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of this block's factors and state (see :func:`state_dtype`)."""
        return state_dtype(self.params[0])

    def gradient(self, weight_decay: float, grad_unscale: Optional[Tensor] = None) -> Tensor:
        """``V = ∇W̄ loss + wd · W̄`` (n_out, n_in) in :attr:`dtype`; a missing grad counts as zero.

        ``grad_unscale`` multiplies the raw gradients first (a loss scaler's ``1/scale``).
        """
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        v = self.matrix(grads)
        if v.dtype != self.dtype or not self.matrix_copies:  # (a no-op .to costs as much as a small operation)
            v = v.to(self.dtype, copy=not self.matrix_copies)
        if grad_unscale is not None:
            v.mul_(grad_unscale)
        if weight_decay:
            v.add_(self.matrix([p.detach() for p in self.params]).to(self.dtype), alpha=weight_decay)
        return v

    def _fold(self, state: State, ops, side: str, x: Tensor, scale: float, rho: float, reweight):
        """Update ``side`` ("A" or "G"): local factor, average, and the reweighted factor when asked."""
        if side in self.diagonal:
            return self.fold_local(state, side, reference.diagonal_local(x, scale, self.dtype), rho, reweight)
        ea_key = average_key(side)
        first = ea_key not in state
        if first:
            state[ea_key] = x.new_zeros(x.shape[1], x.shape[1])
        with_reweighted = reweight is not None
        reweighted = torch.empty_like(state[ea_key]) if with_reweighted else x.new_empty(0)
        state[side] = ops.factor_update(
            x, state[ea_key], reweighted, scale, rho, reweight or 0.0, first, with_reweighted
        )
        return reweighted if with_reweighted else None


class KroneckerBlock(FactoredBlock):
    """One ``nn.Linear`` or ``nn.Conv2d`` (groups=1) layer with its bias folded in (docs/algorithms.md §1).

    The capture hooks append to :attr:`inputs` (layer inputs) and :attr:`output_grads` (gradients of the
    mean loss with respect to the layer output) in pairs; both are cleared after every optimizer step.
    :attr:`modules` lists every layer that computes with these parameters (layers sharing one weight and bias
    pool their statistics); :attr:`module` is the first. With ``fold_bias=False`` the block holds the weight
    alone (the bias is a :class:`BiasBlock` of its own).
    """

    expands_only = False
    """Whether the block's inputs are never averaged over shared dimensions or repeated calls (``weight_sharing`` and
    ``repeated_calls`` ``"reduce"``): an embedding's one-hot rows would make its input factor dense, a
    normalisation layer's rows are formed from the products first."""

    def __init__(self, name: str, module: nn.Module, fold_bias: bool = True, parameters: Optional[tuple] = None):
        self.name = name or f"the model's own {type(module).__name__}"  # the root module's name is ""
        self.module = module
        self.modules = [module]
        # (weight, bias or None): the module's own, or those given (an attention module's projections)
        weight, bias = (module.weight, getattr(module, "bias", None)) if parameters is None else parameters
        self.has_bias = fold_bias and bias is not None and bias.requires_grad
        self.params = [weight] + ([bias] if self.has_bias else [])
        self.inputs: list[Tensor] = []
        self.output_grads: list[Tensor] = []
        self.passes: list[tuple[int, int]] = []  # (forward, backward) of each captured pair: calls of one pass share it
        self.repeated_calls = "expand"  # (set by the curvature from the optimizer's option)
        self.weight_sharing = "expand"  # (likewise)

    @property
    def shape(self) -> tuple[int, int]:
        weight = self.params[0]
        return weight.shape[0], weight[0].numel() + int(self.has_bias)

    @property
    def matrix_copies(self) -> bool:
        return self.has_bias  # the bias column is joined by a concatenation

    def matrix(self, tensors: list[Tensor]) -> Tensor:
        weight = layers.weight_matrix(self.module, tensors[0])
        if not self.has_bias:
            return weight
        return torch.cat([weight, tensors[1].unsqueeze(1)], dim=1)

    def unflatten(self, matrix: Tensor) -> list[Tensor]:
        n_weight = matrix.shape[1] - int(self.has_bias)
        # narrow/select rather than indexing: Python's slice parsing costs more than the views on a plain step
        parts = [matrix.narrow(1, 0, n_weight).reshape(self.params[0].shape)]
        if self.has_bias:
            parts.append(matrix.select(1, n_weight))
        return parts

    def clear(self) -> None:
        self.inputs.clear()
        self.output_grads.clear()
        self.passes.clear()

    def has_statistics(self) -> bool:
        return bool(self.output_grads)

    def captured(self) -> list[Tensor]:
        return self.inputs + self.output_grads

    def statistics_rows(self, grad_factor=1.0, grad_unscale=None):
        passes = self.calls_by_pass()
        pieces = [layers.input_rows(self.module, x, self.has_bias, self.dtype) for calls in passes for x, _ in calls]
        a = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        g_pieces = gradient_pieces(self.module, passes, lambda e: layers.output_rows(self.module, e).to(self.dtype))
        return {"A": (a, 1.0 / a.shape[0]), "G": pooled_rows(*g_pieces[:2], grad_factor, grad_unscale, g_pieces[2])}

    def calls_by_pass(self) -> list[list[tuple[Tensor, Tensor]]]:
        """The captured ``(input, output gradient)`` pairs, grouped by pass (Note [repeated calls]): each pass is
        one pair when the layer ran once in it or its calls were reduced, else the pair of every call."""
        if not self.inputs or not self.output_grads:
            missing = "inputs" if not self.inputs else "output gradients"
            raise RuntimeError(
                f"statistics were due but layer {self.name!r} ({type(self.module).__name__}) recorded no "
                f"{missing}: call the model in train mode with gradients enabled before step(), and do not "
                "use the layer's weights outside its forward"
            )
        if len(self.inputs) == 1:
            return [[self._shared(self.inputs[0], self.output_grads[0])]]
        grouped: dict[tuple[int, int], list[tuple[Tensor, Tensor]]] = {}
        for x, e, key in zip(self.inputs, self.output_grads, self.passes, strict=True):
            grouped.setdefault(key, []).append((x, e))
        return [[self._shared(x, e) for x, e in self._reduced(calls)] for calls in grouped.values()]

    def _shared(self, x: Tensor, e: Tensor) -> tuple[Tensor, Tensor]:
        """Note [weight sharing over a sequence]
            An ``nn.Linear`` applied to ``(batch, d_1, …, d_k, features)`` shares its weight over ``d_1 … d_k``
            (a sequence, the positions of a token grid). With ``weight_sharing="expand"`` (the default) every
            position is a row of the factors and counts as a sample (K-FAC-expand, Eschenhagen et al. 2023):
            ``A = āᵀā/(B·T)``, ``Γ = B·T · eᵀe``. With ``"reduce"`` the input is averaged and the output
            gradient summed over the shared dimensions before the factors are formed (K-FAC-reduce), so each of
            the ``B`` rows is a sample: ``A = (1/B) Σ_n ā_n ā_nᵀ`` with ``ā_n = (1/T) Σ_t ā_{n,t}``, and
            ``Γ = B Σ_n e_n e_nᵀ`` with ``e_n = Σ_t e_{n,t}``. The first dimension is the batch: a sequence-first
            layout (``nn.Transformer`` with ``batch_first=False``) should keep ``"expand"``. Convolutions keep
            KFC's expand convention. Both are the same when ``T = 1``.

        The pair ``(input, output gradient)`` with the shared dimensions reduced, or as it is."""
        if self.weight_sharing == "expand" or self.expands_only or isinstance(self.module, nn.Conv2d) or x.dim() <= 2:
            return x, e
        shared = tuple(range(1, x.dim() - 1))
        return x.mean(shared), e.sum(shared)

    def _reduced(self, calls: list[tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """Note [repeated calls]
            A layer called c > 1 times in one forward pass (an unrolled recurrent cell, a projection applied
            several times, layers sharing one weight and bias) has the gradient ``Σ_r e_r x̄_rᵀ``: the calls are
            a weight-shared dimension (Eschenhagen et al. 2023), not passes of gradient accumulation, whose
            factors are averaged. With ``repeated_calls="expand"`` (the default) every call's rows enter ``A``
            (the mean over all rows) and ``Γ`` sums the calls' factors (K-FAC-expand: the calls taken as
            independent). With ``"reduce"`` the calls are one pair, the mean input ``(1/c) Σ_r x_r`` and the
            summed output gradient ``Σ_r e_r`` (K-FAC-reduce), exact when every call sees the same input: then
            ``sum(layer(x) for _ in range(c)) / c`` gets the step of ``layer(x)`` for every c, where expand's
            step grows as c. Calls of different shapes cannot be paired row by row and are expanded.

        Returns the pass's pairs: one pair when reduced, else ``calls``."""
        if len(calls) == 1 or self.repeated_calls == "expand" or self.expands_only:
            return calls
        x0, e0 = calls[0]
        if any(x.shape != x0.shape or e.shape != e0.shape for x, e in calls):
            return calls
        x = torch.stack([x for x, _ in calls]).mean(0)
        e = torch.stack([e for _, e in calls]).sum(0)
        return [(x, e)]


def pooled_rows(
    pieces: list[Tensor],
    counts: list[int],
    factor: float,
    grad_unscale: Optional[Tensor],
    shares: Optional[list[float]] = None,
):
    """Rows ``r`` and scale ``s`` of ``Γ = s·rᵀr = Σ_i w_i m_i (f e_i)ᵀ(f e_i)`` for gradient rows ``pieces`` of
    ``m_i`` samples each (``f = factor·unscale``): the passes' factors averaged with weights ``w_i`` (``shares``;
    default ``m_i / Σ m``, a sample-weighted mean; the calls of one pass share their pass's weight)."""
    if shares is None:
        shares = [m / sum(counts) for m in counts]
    if len(pieces) == 1:
        rows, scale = pieces[0], factor * factor * counts[0] * shares[0]
    else:
        rows = torch.cat([piece * (factor * (m * w) ** 0.5) for piece, m, w in zip(pieces, counts, shares)])
        scale = 1.0
    if grad_unscale is not None:
        rows = rows * grad_unscale.to(rows.dtype)
    return rows, scale


def gradient_pieces(module: nn.Module, passes: list, rows) -> tuple[list[Tensor], list[int], list[float]]:
    """``(pieces, counts, shares)`` for :func:`pooled_rows` of the output gradients in ``passes``
    (:meth:`KroneckerBlock.calls_by_pass` of ``module``'s block), ``rows(e)`` giving a gradient's rows: every call
    of every pass (Note [repeated calls]), each pass weighted by its samples (its largest call's), which its calls
    share."""
    counts = [[layers.sample_count(module, e) for _, e in calls] for calls in passes]
    total = sum(max(c) for c in counts)
    pieces = [rows(e) for calls in passes for _, e in calls]
    shares = [max(c) / total for c in counts for _ in c]
    return pieces, [m for c in counts for m in c], shares


class EmbeddingBlock(KroneckerBlock):
    """One ``nn.Embedding`` (docs/algorithms.md §1, "embeddings"): ``y = W[i]`` is the Linear layer
    ``y = Wᵀ onehot(i)`` without a bias, so the block form is ``Wᵀ`` (n_out = ``embedding_dim``, n_in =
    ``num_embeddings``) and the input factor of one-hot rows is diagonal, the tokens' frequencies ``A = diag(c)/rows``,
    kept as a vector (no V×V matrix is formed); ``Γ = rows · eᵀe`` as for a Linear layer. Every position is a
    sample: weight sharing and repeated calls always expand, since averaged one-hot rows would make ``A`` dense.
    The gradient's ``padding_idx`` column is zero after weight decay too, so that row is never updated."""

    diagonal = (INPUT,)
    expands_only = True

    def __init__(self, name: str, module: nn.Embedding):
        super().__init__(name, module, fold_bias=False)

    @property
    def shape(self) -> tuple[int, int]:
        return self.module.embedding_dim, self.module.num_embeddings

    @property
    def matrix_copies(self) -> bool:
        return True

    def matrix(self, tensors: list[Tensor]) -> Tensor:
        return tensors[0].t().contiguous()

    def unflatten(self, matrix: Tensor) -> list[Tensor]:
        return [matrix.t()]

    def gradient(self, weight_decay: float, grad_unscale: Optional[Tensor] = None) -> Tensor:
        v = super().gradient(weight_decay, grad_unscale)
        if self.module.padding_idx is not None:
            v[:, self.module.padding_idx] = 0.0
        return v

    def captured(self) -> list[Tensor]:
        return list(self.output_grads)  # (the inputs are token indices)

    def statistics_rows(self, grad_factor=1.0, grad_unscale=None):
        passes = self.calls_by_pass()
        tokens = torch.cat([x.reshape(-1) for calls in passes for x, _ in calls])
        counts = torch.bincount(tokens, minlength=self.module.num_embeddings)
        g_pieces = gradient_pieces(self.module, passes, lambda e: e.reshape(-1, e.shape[-1]).to(self.dtype))
        return {INPUT: (counts, 1.0 / tokens.numel()), OUTPUT: pooled_rows(*g_pieces[:2], grad_factor, grad_unscale,
                                                                          g_pieces[2])}  # fmt: skip


class FlatRow:
    """The block form of a block whose output side is one row: all its parameters flattened in order, (1, n)."""

    params: list[Tensor]

    @property
    def shape(self) -> tuple[int, int]:
        return 1, sum(p.numel() for p in self.params)

    @property
    def matrix_copies(self) -> bool:
        return True

    def matrix(self, tensors: list[Tensor]) -> Tensor:
        return torch.cat([t.reshape(-1) for t in tensors]).unsqueeze(0)

    def unflatten(self, matrix: Tensor) -> list[Tensor]:
        parts = matrix[0].split([p.numel() for p in self.params])
        return [part.view_as(p) for part, p in zip(parts, self.params)]


class NormBlock(FlatRow, KroneckerBlock):
    """Note [scale-and-shift blocks]
        The affine parameters of a normalisation layer (``LayerNorm``, ``RMSNorm``, ``GroupNorm``,
        ``BatchNorm1d/2d/3d``), ``y = γ ⊙ x̂ + β`` with ``x̂`` the normalised input, are one block whose curvature is
        the diagonal of the Fisher of ``(γ, β)`` (kfac-jax's ``ScaleAndShiftDiagonal``): block form the row
        ``[γ, β]`` flattened, ``(n_out, n_in) = (1, |γ| + |β|)``, input side the diagonal ``A = m Σ_r g_r²`` of the
        rows ``g_r = [e_r ⊙ x̂_r, e_r]`` (``e`` the output gradient of the mean loss, ``m`` the rows), output side
        the constant ``[[1]]``, which the Q family reweights as a bias block's input side. A row is a sample: for
        channel norms (BatchNorm, GroupNorm) the gradient summed over the sample's locations (its exact gradient;
        BatchNorm's coupling of samples through the batch statistics is left out, as kfac-jax does); for
        ``LayerNorm``/``RMSNorm`` over ``(batch, seq, features)`` every position with ``weight_sharing="expand"`` and
        every sequence (summed) with ``"reduce"``, as for a Linear layer. ``x̂`` is computed again from the captured
        input (the layer's own eps; BatchNorm from the batch's statistics, as in training); running statistics are
        the layer's own business. Repeated calls always expand."""

    diagonal = (INPUT,)
    expands_only = True  # (its rows already sum over positions for weight_sharing="reduce": gradient_rows)

    def __init__(self, name: str, module: nn.Module):
        super().__init__(name, module, fold_bias=True)

    def _normalised(self, x: Tensor) -> Tensor:
        module = self.module
        if isinstance(module, nn.LayerNorm):
            return F.layer_norm(x, module.normalized_shape, None, None, module.eps)
        if isinstance(module, nn.GroupNorm):
            return F.group_norm(x, module.num_groups, None, None, module.eps)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return F.batch_norm(x, None, None, None, None, True, 0.0, module.eps)
        return F.rms_norm(x, module.normalized_shape, None, module.eps)

    def gradient_rows(self, x: Tensor, e: Tensor) -> Tensor:
        """``[e ⊙ x̂, e]`` per sample (rows, |γ| + |β|) in :attr:`dtype` (Note [scale-and-shift blocks])."""
        x, e = x.to(self.dtype), e.to(self.dtype)
        scale = e * self._normalised(x)
        parts = [scale, e] if self.has_bias else [scale]
        if isinstance(self.module, layers.FEATURE_LAST):
            features = self.params[0].numel()
            rows = [p.reshape(-1, features) for p in parts]
            if self.weight_sharing == "reduce" and x.dim() > len(self.module.normalized_shape) + 1:
                rows = [r.reshape(x.shape[0], -1, features).sum(1) for r in rows]
            return torch.cat(rows, dim=1)
        return torch.cat([p.reshape(p.shape[0], p.shape[1], -1).sum(2) for p in parts], dim=1)

    def statistics_rows(self, grad_factor=1.0, grad_unscale=None):
        passes = self.calls_by_pass()
        rows = [[self.gradient_rows(x, e) for x, e in calls] for calls in passes]
        counts = [[r.shape[0] for r in calls] for calls in rows]
        total = sum(max(c) for c in counts)
        shares = [max(c) / total for c in counts for _ in c]
        flat = [r for calls in rows for r in calls]
        one = torch.ones(1, 1, dtype=self.dtype, device=self.params[0].device)
        pooled = pooled_rows(flat, [m for c in counts for m in c], grad_factor, grad_unscale, shares)
        return {INPUT: pooled, OUTPUT: (one, 1.0)}


class BiasBlock(FactoredBlock):
    """A layer's bias as a block of its own (``bias="separate"``, docs/algorithms.md §1): input factor ``[[1]]``,
    output factor from the layer's output gradients summed over locations, which is the exact Fisher of the bias.
    For a Linear layer, that is the weight's ``Γ``.

    It reads what its weight block (:attr:`partner`) captured, and has no hooks of its own.
    """

    def __init__(self, partner: KroneckerBlock):
        self.partner = partner
        self.module = partner.module
        self.modules: list[nn.Module] = []
        self.name = f"{partner.name} (bias)"
        self.params = [partner.module.bias]

    @property
    def shape(self) -> tuple[int, int]:
        return self.params[0].shape[0], 1

    def matrix(self, tensors: list[Tensor]) -> Tensor:
        return tensors[0].unsqueeze(1)

    def unflatten(self, matrix: Tensor) -> list[Tensor]:
        return [matrix[:, 0]]

    def clear(self) -> None:
        """The partner clears what it captured."""

    def has_statistics(self) -> bool:
        return self.partner.has_statistics()

    def statistics_rows(self, grad_factor=1.0, grad_unscale=None):
        passes = self.partner.calls_by_pass()
        if isinstance(self.module, nn.Conv2d):
            pieces = gradient_pieces(
                self.module, passes, lambda g: (g if g.dim() == 4 else g.unsqueeze(0)).sum((2, 3)).to(self.dtype)
            )
        else:
            pieces = gradient_pieces(self.module, passes, lambda g: layers.output_rows(self.module, g).to(self.dtype))
        one = torch.ones(1, 1, dtype=self.dtype, device=self.params[0].device)
        return {"A": (one, 1.0), "G": pooled_rows(*pieces[:2], grad_factor, grad_unscale, pieces[2])}


class DenseBlock(FlatRow, FactoredBlock):
    """Exact curvature over arbitrary parameters, for oracle tests (docs/algorithms.md §1, "dense curvature block").

    ``curvature_rows()`` returns ``(R, scale)`` with ``R`` (rows, n) such that the block's curvature is
    ``F = scale · RᵀR`` (e.g. stacked per-sample Jacobians of the network output and ``scale = 1/N`` for the
    Fisher of a unit-variance Gaussian model). The block form is the (1, n) row of all parameters
    flattened in order, and the output factor is the constant ``[[1]]``, so ``Γ ⊗ A = F`` exactly and
    the reweighted factor ``ρF̄_{k−1} + c F_k`` is exactly ``F̄_k + F_k/λ_k``.
    """

    def __init__(self, params: list[Tensor], curvature_rows: Callable[[], tuple[Tensor, float]], name: str = "dense"):
        self.name = name
        self.params = list(params)
        self.curvature_rows = curvature_rows

    def clear(self) -> None:
        """Nothing is captured: the curvature is computed on demand."""

    def has_statistics(self) -> bool:
        return True

    def statistics_rows(self, grad_factor=1.0, grad_unscale=None):
        rows, scale = self.curvature_rows()
        return {"A": (rows.detach(), scale)}

    def reweighted_pair(self, state, hats):
        return hats["A"], state["G_ea"].clone()

    def cached_reweight(self, lr):
        return 1.0, 1.0 + lr  # the output factor is the constant [[1]]: only the curvature side is reweighted

    def update_statistics(self, state, ops, rho, reweight, grad_factor=1.0, grad_unscale=None):
        one = torch.ones(1, 1, dtype=self.dtype, device=self.params[0].device)
        for key in ("G", "G_ea"):
            state[key] = one.clone()
        return super().update_statistics(state, ops, rho, reweight, grad_factor, grad_unscale)
