# `make demo`: set up .venv and run one full round on the embedded tiny model.
# `make test`: set up .venv and run the tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_WS ?= demo-workspace

.PHONY: demo test lint bench clean-demo

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, from the local CPU build, so the package's torch range is already met (no CUDA download)
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	rm -rf $(DEMO_WS)
	$(BIN)/loop init $(DEMO_WS)
	$(BIN)/loop run --round --auto-rate -w $(DEMO_WS)
	@echo "--- unit 1 draws the same prompts at the same seeds; the same scripted rater scores them ---"
	$(BIN)/loop generate --unit 1 -w $(DEMO_WS)
	$(BIN)/loop rate --auto -w $(DEMO_WS)
	$(BIN)/loop status -w $(DEMO_WS)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check loop tests
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python -m loop.bench round
	$(BIN)/python -m loop.bench generate
	$(BIN)/python -m loop.bench train
