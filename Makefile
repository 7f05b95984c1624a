# The two commands a newcomer needs:  make book  and  make test.
# Both create the local virtual environment (.venv) on first use and install the project into it.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PROFILE ?= demo
STAMP  := $(VENV)/.installed

.PHONY: book test smoke install clean distclean check-dicom full-tiny

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

# The full profile's code path on the CPU (paper networks, 1 mm pixels, 256 x 256 crops) on a tiny
# phantom cohort with a handful of iterations, every notebook executed: the GPU run of `full` can then
# only fail for GPU reasons. Not part of make test (12 min on 2 AVX2 cores, every notebook executed).
full-tiny: $(STAMP)
	rm -rf runs/full-tiny
	$(BIN)/crossmod run --profile full-tiny --run-dir runs/full-tiny

# The DICOM outputs of crossmod predict (RTSTRUCT, SEG) through the DICOM validator dciodvfy and
# read back by a second library (highdicom, pydicom + matplotlib). make test skips the validator
# where it is not installed; this target needs it: apt-get install dicom3tools
check-dicom: $(STAMP)
	@command -v dciodvfy >/dev/null || { echo "dciodvfy not found: apt-get install dicom3tools"; exit 2; }
	$(BIN)/python -m pytest -q -rs tests/test_segmentation.py -k "read_back or validator"

# PNGs of the built book's start page and chapter 5 (headless Chromium) in _build/screenshots/;
# run after `make book`. A page not built yet is skipped with a note.
.PHONY: screenshots
screenshots: $(STAMP)
	$(BIN)/python -m crossmod_lib.pipeline screenshots --html _build/html --out _build/screenshots

clean:
	rm -rf _build book/_executed

distclean: clean
	rm -rf $(VENV) runs
