"""OWL (Yin et al. 2023): outlier-weighted layerwise sparsity.

LLM layers differ in how many "outlier" weights (large Wanda scores) they carry, and
those layers hurt most when pruned. OWL measures each layer's outlier ratio and gives
layers with more outliers a LOWER sparsity, keeping the model's mean sparsity at the
target. A "layer" here is whatever the caller groups: the paper pools all linear
sublayers of one decoder block, which ``outlier_ratio`` supports by taking a list.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sparsedeploy.errors import BadInput
from sparsedeploy.prune.masks import check_sparsity

DEFAULT_THRESHOLD_M = 5.0
DEFAULT_LAMBDA = 0.08


def outlier_ratio(
    scores: torch.Tensor | Sequence[torch.Tensor], threshold_m: float = DEFAULT_THRESHOLD_M
) -> float:
    """Fraction of scores greater than ``threshold_m`` times the layer's mean score.

    ``scores`` are Wanda scores of one layer, or a list of them (the sublayers of one
    decoder block, pooled into one population as the paper's code does).
    """
    parts = [scores] if isinstance(scores, torch.Tensor) else list(scores)
    if not parts or sum(p.numel() for p in parts) == 0:
        raise BadInput("outlier_ratio needs at least one non-empty score tensor")
    if threshold_m <= 0:
        raise BadInput(f"OWL threshold M must be > 0, got {threshold_m}; the paper uses 5")
    total = sum(p.numel() for p in parts)
    mean = sum(float(p.detach().double().sum().item()) for p in parts) / total
    threshold = threshold_m * mean
    above = sum(int((p.detach().double() > threshold).sum().item()) for p in parts)
    return above / total


def owl_layer_sparsities(
    outlier_ratios: Sequence[float],
    target_sparsity: float,
    lam: float = DEFAULT_LAMBDA,
) -> list[float]:
    """Per-layer sparsities in [target - lam, target + lam] with mean == target.

    As in the paper's code: ratios are min-max normalised to [0, 2*lam], and each
    layer's sparsity is target minus (its normalised ratio minus the mean normalised
    ratio), so the mean is the target and more outliers means less sparsity. When the
    ratios are skewed (one layer far from the rest) that shift can reach 2*lam away from
    the target; the paper states the band [target-lam, target+lam], so in that case all
    offsets are scaled down by one common factor -- mean and ordering are unchanged.
    Equal ratios (or a single layer) give every layer the target.
    """
    check_sparsity(target_sparsity)
    if not lam >= 0:
        raise BadInput(f"OWL lambda must be >= 0, got {lam}; the paper uses 0.08")
    if target_sparsity - lam < 0 or target_sparsity + lam >= 1:
        raise BadInput(
            f"OWL lambda {lam:g} around target sparsity {target_sparsity:g} leaves [0, 1); "
            f"use a lambda of at most {min(target_sparsity, 1 - target_sparsity):g}"
        )
    ratios = [float(r) for r in outlier_ratios]
    if not ratios:
        return []
    if any(not (r == r) or r in (float("inf"), float("-inf")) for r in ratios):
        raise BadInput(f"OWL outlier ratios must be finite numbers, got {ratios}")
    lo, hi = min(ratios), max(ratios)
    if hi == lo or lam == 0:
        return [float(target_sparsity)] * len(ratios)
    normalised = [(r - lo) / (hi - lo) * 2 * lam for r in ratios]
    mean = sum(normalised) / len(normalised)
    offsets = [v - mean for v in normalised]
    widest = max(abs(o) for o in offsets)
    if widest > lam:
        offsets = [o * (lam / widest) for o in offsets]
    # Re-centre: removes the last ulp-level drift of the mean introduced by the scaling.
    drift = sum(offsets) / len(offsets)
    sparsities = [target_sparsity - (o - drift) for o in offsets]
    # Clamp away rounding that might step a hair outside the band.
    low, high = target_sparsity - lam, target_sparsity + lam
    return [min(high, max(low, s)) for s in sparsities]
