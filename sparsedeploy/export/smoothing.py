"""SmoothQuant: move LLM activations' outlier channels into the weights before a
per-tensor INT8 activation scale has to hold them.

One scale per activation tensor (TensorRT's explicit INT8, ONNX Runtime's quantizers)
cannot serve the few channels with 10-100x larger values that LLM activations have: the
rest round to a handful of levels. ``smoothed_copy`` divides each such activation's
channels by factors ``s`` folded into the norm that writes it and multiplies the reading
linears' input channels by ``s``, so the model computes the same function (checked) and
the weights, whose per-channel or per-tensor scales absorb it more easily, carry the
range. Columns are scaled, so pruned zeros stay zeros and 2:4 stays 2:4. The math is in
pure functions (``smoothing_scales``) tested on small tensors; the groups of linears and
the norms that feed them are found by running the model, not from module names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sparsedeploy.errors import BadInput

# alpha balances how much range moves: 0.5 is SmoothQuant's default. On the 2:4 default
# model (WikiText-2) it took TensorRT's INT8 graph's KL from 0.22 to 0.027 and ONNX
# Runtime's int8-dynamic build's from 0.100 to 0.036; alpha 0.8 pushed the norms' float16
# weights too far for the float16 export to verify.
DEFAULT_SMOOTHQUANT_ALPHA = 0.5


def smoothquant_alpha(option) -> float | None:
    """A profile's ``smoothquant_alpha`` for INT8: absent -> the default, ``false`` ->
    None (no smoothing), else a number in [0, 1]."""
    if option is None:
        return DEFAULT_SMOOTHQUANT_ALPHA
    if option is False:
        return None
    if isinstance(option, bool) or not isinstance(option, (int, float)) or not 0.0 <= float(option) <= 1.0:
        raise BadInput(f"smoothquant_alpha in [build] must be a number in [0, 1] or false, not {option!r}; 0.5 is the default")
    return float(option)


def channel_ranges(model: nn.Module, windows: torch.Tensor, linears: list[tuple[str, nn.Linear]]) -> dict[str, torch.Tensor]:
    """Max |input| per input channel of each named linear over the calibration
    ``windows`` [n, seqlen], run one window at a time through ``model`` (float32 is fine:
    ranges are a property of the checkpoint, not of the precision that will run it)."""
    ranges: dict[str, torch.Tensor] = {}
    hooks = []

    def recorder(name: str):
        def hook(_module, args):
            seen = args[0].detach().abs().flatten(0, -2).amax(dim=0).float().cpu()
            ranges[name] = seen if name not in ranges else torch.maximum(ranges[name], seen)
        return hook

    for name, linear in linears:
        hooks.append(linear.register_forward_pre_hook(recorder(name)))
    try:
        with torch.no_grad():
            for window in windows:
                model(input_ids=window[None].to(next(model.parameters()).device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return ranges


def smoothing_scales(activation_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel factors ``s = a^alpha / w^(1 - alpha)``. Dividing
    the activation by ``s`` and multiplying the weights' input channel by ``s`` leaves the
    product unchanged and moves the activation's outlier channels (which one per-tensor
    scale cannot serve) into the weights, whose scales absorb it more easily. A channel where
    either maximum is zero keeps 1."""
    if not 0.0 <= alpha <= 1.0:
        raise BadInput(f"smoothquant_alpha must lie in [0, 1], not {alpha}; 0.5 is SmoothQuant's default")
    activation, weight = activation_absmax.float(), weight_absmax.float()
    scales = activation.pow(alpha) / weight.pow(1.0 - alpha)
    usable = (activation > 0) & (weight > 0) & torch.isfinite(scales)
    return torch.where(usable, scales.clamp(min=1e-5), torch.ones_like(scales))


@dataclass
class SmoothingGroup:
    """Linears that read one tensor, and the module that wrote it (a norm, when foldable)."""

    producer: str | None
    linears: list[str]


# Finding the groups keeps every intermediate tensor of the pass alive (so no id is
# reused): a short window runs every layer at a fraction of the memory.
_GROUPING_TOKENS = 32


