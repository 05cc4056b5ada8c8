"""The pure math of the pruning methods, each checked against a slow, obvious reference."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from sparsedeploy.errors import BadInput
from sparsedeploy.prune.masks import nm_mask, prune_count, prune_lowest, unstructured_mask
from sparsedeploy.prune.owl import outlier_ratio, owl_layer_sparsities
from sparsedeploy.prune.patterns import NMPattern, nm_compliance, parse_nm, zero_fraction
from sparsedeploy.prune.scores import accumulate_input_sq_norm, magnitude_scores, wanda_scores
from sparsedeploy.prune.sparsegpt import hessian_accumulate, sparsegpt_prune

P24 = NMPattern(2, 4)
P48 = NMPattern(4, 8)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=dtype)


def correlated_inputs(in_features: int = 16, tokens: int = 256, seed: int = 1) -> torch.Tensor:
    """X [tokens, in] with strongly correlated features (low rank + a little noise)."""
    g = gen(seed)
    mix = torch.randn(4, in_features, generator=g, dtype=torch.float64)
    z = torch.randn(tokens, 4, generator=g, dtype=torch.float64)
    noise = 0.1 * torch.randn(tokens, in_features, generator=g, dtype=torch.float64)
    return z @ mix + noise


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    return 2.0 * x.T @ x / x.shape[0]


# ---------------------------------------------------------------- slow references


def ref_prune_lowest(scores: list[float], count: int) -> list[bool]:
    """Prune the `count` lowest; ties: lower index first."""
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    keep = [True] * len(scores)
    for i in order[:count]:
        keep[i] = False
    return keep


def ref_unstructured(scores: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    rows, cols = scores.shape
    if per_row:
        out = [ref_prune_lowest(scores[r].tolist(), math.floor(cols * sparsity + 1e-9))
               for r in range(rows)]
        return torch.tensor(out)
    flat = ref_prune_lowest(scores.flatten().tolist(), math.floor(rows * cols * sparsity + 1e-9))
    return torch.tensor(flat).reshape(rows, cols)


def ref_nm(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    rows, cols = scores.shape
    keep = torch.ones(rows, cols, dtype=torch.bool)
    for r in range(rows):
        for g in range(0, cols, m):
            group = scores[r, g:g + m].tolist()
            keep[r, g:g + m] = torch.tensor(ref_prune_lowest(group, m - n))
    return keep


def ref_sparsegpt(weight, hessian, *, sparsity=None, pattern=None, blocksize=128, percdamp=0.01):
    """Column-by-column OBS with a freshly inverted Hessian of the remaining columns.

    No Cholesky, no lazy batching: the textbook update
    delta_F = -(w_q / [H_F^-1]_qq) * H_F^-1[q, :], with the mask chosen from the same
    saliency w^2 / [H_F^-1]_qq at the same moments the algorithm chooses it.
    """
    W = weight.double().clone()
    H = hessian.double().clone()
    rows, cols = W.shape
    for j in range(cols):
        if H[j, j] == 0:
            H[j, j] = 1.0
            W[:, j] = 0.0
    H += percdamp * torch.diagonal(H).mean() * torch.eye(cols, dtype=torch.float64)
    inv_tail = [torch.linalg.inv(H[j:, j:]) for j in range(cols)]
    hinv_qq = [inv_tail[j][0, 0].item() for j in range(cols)]
    keep = torch.ones(rows, cols, dtype=torch.bool)
    if pattern is not None:
        blocksize = max(pattern.m, blocksize // pattern.m * pattern.m)
    for start in range(0, cols, blocksize):
        end = min(cols, start + blocksize)
        if sparsity is not None:
            count = (math.floor(rows * end * sparsity + 1e-9)
                     - math.floor(rows * start * sparsity + 1e-9))
            sal = [W[r, j].item() ** 2 / hinv_qq[j] for r in range(rows) for j in range(start, end)]
            keep[:, start:end] = torch.tensor(ref_prune_lowest(sal, count)).reshape(rows, -1)
        for j in range(start, end):
            if pattern is not None and j % pattern.m == 0:
                for r in range(rows):
                    sal = [W[r, c].item() ** 2 / hinv_qq[c] for c in range(j, j + pattern.m)]
                    keep[r, j:j + pattern.m] = torch.tensor(
                        ref_prune_lowest(sal, pattern.m - pattern.n))
            for r in range(rows):
                if not keep[r, j]:
                    w = W[r, j].item()
                    W[r, j:] -= (w / inv_tail[j][0, 0]) * inv_tail[j][0, :]
                    W[r, j] = 0.0
    return W, keep


def recon_error(w_new: torch.Tensor, w: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x @ w.double().T - x @ w_new.double().T) ** 2).sum())


# ---------------------------------------------------------------- scores


def test_magnitude_scores_is_abs():
    w = randn(8, 16)
    s = magnitude_scores(w)
    for r in range(8):
        for c in range(16):
            assert s[r, c].item() == abs(w[r, c].item())


def test_magnitude_scores_low_precision_promoted():
    w = randn(8, 16).to(torch.bfloat16)
    assert magnitude_scores(w).dtype == torch.float32


def test_wanda_scores_matches_loop():
    w = randn(8, 16, seed=1)
    norm = randn(16, seed=2).abs() * 10
    s = wanda_scores(w, norm)
    for r in range(8):
        for c in range(16):
            assert s[r, c].item() == pytest.approx(abs(w[r, c].item()) * math.sqrt(norm[c].item()))


def test_wanda_scores_bad_norm_shape():
    with pytest.raises(BadInput, match="16 input features"):
        wanda_scores(randn(8, 16), torch.ones(8))


def test_accumulate_input_sq_norm_streams():
    x = randn(3, 5, 16, seed=3)  # [batch, seq, in]
    running = None
    for b in range(3):
        running = accumulate_input_sq_norm(running, x[b])
    assert running.dtype == torch.float64
    for c in range(16):
        expected = sum(x[b, t, c].item() ** 2 for b in range(3) for t in range(5))
        assert running[c].item() == pytest.approx(expected, rel=1e-12)
    # Leading dims are all tokens; a float32 accumulator stays float32.
    r32 = accumulate_input_sq_norm(torch.zeros(16, dtype=torch.float32), x)
    assert r32.dtype == torch.float32
    assert torch.allclose(r32.double(), running, rtol=1e-5)
    with pytest.raises(BadInput):
        accumulate_input_sq_norm(torch.zeros(8), x)


# ---------------------------------------------------------------- masks


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.6, 0.9])
@pytest.mark.parametrize("per_row", [True, False])
def test_unstructured_mask_matches_reference(sparsity, per_row):
    scores = randn(8, 16, seed=4).abs()
    mask = unstructured_mask(scores, sparsity, per_row)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    assert torch.equal(mask, ref_unstructured(scores, sparsity, per_row))
    if per_row:
        assert ((~mask).sum(dim=1) == math.floor(16 * sparsity)).all()
    else:
        assert int((~mask).sum()) == math.floor(8 * 16 * sparsity)


def test_unstructured_mask_exact_count_on_inexact_fraction():
    scores = randn(10, 10, seed=5).abs()
    assert int((~unstructured_mask(scores, 0.29, per_row=False)).sum()) == 29
    assert prune_count(100, 0.29) == 29
    assert prune_count(16, 0.7) == 11  # floor, not round


def test_ties_are_deterministic_lower_index_pruned_first():
    scores = torch.ones(2, 8)
    row = unstructured_mask(scores, 0.5, per_row=True)
    assert row.tolist() == [[False] * 4 + [True] * 4] * 2
    whole = unstructured_mask(scores, 0.5, per_row=False)
    assert whole.tolist() == [[False] * 8, [True] * 8]
    nm = nm_mask(torch.ones(1, 8), P24)
    assert nm.tolist() == [[False, False, True, True] * 2]


def test_unstructured_mask_rejects_bad_sparsity_and_nan():
    with pytest.raises(BadInput):
        unstructured_mask(torch.ones(4, 4), 1.0, per_row=True)
    with pytest.raises(BadInput):
        unstructured_mask(torch.ones(4, 4), -0.1, per_row=True)
    bad = torch.ones(4, 4)
    bad[1, 1] = float("nan")
    with pytest.raises(BadInput, match="NaN"):
        unstructured_mask(bad, 0.5, per_row=False)


@pytest.mark.parametrize("pattern", [P24, P48, parse_nm("1:4")])
def test_nm_mask_matches_reference_and_is_compliant(pattern):
    scores = randn(8, 16, seed=6).abs()
    mask = nm_mask(scores, pattern)
    assert torch.equal(mask, ref_nm(scores, pattern.n, pattern.m))
    kept_per_group = mask.reshape(8, -1, pattern.m).sum(dim=-1)
    assert (kept_per_group == pattern.n).all()
    w = randn(8, 16, seed=7) * mask
    assert nm_compliance(w, pattern) == 1.0
    assert zero_fraction(w) == pytest.approx(pattern.sparsity)


def test_nm_mask_bad_shape():
    with pytest.raises(BadInput) as info:
        nm_mask(torch.ones(8, 10), P24)
    msg = str(info.value)
    assert "[8, 10]" in msg and "in_features=10" in msg and "M=4" in msg
    assert "dense" in msg and "unstructured" in msg
    with pytest.raises(BadInput):
        nm_mask(torch.ones(8, 12), P48)


def test_wanda_per_row_differs_from_magnitude_on_outlier_column():
    # Column 0 has small weights but carries a huge activation: Wanda keeps it,
    # global magnitude pruning throws it away.
    w = randn(4, 8, seed=8).abs() + 1.0
    w[:, 0] = 0.05
    norm = torch.ones(8, dtype=torch.float64)
    norm[0] = 1e6
    wanda = unstructured_mask(wanda_scores(w, norm), 0.5, per_row=True)
    magnitude = unstructured_mask(magnitude_scores(w), 0.5, per_row=False)
    assert wanda[:, 0].all()
    assert not magnitude[:, 0].any()
    assert not torch.equal(wanda, magnitude)
    assert int((~wanda).sum()) == int((~magnitude).sum()) == 16


# ---------------------------------------------------------------- sparsegpt


def test_hessian_accumulate_streams_to_full_batch():
    x = randn(4, 6, 16, seed=9)  # [batch, seq, in]
    H, n = None, 0
    for b in range(4):
        H, n = hessian_accumulate(H, n, x[b])
    assert n == 24
    full = hessian_of(x.reshape(-1, 16))
    assert torch.allclose(H, full, atol=1e-12)
    # Given H is updated in place; float32 input starts a float32 accumulator.
    H32, n32 = hessian_accumulate(None, 0, x.float())
    assert H32.dtype == torch.float32 and n32 == 24
    same, _ = hessian_accumulate(H32, n32, x[0].float())
    assert same is H32
    with pytest.raises(BadInput):
        hessian_accumulate(torch.zeros(8, 8), 1, x)


SGPT_CASES = [
    dict(sparsity=0.5, blocksize=128),
    dict(sparsity=0.5, blocksize=4),
    dict(sparsity=0.3, blocksize=5),  # uneven blocks, inexact per-block counts
    dict(sparsity=0.7, blocksize=16),
    dict(pattern=P24, blocksize=128),
    dict(pattern=P24, blocksize=4),
    dict(pattern=P48, blocksize=8),
    dict(pattern=P48, blocksize=4),  # rounded up to one group
]


def _case_id(case: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in case.items())


@pytest.mark.parametrize("case", SGPT_CASES, ids=_case_id)
def test_sparsegpt_matches_slow_obs_reference(case):
    w = randn(8, 16, seed=10)
    x = correlated_inputs()
    H = hessian_of(x)
    new, mask = sparsegpt_prune(w, H, **case)
    ref_w, ref_mask = ref_sparsegpt(w, H, **case)
    assert torch.equal(mask, ref_mask)
    assert torch.allclose(new, ref_w, atol=1e-9, rtol=1e-9)
    assert new.dtype == w.dtype
    assert (new[~mask] == 0).all()
    if "sparsity" in case:
        assert int((~mask).sum()) == math.floor(8 * 16 * case["sparsity"])
    else:
        p = case["pattern"]
        assert nm_compliance(new, p) == 1.0
        assert (mask.reshape(8, -1, p.m).sum(-1) == p.n).all()


def test_sparsegpt_float32_close_to_reference():
    w = randn(8, 16, seed=11)
    H = hessian_of(correlated_inputs(seed=12))
    new, mask = sparsegpt_prune(w.float(), H.float(), sparsity=0.5, blocksize=8)
    ref_w, ref_mask = ref_sparsegpt(w, H, sparsity=0.5, blocksize=8)
    assert new.dtype == torch.float32
    assert torch.equal(mask, ref_mask)
    assert torch.allclose(new.double(), ref_w, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("blocksize", [128, 4])
def test_sparsegpt_identity_hessian_is_magnitude_pruning(blocksize):
    w = randn(8, 16, seed=13)
    eye = torch.eye(16, dtype=torch.float64)
    new, mask = sparsegpt_prune(w, eye, sparsity=0.5, blocksize=blocksize)
    if blocksize >= 16:
        expected = unstructured_mask(magnitude_scores(w), 0.5, per_row=False)
    else:  # magnitude ranking within each column block (its share of the count)
        expected = torch.cat([
            prune_lowest(w[:, s:s + blocksize].abs(), prune_count(8 * blocksize, 0.5))
            for s in range(0, 16, blocksize)], dim=1)
    assert torch.equal(mask, expected)
    assert torch.equal(new[mask], w[mask])
    assert (new[~mask] == 0).all()

    new_nm, mask_nm = sparsegpt_prune(w, eye, pattern=P24, blocksize=blocksize)
    assert torch.equal(mask_nm, nm_mask(magnitude_scores(w), P24))
    assert torch.equal(new_nm, w * mask_nm)


@pytest.mark.parametrize("kw", [dict(sparsity=0.5), dict(pattern=P24), dict(pattern=P48),
                                dict(sparsity=0.5, blocksize=4)])
def test_sparsegpt_beats_magnitude_and_plain_masking(kw):
    w = randn(8, 16, seed=14)
    x = correlated_inputs(seed=15)
    new, mask = sparsegpt_prune(w, hessian_of(x), **kw)
    if "sparsity" in kw:
        mag_mask = unstructured_mask(magnitude_scores(w), kw["sparsity"], per_row=False)
    else:
        mag_mask = nm_mask(magnitude_scores(w), kw["pattern"])
    assert int(mag_mask.sum()) == int(mask.sum())
    err = recon_error(new, w, x)
    assert err < recon_error(w * mag_mask, w, x)
    assert err < recon_error(w * mask, w, x)


def test_sparsegpt_dead_inputs():
    w = randn(8, 16, seed=16)
    x = correlated_inputs(seed=17)
    x[:, [3, 7]] = 0.0
    H = hessian_of(x)
    assert H[3, 3] == 0 and H[7, 7] == 0
    for kw in (dict(sparsity=0.5, blocksize=4), dict(pattern=P24)):
        new, mask = sparsegpt_prune(w, H, **kw)
        ref_w, ref_mask = ref_sparsegpt(w, H, **kw)
        assert torch.isfinite(new).all()
        assert (new[:, [3, 7]] == 0).all()
        assert torch.equal(mask, ref_mask)
        assert torch.allclose(new, ref_w, atol=1e-9)
        assert (new[~mask] == 0).all()


def test_sparsegpt_leaves_inputs_untouched_and_keeps_dtype():
    w = randn(8, 16, seed=18).to(torch.bfloat16)
    x = correlated_inputs(seed=19)
    x[:, 5] = 0.0  # dead column: exercises the in-place fix-ups on our copies
    H = hessian_of(x).float()
    w0, H0 = w.clone(), H.clone()
    new, mask = sparsegpt_prune(w, H, sparsity=0.5, blocksize=4)
    assert torch.equal(w, w0) and torch.equal(H, H0)
    assert new.dtype == torch.bfloat16
    assert (new[~mask] == 0).all()
    assert int((~mask).sum()) == 64


def test_sparsegpt_singular_hessian_retries_with_more_damping():
    w = randn(8, 16, seed=20)
    rank_one = torch.ones(16, 16, dtype=torch.float64)  # PSD, exactly singular
    with pytest.warns(RuntimeWarning, match="percdamp"):
        new, mask = sparsegpt_prune(w, rank_one, sparsity=0.5, percdamp=0.0)
    assert torch.isfinite(new).all()
    assert int((~mask).sum()) == 64
    # The default damping makes the same matrix usable without any warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparsegpt_prune(w, rank_one, sparsity=0.5)


def test_sparsegpt_hopeless_hessian_raises_clear_error():
    w = randn(8, 16, seed=21)
    with pytest.raises(BadInput, match="calibration"):
        sparsegpt_prune(w, -torch.eye(16, dtype=torch.float64), sparsity=0.5)
    nan = torch.eye(16)
    nan[2, 2] = float("nan")
    with pytest.raises(BadInput, match="NaN"):
        sparsegpt_prune(w, nan, sparsity=0.5)


def test_sparsegpt_argument_errors():
    w, H = randn(8, 16), torch.eye(16, dtype=torch.float64)
    with pytest.raises(BadInput, match="exactly one"):
        sparsegpt_prune(w, H)
    with pytest.raises(BadInput, match="exactly one"):
        sparsegpt_prune(w, H, sparsity=0.5, pattern=P24)
    with pytest.raises(BadInput, match="16 inputs"):
        sparsegpt_prune(w, torch.eye(8), sparsity=0.5)
    with pytest.raises(BadInput, match="in_features=12"):
        sparsegpt_prune(randn(8, 12), torch.eye(12), pattern=P48)


# ---------------------------------------------------------------- OWL


def test_outlier_ratio_matches_loop():
    scores = randn(8, 16, seed=22).abs() ** 3  # heavy tail: some outliers
    values = scores.flatten().tolist()
    mean = sum(values) / len(values)
    for m in (1.0, 2.0, 5.0):
        expected = sum(v > m * mean for v in values) / len(values)
        assert outlier_ratio(scores, m) == pytest.approx(expected)
    assert 0 < outlier_ratio(scores) < 0.2  # default M=5
    # A list of sublayers is pooled into one population.
    a, b = scores[:3], scores[3:]
    assert outlier_ratio([a, b], 2.0) == pytest.approx(outlier_ratio(scores, 2.0))


def test_owl_symmetric_case_is_paper_formula():
    sp = owl_layer_sparsities([0.0, 0.5, 1.0], 0.5, lam=0.08)
    assert sp == pytest.approx([0.58, 0.5, 0.42])
    # Paper: normalise to [0, 2*lam], sparsity = target - (v - mean(v)).
    ratios = [0.01, 0.03, 0.02, 0.04, 0.025]
    lo, hi = min(ratios), max(ratios)
    v = [(r - lo) / (hi - lo) * 0.16 for r in ratios]
    paper = [0.6 - (x - sum(v) / len(v)) for x in v]
    assert max(abs(p - 0.6) for p in paper) <= 0.08  # this case stays in the band
    assert owl_layer_sparsities(ratios, 0.6) == pytest.approx(paper, abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("target", [0.5, 0.7])
def test_owl_mean_bounds_monotone(seed, target):
    g = gen(seed)
    ratios = (torch.rand(12, generator=g, dtype=torch.float64) ** 3 * 0.05).tolist()
    lam = 0.08
    sp = owl_layer_sparsities(ratios, target, lam)
    assert len(sp) == 12
    assert sum(sp) / len(sp) == pytest.approx(target, abs=1e-12)
    assert all(target - lam - 1e-12 <= s <= target + lam + 1e-12 for s in sp)
    order = sorted(range(12), key=lambda i: ratios[i])
    for a, b in zip(order, order[1:]):
        assert sp[a] > sp[b]  # more outliers -> strictly less sparsity
    assert max(sp) - min(sp) > lam  # the band is actually used


def test_owl_skewed_ratios_stay_in_band():
    sp = owl_layer_sparsities([0.5, 0.0, 0.0, 0.0], 0.5, lam=0.08)
    assert sum(sp) / 4 == pytest.approx(0.5, abs=1e-12)
    assert min(sp) == pytest.approx(0.42)
    assert all(0.42 - 1e-12 <= s <= 0.58 + 1e-12 for s in sp)
    assert sp[0] < sp[1] == sp[2] == sp[3]


def test_owl_degenerate_and_bad_inputs():
    assert owl_layer_sparsities([0.1, 0.1, 0.1], 0.5) == [0.5, 0.5, 0.5]
    assert owl_layer_sparsities([0.3], 0.6) == [0.6]
    assert owl_layer_sparsities([], 0.5) == []
    with pytest.raises(BadInput, match="lambda"):
        owl_layer_sparsities([0.1, 0.2], 0.05, lam=0.08)
    with pytest.raises(BadInput):
        owl_layer_sparsities([0.1, 0.2], 1.2)
