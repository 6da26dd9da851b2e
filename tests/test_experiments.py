"""The MNIST study: dataset loaders, the embedded sample, the report, and a tiny end-to-end run."""

import gzip
import json
import struct

import numpy as np
import pytest
import torch

from kldwrm_fast.experiments import datasets, mnist, report
from kldwrm_fast.experiments.models import paper_cnn

pytest.importorskip("matplotlib")


def write_idx(path, array, gz):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    with gzip.open(path, "wb") if gz else open(path, "wb") as handle:
        handle.write(data)


def make_idx_dir(directory, gz, n_train=12, n_test=5):
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    for stem, array in arrays.items():
        write_idx(directory / (stem + suffix), array, gz)
    return arrays


@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "raw"])
def test_idx_directory_loads_with_shapes_scale_and_labels(tmp_path, gz):
    arrays = make_idx_dir(tmp_path, gz)
    split = datasets.load_dataset(f"idx:{tmp_path}")
    assert split.train_x.shape == (12, 1, 28, 28) and split.test_x.shape == (5, 1, 28, 28)
    assert split.train_x.dtype == torch.float32 and split.train_y.dtype == torch.int64
    torch.testing.assert_close(
        split.train_x[3, 0], torch.tensor(arrays["train-images-idx3-ubyte"][3] / 255.0, dtype=torch.float32)
    )
    assert split.test_y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()


