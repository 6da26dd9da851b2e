"""Diagonal factor sides (docs/algorithms.md §1, "diagonal sides"): an embedding's input side, and any side wider
than ``max_factor_dim``, are kept as vectors; every optimizer's step with them equals its step with the dense
factor replaced by the diagonal matrix of the same entries, and equals an explicit dense solve."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kldwrm_fast import KFAC, QEKLDWRM, QKLDWRM, SOKLDWRM
from kldwrm_fast.curvature.blocks import FactoredBlock
from kldwrm_fast.ops import reference

OPTIMIZERS = [KFAC, SOKLDWRM, QKLDWRM, QEKLDWRM]
CADENCES = [(1, 1), (2, 4)]


class TokenModel(nn.Module):
    """An embedding (padding row 0) feeding two Linear layers with a LayerNorm between, in float64."""

    def __init__(self, vocabulary=11, width=4, length=3, hidden=9, classes=3):
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Embedding(vocabulary, width, padding_idx=0)
        self.hidden = nn.Linear(width * length, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, classes)
        self.double()

    def forward(self, tokens):
        return self.head(self.norm(torch.tanh(self.hidden(self.embedding(tokens).flatten(1)))))


def batch(k, vocabulary=11, length=3, size=6):
    gen = torch.Generator().manual_seed(100 + k)
    tokens = torch.randint(0, vocabulary, (size, length), generator=gen)
    return tokens, torch.randint(0, 3, (size,), generator=gen)


def options(cls, cadence, **extra):
    stat_freq, inv_freq = cadence
    chosen = dict(lr=0.05, stat_freq=stat_freq, inv_freq=inv_freq, fisher="empirical", weight_decay=1e-3)
    if cls in (QKLDWRM, QEKLDWRM):
        chosen.update(max_step_rms=None)
    if cls is QEKLDWRM:
        chosen.update(n_inner=2)
    return {**chosen, **extra}


def train(model, opt, steps=6):
    for k in range(steps):
        tokens, labels = batch(k)
        opt.zero_grad()
        F.cross_entropy(model(tokens), labels).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def diagonal_matrix_fold(sides):
    """``FactoredBlock._fold`` with the sides ``sides[block name]`` folded as the dense diagonal matrix of their
    entries: the oracle for the vector form."""

    def fold(self, state, ops, side, x, scale, rho, reweight):
        if side in sides[self.name]:
            local = torch.diag(reference.diagonal_local(x, scale, self.dtype))
            return self.fold_local(state, side, local, rho, reweight)
        return original_fold(self, state, ops, side, x, scale, rho, reweight)

    return fold


original_fold = FactoredBlock._fold


VARIANTS = [(cls, {}) for cls in OPTIMIZERS] + [(QKLDWRM, {"curvature_sum": "exact"})]


@pytest.mark.parametrize("cadence", CADENCES)
@pytest.mark.parametrize("cls,extra", VARIANTS, ids=["KFAC", "SO", "Q", "QE", "Q-exact"])
def test_the_vector_form_takes_the_steps_of_the_diagonal_matrix_form(monkeypatch, cls, extra, cadence):
    model = TokenModel()
    opt = cls(model, **options(cls, cadence, max_factor_dim=8, **extra))
    diagonal = {block.name: block.diagonal for block in opt.curvature.blocks}
    assert diagonal == {"embedding": ("A",), "hidden": ("A", "G"), "norm": ("A",), "head": ("A",)}  # 11; 13, 9; 10
    ours = train(model, opt)
    assert all(opt.state[b.key]["A_ea"].dim() == 1 for b in opt.curvature.blocks)

    monkeypatch.setattr(FactoredBlock, "_fold", diagonal_matrix_fold(diagonal))
    dense_model = TokenModel()
    dense_opt = cls(dense_model, **options(cls, cadence, max_factor_dim=None, **extra))
    for block in dense_opt.curvature.blocks:
        block.diagonal = ()  # the embedding's and the norm's input sides too: diagonal matrices, for the oracle
    theirs = train(dense_model, dense_opt)
    assert all(dense_opt.state[b.key]["A_ea"].dim() == 2 for b in dense_opt.curvature.blocks)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert not torch.equal(ours[0], TokenModel().embedding.weight.detach())


def test_the_embedding_factors_equal_their_definitions_from_one_hot_rows():
    model = TokenModel()
    opt = KFAC(model, lr=0.0, stat_freq=1, inv_freq=1, fisher="empirical", rho=0.5)
    tokens, labels = batch(0)
    output = model.embedding(tokens)
    captured = []
    output.register_hook(captured.append)
    loss = F.cross_entropy(model.head(torch.tanh(model.hidden(output.flatten(1)))), labels)
    loss.backward()
    opt.step()
    state = opt.state[model.embedding.weight]
    rows = F.one_hot(tokens.reshape(-1), 11).double()
    e = captured[0].reshape(-1, 4)
    assert state["A"].shape == (11,)
    torch.testing.assert_close(torch.diag(state["A"]), rows.T @ rows / rows.shape[0], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(state["G"], rows.shape[0] * e.T @ e, rtol=1e-12, atol=1e-15)
    assert state["QA"].numel() == 0 and state["QG"].shape == (4, 4)


def test_the_embedding_update_equals_the_dense_solve_with_a_diagonal_input_factor():
    model = TokenModel()
    damping, lr = 0.1, 0.5
    opt = KFAC(model, lr=lr, damping=damping, momentum=0.0, kl_clip=None, stat_freq=1, inv_freq=1, rho=0.0,
               fisher="empirical")  # fmt: skip
    before = model.embedding.weight.detach().clone()
    tokens, labels = batch(0)
    F.cross_entropy(model(tokens), labels).backward()
    v = model.embedding.weight.grad.T.clone()  # block form: (embedding_dim, num_embeddings)
    v[:, 0] = 0.0
    opt.step()
    state = opt.state[model.embedding.weight]
    fisher = torch.kron(state["G"], torch.diag(state["A"]))  # row-major vec: (Γ ⊗ A) vec(V) = vec(Γ V A)
    solved = torch.linalg.solve(fisher + damping * torch.eye(fisher.shape[0], dtype=fisher.dtype), v.reshape(-1))
    expected = before - lr * solved.reshape(v.shape).T
    torch.testing.assert_close(model.embedding.weight.detach(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cadence", CADENCES)
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_the_padding_row_never_moves(cls, cadence):
    model = TokenModel()
    with torch.no_grad():
        model.embedding.weight[0] = 0.5  # (nn.Embedding starts it at zero, where weight decay adds nothing)
    padding = model.embedding.weight.detach()[0].clone()
    opt = cls(model, **options(cls, cadence, weight_decay=0.1))
    train(model, opt)
    assert torch.equal(model.embedding.weight.detach()[0], padding)
    assert not torch.equal(model.embedding.weight.detach()[1:], TokenModel().embedding.weight.detach()[1:])


@pytest.mark.parametrize("setting", ["sparse", "scale_grad_by_freq"])
def test_embedding_settings_the_curvature_cannot_describe_are_refused_in_one_line(setting):
    model = nn.Sequential(nn.Embedding(5, 3, **{setting: True}), nn.Flatten(), nn.Linear(6, 2))
    with pytest.raises(ValueError, match=rf"^Invalid model: embedding '0' has {setting}=True \(.*\); build it with "):
        KFAC(model)


@pytest.mark.parametrize("head_first", [False, True])
def test_a_tied_embedding_and_head_keep_the_heads_block_and_name_the_embedding(head_first):
    embedding, head = nn.Embedding(7, 4), nn.Linear(4, 7)
    head.weight = embedding.weight
    model = nn.ModuleDict({"head": head, "embedding": embedding} if head_first else {"embedding": embedding,
                                                                                      "head": head})  # fmt: skip
    with pytest.warns(UserWarning, match=r"tied weights.*: head \(with embedding, Embedding\)"):
        opt = KFAC(model)
    assert [(block.name, type(block.module).__name__) for block in opt.curvature.blocks] == [("head", "Linear")]
    assert opt.curvature.blocks[0].params == [head.weight, head.bias]


@pytest.mark.parametrize("value", [0, 2.5, "wide"])
def test_an_invalid_max_factor_dim_is_refused_in_one_line(value):
    with pytest.raises(ValueError, match=rf"^Invalid max_factor_dim: {value!r}; expected an integer >= 1 or None$"):
        KFAC(TokenModel(), max_factor_dim=value)


@pytest.mark.parametrize("cls", [KFAC, QKLDWRM])
def test_a_32000_token_embedding_and_head_train_without_a_vocabulary_sized_matrix(cls):
    vocabulary, width = 32_000, 32
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(vocabulary, width), nn.Linear(width, vocabulary))
    opt = cls(model, lr=0.05, stat_freq=1, inv_freq=2)
    tokens = torch.randint(0, vocabulary, (4, 8))
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    sides = {block.name: block.diagonal for block in opt.curvature.blocks}
    assert sides == {"0": ("A",), "1": ("G",)}
    usage = opt.memory_usage()
    largest = max(t.numel() for state in opt.state.values() for t in state.values() if isinstance(t, torch.Tensor))
    assert largest == vocabulary * (width + 1)  # block-form matrices; no factor of vocabulary² entries
    assert usage["total"] < 64 * 2**20


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_a_resumed_run_with_diagonal_sides_continues_bit_for_bit(cls, tmp_path):
    def run(model, opt, steps):
        for k in steps:
            tokens, labels = batch(k)
            opt.zero_grad()
            F.cross_entropy(model(tokens), labels).backward()
            opt.step()

    model = TokenModel()
    opt = cls(model, **options(cls, (1, 2), max_factor_dim=8))
    run(model, opt, range(3))
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "saved.pt")
    run(model, opt, range(3, 7))
    saved = torch.load(tmp_path / "saved.pt", weights_only=False)
    resumed = TokenModel()
    resumed.load_state_dict(saved["model"])
    resumed_opt = cls(resumed, **options(cls, (1, 2), max_factor_dim=8))
    resumed_opt.load_state_dict(saved["opt"])
    run(resumed, resumed_opt, range(3, 7))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))
    with pytest.raises(ValueError, match="saved with max_factor_dim=8, loading into max_factor_dim=4096"):
        cls(TokenModel(), **options(cls, (1, 2))).load_state_dict(saved["opt"])
