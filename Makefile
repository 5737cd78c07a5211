# Tessera: `make test` and `make demo` set everything up on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU torch first (from the local wheel or the CPU index), then everything else pinned to it,
# so no second torch with several GB of CUDA packages is ever pulled.
TORCH_SPEC ?= torch==2.13.0
# DeepSpeed JIT-builds its CPU shared-memory comm op on first use (~70 s): build it once at setup,
# into the venv, so no test (and no training run) pays for it
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: setup browser test test-fast lint demo demo-text demo-seeds demo-text-seeds compare-estimators tokenizer-seeds serve bench bench-gpu clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	$(BIN)/pip install -q -c constraints.txt --no-build-isolation "deepspeed>=0.14"
	$(BIN)/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null 2>&1
	touch $(STAMP)

# the page's browser test drives Debian's headless Chromium (skipped, saying so, without it)
browser:
	-@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 || echo "no chromium: the browser test will be skipped"

test: setup browser
	$(BIN)/ruff check .
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest tests -x --durations=20

test-fast: setup  # skips the multi-process and end-to-end tests (marked slow)
	$(BIN)/ruff check .
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest tests -x -m "not slow"

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

demo: setup
	$(BIN)/python scripts/demo.py --config configs/demo/digits.yaml --output-dir outputs/demo

demo-text: setup
	$(BIN)/python scripts/demo.py --config configs/demo/shapes.yaml --output-dir outputs/demo-text

demo-seeds: setup  # the README's digits table: `make demo` for seeds 0 1 2, mean ± std (~50 min)
	OMP_NUM_THREADS=1 $(BIN)/python scripts/demo_seeds.py --config configs/demo/digits.yaml \
		--output-dir outputs/demo --seeds 0 1 2 --out bench/results/demo_seeds_digits.json

demo-text-seeds: setup  # the README's shapes table: `make demo-text` for seeds 0 1 2 (~75 min a seed on one core)
	OMP_NUM_THREADS=1 $(BIN)/python scripts/demo_seeds.py --config configs/demo/shapes.yaml \
		--output-dir outputs/demo-text --seeds 0 1 2 --out bench/results/demo_seeds_shapes.json

compare-estimators: setup  # rotation trick vs straight-through, 3 seeds each (~8 min)
	OMP_NUM_THREADS=1 $(BIN)/python scripts/compare_estimators.py --config configs/tokenizer/digits.yaml \
		--seeds 0 1 2 --output-dir outputs/compare_estimators_digits

tokenizer-seeds: setup  # the README's other tokenizer figures: 3 configs x seeds 0 1 2 (~50 min)
	OMP_NUM_THREADS=1 $(BIN)/python scripts/tokenizer_seeds.py --configs configs/tokenizer/digits_fsq.yaml \
		configs/tokenizer/digits_rq.yaml configs/tokenizer/photos.yaml --seeds 0 1 2 \
		--out bench/results/tokenizer_seeds.json

serve: setup  # the `make demo` models behind http://127.0.0.1:8000/
	$(BIN)/python scripts/serve.py --tokenizer outputs/demo/tokenizer/final \
		--prior outputs/demo/prior/final --draft outputs/demo/draft/final --port 8000

bench: setup
	$(BIN)/python bench/quantizers.py
	$(BIN)/python bench/train_prior.py
	$(BIN)/python bench/sampling.py

bench-gpu:  # on a CUDA machine whose python has torch, transformers, einops (<= 8 min)
	$(PY) bench/gpu.py

clean:
	rm -rf outputs
