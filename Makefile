# metalake: everything installs into .venv from nothing; `make run` and `make test` are enough.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BUF_VERSION := 1.75.0
BUF := .tools/node_modules/.bin/buf
export METALAKE_LISTEN ?= 127.0.0.1:50051

.PHONY: install system-deps run test lint bench accuracy generate check-generated settings-table buf buf-if-npm node-test clean

install: $(VENV)/.installed

# exiftool is the oracle of the extraction tests (they skip, saying so, without it). Chromium
# runs the web console's browser tests (Playwright drives Debian's build; `playwright install`
# is never used). Both come from Debian's packages where we may; elsewhere install
# libimage-exiftool-perl and chromium yourself.
system-deps:
	@command -v exiftool >/dev/null || \
		{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		  apt-get install -y -qq libimage-exiftool-perl >/dev/null; } || \
		echo "exiftool not installed: the tests that compare with it will skip" >&2
	@command -v chromium >/dev/null || \
		{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		  { apt-get install -y -qq chromium >/dev/null 2>&1 || \
		    { apt-get update -qq >/dev/null && apt-get install -y -qq chromium >/dev/null; }; }; } || \
		echo "chromium not installed: the web console's browser tests will skip" >&2

# Reinstall when the dependencies change. The editable install makes code edits live; the
# server extra is what `make run` serves with, dev what the tests and linters need.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[server,dev]'
	touch $@

# The HTTP face and web console are on with `make run` (METALAKE_HTTP_LISTEN=off turns them off).
run: export METALAKE_HTTP_LISTEN ?= 127.0.0.1:8080
run: install
	@case "$$METALAKE_HTTP_LISTEN" in ""|off|0|false|no) ;; \
		*) echo "metalake console: open http://$$METALAKE_HTTP_LISTEN/" ;; esac
	$(VENV)/bin/metalake serve

test: install system-deps buf-if-npm
	$(PY) -m pytest

# Regenerate the checked-in stubs (Python, gRPC and their mypy stubs) from protos/.
generate: install
	$(PY) -m grpc_tools.protoc -Iprotos \
		--plugin=protoc-gen-mypy=$(VENV)/bin/protoc-gen-mypy \
		--plugin=protoc-gen-mypy_grpc=$(VENV)/bin/protoc-gen-mypy_grpc \
		--python_out=. --grpc_python_out=. \
		--mypy_out=. --mypy_grpc_out=. \
		protos/metalake/v1/datalake.proto

# docs/operations.md's settings tables, from the declarations in server/config.py (a test fails
# while they differ).
settings-table: install
	$(PY) scripts/settings-table.py

# Fails when protos/ and the checked-in stubs disagree.
check-generated: generate
	git diff --exit-code -- metalake/v1 || \
		(echo "generated stubs are stale: run 'make generate' and commit" >&2; exit 1)

$(BUF):
	npm install --silent --no-audit --no-fund --prefix .tools @bufbuild/buf@$(BUF_VERSION)

buf: $(BUF)

# The contract tests use buf when it can be installed (npm); without npm they skip, saying so.
buf-if-npm:
	@if command -v npm >/dev/null; then $(MAKE) --no-print-directory $(BUF); \
	else echo "npm not found: the buf contract tests will skip (make lint needs it)" >&2; fi

lint: install $(BUF)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy metalake tests benchmarks examples/metalake-filename
	$(BUF) lint
	BUF=$(BUF) scripts/buf-breaking.sh
	$(MAKE) check-generated

# The TypeScript client's end-to-end tests against a real server (needs Node.js and npm).
node-test: install
	clients/node/run-ci.sh

bench: install
	$(PY) -m benchmarks

# Agreement of the built-in extractors with exiftool on third-party test images, never committed:
# the shared corpus, Pillow's Tests/images (from its sdist on PyPI, the installed version) and
# exiftool's t/images (from Debian's source package; needs deb-src, else set EXIFTOOL_IMAGES).
ACCURACY := .accuracy
EXIFTOOL_IMAGES ?= $(wildcard $(ACCURACY)/Image-ExifTool-*/t/images)
accuracy: install system-deps
	mkdir -p $(ACCURACY)
	@version=$$($(PY) -c 'import PIL; print(PIL.__version__)'); \
	test -d $(ACCURACY)/pillow-$$version || { \
		$(PY) -m pip download --quiet --no-binary :all: --no-deps --dest $(ACCURACY) \
			pillow==$$version && \
		tar xzf $(ACCURACY)/pillow-$$version.tar.gz -C $(ACCURACY) pillow-$$version/Tests/images; }
	@test -n "$(EXIFTOOL_IMAGES)" || (cd $(ACCURACY) && \
		apt-get source --download-only libimage-exiftool-perl >/dev/null 2>&1 && \
		tar xJf libimage-exiftool-perl_*.orig.tar.* --wildcards '*/t/images') || \
		echo "exiftool's test images: no Debian source packages here; set EXIFTOOL_IMAGES" >&2
	$(PY) -m benchmarks.extraction_accuracy corpus --quiet
	$(PY) -m benchmarks.extraction_accuracy pillow $(ACCURACY)/pillow-*/Tests/images --quiet
	@images="$(EXIFTOOL_IMAGES)"; images=$${images:-$$(ls -d $(ACCURACY)/Image-ExifTool-*/t/images 2>/dev/null)}; \
	test -z "$$images" || $(PY) -m benchmarks.extraction_accuracy exiftool $$images --quiet

clean:
	rm -rf $(VENV) .tools build *.egg-info .mypy_cache .ruff_cache .pytest_cache $(ACCURACY) \
		clients/node/node_modules clients/node/dist
