"""The registry of pruning methods. A method says which calibration statistics it needs
from a linear sublayer's inputs and how it turns a weight plus those statistics into a
pruned weight; the math itself lives in scores.py, masks.py and sparsegpt.py.

Adding a method is one class here with ``@register_method``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from sparsedeploy.errors import BadInput
from sparsedeploy.prune.masks import nm_mask, unstructured_mask
from sparsedeploy.prune.patterns import NMPattern
from sparsedeploy.prune.scores import accumulate_input_sq_norm, magnitude_scores, wanda_scores
from sparsedeploy.prune.sparsegpt import hessian_accumulate, sparsegpt_prune


@dataclass(frozen=True)
class SparsityTarget:
    """Either an unstructured fraction or an N:M pattern along the input dimension."""

    sparsity: float | None = None
    pattern: NMPattern | None = None

    def __post_init__(self):
        if (self.sparsity is None) == (self.pattern is None):
            raise BadInput("give exactly one of --sparsity (unstructured) or --pattern N:M")
        if self.sparsity is not None and not 0.0 < self.sparsity < 1.0:
            raise BadInput(f"--sparsity {self.sparsity} must be between 0 and 1 (e.g. 0.5)")

    @property
    def label(self) -> str:
        return str(self.pattern) if self.pattern else "unstructured"

    @property
    def fraction(self) -> float:
        return self.pattern.sparsity if self.pattern else self.sparsity


class Statistics:
    """What a method accumulates from one linear sublayer's calibration inputs."""

    def add(self, inputs: torch.Tensor) -> None:
        raise NotImplementedError


class NoStatistics(Statistics):
    def add(self, inputs: torch.Tensor) -> None:
        pass


class InputSquareNorms(Statistics):
    """Per input feature, the sum over tokens of x_j^2 (Wanda's ||X_j||^2)."""

    def __init__(self):
        self.value: torch.Tensor | None = None

    def add(self, inputs: torch.Tensor) -> None:
        self.value = accumulate_input_sq_norm(self.value, inputs)


class InputHessian(Statistics):
    """H = 2 X X^T / n over the calibration tokens (SparseGPT)."""

    def __init__(self):
        self.value: torch.Tensor | None = None
        self.tokens = 0

    def add(self, inputs: torch.Tensor) -> None:
        self.value, self.tokens = hessian_accumulate(self.value, self.tokens, inputs)


class PruningMethod:
    name: ClassVar[str]
    calibrated: ClassVar[bool]  # False: no calibration forward passes at all

    def statistics(self) -> Statistics:
        return NoStatistics()

    def prune(self, weight: torch.Tensor, statistics: Statistics, target: SparsityTarget) -> torch.Tensor:
        raise NotImplementedError


_METHODS: dict[str, type[PruningMethod]] = {}


def register_method(cls: type[PruningMethod]) -> type[PruningMethod]:
    _METHODS[cls.name] = cls
    return cls


def method_names() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> PruningMethod:
    if name not in _METHODS:
        raise BadInput(f"unknown pruning method '{name}'; use one of: {', '.join(method_names())}")
    return _METHODS[name]()


def _apply_scores(weight: torch.Tensor, scores: torch.Tensor, target: SparsityTarget, per_row: bool) -> torch.Tensor:
    if target.pattern is not None:
        mask = nm_mask(scores, target.pattern)
    else:
        mask = unstructured_mask(scores, target.sparsity, per_row=per_row)
    return weight * mask.to(weight.dtype)


@register_method
class Magnitude(PruningMethod):
    """Smallest |W| over each weight matrix (unstructured) or in each group of M."""

    name = "magnitude"
    calibrated = False

    def prune(self, weight, statistics, target):
        return _apply_scores(weight, magnitude_scores(weight), target, per_row=False)


@register_method
class Wanda(PruningMethod):
    """|W_ij| * ||X_j||, compared within each output row (or each group of M)."""

    name = "wanda"
    calibrated = True

    def statistics(self) -> Statistics:
        return InputSquareNorms()

    def prune(self, weight, statistics, target):
        return _apply_scores(weight, wanda_scores(weight, statistics.value), target, per_row=True)


@register_method
class SparseGPT(PruningMethod):
    """Mask and OBS weight update from the layer's input Hessian."""

    name = "sparsegpt"
    calibrated = True

    def statistics(self) -> Statistics:
        return InputHessian()

    def prune(self, weight, statistics, target):
        pruned, _ = sparsegpt_prune(weight, statistics.value, sparsity=target.sparsity, pattern=target.pattern)
        return pruned
