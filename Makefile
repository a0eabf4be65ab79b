# routemilter: `make demo` shows it routing real mail through a real Postfix,
# `make test` runs the linters, then the unit and integration tests. Both install what they need.
PY := .venv/bin/python

.PHONY: deps demo lint test unit integration bench deb clean

deps:
	./scripts/install-deps.sh

demo: deps
	$(PY) integration/demo.py

# Style and types, configured in pyproject.toml ([tool.ruff], [tool.mypy]: strict on the package).
lint: deps
	$(PY) -m ruff check milter tests integration bench
	$(PY) -m mypy

test: deps lint
	$(PY) -m pytest -q -p no:cacheprovider tests integration

unit: deps
	$(PY) -m pytest -q -p no:cacheprovider tests

integration: deps
	$(PY) -m pytest -q -p no:cacheprovider integration

bench: deps
	$(PY) bench/run.py

# A .deb built with Debian's own tools (docs/install.md lists the build packages).
deb:
	./packaging/build-deb.sh

clean:
	rm -rf .venv build dist *.egg-info milter/*.egg-info
