"""QE-KLD-WRM: the Q step refined on the exact symmetric-KL wake (docs/algorithms.md §3 "QEKLDWRM")."""

from __future__ import annotations

import contextlib
import weakref
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map_only

from kldwrm_fast import distributed
from kldwrm_fast.curvature.state import SIDES, average_key
from kldwrm_fast.optim.options import FULL_EVERY, MAX_FACTOR_DIM, WARM_TOL, QEOptions, _check
from kldwrm_fast.optim.q import QKLDWRM
from kldwrm_fast.optim.wake import WakeObjective, stored_outputs

SNAPSHOTS = "snapshots"


@contextlib.contextmanager
def evaluation_mode(model: nn.Module):
    """Put every submodule in eval mode and restore each one's own mode afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


class QEKLDWRM(QKLDWRM):
    """QE-KLD-WRM: start from the Q-KLD-WRM step ``S_k``, then ``n_inner`` steps of plain SGD with learning
    rate ``inner_lr_ratio · lr`` on

        Φ(s) = ⟨V_k, s⟩ + ½ ⟨s, Γ_k s A_k⟩ + λ_k Σ_i ζ(i) ρ^{k−i} D(θ_i, θ_k + s),   ζ(i) = κ(i) · kl_scale,

    over the last ``n_cap`` iterates θ_i (θ_k included), with D the exact symmetric KL averaged over the
    current mini-batch (categorical from logits, or unit-variance Gaussian). Then clip as in Q and update;
    the Q recursion (Ĝ, M) continues from the unclipped Q step.

    The mini-batch is the positional and keyword arguments of the last train-mode forward call of
    ``model`` before :meth:`step` (a forward pre-hook records them). Under data parallelism each rank's KL
    term uses its own local batch and the inner-solver gradients are averaged over ranks, so every rank
    takes the same step: the KL term is then the mean over ranks of the per-rank batch means. The KL
    forwards run ``model`` with ``torch.func.functional_call`` in eval mode (no dropout noise, BatchNorm
    running statistics, no buffer updates) and collect no statistics; the stored networks' outputs are
    computed once per step without autograd.

    Memory: ``n_cap`` copies of the trainable parameters, kept in one ``(n_cap, numel)`` buffer in the
    parameter dtype (``state["snapshots"]``, saved by ``state_dict``), on top of :class:`QKLDWRM`'s state.

    Args: as :class:`QKLDWRM`, plus ``n_inner`` (≥ 0; 0 gives exactly Q-KLD-WRM), ``inner_lr_ratio`` (ω > 0),
    ``n_cap`` (≥ 1) and ``kl_scale`` (≥ 0). Paper defaults: ρ = 0.5, n_inner = 10, ω = 0.07, n_cap = 4,
    kl_scale = 1/330.
    """

    _reads_predictive_outputs = True
    update_check = None  # its steps come from the inner solver: its plain steps check the gradients on their own

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.01,
        rho: float = 0.5,
        damping: float = 0.01,
        clip: Optional[float] = 2.0,
        weight_decay: float = 0.0,
        stat_freq: int = 30,
        inv_freq: int = 30,
        n_inner: int = 10,
        inner_lr_ratio: float = 0.07,
        n_cap: int = 4,
        kl_scale: float = 1 / 330,
        fisher: str = "sampled",
        predictive: str = "categorical",
        backend: str = "auto",
        kl_clip: Optional[float] = None,
        bias: str = "folded",
        eigenvalue_floor: float = 0.0,
        curvature_sum: str = "reweighted",
        max_step_rms: Optional[float] = 0.02,
        repeated_calls: str = "expand",
        predictive_module: Optional[nn.Module] = None,
        others: Optional[Callable] = None,
        others_kwargs: Optional[dict] = None,
        weight_sharing: str = "expand",
        max_factor_dim: Optional[int] = MAX_FACTOR_DIM,
        eigensolver: str = "exact",
        warm_iters: int = 1,
        warm_tol: float = WARM_TOL,
        full_every: Optional[int] = FULL_EVERY,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"QEKLDWRM needs the nn.Module itself (it evaluates it functionally), got {type(model).__name__}; "
                "pass the model itself, not model.parameters()"
            )
        _check(
            predictive_module is None,
            "Invalid predictive_module: QEKLDWRM measures its KL terms on the outputs of the model it is built from; "
            "build it from the module whose output the loss reads",
        )
        options = QEOptions(
            lr=lr, rho=rho, damping=damping, clip=clip, weight_decay=weight_decay, stat_freq=stat_freq,
            inv_freq=inv_freq, fisher=fisher, predictive=predictive, backend=backend, kl_clip=kl_clip, bias=bias,
            eigenvalue_floor=eigenvalue_floor, curvature_sum=curvature_sum, max_step_rms=max_step_rms,
            repeated_calls=repeated_calls, weight_sharing=weight_sharing,
            max_factor_dim=max_factor_dim, eigensolver=eigensolver, warm_iters=warm_iters,
            warm_tol=warm_tol, full_every=full_every, n_inner=n_inner,
            inner_lr_ratio=inner_lr_ratio, n_cap=n_cap, kl_scale=kl_scale,
        )  # fmt: skip
        self._start(model, options, predictive_module, others, others_kwargs)
        self.model = model
        self._network = distributed.unwrap(model)  # evaluated functionally, outside any (D)DP wrapper
        self._snapshot_params = self.curvature.parameters()
        names = {id(p): name for name, p in self._network.named_parameters(remove_duplicate=False)}
        self._names_by_id = names
        self._snapshot_names = [names[id(p)] for p in self._snapshot_params]
        self._inputs = None
        remember = weakref.WeakMethod(self._remember_inputs)  # the hook must not keep a dropped optimizer alive
        self._input_hook = model.register_forward_pre_hook(
            torch._dynamo.disable(lambda *args: remember()(*args)), with_kwargs=True
        )  # a closure, so that copy.deepcopy(model) does not deep-copy the optimizer
        weakref.finalize(self, self._input_hook.remove)

    def compiled_step(self, **compile_options):
        """Refused: QE's step differentiates the model inside it (the inner steps' ``torch.autograd.grad``), which
        ``torch.compile`` does not trace into one graph; its cost is those forward/backward passes, not the host
        time that compiling the plain step saves for :class:`QKLDWRM`."""
        raise NotImplementedError(
            "QEKLDWRM.compiled_step: QE's step runs autograd inside (its n_inner wake-sleep steps), which "
            "torch.compile cannot trace into one graph; call opt.step() (compiled_step is for KFAC, SOKLDWRM "
            "and QKLDWRM)"
        )

    def _remember_inputs(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if module is self.model and module.training and torch.is_grad_enabled():
            self._inputs = tree_map_only(Tensor, lambda t: t.detach(), (args, kwargs))

    def remove_hooks(self) -> None:
        super().remove_hooks()
        self._input_hook.remove()

    def _push_snapshot(self, k: int) -> None:
        """Store θ_k in slot ``k mod n_cap`` of the snapshot buffer."""
        flat = torch.cat([p.detach().reshape(-1) for p in self._snapshot_params])
        n_cap = self.param_groups[0]["n_cap"]
        ring = self.state[SNAPSHOTS]
        if "buffer" not in ring:
            ring["buffer"] = flat.new_zeros(n_cap, flat.numel())
            ring["steps"] = [-1] * n_cap
        ring["buffer"][k % n_cap].copy_(flat)
        ring["steps"][k % n_cap] = k

    def snapshots(self) -> list[tuple[int, list[Tensor]]]:
        """``(i, [parameter-shaped views of θ_i])`` for every stored iterate, oldest first."""
        ring = self.state[SNAPSHOTS]
        entries = []
        for slot in sorted(range(len(ring.get("steps", []))), key=lambda j: ring["steps"][j]):
            if ring["steps"][slot] < 0:
                continue
            row, views, offset = ring["buffer"][slot], [], 0
            for p in self._snapshot_params:
                views.append(row[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
            entries.append((ring["steps"][slot], views))
        return entries

    def wake_objective(
        self, grads: list[Tensor], lr: float, fresh: bool = True, blocks: Optional[list] = None
    ) -> WakeObjective:
        """Φ of the current step (requires the stored snapshot of θ_k and the recorded mini-batch) over ``blocks``
        (default: all), with ``grads`` aligned with them.

        ``B_k`` is the step's local curvature in the sense of eq. (20): the local factors on a step with new
        statistics (``fresh``), the unchanged averages ``Γ̄_q``, ``Ā_q`` on one without.
        """
        blocks = self.curvature.blocks if blocks is None else blocks
        group, k = self.param_groups[0], self.global_state["step"]
        rho = group["rho"]
        entries = self.snapshots()
        weights = [(1.0 / lr) * group["kl_scale"] * (1.0 if i == 0 else 1.0 - rho) * rho ** (k - i) for i, _ in entries]
        targets = stored_outputs(self._network, self._snapshot_names, [values for _, values in entries], self._inputs)
        keys = SIDES if fresh else tuple(average_key(side) for side in SIDES)
        factors = [(self.block_state(b)[keys[0]], self.block_state(b)[keys[1]]) for b in blocks]
        reduce = distributed.average_ if self.data_parallel.active else None
        return WakeObjective(
            self._network, blocks, self._names_by_id, grads, factors, targets, weights, self._inputs,
            self.predictive, reduce,
        )  # fmt: skip

    def _update(self, group, plan, grads):
        lr, blocks = plan.lr, plan.blocks
        if group["n_inner"] > 0 and self._inputs is None:
            raise RuntimeError(
                "QEKLDWRM.step() needs a train-mode forward call of the model with gradients enabled first"
            )
        steps = self._q_steps(group, plan, grads)
        self._push_snapshot(self.global_state["step"])
        if group["n_inner"] > 0 and lr > 0:  # with lr = 0 the step is zero whatever Φ is
            with evaluation_mode(self._network), self.curvature.paused():
                objective = self.wake_objective(grads, lr, plan.stats_due, blocks)
                steps = objective.minimise(steps, group["n_inner"], group["inner_lr_ratio"] * lr)
        self._inputs = None
        self._apply_clipped(group, blocks, steps, lr)

    def _follow_parameters(self) -> None:
        super()._follow_parameters()
        self._place_snapshots()

    def _place_snapshots(self) -> None:
        """Keep the snapshot buffer in the parameters' dtype and on their device (after loading or moving)."""
        ring = self.state[SNAPSHOTS]
        reference = self._snapshot_params[0]
        buffer = ring.get("buffer")
        if buffer is not None and (buffer.dtype != reference.dtype or buffer.device != reference.device):
            ring["buffer"] = buffer.to(device=reference.device, dtype=reference.dtype)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        buffer = self.state[SNAPSHOTS].get("buffer")
        numel = sum(p.numel() for p in self._snapshot_params)
        if buffer is not None and buffer.shape[1] != numel:
            raise ValueError(
                f"Invalid state_dict: its snapshots hold {buffer.shape[1]} parameters, this model has {numel}; was it "
                "saved from another model?"
            )
        self._place_snapshots()