def test_truncated_file_is_named(tmp_path):
    make_idx_dir(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(datasets.DatasetError, match=r"train-images-idx3-ubyte: truncated"):
        datasets.load_dataset(f"idx:{tmp_path}")


def test_wrong_magic_is_named(tmp_path):
    make_idx_dir(tmp_path, gz=True)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    with gzip.open(path, "wb") as handle:
        handle.write(struct.pack(">II", 0x0000_0D01, 5) + bytes(5))
    with pytest.raises(datasets.DatasetError, match=r"t10k-labels-idx1-ubyte.gz: wrong magic number 0x00000d01"):
        datasets.load_dataset(f"idx:{tmp_path}")


def test_missing_file_and_mismatched_counts_are_named(tmp_path):
    make_idx_dir(tmp_path, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(datasets.DatasetError, match="train-labels-idx1-ubyte.*not found"):
        datasets.load_dataset(f"idx:{tmp_path}")
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(11), gz=False)
    with pytest.raises(datasets.DatasetError, match="12 images but 11 labels"):
        datasets.load_dataset(f"idx:{tmp_path}")


def test_missing_fashion_mnist_says_how_to_install(tmp_path):
    with pytest.raises(datasets.DatasetError, match="apt-get install dataset-fashion-mnist"):
        datasets.load_fashion_mnist(str(tmp_path / "absent"))


def test_unknown_dataset_spec():
    with pytest.raises(ValueError, match="Invalid dataset"):
        datasets.load_dataset("cifar")


def test_embedded_sample_has_the_documented_split():
    split = datasets.load_mnist_sample()
    assert split.train_x.shape == (4000, 1, 28, 28) and split.test_x.shape == (1000, 1, 28, 28)
    assert 0.0 <= split.train_x.min() and split.train_x.max() <= 1.0 and split.train_x.max() > 0.99
    assert set(split.train_y.unique().tolist()) == set(range(10)) and split.test_y.max() <= 9
    again = datasets.load_mnist_sample()
    assert torch.equal(split.test_y, again.test_y)


def test_paper_network_has_4712_parameters_and_gives_logits():
    model = paper_cnn()
    assert sum(p.numel() for p in model.parameters()) == 4712
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def hand_made_runs():
    def run(name, seed, accs, losses):
        epochs = [
            dict(epoch=i + 1, train_loss=1.0, test_loss=loss, test_acc=a, seconds=1.0)
            for i, (a, loss) in enumerate(zip(accs, losses))
        ]
        return {"optimizer": name, "seed": seed, "hyperparameters": {}, "epochs": epochs}

    return [
        run("q", 0, [0.5, 0.981], [1.0, 0.30]),
        run("q", 1, [0.5, 0.980], [1.0, 0.25]),
        run("q", 2, [0.5, 0.986], [1.0, 0.19]),
        run("kfac", 0, [0.9, 0.95], [0.5, 0.40]),
    ]


def test_table_statistics_of_hand_made_results():
    row = report.table_row([r for r in hand_made_runs() if r["optimizer"] == "q"])
    assert (row["acc_ge_98"], row["acc_gt_98"], row["acc_ge_985"]) == (3, 2, 1)
    assert (row["loss_le_025"], row["loss_le_02"]) == (2, 1)
    assert row["acc_mean"] == pytest.approx(98.233333333)
    assert row["acc_sd"] == pytest.approx(np.std([98.1, 98.0, 98.6], ddof=1))
    assert row["loss_mean"] == pytest.approx(0.246666666)
    assert row["loss_sd"] == pytest.approx(np.std([0.30, 0.25, 0.19], ddof=1))
    single = report.table_row([r for r in hand_made_runs() if r["optimizer"] == "kfac"])
    assert single["acc_sd"] == 0.0 and single["acc_mean"] == pytest.approx(95.0)
    text = report.summary_markdown(hand_made_runs(), "context")
    assert "| Q | this run (epoch 2) | 3 | 3 | 2 | 1 | 2 | 1 | 98.23 |" in text
    assert "| K-FAC | paper (epoch 50) | 10 | 3 | 3 | 1 | 5 | 2 | 96.19 |" in text


def test_tiny_end_to_end_run_writes_every_output_and_skips_completed_runs(tmp_path, capsys):
    argv = ["--optimizers", "q,qe", "--epochs", "1", "--seeds", "1", "--batch-size", "64", "--max-train", "256",
            "--max-test", "128", "--out", str(tmp_path), "--set", "qe.n_inner=2", "--set", "q.stat_freq=2",
            "--set", "q.inv_freq=2"]  # fmt: skip
    mnist.main(argv)
    for name in ("results.json", "summary.md", "accuracy.png", "loss.png", "final.png"):
        assert (tmp_path / name).stat().st_size > 0
    runs = json.loads((tmp_path / "results.json").read_text())
    assert [(r["optimizer"], r["seed"]) for r in runs] == [("q", 0), ("qe", 0)]
    assert runs[0]["hyperparameters"]["stat_freq"] == 2 and runs[1]["hyperparameters"]["n_inner"] == 2
    epoch = runs[0]["epochs"][0]
    assert set(epoch) == {"epoch", "train_loss", "test_loss", "test_acc", "seconds"}
    assert 0.0 <= epoch["test_acc"] <= 1.0 and epoch["epoch"] == 1
    summary = (tmp_path / "summary.md").read_text()
    assert "| Q | this run (epoch 1) | 1 |" in summary and "| QE | paper (epoch 50) |" in summary
    stamp = (tmp_path / "results.json").stat().st_mtime_ns
    mnist.main(argv)
    assert (tmp_path / "results.json").stat().st_mtime_ns == stamp  # nothing re-run


def test_overrides_are_validated():
    with pytest.raises(mnist.UsageError, match="expected OPT.NAME=VALUE"):
        mnist.parse_overrides(["adam.lr=0.1"])
    with pytest.raises(mnist.UsageError, match="q has no setting 'momentum'; valid: lr, rho"):
        mnist.parse_overrides(["q.momentum=0.9"])
    assert mnist.parse_overrides(["kfac.kl_clip=None", "q.rho=0.33"]) == {"kfac": {"kl_clip": None}, "q": {"rho": 0.33}}


SMOKE = ["--optimizers", "q", "--epochs", "1", "--seeds", "1", "--batch-size", "64", "--max-test", "64"]


def test_a_smoke_run_is_never_reused_for_a_run_with_other_settings(tmp_path, capsys):
    mnist.main([*SMOKE, "--max-train", "128", "--out", str(tmp_path)])
    mnist.main([*SMOKE, "--max-train", "192", "--out", str(tmp_path)])
    runs = json.loads((tmp_path / "results.json").read_text())
    assert [run["settings"]["train_images"] for run in runs] == [128, 192]  # trained again, the smoke run kept
    summary = (tmp_path / "summary.md").read_text()
    assert "192 train / 64 test images" in summary and "reused" not in summary
    mnist.main([*SMOKE, "--max-train", "192", "--out", str(tmp_path)])
    assert "1 of these 1 runs were reused" in (tmp_path / "summary.md").read_text()
    output = capsys.readouterr().out
    assert "| Q | this run (epoch 1) | 1 |" in output and f"Wrote {tmp_path / 'results.json'}" in output
    assert "q seed 0: test accuracy" in output  # not a terminal: one line per finished run


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--set", "q.momentum=0.9"], "q has no setting 'momentum'"),
        (["--set", "q.rho=2"], "Invalid rho: 2"),
        (["--set", "kfac.kl_clip=-1"], "Invalid kl_clip"),
        (["--batch-size", "0"], "--batch-size 0: expected an integer >= 1"),
        (["--epochs", "0"], "--epochs 0"),
        (["--seeds", "-1"], "--seeds -1"),
        (["--optimizers", "adam"], "--optimizers: unknown ['adam']"),
        (["--dataset", "idx:/nonexistent"], "not found"),
        (["--dataset", "cifar"], "Invalid dataset: 'cifar'"),
        (["--epochs", "ten"], "argument --epochs: invalid int value: 'ten'"),
        (["--protocol", "fast"], "argument --protocol: invalid choice: 'fast'"),
    ],
)
def test_bad_input_is_one_line_with_exit_status_2_before_anything_is_written(tmp_path, capsys, extra, message):
    out = tmp_path / "study"
    with pytest.raises(SystemExit) as stop:
        mnist.main([*SMOKE, "--out", str(out), *extra])
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("kldwrm-mnist: error: ") and message in error
    assert not out.exists()


