"""The models and habits users actually have (issue 20): attention, branches, freezing, schedules that touch
zero, extreme inputs, dtype moves, added parameter groups, shared weights, extra forwards, damping 0, resuming
with other settings, and copies of the optimizer."""

import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers.small_models import small_model as mlp
from torch import nn

from kldwrm_fast import KFAC, QEKLDWRM, QKLDWRM, SOKLDWRM
from kldwrm_fast.curvature.state import has_curvature

OPTIMIZERS = [KFAC, SOKLDWRM, QKLDWRM, QEKLDWRM]
CADENCES = [(1, 1), (1, 3), (2, 4)]


def batch(k=0, n=16, features=5, classes=3, dtype=torch.float32):
    gen = torch.Generator().manual_seed(k)
    return torch.randn(n, features, generator=gen).to(dtype), torch.randint(0, classes, (n,), generator=gen)


def train_step(opt, model, x, y, **forward):
    opt.zero_grad()
    F.cross_entropy(model(x, **forward), y).backward()
    opt.step()


def clones(model):
    return [p.detach().clone() for p in model.parameters()]


def finite(model):
    return all(torch.isfinite(p).all() for p in model.parameters())


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.encoder(x).mean(dim=1))


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_a_transformer_layer_preconditions_every_parameter(cls):
    model = Attention()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is left to plain gradient descent
        opt = cls(model, lr=0.05, stat_freq=1, inv_freq=2, **({"max_step_rms": None} if cls in (QKLDWRM, QEKLDWRM)
                                                                  else {}))  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 4, 8, generator=gen), torch.randint(0, 3, (6,), generator=gen)
    for _ in range(3):
        train_step(opt, model, x, y)
    assert finite(model)
    assert not opt.curvature.other_params
    assert all(has_curvature(opt.state[block.key]) for block in opt.curvature.blocks)
    names = {block.name for block in opt.curvature.blocks}
    assert {"encoder.self_attn.in_proj", "encoder.self_attn.out_proj", "encoder.norm1", "encoder.linear1"} <= names


