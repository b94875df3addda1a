# make demo  - generate the tiny dataset and run notebooks 01..08 on it (offline, CPU)
# make further - notebook 09 on (attention on the relations world), after the chapter's: runs/further/
# make test  - ruff and mypy, then the test suite (includes executing every notebook on the tiny preset); CI runs this
# make test-fast - ruff and mypy, then the tests not marked slow (no notebooks, torchrun or multi-process runs):
#              the inner loop while editing, under 2 minutes on 2 cores; `make test` before pushing
# make lab   - JupyterLab on notebooks/ (works as root and headless; LAB_ARGS="--ip=0.0.0.0 --port=8889" passes options)
# make tensorboard - TensorBoard on models_dir/ (training's event files; TB_ARGS="--port 6007 --bind_all" passes options)
# Each target creates .venv on first use and installs the pinned requirements.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo further test test-fast lab tensorboard bench clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m captioning.demo

further: $(STAMP)
	$(PY) -m captioning.demo --further

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -m "not slow" tests

# As root (Docker) jupyter refuses to start without --allow-root; with no display (a server over
# SSH) it must not try to open a browser. It prints the URL with its token either way.
LAB_ARGS ?=
lab: $(STAMP)
	@flags=""; \
	if [ "$$(id -u)" = "0" ]; then flags="$$flags --allow-root"; fi; \
	if [ -n "$$SSH_CONNECTION" ] || { [ "$$(uname)" != "Darwin" ] && [ -z "$$DISPLAY$$WAYLAND_DISPLAY" ]; }; then \
		flags="$$flags --no-browser"; \
		port=$$(echo "$(LAB_ARGS)" | sed -n 's/.*--port[= ]*\([0-9][0-9]*\).*/\1/p'); port=$${port:-8888}; \
		echo "No display here: open the URL printed below. From a laptop, forward its port first:"; \
		echo "    ssh -L $$port:localhost:$$port $${USER:-you}@$$(hostname)"; \
	fi; \
	exec $(VENV)/bin/jupyter lab notebooks/ $$flags $(LAB_ARGS)

# TensorBoard never opens a browser and runs as root too; it listens on localhost unless TB_ARGS says
# --bind_all. It prints its URL; without a display, the port-forward to use from a laptop comes first.
TB_ARGS ?=
TB_LOGDIR ?= models_dir
tensorboard: $(STAMP)
	@port=$$(echo "$(TB_ARGS)" | sed -n 's/.*--port[= ]*\([0-9][0-9]*\).*/\1/p'); port=$${port:-6006}; \
	if [ -n "$$SSH_CONNECTION" ] || { [ "$$(uname)" != "Darwin" ] && [ -z "$$DISPLAY$$WAYLAND_DISPLAY" ]; }; then \
		echo "No display here: open the URL printed below. From a laptop, forward its port first:"; \
		echo "    ssh -L $$port:localhost:$$port $${USER:-you}@$$(hostname)"; \
	fi; \
	exec $(VENV)/bin/tensorboard --logdir $(TB_LOGDIR) --port $$port $(TB_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/resize.py
	$(PY) benchmarks/decode.py
	$(PY) benchmarks/decoder_speed.py
	$(PY) benchmarks/train_speed.py

clean:
	rm -rf runs data_dir/tiny models_dir/tiny
