"""The DeepSparse side of the deepsparse target: runs inside DeepSparse's own venv.

Started by ``sparsedeploy.backends.deepsparse_cpu`` as ``python -I deepsparse_worker.py``
in a private temporary directory. It imports only the standard library, numpy and
deepsparse (never sparsedeploy or torch: that venv pins numpy 1.26 / onnx 1.14).

Protocol: JSON lines. Requests arrive on stdin, ``{"id": n, "op": NAME, ...}``; every
message goes out on the protocol channel (the process's original stdout; fd 1 itself is
pointed at stderr, so whatever the engine prints cannot corrupt the protocol):

    {"event": "ready", "deepsparse": version, "cpu_avx_type": ..., "cpu_vnni": ...}   once
    {"id": n, "event": "progress", "message": "..."}     any number, outside timed code
    {"id": n, "event": "done", "result": {...}}          one per request, or
    {"id": n, "event": "error", "type": "...", "message": "...", "traceback": "..."}

Arrays travel as .npy files named in the request (logits for 1024 tokens x 49152 vocab
are 200 MB). Ops:

    load      graphs {name: path}, threads, num_layers, kv_heads, head_dim, vocab, input_names
    logits    tokens (.npy [T] int64) -> out (.npy [T, V] float32), graph "full"
    latency   batch, prompt_tokens, new_tokens, runs, warmup, seed -> prefill_ms, decode_ms
    sequence  prompt (.npy [B, P]), continuation (.npy [B, G]) -> out (.npy [B, G+1, V]):
              the timed prefill/decode path, teacher-forced, for checking the KV cache
    kernels   batch, prompt_tokens, new_tokens, phases -> DeepSparse's per-layer analysis
    exit

The engine wants static shapes, and a past of length 0 leaves the whole graph to its
ONNX Runtime fallback. So every engine is compiled for fixed shapes (from the one
dynamic graph, through ``input_shapes``) with a fixed context C and a non-empty past:

- quality window of T tokens: seq T, past 1 (one slot, masked out by attention_mask 0);
- prefill of P prompt tokens: seq P, past 1 (masked), on the "last" graph (logits of the
  last position only, as a serving engine computes them);
- decode: seq 1, past C-1 with C = P + G. The first decode past is the prefill's present
  without its masked slot, left-padded with G-1 zero slots (masked). Step k (1..G) has
  P+k real tokens among its C slots. Then, per ``kv_update``:
  "in-place": the step's key/value (present[:, :, -1]) is copied into the next masked
  slot of the same past buffers and unmasked. Attention does not depend on the order
  of the slots (keys carry their rotary position already, position_ids are explicit),
  so this is exact and costs one slot per step, as a serving engine's cache does.
  "shift": the next past is present[:, :, 1:], dropping the oldest slot (always a
  masked one): a copy of the whole cache per step (~13 ms for SmolLM2-135M at 288
  slots), but slot order stays time order, which models whose sliding window the
  export applies by slot distance need.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
import traceback

import numpy as np

# The protocol channel is a private copy of the original stdout; fd 1 becomes stderr.
_CHANNEL = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
os.dup2(2, 1)
sys.stdout = sys.stderr
_SEND_LOCK = threading.Lock()
# How a decode step's key/value enters the cache (see the module docstring).
KV_UPDATES = ("in-place", "shift")

import deepsparse  # noqa: E402  (after the redirection: its banner goes to stderr)
from deepsparse import Engine  # noqa: E402
from deepsparse.engine import AVX_TYPE, VNNI  # noqa: E402


def send(message: dict) -> None:
    with _SEND_LOCK:
        _CHANNEL.write(json.dumps(message) + "\n")
        _CHANNEL.flush()


def _watch_parent(parent: int) -> None:
    """Exit when the client process goes away (it may die without closing stdin)."""
    while True:
        time.sleep(2.0)
        if os.getppid() != parent:
            os._exit(3)


class Worker:
    def __init__(self, workdir: str):
        self.workdir = workdir
        self.graphs: dict[str, str] = {}  # name -> private copy of the graph file
        self.engines: dict[tuple, Engine] = {}
        self.fractions: dict[str, float] = {}  # engine shape -> fraction_of_supported_ops
        self.threads = 1
        self.kv_update = "shift"
        self.geometry: dict = {}
        self.current = None  # request id, for progress messages

    def progress(self, message: str) -> None:
        send({"id": self.current, "event": "progress", "message": message})

    # -- ops -------------------------------------------------------------------

    def op_load(self, graphs: dict, threads: int, num_layers: int, kv_heads: int, head_dim: int, vocab: int,
                input_names: list, kv_update: str = "shift") -> dict:
        if kv_update not in KV_UPDATES:
            raise ValueError(f"kv_update must be one of {KV_UPDATES}, not {kv_update!r}")
        self.threads = int(threads)
        self.kv_update = kv_update
        self.geometry = {"num_layers": int(num_layers), "kv_heads": int(kv_heads), "head_dim": int(head_dim),
                         "vocab": int(vocab), "input_names": list(input_names)}
        for name, path in graphs.items():
            self.graphs[name] = self._private_copy(name, path)
        return {"graphs": dict(self.graphs), "threads": self.threads}

    def op_logits(self, tokens: str, out: str) -> dict:
        ids = np.load(tokens).astype(np.int64).reshape(1, -1)
        length = ids.shape[1]
        engine = self.engine("full", 1, length, 1)
        outputs = engine.run(self.prefill_feeds(ids), val_inp=False)
        logits = np.ascontiguousarray(outputs[0][0], dtype=np.float32)
        np.save(out, logits)
        return {"shape": list(logits.shape)}

    def op_latency(self, batch: int, prompt_tokens: int, new_tokens: int, runs: int, warmup: int, seed: int = 0) -> dict:
        prefill, decode = self.generation_engines(batch, prompt_tokens, new_tokens)
        rng = np.random.default_rng(seed)
        prompt = rng.integers(0, self.geometry["vocab"], size=(batch, prompt_tokens), dtype=np.int64)
        prefill_ms, decode_ms = [], []
        for index in range(int(warmup) + int(runs)):
            prefill_s, decode_s, _ = self.sequence(prefill, decode, prompt, new_tokens)
            if index >= warmup:
                prefill_ms.append(prefill_s * 1000.0)
                decode_ms.append(decode_s * 1000.0 / new_tokens)
            self.progress(f"run {index + 1}/{warmup + runs}: prefill {prefill_s * 1000:.1f} ms, decode {decode_s * 1000 / new_tokens:.1f} ms/step")
        return {"prefill_ms": prefill_ms, "decode_ms": decode_ms}

    def op_sequence(self, prompt: str, continuation: str, out: str) -> dict:
        ids = np.ascontiguousarray(np.load(prompt).astype(np.int64))
        forced = np.ascontiguousarray(np.load(continuation).astype(np.int64))
        batch, length = ids.shape
        steps = forced.shape[1]
        prefill, decode = self.generation_engines(batch, length, steps)
        _, _, logits = self.sequence(prefill, decode, ids, steps, forced=forced)
        np.save(out, np.stack(logits, axis=1).astype(np.float32))
        return {"shape": [batch, steps + 1, self.geometry["vocab"]]}

    def op_kernels(self, batch: int, prompt_tokens: int, new_tokens: int, phases: list) -> dict:
        """DeepSparse's own per-layer analysis (DebugAnalysisEngine) of the timed shapes:
        which layers it runs with which kernel, and the kernel sparsity it found."""
        from deepsparse.engine import DebugAnalysisEngine

        shapes = {"prefill": (batch, prompt_tokens, 1), "decode": (batch, 1, prompt_tokens + new_tokens - 1)}
        report = {}
        for phase in phases:
            b, seq, past = shapes[phase]
            started = time.perf_counter()
            engine = DebugAnalysisEngine(
                model=self.graphs["last"], batch_size=b, num_cores=self.threads, num_iterations=1,
                num_warmup_iterations=0, input_shapes=self.input_shapes(b, seq, past),
            )
            if phase == "prefill":
                feeds = self.prefill_feeds(np.zeros((b, seq), np.int64))
            else:  # the last decode step: every slot holds a token
                feeds = [np.zeros((b, 1), np.int64), np.ones((b, past + 1), np.int64),
                         np.full((b, 1), past, np.int64), *self.zero_past(b, past)]
            analysis = engine.analyze(feeds, val_inp=False)
            report[phase] = summarize_analysis(analysis)
            report[phase].update({"batch": b, "seq": seq, "past": past,
                                  "fraction_of_supported_ops": engine.fraction_of_supported_ops,
                                  "seconds": round(time.perf_counter() - started, 1)})
            del engine
            self.progress(f"analysed the {phase} graph")
        report["fraction_of_supported_ops"] = dict(self.fractions)
        return report

    # -- the timed path --------------------------------------------------------

    def sequence(self, prefill: Engine, decode: Engine, prompt: np.ndarray, steps: int, forced=None):
        """Prefill ``prompt`` [B, P], then ``steps`` decode steps with the KV cache.
        Next tokens: ``forced`` [B, steps] if given, else greedy. Returns (prefill
        seconds, decode seconds in all, logits per position if forced else [])."""
        batch, length = prompt.shape
        context = length + steps
        feeds = self.prefill_feeds(prompt)
        masks, positions = self.decode_schedule(batch, length, steps)
        kv_shape = (batch, self.geometry["kv_heads"], context - 1, self.geometry["head_dim"])
        in_place = self.kv_update == "in-place"
        kept = []

        started = time.perf_counter()
        outputs = prefill.run(feeds, val_inp=False)
        prefill_s = time.perf_counter() - started

        started = time.perf_counter()
        logits = outputs[0][:, -1]
        if forced is not None:
            kept.append(logits.copy())
        past = []
        for present in outputs[1:]:
            padded = np.zeros(kv_shape, np.float32)
            padded[:, :, steps - 1:] = present[:, :, 1:]  # drop the masked slot, G-1 masked slots in front
            past.append(padded)
        for step in range(steps):
            token = forced[:, step:step + 1] if forced is not None else np.argmax(logits, axis=-1).astype(np.int64)[:, None]
            outputs = decode.run([np.ascontiguousarray(token), masks[step], positions[step], *past], val_inp=False)
            logits = outputs[0][:, -1]
            if forced is not None:
                kept.append(logits.copy())
            if step + 1 == steps:
                break
            if in_place:  # this token's key/value into the next masked slot
                for buffer, present in zip(past, outputs[1:]):
                    buffer[:, :, step] = present[:, :, -1]
            else:  # slide: drop the oldest slot (a masked one)
                past = [np.ascontiguousarray(present[:, :, 1:]) for present in outputs[1:]]
        decode_s = time.perf_counter() - started
        return prefill_s, decode_s, kept

    def generation_engines(self, batch: int, prompt_tokens: int, new_tokens: int) -> tuple[Engine, Engine]:
        if new_tokens < 1 or prompt_tokens < 1:
            raise ValueError(f"prompt_tokens ({prompt_tokens}) and new_tokens ({new_tokens}) must be >= 1")
        prefill = self.engine("last", batch, prompt_tokens, 1)
        decode = self.engine("last", batch, 1, prompt_tokens + new_tokens - 1)
        return prefill, decode

    def prefill_feeds(self, ids: np.ndarray) -> list:
        """Feeds for seq = ids.shape[1] with one masked past slot."""
        batch, length = ids.shape
        mask = np.ones((batch, length + 1), np.int64)
        mask[:, 0] = 0
        positions = np.ascontiguousarray(np.broadcast_to(np.arange(length, dtype=np.int64), (batch, length)))
        return [np.ascontiguousarray(ids), mask, positions, *self.zero_past(batch, 1)]

    def decode_schedule(self, batch: int, length: int, steps: int):
        """Attention masks [B, C] and position ids [B, 1] of each decode step (untimed).
        Step s (0-based) sees the prompt, s generated tokens and its own: P + s + 1 of
        the C = P + G slots. Shift: those are the last slots. In place: the prompt sits
        in the last P slots before the new one, and generated token i in slot i."""
        context = length + steps
        masks, positions = [], []
        for step in range(steps):
            real = length + step + 1
            mask = np.zeros((batch, context), np.int64)
            if self.kv_update == "in-place":
                mask[:, :step] = 1
                mask[:, steps - 1:] = 1
            else:
                mask[:, context - real:] = 1
            assert int(mask[0].sum()) == real
            masks.append(mask)
            positions.append(np.full((batch, 1), real - 1, np.int64))
        return masks, positions

    def zero_past(self, batch: int, past: int) -> list:
        shape = (batch, self.geometry["kv_heads"], past, self.geometry["head_dim"])
        return [np.zeros(shape, np.float32) for _ in range(2 * self.geometry["num_layers"])]

    # -- engines ---------------------------------------------------------------

    def input_shapes(self, batch: int, seq: int, past: int) -> list:
        g = self.geometry
        kv = [batch, g["kv_heads"], past, g["head_dim"]]
        return [[batch, seq], [batch, past + seq], [batch, seq]] + [list(kv) for _ in range(2 * g["num_layers"])]

    def engine(self, graph: str, batch: int, seq: int, past: int) -> Engine:
        key = (graph, int(batch), int(seq), int(past))
        if key not in self.engines:
            started = time.perf_counter()
            engine = Engine(model=self.graphs[graph], batch_size=batch, num_cores=self.threads,
                            input_shapes=self.input_shapes(batch, seq, past))
            names = list(engine.input_names)
            if names != self.geometry["input_names"]:
                raise RuntimeError(f"the engine's inputs {names[:4]}... are not the export's {self.geometry['input_names'][:4]}...")
            label = f"{graph} batch={batch} seq={seq} past={past}"
            self.fractions[label] = engine.fraction_of_supported_ops
            self.engines[key] = engine
            self.progress(f"compiled {label} in {time.perf_counter() - started:.1f} s "
                          f"({engine.fraction_of_supported_ops:.1%} of the graph in DeepSparse)")
        return self.engines[key]

    def _private_copy(self, name: str, path: str) -> str:
        """Engine(input_shapes=...) rewrites the graph file in place: give it a private
        copy of the graph (small: the weights stay external) beside links to the
        artifact's other files (the external data), never the artifact itself."""
        source_dir = os.path.dirname(os.path.abspath(path))
        target_dir = os.path.join(self.workdir, "graphs", name)
        os.makedirs(target_dir, exist_ok=True)
        for entry in os.listdir(source_dir):
            source = os.path.join(source_dir, entry)
            if entry != os.path.basename(path) and os.path.isfile(source) and not entry.endswith(".onnx"):
                os.symlink(source, os.path.join(target_dir, entry))
        target = os.path.join(target_dir, os.path.basename(path))
        shutil.copyfile(path, target)
        return target


