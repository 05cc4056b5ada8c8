"""Token windows: the evaluation protocol's fixed windows and seeded calibration samples."""

from __future__ import annotations

import torch

from sparsedeploy.data.sources import TextSource
from sparsedeploy.errors import BadInput


def tokenize(tokenizer, source: TextSource) -> torch.Tensor:
    """The whole text tokenized once, without special tokens, as a 1-D LongTensor."""
    ids = tokenizer(source.text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def evaluation_windows(token_ids: torch.Tensor, seqlen: int, windows: int, source_name: str = "text") -> torch.Tensor:
    """The first ``windows`` non-overlapping windows of ``seqlen`` tokens: [windows, seqlen]."""
    if seqlen < 2:
        raise BadInput(f"--seqlen {seqlen} is too short; a window needs at least 2 tokens")
    if windows < 1:
        raise BadInput(f"--windows {windows} must be at least 1")
    available = token_ids.numel() // seqlen
    if available == 0:
        raise BadInput(
            f"'{source_name}' has {token_ids.numel()} tokens, shorter than one window of {seqlen}; "
            "use a longer text or a smaller --seqlen"
        )
    if available < windows:
        raise BadInput(
            f"'{source_name}' has only {available} windows of {seqlen} tokens; "
            f"use --windows {available} or a smaller --seqlen"
        )
    return token_ids[: windows * seqlen].reshape(windows, seqlen).clone()


def calibration_windows(token_ids: torch.Tensor, seqlen: int, nsamples: int, seed: int, source_name: str = "text") -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens at seeded random offsets (the sampling
    SparseGPT and Wanda use): [nsamples, seqlen]. Same seed, same windows."""
    if nsamples < 1:
        raise BadInput(f"--nsamples {nsamples} must be at least 1")
    needed = nsamples * seqlen
    if token_ids.numel() <= seqlen or token_ids.numel() < needed:
        # Fewer tokens than asked for would mean calibrating on the same text many times.
        raise BadInput(
            f"calibration text '{source_name}' has {token_ids.numel()} tokens, fewer than --nsamples x --seqlen = "
            f"{nsamples} x {seqlen} = {needed}; use fewer or shorter samples, or a longer text (e.g. canterbury-books)"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, token_ids.numel() - seqlen, (nsamples,), generator=generator)
    return torch.stack([token_ids[s : s + seqlen] for s in starts.tolist()])
