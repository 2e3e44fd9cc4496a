# The two commands of the course: `make tutorial` and `make test`.
# Both create `.venv` and the tiny synthetic city when they are missing.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CITY := data/synthetic_tiny
NOTEBOOKS := $(sort $(wildcard notebooks/*.ipynb))
export MPLBACKEND := Agg

.PHONY: setup city tutorial test unit nbtest lint figures bench clean-city browser-check

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

# Generates the city when it is missing or was made by an older version of the generator.
city: setup
	$(PY) -c "import netvlad_tutorial as nt; nt.ensure_synthetic_city('$(CITY)')"

# Run the whole course on the synthetic city: every notebook executed in place, outputs kept.
tutorial: setup city
	$(PY) -m netvlad_tutorial run-notebooks $(NOTEBOOKS)

# Unit tests, then every notebook through nbval (lax: only `# NBVAL_CHECK_OUTPUT` cells compared).
test: setup city
	$(PY) -m pytest tests -q
	@if [ -n "$(NOTEBOOKS)" ]; then \
	  $(PY) -m pytest -q -p no:cacheprovider --nbval-lax --nbval-current-env \
	    --nbval-sanitize-with notebooks/sanitize.cfg $(NOTEBOOKS); \
	fi

# The course as a student meets it: JupyterLab at the repository root in headless Chromium
# (tests/browser/check_jupyterlab.py; screenshots in build/browser-check/). Installs Debian's
# chromium and a Hangul font when missing (apt, as root).
browser-check: setup city
	@if [ ! -x /usr/bin/chromium ] || ! fc-list ':charset=ac00' 2>/dev/null | grep -q .; then \
	  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y \
	    --no-install-recommends chromium fonts-nanum; \
	fi
	$(PY) tests/browser/check_jupyterlab.py

unit: setup
	$(PY) -m pytest tests -q

lint: setup
	$(VENV)/bin/ruff check .

figures: setup city
	$(PY) -m netvlad_tutorial figures --out figures

bench: setup
	$(PY) benchmarks/mining.py
	$(PY) benchmarks/speed.py --device cpu

clean-city:
	rm -rf $(CITY)
