"""PyTorch on an NVIDIA GPU with cuSPARSELt 2:4 kernels, prefill and decode as CUDA graphs.

Build: the checkpoint in fp16/bf16 safetensors plus ``kernel_plan.json``: for every linear
layer and every token count the workload runs (prefill batch x prompt, decode batch, the
quality window), the 2:4 kernel (cuSPARSELt) and the dense one (cuBLAS) are timed under
CUDA graphs on this GPU, and the faster is kept (sparse only when faster by a margin).
Load: the model with each planned layer replaced by one that runs its chosen kernel, and
prefill / decode captured as CUDA graphs over a static KV cache.

The report lists per layer which kernel runs at which token count, and the measured
ratio: 2:4 on narrow layers or at few tokens loses to dense, and then dense runs.
"""

from __future__ import annotations

import json
from pathlib import Path

from sparsedeploy.backends.base import (
    Availability,
    Backend,
    BuildInputs,
    BuiltArtifact,
    Session,
    Workload,
    cuda_gpu,
    module_version,
    register_backend,
)
from sparsedeploy.backends.torch_runtime import QUANTIZED_BASELINES, TorchSession, bitsandbytes_missing
from sparsedeploy.errors import BadInput, TargetUnavailable
from sparsedeploy.ui import info

PLAN_FILE = "kernel_plan.json"
WEIGHTS_FILE = "model.safetensors"
# The 16-bit dtype each precision ships and runs its other layers in. int8 is W8A8 on the
# linear layers (sparsedeploy.kernels.int8), quantized from the fp16 weights at load.
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "int8": "float16"}


@register_backend
class TorchCudaBackend(Backend):
    name = "torch-cuda"
    engine = "pytorch"
    device = "cuda"

    def availability(self) -> Availability:
        import torch

        has_gpu, detail = cuda_gpu()
        if not has_gpu:
            return Availability(False, f"{detail}; this target needs an NVIDIA GPU (sm_80+) and a CUDA build of torch")
        if not torch.backends.cusparselt.is_available():
            return Availability(False, f"{detail}, but this torch {torch.__version__} has no cuSPARSELt")
        return Availability(True, f"torch {torch.__version__}, cuSPARSELt {torch.backends.cusparselt.version()}, {detail}")

    def engine_version(self) -> str:
        import torch

        return f"torch {torch.__version__}, cuSPARSELt {torch.backends.cusparselt.version()}, CUDA {torch.version.cuda}"

    def build_settings(self, precision: str, workload: Workload, options: dict) -> dict:
        if precision not in DTYPES:
            raise BadInput(f"the cuda target builds {', '.join(DTYPES)}, not {precision}; pass --quant none or --quant int8")
        return {
            "precision": precision,
            "token_counts": planned_token_counts(workload),
            "cuda_graphs": bool(options.get("cuda_graphs", True)),
            "device": _device_name(),  # a plan timed on one GPU does not hold for another
        }

    def build(self, inputs: BuildInputs, output_dir: Path) -> BuiltArtifact:
        import torch

        from sparsedeploy.kernels.semi_structured import named_linears, plan_layers, plan_summary
        from sparsedeploy.models.inspection import measure_linear_sublayers, worst_nm_compliance

        settings = self.build_settings(inputs.precision, inputs.workload, inputs.options)
        dtype = getattr(torch, DTYPES[inputs.precision])
        int8 = inputs.precision == "int8"
        model = _copy_model(inputs.model, dtype)
        model.save_pretrained(output_dir, safe_serialization=True)
        if int8:
            dequantize_in_place(model)  # what runs: the int8 weights (more zeros, never fewer)
        layers, sparsity = measure_linear_sublayers(model)  # measured in what runs, after the cast
        compliance = worst_nm_compliance(layers)
        model.to("cuda")
        linears = named_linears(model)
        kind = "int8 dense and int8 2:4" if int8 else "dense and 2:4"
        info(f"      timing {kind} kernels of {len(linears)} linear layers at {settings['token_counts']} tokens ...")
        plans = plan_layers(linears, settings["token_counts"], int8=int8)
        plan = {"device": settings["device"], "engine": self.engine_version(), "precision": inputs.precision,
                "token_counts": settings["token_counts"], "cuda_graphs": settings["cuda_graphs"],
                "summary": plan_summary(plans),
                "layers": [p.to_dict() for p in plans]}
        (output_dir / PLAN_FILE).write_text(json.dumps(plan, indent=1) + "\n")
        del model
        torch.cuda.empty_cache()
        sparse_layers = sum(1 for p in plans if "sparse" in p.kernels.values())
        details = {"plan_file": PLAN_FILE, "plan_summary": plan["summary"], "device": settings["device"],
                   "layers_with_sparse_kernel": sparse_layers, "linear_layers": len(plans)}
        main_file = WEIGHTS_FILE if (output_dir / WEIGHTS_FILE).is_file() else WEIGHTS_FILE + ".index.json"  # sharded
        return BuiltArtifact(output_dir, main_file, inputs.precision,
                             {"sparsity": sparsity, "compliance": compliance, "num_linear_weights": len(layers)}, details)

    def load(self, artifact: BuiltArtifact, workload: Workload) -> Session:
        return TorchCudaSession(artifact, workload)

    baselines = QUANTIZED_BASELINES

    def baseline_unavailable(self, name: str) -> str | None:
        return bitsandbytes_missing()

    def baseline_version(self, name: str) -> str:
        return f"{self.engine_version()}, bitsandbytes {module_version('bitsandbytes')}"

    def load_baseline(self, name: str, dense: BuiltArtifact, workload: Workload) -> Session:
        import torch

        graphs = json.loads((dense.directory / PLAN_FILE).read_text()).get("cuda_graphs", True)
        return TorchSession(dense.directory, getattr(torch, DTYPES[dense.precision]), "cuda", graphs=graphs, baseline=name)


