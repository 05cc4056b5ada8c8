"""The shared ONNX exporter: a causal LM decoder with an explicit KV cache.

One ``model.onnx`` serves ONNX Runtime, DeepSparse and TensorRT, for prefill and for
decode. Its interface follows optimum's names, so ORT tooling recognises it:

    inputs   input_ids                  [batch, seq]               int64
             attention_mask             [batch, total_seq]         int64  (total_seq = past + seq)
             position_ids               [batch, seq]               int64
             past_key_values.{i}.key    [batch, kv_heads, past, head_dim]       float
             past_key_values.{i}.value  [batch, kv_heads, past, head_dim]       float
    outputs  logits                     [batch, seq, vocab]        float
             present.{i}.key            [batch, kv_heads, total_seq, head_dim]  float
             present.{i}.value          [batch, kv_heads, total_seq, head_dim]  float

"float" is the graph's dtype: float32 (every CPU target), or float16 for TensorRT's
strongly typed builds. A float16 graph is traced from a half-precision copy of the
float32 model, so it is what PyTorch runs in half precision, op for op: the norms and
rotary tables keep their casts to float32, the attention mask its float16 minimum; it
needs no precision pass of its own. It is verified against the float32 model (torch's
own float16 CPU kernels stray further from float32 than ONNX Runtime's do).

A prefill feeds past tensors of length 0; a decode step feeds the previous presents.
Every layer's cache is a plain growing one: sliding-window models (Mistral, Gemma 3)
keep the whole past in ``present.*`` and apply the window through the attention mask.

Exporter: the TorchScript-based ``torch.onnx.export(..., dynamo=False)``. The dynamo
exporter needs ``onnxscript`` (not a dependency). The model is wrapped in
:class:`DecoderWithCache`, which takes and returns flat tensors and builds a
transformers ``DynamicCache`` from the past tensors inside ``forward``, so the tracer
only ever sees tensors. Tracing records one path through Python control flow, so every
export is checked numerically against torch with ONNX Runtime at several (batch, seq,
past) shapes before it is written (``verify=True``): a graph that silently baked a
shape or mis-converted an op is refused instead of shipped.

Weight layout in the exported graph (this matters for N:M sparsity, which is always
measured along a linear layer's INPUT dimension, see ``sparsedeploy.prune.patterns``):
torch stores ``nn.Linear.weight`` as [out, in]. Without a bias the exporter emits
``MatMul(x, W^T)`` and constant-folds the transpose, so the initializer is stored
[in, out] and the input dimension is axis 0 (the K axis of MatMul's B, the axis
TensorRT's sparse tactics need). With a bias on 2-D activations it may emit
``Gemm(x, W, transB=1)``, stored [out, in], input dimension axis 1.
:func:`initializer_sparsity` reads the axis from the graph (MatMul / FusedMatMul /
Gemm ``transB`` and any ``Transpose`` on the way), never from the name or the shape.

Initializers are renamed after the torch parameters they hold: ``<param>`` when stored
as in torch, ``<param>.T`` when stored transposed ([in, out]). A tied LM head, which
the exporter duplicates as a transposed copy of the embedding, is by default stored
once: the copy is replaced by a ``Transpose`` node on the embedding (engines fold it at
load time; the file is smaller by vocab x hidden floats).
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import sys
import time
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from sparsedeploy.atomic import staged_directory
from sparsedeploy.errors import BadInput, SparsedeployError
from sparsedeploy.models.adapters import adapter_for
from sparsedeploy.prune.patterns import MEASURED_PATTERNS, nm_compliance, parse_nm

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
DEFAULT_OPSET = 17
MIN_OPSET, MAX_OPSET = 14, 20  # sdpa needs 14; the TorchScript exporter stops at 20
# DeepSparse reads opset <= 17 with IR version <= 9.
DEEPSPARSE_MAX_OPSET, DEEPSPARSE_MAX_IR = 17, 9
SHAPE_KEYS = ("batch", "seq", "past")
# Example shapes for tracing: all different and > 1, so that no dimension is mistaken
# for another or specialised as a broadcast 1.
TRACE_SHAPES = {"batch": 2, "seq": 3, "past": 5}
# Extra (batch, seq, past) shapes a dynamic export is verified at: prefill with an
# empty cache and a single-token decode step.
CHECK_SHAPES = ((1, 4, 0), (3, 1, 6))
# Architectures whose export matches torch in tests/test_onnx_export.py (prefill and
# decode through ONNX Runtime). Others are attempted and refused if they do not verify.
VERIFIED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3_text", "phi3", "opt", "gpt_neox")
_PROTOBUF_LIMIT = 2**31 - 1
# Largest |graph in ORT - float32 torch| allowed, relative to the largest |logit|, per
# graph dtype. A float16 graph rounds every op's output to 11 bits: on the default model
# at the check shapes (random past included) it strayed 0.3-1.5 %; a broken graph
# strays by the logits' own size.
VERIFY_TOLERANCE = {torch.float32: 1e-3, torch.float16: 5e-2}


def input_names(num_layers: int) -> list[str]:
    names = ["input_ids", "attention_mask", "position_ids"]
    for i in range(num_layers):
        names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
    return names


def past_dtype(session) -> np.dtype:
    """The numpy dtype an ONNX Runtime session of an exported graph takes for its past
    tensors (the graph's float type)."""
    first = next(value for value in session.get_inputs() if value.name.startswith("past_key_values."))
    return np.dtype(np.float16) if first.type == "tensor(float16)" else np.dtype(np.float32)


def output_names(num_layers: int) -> list[str]:
    names = ["logits"]
    for i in range(num_layers):
        names += [f"present.{i}.key", f"present.{i}.value"]
    return names


@dataclass
class ExportResult:
    path: Path  # output_dir / model.onnx
    files: list[str]  # file names inside output_dir
    bytes: int  # total size of those files
    opset: int
    ir_version: int
    input_names: list[str]
    output_names: list[str]
    num_layers: int
    kv_heads: int
    head_dim: int
    sparsity: dict = field(repr=False)  # initializer_sparsity()'s report
    model_type: str = ""
    static_shapes: dict | None = None  # the fixed dims, None when all are dynamic
    external_data: bool = True
    max_abs_diff: float | None = None  # worst |logits| difference ORT vs torch (None: not verified)
    seconds: float = 0.0
    dtype: str = "float32"  # the graph's float type: weights, past/present, logits

    @property
    def directory(self) -> Path:
        return self.path.parent

    def to_dict(self) -> dict:
        data = asdict(self)
        data["path"] = str(self.path)
        return data


class DecoderWithCache(nn.Module):
    """Flat-tensor face of a transformers causal LM, for tracing.

    ``forward(input_ids, attention_mask, position_ids, k0, v0, k1, v1, ...)`` returns
    ``(logits, present_k0, present_v0, ...)``. The past tensors become the layers of a
    ``DynamicCache`` directly (no concatenation onto an empty placeholder), so a past of
    length 0 is just a tensor with a zero-sized axis.
    """

    def __init__(self, model: nn.Module, num_layers: int):
        super().__init__()
        self.model = model
        self.num_layers = num_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        layers = []
        for index in range(self.num_layers):
            key, value = past[2 * index], past[2 * index + 1]
            layer = DynamicLayer()
            layer.lazy_initialization(key, value)
            layer.keys, layer.values = key, value
            layers.append(layer)
        cache = DynamicCache()
        cache.layers = layers
        output = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            return_dict=True,
        )
        presents = []
        for layer in output.past_key_values.layers:
            presents += [layer.keys, layer.values]
        return (output.logits, *presents)


