# The two commands a newcomer runs: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install system-deps test demo stack bench clean

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

test: install system-deps
	$(PY) -m pytest -q -ra

demo: install
	$(VENV)/bin/numwatch demo

# Collector, Prometheus and Alertmanager from installed binaries with deploy/'s configs (no Docker).
stack: install system-deps
	$(VENV)/bin/numwatch stack

bench: install
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/ingest.py

clean:
	rm -rf $(VENV) .pytest_cache