def smoothing_groups(model: nn.Module, window: torch.Tensor, linears: list[tuple[str, nn.Linear]]) -> list[SmoothingGroup]:
    """Group the linears by the tensor they read, found by running one ``window``: q, k
    and v read the attention norm's output, gate and up the MLP norm's. ``producer`` is the
    innermost module whose output that tensor is (None: an expression, e.g. the product
    the MLP's down projection reads). Found from the model, not from module names."""
    linear_names = {id(module): name for name, module in linears}
    writers: dict[int, str] = {}  # tensor id -> module that returned it (innermost first)
    readers: dict[int, list[str]] = {}
    alive = []  # keeps every seen tensor alive, so no id is reused within the pass
    hooks = []

    def wrote(name: str):
        def hook(_module, _args, output):
            if isinstance(output, torch.Tensor):
                alive.append(output)
                writers.setdefault(id(output), name)
        return hook

    def read(name: str):
        def hook(_module, args):
            alive.append(args[0])
            readers.setdefault(id(args[0]), []).append(name)
        return hook

    for name, module in model.named_modules():
        if id(module) in linear_names:
            hooks.append(module.register_forward_pre_hook(read(name)))
        elif name:
            hooks.append(module.register_forward_hook(wrote(name)))
    try:
        with torch.no_grad():
            model(input_ids=window[None, :_GROUPING_TOKENS].to(next(model.parameters()).device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return [SmoothingGroup(writers.get(tensor), names) for tensor, names in readers.items()]


def _fold_into_norm(norm: nn.Module, scales: torch.Tensor) -> bool:
    """Divide ``norm``'s output by ``scales`` through its own parameters, if they scale
    its output: as ``weight`` (Llama, Qwen, OPT's LayerNorm with its bias) or as
    ``1 + weight`` (Gemma). Each form is checked on a probe input and undone when it
    does not hold (activations, norms without an affine weight)."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.shape != scales.shape:
        return False
    bias = getattr(norm, "bias", None)
    bias = bias if isinstance(bias, torch.Tensor) else None
    factors = scales.to(weight)
    probe = torch.randn(2, 3, scales.numel(), generator=torch.Generator().manual_seed(0)).to(weight)
    with torch.no_grad():
        expected = norm(probe) / factors
        saved_weight, saved_bias = weight.detach().clone(), None if bias is None else bias.detach().clone()
        for offset in (0.0, 1.0):  # output = x * weight, or x * (1 + weight)
            weight.copy_((saved_weight + offset) / factors - offset)
            if bias is not None:
                bias.copy_(saved_bias / factors)
            if torch.allclose(norm(probe), expected, rtol=1e-4, atol=1e-5):
                return True
        weight.copy_(saved_weight)
        if bias is not None:
            bias.copy_(saved_bias)
    return False


def _check_same_function(model: nn.Module, smoothed: nn.Module, window: torch.Tensor) -> None:
    """Smoothing must not change what the model computes: compare the logits of one short
    window (relative to their largest magnitude, so any dtype can be checked)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        expected = model(input_ids=window[None].to(device), use_cache=False).logits.float()
        got = smoothed(input_ids=window[None].to(device), use_cache=False).logits.float()
    tolerance = 1e-3 if next(model.parameters()).dtype == torch.float32 else 2e-2
    error = float((got - expected).abs().max() / expected.abs().max().clamp(min=1e-6))
    if not error <= tolerance:
        raise BadInput(f"SmoothQuant changed this model's logits by {error:.2g} of their range (limit {tolerance:g}); "
                       "set smoothquant_alpha = false in the profile's [build] table to build without it")


def smoothed_copy(model: nn.Module, windows: torch.Tensor, linears: list[tuple[str, nn.Linear]], alpha: float) -> tuple[nn.Module, dict]:
    """A copy of ``model`` computing the same function (checked) with its norm-fed linears'
    activation outliers folded into their weights (SmoothQuant, ``alpha``), and a record.
    Zeros stay zeros (columns are scaled), so 2:4 stays 2:4. Only the parameters it
    changes are copied; the rest are shared with ``model``, which is left as it is."""
    from sparsedeploy.models.checkpoint import copy_with_own_parameters

    modules = dict(model.named_modules())
    ranges = channel_ranges(model, windows, linears)
    groups = [g for g in smoothing_groups(model, windows[0], linears) if g.producer is not None]
    changed = {id(p) for g in groups for name in [g.producer, *g.linears] for p in modules[name].parameters(recurse=False)}
    smoothed = copy_with_own_parameters(model, changed)
    copies = dict(smoothed.named_modules())
    folded, skipped = [], []
    for group in groups:
        activation = torch.stack([ranges[name] for name in group.linears]).amax(dim=0)
        weight = torch.stack([modules[name].weight.detach().abs().amax(dim=0).float().cpu() for name in group.linears]).amax(dim=0)
        scales = smoothing_scales(activation, weight, alpha)
        if not _fold_into_norm(copies[group.producer], scales):
            skipped.append(group.producer)  # an activation function, or a norm of another form
            continue
        for name in group.linears:
            target = copies[name].weight
            target.data.mul_(scales.to(target)[None, :])
        folded.append(len(group.linears))
    _check_same_function(model, smoothed, windows[0, :_GROUPING_TOKENS])
    record = {"method": "SmoothQuant (per-channel factors folded into the preceding norm)", "alpha": alpha,
              "groups_smoothed": len(folded), "linears_smoothed": sum(folded),
              "not_foldable": skipped}
    return smoothed, record


def smoothed_if_asked(model: nn.Module, alpha: float | None, calibration) -> tuple[nn.Module, dict | None]:
    """What an INT8 build exports: ``model`` itself when ``alpha`` is None (the profile's
    ``smoothquant_alpha = false``), else its ``smoothed_copy`` on the ``calibration()``
    windows; and the smoothing record (None when not smoothed)."""
    if alpha is None:
        return model, None
    if calibration is None:
        raise BadInput("SmoothQuant needs calibration text; set calib in the profile's [build] table, or smoothquant_alpha = false")
    from sparsedeploy.kernels.semi_structured import named_linears

    return smoothed_copy(model, calibration(), named_linears(model), float(alpha))
