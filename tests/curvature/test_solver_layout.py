"""A batched eigensolver may return its eigenvectors in any strided layout, including views of a buffer that
holds them transposed (cuSOLVER writes column-major); the batched preconditioning must see the right Q.

The model makes one size group of the eigensolver hold exactly the members of one block-batch group (the two
12→12 layers' 13×13 input factors appear nowhere else): the case where stacked eigenvectors are reused
without a copy.
"""

import copy

import pytest
import torch
from helpers.solver_layout import Model, batch_inner_buffer, padded_buffer, run, solver_returning, transposed_buffer

from kldwrm_fast import KFAC, QKLDWRM


@pytest.mark.parametrize("cls", [KFAC, QKLDWRM])
@pytest.mark.parametrize("layout", [transposed_buffer, batch_inner_buffer, padded_buffer])
def test_any_solver_layout_gives_the_per_block_trajectory(cls, layout):
    torch.manual_seed(3)
    model = Model().double()
    batches = [(torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 8, (16,))) for _ in range(3)]
    per_block_model = copy.deepcopy(model)
    opt, batched = run(cls, model, batches, solver_returning(layout))
    assert [2, 1] not in opt._batches.groups and [1, 2] in opt._batches.groups
    _, per_block = run(cls, per_block_model, batches, batched=False)
    torch.testing.assert_close(batched, per_block, rtol=1e-10, atol=1e-12)
