# The two commands a newcomer needs:  make book  and  make test.
# Both create the local virtual environment (.venv) on first use and install the project into it.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PROFILE ?= demo
STAMP  := $(VENV)/.installed

.PHONY: book test smoke install clean distclean

install: $(STAMP)

# torch is pinned to the CPU wheel on disk first: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

book: $(STAMP)
	$(BIN)/crossmod book --profile $(PROFILE)
	@echo "Book: $(CURDIR)/_build/html/index.html"

smoke: $(STAMP)
	$(BIN)/crossmod book --profile smoke

test: $(STAMP)
	$(BIN)/python -m pytest

# PNGs of the built book's start page and chapter 5 (headless Chromium) in _build/screenshots/;
# run after `make book`. A page not built yet is skipped with a note.
.PHONY: screenshots
screenshots: $(STAMP)
	$(BIN)/python -m crossmod_lib.pipeline screenshots --html _build/html --out _build/screenshots

clean:
	rm -rf _build book/_executed

distclean: clean
	rm -rf $(VENV) runs
