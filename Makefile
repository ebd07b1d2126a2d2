# The whole set-up on a fresh Debian 12 machine, as root: `make demo` and `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kpr-installed
PYTEST_ARGS ?=

.PHONY: demo test system venv bench clean-state

system:
	@bash scripts/install-deps.sh

$(STAMP): pyproject.toml
	@test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	@$(PY) -m pip install --quiet --upgrade pip
	@$(PY) -m pip install --quiet -e '.[test,bgp,kubernetes]'
	@# An editable install writes no bytecode, and this machine's shells set PYTHONDONTWRITEBYTECODE:
	@# every start would compile ~50 modules (0.09 s of CPU), which an installed agent never does.
	@$(PY) -m compileall -q core plugins >/dev/null
	@touch $(STAMP)

venv: system $(STAMP)

test: venv
	$(VENV)/bin/pytest $(PYTEST_ARGS)

demo: venv
	@bash scripts/demo.sh

bench: venv
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done
