"""cmp(): the notebook's `name | exact | approx | maxdiff` row, as data and printed."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class CmpRow:
    name: str
    exact: bool
    approx: bool
    maxdiff: float

    def __str__(self) -> str:
        return f"{self.name:24s} | exact: {str(self.exact):5s} | approx: {str(self.approx):5s} | maxdiff: {self.maxdiff:.3e}"


def cmp(name: str, manual: Tensor, t: Tensor, *, rtol: float | None = None, atol: float | None = None,
        verbose: bool = True) -> CmpRow:
    """Compare `manual` with `t.grad` (or with `t` itself when it has no .grad): exact equality, allclose,
    and the largest absolute difference. Tolerances default to torch.testing's for the dtype."""
    has_grad = isinstance(t, Tensor) and (t.is_leaf or t.retains_grad) and t.grad is not None
    other = t.grad if has_grad else t
    other = other.detach()
    manual = manual.detach()
    if manual.shape != other.shape:
        manual = manual.reshape(other.shape) if manual.numel() == other.numel() else manual
    exact = bool(torch.equal(manual, other.to(manual.dtype)))
    if rtol is None or atol is None:
        rtol, atol = {torch.float64: (1e-7, 1e-9), torch.float32: (1.3e-6, 1e-5)}.get(manual.dtype, (1.6e-2, 1e-3))
    approx = bool(torch.allclose(manual, other.to(manual.dtype), rtol=rtol, atol=atol, equal_nan=True))
    maxdiff = float((manual - other.to(manual.dtype)).abs().max()) if manual.numel() else 0.0
    row = CmpRow(name, exact, approx, maxdiff)
    if verbose:
        print(row)
    return row
