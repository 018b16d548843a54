# The two commands a newcomer runs: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install system-deps lint test docs demo stack bench vendor-uplot clean

$(STAMP): pyproject.toml requirements-dev.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

# Prometheus, promtool, Alertmanager and amtool, Chromium and its driver (the web view's browser
# tests) from Debian's packages (needs root); PostgreSQL 15's server binaries are expected on the machine.
system-deps:
	@if command -v promtool >/dev/null && command -v prometheus-alertmanager >/dev/null && command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq prometheus prometheus-alertmanager chromium chromium-driver >/dev/null; \
	else echo "note: prometheus/alertmanager/chromium not installed and not root: tests that need them will skip"; fi

# mypy and import-linter read numwatch from folders, as one tree: build/lint/numwatch is hooks/ with
# monitor/ inside, made of links (setuptools maps the two folders; these tools cannot follow that).
LINT_TREE := build/lint
lint: install
	rm -rf $(LINT_TREE) && mkdir -p $(LINT_TREE)/numwatch
	ln -s $(CURDIR)/hooks/* $(LINT_TREE)/numwatch/ && ln -s $(CURDIR)/monitor $(LINT_TREE)/numwatch/monitor
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	PYTHONPATH=$(LINT_TREE) $(VENV)/bin/lint-imports

test: install system-deps lint
	$(MAKE) --no-print-directory docs
	$(PY) -m pytest -q -ra

# The documentation site, strict: a broken link or a page missing from the nav fails the build.
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -d site

demo: install
	$(VENV)/bin/numwatch demo

# Collector, Prometheus and Alertmanager from installed binaries with deploy/'s configs (no Docker).
stack: install system-deps
	$(VENV)/bin/numwatch stack

bench: install
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/ingest.py
	$(PY) benchmarks/web.py

# Fetch the pinned uPlot release again (needs npm): the built files and the licence, then checksums.
UPLOT_VERSION := 1.6.32
VENDOR := monitor/web/static/vendor
vendor-uplot:
	rm -rf .vendor-tmp && mkdir .vendor-tmp
	cd .vendor-tmp && npm pack -q uplot@$(UPLOT_VERSION) && tar xzf uplot-$(UPLOT_VERSION).tgz
	cp .vendor-tmp/package/dist/uPlot.iife.min.js .vendor-tmp/package/dist/uPlot.min.css $(VENDOR)/
	cp .vendor-tmp/package/LICENSE $(VENDOR)/uPlot.LICENSE
	rm -rf .vendor-tmp
	$(PY) -c "import hashlib, json, pathlib; p = pathlib.Path('$(VENDOR)'); doc = json.loads((p / 'vendor.json').read_text()); \
	doc['version'] = '$(UPLOT_VERSION)'; doc['sha256'] = {f: hashlib.sha256((p / f).read_bytes()).hexdigest() for f in doc['sha256']}; \
	(p / 'vendor.json').write_text(json.dumps(doc, indent=2) + '\n')"

clean:
	rm -rf $(VENV) .pytest_cache
