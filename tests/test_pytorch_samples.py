"""PyTorch's own test inputs through the mmops drop-ins: the OpInfo samples of nn.functional.cross_entropy and
nn.functional.batch_norm, the ModuleInfo samples of CrossEntropyLoss, BatchNorm1d, RNN and RNNCell, and their error
inputs (same exception type as PyTorch). Outputs, running statistics and every gradient are compared with PyTorch's
op in float32 and float64. mmops refuses none of these samples."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence

import mmops
import mmops.nn

cmi = pytest.importorskip("torch.testing._internal.common_methods_invocations")
cm = pytest.importorskip("torch.testing._internal.common_modules")
from torch.testing._internal.common_modules import ModuleErrorEnum  # noqa: E402

DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-7, atol=1e-9)}
OPS = {"nn.functional.cross_entropy": (F.cross_entropy, mmops.cross_entropy),
       "nn.functional.batch_norm": (F.batch_norm, mmops.batch_norm)}
MODULES = {"CrossEntropyLoss": mmops.nn.CrossEntropyLoss, "BatchNorm1d": mmops.nn.BatchNorm1d, "RNN": mmops.nn.RNN,
           "RNNCell": mmops.nn.RNNCell}
OPINFOS = {o.name: o for o in cmi.op_db if o.name in OPS}
MODULEINFOS = {m.module_cls.__name__: m for m in cm.module_db if m.module_cls.__name__ in MODULES}


def _tensors(obj):
    """The tensors of a (nested) sample, in a fixed order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, PackedSequence):
        return [obj.data]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for k in sorted(obj) for t in _tensors(obj[k])]
    return []


def _fresh(obj):
    """A deep copy whose float leaves that required grad are new leaves that require grad."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().clone()
        return t.requires_grad_() if obj.requires_grad else t
    if isinstance(obj, PackedSequence):
        return PackedSequence(_fresh(obj.data), obj.batch_sizes, obj.sorted_indices, obj.unsorted_indices)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_fresh(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _fresh(v) for k, v in obj.items()}
    return copy.deepcopy(obj)


def _run(fn, inputs, grad_seed: int):
    """Calls fn on fresh copies of inputs; backpropagates a dense random gradient from every float output.
    Returns (outputs, the input tensors afterwards (running stats), the gradients of the inputs that require grad)."""
    args, kwargs = _fresh(inputs)
    out = fn(*args, **kwargs)
    outs = [t for t in _tensors(out) if t.is_floating_point()]
    diff = [t for t in outs if t.requires_grad]
    leaves = [t for t in _tensors((args, kwargs)) if t.requires_grad]
    grads = []
    if diff and leaves:
        g = torch.Generator().manual_seed(grad_seed)
        gos = [torch.randn(t.shape, dtype=t.dtype, generator=g) for t in diff]
        grads = torch.autograd.grad(diff, leaves, gos, allow_unused=True)
    return outs, _tensors((args, kwargs)), list(grads)


def _assert_same(got, want, dtype):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if w is None or g is None:
            assert g is None and w is None or (g is None and (w == 0).all()) or (w is None and (g == 0).all())
            continue
        torch.testing.assert_close(g, w, equal_nan=True, **TOL[dtype])


def _op_samples():
    for name, info in OPINFOS.items():
        for dtype in DTYPES:
            for i, s in enumerate(info.sample_inputs("cpu", dtype, requires_grad=True)):
                yield pytest.param(name, s, dtype, id=f"{name.split('.')[-1]}-{str(dtype)[6:]}-{i}")


@pytest.mark.parametrize("name,sample,dtype", list(_op_samples()))
def test_opinfo_sample_matches_pytorch(name, sample, dtype):
    torch_fn, mmops_fn = OPS[name]
    inputs = ((sample.input, *sample.args), dict(sample.kwargs))
    want = _run(torch_fn, inputs, 0)
    got = _run(mmops_fn, inputs, 0)
    for g, w in zip(got, want):
        _assert_same(g, w, dtype)


def _module_samples():
    for name, info in MODULEINFOS.items():
        for dtype in DTYPES:
            for training in (True, False):
                for i, mi in enumerate(info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True,
                                                               training=training)):
                    if mi.forward_input is None:
                        continue
                    yield pytest.param(name, mi, dtype, training, id=f"{name}-{str(dtype)[6:]}-{training}-{i}")


def _params_and_grads(module):
    return [p for _, p in sorted(module.named_parameters())]


@pytest.mark.parametrize("name,module_input,dtype,training", list(_module_samples()))
def test_moduleinfo_sample_matches_pytorch(name, module_input, dtype, training):
    info = MODULEINFOS[name]
    c = module_input.constructor_input
    torch.manual_seed(0)
    ref = info.module_cls(*c.args, **c.kwargs).to(dtype)
    mine = MODULES[name](*c.args, **c.kwargs).to(dtype)
    assert set(mine.state_dict()) == set(ref.state_dict())
    mine.load_state_dict(ref.state_dict())
    ref.train(training)
    mine.train(training)
    fi = module_input.forward_input
    inputs = (tuple(fi.args), dict(fi.kwargs))
    want = _run(ref, inputs, 1)
    got = _run(mine, inputs, 1)
    for g, w in zip(got[:2], want[:2]):
        _assert_same(g, w, dtype)
    for k, v in ref.state_dict().items():  # running statistics, num_batches_tracked
        torch.testing.assert_close(mine.state_dict()[k], v, equal_nan=True, **TOL[dtype])


def _module_errors():
    for name, info in MODULEINFOS.items():
        if info.module_error_inputs_func is None:
            continue
        for i, e in enumerate(info.module_error_inputs_func(info, device="cpu", dtype=torch.float32,
                                                            requires_grad=False, training=True)):
            yield pytest.param(name, e, id=f"{name}-error-{i}")


@pytest.mark.parametrize("name,error_input", list(_module_errors()))
def test_moduleinfo_error_input_raises_pytorchs_exception_type(name, error_input):
    mi = error_input.module_error_input
    c = mi.constructor_input
    with pytest.raises(error_input.error_type):
        m = MODULES[name](*c.args, **c.kwargs)
        if error_input.error_on == ModuleErrorEnum.FORWARD_ERROR:
            m(*mi.forward_input.args, **mi.forward_input.kwargs)
