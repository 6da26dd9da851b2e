"""Exact resume, numerical faults, the Ĝ growth guard, accumulation and mixed precision (issue 9)."""

import copy
import pathlib
import subprocess
import sys
import warnings

import helpers.resume_worker as resume_worker
import pytest
import torch
import torch.nn.functional as F
from helpers.small_models import small_model
from torch import nn

from kldwrm_fast import KFAC, QEKLDWRM, QKLDWRM, SOKLDWRM
from kldwrm_fast.curvature import eigen
from kldwrm_fast.ops.backends import unavailable_reason

HERE = pathlib.Path(__file__).resolve().parent
OPTIMIZERS = [KFAC, SOKLDWRM, QKLDWRM, QEKLDWRM]


@pytest.mark.parametrize("name", ["KFAC", "SOKLDWRM", "QKLDWRM", "QEKLDWRM"])
@pytest.mark.parametrize("split", [3, 5])  # mid statistics cadence (stat_freq=2) and mid inverse cadence (4)
def test_resume_in_a_fresh_process_is_bit_identical(tmp_path, name, split):
    checkpoint = tmp_path / "ckpt.pt"
    straight = resume_worker.straight_run_saving_at(name, checkpoint, split, 9)
    script = HERE.parent / "helpers" / "resume_worker.py"
    subprocess.run([sys.executable, str(script), name, str(checkpoint), str(split), "9"], check=True, timeout=300)
    resumed = torch.load(str(checkpoint) + ".params")
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


def batch(k=0, dtype=torch.float32, n=16):
    gen = torch.Generator().manual_seed(k)
    return torch.randn(n, 5, generator=gen).to(dtype), torch.randint(0, 3, (n,), generator=gen)


def step(opt, model, x, y, scale=1.0):
    opt.zero_grad()
    (scale * F.cross_entropy(model(x), y)).backward()
    opt.step()


def snapshot(opt, model):
    """Deep copy of every parameter and every optimizer state entry."""
    index = {id(p): i for i, p in enumerate(model.parameters())}
    state = copy.deepcopy({index.get(id(k), k): v for k, v in opt.state.items()})
    return [p.detach().clone() for p in model.parameters()], state


def assert_same(first, second):
    for a, b in zip(first[0], second[0]):
        assert torch.equal(a, b)
    assert first[1].keys() == second[1].keys()
    for key in first[1]:
        for name, value in first[1][key].items():
            other = second[1][key][name]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_parameters_keep_float32_state_across_a_checkpoint(dtype):
    model = small_model(dtype)
    opt = QKLDWRM(model, lr=0.05, stat_freq=1, inv_freq=2)
    for k in range(3):
        step(opt, model, *batch(k, dtype))
    resumed = copy.deepcopy(model)
    opt2 = QKLDWRM(resumed, lr=0.05, stat_freq=1, inv_freq=2)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for original, loaded in zip(opt.block_states(), opt2.block_states()):
        assert original.keys() == loaded.keys()
        for key, value in original.items():
            assert loaded[key].dtype == torch.float32 and torch.equal(loaded[key], value), key
    for k in range(3, 6):
        step(opt, model, *batch(k, dtype))
        step(opt2, resumed, *batch(k, dtype))
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("where", ["gradient", "statistics"])
def test_non_finite_gradient_or_statistic_skips_the_step_and_training_continues(cls, where):
    model = small_model()
    opt = cls(model, lr=0.05, stat_freq=1, inv_freq=1)
    step(opt, model, *batch(0))
    before = snapshot(opt, model)
    x, y = batch(1)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    if where == "gradient":
        model[2].bias.grad[1] = float("nan")
    else:
        opt.curvature.blocks[0].inputs[0] = torch.full_like(x, float("inf"))
    with pytest.warns(RuntimeWarning, match="step skipped"):
        opt.step()
    assert opt.skipped_steps == 1
    assert_same(before, snapshot(opt, model))
    for k in range(2, 5):
        step(opt, model, *batch(k))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.global_state["step"] == 4


