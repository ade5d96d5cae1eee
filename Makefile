# One obvious command for each job.
PYTHON ?= python3

.PHONY: test deps bench bench-quick bench-baseline bench-compare lint
BENCH_STORE = file://bench/baseline
GATE ?= min:15%

deps:            ## system and Python packages the tests need (Debian clamav; pip extras)
	scripts/install-test-deps

test: deps       ## the full test suite, both matcher implementations
	$(PYTHON) -m pytest

bench-quick:     ## every benchmark once, small inputs, no timing gate (CI)
	OFFSCAN_BENCH_QUICK=1 $(PYTHON) -m pytest bench --benchmark-disable -q

bench:           ## full benchmark run (minutes); numbers go to bench/RESULTS.md by hand
	$(PYTHON) -m pytest bench --benchmark-only --benchmark-autosave

bench-baseline:  ## record this machine's baseline (commit bench/baseline/ when it changes on purpose)
	$(PYTHON) -m pytest bench --benchmark-only --benchmark-storage=$(BENCH_STORE) --benchmark-save=baseline

bench-compare:   ## the perf regression gate: fail if a benchmark got slower than the baseline by GATE
	$(PYTHON) -m pytest bench --benchmark-only --benchmark-storage=$(BENCH_STORE) \
	  --benchmark-compare --benchmark-compare-fail=$(GATE) --benchmark-group-by=name

lint:
	ruff check src tests bench && mypy
