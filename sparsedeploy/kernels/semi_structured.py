"""2:4 linear layers on cuSPARSELt, chosen per layer against dense by timing both.

cuSPARSELt multiplies a compressed 2:4 weight [out, in] (half the values plus 2-bit
indices) with a dense operand. A linear layer computes x @ W^T, so the kernel gets
``W_compressed @ x^T`` and writes the transposed result, [tokens, out], directly.

Why a plan and not "always sparse": a sparse call is only faster when the GEMM is large
enough and the launch overhead is gone (CUDA graphs). On small layers, few tokens or
eager execution 2:4 loses to cuBLAS. ``time_kernels`` measures both at the token counts
the workload runs, under CUDA graphs, and ``choose_kernel`` keeps sparse only where it
measured faster by a margin beyond timing noise, so a build is never silently slower.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from sparsedeploy.prune.patterns import nm_compliance, parse_nm

TWO_OF_FOUR = parse_nm("2:4")

# cuSPARSELt needs the dense operand's token dimension padded (fp16/bf16: multiple of 16).
TOKEN_ALIGNMENT = 16
# Sparse must beat dense by this much to be chosen: below it, run-to-run noise decides.
SPARSE_WIN_MARGIN = 1.03
# Layer widths cuSPARSELt takes for fp16/bf16 2:4 (both dimensions multiples of this).
WIDTH_ALIGNMENT = 16


def padded_tokens(tokens: int) -> int:
    return max(TOKEN_ALIGNMENT, math.ceil(tokens / TOKEN_ALIGNMENT) * TOKEN_ALIGNMENT)


def is_2of4(weight: torch.Tensor) -> bool:
    """Every group of 4 consecutive input columns has at most 2 non-zeros (and there is
    no partial group the kernel could not take)."""
    return weight.shape[1] % 4 == 0 and nm_compliance(weight, TWO_OF_FOUR) == 1.0


def sparse_ineligibility(weight: torch.Tensor) -> str | None:
    """Why this weight cannot run on the 2:4 kernel (None: it can)."""
    out_features, in_features = weight.shape
    if out_features % WIDTH_ALIGNMENT or in_features % WIDTH_ALIGNMENT:
        return f"shape {out_features}x{in_features} is not a multiple of {WIDTH_ALIGNMENT}"
    if not is_2of4(weight):
        return "not 2:4 sparse"
    return None


def compress(weight: torch.Tensor) -> torch.Tensor:
    """The 2:4 weight in cuSPARSELt's compressed form (half the values plus indices)."""
    return torch._cslt_compress(weight.contiguous())


def sparse_linear(compressed: torch.Tensor, x2d: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x2d [tokens, in] @ W^T (+ bias) with W from :func:`compress`: cuSPARSELt computes
    W @ x^T [out, tokens] and the transposed view is returned.

    Measured on an H100 (torch 2.11, cuSPARSELt 0.8, benchmarks/results/gpu_24.json
    "probe"): the same product asked for with ``transpose_result=True`` cost 0.2-0.3 s per
    eager call and 2-5x the dense time under graphs. This form is what the end-to-end
    build and the GPU tests ran. torch's semi-structured tensor (F.linear on
    ``to_sparse_semi_structured``) timed faster per layer at 2k tokens (11008x4096: 174
    us vs 315 us here, 249 us dense) and is the next thing to try in whole models.
    """
    tokens = x2d.shape[0]
    padded = padded_tokens(tokens)
    if padded != tokens:
        x2d = F.pad(x2d, (0, 0, 0, padded - tokens))
    out = torch._cslt_sparse_mm(compressed, x2d.t(), bias=bias).t()
    return out[:tokens] if padded != tokens else out


def nearest_planned(tokens: int, planned: list[int]) -> int:
    """The planned token count closest to ``tokens`` on a log scale (GEMM cost grows
    roughly in proportion, so 600 tokens behave like 512, not like 4096)."""
    return min(planned, key=lambda p: abs(math.log(p) - math.log(max(tokens, 1))))


class PlannedLinear(nn.Module):
    """A linear layer that runs the 2:4 kernel or the dense one, per token count, as its
    plan says. It keeps only the weight forms its plan uses."""

    def __init__(self, linear: nn.Linear, kernel_by_tokens: dict[int, str]):
        super().__init__()
        weight = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.kernel_by_tokens = dict(kernel_by_tokens)
        self.planned = sorted(self.kernel_by_tokens)
        kernels = set(self.kernel_by_tokens.values())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.weight = nn.Parameter(weight, requires_grad=False) if "dense" in kernels else None
        self.register_buffer("compressed", compress(weight) if "sparse" in kernels else None)

    def kernel_for(self, tokens: int) -> str:
        return self.kernel_by_tokens[nearest_planned(tokens, self.planned)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features)
        if self.kernel_for(x2d.shape[0]) == "dense":
            out = F.linear(x2d, self.weight, self.bias)
        else:
            out = sparse_linear(self.compressed, x2d, self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)


@dataclass
class KernelTiming:
    tokens: int
    dense_ms: float
    sparse_ms: float

    @property
    def ratio(self) -> float:
        """dense time / sparse time: above 1, the 2:4 kernel is faster."""
        return self.dense_ms / self.sparse_ms


def choose_kernel(timing: KernelTiming, margin: float = SPARSE_WIN_MARGIN) -> str:
    return "sparse" if timing.ratio >= margin else "dense"


def time_call(fn, repeats: int = 20, samples: int = 7, graphs: bool = True) -> float:
    """Median milliseconds of one ``fn()`` call: ``repeats`` calls captured in one CUDA
    graph (launch overhead gone, as in serving) or issued eagerly, timed with events."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up: handles, workspaces, cuSPARSELt plans
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    if graphs:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(repeats):
                fn()
        run = graph.replay
    else:
        def run():
            for _ in range(repeats):
                fn()
    run()
    times = []
    for _ in range(samples):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / repeats)
    return statistics.median(times)


