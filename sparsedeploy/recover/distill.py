"""The math of recovery, as small functions on tensors: the distillation loss and the
masks that keep a pruned pattern exact while the remaining weights train."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                    chunk_tokens: int = 256) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) between the next-token distributions at
    ``temperature``, scaled by T^2 (Hinton et al.) so the gradient size does not depend on
    T. Logits are [..., vocab]; the softmaxes are taken ``chunk_tokens`` rows at a time in
    float32, so a large vocabulary never needs a second full-size copy of the logits."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {list(student_logits.shape)} and teacher logits "
                         f"{list(teacher_logits.shape)} differ in shape")
    vocab = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocab)
    teacher = teacher_logits.reshape(-1, vocab)
    total = student.new_zeros((), dtype=torch.float32)
    for start in range(0, student.shape[0], chunk_tokens):
        s = student[start:start + chunk_tokens].float() / temperature
        t = teacher[start:start + chunk_tokens].float() / temperature
        t_log = F.log_softmax(t, dim=-1)
        total = total + (t_log.exp() * (t_log - F.log_softmax(s, dim=-1))).sum()
    return total * temperature**2 / student.shape[0]


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Plain language-model loss: mean cross-entropy of each position's next token."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), input_ids[:, 1:].reshape(-1))


def pruned_positions(parameters: Iterable[tuple[str, nn.Parameter]]) -> dict[str, torch.Tensor]:
    """name -> boolean tensor, True where the weight is exactly zero, for every weight
    that has zeros: what pruning removed and training must never bring back."""
    masks = {}
    for name, parameter in parameters:
        zeros = parameter.detach() == 0
        if bool(zeros.any()):
            masks[name] = zeros
    return masks


def masked_gradient(gradient: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    return gradient.masked_fill(zeros, 0.0)


def hold_pruned_weights(named: dict[str, nn.Parameter], masks: dict[str, torch.Tensor]) -> list:
    """Zero the gradient of every pruned position. With a zero gradient from step 0,
    Adam's moments stay zero there and (decoupled) weight decay scales zero by a factor,
    so those weights do not move; :func:`reapply_masks` after each step makes it exact
    whatever the optimizer. Returns the hook handles."""
    handles = []
    for name, zeros in masks.items():
        handles.append(named[name].register_hook(lambda gradient, zeros=zeros: masked_gradient(gradient, zeros)))
    return handles


@torch.no_grad()
def reapply_masks(named: dict[str, nn.Parameter], masks: dict[str, torch.Tensor]) -> None:
    for name, zeros in masks.items():
        named[name].masked_fill_(zeros, 0.0)


@torch.no_grad()
def revived_weights(named: dict[str, nn.Parameter], masks: dict[str, torch.Tensor]) -> dict[str, int]:
    """name -> how many pruned positions are no longer zero (empty when the pattern held)."""
    revived = {}
    for name, zeros in masks.items():
        count = int((named[name][zeros] != 0).sum())
        if count:
            revived[name] = count
    return revived
