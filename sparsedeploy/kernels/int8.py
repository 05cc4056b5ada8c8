"""W8A8 linear layers for the cuda target's int8 builds: weights int8 per output channel,
activations int8 per token (computed on the fly), int32 accumulation, rescaled to 16-bit.

Symmetric quantization without a zero point keeps every pruned zero at zero, so a 2:4
weight is still 2:4 in int8 and cuSPARSELt's int8 2:4 kernel can take it; the dense
int8 GEMM (``torch._int_mm``, cuBLASLt on a GPU) is what it is timed against. The
quantization is a pure function of the 16-bit weights, so an int8 build ships those and
quantizes them at load, the same way every time.

The math is tested on small tensors on a CPU, where ``torch._int_mm`` runs too; the 2:4
kernel needs a GPU.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsedeploy.kernels.semi_structured import (
    KernelTiming,
    nearest_planned,
    padded_tokens,
    time_pair,
)

INT8_MAX = 127
# cuBLASLt's int8 GEMM (torch._int_mm on a GPU) takes more than 16 rows, in multiples of 8.
DENSE_INT8_MIN_TOKENS = 32


def quantize_rows(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row, no zero point: (int8 [rows, cols], float32 scale [rows, 1]).
    A zero stays exactly zero; an all-zero row gets scale 1."""
    values = matrix.detach().float()
    magnitude = values.abs().amax(dim=1, keepdim=True)
    scale = torch.where(magnitude > 0, magnitude / INT8_MAX, torch.ones_like(magnitude))
    return torch.round(values / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def quantize_weight_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output channel: (int8 [out, in], float32 scale [out])."""
    quantized, scale = quantize_rows(weight)
    return quantized, scale[:, 0]


def quantize_tokens(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: (int8 [T, in], float32 scale [T, 1])."""
    return quantize_rows(x2d)


def dense_int8_matmul(x_q: torch.Tensor, weight_q: torch.Tensor) -> torch.Tensor:
    """x_q [T, in] @ weight_q^T in int32 [T, out] (rows padded where the GPU kernel needs it).

    On a CPU, torch._int_mm is a slow reference loop (1024x576 @ 576x1536: 0.6 s against
    0.04 s in float32 here), so the products are taken in float64 instead, where sums of
    int8 products are exact: the same int32 result."""
    if not x_q.is_cuda:
        return (x_q.double() @ weight_q.double().t()).to(torch.int32)
    tokens = x_q.shape[0]
    padded = max(DENSE_INT8_MIN_TOKENS, padded_tokens(tokens))
    if padded != tokens:
        x_q = torch.nn.functional.pad(x_q, (0, 0, 0, padded - tokens))
    return torch._int_mm(x_q, weight_q.t())[:tokens]


def sparse_int8_matmul(compressed: torch.Tensor, x_q: torch.Tensor) -> torch.Tensor:
    """The same with the 2:4 weight compressed by cuSPARSELt (GPU only): it computes
    W @ x^T [out, T] with int32 output; the transposed view is returned."""
    tokens = x_q.shape[0]
    padded = padded_tokens(tokens)
    if padded != tokens:
        x_q = torch.nn.functional.pad(x_q, (0, 0, 0, padded - tokens))
    return torch._cslt_sparse_mm(compressed, x_q.t(), out_dtype=torch.int32).t()[:tokens]


def rescale(accumulated: torch.Tensor, token_scale: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
            dtype: torch.dtype) -> torch.Tensor:
    """int32 products back to ``dtype``: times each token's and each channel's scale."""
    out = (accumulated.float() * token_scale * weight_scale[None, :]).to(dtype)
    return out if bias is None else out + bias


class Int8PlannedLinear(nn.Module):
    """A linear layer run in W8A8: its weight quantized per output channel at construction,
    its input per token at each call, the int8 2:4 or the dense int8 GEMM per token count as
    its plan says (only the weight forms the plan uses are kept)."""

    def __init__(self, linear: nn.Linear, kernel_by_tokens: dict[int, str]):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.out_dtype = linear.weight.dtype
        self.kernel_by_tokens = dict(kernel_by_tokens)
        self.planned = sorted(self.kernel_by_tokens)
        kernels = set(self.kernel_by_tokens.values())
        weight_q, weight_scale = quantize_weight_rows(linear.weight)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("weight_q", weight_q if "dense" in kernels else None)
        self.register_buffer("compressed", torch._cslt_compress(weight_q) if "sparse" in kernels else None)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def kernel_for(self, tokens: int) -> str:
        return self.kernel_by_tokens[nearest_planned(tokens, self.planned)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features)
        x_q, token_scale = quantize_tokens(x2d)
        if self.kernel_for(x2d.shape[0]) == "dense":
            accumulated = dense_int8_matmul(x_q, self.weight_q)
        else:
            accumulated = sparse_int8_matmul(self.compressed, x_q)
        out = rescale(accumulated, token_scale, self.weight_scale, self.bias, self.out_dtype)
        return out.reshape(*x.shape[:-1], self.out_features)


def time_int8_kernels(weight: torch.Tensor, bias: torch.Tensor | None, token_counts: list[int],
                      graphs: bool = True) -> list[KernelTiming]:
    """Dense int8 and int8 2:4 time of one whole W8A8 call (quantizing the input and
    rescaling the output included: both kernels pay them) at each token count."""
    dense = Int8PlannedLinear(_as_linear(weight, bias), {1: "dense"})
    sparse = Int8PlannedLinear(_as_linear(weight, bias), {1: "sparse"})
    return time_pair(dense, sparse, weight, token_counts, graphs)


def _as_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear
