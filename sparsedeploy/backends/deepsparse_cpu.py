"""DeepSparse (Neural Magic) on x86 CPU, in its own virtual environment.

DeepSparse pins old onnx/numpy releases, so it lives in `.venv-deepsparse/` and is
driven through a subprocess (``deepsparse_worker.py``, JSON lines over its stdin/stdout,
arrays as .npy files in a private temporary directory); this module never imports it.

The artifact: one ONNX export with dynamic shapes (opset 17, IR <= 9: what DeepSparse
1.8 reads), ``model.onnx`` + ``model.onnx.data``, int8 as a static QOperator graph
(QLinearMatMul, per tensor: the only int8 form that ran correctly on DeepSparse 1.8), and
``model.last.onnx``: the same graph and weights (it references ``model.onnx.data``) whose
logits cover only the last position, as a serving engine computes them after a prefill.
Engines are compiled at load time, one per (graph, batch, seq, past), for static shapes
(see the worker's docstring for the fixed-context KV cache).

Every worker failure (engine crash or abort, a Python error in the worker, no answer
within ``worker_idle_timeout_s``) becomes a :class:`WorkerError` carrying the last
lines of the worker's stderr, and a dead or silent worker is killed.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import platform
import queue
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import weakref
from collections import Counter, deque
from pathlib import Path

from sparsedeploy.backends.base import (
    Availability,
    Backend,
    BuildInputs,
    BuiltArtifact,
    LatencySamples,
    Session,
    Workload,
    calibration_settings,
    register_backend,
)
from sparsedeploy.errors import EXIT_TARGET_UNAVAILABLE, BadInput, SparsedeployError, TargetUnavailable
from sparsedeploy.export.last_position import LAST_GRAPH, write_last_position_graph
from sparsedeploy.export.smoothing import smoothed_if_asked, smoothquant_alpha

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER_SCRIPT = Path(__file__).with_name("deepsparse_worker.py")
PRECISIONS = ("fp32", "int8")
QUANT_SCHEME = "int8-static-qoperator"  # sparsedeploy.export.onnx_quantize
OPSET = 17  # DeepSparse 1.8 reads opset <= 17 (and IR <= 9, which the exporter ensures)
ARTIFACT_FORMAT = 1  # bump when the artifact layout changes: part of the cache key
# Seconds the worker may stay silent (one engine compile, one timed run, one window)
# before it is declared hung; a profile's [build] worker_idle_timeout_s overrides it.
DEFAULT_IDLE_TIMEOUT_S = 900.0
STDERR_LINES = 30  # stderr lines kept for error messages
KERNEL_PHASES = ("decode", "prefill")  # analysed by Session.kernels()


class WorkerError(SparsedeployError):
    """The DeepSparse worker failed: crashed, aborted, raised, or stopped answering.
    Exit 3: the engine cannot run this here (the input itself was accepted)."""

    exit_code = EXIT_TARGET_UNAVAILABLE


def deepsparse_python() -> Path:
    explicit = os.environ.get("SPARSEDEPLOY_DEEPSPARSE_PYTHON")
    return Path(explicit) if explicit else REPO_ROOT / ".venv-deepsparse" / "bin" / "python"


def _worker_env() -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env["NM_DISABLE_ANALYTICS"] = "1"
    return env


@functools.lru_cache(maxsize=4)
def _probe(python: str) -> tuple[bool, str]:
    """(imports, version or the last line of its error) for that interpreter."""
    # -I and a neutral cwd: a stray package in the caller's directory (say a
    # brotli source tree) must not shadow one of DeepSparse's dependencies.
    try:
        probe = subprocess.run(
            [python, "-I", "-c", "import deepsparse; print(deepsparse.__version__)"],
            capture_output=True, text=True, timeout=120, cwd=tempfile.gettempdir(), env=_worker_env(),
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return False, str(error).splitlines()[0] if str(error) else type(error).__name__
    if probe.returncode != 0:
        return False, (probe.stderr.strip().splitlines() or ["no output"])[-1]
    return True, probe.stdout.strip().splitlines()[-1]


@register_backend
class DeepSparseBackend(Backend):
    name = "deepsparse"
    engine = "deepsparse"
    device = "cpu"

    def availability(self) -> Availability:
        if platform.machine().lower() not in ("x86_64", "amd64"):
            return Availability(False, f"DeepSparse runs on x86-64 CPUs only; this machine is {platform.machine()}")
        python = deepsparse_python()
        if not python.is_file():
            return Availability(
                False,
                f"DeepSparse is not installed: its separate environment {python.parent.parent} does not exist "
                "(set SPARSEDEPLOY_DEEPSPARSE_PYTHON to a Python that has deepsparse)",
            )
        ok, detail = _probe(str(python))
        if not ok:
            return Availability(False, f"deepsparse does not import in {python} ({detail}); recreate that environment")
        return Availability(True, f"deepsparse {detail} in {python.parent.parent}")

    def engine_version(self) -> str:
        ok, detail = _probe(str(deepsparse_python()))
        if not ok:
            raise TargetUnavailable(f"DeepSparse is not usable ({detail}); run `make install` or check `sparsedeploy targets`")
        return detail

    def build_settings(self, precision: str, workload: Workload, options: dict) -> dict:
        # The artifact has dynamic shapes (engines are compiled for the check's shapes at
        # load time), so the workload is not part of it.
        # Only what shapes the artifact: the worker's timeout does not; the calibration
        # text counts for int8 only, as the "calibration" every calibrating build declares.
        relevant = {key: value for key, value in options.items()
                    if key != "worker_idle_timeout_s" and not key.startswith("calib")}
        settings = {"precision": precision, "options": relevant, "format": ARTIFACT_FORMAT,
                    "export": {"opset": OPSET, "shapes": "dynamic", "latency_graph": LAST_GRAPH}}
        if precision == "int8":
            settings["quantizer"] = QUANT_SCHEME
            settings["smoothquant_alpha"] = smoothquant_alpha(options.get("smoothquant_alpha"))
            settings["calibration"] = calibration_settings(options)
        return settings

    def build(self, inputs: BuildInputs, output_dir: Path) -> BuiltArtifact:
        from sparsedeploy.export.onnx_decoder import MODEL_FILE, export_decoder, initializer_sparsity

        precision = inputs.precision
        _check_precision(precision)
        output_dir = Path(output_dir)
        started = time.perf_counter()
        scratch = output_dir / ".export-fp32"
        # int8's activations are per tensor (QLinearMatMul): SmoothQuant first, unless the profile turns it off.
        alpha = self.build_settings(precision, inputs.workload, inputs.options).get("smoothquant_alpha")
        model, smoothing = smoothed_if_asked(inputs.model, alpha, inputs.calibration)
        try:
            exported = export_decoder(model, scratch, opset=OPSET)
            details = {
                "format": ARTIFACT_FORMAT,
                "exporter": {"opset": exported.opset, "ir_version": exported.ir_version, "shapes": "dynamic",
                             "max_abs_diff_vs_torch": exported.max_abs_diff, "seconds": round(exported.seconds, 1)},
                "geometry": {"num_layers": exported.num_layers, "kv_heads": exported.kv_heads,
                             "head_dim": exported.head_dim, "vocab": _graph_vocab(exported.path),
                             "input_names": exported.input_names, "kv_update": kv_update(inputs.model.config)},
                "quantizer": None,
            }
            if precision == "fp32":
                for name in exported.files:
                    (scratch / name).rename(output_dir / name)
            else:
                details["quantizer"] = {**_quantize_int8(inputs, exported.path, output_dir), "smoothing": smoothing}
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        main = output_dir / MODEL_FILE
        details["graphs"] = {"full": MODEL_FILE, "last": LAST_GRAPH}
        details["last_graph"] = write_last_position_graph(main, output_dir / LAST_GRAPH)
        details["worker_idle_timeout_s"] = float(inputs.options.get("worker_idle_timeout_s", DEFAULT_IDLE_TIMEOUT_S))
        measured = initializer_sparsity(main)
        sparsity = {key: value for key, value in measured.items() if key != "linear_weights"}
        details["linear_weight_names"] = [entry["name"] for entry in measured["linear_weights"]]
        details["files"] = sorted(p.name for p in output_dir.iterdir() if p.is_file())
        details["bytes"] = sum((output_dir / name).stat().st_size for name in details["files"])
        details["seconds"] = round(time.perf_counter() - started, 1)
        return BuiltArtifact(directory=output_dir, main_file=MODEL_FILE, precision=precision, sparsity=sparsity, details=details)

    def load(self, artifact: BuiltArtifact, workload: Workload) -> Session:
        if not self.availability().available:
            raise TargetUnavailable(f"DeepSparse cannot run here: {self.availability().reason}")
        _check_precision(artifact.precision)
        if artifact.details.get("format") != ARTIFACT_FORMAT:
            raise BadInput(f"'{artifact.directory}' was built by another version of the deepsparse backend; rebuild it with `sparsedeploy build`")
        for name in artifact.details["graphs"].values():
            if not (artifact.directory / name).is_file():
                raise BadInput(f"'{artifact.directory / name}' is missing; rebuild the artifact with `sparsedeploy build`")
        return DeepSparseSession(artifact, workload)


def kv_update(config) -> str:
    """How decode steps update the fixed-context KV cache in the worker: "in-place" (one
    slot per step, slot order free) unless the model has a sliding window, which the
    export applies by slot distance, so slots must stay in time order ("shift")."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or []
    sliding = (window and getattr(config, "use_sliding_window", True) is not False) or "sliding_attention" in layer_types
    return "shift" if sliding else "in-place"


