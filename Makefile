# Two commands do all set-up on a fresh machine:
#   make demo   # venv + pinned torch + lift3d, then the tiny text-to-3D recipe end to end
#   make test   # same set-up, then the test suite
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PROMPT ?= a red cube
DEMO_CONFIG ?= configs/tiny/dreamgaussian.yaml
APP_ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.lift3d-installed

.PHONY: setup test demo app bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls several GB of CUDA packages
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto

demo: $(STAMP)
	$(BIN)/python launch.py --config $(DEMO_CONFIG) --train prompt="$(PROMPT)"

app: $(STAMP)
	$(BIN)/python -m lift3d.app $(APP_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/fields.py
	$(BIN)/python bench/render_volume.py
	$(BIN)/python bench/render_neus.py
	$(BIN)/python bench/render_raster.py
	$(BIN)/python bench/render_splat.py
	$(BIN)/python bench/prior_speed.py
	$(BIN)/python bench/train_step.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
