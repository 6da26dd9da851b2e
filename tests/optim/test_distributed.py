"""Data parallelism on gloo: N ranks with local batches equal one process with the concatenated batch."""

import helpers.distributed_worker as worker
import pytest
import torch
import torch.distributed as dist
from helpers.spawn import spawn

from kldwrm_fast.distributed import assign_by_cost

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", ["KFAC", "SOKLDWRM", "QKLDWRM"])
def test_ranks_with_local_batches_equal_one_process_with_the_concatenated_batch(tmp_path, name, world):
    out = str(tmp_path / "params")
    spawn(worker.data_parallel, world, name, {}, out)
    expected = worker.single_process(name, world, {})
    results = [torch.load(f"{out}.{rank}") for rank in range(world)]
    for result in results:
        for ours, theirs in zip(result["params"], expected):
            torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    for result in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(result["params"], results[0]["params"]))  # no drift
    # Q decomposes its reweighted factors and the averages (for the steps up to the next inverse step).
    n_factors, inverse_steps = 2 * 4 * (2 if name == "QKLDWRM" else 1), len(range(0, worker.STEPS, 4))
    calls = [name for result in results for name in result["eig_calls"]]
    assert len(calls) == n_factors * inverse_steps and len(set(calls)) == n_factors  # each factor once per inverse step
    assert all(len(result["eig_calls"]) > 0 for result in results[:2])


@pytest.mark.parametrize("name", ["KFAC", "QKLDWRM"])
def test_the_paper_code_options_equal_one_process_with_the_concatenated_batch(tmp_path, name):
    extra = dict(bias="separate", eigenvalue_floor=1e-6, **(dict(kl_clip=0.1) if name == "QKLDWRM" else {}))
    out = str(tmp_path / "params")
    spawn(worker.data_parallel, 2, name, extra, out)
    expected = worker.single_process(name, 2, extra)
    for rank in range(2):
        for ours, theirs in zip(torch.load(f"{out}.{rank}")["params"], expected):
            torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["KFAC", "QKLDWRM"])
def test_diagonal_sides_equal_one_process_with_the_concatenated_batch(tmp_path, name):
    extra = dict(max_factor_dim=9)  # every side but the output sides of the convolution (3) and of the head (3)
    out = str(tmp_path / "params")
    spawn(worker.data_parallel, 2, name, extra, out)
    expected = worker.single_process(name, 2, extra)
    results = [torch.load(f"{out}.{rank}") for rank in range(2)]
    for result in results:
        for ours, theirs in zip(result["params"], expected):
            torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    # A dense factor is decomposed by one rank; a diagonal one, whose decomposition is its entries, by each.
    n_dense, n_diagonal, inverse_steps = 2, 6, len(range(0, worker.STEPS, 4))
    per_inverse_step = (n_dense + 2 * n_diagonal) * (2 if name == "QKLDWRM" else 1)
    assert len([n for result in results for n in result["eig_calls"]]) == per_inverse_step * inverse_steps


