"""The numerical-fault verdict of a step: its checks, their reports, and the one :meth:`Numerics.mask` that applies
a plain step's verdict to everything the step writes.

Note [numerics on the device]
    A NaN or Inf in any gradient, or in the statistics captured for a step, skips the step — parameters and every
    piece of optimizer state stay as they were — with a warning, counted in ``skipped_steps``. An update that
    comes out non-finite all the same (damping 0 with a factor that has a zero eigenvalue, an overflow) is not
    applied: the parameters stay, the statistics of the step are kept, the recursions restart, with a warning,
    also counted. On statistics and inverse steps the checks are host synchronisations.

    On a plain step (no statistics, no decomposition) the checks are a 0-dim bool on the device,
    :attr:`Numerics.accepted`: the gradients' check at the start, and'ed with the update's (the update's alone
    where it sees every gradient: :meth:`Numerics.update_check_covers_gradients`). Every write the step makes goes
    through :meth:`Numerics.mask`: parameter updates are zeroed, KFAC's momentum keeps its value (its factor μ is
    masked to 1), and the recursions restart at the next step (the host cannot know to drop ``lr_prev``): SO's
    previous ``V`` is zeroed; Q restarts every block through its growth guard's pass. The step counter advances.
    Rejected steps are counted on the device and reported on the next statistics or inverse step, or when
    ``skipped_steps`` is read. So a plain step makes no host synchronisation, and traces into one graph under
    ``torch.compile``.

The verdict lives on an object of its own, not on the optimizer: ``torch.compile`` refuses an assignment to an
attribute of a ``torch.optim`` optimizer inside the traced step (torch 2.11, the GPU machines' release: "Attempted
setattr on a user-defined object") or drops it (torch 2.14), and applies one to a plain object's.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import Tensor

from kldwrm_fast.curvature.blocks import HALF_DTYPES
from kldwrm_fast.distributed import DataParallel
from kldwrm_fast.ops import tracing

UPDATE_CHECKS = ("kl_clip", "q_step", None)
"""What a rule's check of its update sees (:meth:`Numerics.update_check_covers_gradients`): ``"kl_clip"``, the KL
clip's inner product ``Σ⟨P(v), v⟩`` (KFAC, SO); ``"q_step"``, Q's step clip over ``P(Ĝ)`` (Ĝ holds V entry by
entry); None, nothing that sees the gradients (QE's steps come from its inner solver)."""


class Numerics:
    """One optimizer's verdicts, set afresh by each step (:meth:`begin`), and its counts of skipped steps.

    Attributes:
        accepted: this plain step's verdict, a 0-dim bool tensor on the device; None when no check is decided on
            the device (off plain steps, or ``check_numerics = False``).
        on_device: whether this is a plain step whose checks are decided on the device.
        restart: whether the recursions restart at the next step (an update found non-finite on the host).
        taken: whether the step ran past its checks (not skipped on the host), so routed parameters step too.
        grad_unscale: the step's loss-scaler ``1/scale`` (or None).
        found_inf: a loss scaler's ``found_inf`` for this step (or None).
        skipped_device: plain steps rejected on the device, an int64 counter there (None until made).
    """

    def __init__(self, owner: str, data_parallel: DataParallel) -> None:
        self.owner, self.data_parallel = owner, data_parallel
        self.accepted: Optional[Tensor] = None
        self._rejected: Optional[Tensor] = None
        self.on_device = False
        self.restart = False
        self.taken = False
        self.grad_unscale: Optional[Tensor] = None
        self.found_inf: Optional[Tensor] = None
        self.device = torch.device("cpu")
        self.skipped_host = 0
        self.skipped_device: Optional[Tensor] = None
        self.skipped_reported = 0

    def begin(
        self, on_device: bool, grad_unscale: Optional[Tensor], found_inf: Optional[Tensor], device: torch.device
    ) -> None:
        """Start a step's verdict: decided on the device (a plain step with checks) or on the host; ``device``: the
        parameters'."""
        self.accepted = self._rejected = None
        self.device = device
        self.on_device, self.grad_unscale, self.found_inf = on_device, grad_unscale, found_inf
        self.restart = self.taken = False

    def accept_only_if(self, finite: Tensor) -> None:
        """And ``finite`` (0-dim bool on the device) into this plain step's verdict."""
        self.accepted = finite if self.accepted is None else self.accepted & finite
        self._rejected = None

    def rejected(self) -> Tensor:
        """``~accepted`` (a plain step's verdict must be set), made once per verdict."""
        if self._rejected is None:
            self._rejected = ~self.accepted
        return self._rejected

    def mask(self, tensor: Tensor, value: float = 0.0) -> Tensor:
        """``tensor``, set in place to ``value`` when this plain step was rejected on the device; as it is otherwise.
        Updates are masked to 0 (nothing moves), multiplicative factors to 1 (the value kept)."""
        return tensor if self.accepted is None else tensor.masked_fill_(self.rejected(), value)

    def update_check_covers_gradients(self, check: Optional[str], group: dict, lr: float, gradients_elsewhere: bool):
        """Whether a plain step's gradients need no check of their own: the rule's check of the update (``check``,
        one of :data:`UPDATE_CHECKS`) sees every gradient of the step.

        It does when that check applies at this step, no parameter with a gradient takes plain gradient descent
        (``gradients_elsewhere``) and no loss scaler reported ``found_inf``: a non-finite entry of ``v`` makes its
        column of ``Q_Γᵀ v`` non-finite (``±inf``, or NaN where an eigenvector entry is 0), so every entry of
        ``Q_Γᵀ v Q_A`` is (an orthogonal ``Q_A`` has no zero row), and so every entry of ``P(v)``, whatever the
        summation order: the KL clip's inner product, or Q's clip norms, are non-finite. That spares a pass over the
        gradients, and on the CPU about 0.1 ms of a plain step's host time on the paper CNN."""
        if check == "kl_clip":
            sees = group["kl_clip"] is not None and lr != 0
        elif check == "q_step":
            sees = group["curvature_sum"] != "exact" and lr != 0
        else:
            sees = False
        return sees and not gradients_elsewhere and self.found_inf is None

    def update_is_finite(self, updates: list[Tensor], group: dict, step: int, total: Optional[Tensor] = None) -> bool:
        """Whether the computed updates are finite (one host sync; skipped with ``check_numerics = False``);
        ``total``, when given, is a 0-dim tensor that is non-finite whenever an update entry is, checked instead.
        On a plain step decided on the device it ands the check into :attr:`accepted` and returns True.

        A non-finite update (damping 0 with a factor that has a zero eigenvalue, or an overflow) skips the
        parameter update with a warning, and the recursions across it restart (:attr:`restart`), so nothing
        non-finite reaches the parameters or the next step."""
        if not group["check_numerics"]:
            return True
        if self.on_device:
            self.accept_only_if(self.finite_on_device(updates) if total is None else (total - total) == 0)
            return True
        if self.all_finite(updates) if total is None else self.is_finite(total):
            return True
        self.restart = True
        self.skip(
            f"non-finite update at step {step} (damping={group['damping']}: a factor with a zero eigenvalue needs "
            "damping > 0)"
        )
        return False

    def finite_on_device(self, tensors: list[Tensor]) -> Tensor:
        """Whether all ``tensors`` (and a loss scaler's ``found_inf``) are finite, as a 0-dim bool tensor."""
        total = self._finite_total(tensors)
        if total is None:
            return torch.ones((), dtype=torch.bool, device=self.device)
        return (total - total) == 0  # exactly when total is finite: two operations where isfinite takes four

    def all_finite(self, tensors: list[Tensor]) -> bool:
        """One host sync: are all ``tensors`` (and a loss scaler's ``found_inf``) finite? One summing pass over each
        tensor (:meth:`_finite_total`; ``isfinite().all()`` takes three passes and a launch per tensor)."""
        total = self._finite_total(tensors)
        return True if total is None else self.is_finite(total)

    def is_finite(self, total: Tensor) -> bool:
        """Whether the 0-dim ``total`` is finite (one host sync; under data parallelism, on every rank)."""
        if not self.data_parallel.active:
            return math.isfinite(total.item())
        # Local statistics differ between ranks: all must agree to skip, or their collectives would part.
        finite = torch.isfinite(total).to(torch.float32)
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        return bool(finite)

    def _finite_total(self, tensors: list[Tensor]) -> Optional[Tensor]:
        """A 0-dim sum over every entry that is non-finite whenever an entry is (and ``inf`` for a loss scaler's
        ``found_inf``); only finite entries whose sum overflows (3e38 in float32) would raise a false alarm. None
        when there is nothing to check.

        How it sums depends on where the tensors are. On a GPU, the L1 norms of all tensors in one multi-tensor
        op per precision. On the CPU, a sum per tensor of 4096 entries or more, and the multi-tensor norm for the
        smaller ones (where a call costs more than the entries): there ``_foreach_norm`` loops over the tensors
        anyway and is slow per entry (the checks of the bench workloads on the 2-core CPU, two runs: the MLP's
        gradients 493–526 µs against 127–130 µs, the wide CNN's gradients and statistics 2.76–2.79 ms against
        0.61–0.65 ms), and the raw sum is as good a test (±inf and NaN survive it). While torch.compile traces,
        the sum of ``t · 0`` over every entry: 0 when all are finite, NaN otherwise (never a false alarm); to the
        compiler ``_foreach_norm`` is an opaque call, and these sums fuse into the step's own kernels.
        Half-precision entries are summed in float32 (their range ends at 65504)."""
        if tracing():
            totals = [(t * 0).sum(dtype=torch.float32) for t in tensors]
        else:
            summed, others = [], []
            for t in tensors:
                (summed if t.device.type == "cpu" and t.numel() >= 4096 else others).append(t)
            totals = [torch.stack([t.sum(dtype=_sum_dtype(t)) for t in summed]).sum()] if summed else []
            halves = [t for t in others if t.dtype in HALF_DTYPES]
            others = [t for t in others if t.dtype not in HALF_DTYPES]
            totals += [
                torch.stack(torch._foreach_norm(group, 1, dtype=dtype)).sum()
                for group, dtype in ((others, None), (halves, torch.float32))
                if group
            ]
        if self.found_inf is not None:
            totals.append(torch.where(self.found_inf.reshape(()) > 0, math.inf, 0.0))
        if not totals:
            return None
        total = totals[0]
        for other in totals[1:]:
            total = total + other.to(total.device)
        return total

    def count_rejection(self) -> None:
        """Count this plain step on the device when it was rejected there (no host sync)."""
        if self.accepted is not None:
            self.counter(self.accepted.device).add_(self.rejected())

    def counter(self, device: torch.device) -> Tensor:
        """The device-side count of rejected plain steps, made on (or moved to) ``device``."""
        self.skipped_device = device_counter(self.skipped_device, (), device)
        return self.skipped_device

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for NaN or Inf (reads the device-side count of plain steps: a host sync)."""
        self.report_skipped()
        return self.skipped_host + self.skipped_reported

    def skip(self, reason: str) -> None:
        self.skipped_host += 1
        warnings.warn(
            f"{self.owner}: {reason}; step skipped, parameters unchanged "
            f"({self.skipped_host + self.skipped_reported} skipped so far)",
            RuntimeWarning,
            stacklevel=5,
        )

    def report_skipped(self) -> None:
        """Warn about plain steps skipped on the device since the last report (one host transfer, only once one
        has been counted); called on statistics and inverse steps and when :attr:`skipped_steps` is read."""
        if self.skipped_device is None:
            return
        count = int(self.skipped_device)
        new, self.skipped_reported = count - self.skipped_reported, count
        if new:
            warnings.warn(
                f"{self.owner}: {new} step(s) between statistics steps had NaN or Inf in their gradients or "
                f"update; step skipped, parameters unchanged, the recursions restart "
                f"({self.skipped_host + count} skipped so far)",
                RuntimeWarning,
                stacklevel=5,
            )


def _sum_dtype(tensor: Tensor) -> Optional[torch.dtype]:
    """The dtype :meth:`Numerics._finite_total` sums ``tensor`` in: float32 for half precision."""
    return torch.float32 if tensor.dtype in HALF_DTYPES else None


def device_counter(count: Optional[Tensor], size: tuple, device: torch.device) -> Tensor:
    """An int64 counter of ``size`` on ``device``: zeros the first time, ``count`` moved there after the model
    moved, ``count`` itself otherwise (counted on the device, in place, without a host sync)."""
    if count is None:
        return torch.zeros(size, dtype=torch.int64, device=device)
    return count if count.device == device else count.to(device)
