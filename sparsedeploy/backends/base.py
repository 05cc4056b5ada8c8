"""What every target backend provides, and the registry that names them.

A backend is one module with one class registered by ``@register_backend``. The
pipeline (``sparsedeploy.build``) asks the registry and never branches on a target's
name. The verbs:

- ``availability()``: can the engine run here, and if not, what would fix it.
- ``engine_version()``: the engine's version string (part of every cache key).
- ``preflight(checkpoint_dir)``: reject what the engine cannot take, before loading.
- ``build_settings(precision, workload)``: everything besides the checkpoint that
  determines the artifact (quantizer settings, static shapes...): the cache key.
- ``build(inputs, output_dir)``: export / quantize / compile into ``output_dir`` (an
  empty directory the caller publishes atomically); returns a :class:`BuiltArtifact`
  whose ``sparsity`` is measured in the artifact itself, after quantization.
- ``load(artifact_dir, workload)``: a :class:`Session` running the artifact in the
  engine: ``logits`` on one token window, ``measure_latency`` (prefill and decode timed
  separately inside the engine's process), ``kernels`` (what the engine says ran).
- ``baselines`` / ``load_baseline(name, dense, workload)`` (optional): other ways to
  shrink the dense model (bitsandbytes int8 / NF4 on the cuda target), measured beside
  the builds when the profile lists them under ``[check] baselines``.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from sparsedeploy.errors import BadInput

if TYPE_CHECKING:
    import torch

ARTIFACT_RECORD = "artifact.json"  # written by the pipeline beside a built artifact


@dataclass(frozen=True)
class Availability:
    available: bool
    reason: str  # what runs it, or why it cannot run here and what would fix that


@dataclass(frozen=True)
class Workload:
    """The shapes of an on-target check, from the profile's [check] tables."""

    eval_seqlen: int  # tokens per quality window
    eval_windows: int
    prompt_tokens: int  # prefill length P
    new_tokens: int  # decode steps G
    batches: tuple[int, ...]  # batch sizes B timed
    runs: int  # timed repetitions (p50/p95 over these)
    warmup: int  # untimed repetitions first
    threads: int  # engine threads, identical for the sparse and the dense build

    def to_dict(self) -> dict:
        data = asdict(self)
        data["batches"] = list(self.batches)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Workload:
        return cls(**{**data, "batches": tuple(data["batches"])})


@dataclass
class BuildInputs:
    model: torch.nn.Module  # float32 transformers causal LM on the CPU, eval mode
    checkpoint_sha256: str
    precision: str  # one of the profile's precisions
    workload: Workload
    options: dict  # the profile's [build] table (backend-specific knobs)
    # Calibration windows [n, seqlen] (LongTensor) for static quantization; called only
    # by a backend that needs them (never the evaluation text).
    calibration: Callable[[], torch.Tensor] | None = None
    # The checkpoint's directory (config, safetensors, tokenizer), for a backend whose
    # converter reads files rather than a model (llama.cpp's). Read only.
    checkpoint_dir: Path | None = None


def calibration_settings(options: dict, nsamples: int | None = None) -> dict:
    """Which calibration text a build reads, from a profile's ``[build]`` keys (``calib``,
    ``calib_nsamples``, ``calib_seqlen``, ``calib_seed``) and their defaults: part of
    the cache key of every build that calibrates, and what the pipeline loads.
    ``nsamples`` overrides ``calib_nsamples`` for a step that needs more text than the
    rest (GPTQ)."""
    if nsamples is None:
        nsamples = whole_number(options, "calib_nsamples", 16, minimum=1)
    return {"data": options.get("calib", "canterbury"), "nsamples": nsamples,
            "seqlen": whole_number(options, "calib_seqlen", 256, minimum=2),
            "seed": whole_number(options, "calib_seed", 0, minimum=0)}


def whole_number(options: dict, key: str, default: int, minimum: int) -> int:
    """A whole-number ``[build]`` option, or a one-line error naming it."""
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise BadInput(f"{key} in the profile's [build] table must be a whole number >= {minimum}, not {value!r}; "
                       f"the default is {default}")
    return value


@dataclass
class BuiltArtifact:
    directory: Path
    main_file: str  # the file a user deploys (relative to directory), e.g. "model.onnx"
    precision: str
    # Measured in the artifact: {"sparsity": f, "compliance": {"2:4": f, "4:8": f},
    # "num_linear_weights": n, ...} (see sparsedeploy.export.onnx_decoder.initializer_sparsity)
    sparsity: dict
    details: dict = field(default_factory=dict)  # backend-specific: exporter, quantizer, graphs

    def record(self) -> dict:
        return {"main_file": self.main_file, "precision": self.precision, "sparsity": self.sparsity, "details": self.details}

    def save_record(self) -> None:
        (self.directory / ARTIFACT_RECORD).write_text(json.dumps(self.record(), indent=1) + "\n")

    @classmethod
    def from_directory(cls, directory: Path) -> BuiltArtifact:
        path = directory / ARTIFACT_RECORD
        if not path.is_file():
            raise BadInput(f"'{directory}' is not a built artifact (no {ARTIFACT_RECORD}); rebuild it with `sparsedeploy build`")
        data = json.loads(path.read_text())
        return cls(directory=directory, **data)


@dataclass
class LatencySamples:
    """One entry per timed run. ``prefill_ms``: the whole prompt of the batch in one call;
    ``decode_ms``: the mean time of one decode step (one new token per sequence of the
    batch, with the KV cache) over the run's ``new_tokens`` steps."""

    prefill_ms: list[float]
    decode_ms: list[float]


