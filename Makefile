# Kiln: `make demo` and `make test` work from a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.kiln-installed

.PHONY: install browser native demo test test-slow test-all test-fuzz lint bench bench-peers docs clean

install: $(STAMP)

# torch is pinned first: a looser requirement could pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: install native
	$(BIN)/kiln demo

# The C++ gRPC front end of the direct ingress (serving/native/README.md), built against
# Debian's gRPC (installed with apt as the browser is). Without it `kiln serve` answers gRPC
# with grpc.aio in the replica (about twice the replica's CPU a call): when apt or the
# compiler cannot run, one line says so and nothing fails.
NATIVE := serving/native/kiln-grpc-front
native: $(NATIVE)

$(NATIVE): serving/native/grpc_front.cc
	@pkg-config --exists grpc++ protobuf 2>/dev/null && command -v g++ >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; \
	  else SUDO=missing; fi; \
	  if [ "$$SUDO" != missing ] && command -v apt-get >/dev/null 2>&1; then \
	    $$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	      --no-install-recommends g++ pkg-config libgrpc++-dev libprotobuf-dev || true; fi; }
	@if pkg-config --exists grpc++ protobuf 2>/dev/null && command -v g++ >/dev/null 2>&1; then \
	  echo "g++ -O2 $< -> $@"; \
	  g++ -O2 -std=c++17 -Wall -Wextra $< $$(pkg-config --cflags --libs grpc++ protobuf) \
	    -lpthread -o $@.tmp && mv $@.tmp $@ || echo "make native: the gRPC front did not build;" \
	    "kiln serve answers gRPC with grpc.aio"; \
	else echo "make native: no g++ or gRPC's C++ library (apt: libgrpc++-dev); kiln serve" \
	  "answers gRPC with grpc.aio"; fi

# The /ui console tests drive Debian's Chromium headless through Playwright's executable_path:
# pip's playwright carries no browser and `playwright install` is never run, so nothing is
# downloaded outside apt. `sudo -n` fails instead of waiting for a password. When apt cannot
# run, one line says so and the tests go on: the browser tests skip with a reason naming
# `make browser`.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; \
	  else SUDO=missing; fi; \
	  if [ "$$SUDO" != missing ] && command -v apt-get >/dev/null 2>&1 \
	    && $$SUDO apt-get update -q \
	    && $$SUDO env DEBIAN_FRONTEND=noninteractive \
	       apt-get install -y -q --no-install-recommends chromium; then :; \
	  else echo "make browser: could not install chromium with apt (needs apt-get and root or" \
	    "passwordless sudo); the /ui browser tests will skip"; fi; }

# `make test` keeps to about 10 minutes on 2 cores; tests marked `slow` (long acceptance runs,
# the demo in its own process) run in `make test-slow`. CI (.ci/run) runs both.
test: install browser native
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -m "not slow"

test-slow: install browser native
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -m slow

# Every route in /openapi.json fuzzed with 300 examples per operation (`make test` runs 60),
# and the hostile-input table: no 5xx, every answer as the schema says.
test-fuzz: install
	KILN_FUZZ_EXAMPLES=300 $(BIN)/python -m pytest tests/serving/test_fuzz.py tests/serving/test_hostile.py

test-all: install browser native
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python .ci/typecheck_tree.py >/dev/null
	$(BIN)/mypy

bench: install native
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/grad_sync.py
	$(BIN)/python benchmarks/serve_throughput.py
	$(BIN)/python benchmarks/tune_efficiency.py
	$(BIN)/python benchmarks/compression.py
	$(BIN)/python benchmarks/monitoring.py
	$(BIN)/python benchmarks/explain_overhead.py
	$(BIN)/python benchmarks/federated.py

# Kiln against FastAPI+uvicorn, KServe, LitServe, BentoML, MLServer and PyTriton on the same
# cores and models (docs/benchmarks.md). Each peer goes into its own venv under build/peers on
# the first run (several minutes each, a few GB in all); about 25 minutes of measuring after.
# Not in CI and not in `make bench`: run it alone on an idle machine. BENCH_PEERS_ARGS=--quick
# tries it out (2 s per point).
bench-peers: install native
	$(BIN)/python benchmarks/serve_peers.py $(BENCH_PEERS_ARGS)

# The documentation site in ./site: docs/*.md with the CLI, Python and HTTP references generated
# at build time (docs/mkdocs/hooks.py). --strict: a broken link, anchor or missing page fails.
docs: install
	$(BIN)/python -m pip install -q -e '.[docs]'
	$(BIN)/python .ci/typecheck_tree.py >/dev/null
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -f docs/mkdocs/mkdocs.yml

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache site