def time_pair(dense, sparse, weight: torch.Tensor, token_counts: list[int], graphs: bool = True) -> list[KernelTiming]:
    """``dense(x)`` and ``sparse(x)`` timed at each token count, on random activations of
    the weight's width, device and dtype (never zeros: they can time faster than data)."""
    timings = []
    for tokens in token_counts:
        x = torch.randn(tokens, weight.shape[1], device=weight.device, dtype=weight.dtype)
        dense_ms = time_call(lambda: dense(x), graphs=graphs)
        sparse_ms = time_call(lambda: sparse(x), graphs=graphs)
        timings.append(KernelTiming(tokens, dense_ms, sparse_ms))
    return timings


def time_kernels(weight: torch.Tensor, bias: torch.Tensor | None, token_counts: list[int], graphs: bool = True) -> list[KernelTiming]:
    """Dense (cuBLAS) and 2:4 (cuSPARSELt) time of x @ W^T at each token count."""
    compressed = compress(weight)
    return time_pair(lambda x: F.linear(x, weight, bias), lambda x: sparse_linear(compressed, x, bias), weight,
                     token_counts, graphs)


@dataclass
class LayerPlan:
    name: str
    shape: tuple[int, int]
    kernels: dict[int, str]  # token count -> "sparse" | "dense"
    timings: list[KernelTiming] = field(default_factory=list)
    reason: str = ""  # why a layer stays dense without timing

    def to_dict(self) -> dict:
        return {
            "name": self.name, "shape": list(self.shape), "reason": self.reason,
            "kernels": {str(t): k for t, k in sorted(self.kernels.items())},
            "timings": [{"tokens": t.tokens, "dense_ms": round(t.dense_ms, 5), "sparse_ms": round(t.sparse_ms, 5),
                         "ratio": round(t.ratio, 4)} for t in self.timings],
        }

    @classmethod
    def from_dict(cls, data: dict) -> LayerPlan:
        timings = [KernelTiming(t["tokens"], t["dense_ms"], t["sparse_ms"]) for t in data.get("timings", [])]
        kernels = {int(t): k for t, k in data["kernels"].items()}
        return cls(data["name"], tuple(data["shape"]), kernels, timings, data.get("reason", ""))


def named_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(module path, layer) of every decoder linear sublayer, as the adapter finds them."""
    from sparsedeploy.models.adapters import adapter_for

    return [(linear.name, linear.module) for linear in adapter_for(model).linear_sublayers()]


def plan_layers(linears: list[tuple[str, nn.Linear]], token_counts: list[int], int8: bool = False) -> list[LayerPlan]:
    """A kernel per layer and token count (``int8``: the W8A8 kernels of
    ``sparsedeploy.kernels.int8``). Layers of one shape share one timing (the same GEMM:
    timing each again would only let noise flip choices between twins). A shape the 2:4
    kernel refuses stays dense, with the library's reason."""
    from sparsedeploy.kernels.int8 import time_int8_kernels

    timer = time_int8_kernels if int8 else time_kernels
    token_counts = sorted(set(token_counts))
    by_shape: dict[tuple, list[KernelTiming] | str] = {}
    plans = []
    for name, linear in linears:
        shape = tuple(linear.weight.shape)
        reason = sparse_ineligibility(linear.weight)
        key = (shape, linear.bias is not None, linear.weight.dtype)
        if not reason and key not in by_shape:
            try:
                by_shape[key] = timer(linear.weight.detach(), None if linear.bias is None else linear.bias.detach(), token_counts)
            except RuntimeError as error:  # found in the eager warm-up, before any graph capture
                by_shape[key] = f"the 2:4 kernel refused it: {str(error).strip().splitlines()[0][:120]}"
        if not reason and isinstance(by_shape[key], str):
            reason = by_shape[key]
        if reason:
            plans.append(LayerPlan(name, shape, {t: "dense" for t in token_counts}, reason=reason))
            continue
        timings = by_shape[key]
        plans.append(LayerPlan(name, shape, {t.tokens: choose_kernel(t) for t in timings}, timings))
    return plans


def apply_plan(model: nn.Module, plans: list[LayerPlan], int8: bool = False) -> None:
    """Replace each planned nn.Linear (by its module path) with a PlannedLinear, or with an
    Int8PlannedLinear (W8A8) for an int8 build."""
    from sparsedeploy.kernels.int8 import Int8PlannedLinear

    planned_class = Int8PlannedLinear if int8 else PlannedLinear
    for plan in plans:
        parent_name, _, child = plan.name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{plan.name} is {type(linear).__name__}, not nn.Linear")
        setattr(parent, child, planned_class(linear, plan.kernels))


def plan_summary(plans: list[LayerPlan]) -> dict:
    """Per token count: how many layers run sparse, and the FLOP-weighted ratio of the
    timed layers (what the linear layers alone would gain)."""
    summary = {}
    token_counts = sorted({t for plan in plans for t in plan.kernels})
    for tokens in token_counts:
        sparse = [p for p in plans if p.kernels.get(tokens) == "sparse"]
        dense_total = chosen_total = 0.0
        for plan in plans:
            timing = next((t for t in plan.timings if t.tokens == tokens), None)
            if timing is None:
                continue
            dense_total += timing.dense_ms
            chosen_total += timing.sparse_ms if plan.kernels[tokens] == "sparse" else timing.dense_ms
        summary[str(tokens)] = {
            "sparse_layers": len(sparse), "layers": len(plans),
            "linear_speedup": round(dense_total / chosen_total, 4) if chosen_total else None,
        }
    return summary
