"""The CPU output cache (csrc/cpu/output_cache.cpp): large op outputs reuse freed blocks of the same size, bounded by
MMOPS_CPU_CACHE_MB, emptied by mmops.empty_cache(); the tensors are ordinary CPU tensors."""
import os
import subprocess
import sys

import pytest
import torch

import mmops
from mmops import _C

LARGE = (4096, 200)  # 3.2 MB of float32: cached
SMALL = (32, 200)  # 25 KB: from the default allocator


@pytest.fixture(autouse=True)
def empty():
    mmops.empty_cache()
    yield
    mmops.empty_cache()


def test_freed_output_is_reused_and_counted():
    x = torch.randn(*LARGE)
    y = mmops.batch_norm(x, None, None, training=True)
    first = y.data_ptr()
    assert _C.cache_bytes() == 0
    del y
    held = _C.cache_bytes()
    assert held >= x.numel() * 4
    y = mmops.batch_norm(x, None, None, training=True)
    assert y.data_ptr() == first and _C.cache_bytes() == 0
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, None, None, training=True))
    del y
    assert mmops.empty_cache() == held and _C.cache_bytes() == 0


def test_live_outputs_never_share_memory():
    x = torch.randn(*LARGE, requires_grad=True)
    outs = [mmops.batch_norm(x * (i + 1), None, None, training=True) for i in range(3)]
    assert len({o.data_ptr() for o in outs}) == 3
    logits = torch.randn(8192, 100, requires_grad=True)
    loss = mmops.cross_entropy(logits, torch.randint(0, 100, (8192,)))
    (loss * 0.37).backward()  # the scaled gradient is a second large output, alive with the first
    assert logits.grad.data_ptr() not in {o.data_ptr() for o in outs}


def test_small_outputs_bypass_the_cache():
    y = mmops.batch_norm(torch.randn(*SMALL), None, None, training=True)
    del y
    assert _C.cache_bytes() == 0


def test_cached_output_is_an_ordinary_resizable_tensor():
    y = mmops.batch_norm(torch.randn(*LARGE), None, None, training=True)
    y.resize_(5000, 200)  # the allocator is asked again for the larger storage
    y[4096:] = 1.0
    assert y.shape == (5000, 200) and bool((y[4096:] == 1).all())
    y2 = y.clone()
    del y
    torch.testing.assert_close(y2[4096:], torch.ones(904, 200))


def _run(code: str, **env) -> str:
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                         check=True)
    return out.stdout.strip()


FREE_THREE = """
import torch, mmops
from mmops import _C
ys = [mmops.batch_norm(torch.randn(4096, 200), None, None, training=True) for _ in range(3)]
del ys
print(_C.cache_bytes())
"""


def test_limit_from_the_environment():
    assert int(_run(FREE_THREE, MMOPS_CPU_CACHE_MB="0")) == 0  # off
    held = int(_run(FREE_THREE, MMOPS_CPU_CACHE_MB="8"))  # room for two of the three blocks
    assert 0 < held <= 8 << 20
    assert int(_run(FREE_THREE)) >= 3 * 4096 * 200 * 4  # the default holds all three


def test_copy_on_write_clone_of_a_cached_output():
    # the data pointer is the block itself, so PyTorch can share the storage copy-on-write
    y = mmops.batch_norm(torch.randn(*LARGE), None, None, training=True)
    c = torch._lazy_clone(y)
    torch.testing.assert_close(c, y)
