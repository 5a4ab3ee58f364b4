"""Loads the compiled library (which registers torch.ops.mmops.*) and holds what every op family shares: the codes
of the schema's int arguments, and the rule that the ops' gradients are first-order only."""
import functools

import torch

from . import _C  # registers the ops

ops = torch.ops.mmops

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}  # at::Reduction's codes
# The one activation vocabulary of BatchNorm's `activation` and the RNN's `nonlinearity` (csrc/cpu/simd.h).
ACTIVATIONS = {None: 0, "tanh": 1, "relu": 2}
LOW_PRECISION = (torch.float16, torch.bfloat16)  # computed in float32, returned in their own dtype


def empty_cache() -> int:
    """Frees the blocks of mmops' CPU output cache and returns the bytes freed. Large outputs of the CPU ops (at
    least 256 KB: BatchNorm's output and input gradient, cross-entropy's gradient) reuse freed blocks of the same
    size instead of new pages, which cost a page fault each (csrc/cpu/output_cache.cpp); the cache holds at most
    MMOPS_CPU_CACHE_MB megabytes (default 1024; 0 turns it off)."""
    return _C.empty_cache()


def first_order_only(name: str):
    """Decorates a Function's backward whose gradients are not themselves differentiable (the fused kernels
    compute them in one pass, with no graph). torch.autograd.function.once_differentiable lets one case through
    silently: with create_graph=True and a grad_output that does not require grad (a gradient penalty:
    torch.autograd.grad(loss, x, create_graph=True)), the gradient simply has no second-order term. Here any
    backward with create_graph=True raises, naming the op, before a wrong second derivative can be formed."""

    def wrap(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grad_outputs):
            if not torch.is_grad_enabled():  # the usual case: backward without create_graph, nothing to add
                return backward(ctx, *grad_outputs)
            if not torch.compiler.is_compiling():
                raise RuntimeError(
                    f"{name}: double backward is not supported: its gradient comes from a fused kernel with no "
                    f"graph of its own, so it cannot be differentiated again (create_graph=True). For second-order "
                    f"derivatives, e.g. a gradient penalty, use the PyTorch op.")
            with torch.no_grad():
                return backward(ctx, *grad_outputs)

        return wrapper

    return wrap


# torch.autograd.Function.apply's Python layer, taken apart for the drop-ins' usual call. That layer binds default
# arguments (only for Functions with a setup_context: none here), hands the call to functorch when a transform
# (vmap, grad, ...) is active, and otherwise unwraps the tensors left over from a finished transform ("dead
# wrappers") and calls the C++ apply (torch._C._FunctionBase.apply), which builds the graph node. At batch 32 that
# layer is a visible share of a whole forward+backward (AMD EPYC Zen 4, 2 threads, (32, 27) cross-entropy, 40
# interleaved rounds: 47.6 us through Function.apply, 42.0 us without it; F.cross_entropy 39.9 us). The drop-ins do
# the same work in fewer steps:
#     if plain_autograd(): return c_apply(unwrap_if_dead(tensor), ..., non-tensor arguments)
#     return Function.apply(...)
# The graph node, its ctx and its backward are the Function's own either way. A torch without these private hooks
# (torch 2.11 to 2.13 have them) takes the public Function.apply every time.
_functorch = getattr(torch._C, "_functorch", None)
unwrap_if_dead = getattr(_functorch, "unwrap_if_dead", None)
_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", None)
_HAVE_HOOKS = unwrap_if_dead is not None and _transforms_active is not None


def plain_autograd() -> bool:
    """True where Function.apply goes straight to the C++ apply: not traced by torch.compile, no functorch transform
    active (torch.compile must see the public Function.apply to trace the Function)."""
    return _HAVE_HOOKS and not torch.compiler.is_compiling() and not _transforms_active()


def c_apply(function_cls):
    """function_cls's C++ apply (torch._C._FunctionBase.apply bound to the class); only where plain_autograd()."""
    return super(torch.autograd.Function, function_cls).apply


def eager_or_op(eager, op):
    """The op `op` (a torch.ops overload) called through its eager entry point `eager` (mmops._C: the arguments
    converted in C++ and the op called unboxed below autograd, csrc/python_calls.cpp) where that applies, else through
    torch.ops: when torch.compile traces (it must see the op), or when `eager` returns NotImplemented (grad mode on, a
    functorch transform or dispatch mode active, a tensor subclass, an argument of another Python type). Same op,
    same kernel, same result either way."""
    is_compiling = torch.compiler.is_compiling

    def call(*args):
        if not is_compiling():
            out = eager(*args)
            if out is not NotImplemented:
                return out
        return op(*args)

    return call
