#!/usr/bin/env bash
# Run ON THE DEVICE (the `device` tool's run, in the repository root): one stage per call,
# each inside the 600 s a call may take; logs, JSON and reports go to $OUT. Order and what
# each call carries: see prepare.sh. The machine keeps /tmp and /root between calls while
# it stays warm, so later stages reuse what earlier ones installed and pruned.
#   stage          versions, the gpu tests that need no default model (kernels, graphs),
#                  gpu_24.py's probe of the ways to call a 2:4 GEMM
#   kernels-1b / kernels-7b   gpu_24.py: a whole random model (dense, 2:4 planned and
#                  everywhere, graphs and eager) and its bitsandbytes baselines
#   default-model  the cuda end-to-end test, then the default model pruned Wanda 2:4,
#                  built for the cuda target (quality on the real model, kernel plan,
#                  baselines)
#   default-model-int8  that bundle checked again from itself, then the same build with
#                  --quant int8 (W8A8; int8 2:4 against int8 dense)
#   recovery-24 / recovery-rest   benchmarks/recovery.py on the GPU (the issue's GPU goals)
set -uo pipefail
case "${1:-}" in
  stage|kernels-1b|kernels-7b|default-model|default-model-int8|recovery-24|recovery-rest) ;;
  *) echo "usage: bash benchmarks/device/gpu_checks.sh stage|kernels-1b|kernels-7b|default-model|default-model-int8|recovery-24|recovery-rest" >&2; exit 2 ;;
esac
source "$(dirname "$0")/env.sh"
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
WORK=/root/sparsedeploy-work
RECOVERY="--device cuda --steps 600 --batch 16 --seqlen 512"
# A machine released between calls (30 s idle) forgets what earlier calls carried: say so
# instead of failing later on a missing model.
case "${1:-}" in
  default-model|default-model-int8|recovery-24|recovery-rest)
    if ! model_assembled; then
      missing=$(missing_model_files)
      echo "default model not assembled on this machine (fresh machine?); carry again, one model part a call: ${missing:-nothing missing, see the checksum line above}" >&2
      exit 3
    fi ;;
esac
if [ "${1:-}" = default-model-int8 ] && [ ! -f "$WORK/wanda-2of4/sparsity.json" ]; then
  echo "no pruned checkpoint in $WORK (fresh machine?); run the default-model stage first" >&2
  exit 3
fi
case "${1:-}" in
  stage)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -c "import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__, 'cuSPARSELt', torch.backends.cusparselt.version())"
    python3 -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)" 2>&1 | tail -1
    timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu -k "not end_to_end" tests/test_cuda_target.py 2>&1 | tee "$OUT/pytest-gpu.log" | tail -25
    # the ways to call a 2:4 GEMM, timed and checked against float32 (which should the target use?)
    timeout 150 python3 benchmarks/gpu_24.py --part probe --sizes 1b --out "$OUT/probe.json" 2>&1 | grep -v Warning | tail -8
    ;;
  kernels-1b|kernels-7b)
    size=${1#kernels-}
    timeout 570 python3 benchmarks/gpu_24.py --part models baselines --sizes $size --out "$OUT/gpu_24-$size.json" 2>&1 \
      | grep -v Warning | tee "$OUT/gpu_24-$size.log" | tail -30
    ;;
  default-model)
    timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu -k end_to_end tests/test_cuda_target.py 2>&1 | tee "$OUT/pytest-e2e.log" | tail -15
    timeout 90 python3 -m sparsedeploy prune default -o $WORK/wanda-2of4 --method wanda --pattern 2:4 --device cuda --force 2>&1 | tail -2
    timeout 300 python3 -m sparsedeploy build --target cuda --model $WORK/wanda-2of4 -o $WORK/bundle --force --json \
      > "$OUT/report.json" 2> "$OUT/build.log"; echo "build exit $?"
    tail -15 "$OUT/build.log"; cp $WORK/bundle/report.md $WORK/bundle/latency.png "$OUT/" 2>/dev/null
    ;;
  default-model-int8)
    # after default-model: its bundle alone, checked again on the GPU (never done on one yet;
    # here, not there, so that each call's timeouts add up to under the 600 s a call may take)
    timeout 150 python3 -m sparsedeploy check $WORK/bundle --json > "$OUT/check.json" 2> "$OUT/check.log"; echo "check exit $?"
    tail -3 "$OUT/check.log"
    # then the same build in W8A8 (default-model pruned the checkpoint)
    timeout 400 python3 -m sparsedeploy build --target cuda --quant int8 --model $WORK/wanda-2of4 -o $WORK/bundle-int8 \
      --force --json > "$OUT/report-int8.json" 2> "$OUT/build-int8.log"; echo "build exit $?"
    tail -15 "$OUT/build-int8.log"; cp $WORK/bundle-int8/report.md "$OUT/report-int8.md" 2>/dev/null
    ;;
  recovery-24)
    timeout 580 python3 benchmarks/recovery.py --rows wanda-2:4 sparsegpt-2:4 $RECOVERY 2>&1 | tail -20
    cp benchmarks/results/recovery.json "$OUT/"
    ;;
  recovery-rest)
    timeout 580 python3 benchmarks/recovery.py --rows wanda-50% sparsegpt-50% depth-drop-8 $RECOVERY 2>&1 | tail -20
    cp benchmarks/results/recovery.json "$OUT/"
    ;;
esac
