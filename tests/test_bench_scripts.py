"""The bench scripts run end to end on CPU: the GPU check (tiny shapes), the interleaved step-time comparison, the
linear-algebra floor, the weight-sharing comparison and the warm-eigenbasis comparisons."""

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_gpu_check_smoke_run_reports_every_operation_and_tunes_a_table_auto_accepts(tmp_path):
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    table = tmp_path / "table.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--smoke", "--json", str(tmp_path / "rows.json"),
         "--tune", str(table)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for op in ("factor_update", "precondition", "q_precondition", "ghat_recursion"):
        assert f"{op} " in result.stdout
    assert "triton" in result.stdout and (tmp_path / "rows.json").exists()
    from kldwrm_fast.ops import routing as dispatch_table

    tuned = json.loads(table.read_text())
    assert set(tuned) == {"factor_update", "precondition", "q_precondition", "ghat_recursion"}
    assert all(backend in ("torch", "triton") for classes in tuned.values() for backend in classes.values())
    merged = dispatch_table.current_table({"KLDWRM_DISPATCH_TABLE": str(table)})
    assert all(merged[name][size] == backend for name, classes in tuned.items() for size, backend in classes.items())


def run_compare(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / "compare_step_time.py"), "--workload", "paper-cnn", *args],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_step_time_comparison_gives_every_entry_a_ratio_per_round(tmp_path):
    out = tmp_path / "ratios.json"
    result = run_compare(
        "--cadence", "every-step", "--entries", "sgd,kfac-torch", "--repeats", "2", "--min-steps", "1",
        "--json", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    entries = json.loads(out.read_text())["entries"]
    assert list(entries) == ["sgd", "kfac-torch"]
    assert entries["sgd"]["ratio"] == [1.0, 1.0]
    assert len(entries["kfac-torch"]["ms"]) == 2 and all(r > 0 for r in entries["kfac-torch"]["ratio"])
    assert "kfac-torch" in result.stdout


def test_step_time_comparison_names_an_unknown_entry():
    result = run_compare("--cadence", "30/30", "--entries", "sgd,lbfgs")
    assert result.returncode == 2 and "lbfgs" in result.stderr


def test_the_floor_comparison_reports_a_ratio_per_optimizer_and_round(tmp_path):
    out = tmp_path / "floor.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "floor.py"), "--workload", "paper-cnn", "--cadence", "every-step",
         "--optimizers", "kfac,qe", "--repeats", "2", "--min-steps", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    optimizers = json.loads(out.read_text())["optimizers"]
    assert set(optimizers) == {"kfac", "q", "qe", "qe_passes", "sgd"}  # QE's floor takes Q's iteration
    for name in ("kfac", "q", "qe"):
        assert len(optimizers[name]["ratio"]) == 2 and all(f > 0 for f in optimizers[name]["floor_ms"])
    passes = optimizers["qe_passes"]
    assert passes["n_inner"] == 10 and passes["n_cap"] == 4  # QEKLDWRM's defaults
    for floor, q, one in zip(optimizers["qe"]["floor_ms"], optimizers["q"]["ms"], passes["pass_ms"]):
        assert floor == pytest.approx(q + 10 * one)
    for full, q, one, matvec, forward in zip(
        passes["floor_ms"], optimizers["q"]["ms"], passes["pass_ms"], passes["matvec_ms"], passes["forward_ms"]
    ):
        assert full == pytest.approx(q + 10 * (one + matvec) + 4 * forward) and matvec > 0 and forward > 0
    # best of rounds: each time at its fastest round, not the best round's ratio
    sgd, kfac, q, qe = (optimizers[name]["ms"] for name in ("sgd", "kfac", "q", "qe"))
    assert optimizers["kfac"]["best"] == pytest.approx(min(kfac) / (min(sgd) + min(optimizers["kfac"]["floor_ms"])))
    assert optimizers["qe"]["best"] == pytest.approx(min(qe) / (min(q) + 10 * min(passes["pass_ms"])))
    fastest = min(q) + 10 * min(one + matvec for one, matvec in zip(passes["pass_ms"], passes["matvec_ms"]))
    assert passes["best"] == pytest.approx(min(qe) / (fastest + 4 * min(passes["forward_ms"])))
    assert "ours/(SGD+floor)" in result.stdout and "ours/(Q + n_inner passes)" in result.stdout


def test_the_floor_comparison_keeps_the_rounds_a_run_cut_short_finished(tmp_path):
    """A cell stopped by a time limit (``bench/device_check.sh`` gives each 30 s) still leaves its finished rounds
    in the JSON, whole: the file is written after every round and never half-written."""
    out, log = tmp_path / "floor.json", tmp_path / "stderr.txt"
    with log.open("w") as stderr:  # a file, not a pipe: a full pipe would stall the run
        run = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "floor.py"), "--workload", "paper-cnn", "--cadence", "every-step",
             "--optimizers", "kfac", "--repeats", "100000", "--min-steps", "1", "--json", str(out)],
            stdout=subprocess.DEVNULL, stderr=stderr,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 240
            while not out.exists() and run.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(1.0)  # a few more rounds: the file is rewritten while the run is stopped
        finally:
            run.kill()
            run.wait()
    assert out.exists(), log.read_text()
    optimizers = json.loads(out.read_text())["optimizers"]
    rounds = len(optimizers["sgd"]["ms"])
    assert rounds >= 1 and len(optimizers["kfac"]["ratio"]) == len(optimizers["kfac"]["floor_ms"]) == rounds


