# make demo  - generate the tiny dataset and run notebooks 01..08 on it (offline, CPU)
# make test  - the test suite (includes executing every notebook on the tiny preset)
# make lab   - JupyterLab on notebooks/
# Each target creates .venv on first use and installs the pinned requirements.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lab bench clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m captioning.demo

test: $(STAMP)
	$(PY) -m pytest -q tests

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

bench: $(STAMP)
	$(PY) benchmarks/resize.py
	$(PY) benchmarks/decode.py
	$(PY) benchmarks/decoder_speed.py
	$(PY) benchmarks/train_speed.py

clean:
	rm -rf runs data_dir/tiny models_dir/tiny
