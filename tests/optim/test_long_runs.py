"""Long runs and dropped optimizers (issue 34): after warm-up a run holds a fixed number of live tensors at every
cadence, and an optimizer that is dropped leaves no hook on the model and nothing of its state alive."""

import gc
import weakref

import pytest
import torch
from helpers.small_models import small_batch as batch
from helpers.small_models import small_model
from helpers.small_models import train_steps as train

from kldwrm_fast import KFAC, QEKLDWRM, QKLDWRM, SOKLDWRM

OPTIMIZERS = [KFAC, SOKLDWRM, QKLDWRM, QEKLDWRM]




def live_tensors() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if torch.is_tensor(obj))


def hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


@pytest.mark.parametrize("cadence", [(1, 1), (3, 12)])
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_live_tensors_stay_flat_after_warm_up(cls, cadence):
    stat_freq, inv_freq = cadence
    model = small_model()
    opt = cls(model, lr=0.01, stat_freq=stat_freq, inv_freq=inv_freq)
    cycle = 24  # two inverse steps at the slower cadence: each round ends at the same phase
    train(opt, model, range(cycle))
    counts = []
    for r in range(1, 4):
        train(opt, model, range(r * cycle, (r + 1) * cycle))
        counts.append(live_tensors())
    assert counts[0] == counts[1] == counts[2], counts


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_a_dropped_optimizer_leaves_no_hooks_and_frees_its_state(cls):
    model = small_model()
    before = hooks(model)
    opt = cls(model, lr=0.01, stat_freq=1, inv_freq=2)
    train(opt, model, range(3))
    model(batch(0)[0])  # a forward without its backward: captured inputs that no step consumed
    assert hooks(model) > before
    dropped, factor = weakref.ref(opt), weakref.ref(opt.block_states()[0]["A_ea"])
    del opt
    gc.collect()
    assert dropped() is None and factor() is None and hooks(model) == before
    train(KFAC(model, lr=0.01), model, range(2))  # the model trains on with a new optimizer


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_a_dropped_model_and_optimizer_free_each_other(cls):
    model = small_model()
    opt = cls(model, lr=0.01, stat_freq=1, inv_freq=2)
    train(opt, model, range(3))
    refs = [weakref.ref(model), weakref.ref(opt), weakref.ref(next(model.parameters()))]
    del model, opt
    gc.collect()
    assert all(ref() is None for ref in refs)
