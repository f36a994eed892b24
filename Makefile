# Two entry points for a fresh machine: `make demo` and `make test` (ruff, then the tests). Both
# create .venv and install everything first (torch's CPU wheel is pinned and installed before the
# rest so pip never picks a CUDA build). `make test` also installs, as root, the Debian packages of
# the targets' tools that are missing (cross compilers, QEMU: the presets name them), so the target
# tests run for real.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
VISION := $(VENV)/vision-packages
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup target-tools demo test clean

setup: $(STAMP) $(VISION)/.installed

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The model zoo's vision packages (tests/zoo/vision_models.py), outside site-packages: PyPI's
# torchvision 0.28.0 (the release for torch 2.13) is a CUDA build whose extension cannot load beside
# the CPU torch, and transformers imports torchvision whenever it is importable. The tests import it
# from here with the two op schemas it needs defined first; timm and mcunet need it.
$(VISION)/.installed: $(STAMP)
	$(PY) -m pip install --quiet --upgrade --no-deps --target $(VISION) \
	  torchvision==0.28.0 timm==1.0.31 mcunet==0.1.1.post202206170200
	touch $@

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
	$(PY) -m ruff check .
	$(PY) -m pytest -q -rs --durations=10 -n auto --dist loadfile

clean:
	rm -rf build .pytest_cache