def summarize_analysis(analysis: dict) -> dict:
    """The layers DeepSparse reports with a weight kernel (kernel_dims), and whether it
    calls them sparse: kernel names "ks_*" and a non-zero kernel_sparsity."""
    kernels, top, naive_ms = [], 0, 0.0

    def walk(layers, depth):
        nonlocal top, naive_ms
        for layer in layers:
            if depth == 0:
                top += 1
                if layer.get("name", "").startswith("Naive Subgraph"):
                    naive_ms += float(layer.get("average_run_time_in_ms", 0.0))
            if layer.get("kernel_dims"):
                kernels.append({
                    "name": layer.get("name", ""),
                    "canonical_name": layer.get("canonical_name", ""),
                    "kernel_sparsity": float(layer.get("kernel_sparsity", 0.0)),
                    "kernel_bits_per_ele": float(layer.get("kernel_bits_per_ele", 0.0)),
                    "ms": float(layer.get("average_run_time_in_ms", 0.0)),
                })
            walk(layer.get("sub_layer_info", []) or [], depth + 1)

    walk(analysis.get("layer_info", []), 0)
    names = [layer.get("name", "") for layer in analysis.get("layer_info", [])]
    return {
        "layers": top,
        "naive_subgraphs": sum(1 for n in names if n.startswith("Naive Subgraph")),
        "naive_ms": round(naive_ms, 3),
        "total_ms": float(analysis.get("average_total_time", 0.0)),
        "fused_layers": sum(1 for n in names if n.startswith("pyramid")),
        "kernel_layers": kernels,
    }


def main() -> None:
    parent = os.getppid()
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    worker = Worker(os.getcwd())
    send({"event": "ready", "deepsparse": deepsparse.__version__, "cpu_avx_type": AVX_TYPE, "cpu_vnni": bool(VNNI),
          "python": sys.version.split()[0], "numpy": np.__version__})
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        ident, op = request.pop("id", None), request.pop("op", "")
        if op == "exit":
            send({"id": ident, "event": "done", "result": {}})
            break
        worker.current = ident
        handler = getattr(worker, f"op_{op}", None)
        try:
            if handler is None:
                raise ValueError(f"unknown op '{op}'")
            result = handler(**request)
            send({"id": ident, "event": "done", "result": result})
        except Exception as error:  # report, stay alive: the client decides
            send({"id": ident, "event": "error", "type": type(error).__name__, "message": str(error),
                  "traceback": traceback.format_exc()})


if __name__ == "__main__":
    main()
