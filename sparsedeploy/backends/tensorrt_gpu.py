"""TensorRT engine with 2:4 sparse weights on an NVIDIA GPU.

build: the shared ONNX export (float16; Q/DQ for INT8 / FP8), the 2:4 orientation check,
then two strongly typed engines built with ``BuilderFlag.SPARSE_WEIGHTS``: ``model.plan`` (what ships:
last-position logits, prefill and decode profiles, timed) and ``quality.plan`` (logits
at every position of one window, for the quality check). The graphs stay in ``onnx/``
so that the bundle can be rebuilt for another GPU or TensorRT version (a plan runs only
on the GPU model and TensorRT version that built it). The stages before TensorRT live
in :mod:`sparsedeploy.export.tensorrt_engine` and run without a GPU.

Run: torch CUDA tensors are the engine's I/O buffers (``set_tensor_address``,
``execute_async_v3`` on a torch stream); prefill and decode are timed with CUDA events on
that stream, so host-side gaps between launches count, as they do in serving.
"""

from __future__ import annotations

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
    cuda_gpu,
    module_version,
    register_backend,
    time_generation_on_gpu,
)
from sparsedeploy.errors import BadInput
from sparsedeploy.export import tensorrt_engine as trt_stages

MIN_TENSORRT_MAJOR = 10  # the I/O-by-name API (set_input_shape, execute_async_v3), strongly typed networks


@register_backend
class TensorRTBackend(Backend):
    name = "tensorrt"
    engine = "tensorrt"
    device = "cuda"

    def availability(self) -> Availability:
        version = module_version("tensorrt")
        has_gpu, detail = cuda_gpu()
        if version is None and not has_gpu:
            return Availability(False, f"tensorrt is not installed and {detail}; needs an NVIDIA GPU (sm_80+), "
                                       "a CUDA build of torch and `pip install tensorrt`")
        if version is None:
            return Availability(False, f"tensorrt is not installed (the GPU is there: {detail}); `pip install tensorrt` (NVIDIA's wheels)")
        if not has_gpu:
            return Availability(False, f"tensorrt {version} is installed but {detail}; needs an NVIDIA GPU (sm_80+) and a CUDA build of torch")
        major = version.split(".")[0]
        if not major.isdigit() or int(major) < MIN_TENSORRT_MAJOR:
            return Availability(False, f"tensorrt {version} is older than {MIN_TENSORRT_MAJOR}.0; `pip install -U tensorrt`")
        return Availability(True, f"tensorrt {version}, {detail}")

    def engine_version(self) -> str:
        import tensorrt

        return tensorrt.__version__

    def build_settings(self, precision: str, workload: Workload, options: dict) -> dict:
        trt_stages.builder_flags(precision)  # an unknown precision is BadInput here
        device = _device()
        if device is not None:  # a plan is only valid on the GPU model that built it
            trt_stages.check_compute_capability(precision, device["capability"], device["name"])
        settings = {
            "precision": precision,
            "opset": trt_stages.graph_opset(precision, options.get("opset")),
            "flags": list(trt_stages.builder_flags(precision)),
            "network": "strongly typed (float16 graph" + (", Q/DQ)" if precision != "fp16" else ")"),
            "device": device,
            "shapes": {"prompt_tokens": workload.prompt_tokens, "new_tokens": workload.new_tokens,
                       "batches": list(workload.batches), "eval_seqlen": workload.eval_seqlen},
        }
        if precision in ("int8", "fp8"):
            settings["calibration"] = calibration_settings(options)
        if precision == "int8":
            from sparsedeploy.export.smoothing import smoothquant_alpha

            settings["smoothquant_alpha"] = smoothquant_alpha(options.get("smoothquant_alpha"))
        return settings

    def build(self, inputs: BuildInputs, output_dir: Path) -> BuiltArtifact:
        import tensorrt

        settings = self.build_settings(inputs.precision, inputs.workload, inputs.options)
        device = settings["device"] or {"name": "unknown", "capability": (0, 0)}
        prepared = trt_stages.prepare_graphs(inputs.model, output_dir / trt_stages.ONNX_DIR, inputs.precision,
                                             settings["opset"], inputs.calibration, settings.get("smoothquant_alpha"))
        geometry = (prepared.export["num_layers"], prepared.export["kv_heads"], prepared.export["head_dim"])
        cache = trt_stages.timing_cache_path(tensorrt.__version__, device["name"], tuple(device["capability"]))
        quality = trt_stages.build_engine(prepared.full, output_dir / trt_stages.QUALITY_PLAN, inputs.precision,
                                          [trt_stages.quality_profile(inputs.workload, *geometry)], cache)
        latency = trt_stages.build_engine(prepared.last, output_dir / trt_stages.PLAN_FILE, inputs.precision,
                                          trt_stages.latency_profiles(inputs.workload, *geometry), cache)
        details = {
            "export": prepared.export,
            "quantization": prepared.quantization,
            "orientation": prepared.orientation,
            "sparsity_measured_in": f"{trt_stages.ONNX_DIR}/{prepared.full.name} (the graph TensorRT compiled)",
            "last_graph": prepared.last_graph,
            "tensorrt": tensorrt.__version__,
            "device": device,
            "engines": {"latency": latency.to_dict(), "quality": quality.to_dict()},
        }
        return BuiltArtifact(output_dir, trt_stages.PLAN_FILE, inputs.precision, prepared.sparsity, details)

    def load(self, artifact: BuiltArtifact, workload: Workload) -> Session:
        return TensorRTSession(artifact)


