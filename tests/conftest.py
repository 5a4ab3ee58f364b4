import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tol(dtype):
    return {torch.float64: dict(rtol=1e-9, atol=1e-12, equal_nan=True), torch.float32: dict(rtol=1e-5, atol=1e-6, equal_nan=True),
            torch.bfloat16: dict(rtol=2e-2, atol=2e-2, equal_nan=True)}[dtype]