# -- export ---------------------------------------------------------------------


def export_decoder(
    model: nn.Module,
    output_dir: Path | str,
    *,
    opset: int = DEFAULT_OPSET,
    static_shapes: dict | None = None,
    dtype: torch.dtype = torch.float32,
    external_data: bool = True,
    share_tied_embeddings: bool = True,
    verify: bool = True,
) -> ExportResult:
    """Export a float32 transformers causal LM to ``output_dir/model.onnx``.

    ``dtype``: the graph's float type, torch.float32 or torch.float16 (traced from a
    half-precision copy; ``model`` itself is left as it is).
    ``static_shapes``: e.g. ``{"batch": 1, "seq": 1, "past": 127}`` fixes those dims
    (any subset of batch/seq/past); the others stay dynamic. ``external_data`` puts the
    weights in ``model.onnx.data`` beside the graph (needed above 2 GB; relative path, so
    the directory can be moved). ``output_dir`` appears whole or not at all and replaces
    an existing directory: validate it first (``sparsedeploy.atomic.check_output_dir``).
    """
    import onnx

    started = time.perf_counter()
    adapter = adapter_for(model)
    model_type = adapter.config.model_type
    geometry = adapter.geometry()
    num_layers = adapter.num_layers
    _check_float32(model, model_type)
    if dtype not in VERIFY_TOLERANCE:
        raise BadInput(f"ONNX graphs are exported in float32 or float16, not {str(dtype).removeprefix('torch.')}")
    fixed = _check_static_shapes(static_shapes)
    if not MIN_OPSET <= int(opset) <= MAX_OPSET:
        raise BadInput(f"ONNX opset {opset} is not supported; choose an opset from {MIN_OPSET} to {MAX_OPSET} (17 for DeepSparse)")
    opset = int(opset)
    vocab = _vocab_size(adapter)
    names_in, names_out = input_names(num_layers), output_names(num_layers)
    trace = {key: fixed.get(key, TRACE_SHAPES[key]) for key in SHAPE_KEYS}
    device = next(model.parameters()).device
    wrapper = DecoderWithCache(model, num_layers).eval()
    # What is traced: the model itself, or its half-precision copy.
    traced = wrapper if dtype == torch.float32 else DecoderWithCache(_reduced_precision_copy(model, dtype), num_layers).eval()

    def example(batch: int, seq: int, past: int, seed: int) -> tuple[torch.Tensor, ...]:
        return _example_inputs(batch, seq, past, vocab, geometry.num_kv_heads, geometry.head_dim, num_layers, device, seed)

    output_dir = Path(output_dir).expanduser().resolve()
    was_training = model.training
    model.eval()
    try:
        with staged_directory(output_dir) as staging:
            raw_dir = staging / ".raw"
            raw_dir.mkdir()
            try:
                with warnings.catch_warnings(), torch.no_grad(), _quiet_stdout():
                    warnings.simplefilter("ignore")
                    torch.onnx.export(
                        traced,
                        _cast_floats(example(trace["batch"], trace["seq"], trace["past"], seed=0), dtype),
                        str(raw_dir / MODEL_FILE),
                        dynamo=False,
                        opset_version=opset,
                        input_names=names_in,
                        output_names=names_out,
                        dynamic_axes=_dynamic_axes(num_layers, fixed) or None,
                        do_constant_folding=True,
                    )
                proto = onnx.load(str(raw_dir / MODEL_FILE))
            except (SparsedeployError, MemoryError):  # e.g. Ctrl-C's Interrupted: not an export failure
                raise
            except Exception as error:  # the exporter raises many types; all mean the same to the user
                raise BadInput(
                    f"could not export the '{model_type}' architecture to ONNX ({_first_line(error)}); "
                    f"export a supported architecture ({', '.join(VERIFIED_ARCHITECTURES)}) or report the error"
                ) from None
            for leftover in raw_dir.iterdir():
                leftover.unlink()
            raw_dir.rmdir()

            _name_initializers(proto, traced.model)
            if share_tied_embeddings:
                _share_tied_lm_head(proto)
            _set_io_shapes(proto, fixed, vocab, geometry.num_kv_heads, geometry.head_dim)
            _lower_ir_version(proto, opset)
            sparsity = sparsity_report(proto)
            path = staging / MODEL_FILE
            _save(proto, path, external_data)
            del proto
            onnx.checker.check_model(str(path))
            ir_version = onnx.load(str(path), load_external_data=False).ir_version

            max_abs_diff = None
            if verify:
                if set(fixed) == set(SHAPE_KEYS):
                    cases = [(fixed["batch"], fixed["seq"], fixed["past"])]
                else:
                    cases = [(trace["batch"], trace["seq"], trace["past"])]
                    cases += [
                        tuple(fixed.get(key, value) for key, value in zip(SHAPE_KEYS, shape)) for shape in CHECK_SHAPES
                    ]
                max_abs_diff = _verify(path, wrapper, example, cases, names_in, vocab, geometry, model_type, dtype)
            files = sorted(p.name for p in staging.iterdir() if p.is_file())
            size = sum((staging / name).stat().st_size for name in files)
    finally:
        model.train(was_training)

    return ExportResult(
        path=output_dir / MODEL_FILE,
        files=files,
        bytes=size,
        opset=opset,
        ir_version=ir_version,
        input_names=names_in,
        output_names=names_out,
        num_layers=num_layers,
        kv_heads=geometry.num_kv_heads,
        head_dim=geometry.head_dim,
        sparsity=sparsity,
        model_type=model_type,
        static_shapes=dict(fixed) or None,
        external_data=external_data,
        max_abs_diff=max_abs_diff,
        seconds=time.perf_counter() - started,
        dtype=str(dtype).removeprefix("torch."),
    )


