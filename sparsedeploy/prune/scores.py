"""Importance scores: how much each weight matters, as a tensor of the weight's shape.

A weight is ``W[out_features, in_features]``; a higher score means "keep this one".
Scores come back in float32 (float64 when the weight is float64) so that ranking a
bf16/fp16 checkpoint does not collapse near-equal values into ties.
"""

from __future__ import annotations

import torch

from sparsedeploy.errors import BadInput


def _score_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _check_matrix(weight: torch.Tensor, what: str = "weight") -> None:
    if weight.dim() != 2:
        raise BadInput(
            f"{what} has shape {list(weight.shape)}; pruning scores need a 2-D linear "
            "weight [out_features, in_features] (reshape or skip this parameter)"
        )


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|W|: the classic baseline; blind to how large the inputs of each column are."""
    _check_matrix(weight)
    return weight.detach().to(_score_dtype(weight)).abs()


def wanda_scores(weight: torch.Tensor, input_sq_norm: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 (Wanda, Sun et al. 2023).

    Weighting by the input norm makes a small weight on a column that carries outlier
    activations count as much as it contributes to the output. ``input_sq_norm[in]`` is
    the sum over calibration tokens of x_j**2 (see ``accumulate_input_sq_norm``); a mean
    instead of a sum scales every score by the same factor and gives the same masks.
    """
    _check_matrix(weight)
    in_features = weight.shape[1]
    if input_sq_norm.dim() != 1 or input_sq_norm.shape[0] != in_features:
        raise BadInput(
            f"input_sq_norm has shape {list(input_sq_norm.shape)} but the weight "
            f"{list(weight.shape)} has {in_features} input features; collect the "
            "activations that feed this very layer"
        )
    dtype = _score_dtype(weight)
    norm = input_sq_norm.detach().to(device=weight.device, dtype=torch.float64)
    if bool((norm < 0).any()):
        raise BadInput("input_sq_norm has negative entries; it must be a sum of squares")
    col = norm.sqrt().to(dtype).reshape(1, -1)
    return weight.detach().to(dtype).abs() * col


def accumulate_input_sq_norm(running: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """Add sum over tokens of x_j**2 to ``running`` so calibration can stream batches.

    ``x`` is [..., in]; every leading dimension counts as tokens. ``running`` may be
    None on the first batch: a float64 accumulator is started (sums over many tokens of
    squared outlier activations lose precision in float32). Otherwise ``running`` keeps
    its dtype (float32 or float64) and device; a new tensor is returned.
    """
    if x.dim() == 0:
        raise BadInput("activations must have shape [..., in_features], got a scalar")
    in_features = x.shape[-1]
    if running is None:
        running = torch.zeros(in_features, dtype=torch.float64, device=x.device)
    elif running.dim() != 1 or running.shape[0] != in_features:
        raise BadInput(
            f"running input norm has shape {list(running.shape)} but the activations "
            f"have {in_features} features; use one accumulator per layer input"
        )
    if running.dtype not in (torch.float32, torch.float64):
        raise BadInput(f"running input norm must be float32 or float64, got {running.dtype}")
    flat = x.detach().reshape(-1, in_features).to(device=running.device, dtype=torch.float64)
    batch = (flat * flat).sum(dim=0)
    return running + batch.to(running.dtype)
