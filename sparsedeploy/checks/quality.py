"""Quality on a fixed protocol: perplexity, and how closely one model's next-token
distributions follow another's (KL divergence, top-1 agreement) on the same tokens.

The protocol (`eval`, and every on-target check): the whole text tokenized once without
special tokens, non-overlapping windows of `seqlen` tokens, the first `windows` of them,
each window evaluated on its own from an empty context; every position but the last
predicts the next token, so a window yields seqlen - 1 predictions, and
ppl = exp(mean negative log-likelihood over all predictions of all windows).

The functions take logits, not models, so an engine that is not PyTorch (ONNX Runtime,
llama.cpp, TensorRT) is compared with the reference the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparsedeploy.ui import progress_iter


def next_token_nll(logits: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each next token: logits [T, V] of a window [T] -> [T-1]."""
    log_probs = F.log_softmax(logits[:-1].double(), dim=-1)
    return -log_probs.gather(-1, window[1:, None].to(log_probs.device)).squeeze(-1)


def kl_per_position(reference_logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """KL(P_reference || P_target) at each position: [T, V] x [T, V] -> [T]."""
    ref = F.log_softmax(reference_logits.double(), dim=-1)
    tgt = F.log_softmax(target_logits.double(), dim=-1)
    return (ref.exp() * (ref - tgt)).sum(dim=-1)


def top1_matches(reference_logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """Whether the most likely next token is the same at each position: -> bool [T]."""
    return reference_logits.argmax(dim=-1) == target_logits.argmax(dim=-1)


@dataclass
class PerplexityAccumulator:
    nll_sum: float = 0.0
    tokens: int = 0

    def add(self, logits: torch.Tensor, window: torch.Tensor) -> None:
        nll = next_token_nll(logits, window)
        self.nll_sum += float(nll.sum())
        self.tokens += nll.numel()

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.tokens

    @property
    def ppl(self) -> float:
        return math.exp(self.mean_nll)


@dataclass
class DistributionComparison:
    """Streams windows, so a run over many windows never holds more than one window's
    logits: [T, V] with a 50k vocabulary is already 200 MB per 1k tokens."""

    kl_sum: float = 0.0
    top1_agree: int = 0
    positions: int = 0

    def add(self, reference_logits: torch.Tensor, target_logits: torch.Tensor) -> None:
        # Only positions that predict a token of the window, as perplexity counts them.
        reference_logits, target_logits = reference_logits[:-1], target_logits[:-1]
        self.kl_sum += float(kl_per_position(reference_logits, target_logits).sum())
        self.top1_agree += int(top1_matches(reference_logits, target_logits).sum())
        self.positions += reference_logits.shape[0]

    @property
    def kl_mean(self) -> float:
        return self.kl_sum / self.positions

    @property
    def top1_agreement(self) -> float:
        return self.top1_agree / self.positions


LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # window [T] -> logits [T, V]


def torch_logits_fn(model: torch.nn.Module) -> LogitsFn:
    """Logits of a PyTorch causal LM for one window, on the model's device, float32 on CPU."""
    device = next(model.parameters()).device

    @torch.no_grad()
    def logits(window: torch.Tensor) -> torch.Tensor:
        output = model(input_ids=window[None].to(device), use_cache=False)
        return output.logits[0].float().cpu()

    return logits


@dataclass(frozen=True)
class QualityResult:
    ppl: float
    mean_nll: float
    tokens: int
    ppl_reference: float | None = None
    kl_mean: float | None = None
    top1_agreement: float | None = None


def evaluate(
    target: LogitsFn,
    windows: Iterable[torch.Tensor] | torch.Tensor,
    reference: LogitsFn | None = None,
    description: str = "Evaluating",
) -> QualityResult:
    """Perplexity of ``target`` on the windows; with a ``reference``, also the reference's
    perplexity and the KL divergence / top-1 agreement of target against reference."""
    windows = list(windows)
    target_ppl, reference_ppl = PerplexityAccumulator(), PerplexityAccumulator()
    comparison = DistributionComparison()
    for window in progress_iter(windows, description, total=len(windows)):
        target_logits = target(window)
        target_ppl.add(target_logits, window)
        if reference is not None:
            reference_logits = reference(window)
            reference_ppl.add(reference_logits, window)
            comparison.add(reference_logits, target_logits)
    if reference is None:
        return QualityResult(target_ppl.ppl, target_ppl.mean_nll, target_ppl.tokens)
    return QualityResult(
        target_ppl.ppl,
        target_ppl.mean_nll,
        target_ppl.tokens,
        ppl_reference=reference_ppl.ppl,
        kl_mean=comparison.kl_mean,
        top1_agreement=comparison.top1_agreement,
    )
