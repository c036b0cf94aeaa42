# Quick start:  make run   (set up, then the main job on the embedded digits data)
#               make test  (set up, then the whole test suite)
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
FASHION_DIR := /usr/share/datasets/fashion-mnist

.PHONY: setup datasets run test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# Fashion-MNIST IDX files from Debian's dataset-fashion-mnist package (the
# tests' medium-size real dataset) and the quotations of Debian's fortunes
# package (the real text corpus "fortunes"); the tests that need them skip,
# saying why, if they are absent.
datasets:
	@if [ ! -d $(FASHION_DIR) ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	  else echo "note: install Debian's dataset-fashion-mnist for the Fashion-MNIST tests"; fi; \
	fi
	@if [ ! -d /usr/share/games/fortunes ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && apt-get install -y -qq fortunes; \
	  else echo "note: install Debian's fortunes for the text-corpus tests"; fi; \
	fi

run: setup
	$(PY) -m jaxrep.simulate --out runs/default

test: setup datasets
	$(PY) -m pytest -p no:cacheprovider -n 2

clean:
	rm -rf $(VENV) runs .pytest_cache