def _check_precision(precision: str) -> None:
    if precision == "int4":
        raise BadInput(
            "DeepSparse has no INT4 kernels (its quantized path is 8-bit only); "
            "build INT4 with `--target onnxruntime --quant int4`, or use --quant int8 or none here"
        )
    if precision not in PRECISIONS:
        raise BadInput(f"precision '{precision}' is not supported by DeepSparse; use one of {', '.join(PRECISIONS)}")


def _quantize_int8(inputs: BuildInputs, fp32_model: Path, output_dir: Path) -> dict:
    from sparsedeploy.export.onnx_quantize import calibration_feeds_from_windows, quantize_onnx

    if inputs.calibration is None:
        raise BadInput("int8 for DeepSparse needs calibration text (static quantization); give the build a calibration source")
    feeds = calibration_feeds_from_windows(inputs.calibration(), fp32_model)
    staging = output_dir / ".int8"
    staging.mkdir()
    try:
        result = quantize_onnx(fp32_model, staging, QUANT_SCHEME, calibration_feeds=feeds)
        for name in result.files:
            (staging / name).rename(output_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result.describe()


def _graph_vocab(path: Path) -> int:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    logits = next(v for v in graph.output if v.name == "logits")
    return int(logits.type.tensor_type.shape.dim[-1].dim_value)


# -- the worker and the session ---------------------------------------------------


class _Worker:
    """One ``deepsparse_worker.py`` process in DeepSparse's venv, and its private
    directory (its cwd, and where arrays are exchanged as .npy files)."""

    def __init__(self, python: Path, idle_timeout_s: float, on_progress=None):
        self.idle_timeout_s = float(idle_timeout_s)
        self.on_progress = on_progress
        self.directory = Path(tempfile.mkdtemp(prefix="sparsedeploy-deepsparse-"))
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_LINES)
        self.messages: queue.Queue = queue.Queue()
        self.failure: str | None = None  # set once the worker is dead or was killed
        self._ids = itertools.count(1)
        try:
            # Its own session: a Ctrl-C at the terminal reaches us, and we stop it.
            self.process = subprocess.Popen(
                [str(python), "-I", str(WORKER_SCRIPT)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                cwd=self.directory, env=_worker_env(), start_new_session=True,
            )
        except OSError as error:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise TargetUnavailable(f"cannot start DeepSparse's Python {python} ({error}); run `make install`") from None
        self._finalizer = weakref.finalize(self, _stop_process, self.process, self.directory)
        self._threads = [
            threading.Thread(target=self._read_stdout, daemon=True, name="deepsparse-stdout"),
            threading.Thread(target=self._read_stderr, daemon=True, name="deepsparse-stderr"),
        ]
        for thread in self._threads:
            thread.start()
        self.ready = self._wait(None, "starting the DeepSparse worker")

    # -- reading ---------------------------------------------------------------

    def _read_stdout(self) -> None:
        for raw in self.process.stdout:
            line = raw.decode("utf-8", "replace").strip()
            if not line:
                continue
            try:
                self.messages.put(json.loads(line))
            except json.JSONDecodeError:
                self.stderr_tail.append(line)  # not ours: keep it for diagnostics
        self.messages.put(None)  # end of stream: the worker exited

    def _read_stderr(self) -> None:
        for raw in self.process.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                self.stderr_tail.append(line)

    def _wait(self, ident: int | None, doing: str) -> dict:
        """The next "done" message for ``ident`` (or the ready message); progress
        messages restart the idle clock."""
        while True:
            try:
                message = self.messages.get(timeout=self.idle_timeout_s)
            except queue.Empty:
                self._fail(f"DeepSparse did not answer for {self.idle_timeout_s:.0f} s while {doing}, so it was stopped "
                           "(raise worker_idle_timeout_s in the profile's [build] table if the machine is just slow)")
            if message is None:
                self._fail(f"the DeepSparse worker died while {doing} ({self._exit_status()})")
            if ident is None and message.get("event") == "ready":
                return message
            if message.get("id") != ident:
                continue
            event = message.get("event")
            if event == "progress":
                if self.on_progress is not None:
                    self.on_progress(message.get("message", ""))
            elif event == "done":
                return message.get("result", {})
            elif event == "error":
                tail = self._tail(5) if self.stderr_tail else ""
                raise WorkerError(f"DeepSparse failed while {doing}: {message.get('type')}: {message.get('message')}{tail}")

    def _exit_status(self) -> str:
        try:
            code = self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            return "its output closed but it did not exit"
        if code < 0:
            try:
                return f"killed by signal {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit code {code}"

    def _tail(self, lines: int = STDERR_LINES) -> str:
        if self.process.poll() is not None:
            self._threads[1].join(timeout=2.0)  # let the stderr reader drain what a dead worker wrote
        tail = list(self.stderr_tail)[-lines:]
        return ("; last lines of its stderr:\n  " + "\n  ".join(tail)) if tail else "; it wrote nothing to stderr"

    def _fail(self, message: str):
        self.kill()
        self.failure = message
        raise WorkerError(message + self._tail())

    # -- requests --------------------------------------------------------------

    def request(self, op: str, doing: str, **fields) -> dict:
        if self.failure is not None:
            raise WorkerError(f"the DeepSparse worker is gone ({self.failure}); load the artifact again")
        ident = next(self._ids)
        try:
            self.process.stdin.write((json.dumps({"id": ident, "op": op, **fields}) + "\n").encode())
            self.process.stdin.flush()
            return self._wait(ident, doing)
        except WorkerError:
            raise
        except (BrokenPipeError, OSError):
            self._fail(f"the DeepSparse worker died before {doing} ({self._exit_status()})")
        except BaseException:
            # Ctrl-C or any error of ours mid-request: the worker's state is unknown.
            self.kill()
            self.failure = f"interrupted while {doing}"
            raise

    def kill(self) -> None:
        _stop_process(self.process, None)

    def close(self) -> None:
        if self.failure is None and self.process.poll() is None:
            try:
                self.process.stdin.write(b'{"id": 0, "op": "exit"}\n')
                self.process.stdin.flush()
                self.process.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.failure = self.failure or "closed"
        self._finalizer()  # kills what is left and removes the directory


def _stop_process(process: subprocess.Popen, directory: Path | None) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the worker and anything it started
        except (ProcessLookupError, PermissionError):
            process.kill()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    for stream in (process.stdin,):
        try:
            stream.close()
        except OSError:
            pass
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)