class Session:
    """A loaded artifact in its engine. Close it (or use ``with``) to free the engine."""

    def logits(self, window: torch.Tensor) -> torch.Tensor:
        """Next-token logits [T, V] (float32, CPU) for one window [T] from an empty context."""
        raise NotImplementedError

    def measure_latency(self, batch: int, prompt_tokens: int, new_tokens: int, runs: int, warmup: int) -> LatencySamples:
        raise NotImplementedError

    def kernels(self) -> dict:
        """What the engine reports about the kernels that ran: at least ``{"sparse_kernels":
        "used"|"not-used"|"unknown", "evidence": str}``; "used" only when the engine says so."""
        return {"sparse_kernels": "unknown", "evidence": "the engine does not report its kernels"}

    def close(self) -> None:
        pass

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Backend:
    name: ClassVar[str]  # the registry key, as `backend = "..."` in a target profile
    engine: ClassVar[str]  # the inference engine, as reported
    device: ClassVar[str]  # "cpu" or "cuda"
    # Keys of the [build] options a command-line flag may set for this backend.
    command_line_options: ClassVar[tuple[str, ...]] = ()

    def availability(self) -> Availability:
        raise NotImplementedError

    def engine_version(self) -> str:
        raise NotImplementedError

    def build_settings(self, precision: str, workload: Workload, options: dict) -> dict:
        """Everything besides the checkpoint that determines the artifact (JSON-able)."""
        return {"precision": precision, "options": options}

    def implied_precision(self, options: dict) -> str | None:
        """The precision that backend options name on their own (a llama.cpp type given
        without --quant), else None: the profile's default applies."""
        return None

    def preflight(self, checkpoint_dir: Path) -> None:
        """Reject a checkpoint the engine cannot take (BadInput), before anything is loaded."""

    def build(self, inputs: BuildInputs, output_dir: Path) -> BuiltArtifact:
        raise NotImplementedError

    def load(self, artifact: BuiltArtifact, workload: Workload) -> Session:
        raise NotImplementedError

    # Other ways to shrink the dense model that a profile may ask to measure beside the
    # builds (its [check] baselines): name -> what it is. Not gated; reported.
    baselines: ClassVar[dict[str, str]] = {}

    def baseline_unavailable(self, name: str) -> str | None:
        """Why baseline ``name`` cannot be measured here (a package missing), else None."""
        return None

    def baseline_version(self, name: str) -> str:
        """The versions that decide what baseline ``name`` measures (part of its cache key)."""
        return self.engine_version()

    def load_baseline(self, name: str, dense: BuiltArtifact, workload: Workload) -> Session:
        """The dense build run as baseline ``name`` (quantized at load time, say)."""
        raise NotImplementedError


_BACKENDS: dict[str, type[Backend]] = {}


def register_backend(cls: type[Backend]) -> type[Backend]:
    _BACKENDS[cls.name] = cls
    return cls


def backend_names() -> list[str]:
    _import_all()
    return sorted(_BACKENDS)


def get_backend(name: str) -> Backend:
    _import_all()
    if name not in _BACKENDS:
        raise BadInput(f"unknown backend '{name}'; known backends: {', '.join(sorted(_BACKENDS))}")
    return _BACKENDS[name]()


def _import_all() -> None:
    # Importing a backend module registers it; engines themselves load lazily.
    from sparsedeploy.backends import BACKEND_MODULES

    for module in BACKEND_MODULES:
        importlib.import_module(f"sparsedeploy.backends.{module}")


def module_version(module_name: str) -> str | None:
    """The engine package's version if it imports, else None."""
    try:
        module = importlib.import_module(module_name)
    except Exception:  # a broken install is as unusable as a missing one
        return None
    return str(getattr(module, "__version__", "unknown"))


def cuda_gpu() -> tuple[bool, str]:
    """Whether PyTorch sees an NVIDIA GPU with 2:4 sparse tensor cores (Ampere or newer)."""
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA GPU on this machine"
    major, minor = torch.cuda.get_device_capability(0)
    name = torch.cuda.get_device_name(0)
    if major < 8:
        return False, f"{name} (sm_{major}{minor}) has no 2:4 sparse tensor cores; needs sm_80 or newer"
    return True, f"{name} (sm_{major}{minor})"


def time_generation(prefill, decode, new_tokens: int, runs: int, warmup: int) -> LatencySamples:
    """The timing loop shared by in-process engines: ``prefill()`` returns a decode state,
    ``decode(state)`` the next one. Warm-up runs first, untimed; each timed run is one
    prefill then ``new_tokens`` decode steps, timed separately."""
    import time

    prefill_ms, decode_ms = [], []
    for run in range(warmup + runs):
        started = time.perf_counter()
        state = prefill()
        prefilled = time.perf_counter()
        for _ in range(new_tokens):
            state = decode(state)
        finished = time.perf_counter()
        if run >= warmup:
            prefill_ms.append((prefilled - started) * 1000)
            decode_ms.append((finished - prefilled) * 1000 / max(new_tokens, 1))
    return LatencySamples(prefill_ms, decode_ms)


def time_generation_on_gpu(prefill, decode, new_tokens: int, runs: int, warmup: int, stream=None) -> LatencySamples:
    """:func:`time_generation` for engines that run on a GPU: CUDA events recorded on
    ``stream`` (default: the current one) mark the phases, so the host never waits between
    steps and only the device's time between the marks counts."""
    import torch

    prefill_ms, decode_ms = [], []
    for run in range(warmup + runs):
        start, prefilled, finished = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        start.record(stream)
        state = prefill()
        prefilled.record(stream)
        for _ in range(new_tokens):
            state = decode(state)
        finished.record(stream)
        finished.synchronize()
        if run >= warmup:
            prefill_ms.append(start.elapsed_time(prefilled))
            decode_ms.append(prefilled.elapsed_time(finished) / max(new_tokens, 1))
    return LatencySamples(prefill_ms, decode_ms)