def planned_token_counts(workload: Workload) -> list[int]:
    """The GEMM heights the check runs: prefill (batch x prompt), decode (batch), and the
    quality window (one sequence of eval_seqlen tokens)."""
    counts = {b * workload.prompt_tokens for b in workload.batches} | set(workload.batches) | {workload.eval_seqlen}
    return sorted(counts)


def _device_name() -> str:
    """"NAME (sm_XY)" of the GPU the plan is timed on."""
    has_gpu, detail = cuda_gpu()
    if not has_gpu:
        raise TargetUnavailable(f"the cuda target needs an NVIDIA GPU with 2:4 sparse tensor cores: {detail}")
    return detail


def dequantize_in_place(model) -> None:
    """Each linear sublayer's weight replaced by its int8 round trip (what an int8 build
    runs), to measure sparsity and compliance in it."""
    import torch

    from sparsedeploy.kernels.int8 import quantize_weight_rows
    from sparsedeploy.kernels.semi_structured import named_linears

    with torch.no_grad():
        for _, linear in named_linears(model):
            quantized, scale = quantize_weight_rows(linear.weight)
            linear.weight.copy_((quantized.float() * scale[:, None]).to(linear.weight.dtype))


def _copy_model(model, dtype):
    """A copy of the float32 CPU model in ``dtype`` (the caller's model stays as it is)."""
    import copy

    clone = copy.deepcopy(model)
    return clone.to(dtype=dtype)


class TorchCudaSession(TorchSession):
    """The build's weights on the GPU, each linear layer running its planned kernel."""

    def __init__(self, artifact: BuiltArtifact, workload: Workload):
        import torch

        from sparsedeploy.kernels.semi_structured import LayerPlan, apply_plan, named_linears, plan_layers

        plan = json.loads((artifact.directory / PLAN_FILE).read_text())
        super().__init__(artifact.directory, getattr(torch, DTYPES[artifact.precision]), "cuda",
                         graphs=plan.get("cuda_graphs", True))
        self.workload = workload
        self.int8 = artifact.precision == "int8"
        self.replanned = None
        device = _device_name()
        if plan["device"] != device:
            # Timings belong to the GPU they were taken on: time again here.
            info(f"      the kernel plan was timed on {plan['device']}, this is {device}: timing again ...")
            plans = plan_layers(named_linears(self.model), plan["token_counts"], int8=self.int8)
            self.replanned = f"re-timed on {device} (the build's plan was timed on {plan['device']})"
        else:
            plans = [LayerPlan.from_dict(layer) for layer in plan["layers"]]
        apply_plan(self.model, plans, int8=self.int8)
        self.plans = plans

    def kernels(self) -> dict:
        from sparsedeploy.kernels.semi_structured import nearest_planned

        workload = self.workload
        phases = {"prefill": workload.batches[0] * workload.prompt_tokens, "decode": workload.batches[0]}
        said = []
        used = False
        for phase, tokens in phases.items():
            sparse = sum(1 for p in self.plans if p.kernels[nearest_planned(tokens, sorted(p.kernels))] == "sparse")
            used |= sparse > 0
            kernel = "cuSPARSELt int8 2:4 (W8A8)" if self.int8 else "cuSPARSELt 2:4"
            said.append(f"{phase} ({tokens} tokens): {sparse} of {len(self.plans)} linear layers on {kernel}")
        eligible = sum(1 for p in self.plans if not p.reason)
        dense = "dense int8 (torch._int_mm)" if self.int8 else "dense"
        evidence = (f"kernel plan timed under CUDA graphs{' (' + self.replanned + ')' if self.replanned else ''}: "
                    + "; ".join(said) + f"; {eligible} layers are 2:4 and eligible, the others stay {dense} "
                    "where the 2:4 kernel measured slower")
        return {"sparse_kernels": "used" if used else "not-used", "evidence": evidence,
                "cuda_graphs": self.ran_graphs(), "layers": [p.to_dict() for p in self.plans]}
