"""The plain step compiles into one graph (``torch.compile(..., fullgraph=True)``) and computes what eager does."""

import copy
import functools
import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kldwrm_fast import KFAC, QEKLDWRM, QKLDWRM, SOKLDWRM
from kldwrm_fast.ops.library import REFERENCE_OPS
from kldwrm_fast.ops.operations import Operations

QEXACT = functools.partial(QKLDWRM, curvature_sum="exact")


def twins():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)) for _ in range(20)]
    return model, copy.deepcopy(model), batches


def build(cls, model, **extra):
    torch.manual_seed(2)  # the sampled Fisher's generator is seeded from the global one
    return cls(model, lr=0.05, stat_freq=5, inv_freq=10, **extra)


def side_by_side(
    cls, device="cpu", lr_at=None, ops=None, damping_at=None, steps=20, configure=None, prepare=None, edit=None,
    step_of=None, check=None, **compile_options,
):  # fmt: skip
    """Train the twins, one with ``step()``, the other with ``compiled_step(**compile_options)`` (or the step function
    ``step_of(optimizer)`` gives); ``(model, twin, eager optimizer, the other)``. Before step i: ``lr_at(i)`` and
    ``damping_at(i)`` set both optimizers' lr and damping, ``prepare(i, net)`` may change each net; after each
    net's backward ``edit(i, net)`` may change its gradients; after the steps ``check(i, twin)`` runs.
    ``configure(optimizer)`` and ``ops`` adjust both optimizers. Warnings of skipped steps and restarts are not
    shown."""
    torch._dynamo.reset()
    model, twin, batches = twins()
    model, twin = model.to(device), twin.to(device)
    eager, compiled_opt = build(cls, model), build(cls, twin)
    if ops is not None:
        eager._ops = compiled_opt._ops = ops
    if configure is not None:
        configure(eager), configure(compiled_opt)
    step = step_of(compiled_opt) if step_of else compiled_opt.compiled_step(**compile_options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for i, (x, y) in enumerate(batches[:steps]):
            for net, opt in ((model, eager), (twin, compiled_opt)):
                if lr_at is not None:
                    opt.param_groups[0]["lr"] = lr_at(i)
                if damping_at is not None:
                    opt.param_groups[0]["damping"] = damping_at(i)
                if prepare is not None:
                    prepare(i, net)
                opt.zero_grad()
                F.cross_entropy(net(x.to(device, net[0].weight.dtype)), y.to(device)).backward()
                if edit is not None:
                    edit(i, net)
            eager.step()
            step()
            if check is not None:
                check(i, twin)
    assert compiled_opt.global_state["step"] == eager.global_state["step"] > 0
    return model, twin, eager, compiled_opt


@pytest.mark.parametrize("cls", [KFAC, SOKLDWRM, QKLDWRM])
def test_compiled_plain_steps_follow_eager_over_twenty_steps(cls):
    model, twin, *_ = side_by_side(cls)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_plain_step_traces_without_a_graph_break():
    model, _, batches = twins()
    opt = build(QKLDWRM, model, clip=2.0, kl_clip=0.1)
    for x, y in batches[:2]:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    opt.zero_grad()
    F.cross_entropy(model(batches[2][0]), batches[2][1]).backward()
    opt._known_plain = True  # as compiled_step sets it around the traced step (others run eagerly when traced)
    explained = torch._dynamo.explain(opt.step)()
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


def cuda_graph_recordings() -> int:
    """How many CUDA graphs inductor's graph trees have recorded on the current device (every recording is kept)."""
    from torch._inductor.cudagraph_trees import get_manager

    manager = get_manager(torch.cuda.current_device(), create_if_none_exists=False)

    def count(groups):
        return sum(1 + count(node.children.values()) for nodes in groups for node in nodes)

    return 0 if manager is None else count(manager.roots.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("cls", [KFAC, SOKLDWRM, QKLDWRM])
def test_reduce_overhead_replays_plain_steps_as_cuda_graphs_and_follows_eager(cls, cuda_graph_verdicts):
    """Equal steps alone would not show it: inductor falls back to running the compiled step without a CUDA graph
    (counted in ``cudagraph_skips``) when the step mutates an input whose address it does not take as static, such
    as a state tensor or a counter updated in place; and it records a graph again, keeping the old recording,
    when a static input's address changes (a state tensor replaced at a statistics or inverse step). So: no
    skip, and no more recordings than compiled graphs, over 20 steps with statistics and inverse steps."""
    torch._dynamo.utils.counters.clear()
    model, twin, *_ = side_by_side(cls, "cuda", mode="reduce-overhead")
    assert torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] == 0, dict(torch._dynamo.utils.counters)
    assert cuda_graph_verdicts == [None] * len(cuda_graph_verdicts)
    assert 0 < cuda_graph_recordings() <= len(cuda_graph_verdicts)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.fixture
def cuda_graph_verdicts(monkeypatch):
    """Each graph inductor compiles records inductor's own verdict on replaying it as a CUDA graph given its input
    mutations (``check_for_mutation_ignore_cuda_graph_managed_tensor``: None, or why it would run without one).
    Inductor reaches that check only for graphs on a GPU; the inputs it reads are known on any device. The FX
    graph cache is off, so that every graph is compiled here."""
    from torch._inductor import config, cudagraph_utils, output_code

    verdicts = []
    init = output_code.CompiledFxGraph.__init__
    signature = inspect.signature(init)

    def recording_init(graph, *args, **kwargs):
        init(graph, *args, **kwargs)
        bound = signature.bind(graph, *args, **kwargs).arguments
        verdicts.append(
            cudagraph_utils.check_for_mutation_ignore_cuda_graph_managed_tensor(
                bound["gm"], graph.mutated_inputs, graph.mutated_input_idxs, bound["static_input_idxs"]
            )
        )

    monkeypatch.setattr(output_code.CompiledFxGraph, "__init__", recording_init)
    with config.patch(fx_graph_cache=False):
        yield verdicts


@pytest.mark.parametrize("cls", [KFAC, SOKLDWRM, QKLDWRM, QEXACT])
def test_reduce_overhead_plain_steps_qualify_for_cuda_graphs(cls, cuda_graph_verdicts):
    """The compiled plain step mutates parameters, state (momentum buffers, Q's recursion) and counters in place;
    inductor replays a graph as a CUDA graph only when every mutated input is a static address. Without the
    optimizer marking its state (torch does so only for optimizers with an ``_init_group``), every graph here
    failed the check: KFAC's momentum buffers and the skipped-step counter were mutated non-static inputs."""
    model, twin, *_ = side_by_side(cls, mode="reduce-overhead")
    verdicts = cuda_graph_verdicts
    assert verdicts and verdicts == [None] * len(verdicts), verdicts
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def state_addresses(opt) -> dict:
    """The storage address of every state tensor and counter a plain step reads (all but the local factors
    ``A``, ``G``, which only statistics steps and QE use), keyed by (state index, key) or counter name."""
    addresses = {
        (index, key): value.data_ptr()
        for index, state in enumerate(opt.state.values())
        for key, value in state.items()
        if isinstance(value, torch.Tensor) and key not in ("A", "G")
    }
    for name in ("_skipped_device", "_ghat_reset_counts"):
        if getattr(opt, name, None) is not None:
            addresses[name] = getattr(opt, name).data_ptr()
    return addresses


@pytest.mark.parametrize("cls", [KFAC, SOKLDWRM, QKLDWRM, QEXACT])
@pytest.mark.parametrize("cadence", [(5, 10), (1, 4)])
def test_state_keeps_its_storage_across_statistics_and_inverse_steps(cls, cadence):
    """A CUDA graph reads its static inputs at the addresses it was recorded with; where a state tensor is
    replaced, torch records the graph again and keeps every earlier recording. So after the first steps every
    state tensor and counter a plain step reads stays where it is, through statistics and inverse steps (the
    local factors ``A``, ``G`` alone are new at each statistics step: no plain step reads them)."""
    stat_freq, inv_freq = cadence
    addresses = {}

    def configure(opt):
        opt.param_groups[0].update(stat_freq=stat_freq, inv_freq=inv_freq)

    def check(i, twin):
        now = state_addresses(optimizers[0])
        if i == 1:
            addresses.update(now)
        elif i > 1:
            assert now == addresses, (i, {k for k in now.keys() | addresses.keys() if now.get(k) != addresses.get(k)})

    optimizers = []

    def step_of(opt):
        optimizers.append(opt)
        return opt.compiled_step()

    side_by_side(cls, configure=configure, check=check, step_of=step_of)
    assert addresses


@pytest.mark.parametrize("cls", [KFAC, SOKLDWRM, QKLDWRM])
def test_a_state_dict_loaded_between_compiled_steps_keeps_them_exact_and_qualifying(cls, cuda_graph_verdicts):
    """``load_state_dict`` replaces every state tensor: the compiled steps after it follow eager, every graph still
    qualifies for a CUDA graph, and the loaded tensors then keep their storage through statistics and inverse
    steps."""
    optimizers, addresses = [], {}

    def step_of(opt):
        optimizers.append(opt)
        return opt.compiled_step(mode="reduce-overhead")

    def prepare(i, net):
        if i == 8 and optimizers[0].param_groups[0]["params"][0] is net[0].weight:  # between plain steps
            optimizers[0].load_state_dict(copy.deepcopy(optimizers[0].state_dict()))

    def check(i, twin):
        now = state_addresses(optimizers[0])
        if i == 8:
            addresses.update(now)
        elif i > 8:
            assert now == addresses, i

    model, twin, *_ = side_by_side(cls, prepare=prepare, check=check, step_of=step_of)
    assert addresses and cuda_graph_verdicts and cuda_graph_verdicts == [None] * len(cuda_graph_verdicts)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [KFAC, SOKLDWRM, QKLDWRM])