@pytest.mark.parametrize("cls", [KFAC, SOKLDWRM, QKLDWRM])
@pytest.mark.parametrize("values", [(float("-inf"),), (float("inf"), float("-inf")), (float("nan"), 1e30)])
@pytest.mark.parametrize("cadence", [1, 3], ids=["statistics step", "plain step"])
def test_every_kind_of_non_finite_gradient_skips_the_step(cls, values, cadence):
    """The checks sum each tensor (on the CPU, raw sums: an L1 norm per tensor was several times slower): a lone
    ``-inf``, ``+inf`` beside ``-inf`` in one tensor, and NaN are each caught, on statistics steps (a host check)
    and on plain steps (the verdict stays on the device; for KFAC and SO the KL clip's inner product alone, which
    sees every gradient here)."""
    model = small_model()
    opt = cls(model, lr=0.05, stat_freq=cadence, inv_freq=cadence)
    step(opt, model, *batch(0))  # step 1 next: a statistics step at cadence 1, a plain one at cadence 3
    before = snapshot(opt, model)
    opt.zero_grad()
    F.cross_entropy(model(batch(5)[0]), batch(5)[1]).backward()
    grad = model[0].weight.grad.view(-1)
    for i, value in enumerate(values):
        grad[i] = value
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step()
        assert opt.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before[0], snapshot(opt, model)[0]))


