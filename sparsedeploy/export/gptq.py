"""GPTQ for 4-bit weights (Frantar et al., 2022) on ONNX Runtime's MatMulNBits grid,
keeping pruned zeros exactly zero.

Rounding each weight to its nearest 4-bit level (what the MatMulNBits quantizer does on
its own) ignores that the errors of one layer's weights add up in its output. GPTQ
quantizes a weight's input columns one at a time and, like SparseGPT's pruning (same
Optimal Brain Surgeon update, same Hessian ``H = 2 X X^T / n`` of the layer's inputs),
moves each column's rounding error onto the columns not yet quantized. Pruned weights
are "quantized" to exactly 0 and their share of the update goes to the kept weights,
so the sparsity pattern (2:4 included) is unchanged.

The grid has the form ONNX Runtime's symmetric block quantizer derives from the weights
themselves: per output channel, blocks of ``block_size`` input columns, scale = the
block's largest-magnitude value v divided by -8, levels -8..7 times the scale. GPTQ
fixes every block's scale before it starts: v / -8 shrunk by the factor (1 down to 0.9)
whose rounding error is least (clipping the block's few largest weights buys a finer
step for all the others), and pins the weight that defined it to exactly -8 x scale
whatever the updates do to it. Every other level has a smaller magnitude or the same
value, so when the quantizer later recomputes the scale from the GPTQ'd weights it
finds that same value, the same scale and the same levels: the float checkpoint carries
the grid and the quantizer reproduces it bit for bit (``grid_mismatch`` checks this,
tests compare with ONNX Runtime's packer).
"""

from __future__ import annotations

import time
import warnings

import torch
from torch import nn

from sparsedeploy.errors import BadInput
from sparsedeploy.prune.sparsegpt import _single_thread, inverse_hessian_cholesky

LEVELS = (-8, 7)  # signed 4-bit, zero point 8 in MatMulNBits' unsigned nibbles
PINNED_LEVEL = LEVELS[0]
# Columns whose updates are applied lazily in one product (as SparseGPT's blocksize).
LAZY_COLUMNS = 128
DEFAULT_PERCDAMP = 0.01
# Calibration windows (of calib_seqlen tokens) GPTQ reads unless the profile sets
# int4_gptq_nsamples. Its Hessians need many more tokens than a layer has inputs: on the
# default model, 16 x 256 tokens left the MLP down projections (1536 inputs) of layers 0,
# 1, 15 1.09-1.34x WORSE than plain rounding on WikiText-2; 64 x 256, 0.78-0.90x.
GPTQ_NSAMPLES = 64
# What this module does, in the report and in the build settings (so in the artifact
# cache key): change the algorithm, change this, and cached GPTQ builds are rebuilt.
GPTQ_METHOD = ("GPTQ (act-order, per-block scales clipped to x1.0-0.9 by least diag(H)-weighted rounding error, fixed "
               "up front, pruned zeros kept) on the MatMulNBits grid")
GPTQ_FIX = "use more calibration text (int4_gptq_nsamples in the profile's [build] table) or set int4_gptq = false"