def _old_weight_norm(module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm is deprecated, still used
        return torch.nn.utils.weight_norm(module)


@pytest.mark.parametrize(
    "wrap",
    [
        nn.utils.parametrizations.weight_norm,
        nn.utils.parametrizations.spectral_norm,
        _old_weight_norm,
        lambda m: nn.utils.parametrizations.weight_norm(m, name="bias", dim=None),
    ],
    ids=["weight_norm", "spectral_norm", "old_weight_norm", "bias_norm"],
)
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_a_layer_with_a_computed_weight_takes_gradient_descent_on_the_parameters_behind_it(cls, wrap):
    """A parametrized layer's weight is not a parameter (torch.optim refused it as a non-leaf tensor): the
    parameters behind it take plain gradient descent, named in the warning; the other layers are preconditioned."""
    torch.manual_seed(0)
    model = nn.Sequential(wrap(nn.Linear(5, 6)), nn.Tanh(), nn.Linear(6, 3))
    with pytest.warns(UserWarning, match=r"computed.*: 0\.") as caught:
        opt = cls(model, lr=0.05, stat_freq=1, inv_freq=2)
    assert "2.weight" not in str(caught[0].message)
    assert [block.name for block in opt.curvature.blocks] == ["2"]
    behind = [p for name, p in model.named_parameters() if name.startswith("0.")]
    before = [p.detach().clone() for p in behind]
    for k in range(3):
        train_step(opt, model, *batch(k))
    assert finite(model)
    assert all(not torch.equal(b, p) for b, p in zip(before, behind))


class Checkpointed(nn.Module):
    def __init__(self, reentrant=None):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.head = nn.Linear(8, 3)
        self.reentrant = reentrant  # None: no checkpointing

    def forward(self, x):
        if self.reentrant is None:
            return self.head(self.body(x))
        return self.head(torch.utils.checkpoint.checkpoint(self.body, x, use_reentrant=self.reentrant))


@pytest.mark.parametrize("fisher", ["sampled", "empirical"])
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_activation_checkpointing_without_reentry_gives_the_statistics_of_the_plain_model(cls, fisher):
    plain, checkpointed = Checkpointed(), Checkpointed(reentrant=False)
    optimizers = []
    for model in (plain, checkpointed):
        torch.manual_seed(2)
        optimizers.append(cls(model, lr=0.05, stat_freq=1, inv_freq=2, fisher=fisher))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for k in range(3):
            for model, opt in zip((plain, checkpointed), optimizers):
                train_step(opt, model, *batch(k))
    assert not [w for w in caught if "inside a backward" in str(w.message)]  # the recomputation is no fault
    for a, b in zip(*(opt.block_states() for opt in optimizers)):
        for key in ("A_ea", "G_ea"):  # QE's inner forwards go through the checkpoint: rounding differs
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fisher", ["sampled", "empirical"])
def test_reentrant_checkpointing_is_named_and_its_layers_take_gradient_descent(fisher):
    """Reentrant checkpointing runs the layers' forward without gradients and again inside the backward, where
    no statistics can be captured: with the training loss's gradients they had been counted as a second pass
    (Γ wrong by that factor, silently)."""
    model = Checkpointed(reentrant=True)
    opt = KFAC(model, lr=0.05, stat_freq=1, inv_freq=1, fisher=fisher)
    x, y = batch(0)
    with pytest.warns(UserWarning, match=r"layer 'body\.0' ran its forward inside a backward.*use_reentrant=False"):
        train_step(opt, model, x.requires_grad_(), y)
    curved = [block.name for block, state in zip(opt.curvature.blocks, opt.block_states()) if has_curvature(state)]
    assert curved == ["head"]


class TiedLanguageModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(12, 6)
        self.mix = nn.Linear(6, 6)
        self.out = nn.Linear(6, 12, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens):
        return self.out(torch.tanh(self.mix(self.embed(tokens))).mean(dim=1))


@pytest.mark.parametrize("bias", ["folded", "separate"])
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_a_weight_tied_to_an_embedding_is_named_in_a_warning(cls, bias):
    """The output layer's weight is also the embedding's table: its gradient has both uses, its curvature only the
    layer's, so the construction says so (and nothing for layers that use only their own parameters)."""
    model = TiedLanguageModel()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = cls(model, lr=0.05, stat_freq=1, inv_freq=2, bias=bias)
    tied = [str(w.message) for w in caught if "tied weights" in str(w.message)]
    assert len(tied) == 1 and "out (with embed, Embedding)" in tied[0] and "mix" not in tied[0]
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        tokens, y = torch.randint(0, 12, (8, 4), generator=gen), torch.randint(0, 12, (8,), generator=gen)
        train_step(opt, model, tokens, y)
    assert finite(model)


class Branches(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(5, 6)
        self.b1 = nn.Linear(6, 6)
        self.b2 = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x, branch=1):
        h = torch.tanh(self.stem(x))
        h = torch.tanh(self.b1(h) if branch == 1 else self.b2(h))
        return self.head(h)


@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("cadence", CADENCES)
def test_a_branch_skipped_in_a_forward_keeps_its_parameters_and_state(cls, cadence):
    model = Branches()
    opt = cls(model, lr=0.05, weight_decay=0.01, stat_freq=cadence[0], inv_freq=cadence[1])
    branches = [1, 1, 2, 1, 2, 2, 1, 2]
    for k, branch in enumerate(branches):
        skipped = model.b2 if branch == 1 else model.b1
        params = [skipped.weight.detach().clone(), skipped.bias.detach().clone()]
        state = copy.deepcopy(opt.state.get(skipped.weight, {}))
        train_step(opt, model, *batch(k, features=5), branch=branch)
        assert torch.equal(params[0], skipped.weight) and torch.equal(params[1], skipped.bias), k
        after = opt.state.get(skipped.weight, {})
        assert state.keys() == after.keys(), k
        for key, value in state.items():
            assert torch.equal(value, after[key]), (k, key)
    assert finite(model) and opt.global_state["step"] == len(branches)
    # b2 takes plain gradient descent until it runs on an inverse step, and has curvature from then on.
    joined = any(branch == 2 and k % cadence[1] == 0 for k, branch in enumerate(branches))
    assert ("QA" in opt.state[model.b2.weight]) == joined


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_a_layer_that_never_ran_on_an_inverse_step_takes_plain_gradient_descent_with_a_warning(cls):
    model = Branches()
    opt = cls(model, lr=0.05, stat_freq=1, inv_freq=3)
    train_step(opt, model, *batch(0), branch=1)
    x, y = batch(1)
    before = model.b2.weight.detach().clone()
    opt.zero_grad()
    F.cross_entropy(model(x, branch=2), y).backward()
    gradient = model.b2.weight.grad.clone()
    with pytest.warns(UserWarning, match="'b2'.*plain gradient descent"):
        opt.step()
    torch.testing.assert_close(model.b2.weight, before - 0.05 * gradient, rtol=0, atol=1e-7)
    train_step(opt, model, *batch(2), branch=2)
    train_step(opt, model, *batch(3), branch=2)  # an inverse step: b2 gets its curvature
    assert "QA" in opt.state[model.b2.weight]


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_freezing_a_layer_midway_freezes_it(cls):
    model = mlp()
    opt = cls(model, lr=0.05, weight_decay=0.1, stat_freq=1, inv_freq=2)
    for k in range(3):
        train_step(opt, model, *batch(k))
    model[0].requires_grad_(False)
    frozen = [model[0].weight.detach().clone(), model[0].bias.detach().clone()]
    for k in range(3, 7):
        train_step(opt, model, *batch(k))
    assert torch.equal(frozen[0], model[0].weight) and torch.equal(frozen[1], model[0].bias)
    assert finite(model)


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_a_step_without_any_gradient_moves_nothing(cls):
    model = mlp()
    opt = cls(model, lr=0.05, weight_decay=0.1, stat_freq=1, inv_freq=1)
    for k in range(2):
        train_step(opt, model, *batch(k))
    before = clones(model)
    opt.zero_grad()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_a_warm_up_from_zero_leaves_the_first_step_in_place_and_trains_after(cls):
    model = mlp()
    opt = cls(model, lr=0.05, stat_freq=1, inv_freq=2)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(k / 3, 1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", "Q.*steps are capped")  # Q's step cap at lr 0.05, said once
        before = clones(model)
        train_step(opt, model, *batch(0))
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        schedule.step()
        losses = []
        for k in range(1, 12):
            x, y = batch(k % 3)
            losses.append(F.cross_entropy(model(x), y).item())
            train_step(opt, model, x, y)
            schedule.step()
    assert finite(model) and losses[-1] < losses[0]


def test_a_zero_lr_is_accepted_at_construction():
    model = mlp()
    for cls in OPTIMIZERS:
        cls(model, lr=0.0).remove_hooks()
    with pytest.raises(ValueError, match="lr"):
        QKLDWRM(model, lr=-0.1)


@pytest.mark.parametrize("cls", [SOKLDWRM, QKLDWRM])
def test_the_recursion_restarts_across_a_zero_lr(cls):
    """λ_k/λ_{k−1} across a zero lr (on either side) is defined as 0: the step after equals the first step of an
    optimizer whose recursion starts there with the same curvature."""
    model = mlp(torch.float64)
    opt = cls(model, lr=0.05, stat_freq=1, inv_freq=1)
    for k, lr in enumerate([0.05, 0.05, 0.0]):
        opt.param_groups[0]["lr"] = lr
        train_step(opt, model, *batch(k, dtype=torch.float64))
    opt.param_groups[0]["lr"] = 0.05
    x, y = batch(3, dtype=torch.float64)
    twin_model = copy.deepcopy(model)
    twin = cls(twin_model, lr=0.05, stat_freq=1, inv_freq=1)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    twin.global_state["lr_prev"] = None  # a recursion that starts at this step
    train_step(opt, model, x, y)
    train_step(twin, twin_model, x, y)
    for a, b in zip(model.parameters(), twin_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_inputs_beyond_the_float32_factor_range_do_not_crash(cls):
    model = mlp()
    opt = cls(model, lr=0.05, stat_freq=1, inv_freq=1)
    x, y = batch(0)
    with pytest.warns(RuntimeWarning, match="identity"):
        train_step(opt, model, x * 1e20, y)
    assert finite(model)
    for k in range(1, 4):
        train_step(opt, model, *batch(k))
    assert finite(model)
    # The overflowed average restarted from zero: the layer has its curvature back.
    state = opt.block_states()[0]
    assert torch.isfinite(state["A_ea"]).all() and not torch.equal(state["QA"], torch.eye(6))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_qe_trains_half_precision_parameters(dtype):
    model = mlp(dtype)
    opt = QEKLDWRM(model, lr=0.05, stat_freq=1, inv_freq=2, n_inner=2)
    for k in range(3):
        train_step(opt, model, *batch(k, dtype=dtype))
    assert finite(model)


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_moving_the_model_to_float64_midway_moves_the_state(cls):
    model = mlp()
    opt = cls(model, lr=0.05, stat_freq=1, inv_freq=2)
    for k in range(3):
        train_step(opt, model, *batch(k))
    model.to(torch.float64)
    for k in range(3, 6):
        train_step(opt, model, *batch(k, dtype=torch.float64))
    assert finite(model)
    for state in opt.block_states():
        for key, value in state.items():
            if torch.is_tensor(value) and value.is_floating_point():
                assert value.dtype == torch.float64, key


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_parameters_added_with_add_param_group_take_gradient_descent_with_their_group(cls):
    model = mlp()
    opt = cls(model, lr=0.05, stat_freq=1, inv_freq=1)
    scale = nn.Parameter(torch.ones(3))
    with pytest.warns(UserWarning, match="add_param_group"):
        opt.add_param_group({"params": [scale], "lr": 0.5, "weight_decay": 0.1})
    x, y = batch(0)
    opt.zero_grad()
    F.cross_entropy(model(x) * scale, y).backward()
    expected = scale.detach() - 0.5 * (scale.grad + 0.1 * scale.detach())
    opt.step()
    torch.testing.assert_close(scale.detach(), expected, rtol=0, atol=1e-7)


class Tied(nn.Module):
    def __init__(self, share_bias=True):
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(6, 6)
        self.second = nn.Linear(6, 6)
        self.second.weight = self.first.weight
        if share_bias:
            self.second.bias = self.first.bias
        self.stem = nn.Linear(5, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.stem(x))
        return self.head(torch.tanh(self.second(torch.tanh(self.first(h)))))


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_layers_sharing_their_parameters_form_one_block_with_pooled_statistics(cls):
    model = Tied()
    opt = cls(model, lr=0.05, fisher="empirical", stat_freq=1, inv_freq=1)
    assert [block.name for block in opt.curvature.blocks] == ["first", "stem", "head"]
    params = [p for group in opt.param_groups for p in group["params"]]
    assert len(params) == len({id(p) for p in params}) == 6
    x, y = batch(0)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    block = opt.curvature.blocks[0]
    assert len(block.inputs) == len(block.output_grads) == 2  # both layers' statistics, pooled
    opt.step()
    assert finite(model)


def test_layers_sharing_only_their_weight_are_refused_with_one_line():
    with pytest.raises(ValueError, match="'first' and 'second' share their weight"):
        KFAC(Tied(share_bias=False))


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_an_extra_forward_without_backward_changes_no_statistics(cls):
    factors = []
    for extra in (False, True):
        model = mlp()
        opt = cls(model, lr=0.05, fisher="empirical", stat_freq=1, inv_freq=1)
        x, y = batch(0)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if extra:
            model(batch(1)[0]).argmax(dim=1)  # a training metric, computed in train mode
        opt.step()
        factors.append([s[key].clone() for s in opt.block_states() for key in ("A_ea", "G_ea")])
    for a, b in zip(*factors):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_damping_zero_on_a_singular_factor_skips_the_step_and_says_why(cls):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 7), nn.Tanh(), nn.Linear(7, 3))
    opt = cls(model, lr=0.05, damping=0.0, stat_freq=1, inv_freq=1)
    x, y = batch(0, n=4, features=12)  # 4 samples: the 13×13 input factor has rank 4
    before = clones(model)
    with pytest.warns(RuntimeWarning, match="damping"):
        train_step(opt, model, x, y)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert opt.skipped_steps == 1
    opt.param_groups[0]["damping"] = 1e-3
    for k in range(1, 4):
        train_step(opt, model, *batch(k, n=4, features=12))
    assert finite(model) and not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_the_loaded_cadence_governs_both_the_hooks_and_the_step(cls):
    model = mlp()
    opt = cls(model, lr=0.05, stat_freq=3, inv_freq=6)
    for k in range(3):
        train_step(opt, model, *batch(k))
    saved = copy.deepcopy(opt.state_dict())
    opt.remove_hooks()
    resumed = cls(model, lr=0.05, stat_freq=5, inv_freq=10)
    resumed.load_state_dict(saved)
    x, y = batch(3)
    resumed.zero_grad()
    F.cross_entropy(model(x), y).backward()
    assert all(block.has_statistics() for block in resumed.curvature.blocks)  # step 3 is a statistics step
    resumed.step()
    assert "A" in resumed.block_states()[0]


def test_the_state_dict_records_the_fisher_and_refuses_another_at_loading():
    model = mlp()
    opt = QEKLDWRM(model, fisher="empirical", predictive="categorical", backend="torch")
    saved = opt.state_dict()
    assert [saved["param_groups"][0][key] for key in ("fisher", "predictive", "backend", "n_inner")] == [
        "empirical", "categorical", "torch", 10,
    ]  # fmt: skip
    opt.remove_hooks()
    with pytest.raises(ValueError, match="saved with fisher='empirical', loading into fisher='sampled'"):
        QEKLDWRM(model).load_state_dict(copy.deepcopy(saved))
    resumed = QEKLDWRM(model, fisher="empirical")
    resumed.load_state_dict(copy.deepcopy(saved))
    assert resumed.param_groups[0]["backend"] == "auto"  # this machine's choice, not the checkpoint's


def test_a_categorical_model_with_one_output_column_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1))
    opt = SOKLDWRM(model)
    with pytest.raises(ValueError, match="at least two classes"):
        model(batch(0)[0])
    opt.remove_hooks()


