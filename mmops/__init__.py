"""mmops: fused PyTorch operators (C++/CUDA) for the makemore models.

Public functions are drop-ins for their torch.nn.functional twins, each a torch.autograd.Function over the fused
kernels of torch.ops.mmops.* (internal building blocks, not differentiable on their own); mmops.nn holds the
modules. mmops.models, mmops.reference and mmops.testing are submodules (imported on first use).
"""
import importlib

from . import _ops  # noqa: F401  (loads the library: torch.ops.mmops.*)
from ._ops import empty_cache
from . import nn
from ._batch_norm import BatchNormFunction, batch_norm
from ._cross_entropy import CrossEntropyFunction, cross_entropy
from ._rnn import RNNFunction, rnn, rnn_cell
from ._sync_batch_norm import SyncBatchNormFunction

__version__ = "0.1.0"
__all__ = ["cross_entropy", "batch_norm", "rnn", "rnn_cell", "empty_cache", "CrossEntropyFunction", "BatchNormFunction",
           "RNNFunction", "SyncBatchNormFunction", "nn", "models", "reference", "testing"]

_SUBMODULES = ("models", "reference", "testing", "data")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'mmops' has no attribute {name!r}")


def __dir__():
    return sorted(set(__all__) | {"__version__"})
