"""The registered PyTorch reference ops (``kldwrm_fast::<op>``), which need no Triton: ``torch.library.opcheck``
(schema, fake implementation, autograd registration) and the same results as the Python reference they wrap."""

import pytest
import torch
from helpers.op_inputs import opcheck_cases, preconditioner_inputs

from kldwrm_fast.ops import reference
from kldwrm_fast.ops.library import REFERENCE_OPS
from kldwrm_fast.ops.table import OPERATIONS


@pytest.mark.parametrize("op_name", [operation.name for operation in OPERATIONS])
def test_opcheck(op_name):
    torch.library.opcheck(REFERENCE_OPS[op_name]._opoverload, opcheck_cases()[op_name])


def test_reference_ops_are_the_python_reference():
    inputs = preconditioner_inputs(3, 4, torch.float64)
    torch.testing.assert_close(
        REFERENCE_OPS["precondition"](*inputs, 0.1), reference.precondition(*inputs, 0.1), rtol=0, atol=0
    )
