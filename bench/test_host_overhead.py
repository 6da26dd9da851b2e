"""Host-side cost of one plain optimizer step (no statistics, no eigendecomposition) on the paper's CNN.

    python -m pytest bench/test_host_overhead.py --benchmark-only

On a GPU, small models are launch-bound: SGD on the paper CNN takes 1.69 ms per iteration on an H200, so a
step that issues a few hundred operations costs as much as the whole iteration. This times ``opt.step()``
alone (host time until it returns, which on CUDA is the enqueueing; the numerics check's one device read
included) with a batch of two, where the arithmetic is negligible, and records in ``extra_info`` how many
ATen operations the step dispatches (``compute_ops``: kernels on a GPU; ``view_ops``: metadata only). The
``compiled`` cases time our optimizers' :meth:`compiled_step` (the plain step through ``torch.compile`` with
``fullgraph=True``; on CUDA with ``mode="reduce-overhead"``, replayed as a CUDA graph); their operation count is
not taken (the compiled graph runs fused kernels, not ATen operations one by one). ``kfac-bare`` is the floor
of a per-block step's dispatch (:class:`BarePlainStep`); ``kfac-bare-checked`` adds the numerics our step keeps.

Each case runs twice: after a forward and backward on a batch of two, and after one on the workload's training
batch (128 on a CPU, 512 on a GPU), as in a training loop: on the 2-core CPU every step takes longer there (the
training batch's passes leave the caches cold for the step's Python and dispatch).
"""

import pytest
import torch
import torch.nn.functional as F
from entries import BACKENDS, ENTRIES, make_step
from machine import DEVICE, FULL, environment, synchronize
from torch.utils._python_dispatch import TorchDispatchMode
from workloads import WORKLOADS

VIEW_OPS = {
    "alias", "as_strided", "detach", "expand", "permute", "reshape", "select", "slice", "squeeze", "t",
    "transpose", "unbind", "unsqueeze", "view", "_unsafe_view", "_reshape_alias",
}  # fmt: skip


class OpCounter(TorchDispatchMode):
    """Counts the ATen operations dispatched inside the ``with`` block."""

    def __init__(self):
        super().__init__()
        self.compute_ops = 0
        self.view_ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "aten":
            if func._opname in VIEW_OPS:
                self.view_ops += 1
            else:
                self.compute_ops += 1
        return func(*args, **(kwargs or {}))


COMPILED_BACKEND = "cuda" if "cuda" in BACKENDS else "torch"  # the eager steps around it use our kernels
COMPILED = [f"{name}-{COMPILED_BACKEND}" for name in ("kfac", "so", "q", "qexact")]


