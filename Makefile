# One obvious command for each job.
PYTHON ?= python3

.PHONY: test deps bench bench-quick lint

deps:            ## system and Python packages the tests need (Debian clamav, redis; pip extras)
	scripts/install-test-deps

test: deps       ## the full test suite, both matcher implementations
	$(PYTHON) -m pytest

bench-quick:     ## every benchmark once, small inputs, no timing gate (CI)
	OFFSCAN_BENCH_QUICK=1 $(PYTHON) -m pytest bench --benchmark-disable -q

bench:           ## full benchmark run (minutes); numbers go to bench/RESULTS.md by hand
	$(PYTHON) -m pytest bench --benchmark-only --benchmark-autosave

lint:
	ruff check src tests bench && mypy
