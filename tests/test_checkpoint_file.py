"""``save_checkpoint`` / ``load_checkpoint`` (issue 34): a file cut short at any point, altered, written by plain
``torch.save`` or for another model is refused in one line, leaving the model and optimizer as they were; a crash
while writing leaves the previous file whole."""

import copy

import pytest
import torch
from helpers.small_models import small_model
from helpers.small_models import train_steps as train
from torch import nn

from kldwrm_fast import KFAC, QKLDWRM, load_checkpoint, save_checkpoint


def trained(cls=KFAC, steps=3):
    model = small_model()
    opt = cls(model, lr=0.05, stat_freq=1, inv_freq=2)
    train(opt, model, range(steps))
    return model, opt


def snapshot(model, opt):
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())


def unchanged(model, opt, kept):
    params, state = kept
    now, then = opt.state_dict()["state"][0], state["state"][0]
    same_params = all(torch.equal(a, b) for a, b in zip(model.parameters(), params))
    return same_params and now.keys() == then.keys() and all(torch.equal(now[k], then[k]) for k in now)


@pytest.mark.parametrize("cls", [KFAC, QKLDWRM])
def test_a_saved_checkpoint_resumes_bit_identically_with_its_extra_items(tmp_path, cls):
    model, opt = trained(cls)
    save_checkpoint(tmp_path / "run.pt", model, opt, epoch=3)
    twin_model = small_model()
    twin = cls(twin_model, lr=0.05, stat_freq=1, inv_freq=2)
    assert load_checkpoint(tmp_path / "run.pt", twin_model, twin) == {"epoch": 3}
    train(opt, model, range(3, 6))
    train(twin, twin_model, range(3, 6))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin_model.parameters()))
    assert [p.name for p in tmp_path.iterdir()] == ["run.pt"]  # no temporary file left behind


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_a_truncated_file_is_refused_and_changes_nothing(tmp_path, fraction):
    model, opt = trained()
    save_checkpoint(tmp_path / "run.pt", model, opt)
    data = (tmp_path / "run.pt").read_bytes()
    (tmp_path / "run.pt").write_bytes(data[: int(len(data) * fraction)])
    other_model, other = trained(steps=5)
    kept = snapshot(other_model, other)
    with pytest.raises(ValueError, match=r"Invalid checkpoint .*run.pt.*(not a whole checkpoint|digest)") as error:
        load_checkpoint(tmp_path / "run.pt", other_model, other)
    assert "\n" not in str(error.value) and unchanged(other_model, other, kept)


def test_an_altered_payload_fails_its_digest(tmp_path):
    model, opt = trained()
    save_checkpoint(tmp_path / "run.pt", model, opt)
    record = torch.load(tmp_path / "run.pt", weights_only=True)
    payload = bytearray(record["payload"])
    payload[len(payload) // 2] ^= 0xFF
    torch.save(dict(record, payload=bytes(payload)), tmp_path / "run.pt")
    with pytest.raises(ValueError, match="do not match their SHA-256 digest"):
        load_checkpoint(tmp_path / "run.pt", *trained())


def test_a_plain_torch_save_file_is_refused_with_a_pointer(tmp_path):
    model, opt = trained()
    torch.save(opt.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="not a 'kldwrm_fast checkpoint 1' file"):
        load_checkpoint(tmp_path / "plain.pt", model, opt)


def test_a_checkpoint_of_another_model_changes_neither_model_nor_optimizer(tmp_path):
    wide = nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 3))
    wide_opt = KFAC(wide, stat_freq=1, inv_freq=1)
    train(wide_opt, wide, range(1))
    save_checkpoint(tmp_path / "wide.pt", wide, wide_opt)
    model, opt = trained()
    kept = snapshot(model, opt)
    with pytest.raises(ValueError, match="model state does not fit this model .*size mismatch") as error:
        load_checkpoint(tmp_path / "wide.pt", model, opt)
    assert "\n" not in str(error.value) and unchanged(model, opt, kept)


def test_a_model_state_that_fits_with_an_optimizer_state_that_does_not_restores_the_model(tmp_path):
    model, opt = trained()
    save_checkpoint(tmp_path / "q.pt", model, QKLDWRM(copy.deepcopy(model), stat_freq=1, inv_freq=1))
    target_model, target = trained(steps=5)
    kept = snapshot(target_model, target)
    with pytest.raises(ValueError, match="saved by QKLDWRM"):
        load_checkpoint(tmp_path / "q.pt", target_model, target)
    assert unchanged(target_model, target, kept)


def test_a_crash_while_writing_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    model, opt = trained()
    save_checkpoint(tmp_path / "run.pt", model, opt, epoch=1)
    train(opt, model, range(3, 4))
    real_save = torch.save

    def dying(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "payload" in obj:
            f.write(b"PK\x03\x04 half a file")
            raise KeyboardInterrupt  # killed mid-write
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dying)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "run.pt", model, opt, epoch=2)
    monkeypatch.setattr(torch, "save", real_save)
    assert [p.name for p in tmp_path.iterdir()] == ["run.pt"]
    assert load_checkpoint(tmp_path / "run.pt", *trained()) == {"epoch": 1}
