"""Turning importance scores into keep-masks (bool, weight's shape, True = keep).

Counts are exact and ties are broken deterministically: among equal scores the one
with the lower flat index (row-major) is pruned first, so the same scores always give
the same mask on every machine.
"""

from __future__ import annotations

import math

import torch

from sparsedeploy.errors import BadInput
from sparsedeploy.prune.patterns import NMPattern

# Tolerance for floor(total * sparsity): 0.29 * 100 is 28.999999999999996 in floating
# point, and the user who asked for 29% of 100 weights expects 29 pruned.
_COUNT_EPS = 1e-9


def prune_count(total: int, sparsity: float) -> int:
    """floor(total * sparsity), robust to the sparsity not being exact in binary."""
    check_sparsity(sparsity)
    return min(total, int(math.floor(total * sparsity + _COUNT_EPS)))


def check_sparsity(sparsity: float) -> None:
    if not (isinstance(sparsity, (int, float)) and 0.0 <= float(sparsity) < 1.0):
        raise BadInput(f"sparsity {sparsity!r} must be in [0, 1); e.g. --sparsity 0.5")


def _check_scores(scores: torch.Tensor) -> None:
    if scores.dim() != 2:
        raise BadInput(
            f"scores have shape {list(scores.shape)}; masks are built for 2-D linear "
            "weights [out_features, in_features]"
        )
    if scores.is_floating_point() and bool(torch.isnan(scores).any()):
        raise BadInput(
            "importance scores contain NaN: the checkpoint weights or the calibration "
            "activations contain NaN/inf; check the checkpoint and the calibration data"
        )


def prune_lowest(scores: torch.Tensor, count: int, *, per_row: bool = False) -> torch.Tensor:
    """Mask that prunes exactly ``count`` lowest scores (per row, or over the whole tensor)."""
    _check_scores(scores)
    group = scores.reshape(scores.shape[0], -1) if per_row else scores.reshape(1, -1)
    if not 0 <= count <= group.shape[1]:
        raise ValueError(f"cannot prune {count} of {group.shape[1]} entries")
    keep = torch.ones(group.shape, dtype=torch.bool, device=scores.device)
    if count > 0:
        # Stable ascending sort: equal scores keep index order, so the lower index is
        # pruned first -- deterministic, independent of the sort backend.
        order = torch.sort(group, dim=1, stable=True).indices[:, :count]
        keep.scatter_(1, order, False)
    return keep.reshape(scores.shape)


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """Prune the lowest ``sparsity`` fraction.

    ``per_row=True`` compares weights only within an output row (Wanda's comparison
    group: it keeps every output neuron equally dense); ``per_row=False`` ranks the
    whole matrix (global magnitude pruning). Exactly floor(in*sparsity) per row, or
    floor(numel*sparsity) overall, are pruned.
    """
    _check_scores(scores)
    if per_row:
        return prune_lowest(scores, prune_count(scores.shape[1], sparsity), per_row=True)
    return prune_lowest(scores, prune_count(scores.numel(), sparsity), per_row=False)


def check_nm_shape(shape: torch.Size | tuple[int, ...], pattern: NMPattern) -> None:
    """Raise BadInput when a weight's input dimension cannot be cut into M-wide groups."""
    in_features = shape[-1]
    if in_features % pattern.m != 0:
        raise BadInput(
            f"weight of shape {list(shape)} has in_features={in_features}, not a multiple "
            f"of M={pattern.m}, so {pattern} sparsity cannot be applied to it; leave this "
            "layer dense (exclude it) or use unstructured sparsity (--sparsity) instead"
        )


def nm_mask(scores: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """In every group of M consecutive input columns keep the N highest scores.

    Groups run along the input dimension because that is what sparse tensor cores
    (2:4) and cuSPARSELt/TensorRT consume.
    """
    _check_scores(scores)
    check_nm_shape(scores.shape, pattern)
    rows, cols = scores.shape
    groups = scores.reshape(rows * (cols // pattern.m), pattern.m)
    return prune_lowest(groups, pattern.m - pattern.n, per_row=True).reshape(rows, cols)
