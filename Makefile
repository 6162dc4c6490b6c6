# `make demo` and `make test` set up .venv themselves on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= all
EDGE3DFA_ASSETS ?= $(abspath ../shared/assets)
export EDGE3DFA_ASSETS
PYTEST_ARGS ?=

.PHONY: demo test test-fast lint bench pi-check clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

# landmarks + pose for the example photos, then mb05 to every installed format, validated, with a report
demo: $(VENV)/.installed
	$(VENV)/bin/edge3dfa run $(EDGE3DFA_ASSETS)/upstream/3ddfa_v2/examples/inputs --out-dir out/demo
	$(VENV)/bin/edge3dfa export --model mb05 --out out/demo/export
	@echo "report: out/demo/export/mb05/report.html"

test: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_ARGS)

# the edit loop: everything but the tests marked slow (conversions with a real framework, full-dataset runs)
test-fast: $(VENV)/.installed
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

bench: $(VENV)/.installed
	$(PY) benchmarks/runtime_speed.py

# arm64 end-to-end check under qemu-user emulation (needs root; not part of make test): README "Raspberry Pi check"
pi-check: $(VENV)/.installed
	VENV=$(VENV) scripts/pi-check.sh

clean:
	rm -rf out .pytest_cache
