# Set-up, demo and tests on a fresh machine. Every target is idempotent.
PY        ?= python3
VENV      ?= .venv
BIN       := $(VENV)/bin
TORCH_PIN := torch==2.13.0
FMNIST    := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
STAMP     := $(VENV)/.bnlab-installed

.PHONY: setup demo test data clean

setup: $(STAMP) data

# The stamp is rebuilt when pyproject.toml changes, so `make` stays fast when set up.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(TORCH_PIN)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,export]' $(TORCH_PIN)
	# Compile the fused BN kernels now (~30 s once) rather than in the first run.
	$(BIN)/python -c "import bnlab.nn as n; print('bnlab BN backend:', n.backend_name())"
	touch $(STAMP)

# System packages from Debian: the Fashion-MNIST files (the offline default data) and chromium
# (the test suite opens report.html in it through Playwright; no browser download is possible).
APT_PKGS := $(if $(wildcard $(FMNIST)),,dataset-fashion-mnist) $(if $(wildcard /usr/bin/chromium),,chromium)

data:
	@if [ -z "$(strip $(APT_PKGS))" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian packages: $(strip $(APT_PKGS))"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PKGS) >/dev/null; \
	else \
	  echo "missing Debian packages: run 'sudo apt-get install $(strip $(APT_PKGS))'" \
	       "(Fashion-MNIST also: '$(BIN)/bnlab data fetch fashion-mnist', needs network)"; \
	fi

demo: setup
	$(BIN)/bnlab demo

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
