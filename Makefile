# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv and install
# everything first (torch's CPU wheel is pinned and installed before the rest so pip never picks a
# CUDA build). `make test` also installs, as root, the Debian packages of the targets' tools that
# are missing (cross compilers, QEMU: the presets name them), so the target tests run for real.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup target-tools demo test clean

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

# Packages Debian cannot install here (nvidia-cuda-toolkit is in non-free) are left out with a warning.
target-tools: setup
	@packages="$$($(VENV)/bin/pockengine targets --missing-packages)"; \
	if [ -z "$$packages" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
	  echo "warning: missing target tools; their tests will be skipped. Install: $$packages"; exit 0; fi; \
	echo "installing the targets' tools: $$packages"; \
	apt-get update -qq; \
	available=""; for p in $$packages; do \
	  if apt-cache show $$p >/dev/null 2>&1; then available="$$available $$p"; else echo "warning: $$p is not installable here"; fi; \
	done; \
	[ -z "$$available" ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$available >/dev/null

test: setup target-tools
	$(PY) -m pytest -q -rs --durations=10 -n auto --dist loadfile

clean:
	rm -rf build .pytest_cache