def test_an_unwritable_output_directory_is_refused_in_one_line(tmp_path, capsys):
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(SystemExit) as stop:
        mnist.main([*SMOKE, "--out", str(blocked / "study")])
    assert stop.value.code == 2 and "cannot write there" in capsys.readouterr().err


def test_the_paper_protocol_is_the_author_s(tmp_path):
    mnist.main(["--paper", "--optimizers", "kfac,q", "--epochs", "1", "--seeds", "1", "--max-train", "128",
                "--max-test", "64", "--out", str(tmp_path)])  # fmt: skip
    runs = {run["optimizer"]: run for run in json.loads((tmp_path / "results.json").read_text())}
    kfac, q = runs["kfac"]["hyperparameters"], runs["q"]["hyperparameters"]
    for hyper in (kfac, q):
        assert (hyper["fisher"], hyper["damping"], hyper["bias"], hyper["eigenvalue_floor"]) == (
            "empirical", 0.011, "separate", 1e-6,
        )  # fmt: skip
    assert kfac["momentum"] == 0.0 and q["kl_clip"] == 0.1
    assert runs["q"]["settings"]["protocol"] == "paper" and runs["q"]["settings"]["batch_size"] == 512
    assert "Protocol paper." in (tmp_path / "summary.md").read_text()


def test_the_notebooks_protocol_leaves_only_the_test_set_unnormalised():
    data = datasets.Split(torch.ones(2, 1, 28, 28), torch.zeros(2), torch.ones(2, 1, 28, 28), torch.zeros(2))
    paper = mnist.normalised(data, mnist.PROTOCOLS["paper"])
    notebooks = mnist.normalised(data, mnist.PROTOCOLS["notebooks"])
    expected = (1 - 0.1307) / 0.3081
    assert torch.allclose(paper.train_x, torch.full_like(data.train_x, expected)) and torch.allclose(
        paper.test_x, torch.full_like(data.test_x, expected)
    )
    assert torch.equal(notebooks.train_x, paper.train_x) and torch.equal(notebooks.test_x, data.test_x)
    assert mnist.PROTOCOLS["paper"].dropout == 0.5 and mnist.PROTOCOLS["default"].dropout == 0.1