def test_a_state_dict_of_another_shape_or_optimizer_is_refused_at_loading():
    wide = nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 3))
    opt = QKLDWRM(wide, stat_freq=1, inv_freq=1)
    train_step(opt, wide, *batch(0))
    saved = opt.state_dict()
    with pytest.raises(ValueError, match=r"'0'.*shape"):
        QKLDWRM(mlp(), stat_freq=1, inv_freq=1).load_state_dict(copy.deepcopy(saved))
    model = mlp()
    q = QKLDWRM(model, stat_freq=1, inv_freq=1)
    train_step(q, model, *batch(0))
    with pytest.raises(ValueError, match="saved by QKLDWRM.*KFAC"):
        KFAC(mlp()).load_state_dict(q.state_dict())


@pytest.mark.parametrize("copier", [copy.deepcopy, copy.copy, pickle.dumps])
def test_copying_or_pickling_the_optimizer_is_refused_with_a_pointer_to_state_dict(copier):
    opt = KFAC(mlp())
    with pytest.raises(TypeError, match="state_dict"):
        copier(opt)


@pytest.mark.gpu
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_moving_the_model_to_the_gpu_midway_moves_the_state_and_picks_the_backend_again(cls):
    model = mlp()
    opt = cls(model, lr=0.05, stat_freq=1, inv_freq=2)
    for k in range(3):
        train_step(opt, model, *batch(k))
    assert opt.backend == "torch"
    model.cuda()
    for k in range(3, 6):
        x, y = batch(k)
        train_step(opt, model, x.cuda(), y.cuda())
    assert finite(model) and opt.backend in ("cuda", "triton")
    for state in opt.block_states():
        assert all(value.is_cuda for value in state.values() if torch.is_tensor(value))


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_passing_parameters_instead_of_the_model_is_refused_with_one_line(cls):
    """The torch.optim habit: ``cls(model.parameters())``. The optimizer needs the layers to hook."""
    model = nn.Linear(3, 2)
    for wrong in (model.parameters(), list(model.parameters()), [{"params": list(model.parameters())}]):
        with pytest.raises(TypeError, match=r"nn.Module.*, got \w+; pass the model itself, not model\.parameters"):
            cls(wrong)


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_data_parallel_over_several_gpus_is_refused_with_one_line(cls):
    """nn.DataParallel replicates the layers at every forward; the hooks see only the originals. On one device (or
    none) it calls the model itself, which trains as usual."""
    wrapped = nn.DataParallel(mlp())  # no GPU here: device_ids is empty and the model is called directly
    opt = cls(wrapped, lr=0.05, stat_freq=1, inv_freq=1)
    train_step(opt, wrapped, *batch(0))
    assert all(has_curvature(state) for state in opt.block_states())
    several = nn.DataParallel(mlp())
    several.device_ids = [0, 1]  # as on a machine with two GPUs
    with pytest.raises(ValueError, match=r"^Invalid model: nn.DataParallel over 2 GPUs .*DistributedDataParallel"):
        cls(several)


