"""Shared fixtures: tiny randomly initialised models of each supported architecture
(no download), saved as ordinary Hugging Face checkpoints, and the real default model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

EXPECTED_ROLES_ALL = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3_text", "phi3", "opt", "gpt_neox"]

REPOSITORY = Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)


def tiny_configs() -> dict:
    """model_type -> a tiny config of that architecture (GQA where it has it)."""
    import transformers as t

    return {
        "llama": t.LlamaConfig(**TINY, intermediate_size=128, num_key_value_heads=2),
        "mistral": t.MistralConfig(**TINY, intermediate_size=128, num_key_value_heads=2),
        "qwen2": t.Qwen2Config(**TINY, intermediate_size=128, num_key_value_heads=2),
        "qwen3": t.Qwen3Config(**TINY, intermediate_size=128, num_key_value_heads=2, head_dim=16),
        "gemma": t.GemmaConfig(**TINY, intermediate_size=128, num_key_value_heads=1, head_dim=16),
        "gemma3_text": t.Gemma3TextConfig(**TINY, intermediate_size=128, num_key_value_heads=2, head_dim=16),
        "phi3": t.Phi3Config(**TINY, intermediate_size=128, num_key_value_heads=2, pad_token_id=0),
        "opt": t.OPTConfig(**TINY, ffn_dim=128, word_embed_proj_dim=64, pad_token_id=1),
        "gpt_neox": t.GPTNeoXConfig(**TINY, intermediate_size=128),
    }


def make_tiny_model(model_type: str = "llama", seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_configs()[model_type]
    config.eos_token_id = config.bos_token_id = 0
    return AutoModelForCausalLM.from_config(config).eval()


def save_checkpoint(model, directory: Path) -> Path:
    model.save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    """A tiny Llama checkpoint without a tokenizer (vocab 256): for tests that feed token ids."""
    return save_checkpoint(make_tiny_model("llama"), tmp_path / "tiny-llama")


def save_tokenized_tiny(directory: Path, default_checkpoint, seed: int = 0, **config_changes) -> Path:
    """A tiny random Llama with the default model's tokenizer (vocabulary 49152), saved as
    a checkpoint directory: for tests that run text through a real tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    settings = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    path = save_checkpoint(AutoModelForCausalLM.from_config(LlamaConfig(**{**settings, **config_changes})), directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_checkpoint.path / name, path / name)
    return path


@pytest.fixture
def tokenized_tiny_checkpoint(tmp_path, default_checkpoint):
    """A tiny Llama whose vocabulary matches the default model's tokenizer."""
    return save_tokenized_tiny(tmp_path / "tiny", default_checkpoint)


@pytest.fixture(scope="session")
def default_checkpoint():
    from sparsedeploy.models.checkpoint import resolve_checkpoint

    return resolve_checkpoint("default")


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real command line, in a subprocess, exactly as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "sparsedeploy", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=1800,
    )


def run_cli_json(*args: str, env: dict | None = None):
    result = run_cli(*args, "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def tree_fingerprint(directory: Path) -> dict:
    """Every file's bytes and mtime, to prove a command wrote nothing into an input."""
    return {
        str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def small_profile(source: str, **changes) -> str:
    """A repository profile with a workload small enough for a test."""
    text = (REPOSITORY / "targets" / f"{source}.toml").read_text()
    raw = tomllib.loads(text)
    replacements = {"windows": 2, "seqlen": 64, "prompt_tokens": 16, "new_tokens": 4, "runs": 2, "warmup": 1}
    lines = []
    for line in text.splitlines():
        key = line.split("=")[0].strip()
        if key in replacements and "=" in line:
            line = f"{key} = {replacements[key]}"
        lines.append(line)
    text = "\n".join(lines) + "\n"
    for key, value in changes.items():
        text = text.replace(f"{key} = {json.dumps(raw.get(key))}", f"{key} = {json.dumps(value)}") if key in raw else text
    return text