def test_the_floor_comparison_hands_back_the_figures_of_each_round_as_they_stand(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import floor

    rounds = []
    final = floor.measure("paper-cnn", "every-step", ["kfac"], repeats=3, min_steps=1, on_round=rounds.append)
    assert [len(figures["kfac"]["ratio"]) for figures in rounds] == [1, 2, 3]
    assert rounds[-1] == final
    assert rounds[0]["kfac"]["ms"] == final["kfac"]["ms"][:1]  # an earlier round's figures stay as they were
    assert rounds[0]["kfac"]["best"] == pytest.approx(final["kfac"]["ms"][0] / (
        final["sgd"]["ms"][0] + final["kfac"]["floor_ms"][0]))  # fmt: skip


def test_the_floor_comparison_runs_compiled_plain_steps(tmp_path):
    out = tmp_path / "floor.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "floor.py"), "--workload", "paper-cnn", "--cadence", "10/100",
         "--optimizers", "kfac", "--repeats", "1", "--min-steps", "1", "--compiled", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["environment"]["compiled"] is True and report["optimizers"]["kfac"]["ratio"][0] > 0
    assert "compiled plain steps" in result.stdout


def test_the_floor_comparison_takes_the_empirical_fisher(tmp_path, monkeypatch):
    out = tmp_path / "floor.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "floor.py"), "--workload", "paper-cnn", "--cadence", "every-step",
         "--optimizers", "kfac", "--repeats", "1", "--min-steps", "1", "--fisher", "empirical", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["environment"]["fisher"] == "empirical" and "empirical Fisher" in result.stdout
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import torch
    from entries import make_step
    from workloads import WORKLOADS

    make, shape, _ = WORKLOADS["paper-cnn"][False]
    x, y = torch.randn(2, *shape), torch.tensor([0, 1])
    assert make_step("kfac-torch", make(), x, y, (1, 1), fisher="empirical")[0].fisher == "empirical"
    assert make_step("kfac-torch", make(), x, y, (1, 1))[0].fisher == "sampled"


def test_the_floor_counts_every_layer_of_the_paper_cnn():
    """(rows, n_in with bias, n_out) per layer at batch 128: the convolutions' rows are batch × output locations."""
    code = (
        "import sys, torch; sys.path.insert(0, 'bench'); import floor; "
        "from kldwrm_fast.experiments.models import paper_cnn; "
        "print(floor.layer_shapes(paper_cnn(), torch.zeros(128, 1, 28, 28)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[(73728, 26, 5), (8192, 126, 7), (128, 113, 30), (128, 31, 10)]"


@pytest.mark.parametrize("checked, operations", [(False, 32), (True, 45)])
def test_the_bare_plain_step_updates_every_parameter_in_the_operations_it_claims(monkeypatch, checked, operations):
    """``kfac-bare`` in the host-time bench: the dispatch floor of a per-block K-FAC plain step quoted in the README
    (32 compute operations on the paper CNN); it must do the whole step, every layer's weight and bias. Checked
    (``kfac-bare-checked``, 45), it must also keep our numerics: a NaN gradient leaves the parameters and the
    momentum as they were and is counted."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import torch
    import torch.nn.functional as F
    from test_host_overhead import BarePlainStep, OpCounter
    from workloads import WORKLOADS

    make, shape, _ = WORKLOADS["paper-cnn"][False]
    torch.manual_seed(0)
    model = make()
    F.cross_entropy(model(torch.randn(2, *shape)), torch.tensor([1, 2])).backward()
    before = [p.detach().clone() for p in model.parameters()]
    bare, counter = BarePlainStep(model, checked=checked), OpCounter()
    with counter:
        bare.step()
    assert counter.compute_ops == operations
    assert len(bare.params) == len(before) == 8
    for p, old in zip(model.parameters(), before):
        assert torch.isfinite(p).all() and not torch.equal(p, old)
    if checked:
        after, buffer = [p.detach().clone() for p in model.parameters()], bare.buffer.clone()
        next(model.parameters()).grad[0, 0, 0, 0] = float("nan")
        bare.step()
        assert all(torch.equal(p, a) for p, a in zip(model.parameters(), after))
        assert torch.equal(bare.buffer, buffer) and int(bare.skipped) == 1


@pytest.mark.skipif(not pathlib.Path("/usr/share/common-licenses").is_dir(), reason="needs Debian's licence texts")
def test_the_weight_sharing_comparison_reports_every_optimizer(tmp_path):
    out = tmp_path / "rows.json"
    result = subprocess.run(
        [sys.executable, "-W", "ignore", str(ROOT / "bench" / "weight_sharing.py"), "--steps", "2", "--seeds", "1",
         "--optimizers", "adamw,kfac-reduce", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())
    assert [row["optimizer"] for row in rows] == ["adamw", "kfac-reduce"]
    assert all(row["held_out_loss"] > 0 for row in rows) and "| kfac-reduce |" in result.stdout


@pytest.mark.skipif(not pathlib.Path("/usr/share/common-licenses").is_dir(), reason="needs Debian's licence texts")
@pytest.mark.skipif(not pathlib.Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="needs Fashion-MNIST")
def test_the_modern_layers_comparison_reports_both_workloads(tmp_path):
    out = tmp_path / "results.json"
    result = subprocess.run(
        [sys.executable, "-W", "ignore", str(ROOT / "bench" / "modern_layers.py"), "--steps", "2", "--every", "1",
         "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    results = json.loads(out.read_text())
    assert [r["workload"] for r in results] == ["lm", "resnet"]
    for r in results:
        rows = {row["optimizer"]: row for row in r["rows"]}
        assert list(rows) == ["adamw", "kfac", "q"]
        assert rows["kfac"]["preconditioned"] == 1.0 and rows["q"]["preconditioned"] == 1.0
        assert all(row["equal_time"]["seconds"] <= r["budget_s"] * 1.02 for row in rows.values())
    assert "| kfac | 100.0% |" in result.stdout


def test_the_quick_race_reports_every_workload_and_optimizer(tmp_path):
    """bench/race.py --quick: one row per optimizer in each workload's table, a result or one line saying why not
    (heavyball missing, the reference K-FAC's layer kinds, QE's per-sample logits), the JSON's schema and a figure per
    workload."""
    import importlib.util

    result = subprocess.run(
        [sys.executable, "-W", "ignore", str(ROOT / "bench" / "race.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import race_optimizers
        from race_workloads import TARGETS
    finally:
        sys.path.remove(str(ROOT / "bench"))
    report = json.loads((tmp_path / "race.json").read_text())
    assert set(report) == {"machine", "quick", "workloads", "grids", "summary", "runs", "wall_seconds"}
    assert report["quick"] is True and list(report["summary"]) == list(TARGETS)
    has_heavyball = importlib.util.find_spec("heavyball") is not None
    table = (tmp_path / "race.md").read_text()
    for workload, cells in report["summary"].items():
        assert list(cells) == race_optimizers.NAMES
        assert report["workloads"][workload]["metric"] in ("accuracy", "loss")
        for name, cell in cells.items():
            assert f"| {race_optimizers.LABELS[name]} |" in table
            ran = "seconds" in cell
            if name in race_optimizers.HEAVYBALL:
                assert ran == has_heavyball and (ran or cell["reason"].startswith("missing: heavyball"))
            elif name == "reference-kfac":
                assert ran == (workload in ("paper-cnn", "mlp")), cell["reason"]
            elif name == "qe" and workload == "lm":
                assert not ran and cell["reason"].startswith("error: ValueError: QEKLDWRM")
            else:
                assert ran, cell["reason"]
            if ran:
                assert cell["seeds"] == 2 and cell["reached"] in (0, 1, 2) and cell["ms_per_step"] > 0
                assert len(cell["seconds"]) == 3 and len(cell["steps"]) == 3
    for run in report["runs"]:
        assert {"workload", "optimizer", "settings", "seed", "stage", "status", "trace"} <= set(run)
        if run["status"] == "ok":
            steps = [point["step"] for point in run["trace"]]
            assert steps == [0, 4, 8, 12] and run["steps"] == 12
            assert {"loss", "accuracy", "seconds"} <= set(run["trace"][-1]) and "final_test" in run
    for workload in TARGETS:
        assert (tmp_path / f"race-{workload}.png").stat().st_size > 10_000


def test_the_race_names_an_unknown_optimizer(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "race.py"), "--out", str(tmp_path), "--optimizers", "adamw,lamb"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and "--optimizers: unknown lamb; accepted: kfac," in result.stderr


def test_the_warm_eigensolver_comparison_times_every_solver_and_reports_residuals(tmp_path):
    out = tmp_path / "warm.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "warm_eigh.py"), "--sizes", "16,24", "--batch", "1,3", "--repeats", "1",
         "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(row["n"], row["batch"]) for row in rows] == [(16, 1), (16, 3), (24, 1), (24, 3)]
    for row in rows:
        assert set(row["ms"]) >= {"eigh (torch)", "warm, 0 iterations", "warm, 1 iteration"}
        assert 0 < row["residual"]["1"] < row["residual"]["0"] < 0.1  # a 5% step; one iteration refines it


def test_the_warm_trajectory_comparison_measures_the_distance_from_the_exact_run(tmp_path):
    out = tmp_path / "trajectory.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "warm_trajectory.py"), "--optimizers", "kfac", "--epochs", "1",
         "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    runs = json.loads(out.read_text())["runs"]
    variants = ("exact", "warm", "warm, 0 iterations", "exact, initial weights moved by 1e-6")
    assert set(runs) == {f"kfac {variant}" for variant in variants}
    assert runs["kfac exact"][0]["gap"] == 0 and runs["kfac exact"][0]["warm"] == 0
    assert runs["kfac warm"][0]["warm"] > 0 and runs["kfac warm"][0]["gap"] > 0