@contextlib.contextmanager
def _quiet_stdout():
    """The TorchScript exporter prints its whole IR graph to the C-level stdout when it
    fails (its log switch is always on in torch 2.13): keep stdout clean for --json."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:
        saved = None
    try:
        if saved is not None:
            with open(os.devnull, "w") as sink:
                os.dup2(sink.fileno(), 1)
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        if saved is not None:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _check_float32(model: nn.Module, model_type: str) -> None:
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if dtypes - {torch.float32}:
        found = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
        raise BadInput(
            f"the '{model_type}' model has {found} weights but the ONNX export needs float32; "
            "load it with dtype=torch.float32 (load_model's default); pass dtype=torch.float16 for a float16 graph"
        )


def _check_static_shapes(static_shapes: dict | None) -> dict[str, int]:
    if not static_shapes:
        return {}
    unknown = sorted(set(static_shapes) - set(SHAPE_KEYS))
    if unknown:
        raise BadInput(f"static_shapes has unknown keys {unknown}; use only {list(SHAPE_KEYS)}")
    fixed = {}
    for key, value in static_shapes.items():
        smallest = 0 if key == "past" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < smallest:
            raise BadInput(f"static_shapes['{key}'] = {value!r} is not an integer >= {smallest}; give a whole number")
        fixed[key] = value
    return fixed


def _vocab_size(adapter) -> int:
    embedding = adapter.embedding()
    return int(getattr(embedding, "num_embeddings", None) or adapter.config.vocab_size)


def _example_inputs(batch, seq, past, vocab, kv_heads, head_dim, num_layers, device, seed) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    attention_mask = torch.ones(batch, past + seq, dtype=torch.int64)
    position_ids = torch.arange(past, past + seq, dtype=torch.int64).unsqueeze(0).expand(batch, seq).contiguous()
    kv = [torch.randn(batch, kv_heads, past, head_dim, generator=generator) for _ in range(2 * num_layers)]
    return tuple(t.to(device) for t in (input_ids, attention_mask, position_ids, *kv))


def _reduced_precision_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``model`` whose parameters are ``dtype``, made without a second float32
    copy (peak memory: the model plus its cast weights); tied weights stay tied, buffers
    (rotary frequencies) stay float32 as transformers computes them.

    The copy runs transformers' eager attention: torch's ONNX form of sdpa turns the
    boolean mask into a float32 one, which silently promotes the whole attention block
    and the output projection after it to float32. Eager attention adds a mask of the
    model's dtype and takes only the softmax in float32, as PyTorch runs it."""
    memo = {id(p): nn.Parameter(p.detach().to(dtype), requires_grad=False) for p in model.parameters()}
    reduced = copy.deepcopy(model, memo)
    if hasattr(reduced, "set_attn_implementation"):
        reduced.set_attn_implementation("eager")
    return reduced


def _cast_floats(tensors: tuple[torch.Tensor, ...], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in tensors)


