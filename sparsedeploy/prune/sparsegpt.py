"""SparseGPT (Frantar & Alistarh, 2023): prune one linear weight and fix up the rest.

For a layer computing ``W @ x``, pruning weight (r, q) changes the output by
``W[r, q] * x_q``. Optimal Brain Surgeon says how to move the still-free weights of
that row to absorb the change, given the Hessian of the layer-wise squared error,
``H = 2 X X^T / n``. SparseGPT makes this affordable for LLMs by

* visiting input columns left to right, so every row shares the same sequence of
  "remaining column" inverse Hessians -- and those are exactly the rows of the upper
  Cholesky factor U of ``H^-1`` (``H^-1 = U^T U``): row i of U, divided by U[i, i], is
  the OBS update direction for column i over columns i..end, and U[i, i]^2 is the
  matching inverse-Hessian diagonal entry;
* applying the updates of a block of columns to everything right of the block in one
  matrix product (lazy batch update) instead of column by column;
* choosing the mask adaptively as it goes, from the saliency ``w^2 / U[i, i]^2``
  (the OBS error of removing that weight), per block for unstructured sparsity and per
  M-column group for N:M.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch

from sparsedeploy.errors import BadInput
from sparsedeploy.prune.masks import (
    check_nm_shape,
    check_sparsity,
    nm_mask,
    prune_count,
    prune_lowest,
)
from sparsedeploy.prune.patterns import NMPattern

# When the damped Hessian is still not positive definite in floating point, try again
# with this many times the previous damping fraction (starting from at least 1%).
_DAMP_ESCALATION = (1.0, 10.0, 100.0)


@contextmanager
def _single_thread(device: torch.device):
    """The column loop is thousands of tiny ops: on a CPU, intra-op threads only add
    synchronisation (measured 1.1 s on one thread vs 26 s on two for a 576x1536 weight
    while other processes were busy). The big block updates keep every thread."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def hessian_accumulate(
    H: torch.Tensor | None, n_seen: int, x: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """Fold a batch of layer inputs into the running ``H = 2 X X^T / n``.

    ``x`` is [..., in]; every leading dimension counts as a token. Keeping the running
    *mean* (rescaling the old H by n/(n+t)) rather than a sum keeps H's scale, and so the
    absolute damping, independent of how many calibration tokens were used.

    ``H`` may be None on the first batch: an [in, in] accumulator is started in float32
    (float64 when ``x`` is float64), on x's device. A given ``H`` is updated IN PLACE
    (it can be hundreds of MB) and returned with the new token count.
    """
    if x.dim() == 0:
        raise BadInput("activations must have shape [..., in_features], got a scalar")
    in_features = x.shape[-1]
    if H is None:
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        H = torch.zeros(in_features, in_features, dtype=dtype, device=x.device)
        n_seen = 0
    elif H.shape != (in_features, in_features):
        raise BadInput(
            f"Hessian has shape {list(H.shape)} but the activations have {in_features} "
            "features; use one Hessian per layer input"
        )
    flat = x.detach().reshape(-1, in_features)
    tokens = flat.shape[0]
    if tokens == 0:
        return H, n_seen
    total = n_seen + tokens
    flat = flat.to(device=H.device, dtype=H.dtype) * (2.0 / total) ** 0.5
    H.mul_(n_seen / total)
    H.addmm_(flat.t(), flat)
    return H, total