def _device() -> dict | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return {"name": torch.cuda.get_device_name(0), "capability": list(torch.cuda.get_device_capability(0))}


class _Engine:
    """One deserialized engine and an execution context per optimization profile."""

    def __init__(self, runtime, path: Path, profiles: list[trt_stages.Profile], stream):
        import tensorrt as trt

        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise BadInput(f"TensorRT could not load {path.name} (built by another TensorRT version or GPU?); "
                           "rebuild it on this machine with `sparsedeploy build --target tensorrt`")
        self.profiles = profiles
        self.contexts = []
        for index in range(len(profiles)):
            # Memory for the selected profile only: the default (STATIC) reserves the largest
            # profile's activations in every context, so decode would hold prefill's too.
            context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.ON_PROFILE_CHANGE)
            context.set_optimization_profile_async(index, stream.cuda_stream)
            self.contexts.append(context)
        stream.synchronize()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        on_host = [n for n in names if self.engine.get_tensor_location(n) != trt.TensorLocation.DEVICE]
        if on_host:  # every buffer we bind is a CUDA tensor
            raise BadInput(f"TensorRT placed {', '.join(on_host)} of {path.name} on the host (shape tensors), which this "
                           "backend cannot feed yet (it binds GPU buffers only); use --target cuda for this model")
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: _torch_dtype(self.engine.get_tensor_dtype(n)) for n in names}

    def run(self, profile: int, feeds: dict, stream) -> dict:
        """Enqueue one inference on ``stream``; returns the output tensors (not synchronized)."""
        import torch

        context = self.contexts[profile]
        keep = []  # buffers referenced by the engine until the stream passes them
        for name in self.inputs:
            tensor = feeds[name].to(self.dtypes[name]).contiguous()
            if not context.set_input_shape(name, tuple(tensor.shape)):  # False, not an exception
                raise RuntimeError(f"TensorRT refused shape {tuple(tensor.shape)} for {name}; see the TensorRT messages above")
            if tensor.numel() == 0:  # empty tensors still need a distinct non-null address
                tensor = torch.empty(1, dtype=tensor.dtype, device=tensor.device)
            keep.append(tensor)
            _bind(context, name, tensor)
        outputs = {}
        for name in self.outputs:
            shape = tuple(context.get_tensor_shape(name))
            if any(size < 0 for size in shape):
                raise RuntimeError(f"TensorRT left the shape of {name} unresolved ({shape}); see the TensorRT messages above")
            outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device="cuda")
            buffer = outputs[name] if outputs[name].numel() else torch.empty(1, dtype=self.dtypes[name], device="cuda")
            keep.append(buffer)
            _bind(context, name, buffer)
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed; see the TensorRT messages above")
        return outputs


def _bind(context, name: str, tensor) -> None:
    if not context.set_tensor_address(name, tensor.data_ptr()):
        raise RuntimeError(f"TensorRT refused the buffer for {name}; see the TensorRT messages above")


def _torch_dtype(data_type):
    import tensorrt as trt
    import torch

    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
             trt.DataType.INT8: torch.int8, trt.DataType.BOOL: torch.bool}
    for name, dtype in (("INT64", torch.int64), ("BF16", torch.bfloat16)):
        if hasattr(trt.DataType, name):
            table[getattr(trt.DataType, name)] = dtype
    return table[data_type]