def _dynamic_axes(num_layers: int, fixed: dict[str, int]) -> dict[str, dict[int, str]]:
    def axes(**named: str) -> dict[int, str]:
        return {int(axis[1:]): name for axis, name in named.items() if name is not None}

    batch = None if "batch" in fixed else "batch"
    seq = None if "seq" in fixed else "seq"
    past = None if "past" in fixed else "past"
    total = None if ("seq" in fixed and "past" in fixed) else "total_seq"
    table = {
        "input_ids": axes(a0=batch, a1=seq),
        "attention_mask": axes(a0=batch, a1=total),
        "position_ids": axes(a0=batch, a1=seq),
        "logits": axes(a0=batch, a1=seq),
    }
    for i in range(num_layers):
        for kind in ("key", "value"):
            table[f"past_key_values.{i}.{kind}"] = axes(a0=batch, a2=past)
            table[f"present.{i}.{kind}"] = axes(a0=batch, a2=total)
    return {name: value for name, value in table.items() if value}


# -- graph post-processing --------------------------------------------------------


def _fingerprint(array: np.ndarray) -> tuple:
    """Cheap key for finding candidate matches: shape, dtype and the first rows' bytes.
    Candidates are then confirmed on the whole content."""
    return array.shape, str(array.dtype), np.ascontiguousarray(array[:8]).tobytes()


def _name_initializers(proto, model: nn.Module) -> dict[str, str]:
    """Rename initializers after the torch parameters they hold (``<param>`` or, stored
    transposed, ``<param>.T``). Content that matches several parameters (the exporter
    merges identical ones, e.g. all-ones norms) keeps the exporter's name, without the
    wrapper's ``model.`` prefix. Returns old -> new."""
    from onnx import TensorProto, numpy_helper

    wrapper_prefix = "model."  # DecoderWithCache.model
    params = {}
    candidates_by_key: dict[tuple, list[tuple[str, np.ndarray]]] = defaultdict(list)
    for name, parameter in model.named_parameters():
        array = parameter.detach().cpu().numpy()
        params[name] = array
        candidates_by_key[_fingerprint(array)].append((name, array))
        if array.ndim == 2:
            candidates_by_key[_fingerprint(array.T)].append((f"{name}.T", array.T))

    graph = proto.graph
    taken = {i.name for i in graph.initializer} | {v.name for v in (*graph.input, *graph.output)}
    for node in graph.node:
        taken.update(node.output)
    renames = {}
    for init in graph.initializer:
        if init.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16):
            continue
        stripped = init.name.removeprefix(wrapper_prefix)
        if init.name.startswith(wrapper_prefix) and stripped in params:
            target = stripped
        else:
            stored = numpy_helper.to_array(init)
            candidates = [
                name for name, array in candidates_by_key.get(_fingerprint(stored), []) if np.array_equal(array, stored)
            ]
            if len(candidates) != 1:  # unknown, or shared by several (all-zero biases): keep
                continue
            target = candidates[0]
        if target != init.name and target not in taken:
            renames[init.name] = target
            taken.add(target)
    if renames:
        for init in graph.initializer:
            init.name = renames.get(init.name, init.name)
        for node in graph.node:
            for index, name in enumerate(node.input):
                if name in renames:
                    node.input[index] = renames[name]
    return renames