def inverse_hessian_cholesky(
    H: torch.Tensor, percdamp: float, method: str = "SparseGPT",
    fix: str = "use more calibration samples/tokens or a larger dampening (--percdamp), or prune this layer with wanda",
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp I)^-1, escalating damping if it is not PD.
    Returns it with the damping fraction used; ``method`` and ``fix`` word the error."""
    diag = torch.diagonal(H)
    mean_diag = float(diag.mean().item())
    eye = torch.arange(H.shape[0], device=H.device)
    last_error = ""
    fractions = [percdamp] + [max(percdamp, 0.01) * f for f in _DAMP_ESCALATION[1:]]
    for fraction in fractions:
        damped = H.clone()
        damped[eye, eye] += fraction * mean_diag
        L, info = torch.linalg.cholesky_ex(damped)
        if int(info.item()) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info.item()) == 0 and bool(torch.isfinite(U).all()):
                return U, fraction
            last_error = "the inverse Hessian is not positive definite"
        else:
            last_error = f"Cholesky failed at column {int(info.item()) - 1}"
    raise BadInput(
        f"{method}: the Hessian of a layer with {H.shape[0]} inputs is singular even with "
        f"damping {fractions[-1]:g} x mean(diag H) ({last_error}); {fix}"
    )


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    sparsity: float | None = None,
    pattern: NMPattern | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` [out, in] to ``sparsity`` (unstructured) or ``pattern`` (N:M).

    Returns ``(new_weight, mask)``: new_weight in weight's dtype and device, exactly 0
    where ``mask`` is False; the kept weights are updated to compensate the pruned ones.

    * ``hessian`` is ``2 X X^T / n`` from ``hessian_accumulate``; it is not modified.
    * Damping: ``percdamp * mean(diag H)`` on the diagonal. If the damped Hessian is
      still numerically not positive definite, the damping fraction is RETRIED at 10x
      and 100x (from at least 1%), with a RuntimeWarning naming the damping used; only
      if that fails too is BadInput raised (more calibration tokens / higher percdamp).
    * Inputs that never fired (diag H == 0) carry no information: their H_ii is set to 1
      and their weights to 0 (they are then the first pruned, at no cost).
    * Unstructured: at the start of each block of ``blocksize`` columns the lowest
      ``w^2 / U_ii^2`` in that block are pruned, the block's share of
      floor(numel * sparsity) (so the total count is exact even when blocks are uneven).
      N:M: every M columns, the M-N lowest saliencies of each row's group are pruned;
      ``blocksize`` is rounded down to a multiple of M (at least M) so groups never
      straddle blocks.
    * Math runs in float32, or float64 when weight or hessian is float64.
    """
    if (sparsity is None) == (pattern is None):
        raise BadInput("SparseGPT needs exactly one of sparsity (unstructured) or pattern (N:M)")
    if weight.dim() != 2:
        raise BadInput(
            f"SparseGPT prunes 2-D linear weights [out, in]; got shape {list(weight.shape)}"
        )
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise BadInput(
            f"Hessian has shape {list(hessian.shape)} but the weight {list(weight.shape)} "
            f"has {cols} inputs; accumulate H from this layer's own inputs"
        )
    if sparsity is not None:
        check_sparsity(sparsity)
    if pattern is not None:
        check_nm_shape(weight.shape, pattern)
    if blocksize < 1:
        raise BadInput(f"blocksize must be >= 1, got {blocksize}")
    if not percdamp >= 0:
        raise BadInput(f"percdamp must be >= 0, got {percdamp}; the usual value is 0.01")

    dtype = (
        torch.float64
        if torch.float64 in (weight.dtype, hessian.dtype)
        else torch.float32
    )
    device = weight.device
    W = weight.detach().to(dtype=dtype, copy=True)
    H = hessian.detach().to(device=device, dtype=dtype, copy=True)
    if not bool(torch.isfinite(H).all()):
        raise BadInput(
            "SparseGPT: the Hessian contains NaN/inf; the calibration activations of "
            "this layer overflowed -- check the calibration data or run in float32"
        )

    idx = torch.arange(cols, device=device)
    dead = torch.diagonal(H) == 0
    H[idx[dead], idx[dead]] = 1.0
    W[:, dead] = 0.0

    U, used = inverse_hessian_cholesky(H, percdamp)
    del H
    if used != percdamp:
        warnings.warn(
            f"SparseGPT: Hessian not positive definite with percdamp={percdamp:g}; "
            f"used {used:g} instead (more calibration tokens would help)",
            RuntimeWarning,
            stacklevel=2,
        )

    mask = torch.ones(rows, cols, dtype=torch.bool, device=device)
    if pattern is not None:
        m = pattern.m
        blocksize = max(m, blocksize // m * m)

    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        width = end - start
        W1 = W[:, start:end].clone()
        U1 = U[start:end, start:end]
        d1 = torch.diagonal(U1)
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        mask1 = mask[:, start:end]  # view: writes land in ``mask``

        if sparsity is not None:
            # This block's share of the global count: cumulative floors make the
            # shares add up to exactly floor(numel * sparsity).
            before = prune_count(rows * start, sparsity)
            upto = prune_count(rows * end, sparsity)
            mask1[:] = prune_lowest(W1.pow(2) / d1.pow(2).reshape(1, -1), upto - before)

        with _single_thread(device):
            for i in range(width):
                if pattern is not None and i % pattern.m == 0:
                    group = slice(i, i + pattern.m)
                    saliency = W1[:, group].pow(2) / d1[group].pow(2).reshape(1, -1)
                    mask1[:, group] = nm_mask(saliency, pattern)
                w = W1[:, i]
                q = torch.where(mask1[:, i], w, torch.zeros_like(w))
                Q1[:, i] = q
                err = (w - q) / U1[i, i]
                # OBS compensation of this column's pruning on the later columns of the block.
                W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
                Err1[:, i] = err

        W[:, start:end] = Q1
        if end < cols:
            # Lazy batch update: the whole block's corrections to everything after it.
            W[:, end:] -= Err1 @ U[start:end, end:]

    out = W.to(weight.dtype)
    out[~mask] = 0  # exact zeros even if the dtype cast or the update left residue
    return out, mask