class BarePlainStep:
    """The least a per-block K-FAC plain step dispatches, written out by hand for the model's Linear and Conv2d
    layers (bias folded): per block a concatenation and ``Q_Γ ((Q_Γᵀ V Q_A) ⊙ R) Q_Aᵀ`` (four GEMMs and one
    multiply, with the transposes and the reciprocal ``R = 1/(d_Γ d_Aᵀ + δ)`` made beforehand); then the KL clip's
    inner product over all blocks at once, heavy-ball momentum on one flat buffer and one multi-tensor parameter
    update. No checks, no masking, no bookkeeping. Random orthogonal eigenvectors of the right shapes: the
    dispatch, not the values, is timed. The host-time floor of a per-block step on this machine.

    With ``checked``, also what our plain step promises beyond that (Note [numerics on the device]): the verdict
    taken from the inner product (non-finite whenever a gradient or direction entry is), a rejected step leaving
    parameters and momentum as they were, and the count of rejected steps on the device."""

    def __init__(
        self, model: torch.nn.Module, lr: float = 0.01, momentum: float = 0.9, kl_clip: float = 0.1,
        checked: bool = False,
    ):  # fmt: skip
        self.layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
        self.lr, self.momentum, self.kl_clip, self.checked = lr, momentum, kl_clip, checked
        self.skipped = torch.zeros((), dtype=torch.int64, device=DEVICE)
        self.blocks, sizes, self.params = [], [], []
        for layer in self.layers:
            n_out, n_in = layer.weight.shape[0], layer.weight[0].numel() + 1
            q_g = torch.linalg.qr(torch.randn(n_out, n_out, device=DEVICE))[0]
            q_a = torch.linalg.qr(torch.randn(n_in, n_in, device=DEVICE))[0]
            reciprocal = torch.rand(n_out, n_in, device=DEVICE) + 0.5
            self.blocks.append((q_g, q_g.T.contiguous(), q_a, q_a.T.contiguous(), reciprocal))
            sizes.append(n_out * n_in)
            self.params += [layer.weight, layer.bias]
        self.buffer = torch.zeros(sum(sizes), device=DEVICE)
        self.directions = torch.zeros(sum(sizes), device=DEVICE)
        self.gradients = torch.zeros(sum(sizes), device=DEVICE)
        self.updates, self.steps, self.out_views, self.grad_views = [], [], [], []
        for layer, part, d, g in zip(
            self.layers, self.buffer.split(sizes), self.directions.split(sizes), self.gradients.split(sizes)
        ):
            n_out, n_in = layer.weight.shape[0], layer.weight[0].numel() + 1
            matrix = part.view(n_out, n_in)
            self.updates += [matrix[:, :-1].unflatten(1, layer.weight.shape[1:]), matrix[:, -1]]
            direction = d.view(n_out, n_in)  # checked: the masked update is written over the directions
            self.steps += [direction[:, :-1].unflatten(1, layer.weight.shape[1:]), direction[:, -1]]
            self.out_views.append(direction)
            self.grad_views.append(g.view(n_out, n_in))

    @torch.no_grad()
    def step(self) -> None:
        for layer, (q_g, q_g_t, q_a, q_a_t, reciprocal), d, g in zip(
            self.layers, self.blocks, self.out_views, self.grad_views
        ):
            weight = layer.weight.grad.reshape(layer.weight.shape[0], -1)
            torch.cat([weight, layer.bias.grad.unsqueeze(1)], dim=1, out=g)
            torch.mm(torch.mm(q_g, torch.mm(torch.mm(q_g_t, g), q_a).mul_(reciprocal)), q_a_t, out=d)
        inner = torch.dot(self.directions, self.gradients)
        nu = torch.rsqrt(inner * (self.lr**2 / self.kl_clip)).clamp_(max=1.0)
        if not self.checked:
            self.buffer.mul_(self.momentum).add_(self.directions.mul_(nu))
            torch._foreach_add_(self.params, self.updates, alpha=-self.lr * (1.0 - self.momentum))
            return
        accepted = (inner - inner) == 0
        self.buffer.mul_(torch.where(accepted, self.momentum, 1.0)).add_(
            torch.where(accepted, self.directions.mul_(nu), 0.0)
        )
        torch.mul(self.buffer, torch.where(accepted, -self.lr * (1.0 - self.momentum), 0.0), out=self.directions)
        torch._foreach_add_(self.params, self.steps)
        self.skipped.add_(~accepted)


@pytest.mark.parametrize("batch", ["2", "training"])
@pytest.mark.parametrize(
    "entry", ENTRIES + [f"{entry}-compiled" for entry in COMPILED] + ["kfac-bare", "kfac-bare-checked"]
)
def test_plain_step_host_time(benchmark, entry, batch):
    compiled = entry.endswith("-compiled")
    entry = entry.removesuffix("-compiled")
    make, shape, training_batch = WORKLOADS["paper-cnn"][FULL]
    size = 2 if batch == "2" else training_batch
    torch.manual_seed(0)
    model = make().to(DEVICE)
    x = torch.randn(size, *shape, device=DEVICE)
    y = torch.randint(0, 10, (size,), device=DEVICE)
    if entry.startswith("kfac-bare"):
        opt = BarePlainStep(model, checked=entry.endswith("-checked"))
    else:
        opt, step = make_step(entry, model, x, y, (10**6, 10**6))  # statistics and decompositions at step 0 only
        for _ in range(3):
            step()

    def plain_gradients():
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        synchronize()

    plain_gradients()
    benchmark.group = f"plain step host time, paper-cnn, after a batch of {size}"
    benchmark.extra_info.update(environment())
    if compiled:
        torch._dynamo.reset()  # every case compiles afresh: the cases would share one recompile limit
        step = opt.compiled_step(**({"mode": "reduce-overhead"} if DEVICE.type == "cuda" else {}))
        for _ in range(3):  # compile (and record the graph) outside the timing
            plain_gradients()
            step()
        benchmark.pedantic(step, setup=plain_gradients, rounds=200, warmup_rounds=5)
        return
    counter = OpCounter()
    with counter:
        opt.step()
    benchmark.pedantic(opt.step, setup=plain_gradients, rounds=200, warmup_rounds=5)
    benchmark.extra_info["compute_ops"] = counter.compute_ops
    benchmark.extra_info["view_ops"] = counter.view_ops
