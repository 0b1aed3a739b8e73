# First commands of the README. Each target creates .venv on first use.
# The interpreter .venv is made from: the first Python >= 3.12 that runs (tools/find_python.sh);
# `make PYTHON=/path/to/python3.12 install` chooses one.
export PYTHON
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= workdirs/quickstart
PYTEST_ARGS ?=
# The wavelet benchmark calls XLA:CPU programs whose temporaries are mapped afresh on each call;
# glibc's huge-page tunable backs them with 2 MiB pages, a few hundred times fewer page faults
# (docs/benchmarks/README.md, "Host memory"). Inert where glibc or the kernel lacks it. The
# train-step and per-block benchmarks set their own (benchmarks/host_memory.py); the trainer
# leaves host memory alone.
HOST_ENV ?= GLIBC_TUNABLES=glibc.malloc.hugetlb=1
# uv (installed into .venv by pip) resolves and installs the dependencies in under half a
# minute where pip takes a minute and a half. Bytecode is compiled at install, as pip does: a
# Python that writes none (PYTHONDONTWRITEBYTECODE) would otherwise recompile TensorFlow's
# sources in every process. uv reads its own settings (UV_INDEX_URL, ...), not pip.conf: where
# packages must come from a mirror configured for pip, `make INSTALLER=pip install`.
INSTALLER ?= uv

.PHONY: install test test-heavy test-fast quickstart bench lint clean

# One install run for the pins and the package: a second run re-resolves every dependency.
$(STAMP): requirements.txt setup.cfg pyproject.toml
	@if ! $(PY) -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then \
	  py=$$(sh tools/find_python.sh) || exit 1; \
	  echo "creating $(VENV) with $$py"; rm -rf $(VENV); $$py -m venv $(VENV) || exit 1; \
	fi
	@case "$(INSTALLER)" in \
	  uv) $(PY) -m pip install --quiet uv && \
	      $(PY) -m uv pip install --compile-bytecode --python $(PY) \
	        -r requirements.txt -e '.[test,tpu]' ;; \
	  pip) $(PY) -m pip install --upgrade pip && \
	       $(PY) -m pip install -r requirements.txt -e '.[test,tpu]' ;; \
	  *) echo "INSTALLER=$(INSTALLER): valid choices are uv and pip" >&2; exit 1 ;; \
	esac
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n 2 --maxschedchunk=1 -m "not heavy" $(PYTEST_ARGS)

# The out-of-memory search compiled for a real v5e: tens of minutes on 2 cores.
test-heavy: $(STAMP)
	$(PY) -m pytest -m heavy $(PYTEST_ARGS)

# The lane to run while editing: tiny networks only, no test marked `slow` (end-to-end and
# multi-process runs, TPU compiles, whole-network compiles).
test-fast: $(STAMP)
	$(PY) -m pytest -n 2 --maxschedchunk=1 -m "not slow and not heavy" $(PYTEST_ARGS)

quickstart: $(STAMP)
	$(PY) experiments/quickstart.py --workdir=$(WORKDIR)

bench: $(STAMP)
	$(PY) -m pip install -e '.[bench]'
	$(HOST_ENV) $(PY) -m benchmarks.wavelets
	$(PY) -m benchmarks.train_step
	$(PY) -m benchmarks.blocks

lint: $(STAMP)
	$(VENV)/bin/ruff check pcjax experiments tests benchmarks

clean:
	rm -rf $(VENV) workdirs
