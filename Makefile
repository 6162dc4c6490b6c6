# `make demo` and `make test` set up .venv themselves on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= all
EDGE3DFA_ASSETS ?= $(abspath ../shared/assets)
export EDGE3DFA_ASSETS
PYTEST_ARGS ?=

.PHONY: setup demo demo-full test test-fast readme-check lint bench pi-check clean wheel

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

# the environment remembers where the data is, so `edge3dfa` finds it without make or EDGE3DFA_ASSETS
# (edge3dfa/assets.py: search order); rewritten on every make, written under a temp name then renamed
setup: $(VENV)/.installed
	@mkdir -p $(VENV)/etc/edge3dfa
	@printf '%s\n' "$(EDGE3DFA_ASSETS)" > $(VENV)/etc/edge3dfa/.assets.tmp
	@mv -f $(VENV)/etc/edge3dfa/.assets.tmp $(VENV)/etc/edge3dfa/assets

# landmarks + pose for the example photos, then mb05 to every installed format at fp32 and int8, validated and
# gated, with a report: the first run (export --quick: README "A first run"); demo-full is the whole export
DEMO_EXPORT ?= --quick
demo: setup
	$(VENV)/bin/edge3dfa run $(EDGE3DFA_ASSETS)/upstream/3ddfa_v2/examples/inputs --out-dir out/demo
	$(VENV)/bin/edge3dfa export --model mb05 --out out/demo/export $(DEMO_EXPORT)
	@echo "report: out/demo/export/mb05/report.html"

demo-full:
	$(MAKE) demo DEMO_EXPORT=

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# the edit loop: everything but the tests marked slow (conversions with a real framework, full-dataset runs)
test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# every command of README.md as typed, the ones marked slow too (tests/test_readme.py; make test runs the others)
readme-check: setup
	EDGE3DFA_README_ALL=1 $(PY) -m pytest tests/test_readme.py -ra $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

bench: $(VENV)/.installed
	$(PY) benchmarks/runtime_speed.py

# arm64 end-to-end check under qemu-user emulation, params artifacts and phone bundles (needs root; not part of
# make test): README "Raspberry Pi check"
pi-check: $(VENV)/.installed
	VENV=$(VENV) scripts/pi-check.sh

clean:
	rm -rf out .pytest_cache

# a wheel and an sdist as a user installs them (e.g. on a Pi: pip install "dist/edge3dfa-*.whl[pi]"), checked by twine
wheel: $(VENV)/.installed
	rm -rf dist
	$(PY) -m build --outdir dist .
	$(PY) -m twine check --strict dist/*
