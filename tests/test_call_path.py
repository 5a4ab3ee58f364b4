"""The drop-ins' usual call goes to the Functions' C++ apply without torch.autograd.Function.apply's Python layer
(mmops/_ops.py): the graph, the gradients and the behaviour under functorch must be those of Function.apply."""
import pytest
import torch
import torch.nn.functional as F

import mmops
from mmops._batch_norm import BatchNormFunction
from mmops._cross_entropy import CrossEntropyFunction
from mmops._ops import plain_autograd


def _dead_wrapper(shape):
    """A tensor left over from a finished torch.func.grad: a functorch wrapper whose level is gone."""
    escaped = []

    def f(x):
        escaped.append(x)
        return (x * x).sum()

    torch.func.grad(f)(torch.randn(*shape))
    assert torch._C._functorch.is_functorch_wrapped_tensor(escaped[0])
    return escaped[0]


def test_plain_autograd_is_false_under_a_transform():
    assert plain_autograd()
    seen = []
    torch.func.grad(lambda x: (seen.append(plain_autograd()), x.sum())[1])(torch.randn(3))
    assert seen == [False]


@pytest.mark.parametrize("via", ["drop-in", "Function.apply"])
def test_cross_entropy_graph_node_and_gradient(via):
    x = torch.randn(32, 27, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 27, (32,))
    loss = (mmops.cross_entropy(x, y) if via == "drop-in"
            else CrossEntropyFunction.apply(x, y, None, 1, -100, 0.0, False))
    assert type(loss.grad_fn).__name__ == "CrossEntropyFunctionBackward"
    go = torch.tensor(0.37, dtype=torch.float64)
    loss.backward(go)
    xr = x.detach().clone().requires_grad_()
    F.cross_entropy(xr, y).backward(go)
    torch.testing.assert_close(x.grad, xr.grad)


def test_batch_norm_graph_node_and_gradients():
    x = torch.randn(32, 64, dtype=torch.float64, requires_grad=True)
    w = torch.randn(64, dtype=torch.float64, requires_grad=True)
    b = torch.randn(64, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.zeros(64, dtype=torch.float64), torch.ones(64, dtype=torch.float64)
    out = mmops.batch_norm(x, rm, rv, w, b, True, activation="tanh")
    assert type(out.grad_fn).__name__ == "BatchNormFunctionBackward"
    go = torch.randn_like(out)
    out.backward(go)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    rm2, rv2 = torch.zeros_like(rm), torch.ones_like(rv)
    torch.tanh(F.batch_norm(leaves[0], rm2, rv2, leaves[1], leaves[2], True)).backward(go)
    for mine, ref in zip((x, w, b), leaves):
        torch.testing.assert_close(mine.grad, ref.grad)
    torch.testing.assert_close(rm, rm2)
    torch.testing.assert_close(rv, rv2)


def test_functorch_transform_takes_the_public_path():
    # Function.apply's own answer under a transform (these Functions define no setup_context): the same error
    x, y = torch.randn(4, 5), torch.randint(0, 5, (4,))
    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.grad(lambda x: mmops.cross_entropy(x, y))(x)
    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.grad(lambda x: mmops.batch_norm(x, None, None, training=True).sum())(x)
    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.grad(lambda x: BatchNormFunction.apply(x, None, None, None, None, True, 0.1, 1e-5, False, 0).sum())(x)


def test_dead_functorch_wrappers_are_unwrapped_as_function_apply_does():
    # Function.apply unwraps them (the leftover tensor does not require grad): so must the direct call, or the
    # result would carry a graph node that PyTorch's own op does not give it.
    x, y = _dead_wrapper((4, 5)), torch.randint(0, 5, (4,))
    loss = mmops.cross_entropy(x, y)
    assert loss.grad_fn is None and not loss.requires_grad
    torch.testing.assert_close(loss, F.cross_entropy(x, y))
    out = mmops.batch_norm(x, None, None, training=True)
    assert out.grad_fn is None and not out.requires_grad
    torch.testing.assert_close(out, F.batch_norm(x, None, None, training=True))
