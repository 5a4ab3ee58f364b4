"""Loads the compiled library (which registers torch.ops.mmops.*) and names the reduction codes."""
import torch

from . import _C  # noqa: F401  (registers the ops)

ops = torch.ops.mmops

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}  # at::Reduction's codes
