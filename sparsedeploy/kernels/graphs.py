"""Prefill and decode of a transformers causal LM as CUDA graphs over a static KV cache
(or the same steps run eagerly, on a GPU or a CPU).

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

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sparsedeploy.backends.base import LatencySamples, time_generation, time_generation_on_gpu


@dataclass
class Generation:
    """Prefill and decode of one (batch, prompt, new tokens) shape: graph replays, or the
    same steps run eagerly (without graphs, and on a CPU)."""

    batch: int
    prompt_tokens: int
    new_tokens: int
    prefill: Callable[[], None]  # resets the cache, runs prompt_ids, sets next_ids/positions
    decode: Callable[[], None]  # feeds next_ids, then advances next_ids/positions
    prompt_ids: torch.Tensor  # [B, P], copy a prompt in before a prefill
    next_ids: torch.Tensor  # [B, 1], the token the next decode step feeds
    positions: torch.Tensor  # [B, 1], its position
    graphs: bool  # the steps are CUDA graph replays
    # Everything else the steps read or write (the KV cache, the masks' positions): a graph
    # holds raw addresses, so these must live as long as it does.
    captured_state: tuple = ()

    @property
    def on_gpu(self) -> bool:
        return self.next_ids.device.type == "cuda"


def build_generation(model, batch: int, prompt_tokens: int, new_tokens: int, graphs: bool = True) -> Generation:
    """The prefill and decode steps of ``model`` (eval) for one shape; on a GPU captured
    as CUDA graphs unless ``graphs`` is False."""
    from transformers import StaticCache

    device = next(model.parameters()).device
    max_len = prompt_tokens + new_tokens
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    key_positions = torch.arange(max_len, device=device)
    prompt_ids = torch.randint(0, model.config.vocab_size, (batch, prompt_tokens), device=device)
    prompt_positions = torch.arange(prompt_tokens, device=device).expand(batch, -1).contiguous()
    next_ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
    positions = torch.zeros(batch, 1, dtype=torch.long, device=device)

    # A sliding-window layer shorter than the sequence keeps only its window and picks its
    # code path on the host: transformers must build the masks, and no graph can be captured.
    outgrows_window = any(getattr(layer, "is_sliding", False) and max_len > layer.max_cache_len for layer in cache.layers)

    def forward(ids: torch.Tensor, query_positions: torch.Tensor) -> torch.Tensor:
        mask = None if outgrows_window else key_positions[None, None, None, :] <= query_positions[:, None, :, None]  # [B, 1, q, L]
        out = model(input_ids=ids, position_ids=query_positions, attention_mask=mask, past_key_values=cache,
                    use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :]

    @torch.no_grad()
    def prefill_step() -> None:
        for layer in cache.layers:
            if getattr(layer, "is_initialized", False):
                layer.cumulative_length.zero_()
                if hasattr(layer, "cumulative_length_int"):
                    layer.cumulative_length_int = 0  # sliding-window layers also count on the host
        logits = forward(prompt_ids, prompt_positions)
        next_ids.copy_(logits.argmax(dim=-1, keepdim=True))
        positions.fill_(prompt_tokens)

    @torch.no_grad()
    def decode_step() -> None:
        logits = forward(next_ids, positions)
        next_ids.copy_(logits.argmax(dim=-1, keepdim=True))
        positions.add_(1)

    state = (cache, key_positions, prompt_positions)
    if device.type != "cuda":
        return Generation(batch, prompt_tokens, new_tokens, prefill_step, decode_step, prompt_ids, next_ids, positions,
                          graphs=False, captured_state=state)
    # Eager warm-up on a side stream: allocates the cache, creates library handles.
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            prefill_step()
            decode_step()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    if not graphs or outgrows_window:
        return Generation(batch, prompt_tokens, new_tokens, prefill_step, decode_step, prompt_ids, next_ids, positions,
                          graphs=False, captured_state=state)
    pool = torch.cuda.graph_pool_handle()
    prefill_graph, decode_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(prefill_graph, pool=pool):
        prefill_step()
    with torch.cuda.graph(decode_graph, pool=pool):
        decode_step()
    return Generation(batch, prompt_tokens, new_tokens, prefill_graph.replay, decode_graph.replay, prompt_ids, next_ids,
                      positions, graphs=True, captured_state=(*state, pool))


def time_prefill_decode(generation: Generation, runs: int, warmup: int) -> LatencySamples:
    """Prefill and mean decode-step milliseconds per run: CUDA events on a GPU (the host
    never waits between steps), the host clock on a CPU."""
    timer = time_generation_on_gpu if generation.on_gpu else time_generation
    return timer(generation.prefill, lambda _: generation.decode(), generation.new_tokens, runs, warmup)


def greedy_tokens(generation: Generation, prompt: torch.Tensor) -> torch.Tensor:
    """The greedy continuation of ``prompt`` [B, P] through the steps: [B, G]."""
    generation.prompt_ids.copy_(prompt)
    generation.prefill()
    produced = [generation.next_ids.clone()]
    for _ in range(generation.new_tokens - 1):
        generation.decode()
        produced.append(generation.next_ids.clone())
    return torch.cat(produced, dim=1)