@pytest.mark.parametrize("fisher", ["empirical", "sampled"])
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_two_losses_with_a_backward_each_give_the_statistics_of_their_sum(cls, fisher):
    """``loss1.backward(retain_graph=True); loss2.backward()`` leaves ``.grad`` as the summed loss's; the statistics
    follow. With the training loss's gradients each backward had been kept as a pair of its own (Γ differed,
    silently)."""
    results = []
    for split in (False, True):
        model = mlp()
        torch.manual_seed(2)
        opt = cls(model, lr=0.05, stat_freq=1, inv_freq=1, fisher=fisher)
        for k in range(2):
            x, y = batch(k)
            opt.zero_grad()
            out = model(x)
            first, second = F.cross_entropy(out, y), 0.1 * out.pow(2).mean()
            if split:
                first.backward(retain_graph=True)
                second.backward()
            else:
                (first + second).backward()
            opt.step()
        results.append((opt.block_states(), clones(model)))
    (whole, params), (split, split_params) = results
    for a, b in zip(whole, split):
        for key in ("A_ea", "G_ea"):
            torch.testing.assert_close(a[key], b[key])
    for a, b in zip(params, split_params):
        torch.testing.assert_close(a, b)


class ScaledLinear(nn.Linear):
    """Equalized learning rate (as in progressive GANs): the stored weight is scaled in the forward."""

    def forward(self, x):
        return F.linear(x, self.weight / self.in_features**0.5, self.bias)


class RenamedLinear(nn.Linear):
    """A subclass that computes what nn.Linear does."""


class ScaledConv(nn.Conv2d):
    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(x, 2.0 * weight, bias)


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_layers_whose_class_replaces_the_forward_are_named_in_a_warning(cls):
    """The curvature assumes y = W x̄ + b; a subclass that computes something else (a scaled weight) would be
    preconditioned with the wrong curvature, silently. A subclass that keeps the forward is not named."""
    torch.manual_seed(0)
    model = nn.Sequential(
        ScaledConv(1, 2, 3), nn.Flatten(), RenamedLinear(2 * 4 * 4, 6), nn.Tanh(), ScaledLinear(6, 3)
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = cls(model, lr=0.05, stat_freq=1, inv_freq=2)
    named = [str(w.message) for w in caught if "replaces its base class's forward" in str(w.message)]
    assert len(named) == 1 and "0 (ScaledConv)" in named[0] and "4 (ScaledLinear)" in named[0]
    assert "RenamedLinear" not in named[0]
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 1, 6, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)
    train_step(opt, model, x, y)
    assert finite(model)