class DeepSparseSession(Session):
    """A built artifact in a DeepSparse worker. Engines are compiled on first use, one
    per shape, and kept: the logits window, and the prefill and decode graphs of each
    batch size timed."""

    def __init__(self, artifact: BuiltArtifact, workload: Workload, on_progress=None):
        from sparsedeploy.ui import info

        self.artifact = artifact
        self.workload = workload
        self._timed: list[tuple[int, int, int]] = []  # (batch, prompt, new) shapes timed so far

        def progress(message: str) -> None:
            if message.startswith("compiled"):
                info(f"  DeepSparse {message}")
            if on_progress is not None:
                on_progress(message)

        details = artifact.details
        self._worker = _Worker(deepsparse_python(), details.get("worker_idle_timeout_s", DEFAULT_IDLE_TIMEOUT_S), progress)
        graphs = {name: str((artifact.directory / file).resolve()) for name, file in details["graphs"].items()}
        try:
            self._worker.request("load", "loading the artifact", graphs=graphs, threads=int(workload.threads), **details["geometry"])
        except BaseException:
            self._worker.close()
            raise

    @property
    def worker_pid(self) -> int:
        return self._worker.process.pid

    def logits(self, window):
        import numpy as np
        import torch

        tokens = np.ascontiguousarray(window.detach().cpu().numpy().astype(np.int64).reshape(-1))
        source, target = self._worker.directory / "window.npy", self._worker.directory / "logits.npy"
        np.save(source, tokens)
        try:
            self._worker.request("logits", f"computing the logits of a window of {tokens.size} tokens",
                                 tokens=str(source), out=str(target))
            return torch.from_numpy(np.load(target))
        finally:
            source.unlink(missing_ok=True)
            target.unlink(missing_ok=True)

    def sequence_logits(self, prompt, continuation):
        """Logits [B, G+1, V] of the timed path, teacher-forced: the prefill of
        ``prompt`` [B, P] (its last position), then one decode step per token of
        ``continuation`` [B, G] through the fixed-context KV cache. For checking that
        path against a reference; ``measure_latency`` runs the same code greedily."""
        import numpy as np
        import torch

        files = [self._worker.directory / name for name in ("prompt.npy", "continuation.npy", "sequence.npy")]
        np.save(files[0], np.asarray(prompt.cpu().numpy() if hasattr(prompt, "cpu") else prompt, np.int64))
        np.save(files[1], np.asarray(continuation.cpu().numpy() if hasattr(continuation, "cpu") else continuation, np.int64))
        try:
            self._worker.request("sequence", "running prefill and decode", prompt=str(files[0]),
                                 continuation=str(files[1]), out=str(files[2]))
            return torch.from_numpy(np.load(files[2]))
        finally:
            for path in files:
                path.unlink(missing_ok=True)

    def measure_latency(self, batch: int, prompt_tokens: int, new_tokens: int, runs: int, warmup: int) -> LatencySamples:
        result = self._worker.request(
            "latency", f"timing batch {batch} ({prompt_tokens} prompt tokens, {new_tokens} new)",
            batch=int(batch), prompt_tokens=int(prompt_tokens), new_tokens=int(new_tokens), runs=int(runs), warmup=int(warmup),
        )
        if (batch, prompt_tokens, new_tokens) not in self._timed:
            self._timed.append((batch, prompt_tokens, new_tokens))
        return LatencySamples(prefill_ms=list(result["prefill_ms"]), decode_ms=list(result["decode_ms"]))

    def kernels(self) -> dict:
        """DeepSparse's own layer analysis (DebugAnalysisEngine) of the timed decode and
        prefill graphs at the smallest batch timed (see :func:`kernel_claim`)."""
        if self._timed:
            batch, prompt_tokens, new_tokens = min(self._timed)
        else:
            batch, prompt_tokens, new_tokens = min(self.workload.batches), self.workload.prompt_tokens, self.workload.new_tokens
        report = self._worker.request("kernels", "analysing the engine's layers", batch=batch,
                                      prompt_tokens=prompt_tokens, new_tokens=new_tokens, phases=list(KERNEL_PHASES))
        return kernel_claim(report, self.artifact.details.get("linear_weight_names", []))

    def close(self) -> None:
        self._worker.close()


