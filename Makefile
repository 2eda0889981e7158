# Two entry points: `make test` and `make demo`. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# Two xdist workers for the 2-core CI machine; tests/conftest.py gives each one thread, runs the multi-process tests
# one at a time and starts the slowest first (--maxschedchunk 1: the workers take tests one by one as they free up,
# so the `slow` tests at the front of the queue are shared out instead of all landing in the first worker's chunk).
PYTEST_ARGS ?= -m "not gpu" --durations=25 -n 2 --maxschedchunk 1

.PHONY: install test demo clean

# Bytecode: pip installs without compiling (byte-compiling every file of torch and transformers is most of a fresh
# install's time on 2 cores), and the test run writes .pyc for what it imports, once: PYTHONDONTWRITEBYTECODE, which
# some CI machines set, is cleared for it (with it set and nothing compiled, every test process would compile torch).
NO_PYC_ENV := PYTHONDONTWRITEBYTECODE=

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU machines: take the local CPU wheel first, or pip resolves a multi-GB CUDA build for torch.
	if ! command -v nvidia-smi >/dev/null 2>&1 && ! $(PY) -c "import torch" 2>/dev/null; then \
		$(PY) -m pip install -q --no-compile torch==2.13.0; fi
	$(PY) -m pip install -q --no-compile -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(NO_PYC_ENV) $(PY) -m pytest -q $(PYTEST_ARGS)

# With a CUDA GPU: the toy whose teacher learns motion (demo.py --large); without: the CPU toy. DEMO_ARGS=--small
# keeps the CPU toy on a GPU machine.
demo: $(VENV)/.installed
	$(NO_PYC_ENV) $(PY) scripts/demo.py $(DEMO_ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache
