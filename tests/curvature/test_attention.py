"""``nn.MultiheadAttention``'s projections as curvature blocks (Note [attention projections] in
:mod:`kldwrm_fast.curvature.attention`): a model with the module and the same model written with explicit
``nn.Linear`` projections and ``F.scaled_dot_product_attention`` (same weights) take the same steps."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kldwrm_fast import KFAC, QEKLDWRM, QKLDWRM, SOKLDWRM

OPTIMIZERS = [KFAC, SOKLDWRM, QKLDWRM, QEKLDWRM]
E, HEADS, T, B = 8, 2, 5, 4


class WithAttention(nn.Module):
    def __init__(self, batch_first, dropout=0.0, kdim=None, vdim=None):
        super().__init__()
        torch.manual_seed(0)
        self.batch_first = batch_first
        self.embed = nn.Linear(3, E)
        self.attention = nn.MultiheadAttention(E, HEADS, dropout=dropout, batch_first=batch_first, kdim=kdim,
                                               vdim=vdim)  # fmt: skip
        with torch.no_grad():  # a non-zero bias, so that a mix-up of its rows would show
            for name, p in self.attention.named_parameters():
                if "bias" in name:
                    p.uniform_(-0.3, 0.3)
        self.head = nn.Linear(E, 2)
        self.double()

    def forward(self, x, key=None, value=None, **masks):
        h = torch.tanh(self.embed(x))
        key = h if key is None else key
        value = h if value is None else value
        a, _ = self.attention(h, key, value, **masks)
        return self.head(a.mean(1 if self.batch_first else 0))


class Unrolled(nn.Module):
    """:class:`WithAttention` written out: the packed projection as one ``nn.Linear(E, 3E)`` (separate weights
    without bias, and the packed bias a bare parameter, for ``kdim``/``vdim``), the out projection an ``nn.Linear``,
    attention by ``F.scaled_dot_product_attention``."""

    def __init__(self, twin: WithAttention):
        super().__init__()
        self.batch_first, attention = twin.batch_first, twin.attention
        self.embed = nn.Linear(3, E)
        self.embed.load_state_dict(twin.embed.state_dict())
        self.dropout = attention.dropout
        self.packed = attention._qkv_same_embed_dim
        if self.packed:
            self.qkv = nn.Linear(E, 3 * E)
            self.qkv.weight.data.copy_(attention.in_proj_weight)
            self.qkv.bias.data.copy_(attention.in_proj_bias)
        else:
            self.q = nn.Linear(E, E, bias=False)
            self.k = nn.Linear(attention.kdim, E, bias=False)
            self.v = nn.Linear(attention.vdim, E, bias=False)
            for layer, side in ((self.q, "q"), (self.k, "k"), (self.v, "v")):
                layer.weight.data.copy_(getattr(attention, f"{side}_proj_weight"))
            self.in_bias = nn.Parameter(attention.in_proj_bias.detach().clone())
        self.out = nn.Linear(E, E)
        self.out.load_state_dict(attention.out_proj.state_dict())
        self.head = nn.Linear(E, 2)
        self.head.load_state_dict(twin.head.state_dict())

    def forward(self, x, key=None, value=None, key_padding_mask=None, attn_mask=None, need_weights=True,
                is_causal=False):  # fmt: skip
        h = torch.tanh(self.embed(x))
        key = h if key is None else key
        value = h if value is None else value
        if not self.batch_first:
            h, key, value = (t.transpose(0, 1) for t in (h, key, value))
        if self.packed:
            q, k, v = self.qkv(h).chunk(3, dim=-1)
        else:
            bq, bk, bv = self.in_bias.chunk(3)
            q, k, v = self.q(h) + bq, self.k(key) + bk, self.v(value) + bv
        split = [t.unflatten(-1, (HEADS, E // HEADS)).transpose(1, 2) for t in (q, k, v)]
        allowed = torch.ones(h.shape[0], 1, q.shape[1], k.shape[1], dtype=torch.bool)
        if key_padding_mask is not None:
            allowed = allowed & ~key_padding_mask[:, None, None, :]
        if attn_mask is not None:
            allowed = allowed & ~attn_mask
        dropout = self.dropout if self.training else 0.0
        o = F.scaled_dot_product_attention(*split, attn_mask=allowed, dropout_p=dropout)
        a = self.out(o.transpose(1, 2).flatten(2))
        return self.head(a.mean(1))


def masks(kind):
    if kind == "none":
        return {}
    if kind == "padding":
        padding = torch.zeros(B, T, dtype=torch.bool)
        padding[0, -2:] = padding[2, -1] = True
        return {"key_padding_mask": padding, "need_weights": False}
    causal = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    return {"attn_mask": causal, "is_causal": True}


def data(k, batch_first, kdim=None, vdim=None):
    gen = torch.Generator().manual_seed(10 + k)
    shape = (B, T, 3) if batch_first else (T, B, 3)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    extra = {}
    if kdim is not None:
        key_shape = (B, T + 1) if batch_first else (T + 1, B)
        extra = {"key": torch.randn(*key_shape, kdim, generator=gen, dtype=torch.float64),
                 "value": torch.randn(*key_shape, vdim, generator=gen, dtype=torch.float64)}  # fmt: skip
    return x, extra, torch.randint(0, 2, (B,), generator=gen)


def options(cls, cadence):
    chosen = dict(lr=0.05, stat_freq=cadence[0], inv_freq=cadence[1], fisher="empirical", weight_decay=1e-3)
    if cls in (QKLDWRM, QEKLDWRM):
        chosen.update(max_step_rms=None)
    if cls is QEKLDWRM:
        chosen.update(n_inner=2)
    return chosen


def trajectory(cls, model, cadence, mask, batch_first, steps=5, kdim=None, vdim=None, seed=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = cls(model, **options(cls, cadence))
    for k in range(steps):
        x, extra, y = data(k, batch_first, kdim, vdim)
        if seed is not None:
            torch.manual_seed(seed + k)
        opt.zero_grad()
        F.cross_entropy(model(x, **extra, **masks(mask)), y).backward()
        opt.step()
    return opt


def parameters_of(model):
    if isinstance(model, WithAttention):
        a = model.attention
        if a._qkv_same_embed_dim:
            inner = [a.in_proj_weight, a.in_proj_bias]
        else:
            inner = [a.q_proj_weight, a.k_proj_weight, a.v_proj_weight, a.in_proj_bias]
        return [model.embed.weight, model.embed.bias, *inner, a.out_proj.weight, a.out_proj.bias, model.head.weight,
                model.head.bias]  # fmt: skip
    inner = [model.qkv.weight, model.qkv.bias] if model.packed else [model.q.weight, model.k.weight, model.v.weight,
                                                                     model.in_bias]  # fmt: skip
    return [model.embed.weight, model.embed.bias, *inner, model.out.weight, model.out.bias, model.head.weight,
            model.head.bias]  # fmt: skip


def assert_same(ours, theirs):
    for a, b in zip(parameters_of(ours), parameters_of(theirs), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mask", ["none", "padding", "causal"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("cadence", [(1, 1), (2, 4)])
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_attention_takes_the_steps_of_its_unrolled_form(cls, cadence, batch_first, mask):
    ours = WithAttention(batch_first)
    theirs = Unrolled(ours).double()
    opt = trajectory(cls, ours, cadence, mask, batch_first)
    trajectory(cls, theirs, cadence, mask, batch_first)
    names = [block.name for block in opt.curvature.blocks]
    assert names == ["embed", "attention.in_proj", "attention.out_proj", "head"] and not opt.curvature.other_params
    assert_same(ours, theirs)
    assert not torch.equal(ours.attention.in_proj_weight, WithAttention(batch_first).attention.in_proj_weight)


@pytest.mark.parametrize("cls", [KFAC, QKLDWRM])
def test_attention_with_dropout_takes_the_steps_of_its_unrolled_form(cls):
    ours = WithAttention(True, dropout=0.2)
    theirs = Unrolled(ours).double()
    trajectory(cls, ours, (1, 1), "padding", True, seed=7)
    trajectory(cls, theirs, (1, 1), "padding", True, seed=7)
    assert_same(ours, theirs)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("cls", [KFAC, QKLDWRM])
def test_separate_kdim_vdim_projections_take_the_steps_of_their_unrolled_form(cls, batch_first):
    ours = WithAttention(batch_first, kdim=5, vdim=6)
    theirs = Unrolled(ours).double()
    opt = trajectory(cls, ours, (1, 2), "none", batch_first, kdim=5, vdim=6)
    trajectory(cls, theirs, (1, 2), "none", batch_first, kdim=5, vdim=6)
    names = [block.name for block in opt.curvature.blocks]
    assert names == ["embed", "attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.out_proj", "head"]
    assert [name for name, _ in opt.curvature.other_params] == ["attention.in_proj_bias"]
    assert_same(ours, theirs)


@pytest.mark.parametrize("mode", ["expand", "reduce"])
def test_the_projections_see_batch_first_rows_for_weight_sharing(mode):
    ours = WithAttention(False)
    theirs = Unrolled(ours).double()
    for model in (ours, theirs):
        opt = KFAC(model, lr=0.05, stat_freq=1, inv_freq=1, fisher="empirical", weight_sharing=mode)
        x, _, y = data(0, False)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        model.factors = [opt.state[block.key]["A"] for block in opt.curvature.blocks]
    for a, b in zip(ours.factors, theirs.factors):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_cross_attention_with_a_packed_weight_takes_plain_gradient_descent_with_its_reason():
    model = WithAttention(True)
    opt = KFAC(model, lr=0.05, stat_freq=1, inv_freq=1)
    x, _, y = data(0, True)
    memory = torch.randn(B, T + 2, E, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"attention.in_proj' ran with a query other than its key"):
        F.cross_entropy(model(x, key=memory, value=memory), y).backward()
        opt.step()
    states = {block.name: opt.state[block.key] for block in opt.curvature.blocks}
    assert "QA" not in states["attention.in_proj"] and "QA" in states["attention.out_proj"]


def test_eval_mode_and_steps_without_statistics_leave_f_linear_alone():
    model = WithAttention(True)
    opt = KFAC(model, stat_freq=2, inv_freq=2)  # noqa: F841 (held: a dropped optimizer removes its hooks)
    original, seen = F.linear, []
    # runs after the optimizer's own pre-hook, inside the attention's forward
    model.attention.register_forward_pre_hook(lambda module, args: seen.append(F.linear is original))
    x, _, _ = data(0, True)
    model.eval()
    with torch.no_grad():
        model(x)
    model.train()
    model(x)  # step 0: statistics are due
    assert seen == [True, False] and F.linear is original


def test_the_sampled_fisher_reaches_the_projections_and_leaves_grad_alone():
    model = WithAttention(True)
    twin = WithAttention(True)
    opt = KFAC(model, lr=0.05, stat_freq=1, inv_freq=1)
    x, _, y = data(0, True)
    F.cross_entropy(model(x), y).backward()
    F.cross_entropy(twin(x), y).backward()
    assert torch.equal(model.attention.in_proj_weight.grad, twin.attention.in_proj_weight.grad)
    opt.step()
    assert all("QA" in opt.state[block.key] for block in opt.curvature.blocks)


class Branchy(nn.Module):
    """A frozen embedding, self-attention, and a LayerNorm used only when asked."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(9, E)
        self.embed.weight.requires_grad_(False)
        self.attention = nn.MultiheadAttention(E, HEADS, batch_first=True)
        self.norm = nn.LayerNorm(E)
        self.head = nn.Linear(E, 2)

    def forward(self, tokens, with_norm):
        h = self.embed(tokens)
        h = h + self.attention(h, h, h, need_weights=False)[0]
        return self.head((self.norm(h) if with_norm else h).mean(1))


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_new_block_kinds_that_are_frozen_or_see_no_data_stay_as_they_are(cls):
    model = Branchy()
    opt = cls(model, lr=0.05, stat_freq=1, inv_freq=2)
    assert [block.name for block in opt.curvature.blocks] == ["attention.in_proj", "attention.out_proj", "norm",
                                                               "head"]  # fmt: skip
    frozen = model.embed.weight.detach().clone()
    for k in range(6):
        gen = torch.Generator().manual_seed(k)
        tokens, y = torch.randint(0, 9, (4, 5), generator=gen), torch.randint(0, 2, (4,), generator=gen)
        with_norm = k % 3 == 0
        norm_before = [p.detach().clone() for p in model.norm.parameters()]
        opt.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            F.cross_entropy(model(tokens, with_norm), y).backward()
            opt.step()
        moved = not all(torch.equal(a, b) for a, b in zip(norm_before, model.norm.parameters()))
        assert moved == with_norm, k
    assert torch.equal(model.embed.weight, frozen)
    assert all(torch.isfinite(p).all() for p in model.parameters())
