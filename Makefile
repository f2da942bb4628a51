# Two entry points: `make demo` (the main job end to end) and `make test` (lint, the whole suite, the docs build).
# Both create/update .venv and install what they need (pinned by constraints.txt).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.install-stamp
DEMO_DIR ?= demo

.PHONY: install demo test lint docs docs-check format bench clean

install: $(STAMP)

# The pinned PyTorch is the CUDA build (it runs on CPU): about 7 GB installed, plus the downloaded wheels while pip
# works. A first install checks the free space first, so a full disk fails in a second with the numbers, not
# after minutes of pip with "No space left on device". NEED_GB=0 skips the check. PIP_NO_CACHE_DIR keeps pip from
# holding a second copy of every wheel in its cache (set PIP_NO_CACHE_DIR=0 to keep the cache).
NEED_GB ?= 10
export PIP_NO_CACHE_DIR ?= 1

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if [ "$(NEED_GB)" != 0 ] && ! $(BIN)/python -c "import torch" 2>/dev/null; then \
	  free_kb=$$(df -Pk . | awk 'NR==2 {print $$4}'); \
	  if [ "$$free_kb" -lt $$(( $(NEED_GB) * 1048576 )) ]; then \
	    echo "error: installing needs about $(NEED_GB) GB free on $$(df -P . | awk 'NR==2 {print $$6}'); there are $$(( free_kb / 1048576 )) GB." >&2; \
	    echo "       Free some space (old clones, ~/.cache/pip), or run with NEED_GB=0 to try anyway." >&2; \
	    exit 1; \
	  fi; \
	fi
	$(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt -e ".[dev]"
	@touch $@

demo: install
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh $(DEMO_DIR)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint docs-check
	$(BIN)/python -m pytest

# The documentation site (mkdocs.yml, docs/): docs-check builds it as CI does, failing on a broken link, a page
# missing from the nav or a CLI / config / API reference that fails to generate (into site/); docs serves it with
# live reload at http://127.0.0.1:8000.
docs-check: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(DEMO_DIR) runs .pytest_cache .ruff_cache site