class TensorRTSession(Session):
    """Quality windows run on ``quality.plan``; latency on ``model.plan``. One engine's
    weights on the GPU at a time, as the ONNX Runtime session does."""

    def __init__(self, artifact: BuiltArtifact):
        import tensorrt as trt
        import torch

        self.torch = torch
        self.directory = artifact.directory
        self.engines_info = artifact.details["engines"]
        self.stream = torch.cuda.Stream()
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.latency_profiles = [trt_stages.Profile.from_dict(p) for p in self.engines_info["latency"]["profiles"]]
        self.quality_profiles = [trt_stages.Profile.from_dict(p) for p in self.engines_info["quality"]["profiles"]]
        self.quality = None
        self.latency = None
        self.layout = artifact.details["export"]

    def _quality(self) -> _Engine:
        if self.quality is None:
            self.latency = None
            self.quality = _Engine(self.runtime, self.directory / trt_stages.QUALITY_PLAN, self.quality_profiles, self.stream)
        return self.quality

    def _latency(self) -> _Engine:
        if self.latency is None:
            self.quality = None
            self.latency = _Engine(self.runtime, self.directory / trt_stages.PLAN_FILE, self.latency_profiles, self.stream)
        return self.latency

    def _feeds(self, input_ids, past: dict, past_length: int) -> dict:
        torch = self.torch
        batch, seq = input_ids.shape
        positions = torch.arange(past_length, past_length + seq, device="cuda", dtype=torch.int64).expand(batch, seq)
        return {"input_ids": input_ids, "attention_mask": torch.ones(batch, past_length + seq, dtype=torch.int64, device="cuda"),
                "position_ids": positions, **past}

    def _empty_past(self, batch: int) -> dict:
        layout = self.layout
        empty = self.torch.zeros(batch, layout["kv_heads"], 0, layout["head_dim"], device="cuda")
        return {f"past_key_values.{i}.{kind}": empty for i in range(layout["num_layers"]) for kind in ("key", "value")}

    def _check_fits(self, profile: trt_stages.Profile, shapes: dict, what: str) -> None:
        if not trt_stages.fits(profile, shapes):
            raise BadInput(f"{what} lies outside the engine's '{profile.name}' optimization profile; "
                           "rebuild with a profile whose [check] tables cover it")

    def logits(self, window):
        torch = self.torch
        engine = self._quality()
        with torch.cuda.stream(self.stream):
            ids = window.to("cuda", dtype=torch.int64)[None]
            feeds = self._feeds(ids, self._empty_past(1), 0)
            self._check_fits(self.quality_profiles[0], {n: tuple(feeds[n].shape) for n in feeds}, f"a window of {ids.shape[1]} tokens")
            outputs = engine.run(0, feeds, self.stream)
            logits = outputs["logits"][0].float().cpu()  # .cpu() waits for the stream
        return logits

    def measure_latency(self, batch: int, prompt_tokens: int, new_tokens: int, runs: int, warmup: int) -> LatencySamples:
        torch = self.torch
        engine = self._latency()
        prefill_profile, decode_profile = self.latency_profiles
        # Token values do not change the work; ids below 256 exist in every vocabulary.
        prompt = torch.randint(0, 256, (batch, prompt_tokens), generator=torch.Generator().manual_seed(0)).to("cuda")
        past_names = list(self._empty_past(1))
        presents = [name.replace("past_key_values.", "present.") for name in past_names]
        kv = (self.layout["kv_heads"], self.layout["head_dim"])
        total = prompt_tokens + new_tokens
        self._check_fits(prefill_profile, {"input_ids": (batch, prompt_tokens), "position_ids": (batch, prompt_tokens),
                                           "attention_mask": (batch, prompt_tokens), **{n: (batch, kv[0], 0, kv[1]) for n in past_names}},
                         f"a prefill of batch {batch} x {prompt_tokens} tokens")
        self._check_fits(decode_profile, {"input_ids": (batch, 1), "position_ids": (batch, 1), "attention_mask": (batch, total),
                                          **{n: (batch, kv[0], total - 1, kv[1]) for n in past_names}},
                         f"decoding {new_tokens} tokens after {prompt_tokens} at batch {batch}")

        def step(profile: int, input_ids, past: dict, past_length: int):
            outputs = engine.run(profile, self._feeds(input_ids, past, past_length), self.stream)
            next_ids = outputs["logits"][:, -1].argmax(-1, keepdim=True)
            return next_ids, {p: outputs[o] for p, o in zip(past_names, presents)}, past_length + input_ids.shape[1]

        with torch.cuda.stream(self.stream):
            return time_generation_on_gpu(lambda: step(0, prompt, self._empty_past(batch), 0), lambda state: step(1, *state),
                                          new_tokens, runs, warmup, stream=self.stream)

    def kernels(self) -> dict:
        import tensorrt as trt

        engine = self._latency().engine
        text = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
        records = trt_stages.parse_engine_information(text)
        names = [p.name for p in self.latency_profiles]
        return trt_stages.kernel_evidence(records, names, self.engines_info["latency"].get("sparsity_log"))

    def close(self) -> None:
        self.quality = self.latency = None
