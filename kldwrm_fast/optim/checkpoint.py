"""``state_dict`` / ``load_state_dict`` of the optimizers, with the checks that make a wrong checkpoint fail at
loading, in one line, rather than later.

:class:`Checkpointing` is a mixin of :class:`~kldwrm_fast.optim.base.CurvatureOptimizer` placed before
``torch.optim.Optimizer`` in its bases.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kldwrm_fast.curvature.blocks import FactoredBlock
from kldwrm_fast.curvature.state import GLOBAL
from kldwrm_fast.optim import checkpoint_checks
from kldwrm_fast.optim.routing import OTHERS_KEY


def _block_shapes(block: FactoredBlock, rank) -> set[tuple[int, ...]]:
    """The shapes a block's state tensors may have: factors, eigenvalues, block-form matrices, a diagonal side's
    identity marker, and with ``rank`` a low-rank side's basis and eigenvalues."""
    n_out, n_in = block.shape
    shapes = {(n_in, n_in), (n_out, n_out), (n_out, n_in), (n_in,), (n_out,), (0,)}
    return shapes if rank is None else shapes | {(n_in, rank), (n_out, rank), (rank,)}


class Checkpointing:
    """Saving and loading (see the module docstring)."""

    fixed_options: tuple[str, ...] = (
        "fisher", "predictive", "bias", "repeated_calls", "weight_sharing", "max_factor_dim",
    )  # fmt: skip
    """Construction arguments (attributes of the optimizer, copied into its param groups) that a checkpoint must
    share: loading one saved with another value raises."""

    @staticmethod
    def _check_saved_shapes(saved_blocks: list, rank) -> None:
        """Raise one line when a saved block state does not fit this model's layer (a state_dict of another model);
        ``saved_blocks``: ``(block, its saved state)`` pairs; ``rank``: the saved group's."""
        for block, saved in saved_blocks:
            allowed = _block_shapes(block, rank)
            for key, value in saved.items():
                if isinstance(value, Tensor) and value.dim() > 0 and tuple(value.shape) not in allowed:
                    raise ValueError(
                        f"Invalid state_dict: {key!r} of layer {block.name!r} has shape {tuple(value.shape)}, which "
                        f"does not fit the layer's block (n_out, n_in) = {block.shape}; was it saved from another "
                        "model?"
                    )

    def state_dict(self) -> dict:
        """As ``torch.optim.Optimizer.state_dict``, with the curvature's own state (the Fisher sampler's generator).

        Under data parallelism every rank holds the same factors, decompositions and buffers, but its own sampler
        generator (seeded per rank), so this is a collective: every rank must call it; each gets every rank's
        sampler state under ``curvature["ranks"]``, and :meth:`load_state_dict` takes its own. One rank's copy is
        then the whole job's state."""
        state = super().state_dict()
        state["curvature"] = self.curvature.state_dict()
        if self.data_parallel.active:
            ranks: list = [None] * self.data_parallel.world_size
            torch.distributed.all_gather_object(ranks, state["curvature"], group=self.data_parallel.group)
            state["curvature"] = {"ranks": ranks}
        if self._others is not None:
            state[OTHERS_KEY] = self._others.optimizer.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`state_dict`; tensors keep their saved dtype and move to the parameters' device.

        (``torch.optim.Optimizer`` would cast state to the parameter dtype, which would turn the float32
        state of half-precision parameters into half precision.) A checkpoint that fails a check
        (:mod:`kldwrm_fast.optim.checkpoint_checks`, the shapes, the options it must share) raises one
        ``ValueError`` line, and whatever fails leaves the optimizer as it was before the call.
        """
        checkpoint_checks.check_structure(state_dict)
        kept = (self.state, self.param_groups, self.curvature.state_dict())
        others = None if self._others is None else (self._others.optimizer.state, self._others.optimizer.param_groups)
        try:
            self._load(state_dict)
        except BaseException:
            self.state, self.param_groups = kept[0], kept[1]
            self.curvature.load_state_dict(kept[2])
            if others is not None:
                self._others.optimizer.state, self._others.optimizer.param_groups = others
            self.estimator.attach(self.state, self.param_groups[0])
            raise

    def _load(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        saved_world = state_dict["state"].get(GLOBAL, {}).get("world_size", 1)
        if saved_world != self.data_parallel.world_size:
            raise ValueError(
                f"Invalid state_dict: saved with world size {saved_world}, loading into world size "
                f"{self.data_parallel.world_size}; resume with the same number of processes"
            )
        saved_by = state_dict["state"].get(GLOBAL, {}).get("optimizer", type(self).__name__)
        if saved_by != type(self).__name__:
            raise ValueError(
                f"Invalid state_dict: saved by {saved_by}, loading into {type(self).__name__}; load it into the "
                "optimizer class that saved it"
            )
        ours_by_key = {key: getattr(self, key) for key in self.fixed_options}
        for group in state_dict["param_groups"]:
            for key, ours in ours_by_key.items():
                if group.get(key, ours) != ours:
                    raise ValueError(
                        f"Invalid state_dict: saved with {key}={group[key]!r}, loading into {key}={ours!r}; build "
                        f"the optimizer with {key}={group[key]!r} to resume"
                    )
        others_state = state_dict.pop(OTHERS_KEY, None)
        if (others_state is None) != (self._others is None):
            saved = "with" if others_state is not None else "without"
            raise ValueError(
                f"Invalid state_dict: saved {saved} parameters routed to another optimizer (others=), loading into "
                f"an optimizer {'without' if self._others is None else 'with'} them; build it as it was saved"
            )
        current = {key: self.param_groups[0][key] for key in self.defaults}  # for options a checkpoint lacks
        curvature_state = state_dict.pop("curvature", {})
        if "ranks" in curvature_state:  # a data-parallel job's: this rank's sampler state
            curvature_state = curvature_state["ranks"][self.data_parallel.rank]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        saved_rank = state_dict["param_groups"][0].get("rank") if state_dict["param_groups"] else None
        saved_id_of = dict(zip((id(p) for p in params), saved_ids))
        saved_blocks = [(b, state_dict["state"].get(saved_id_of.get(id(b.key)), {})) for b in self.curvature.blocks]
        self._check_saved_shapes(saved_blocks, saved_rank)
        for block, saved in saved_blocks:
            checkpoint_checks.check_block_state(block.name, saved, block.dtype)
        checkpoint_checks.check_global(state_dict["state"], any(saved for _, saved in saved_blocks))
        super().load_state_dict(state_dict)
        if self._others is not None:
            # torch.optim made new group dicts: the routed optimizer's own take their places again (Note in routing).
            self._others.optimizer.load_state_dict(others_state)
            routed = len(self._others.groups)
            self.param_groups[1 : 1 + routed] = self._others.groups
        for group in self.own_groups():  # the backend is this machine's choice, not the checkpoint's
            for key, value in current.items():  # options a checkpoint of an earlier version lacks
                group.setdefault(key, value)
            group.update(ours_by_key)
            group.update(backend=self._requested_backend)
        for saved_id, param in zip(saved_ids, params):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if isinstance(value, Tensor):
                    self.state[param][key] = value.to(param.device, copy=True)
        # torch.optim keeps the saved dict of a non-parameter key itself: without a copy, steps would advance the
        # caller's state_dict (and every optimizer that loaded it) along with this one.
        self.state[GLOBAL] = {
            key: value.to(self.curvature.blocks[0].key.device, copy=True) if isinstance(value, Tensor) else value
            for key, value in self.state[GLOBAL].items()
        }
        self.curvature.load_state_dict(curvature_state)
        self.estimator.attach(self.state, self.param_groups[0])
        self._unmarked = True
