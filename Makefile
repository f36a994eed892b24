# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv and install
# everything first (torch's CPU wheel is pinned and installed before the rest so pip never picks a
# CUDA build).
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(PY) examples/mlp_digits/train.py
	$(VENV)/bin/pockengine build examples/mlp_digits/train.py --target host -o build/mlp_digits
	$(VENV)/bin/pockengine run build/mlp_digits --steps 5
	$(VENV)/bin/pockengine inspect build/mlp_digits

test: setup
	$(PY) -m pytest -q -rs --durations=10 -n auto --dist loadfile

clean:
	rm -rf build .pytest_cache