def _module_path(weight_name: str) -> str:
    """'model.layers.0.self_attn.q_proj.weight.T' (or '..weight.T_quantized') ->
    'model/layers.0/self_attn/q_proj/': how the exporter names that module's nodes
    (list indices stay joined with a dot)."""
    module = weight_name.split(".weight")[0] if ".weight" in weight_name else weight_name.removesuffix(".T")
    parts = module.split(".")
    joined: list[str] = []
    for part in parts:
        if part.isdigit() and joined:
            joined[-1] += f".{part}"
        else:
            joined.append(part)
    return "/".join(joined) + "/"


def _kernel_kind(layer_name: str) -> str:
    """'ks_gevm_be-50.1%_12' -> 'ks_gevm_be', 'gemm_3' -> 'gemm'."""
    return re.sub(r"(-[0-9.]+%)?(_[0-9]+)?$", "", layer_name)


def kernel_claim(report: dict, linear_weights: list[str]) -> dict:
    """Turn the worker's layer analysis into the Session.kernels() answer.

    DeepSparse names a layer it runs with a sparse kernel "ks_<kernel>-<sparsity>%"
    (e.g. ks_gevm_be-50.0%, ks_gemm_hyb-50.0%); dense ones are "gemm_<n>". Its
    ``kernel_sparsity`` field is the zero fraction of the weights, reported for dense
    kernels too, so only the kernel name counts. A layer's ``canonical_name`` lists the
    graph tensors it computes, which maps it to our linear weights. "used": some linear
    weight runs in a ks_ kernel; "not-used": every linear weight is in a reported layer
    and none is ks_; otherwise "unknown" (the rest sit in fused 'pyramid' layers, whose
    kernels it does not report)."""
    paths = {name: _module_path(name) for name in linear_weights}
    phrases, any_sparse, complete, phases = [], False, bool(paths), {}
    for phase in KERNEL_PHASES:
        if phase not in report:
            continue
        summary = report[phase]
        layers = summary["kernel_layers"]
        sparse = [layer for layer in layers if layer["name"].startswith("ks_")]
        covered = {n for n, path in paths.items() if any(path in layer["canonical_name"] for layer in layers)}
        in_sparse = {n for n, path in paths.items() if any(path in layer["canonical_name"] for layer in sparse)}
        any_sparse = any_sparse or bool(sparse)
        complete = complete and len(covered) == len(paths)
        kinds = Counter(_kernel_kind(layer["name"]) for layer in sparse or layers)
        kinds_text = ", ".join(f"{count}x {name}" for name, count in kinds.most_common(3))
        shape = (f"batch {summary['batch']}, {summary['seq']} tokens" if phase == "prefill"
                 else f"batch {summary['batch']}, past {summary['past']}")
        if sparse:
            mean = sum(layer["kernel_sparsity"] for layer in sparse) / len(sparse)
            text = (f"{phase} ({shape}): {len(in_sparse)} of {len(paths)} linear weights run in sparse kernels "
                    f"({len(sparse)} layers: {kinds_text}; kernel sparsity {mean:.2f})")
        elif layers:
            text = (f"{phase} ({shape}): no sparse kernel; {len(covered)} of {len(paths)} linear weights are in "
                    f"layers it reports ({kinds_text})")
        else:
            text = f"{phase} ({shape}): it reports no layer with a weight kernel"
        phrases.append(text)
        phases[phase] = {key: value for key, value in summary.items() if key != "kernel_layers"}
        phases[phase].update(kernel_layers=len(layers), sparse_kernel_layers=len(sparse), kernel_kinds=dict(kinds),
                             linear_weights_reported=len(covered), linear_weights_sparse=len(in_sparse))
    fractions = dict(report.get("fraction_of_supported_ops", {}))
    for phase, summary in phases.items():
        if "fraction_of_supported_ops" in summary:
            fractions.setdefault(f"{phase} analysis", summary["fraction_of_supported_ops"])
    if any_sparse:
        state = "used"
    elif complete and phrases:
        state = "not-used"
    else:
        state = "unknown"
        phrases.append("the other linear weights sit in fused 'pyramid' layers, whose kernels DeepSparse does not report")
    if fractions:
        phrases.append(f"{min(fractions.values()):.1%} of the graph runs in DeepSparse itself, the rest in its "
                       "ONNX Runtime fallback (fraction_of_supported_ops)")
    return {
        "sparse_kernels": state,
        "evidence": "DeepSparse's layer analysis: " + "; ".join(phrases),
        "phases": phases,
        "fraction_of_supported_ops": fractions,
    }
