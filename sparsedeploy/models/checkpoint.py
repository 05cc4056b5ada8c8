"""Checkpoints in, validated at the edge: resolve `default` or a local Hugging Face
directory, refuse what we cannot load safely, and load model and tokenizer.

Nothing here writes into a checkpoint directory.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from sparsedeploy.errors import BadInput
from sparsedeploy.models.adapters import check_supported

DEFAULT_MODEL = "default"
# Our own note beside the default model's files; not part of the model's identity.
DEFAULT_METADATA_NAME = "sparsedeploy-default.json"
FIX_CHECKPOINT = "pass `default` or a local Hugging Face directory (config.json + *.safetensors)"


@dataclass(frozen=True)
class Checkpoint:
    spec: str  # as the user gave it: "default" or a path
    path: Path  # the directory that holds config.json and the safetensors
    config: dict

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    @property
    def architecture(self) -> str:
        names = self.config.get("architectures") or [self.model_type or "unknown"]
        return names[0]


def resolve_checkpoint(spec: str) -> Checkpoint:
    """Turn a MODEL argument into a validated checkpoint directory."""
    if spec == DEFAULT_MODEL:
        from sparsedeploy.models.default import ensure_default_checkpoint

        path = ensure_default_checkpoint()
    else:
        path = Path(spec).expanduser()
    config = validate_checkpoint_dir(path)
    return Checkpoint(spec, path.resolve(), config)


def validate_checkpoint_dir(path: Path) -> dict:
    """Every check that needs no model load; returns config.json's content."""
    if not path.exists():
        raise BadInput(f"checkpoint '{path}' does not exist; {FIX_CHECKPOINT}")
    if not path.is_dir():
        raise BadInput(f"checkpoint '{path}' is a file, not a directory; {FIX_CHECKPOINT}")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise BadInput(f"'{path}' has no config.json, so it is not a Hugging Face checkpoint; {FIX_CHECKPOINT}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BadInput(f"'{config_path}' is not valid JSON ({error}); restore it from the source checkpoint") from None
    check_supported(config.get("model_type"))

    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickles:
            raise BadInput(
                f"'{path}' holds only pickle weights ({', '.join(pickles[:3])}), which can run code when loaded; "
                "convert them to safetensors where you trust them (e.g. save_pretrained(..., safe_serialization=True))"
            )
        raise BadInput(f"'{path}' has no *.safetensors weights; {FIX_CHECKPOINT}")
    for weight_file in weights:
        check_safetensors_complete(weight_file)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values())
        missing = sorted(shard for shard in shards if not (path / shard).is_file())
        if missing:
            raise BadInput(f"'{path}' is missing weight shards {missing}; copy the complete checkpoint")
    return config


def check_safetensors_complete(path: Path) -> None:
    """A truncated file is caught from its header: the header states where the last
    tensor ends, and the file must be exactly that long."""
    size = path.stat().st_size
    problem = None
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            problem = f"only {size} bytes"
        else:
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > size - 8:
                problem = "its header runs past the end of the file"
            else:
                try:
                    header = json.loads(handle.read(header_len))
                except (json.JSONDecodeError, UnicodeDecodeError):
                    problem = "its header is not valid JSON"
                else:
                    data_end = max(
                        (entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"),
                        default=0,
                    )
                    expected = 8 + header_len + data_end
                    if expected != size:
                        problem = f"it is {size} bytes but its header describes {expected}"
    if problem:
        raise BadInput(f"weights file '{path}' is truncated or corrupt ({problem}); copy or download it again")


def load_model(checkpoint: Checkpoint, dtype: torch.dtype = torch.float32, device: str = "cpu", check_finite: bool = True):
    """Load the causal LM from safetensors only, never running remote code."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            checkpoint.path,
            dtype=dtype,
            use_safetensors=True,
            trust_remote_code=False,
            low_cpu_mem_usage=True,
        )
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BadInput(f"could not load '{checkpoint.path}' ({first_line}); check that it is a complete causal LM checkpoint") from None
    model.to(device).eval()
    if check_finite:
        bad = nonfinite_tensors(model)
        if bad:
            name, count = next(iter(bad.items()))
            raise BadInput(
                f"'{checkpoint.path}' has NaN/Inf weights ({count} in {name}"
                f"{f' and {len(bad) - 1} more tensors' if len(bad) > 1 else ''}); the checkpoint is corrupt: re-create it from its source"
            )
    return model


def nonfinite_tensors(model: torch.nn.Module) -> dict[str, int]:
    """Parameter name -> number of NaN/Inf entries, for every tensor that has any."""
    counts = {}
    for name, parameter in model.named_parameters():
        bad = int((~torch.isfinite(parameter)).sum().item())
        if bad:
            counts[name] = bad
    return counts


def copy_with_own_parameters(model: torch.nn.Module, changing: set[int]) -> torch.nn.Module:
    """A copy of ``model`` that owns fresh copies of the parameters whose ids are in
    ``changing`` and shares every other parameter with ``model``: a transform that
    rewrites some weights costs their memory only, and ``model`` stays as it is."""
    import copy

    memo = {id(p): (torch.nn.Parameter(p.detach().clone(), requires_grad=False) if id(p) in changing else p)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def load_tokenizer(checkpoint: Checkpoint):
    from transformers import AutoTokenizer

    has_tokenizer = any((checkpoint.path / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json"))
    if not has_tokenizer:
        raise BadInput(f"'{checkpoint.path}' has no tokenizer files; copy the tokenizer of its source model into it")
    return AutoTokenizer.from_pretrained(checkpoint.path, trust_remote_code=False)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_sha256(path: Path) -> str:
    """One digest for a checkpoint directory: every file's relative path and content."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.name != DEFAULT_METADATA_NAME):
        digest.update(f"{file.relative_to(path).as_posix()}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()


def recorded_source(checkpoint: Checkpoint, recorded: dict | None, explicit: str | None, flag: str) -> Checkpoint:
    """The dense model a pruned checkpoint came from: ``explicit`` when the user named one
    (``flag``), else the source its sparsity.json records, verified by sha256 so that a
    changed model is never silently used as the reference or the teacher."""
    if explicit is not None:
        return resolve_checkpoint(explicit)
    if recorded is None:
        raise BadInput(f"'{checkpoint.path}' has no sparsity.json naming its dense source model; pass {flag} MODEL")
    source = recorded.get("source") or {}
    path = source.get("path")
    if not path:
        raise BadInput(f"sparsity.json of '{checkpoint.path}' names no source model; pass {flag} MODEL")
    if path != DEFAULT_MODEL and not Path(path).is_dir():
        raise BadInput(f"the dense source '{path}' named in sparsity.json is not on this machine; pass {flag} MODEL")
    resolved = resolve_checkpoint(path)
    if source.get("sha256") and checkpoint_sha256(resolved.path) != source["sha256"]:
        raise BadInput(f"the dense source '{path}' changed since '{checkpoint.path}' was pruned from it; pass {flag} MODEL")
    return resolved