def _share_tied_lm_head(proto) -> bool:
    """Replace a stored transposed copy of an embedding (a tied LM head folded into a
    MatMul weight) with a Transpose node on the embedding itself."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    inits = {init.name: init for init in graph.initializer}
    embeddings = [n.input[0] for n in graph.node if n.op_type == "Gather" and n.input and n.input[0] in inits]
    for embedding_name in dict.fromkeys(embeddings):
        embedding = inits[embedding_name]
        if len(embedding.dims) != 2 or embedding.dims[0] == embedding.dims[1]:
            continue
        table = None
        for init in list(graph.initializer):
            if init.name == embedding_name or list(init.dims) != list(embedding.dims)[::-1]:
                continue
            if init.data_type != embedding.data_type:
                continue
            if table is None:
                table = numpy_helper.to_array(embedding)
            if np.array_equal(numpy_helper.to_array(init), table.T):
                graph.initializer.remove(init)
                graph.node.insert(
                    0,
                    helper.make_node(
                        "Transpose", [embedding_name], [init.name], name=f"{init.name}/tied_lm_head", perm=[1, 0]
                    ),
                )
                return True
    return False


def _set_io_shapes(proto, fixed: dict[str, int], vocab: int, kv_heads: int, head_dim: int) -> None:
    """Declare every graph input and output shape exactly as the interface says: fixed
    dims as numbers, the others as batch / seq / past / total_seq (the exporter leaves
    some output dims with generated names, or symbolic where they are static)."""
    batch = fixed.get("batch", "batch")
    seq = fixed.get("seq", "seq")
    past = fixed.get("past", "past")
    total = fixed["past"] + fixed["seq"] if "past" in fixed and "seq" in fixed else "total_seq"
    tokens = [batch, seq]
    spec = {"input_ids": tokens, "attention_mask": [batch, total], "position_ids": tokens, "logits": [batch, seq, vocab]}
    graph = proto.graph
    for value in (*graph.input, *graph.output):
        if value.name in spec:
            dims = spec[value.name]
        elif value.name.startswith("past_key_values."):
            dims = [batch, kv_heads, past, head_dim]
        elif value.name.startswith("present."):
            dims = [batch, kv_heads, total, head_dim]
        else:
            continue
        shape = value.type.tensor_type.shape
        shape.ClearField("dim")
        for dim in dims:
            entry = shape.dim.add()
            if isinstance(dim, int):
                entry.dim_value = dim
            else:
                entry.dim_param = dim


def _lower_ir_version(proto, opset: int) -> None:
    """DeepSparse reads IR version <= 9; opset <= 17 needs no newer IR."""
    if opset <= DEEPSPARSE_MAX_OPSET and proto.ir_version > DEEPSPARSE_MAX_IR:
        proto.ir_version = DEEPSPARSE_MAX_IR


def _save(proto, path: Path, external_data: bool) -> None:
    import onnx

    if external_data:
        onnx.save_model(
            proto,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=DATA_FILE,  # relative to model.onnx: the directory can move
            size_threshold=1024,
            convert_attribute=False,
        )
        return
    if proto.ByteSize() > _PROTOBUF_LIMIT:
        raise BadInput("the model is over 2 GB, too large for a single .onnx file; export with external_data=True")
    onnx.save_model(proto, str(path))


def _verify(path, wrapper, example, cases, names_in, vocab, geometry, model_type, dtype) -> float:
    """Run the written graph in ONNX Runtime at each (batch, seq, past) and compare with
    the float32 torch model; raise BadInput on any mismatch. Returns the worst |logits| diff."""
    import onnxruntime

    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as error:
        raise BadInput(
            f"the ONNX export of '{model_type}' does not load in ONNX Runtime ({_first_line(error)}); "
            f"export a supported architecture ({', '.join(VERIFIED_ARCHITECTURES)}) or report the error"
        ) from None
    worst = 0.0
    for seed, (batch, seq, past) in enumerate(cases, start=1):
        inputs = example(batch, seq, past, seed)
        with torch.no_grad():
            expected = [t.float().cpu().numpy() for t in wrapper(*inputs)]
        feed = {name: tensor.cpu().numpy() for name, tensor in zip(names_in, _cast_floats(inputs, dtype))}
        where = f"batch={batch}, seq={seq}, past={past}"
        try:
            actual = session.run(None, feed)
        except Exception as error:
            raise BadInput(
                f"the ONNX export of '{model_type}' fails in ONNX Runtime at {where} ({_first_line(error)}); "
                "export with static_shapes for the shapes you run, or report the error"
            ) from None
        want_logits = (batch, seq, vocab)
        want_kv = (batch, geometry.num_kv_heads, past + seq, geometry.head_dim)
        shapes_ok = actual[0].shape == want_logits and all(a.shape == want_kv for a in actual[1:])
        scale = max(1.0, float(np.abs(expected[0]).max(initial=0.0)))
        diffs = [float(np.abs(a.astype(np.float32) - e).max(initial=0.0)) if a.shape == e.shape else float("inf")
                 for a, e in zip(actual, expected)]
        worst = max(worst, diffs[0])
        if not shapes_ok or max(diffs) > VERIFY_TOLERANCE[dtype] * scale:
            raise BadInput(
                f"the ONNX export of '{model_type}' does not match torch at {where} "
                f"(max |logits diff| {diffs[0]:.3g}, max |present diff| {max(diffs[1:], default=0.0):.3g}, "
                f"logits shape {actual[0].shape} vs {want_logits}); this architecture cannot be exported yet: "
                f"use a supported one ({', '.join(VERIFIED_ARCHITECTURES)}) or report it"
            )
    return worst


# -- sparsity of the exported weights ---------------------------------------------


def initializer_sparsity(onnx_path: Path | str) -> dict:
    """Sparsity of the linear weights as stored in an exported graph (external data loaded),
    float or quantized.

    Returns ``{"linear_weights": [...], "num_linear_weights", "sparsity", "compliance",
    "lm_head", "embedding", "tied_embeddings", "lm_head_duplicated"}``. Each linear
    weight entry: ``name, shape, input_axis, dtype, quantization, zero_fraction,
    compliance{"2:4","4:8"}``, with N:M compliance taken along ``input_axis`` (see the
    module docstring). The LM head is reported on its own and not counted among the
    linear weights, so these are the decoder's linear sublayers; ``sparsity`` and
    ``compliance`` summarise them (element- and group-weighted). ``lm_head`` adds
    ``shared_with_embedding`` (one initializer serves the Gather and the head);
    ``tied_embeddings``: the head holds the embedding's values; ``lm_head_duplicated``:
    tied, but stored twice.

    Quantized weights (what ``sparsedeploy.export.onnx_quantize`` writes) are measured in
    their integer form: an entry counts as zero where its quantized value equals its zero
    point, i.e. where it dequantizes to exactly 0.0 whatever the scale. ``dtype`` is the
    stored element type (``float32``, ``int8``, ``uint4``...) and ``quantization`` is None
    for a float weight, else ``{format, bits, granularity, zero_point}`` (``format``: the
    op that holds it, or ``QDQ`` for an integer initializer -> DequantizeLinear -> MatMul;
    ``zero_point``: the value when one zero point serves the whole weight, else None).
    A MatMulNBits weight is packed ``[N, blocks, blob]``; its ``shape`` is the logical
    ``[N, K]`` (input axis 1) and ``quantization`` adds ``stored_shape`` and ``block_size``.
    A quantized entry can measure MORE zeros than its float source (weights smaller than
    half a quantization step round to the zero point), never fewer.
    """
    import onnx

    path = Path(onnx_path).expanduser()
    if not path.is_file():
        raise BadInput(f"ONNX model '{path}' does not exist; pass the model.onnx of an export directory")
    try:
        proto = onnx.load(str(path), load_external_data=True)
    except Exception as error:
        raise BadInput(
            f"could not read ONNX model '{path}' ({_first_line(error)}); keep model.onnx and its .data file together"
        ) from None
    return sparsity_report(proto)


# Ops whose input 1 is a linear weight: ONNX's own, and ORT's fusions of them
# (FusedMatMul: MatMul with transpose/scale attributes; FusedGemm: Gemm + activation).
_LINEAR_OPS = ("MatMul", "Gemm", "FusedMatMul", "FusedGemm")
# Integer linear ops: op -> input indices of (the integer weight B [K, N], B's scale,
# B's zero point); None: the op has no such input (MatMulInteger's scale is applied after
# it), and an absent zero point means 0. ONNX's MatMulInteger and QLinearMatMul, and the
# forms ORT's graph optimiser fuses quantized graphs into.
_QUANTIZED_LINEAR_OPS = {
    "MatMulInteger": (1, None, 3),
    "QLinearMatMul": (3, 4, 5),
    "DynamicQuantizeMatMul": (1, 2, 3),
    "MatMulIntegerToFloat": (1, 3, 5),
}
# ORT's blockwise weight-only op; B is packed [N, k_blocks, blob] (see _nbits_values).
_NBITS_OP = "MatMulNBits"
# Nodes a linear's output may pass through on its way to the logits in a quantized graph
# (dequantize, rescale), when looking for the LM head.
_OUTPUT_PASS_THROUGH = ("DequantizeLinear", "Cast", "Mul", "Identity", "Reshape")


def _float_types() -> frozenset[int]:
    from onnx import TensorProto

    return frozenset((TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE))


def _float8_types() -> frozenset[int]:
    """8-bit float weights of Q/DQ graphs (TensorRT's FP8); read as floats, not integers."""
    from onnx import TensorProto

    return frozenset((TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E4M3FNUZ, TensorProto.FLOAT8E5M2, TensorProto.FLOAT8E5M2FNUZ))


def _weight_types() -> frozenset[int]:
    """Element types a linear weight may be stored in: float, or integer / 8-bit float in
    quantized graphs."""
    from onnx import TensorProto

    integers = (
        TensorProto.INT8, TensorProto.UINT8, TensorProto.INT4, TensorProto.UINT4, TensorProto.INT16, TensorProto.UINT16
    )
    return _float_types() | _float8_types() | frozenset(integers)


class _Use(NamedTuple):
    kind: str  # "linear" or "embedding"
    input_axis: int | None  # linear: the axis of the stored weight contracted with the activations
    node: object  # the linear / Gather node
    dequantize: object = None  # the DequantizeLinear passed on the way (QDQ), if any


def _attribute(node, name, default):
    from onnx import helper

    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _consumers(graph) -> dict[str, list[tuple[object, int]]]:
    consumers = defaultdict(list)
    for node in graph.node:
        for index, name in enumerate(node.input):
            consumers[name].append((node, index))
    return consumers


def _weight_uses(graph, inits: dict) -> dict[str, list[_Use]]:
    """initializer name -> [_Use]: how each weight-shaped initializer is used.

    kind "linear": the B operand of MatMul / Gemm or ORT's fused forms, of an integer
    linear op (MatMulInteger, QLinearMatMul...), or of MatMulNBits (input_axis: the axis
    of the stored initializer that is contracted with the activations; for MatMulNBits,
    axis 1 of its logical [N, K] matrix); "embedding": the data of a Gather. Transpose,
    Identity and one DequantizeLinear on the way are followed (QDQ graphs).
    """
    consumers = _consumers(graph)

    def walk(value: str, transposed: bool, dequantize, depth: int = 0):
        if depth > 8:
            return
        for node, index in consumers.get(value, []):
            op = node.op_type
            if op == "Transpose" and list(_attribute(node, "perm", [1, 0])) == [1, 0]:
                yield from walk(node.output[0], not transposed, dequantize, depth + 1)
            elif op == "Identity":
                yield from walk(node.output[0], transposed, dequantize, depth + 1)
            elif op == "DequantizeLinear" and index == 0 and dequantize is None:
                yield from walk(node.output[0], transposed, node, depth + 1)
            elif op in _LINEAR_OPS and index == 1:
                # B is [K, N] (K = input dim, axis 0), or [N, K] when transB is set.
                axis = 1 if _attribute(node, "transB", 0) else 0
                yield _Use("linear", 1 - axis if transposed else axis, node, dequantize)
            elif op in _QUANTIZED_LINEAR_OPS and index == _QUANTIZED_LINEAR_OPS[op][0] and dequantize is None:
                yield _Use("linear", 1 if transposed else 0, node)  # B is [K, N]
            elif op == _NBITS_OP and index == 1 and not transposed and dequantize is None:
                yield _Use("linear", 1, node)  # packed [N, blocks, blob]: logically [N, K]
            elif op == "Gather" and index == 0:
                yield _Use("embedding", None, node, dequantize)

    uses = {}
    for name, init in inits.items():
        packed = len(init.dims) == 3  # only MatMulNBits' B is a 3-D weight
        if len(init.dims) == 2 or packed:
            found = [use for use in walk(name, False, None) if (use.node.op_type == _NBITS_OP) == packed]
            if found:
                uses[name] = found
    return uses


def _element_type(data_type: int) -> str:
    from onnx import TensorProto

    names = {TensorProto.FLOAT: "float32", TensorProto.DOUBLE: "float64"}
    return names.get(data_type) or TensorProto.DataType.Name(data_type).lower()


def _constant_arrays(graph, inits: dict) -> dict:
    """name -> TensorProto of every constant value: initializers and Constant nodes
    (zero points and scales may be either)."""
    constants = dict(inits)
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            value = _attribute(node, "value", None)
            if value is not None and hasattr(value, "data_type"):
                constants[node.output[0]] = value
    return constants


def _optional_input(node, index: int) -> str | None:
    return node.input[index] if len(node.input) > index and node.input[index] else None


def _integer(tensor) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(tensor).astype(np.int32)


def _nbits_values(node, packed: np.ndarray, zero_points) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits' B as (quantized values [N, K], zero points [N, K]), unpacked.

    ORT's layout (contrib op docs): B is uint8 [N, k_blocks, blob_size], each block holds
    ``block_size`` consecutive K values of one column, ``8 / bits`` per byte, lowest bits
    first; the last block is zero-padded past K. The optional zero_points input is uint8
    [N, ceil(k_blocks * bits / 8)] packed the same way (or, rarely, the scales' float
    type [N, k_blocks]); without it every zero point is 2^(bits-1) (8 for 4 bits).
    """
    bits = int(_attribute(node, "bits", 4))
    k, n = int(_attribute(node, "K", 0)), int(_attribute(node, "N", 0))
    block_size = int(_attribute(node, "block_size", 0))
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    shifts = np.arange(per_byte, dtype=np.uint8) * bits

    def unpack(array: np.ndarray, rows: int, count: int) -> np.ndarray:
        values = (array.reshape(rows, -1, 1) >> shifts) & mask
        return values.reshape(rows, -1)[:, :count].astype(np.int32)

    blocks = packed.shape[1]
    values = unpack(packed, n, blocks * block_size)[:, :k]
    if zero_points is None:
        points = np.full((n, blocks), 1 << (bits - 1), dtype=np.int32)
    elif zero_points.dtype == np.uint8:
        points = unpack(zero_points, n, blocks)
    else:  # float zero points: a value dequantizes to 0 only where it equals its zero point
        points = zero_points.reshape(n, blocks)
    return values, np.repeat(points, block_size, axis=1)[:, :k]


def _broadcast_zero_point(points: np.ndarray, shape: tuple[int, ...], axis: int, block_size: int) -> np.ndarray:
    """A zero point tensor broadcast to its weight's shape: one value, one per index of
    ``axis`` (per channel), or one per ``block_size`` run along ``axis`` (per block)."""
    if points.size == 1:
        return np.broadcast_to(points.reshape(()), shape)
    axis %= len(shape)
    if block_size:
        return np.repeat(points, block_size, axis=axis).take(range(shape[axis]), axis=axis)
    view = [1] * len(shape)
    view[axis] = points.size
    return np.broadcast_to(points.reshape(view), shape)


def _stored_nonzero(name: str, use: _Use, inits: dict, constants: dict) -> tuple[np.ndarray, list, str, dict | None] | None:
    """(nonzero mask in the stored orientation, shape as stored (logical [N, K] for
    MatMulNBits), dtype, quantization description) of one linear weight; None where a
    zero point is computed at run time (not measurable)."""
    from onnx import numpy_helper

    init = inits[name]
    op = use.node.op_type
    if op == _NBITS_OP:
        bits = int(_attribute(use.node, "bits", 4))
        point_name = _optional_input(use.node, 3)
        if point_name is not None and point_name not in constants:
            return None
        raw = None if point_name is None else numpy_helper.to_array(constants[point_name])
        values, points = _nbits_values(use.node, numpy_helper.to_array(init), raw)
        quantization = {
            "format": op,
            "bits": bits,
            "granularity": "per-block",
            "block_size": int(_attribute(use.node, "block_size", 0)),
            "zero_point": _uniform(points),
            "stored_shape": list(init.dims),
        }
        return values != points, list(values.shape), f"uint{bits}", quantization
    shape, dtype = list(init.dims), _element_type(init.data_type)
    stored = numpy_helper.to_array(init)
    if init.data_type in _float_types():
        return stored != 0, shape, dtype, None
    # Compared with their zero points exactly: integers as int32, 8-bit floats as float32.
    values = stored.astype(np.float32 if init.data_type in _float8_types() else np.int32)
    if use.dequantize is not None:  # QDQ: per tensor, per axis (default 1) or per block (opset 21)
        node, fmt, scale_index, point_index = use.dequantize, "QDQ", 1, 2
        axis, block_size = int(_attribute(node, "axis", 1)), int(_attribute(node, "block_size", 0))
    else:  # B [K, N]: per tensor or per output column
        node, fmt = use.node, op
        _, scale_index, point_index = _QUANTIZED_LINEAR_OPS[op]
        axis, block_size = 1, 0
    point_name = _optional_input(node, point_index)
    if point_name is not None and point_name not in constants:
        return None
    raw = np.zeros(1, np.int32) if point_name is None else _integer(constants[point_name])
    points = _broadcast_zero_point(raw, values.shape, axis, block_size)
    scale_name = None if scale_index is None else _optional_input(node, scale_index)
    groups = int(np.prod(constants[scale_name].dims)) if scale_name in constants else raw.size
    granularity = "per-block" if block_size else ("per-tensor" if groups == 1 else "per-channel")
    bits = 4 if dtype in ("int4", "uint4") else 8 * stored.dtype.itemsize
    quantization = {"format": fmt, "bits": bits, "granularity": granularity, "zero_point": _uniform(points)}
    return values != points, shape, dtype, quantization


def _uniform(points: np.ndarray):
    """The zero point when one value serves the whole weight, else None."""
    first = points.flat[0] if points.size else None
    return first.item() if first is not None and bool(np.all(points == first)) else None


def _out_in_shape(init, use: _Use) -> tuple[int, int]:
    """A linear weight's (out, in) sizes, from its stored dims (MatMulNBits: its K, N)."""
    if use.node.op_type == _NBITS_OP:
        return int(_attribute(use.node, "N", 0)), int(_attribute(use.node, "K", 0))
    dims = list(init.dims)
    return dims[1 - use.input_axis], dims[use.input_axis]


def _feeds_output(node, consumers: dict, outputs: set[str], hops: int = 3) -> bool:
    """Whether ``node``'s output reaches a graph output directly or through a few
    dequantize / rescale nodes (the logits of a quantized LM head)."""
    frontier = list(node.output)
    for _ in range(hops + 1):
        if any(name in outputs for name in frontier):
            return True
        frontier = [
            out for name in frontier for nxt, _ in consumers.get(name, []) if nxt.op_type in _OUTPUT_PASS_THROUGH
            for out in nxt.output
        ]
    return False


def sparsity_report(proto) -> dict:
    """:func:`initializer_sparsity` on an in-memory ModelProto (data loaded)."""
    from onnx import numpy_helper

    graph = proto.graph
    inits = {init.name: init for init in graph.initializer if init.data_type in _weight_types()}
    uses = _weight_uses(graph, inits)
    constants = _constant_arrays(graph, {init.name: init for init in graph.initializer})
    consumers = _consumers(graph)
    graph_outputs = {output.name for output in graph.output}

    embeddings = [n for n, found in uses.items() if any(use.kind == "embedding" for use in found)]
    linear = {}  # name -> its first linear use (input axis, and the op that holds it)
    lm_head_name = None
    for name, found in uses.items():
        linear_uses = [use for use in found if use.kind == "linear"]
        if not linear_uses:
            continue
        linear[name] = linear_uses[0]
        if any(_feeds_output(use.node, consumers, graph_outputs) for use in linear_uses):
            lm_head_name = name
    if lm_head_name is None:
        # No linear feeds a graph output: the one whose output dim is a vocab.
        vocabs = {inits[n].dims[0] for n in embeddings}
        heads = [n for n, use in linear.items() if _out_in_shape(inits[n], use)[0] in vocabs]
        lm_head_name = heads[-1] if heads else None

    patterns = {p: parse_nm(p) for p in MEASURED_PATTERNS}

    def measure(name: str) -> tuple[dict, int, int, dict] | None:
        """(report entry, zeros, elements, N:M groups) of one weight, or None where it
        cannot be measured. One weight at a time: peak memory stays one weight's mask."""
        use = linear[name]
        stored = _stored_nonzero(name, use, inits, constants)
        if stored is None:
            return None
        nonzero, shape, dtype, quantization = stored
        nonzero = nonzero if use.input_axis == 1 else nonzero.T  # rows = outputs, columns = inputs
        zeros = nonzero.size - int(np.count_nonzero(nonzero))
        entry = {
            "name": name,
            "shape": shape,  # as stored in the graph (MatMulNBits: its logical [N, K])
            "input_axis": use.input_axis,
            "dtype": dtype,
            "quantization": quantization,
            "zero_fraction": zeros / nonzero.size if nonzero.size else 0.0,
            "compliance": {p: nm_compliance(nonzero, pattern) for p, pattern in patterns.items()},
        }
        groups = {p: nonzero.shape[0] * (nonzero.shape[1] // pattern.m) for p, pattern in patterns.items()}
        return entry, zeros, nonzero.size, groups

    weights, total, zeros, groups, compliant = [], 0, 0, defaultdict(int), defaultdict(float)
    for name in linear:
        measured = None if name == lm_head_name else measure(name)
        if measured is None:
            continue
        entry, entry_zeros, elements, entry_groups = measured
        weights.append(entry)
        total += elements
        zeros += entry_zeros
        for pattern, count in entry_groups.items():
            groups[pattern] += count
            compliant[pattern] += entry["compliance"][pattern] * count
    summary = {p: compliant[p] / groups[p] if groups[p] else 0.0 for p in MEASURED_PATTERNS}

    lm_head = embedding_name = None
    tied = duplicated = False
    measured_head = None if lm_head_name is None else measure(lm_head_name)
    if measured_head is not None:
        lm_head = measured_head[0]
        if lm_head_name in embeddings:
            embedding_name, tied = lm_head_name, True
        else:
            head_shape = _out_in_shape(inits[lm_head_name], linear[lm_head_name])
            same_shape = [n for n in embeddings if tuple(inits[n].dims) == head_shape]
            if same_shape:
                embedding_name = same_shape[0]
                head, table = inits[lm_head_name], inits[embedding_name]
                if head.data_type == table.data_type and lm_head["quantization"] is None:
                    stored = numpy_helper.to_array(head)
                    out_in = stored if linear[lm_head_name].input_axis == 1 else stored.T
                    tied = duplicated = bool(np.array_equal(out_in, numpy_helper.to_array(table)))
        lm_head["shared_with_embedding"] = lm_head_name in embeddings
    if embedding_name is None and embeddings:
        embedding_name = max(embeddings, key=lambda n: inits[n].dims[0])
    embedding = None
    if embedding_name is not None:
        embedding = {"name": embedding_name, "shape": list(inits[embedding_name].dims)}
    return {
        "linear_weights": weights,
        "num_linear_weights": len(weights),
        "sparsity": zeros / total if total else 0.0,
        "compliance": summary,
        "lm_head": lm_head,
        "embedding": embedding,
        "tied_embeddings": tied,
        "lm_head_duplicated": duplicated,
    }
