"""Prefill and decode of a transformers causal LM as CUDA graphs over a static KV cache.

Serving runs a fixed sequence of kernels per step; replaying it as one CUDA graph
removes the per-kernel launch cost, which otherwise dominates small-batch decode and
hides any gain of the 2:4 kernels (each eager cuSPARSELt call pays host overhead).

Everything a step needs lives in static tensors that the captured graph itself updates:
the prefill graph resets the cache, writes the prompt's keys/values, picks the first
token greedily and sets the decode position; each replay of the decode graph feeds that
token, appends to the cache, picks the next and advances the position. A timed run is
then one prefill replay and ``new_tokens`` decode replays, with no host work between.

The attention mask is passed as an explicit 4-D boolean mask (transformers uses a 4-D
mask as given), computed inside the graph from the static positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GraphedGeneration:
    batch: int
    prompt_tokens: int
    new_tokens: int
    prefill: torch.cuda.CUDAGraph | None
    decode: torch.cuda.CUDAGraph | None
    prompt_ids: torch.Tensor  # [B, P], copy a prompt in before a prefill replay
    next_ids: torch.Tensor  # [B, 1], the token the next decode step feeds
    positions: torch.Tensor  # [B, 1], its position
    # Everything else the graphs read or write (the KV cache, masks' positions): a graph
    # holds raw addresses, so these must live as long as it does.
    captured_state: tuple = ()


def _cache_layers(cache) -> list:
    return list(cache.layers)


def build_generation(model, batch: int, prompt_tokens: int, new_tokens: int, graphs: bool = True) -> GraphedGeneration | _EagerGeneration:
    """Capture the prefill and decode graphs of ``model`` (on cuda, eval) for one shape."""
    from transformers import StaticCache

    device = next(model.parameters()).device
    max_len = prompt_tokens + new_tokens
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    key_positions = torch.arange(max_len, device=device)
    prompt_ids = torch.randint(0, model.config.vocab_size, (batch, prompt_tokens), device=device)
    prompt_positions = torch.arange(prompt_tokens, device=device).expand(batch, -1).contiguous()
    next_ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
    positions = torch.zeros(batch, 1, dtype=torch.long, device=device)

    def forward(ids: torch.Tensor, query_positions: torch.Tensor) -> torch.Tensor:
        mask = key_positions[None, None, None, :] <= query_positions[:, None, :, None]  # [B, 1, q, L]
        out = model(input_ids=ids, position_ids=query_positions, attention_mask=mask, past_key_values=cache,
                    use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :]

    def prefill_step() -> None:
        for layer in _cache_layers(cache):
            if getattr(layer, "is_initialized", False):
                layer.cumulative_length.zero_()
        logits = forward(prompt_ids, prompt_positions)
        next_ids.copy_(logits.argmax(dim=-1, keepdim=True))
        positions.fill_(prompt_tokens)

    def decode_step() -> None:
        logits = forward(next_ids, positions)
        next_ids.copy_(logits.argmax(dim=-1, keepdim=True))
        positions.add_(1)

    with torch.no_grad():
        # Eager warm-up on a side stream: allocates the cache, creates library handles.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                prefill_step()
                decode_step()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        if not graphs:
            return _EagerGeneration(batch, prompt_tokens, new_tokens, prefill_step, decode_step, prompt_ids, next_ids, positions)
        pool = torch.cuda.graph_pool_handle()
        prefill_graph, decode_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(prefill_graph, pool=pool):
            prefill_step()
        with torch.cuda.graph(decode_graph, pool=pool):
            decode_step()
    return GraphedGeneration(batch, prompt_tokens, new_tokens, prefill_graph, decode_graph, prompt_ids, next_ids, positions,
                             captured_state=(cache, key_positions, prompt_positions, pool))


@dataclass
class _EagerGeneration:
    """The same steps without graphs, for the eager comparison."""

    batch: int
    prompt_tokens: int
    new_tokens: int
    prefill_fn: object
    decode_fn: object
    prompt_ids: torch.Tensor
    next_ids: torch.Tensor
    positions: torch.Tensor


def run_prefill(generation) -> None:
    if isinstance(generation, GraphedGeneration):
        generation.prefill.replay()
    else:
        with torch.no_grad():
            generation.prefill_fn()


def run_decode(generation) -> None:
    if isinstance(generation, GraphedGeneration):
        generation.decode.replay()
    else:
        with torch.no_grad():
            generation.decode_fn()


def time_generation_cuda(generation, runs: int, warmup: int) -> tuple[list[float], list[float]]:
    """Prefill ms and mean decode-step ms per run, timed with CUDA events."""
    prefill_ms, decode_ms = [], []
    for run in range(warmup + runs):
        start, prefilled, finished = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        start.record()
        run_prefill(generation)
        prefilled.record()
        for _ in range(generation.new_tokens):
            run_decode(generation)
        finished.record()
        finished.synchronize()
        if run >= warmup:
            prefill_ms.append(start.elapsed_time(prefilled))
            decode_ms.append(prefilled.elapsed_time(finished) / max(generation.new_tokens, 1))
    return prefill_ms, decode_ms


def greedy_tokens(generation, prompt: torch.Tensor) -> torch.Tensor:
    """The greedy continuation of ``prompt`` [B, P] through the captured steps: [B, G]."""
    generation.prompt_ids.copy_(prompt)
    run_prefill(generation)
    produced = [generation.next_ids.clone()]
    for _ in range(generation.new_tokens - 1):
        run_decode(generation)
        produced.append(generation.next_ids.clone())
    return torch.cat(produced, dim=1)
