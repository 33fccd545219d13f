# tuneloop: `make demo` runs the whole loop, `make test` the tests. Both set up first.
SHELL := /bin/bash
PY := .venv/bin/python
export PATH := $(CURDIR)/.tools/bin:$(CURDIR)/.venv/bin:$(PATH)
# Keep model caches and temp files inside the project.
export HF_HOME := $(CURDIR)/.tuneloop/cache/hf
export HF_HUB_OFFLINE := 1
export VLLM_CACHE_ROOT := $(CURDIR)/.tuneloop/cache/vllm
# What `make demo` teaches: tldr (a format) or concise (a natural preference).
BEHAVIOUR ?= tldr


.PHONY: setup proto docs chart-schema test test-heavy drill demo bench clean

setup:
	@scripts/setup.sh

proto: setup
	$(PY) scripts/gen_proto.py

docs: setup
	$(PY) scripts/gen_config_docs.py

chart-schema: setup
	$(PY) scripts/gen_chart_schema.py

test: setup
	$(PY) -m pytest -q

test-heavy: setup
	$(PY) -m pytest -q -m heavy

drill: setup
	$(PY) -m pytest -q -m heavy tests/release/test_drills.py

demo: setup
	.venv/bin/tuneloop demo --behaviour $(BEHAVIOUR)

bench: setup
	$(PY) bench/run_all.py

clean:
	rm -rf .tuneloop/run .tuneloop/demo
