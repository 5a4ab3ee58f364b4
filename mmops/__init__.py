"""mmops: fused PyTorch operators (C++/CUDA) for the makemore models.

Public functions are drop-ins for their torch.nn.functional twins; mmops.nn holds the modules.
"""
from . import _ops  # noqa: F401  (loads the library: torch.ops.mmops.*)
from . import nn  # noqa: F401
from .functional import batch_norm, cross_entropy, rnn, rnn_cell

__version__ = "0.1.0"
__all__ = ["cross_entropy", "batch_norm", "rnn", "rnn_cell"]