def block_scales(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``values`` [rows, width]: the scale of the block (its largest-magnitude
    value divided by -8, as ONNX Runtime's symmetric 4-bit quantizer computes it) and that
    value's column. An all-zero block has scale 0."""
    column = values.abs().argmax(dim=1)
    pinned = values.gather(1, column[:, None]).squeeze(1)
    return pinned / PINNED_LEVEL, column


def quantize_to_levels(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Nearest level in -8..7 of each value (a column [rows] or block [rows, width]) for
    per-row ``scales``, dequantized; 0 where the scale is 0."""
    shaped = scales.reshape(-1, *([1] * (values.dim() - 1)))
    safe = torch.where(shaped == 0, torch.ones_like(shaped), shaped)
    levels = torch.clamp(torch.round(values / safe), *LEVELS)
    return torch.where(shaped == 0, torch.zeros_like(values), levels * shaped)


def block_grid(weight: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid of ``weight`` [out, in]: per output row and block of ``block_size`` input
    columns, the scale and the column (inside the block) of the value that sets it, both
    [out, blocks]; exact zeros (pruned weights) never set a scale."""
    scales, columns = [], []
    for start in range(0, weight.shape[1], block_size):
        block_scale, column = block_scales(weight[:, start:start + block_size])
        scales.append(block_scale)
        columns.append(column)
    return torch.stack(scales, dim=1), torch.stack(columns, dim=1)


# Scale shrink factors a block may use (1 = its largest weight at -8 x scale, unclipped).
# Default model, WikiText-2 4 x 1024 against the float model, GPTQ on 64 x 256 Canterbury
# tokens, unclipped / 1.0-0.9 / 1.0-0.6: Wanda 2:4 KL 0.125 / 0.119 / 0.128, top-1 0.733 /
# 0.735 / 0.743, but ppl 206.1 / 213.2 / 237.0 (reference 181.5); dense KL 0.162 / 0.125 /
# 0.122, top-1 0.780 / 0.807 / 0.800, ppl 26.40 / 25.57 / 25.96 (float 22.98).
# Deeper clipping helps the dense model and costs the pruned one perplexity: kept at 0.9.
CLIP_FACTORS = tuple(round(1.0 - 0.02 * step, 2) for step in range(6))


def clipped_block_grid(weight: torch.Tensor, block_size: int,
                       importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``block_grid`` with each scale shrunk by the factor of ``CLIP_FACTORS`` whose
    rounding error over the block, weighted per input column by ``importance`` [in]
    (None: uniformly), is least. The pinned column is the same: at -8 x the shrunk scale
    it is still the block's largest magnitude, so the quantizer finds the same scale."""
    scales, columns = block_grid(weight, block_size)
    if importance is None:
        importance = torch.ones(weight.shape[1])
    importance = importance.to(device=weight.device, dtype=weight.dtype)
    factors = torch.tensor(CLIP_FACTORS, dtype=weight.dtype, device=weight.device)
    chosen = torch.empty_like(scales)
    for block, start in enumerate(range(0, weight.shape[1], block_size)):
        values = weight[:, start:start + block_size]
        column_weights = importance[start:start + block_size]
        errors = torch.stack([
            (((values - quantize_to_levels(values, scales[:, block] * factor)) ** 2) * column_weights).sum(dim=1)
            for factor in factors
        ])
        # argmin takes the first of equal errors: the unclipped scale when clipping gains nothing.
        chosen[:, block] = scales[:, block] * factors[errors.argmin(dim=0)]
    return chosen, columns


def round_to_nearest(weight: torch.Tensor, block_size: int) -> torch.Tensor:
    """What the quantizer alone makes of ``weight`` [out, in]: each block of
    ``block_size`` input columns rounded on its own scale (the last block may be short:
    the quantizer pads it with zeros, which change neither its maximum nor its levels)."""
    _check_block_size(block_size)
    scales, _ = block_grid(weight, block_size)
    out = torch.empty_like(weight)
    for block, start in enumerate(range(0, weight.shape[1], block_size)):
        out[:, start:start + block_size] = quantize_to_levels(weight[:, start:start + block_size], scales[:, block])
    return out


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, *, block_size: int = 32,
                  percdamp: float = DEFAULT_PERCDAMP) -> torch.Tensor:
    """``weight`` [out, in] on the 4-bit block grid (dequantized, in weight's dtype), its
    rounding errors compensated by GPTQ's updates under ``hessian`` [in, in] (from
    ``hessian_accumulate``; not modified). Exact zeros of ``weight`` stay exactly 0 (pruned
    weights); every block's largest-magnitude output is -8 x its scale, so
    ``round_to_nearest(result) == result``.

    Columns are quantized in order of decreasing ``diag(H)`` (GPTQ's act-order: the inputs
    with the most energy first, while the most later columns can still absorb their
    error). The grid (``clipped_block_grid``, its rounding error weighted by diag(H)) is
    fixed up front from ``weight`` (static groups), since a block's columns are no longer
    visited together. On the Wanda 2:4 default model (WikiText-2,
    4 x 1024, against its float model) act-order took KL from 0.194 to 0.140 and top-1
    from 0.690 to 0.722 over left-to-right order; rounding alone gives 0.446 / 0.557."""
    if weight.dim() != 2:
        raise BadInput(f"GPTQ quantizes 2-D linear weights [out, in]; got shape {list(weight.shape)}")
    cols = weight.shape[1]
    if hessian.shape != (cols, cols):
        raise BadInput(f"Hessian has shape {list(hessian.shape)} but the weight {list(weight.shape)} has {cols} inputs; "
                       "accumulate H from this layer's own inputs")
    _check_block_size(block_size)
    if not percdamp >= 0:
        raise BadInput(f"percdamp must be >= 0, got {percdamp}; the usual value is 0.01")
    dtype = torch.float64 if torch.float64 in (weight.dtype, hessian.dtype) else torch.float32
    W = weight.detach().to(dtype=dtype, copy=True)
    H = hessian.detach().to(device=W.device, dtype=dtype, copy=True)
    if not bool(torch.isfinite(H).all()):
        raise BadInput("GPTQ: the Hessian contains NaN/inf; the calibration activations of this layer overflowed")
    # The grid in the weight's own dtype: its scales (and so every level times a scale)
    # are then numbers the quantizer, reading the float32 weights, computes exactly.
    scales, pinned_columns = clipped_block_grid(weight.detach(), block_size, importance=torch.diagonal(H))
    scales = scales.to(dtype)
    # An input that never fired carries no information: no update flows through it.
    dead = torch.diagonal(H) == 0
    index = torch.arange(cols, device=W.device)
    H[index[dead], index[dead]] = 1.0
    order = torch.argsort(torch.diagonal(H), descending=True, stable=True)
    W, H = W[:, order], H[order][:, order]
    kept = W != 0
    U, used = inverse_hessian_cholesky(H, percdamp, method="GPTQ", fix=GPTQ_FIX)
    if used != percdamp:
        warnings.warn(f"GPTQ: Hessian not positive definite with percdamp={percdamp:g}; used {used:g} instead "
                      "(more calibration tokens would help)", RuntimeWarning, stacklevel=2)
    del H

    original_columns = order.tolist()
    for start in range(0, cols, LAZY_COLUMNS):
        end = min(start + LAZY_COLUMNS, cols)
        W1 = W[:, start:end].clone()
        U1 = U[start:end, start:end]
        Err1 = torch.zeros_like(W1)
        with _single_thread(W.device):
            for i in range(end - start):
                block, inside = divmod(original_columns[start + i], block_size)
                scale = scales[:, block]
                w = W1[:, i]
                q = quantize_to_levels(w, scale)
                # The weight that set the block's scale keeps its level, whatever the updates.
                pin = pinned_columns[:, block] == inside
                q[pin] = scale[pin] * PINNED_LEVEL
                q = torch.where(kept[:, start + i], q, torch.zeros_like(q))
                err = (w - q) / U1[i, i]
                W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
                W1[:, i] = q
                Err1[:, i] = err
        W[:, start:end] = W1
        if end < cols:
            # Lazy batch update: the whole chunk's corrections to everything after it.
            W[:, end:] -= Err1 @ U[start:end, end:]
    out = torch.empty_like(W)
    out[:, order] = W
    return out.to(weight.dtype)


def grid_mismatch(weight: torch.Tensor, block_size: int) -> float:
    """Largest |weight - round_to_nearest(weight)|: 0 when the quantizer will reproduce
    ``weight`` exactly."""
    weight = weight.detach().float()
    return float((weight - round_to_nearest(weight, block_size)).abs().max())


def _check_block_size(block_size: int) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise BadInput(f"block_size {block_size!r} must be a whole number of input columns >= 2, e.g. 32")


@torch.no_grad()
def gptq_copy(model: nn.Module, windows: torch.Tensor, block_size: int,
              percdamp: float = DEFAULT_PERCDAMP) -> tuple[nn.Module, dict]:
    """A copy of ``model`` whose decoder layers' linear weights lie on the 4-bit block grid,
    quantized by GPTQ one decoder layer at a time on the calibration ``windows``
    [n, seqlen] (each layer calibrated on what the already quantized layers before it
    output), and a record for the build report. ``model`` is left as it is; the copy
    shares every parameter GPTQ does not rewrite (embeddings, norms, the LM head, which
    the int4 build keeps in float)."""
    from sparsedeploy.models.adapters import adapter_for
    from sparsedeploy.models.checkpoint import copy_with_own_parameters
    from sparsedeploy.prune.methods import InputHessian
    from sparsedeploy.prune.sequential import calibrate_layer, capture_first_layer_inputs, run_layer
    from sparsedeploy.ui import progress_iter

    started = time.perf_counter()
    rewritten = {id(linear.module.weight) for linear in adapter_for(model).linear_sublayers()}
    quantized = copy_with_own_parameters(model, rewritten)
    adapter = adapter_for(quantized)
    device = str(next(quantized.parameters()).device)
    inputs = capture_first_layer_inputs(adapter, windows)
    hidden = inputs.hidden_states
    names, zeros_before, zeros_after = [], 0, 0
    for index in progress_iter(range(adapter.num_layers), f"GPTQ int4 (block {block_size})", total=adapter.num_layers):
        layer = adapter.decoder_layer(index)
        statistics, _ = calibrate_layer(layer, layer.linears, hidden, inputs.layer_kwargs[index], device, InputHessian)
        for linear in layer.linears:
            weight = linear.module.weight
            new = gptq_quantize(weight, statistics[linear.name].value, block_size=block_size, percdamp=percdamp)
            if grid_mismatch(new, block_size) != 0 or bool(((weight == 0) & (new != 0)).any()):
                raise RuntimeError(f"internal error: GPTQ left {linear.name} off the 4-bit grid or un-pruned a zero")
            zeros_before += int((weight == 0).sum())
            zeros_after += int((new == 0).sum())
            weight.copy_(new)
            names.append(linear.name)
        if index + 1 < adapter.num_layers:
            hidden = run_layer(layer.module, hidden, inputs.layer_kwargs[index], device)
    record = {"method": GPTQ_METHOD,
              "block_size": block_size, "percdamp": percdamp, "linears": len(names),
              "calibration_tokens": int(windows.numel()), "zero_weights_before": zeros_before,
              "zero_weights_after": zeros_after, "seconds": round(time.perf_counter() - started, 1)}
    return quantized, record
