# Two commands a fresh machine needs: `make demo` and `make test`. Both create or refresh the
# virtual environment in .venv first (the install is skipped when pyproject.toml is unchanged).
# .venv is built with $(PYTHON); `make test PYTHON=python3.12` rebuilds it with that version.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
VERSION = import sys; print("%d.%d" % sys.version_info[:2])
PYVER  := $(shell $(PYTHON) -c '$(VERSION)' 2>/dev/null)
# PYTHON named (not this file's default): a .venv of another version is made anew
NAMED  := $(if $(filter file,$(origin PYTHON)),,yes)
ifeq ($(NAMED),yes)
ifneq ($(shell $(PY) -c '$(VERSION)' 2>/dev/null),$(PYVER))
.PHONY: $(STAMP)
endif
endif
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
DEMO_DIR ?= demo

.PHONY: venv test test-all demo clean

venv: $(STAMP)

# A .venv without pip (a failed `python3 -m venv`, e.g. on Debian without python3-venv), or of
# another Python than a named $(PYTHON), is made anew.
$(STAMP): pyproject.toml
	@if ! $(PY) -m pip --version >/dev/null 2>&1 || \
	    { [ "$(NAMED)" = yes ] && [ "$$($(PY) -c '$(VERSION)')" != "$(PYVER)" ]; }; then \
		test -n "$(PYVER)" || { echo "$(PYTHON) does not run: install Python 3.10 or newer, or name it with PYTHON=..."; exit 1; }; \
		rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); \
	fi
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[dev,plot]' $(TORCH_PINS)
	touch $(STAMP)

test: venv
	$(PY) -m pytest -q

test-all: venv
	$(PY) -m pytest -q -m ''

demo: venv
	$(PY) -m cvtcl.demo --out $(DEMO_DIR)

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