class ScaledNet(nn.Module):
    """Two Linear layers and a parameter outside them (plain gradient descent)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first, self.second = nn.Linear(5, 7), nn.Linear(7, 3)
        self.scale = nn.Parameter(torch.ones(7))

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)) * self.scale)


@pytest.mark.parametrize("cls", [KFAC, SOKLDWRM, QKLDWRM])
@pytest.mark.parametrize("where", ["outside the blocks", "an update check blind to it", "a block without curvature"])
def test_a_plain_step_checks_the_gradients_its_update_does_not_see(cls, where):
    """On a plain step KFAC and SO take the gradients' check from the KL clip's inner product, Q from its check of
    the steps, when every gradient goes into it; a gradient that does not (a parameter outside the Linear layers, a
    layer still without curvature), or a step whose update check is not known to see it (KFAC and SO without the
    KL clip, Q with the exact curvature sum), is checked on its own: a NaN there still skips the step."""
    outside = where == "outside the blocks"
    model = ScaledNet() if outside else small_model()
    first, second = (model.first, model.second) if outside else (model[0], model[2])
    blind = where == "an update check blind to it"
    options = (
        {"curvature_sum": "exact" if blind else "reweighted"} if cls is QKLDWRM else {"kl_clip": None if blind else 0.1}
    )
    opt = cls(model, lr=0.05, stat_freq=4, inv_freq=4, **options)
    frozen = where == "a block without curvature"
    second.requires_grad_(not frozen)  # frozen: it has no curvature at step 1
    step(opt, model, *batch(0))
    second.requires_grad_(True)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    F.cross_entropy(model(batch(1)[0]), batch(1)[1]).backward()
    (model.scale if outside else second.weight).grad[0] = float("nan")
    with pytest.warns(UserWarning, match="no curvature yet") if frozen else warnings.catch_warnings():
        opt.step()
    with pytest.warns(RuntimeWarning, match="skipped"):
        assert opt.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("cls", [KFAC, SOKLDWRM, QKLDWRM])
@pytest.mark.parametrize("clipped", [True, False], ids=["the clip's reduction", "separate check"])
def test_a_non_finite_update_on_a_plain_step_is_skipped(cls, clipped):
    """Damping 0 between inverse steps on a singular factor (4 samples, a 6×6 input factor): the plain step's
    update is not finite. With a clip, the reduction it takes is the check (the KL clip's inner product for
    KFAC and SO, the norms of Q's step clip); without, a pass over the update. Either way the step is skipped
    on the device: parameters (and KFAC's momentum) unchanged, and counted."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    clip = {"clip": 2.0 if clipped else None} if cls is QKLDWRM else {"kl_clip": 0.1 if clipped else None}
    opt = cls(model, lr=0.05, stat_freq=5, inv_freq=5, **clip)
    step(opt, model, *batch(0, n=4))
    opt.param_groups[0]["damping"] = 0.0
    before = snapshot(opt, model)
    with pytest.warns(RuntimeWarning, match="skipped"):
        step(opt, model, *batch(1, n=4))
        assert opt.skipped_steps == 1
    after = snapshot(opt, model)
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
    if cls is KFAC:
        for key, state in before[1].items():
            if isinstance(state, dict) and "momentum_buffer" in state:
                assert torch.equal(state["momentum_buffer"], after[1][key]["momentum_buffer"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_large_finite_gradients_are_not_taken_for_overflow(dtype):
    # Absolute sums beyond float16's 65504 (and, for float64, beyond float32's range per entry) are finite.
    model = small_model(dtype)
    opt = KFAC(model, lr=1e-12, kl_clip=None, stat_freq=1, inv_freq=1)
    x, y = batch(0, dtype)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    big = 60000.0 if dtype != torch.float64 else 1e300
    for param in model.parameters():
        param.grad.fill_(big)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert opt.skipped_steps == 0 and opt.global_state["step"] == 1


def test_a_deep_copy_of_the_model_does_not_feed_the_optimizer():
    model = small_model()
    opt = KFAC(model, fisher="empirical", stat_freq=1, inv_freq=1)
    twin = copy.deepcopy(model)  # carries the hooks along
    x, y = batch(0)
    F.cross_entropy(twin(x), y).backward()
    assert all(block.inputs == [] and block.output_grads == [] for block in opt.curvature.blocks)
    step(opt, model, x, y)
    assert opt.curvature.forward_passes() == 1


def test_failing_eigendecomposition_keeps_the_previous_one_and_training_continues(monkeypatch):
    model = small_model()
    opt = KFAC(model, lr=0.05, stat_freq=1, inv_freq=1)
    step(opt, model, *batch(0))
    kept = [(s["QA"], s["dA"]) for s in opt.block_states()]

    def failing(matrix):
        raise torch.linalg.LinAlgError("injected")

    monkeypatch.setattr(eigen, "_torch_eigh", failing)
    with pytest.warns(RuntimeWarning, match="keeping the previous one"):
        step(opt, model, *batch(1))
    for state, (q, d) in zip(opt.block_states(), kept):
        assert torch.equal(state["QA"], q) and torch.equal(state["dA"], d)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def run_shrinking_lr(limit, steps=100, stop_at_first_reset=False):
    """Adversarial for the recursion: lr halves every step and the damping dominates the curvature, so
    Ĝ − V − M ≈ Ĝ − V and the coefficient ρ λ_{k+1}/λ_k = 2ρ = 1.8 makes Ĝ grow geometrically."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = QKLDWRM(
        model, lr=0.1, rho=0.9, damping=1e3, fisher="empirical", predictive="gaussian", stat_freq=1, inv_freq=1000,
        max_step_rms=None,  # the recursion, not the step, is under test
    )
    opt.ghat_growth_limit = limit
    x, y = torch.randn(32, 4), torch.randn(32, 2)
    for k in range(steps):
        opt.param_groups[0]["lr"] = 0.1 * 0.5**k
        opt.zero_grad()
        (0.5 * (model(x) - y).pow(2).sum(1).mean()).backward()
        opt.step()
        if stop_at_first_reset and opt.ghat_resets:
            break
    return opt, model


def test_ghat_growth_guard_keeps_an_adversarial_recursion_finite():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unguarded, _ = run_shrinking_lr(None)
        guarded, model = run_shrinking_lr(100.0)
        assert guarded.ghat_resets > 0  # reading the count reports (warns about) the restarts
    state = unguarded.block_states()[0]
    assert state["g_hat"].norm() > 1e6 * state["v_prev"].norm()  # ~1.8^k growth (V_prev = V_k, either basis)
    assert torch.isfinite(guarded.block_states()[0]["g_hat"]).all()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.warns(RuntimeWarning, match="recursion restarted from V") as caught:
        run_shrinking_lr(100.0, stop_at_first_reset=True)
    assert "in the model's own Linear (" in str(caught[0].message)  # a block name, never an empty one


@pytest.mark.parametrize("cls", [KFAC, QKLDWRM])
def test_gradient_accumulation_equals_one_large_batch(cls):
    x, y = batch(0, torch.float64, n=24)
    big, small = small_model(torch.float64), small_model(torch.float64)
    opt_big = cls(big, lr=0.05, fisher="empirical", stat_freq=1, inv_freq=1)
    opt_small = cls(small, lr=0.05, fisher="empirical", stat_freq=1, inv_freq=1)
    for _ in range(3):
        step(opt_big, big, x, y)
        opt_small.zero_grad()
        for part in range(3):
            rows = slice(8 * part, 8 * part + 8)
            (F.cross_entropy(small(x[rows]), y[rows]) / 3).backward()
        opt_small.step()
    for key in ("A", "G", "A_ea", "G_ea"):
        for s_big, s_small in zip(opt_big.block_states(), opt_small.block_states()):
            torch.testing.assert_close(s_small[key], s_big[key], rtol=1e-12, atol=1e-14)
    for a, b in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_sampled_statistics_average_over_accumulated_passes():
    torch.manual_seed(5)
    layer = nn.Linear(3, 4).double()
    opt = KFAC(layer, stat_freq=1, inv_freq=1)
    x = torch.randn(40000, 3, dtype=torch.float64)
    outs = [layer(part) for part in x.chunk(2)]
    sum(o.sum() for o in outs).backward()
    opt.step()
    p = torch.softmax(torch.cat([o.detach() for o in outs]), 1)
    expected = torch.diag(p.mean(0)) - p.T @ p / len(p)
    torch.testing.assert_close(opt.state[layer.weight]["G"], expected, rtol=0, atol=0.03)


@pytest.mark.parametrize("cls", [KFAC, QKLDWRM])
def test_grad_scaler_with_empirical_statistics_equals_the_unscaled_run(cls):
    plain, scaled = small_model(), small_model()
    opt_plain = cls(plain, lr=0.05, fisher="empirical", stat_freq=1, inv_freq=1)
    opt_scaled = cls(scaled, lr=0.05, fisher="empirical", stat_freq=1, inv_freq=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000)
    for k in range(4):
        x, y = batch(k)
        step(opt_plain, plain, x, y)
        opt_scaled.zero_grad()
        scaler.scale(F.cross_entropy(scaled(x), y)).backward()
        scaler.step(opt_scaled)
        scaler.update()
    for a, b in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for s_plain, s_scaled in zip(opt_plain.block_states(), opt_scaled.block_states()):
        torch.testing.assert_close(s_scaled["G"], s_plain["G"], rtol=1e-6, atol=1e-8)


def test_grad_scaler_overflow_skips_the_step():
    model = small_model()
    opt = QKLDWRM(model, lr=0.05, stat_freq=1, inv_freq=1)
    step(opt, model, *batch(0))
    before = snapshot(opt, model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    x, y = batch(1)
    opt.zero_grad()
    scaler.scale(F.cross_entropy(model(x), y) * 1e10).backward()
    with pytest.warns(RuntimeWarning, match="step skipped"):
        scaler.step(opt)
    scaler.update()
    assert opt.skipped_steps == 1 and scaler.get_scale() < 2.0**127
    assert_same(before, snapshot(opt, model))


def test_empirical_statistics_after_manual_unscale_are_refused():
    model = small_model()
    opt = KFAC(model, fisher="empirical", stat_freq=1, inv_freq=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    x, y = batch(0)
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="unscale_"):
        scaler.step(opt)


def test_autocast_bfloat16_activations_give_float32_factors_and_train_like_float32():
    x, y = batch(0, n=64)
    finals = {}
    for autocast in (False, True):
        model = small_model()
        opt = QKLDWRM(model, lr=0.2, stat_freq=1, inv_freq=2)
        for _ in range(40):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
        finals[autocast] = F.cross_entropy(model(x), y).item()
        for state in opt.block_states():
            assert state["A"].dtype == torch.float32 and state["G"].dtype == torch.float32
    start = F.cross_entropy(small_model()(x), y).item()
    assert finals[True] < 0.8 * start
    assert abs(finals[True] - finals[False]) < 0.1 * finals[False]


@pytest.mark.gpu
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_a_cpu_checkpoint_loads_onto_a_cuda_model_and_continues(cls):
    model = small_model()
    opt = cls(model, lr=0.05, stat_freq=1, inv_freq=2)
    for k in range(3):
        step(opt, model, *batch(k))
    saved = copy.deepcopy(opt.state_dict())
    cuda_model = copy.deepcopy(model).cuda()
    cuda_opt = cls(cuda_model, lr=0.05, stat_freq=1, inv_freq=2, backend="torch")
    cuda_opt.load_state_dict(saved)
    assert all(t.is_cuda for s in cuda_opt.block_states() for t in s.values() if torch.is_tensor(t))
    for k in range(3, 5):
        step(opt, model, *batch(k))
        x, y = batch(k)
        step(cuda_opt, cuda_model, x.cuda(), y.cuda())
    for a, b in zip(model.parameters(), cuda_model.parameters()):
        torch.testing.assert_close(a, b.cpu(), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("cls", [KFAC, SOKLDWRM, QKLDWRM])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_a_lone_non_finite_gradient_on_a_gpu_plain_step_is_caught_by_the_update_check(cls, backend, value):
    """On a plain step the check of the update is the only check of the gradients (KFAC's and SO's KL clip inner
    product, the norms of Q's step clip): it relies on ``P(v)`` (cuBLAS, or our kernels) carrying a non-finite
    entry of ``v`` into every entry."""
    reason = unavailable_reason(backend, torch.device("cuda"))
    if reason is not None:
        pytest.skip(reason)
    model = small_model().cuda()
    opt = cls(model, lr=0.05, stat_freq=4, inv_freq=4, backend=backend)
    x, y = batch(0)
    step(opt, model, x.cuda(), y.cuda())
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batch(1)
    opt.zero_grad()
    F.cross_entropy(model(x.cuda()), y.cuda()).backward()
    model[2].weight.grad[1, 3] = value
    opt.step()
    with pytest.warns(RuntimeWarning, match="skipped"):
        assert opt.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


class _HostSyncError(AssertionError):
    pass


@pytest.mark.parametrize("cls", [KFAC, SOKLDWRM, QKLDWRM, QEKLDWRM])
def test_steps_between_inverse_steps_never_read_device_values_on_the_host(cls, monkeypatch):
    """With ``check_numerics=False`` a step that decomposes nothing (statistics due or not) reads no tensor
    value on the host: on a GPU it queues its work without waiting. Every Python-level way to read a value
    (bool, item, tolist, float/int conversion, nonzero) is made to raise."""
    model = small_model()
    extra = dict(n_inner=2) if cls is QEKLDWRM else {}
    opt = cls(model, lr=0.05, stat_freq=2, inv_freq=100, **extra)
    opt.check_numerics = False
    step(opt, model, *batch(0))  # the first step decomposes (and syncs)

    def forbidden(*args, **kwargs):
        raise _HostSyncError("a step read a tensor value on the host")

    for name in ("__bool__", "item", "tolist", "__float__", "__int__", "__index__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for k in (1, 2, 3):  # steps 1 and 3 take no statistics, step 2 does
        step(opt, model, *batch(k))
    monkeypatch.undo()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("cls", [KFAC, SOKLDWRM, QKLDWRM, QEKLDWRM])
def test_plain_steps_check_numerics_on_the_device_without_reading_a_value(cls, monkeypatch):
    """With the default ``check_numerics`` a plain step (no statistics, no decomposition) decides on the device:
    NaN gradients leave the parameters and KFAC's momentum as they were, zero the recursions of SO and Q (they
    restart), and are counted and reported at the next step that synchronises."""
    model = small_model()
    extra = dict(n_inner=2) if cls is QEKLDWRM else {}
    opt = cls(model, lr=0.05, stat_freq=4, inv_freq=4, **extra)
    step(opt, model, *batch(0))
    step(opt, model, *batch(1))
    before = snapshot(opt, model)

    def forbidden(*args, **kwargs):
        raise _HostSyncError("a plain step read a tensor value on the host")

    x, y = batch(2)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    model[2].bias.grad[1] = float("nan")
    names = ("__bool__", "item", "tolist", "__float__", "__int__", "__index__", "nonzero")
    for name in names:
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    opt.step()
    monkeypatch.undo()
    after = snapshot(opt, model)
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))  # no parameter moved
    if cls is KFAC:
        assert all(torch.equal(before[1][i]["momentum_buffer"], after[1][i]["momentum_buffer"]) for i in (0, 2))
    elif cls is SOKLDWRM:
        assert all((s["v_prev"] == 0).all() for s in opt.block_states())  # the recursion restarts
    for name in names:
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    step(opt, model, *batch(3))  # a plain step after the rejected one
    monkeypatch.undo()
    assert opt.global_state["step"] == 4
    if cls in (QKLDWRM, QEKLDWRM):  # restarted from V: Ĝ_3 = V_3, in the basis the recursion is carried in
        assert all(torch.equal(s["g_hat"], s["v_prev"]) for s in opt.block_states())
        assert opt.ghat_resets == 0  # that restart is the skip's, not the growth guard's
    with pytest.warns(RuntimeWarning, match=r"1 step\(s\) between statistics steps had NaN or Inf"):
        assert opt.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_without_the_growth_guard_a_rejected_plain_step_zeroes_q_s_recursion():
    model = small_model()
    opt = QKLDWRM(model, lr=0.05, stat_freq=4, inv_freq=4)
    opt.ghat_growth_limit = None
    step(opt, model, *batch(0))
    x, y = batch(1)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    model[0].weight.grad[0, 0] = float("nan")
    opt.step()
    assert all((s[key] == 0).all() for s in opt.block_states() for key in ("g_hat", "v_prev", "m"))
    step(opt, model, *batch(2))
    assert all(torch.equal(s["g_hat"], s["v_prev"]) for s in opt.block_states())


@pytest.mark.parametrize("cls", [KFAC, SOKLDWRM, QKLDWRM])
def test_a_rejected_plain_step_moves_no_parameter(cls):
    model = small_model()
    opt = cls(model, lr=0.05, stat_freq=4, inv_freq=4)
    step(opt, model, *batch(0))
    x, y = batch(1)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    model[0].weight.grad[0, 0] = float("inf")
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("cls", [QKLDWRM, QEKLDWRM])
def test_a_resume_right_after_a_rejected_plain_step_restarts_as_the_run_does(cls):
    extra = dict(n_inner=2) if cls is QEKLDWRM else {}
    model = small_model()
    opt = cls(model, lr=0.05, stat_freq=4, inv_freq=4, **extra)
    for k in range(2):
        step(opt, model, *batch(k))
    x, y = batch(2)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    model[2].bias.grad[1] = float("nan")  # one block's gradient: every block restarts all the same
    opt.step()
    twin_model = copy.deepcopy(model)
    twin = cls(twin_model, lr=0.05, stat_freq=4, inv_freq=4, **extra)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    for k in range(3, 6):
        step(opt, model, *batch(k))
        step(twin, twin_model, *batch(k))
    for a, b in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(a, b)