@pytest.mark.parametrize("name", ["KFAC", "QKLDWRM"])
def test_warm_eigenbases_keep_the_ranks_together_and_equal_one_process_to_their_tolerance(tmp_path, name):
    """A warm update starts from the last basis, and a factor of rank below its size (12 rows, 49 columns at the
    first refresh) has an arbitrary basis of its null space, which eigh chooses differently for factors equal to
    1e-16: one process and the ranks then follow different, equally valid warm bases. So the ranks are compared
    with each other bit for bit (one owner decomposes, all receive), and with one process at a tolerance the
    residual bound sets (warm_tol = 1e-11, converged iterations), not at rounding."""
    extra = dict(eigensolver="warm", warm_iters=60, warm_tol=1e-11, full_every=None)
    out = str(tmp_path / "params")
    spawn(worker.data_parallel, 2, name, extra, out)
    expected = worker.single_process(name, 2, extra)
    results = [torch.load(f"{out}.{rank}")["params"] for rank in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*results))
    for ours, theirs in zip(results[0], expected):
        torch.testing.assert_close(ours, theirs, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", ["KFAC", "SOKLDWRM"])
def test_low_rank_sides_keep_the_ranks_together_and_equal_one_process(tmp_path, name):
    """The range finder's Gaussian columns are seeded by the step, the block's position and the side (not the layer's
    name, which DistributedDataParallel prefixes), so the owner of a factor draws what one process draws."""
    out = str(tmp_path / "params")
    spawn(worker.data_parallel, 2, name, dict(rank=6), out)
    results = [torch.load(f"{out}.{rank}")["params"] for rank in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*results))
    for ours, theirs in zip(results[0], worker.single_process(name, 2, dict(rank=6))):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "extra,compare,world",
    [(dict(n_inner=3, kl_scale=0.0), True, 2), (dict(n_inner=3, kl_scale=0.0), True, 4), (dict(n_inner=3), False, 2)],
)
def test_qe_ranks_agree_and_follow_their_documented_semantics(tmp_path, extra, compare, world):
    out = str(tmp_path / "params")
    spawn(worker.data_parallel, world, "QEKLDWRM", extra, out)
    results = [torch.load(f"{out}.{rank}")["params"] for rank in range(world)]
    for other in results[1:]:  # averaged inner gradients: the same step everywhere
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))
    if compare:  # without the KL term, Φ involves only averaged quantities: the concatenated-batch run
        for ours, theirs in zip(results[0], worker.single_process("QEKLDWRM", world, extra)):
            torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["KFAC", "QKLDWRM"])
def test_ranks_agree_on_which_layers_join_when_a_branch_ran_on_one_rank_only(tmp_path, name):
    out = str(tmp_path / "params")
    spawn(worker.branch_on_one_rank, 2, name, out)
    results = [torch.load(f"{out}.{rank}") for rank in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(results[0]["params"], results[1]["params"]))
    # b2 ran on rank 0 only at inverse step 2: it joins at inverse step 4, when both ranks ran it.
    assert results[0]["joined"] == results[1]["joined"] == [False, False, False, False, True]


def test_clear_errors_for_a_missing_process_group_and_a_mismatched_world_size(tmp_path):
    out = str(tmp_path / "messages")
    spawn(worker.errors, 2, out)
    missing_group, mismatch = torch.load(f"{out}.0")
    assert missing_group.startswith("RuntimeError") and "no process group is initialised" in missing_group
    assert mismatch.startswith("ValueError") and "world size 2" in mismatch and "world size 1" in mismatch


def test_eigendecomposition_assignment_balances_cubic_cost():
    sizes = [512, 30, 257, 10, 113, 6, 257, 65]
    owners = assign_by_cost(sizes, 2)
    loads = [sum(n**3 for n, o in zip(sizes, owners) if o == rank) for rank in range(2)]
    assert owners[0] != owners[2] and max(loads) == 512**3  # the largest factor alone outweighs the rest
    owners4 = assign_by_cost([100, 100, 100, 100, 50, 50, 50, 50], 4)
    assert sorted(owners4[:4]) == [0, 1, 2, 3] and sorted(owners4[4:]) == [0, 1, 2, 3]
    assert assign_by_cost(sizes, 1) == [0] * len(sizes)
    assert assign_by_cost(sizes, 3) == assign_by_cost(list(sizes), 3)  # deterministic


def test_the_mnist_study_runs_data_parallel(tmp_path):
    pytest.importorskip("matplotlib")
    spawn(worker.mnist_study, 2, str(tmp_path))
    runs = __import__("json").loads((tmp_path / "results.json").read_text())
    assert [(r["optimizer"], len(r["epochs"])) for r in runs] == [("q", 1)]
    assert "2 process(es)" in (tmp_path / "summary.md").read_text()


@pytest.mark.parametrize("world, where", [(2, "statistic"), (4, "statistic"), (4, "gradient")])
def test_a_non_finite_statistic_or_gradient_on_one_rank_makes_every_rank_skip(tmp_path, world, where):
    out = str(tmp_path / "nan")
    spawn(worker.nan_on_one_rank, world, out, where)
    results = [torch.load(f"{out}.{rank}") for rank in range(world)]
    assert [r["skipped"] for r in results] == [1] * world
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0]["params"], other["params"]))
    assert all(torch.equal(a, b) for a, b in zip(results[0]["params"], results[0]["before"]))  # the step moved none
