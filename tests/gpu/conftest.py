"""GPU tests (`pytest -m gpu`): the fast ops and the fast model path against the torch reference."""

import pytest
import torch

from qwen35 import ops


@pytest.fixture
def fast_backend():
    """The seam on the fast ops for one test (strict: a broken environment fails loudly)."""
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA GPU")
    ops.use_backend("fast")
    yield
    ops.use_backend("reference")