def test_a_learning_rate_schedule_follows_eager_without_recompiling(cls, tmp_path, monkeypatch):
    """lr is read from the param group at every step: a decaying lr must reach the compiled step without a
    recompile per value (a float inside a multi-tensor op, or an ``alpha``, is specialised), also when the second
    compilation could load the first one's graphs from torch's on-disk caches (with torch 2.14 a graph from
    AOTAutograd's cache ignored the changing lr: compiled_step does not use that cache)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    for _ in range(2):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            model, twin, *_ = side_by_side(cls, lr_at=lambda i: 0.05 * 0.9**i)
        assert not [w for w in record if "recompile limit" in str(w.message)]
        for a, b in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [KFAC, SOKLDWRM, QKLDWRM])
@pytest.mark.parametrize("schedule", ["lr", "damping"])
def test_schedules_do_not_recompile_with_registered_ops(cls, schedule):
    """The GPU backends' fused operations are ``torch.library`` custom ops, whose float arguments the compiler
    specialises: one that changes between steps (damping, or Q's recursion coefficient, which follows lr) would
    recompile the step at every value, and past the limit the plain steps would run eagerly. The reference
    operations, registered the same way (``kldwrm_fast::<op>``, which run on a CPU), stand in for them here."""
    registered = Operations("registered", REFERENCE_OPS)
    value_at = (lambda i: 0.05 * 0.9**i) if schedule == "lr" else (lambda i: 0.01 * (1 + i))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model, twin, *_ = side_by_side(cls, **{f"{schedule}_at": value_at}, ops=registered)
    assert not [w for w in record if "recompile limit" in str(w.message)]
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_past_the_recompile_limit_plain_steps_run_eagerly_with_one_warning():
    torch._dynamo.reset()
    model, twin, batches = twins()
    eager, compiled_opt = build(QKLDWRM, model), build(QKLDWRM, twin)
    step = compiled_opt.compiled_step()
    limit = torch._dynamo.config.patch(recompile_limit=1)  # monkeypatch's undo breaks this config entry
    with limit, pytest.warns(RuntimeWarning, match="recompile limit") as record:
        for x, y in batches:  # the step counter's first change recompiles: over a limit of one
            for net, opt in ((model, eager), (twin, compiled_opt)):
                opt.zero_grad()
                F.cross_entropy(net(x), y).backward()
            eager.step()
            step()
    assert sum("recompile limit" in str(w.message) for w in record) == 1
    assert compiled_opt.global_state["step"] == eager.global_state["step"] == len(batches)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_compiled_plain_step_does_not_depend_on_the_cadence(tmp_path, monkeypatch):
    """The cadence test stays out of the graph. Traced, ``k % stat_freq != 0`` became a guard; a run at another
    cadence that loaded the graph from torch's on-disk caches took that guard along, and it failed at that run's
    plain steps where ``k`` is a multiple of the first run's ``stat_freq`` (a recompile each time)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    compiles = []
    for stat_freq, inv_freq in ((10, 20), (30, 30)):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        model, _, batches = twins()
        opt = KFAC(model, lr=0.05, stat_freq=stat_freq, inv_freq=inv_freq)
        step = opt.compiled_step()
        for x, y in batches + batches[:9]:  # 29 steps: at the second cadence 10 and 20 are plain
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            step()
        compiles.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert compiles == [2, 2]  # the first plain step's counter is specialised, the next one's is symbolic


def poison(steps, value=float("nan")):
    """An ``edit`` for :func:`side_by_side`: one gradient entry set to ``value`` at the given steps."""

    def edit(i, net):
        if i in steps:
            net[2].weight.grad[1, 2] = value

    return edit


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("cls", [KFAC, SOKLDWRM, QKLDWRM])
def test_a_compiled_plain_step_with_a_non_finite_gradient_is_skipped_as_eagerly(cls, bad):
    """The compiled step decides the numerics check on the device with its own reductions (not ``_foreach_norm``):
    a NaN or Inf gradient entry leaves the parameters as they were, is counted, and both twins go on alike."""
    before = {}

    def check(i, twin):
        if i == 3:  # a plain step (statistics every 5 steps)
            assert all(torch.equal(p, q) for p, q in zip(twin.parameters(), before["params"]))
        before["params"] = [p.detach().clone() for p in twin.parameters()]

    model, twin, eager, compiled_opt = side_by_side(cls, steps=8, edit=poison({3}, bad), check=check)
    assert eager.skipped_steps == compiled_opt.skipped_steps == 1
    if cls is QKLDWRM:
        assert eager.ghat_resets == compiled_opt.ghat_resets
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compiled_plain_steps_count_recursion_restarts_as_eagerly():
    """Q's growth guard counts restarts on the device; compiled plain steps count them too."""

    def configure(opt):
        opt.ghat_growth_limit = 1.0  # Ĝ exceeds ‖V‖ often: restarts happen

    _, _, eager, compiled_opt = side_by_side(QKLDWRM, steps=10, configure=configure)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert compiled_opt.ghat_resets == eager.ghat_resets > 0


@pytest.mark.parametrize("cls", [KFAC, QKLDWRM])
def test_compiled_plain_steps_follow_eager_after_the_model_changes_dtype(cls):
    """The state follows the parameters before the traced step, once: traced, the change of layout was never
    recorded (the step drops assignments to the optimizer's attributes), so every plain step compiled anew."""
    torch._dynamo.utils.counters.clear()

    def prepare(i, net):
        if i == 3:  # between plain steps
            net.double()

    model, twin, _, compiled_opt = side_by_side(cls, steps=9, prepare=prepare)
    assert all(s.dtype == torch.float64 for s in compiled_opt.state[twin[0].weight].values() if torch.is_tensor(s))
    usual = 2 if cls is KFAC else 3  # Q's state gains keys over its first steps
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= usual + 1  # one more for float64
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_qe_refuses_compiled_step_in_one_line():
    model, _, _ = twins()
    with pytest.raises(NotImplementedError, match=r"^QEKLDWRM.compiled_step: .*call opt.step\(\)"):
        QEKLDWRM(model).compiled_step()


@pytest.mark.parametrize("cls", [KFAC, SOKLDWRM, QKLDWRM])
def test_a_users_torch_compile_of_the_step_runs_it_eagerly_and_counts_skipped_steps(cls):
    """``torch.compile(opt.step)`` (or a compiled training step around it) reaches step() in a trace: it runs eagerly
    at a graph break. Traced, a NaN gradient's skipped step went uncounted (the count is an attribute)."""
    model, twin, eager, traced = side_by_side(
        cls, steps=8, edit=poison({3, 5}), step_of=lambda opt: torch.compile(opt.step)
    )  # a plain step and a statistics step
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert eager.skipped_steps == traced.skipped_steps == 2
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [None, float("nan")])
@pytest.mark.parametrize("cls", [KFAC, SOKLDWRM, QKLDWRM, QEXACT])
def test_the_plain_step_as_traced_assigns_no_attribute_of_the_optimizer(cls, bad, monkeypatch):
    """torch.compile refuses an assignment to a ``torch.optim`` optimizer's attribute inside the traced step (torch
    2.11, the GPU machines' release: every compiled step failed) and drops it (2.14). The plain step's code as it
    is traced (``is_compiling()`` true, the step known plain, the counters made beforehand by ``compiled_step``)
    must make none, on an accepted step and on a rejected one; its flags live on a ``StepFlags`` object."""
    model, _, batches = twins()
    opt = build(cls, model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for x, y in batches[:12]:  # past an inverse step: the next two are plain
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    opt.zero_grad()
    F.cross_entropy(model(batches[12][0]), batches[12][1]).backward()
    if bad is not None:
        model[0].weight.grad[0, 0] = bad
    opt._before_traced_step()
    opt._known_plain = True
    assigned = []

    class Recording(type(opt)):
        def __setattr__(self, name, value):
            assigned.append(name)
            super().__setattr__(name, value)

    opt.__class__ = Recording
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert assigned == []
    moved = [not torch.equal(b, p) for b, p in zip(before, model.parameters())]
    assert all(moved) if bad is None else not any(moved)  # the step ran, and a rejected one moved nothing
