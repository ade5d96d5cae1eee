# One obvious command for each job.
PYTHON ?= python3

.PHONY: test test-pure test-simd deps bench bench-quick bench-baseline bench-compare lint ci fuzz
GATE ?= min:15%
# One perf baseline per kind of machine (CPU model, widest SIMD path, Python): a baseline only
# means something on the machine kind that recorded it.
BASELINES ?= bench/baseline
MACHINE_ID = $(shell $(PYTHON) scripts/bench-machine-id)
# pytest-benchmark warns when machine_info (hostname, clock...) differs; the per-machine
# directory already decides what is comparable, and filterwarnings=error would make the
# warning an INTERNALERROR.
BENCH ?= bench  # what the bench targets run: a directory, a file, or "FILE -k EXPR"
BENCH_WARN = -W "ignore::pytest_benchmark.logger.PytestBenchmarkWarning"

deps:            ## system and Python packages the tests need (Debian clamav; pip extras)
	scripts/install-test-deps

test: deps       ## the full test suite, both matcher implementations
	$(PYTHON) -m pytest

test-pure:       ## the whole suite again on the pure-Python twin (OFFSCAN_NO_EXTENSIONS=1)
	OFFSCAN_NO_EXTENSIONS=1 $(PYTHON) -m pytest -q

test-simd:       ## the native-vs-twin tests with each SIMD path this CPU has as the default (none, avx2, avx512)
	@for simd in $$($(PYTHON) -c "import offscan._match_c as m; print(*m.SIMD_AVAILABLE)"); do \
	  echo "== OFFSCAN_SIMD=$$simd"; \
	  OFFSCAN_SIMD=$$simd $(PYTHON) -m pytest -q tests/test_twin.py tests/test_engine.py || exit 1; \
	done

FUZZ_EXAMPLES ?= 5000
fuzz:            ## the fuzz suites for longer (CI runs them bounded): FUZZ_EXAMPLES=N per property
	OFFSCAN_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PYTHON) -m pytest -q tests/test_fuzz*.py tests/test_signatures_fuzz.py

lint:            ## ruff (check + format) and mypy, zero errors
	ruff check src tests bench scripts/bench-machine-id
	ruff format --check src tests bench
	mypy

bench-quick:     ## every benchmark once, small inputs, no timing gate (CI)
	OFFSCAN_BENCH_QUICK=1 $(PYTHON) -m pytest bench --benchmark-disable -q

bench:           ## full benchmark run (minutes); numbers go to bench/RESULTS.md by hand
	$(PYTHON) -m pytest bench --benchmark-only --benchmark-autosave

bench-baseline:  ## record this machine's baseline (commit bench/baseline/<machine>/ when it changes on purpose)
	$(PYTHON) -m pytest $(BENCH) --benchmark-only $(BENCH_WARN) \
	  --benchmark-storage=file://$(BASELINES)/$(MACHINE_ID) --benchmark-save=baseline

bench-compare:   ## the perf regression gate: fail if a benchmark got slower than this machine's baseline by GATE
	@if [ ! -d "$(BASELINES)/$(MACHINE_ID)" ]; then \
	  echo "bench-compare: no baseline for this machine ($(MACHINE_ID)) in $(BASELINES)/;" >&2; \
	  echo "  record one with 'make bench-baseline' on a quiet machine, then rerun (known: $$(ls $(BASELINES) 2>/dev/null | tr '\n' ' '))" >&2; \
	  exit 2; fi
	$(PYTHON) -m pytest $(BENCH) --benchmark-only $(BENCH_WARN) \
	  --benchmark-storage=file://$(BASELINES)/$(MACHINE_ID) \
	  --benchmark-compare --benchmark-compare-fail=$(GATE) --benchmark-group-by=name
