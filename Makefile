# vlm-budget — `make demo` runs the local stack, `make test` runs every test.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV     := .venv
PY       := $(VENV)/bin/python
WASM     := target/wasm32-wasip1/release/vlm_budget.wasm
TESTDATA := .cache/testdata/usr/share/backgrounds/rhythm.jpg
PYTEST   := $(VENV)/bin/pytest -q -p no:cacheprovider

.PHONY: help toolchain wasm emulator transcoder venv testdata unit lint integration test demo stack clean

help:
	@echo "make demo   - build the filter and run Envoy + local backends, sending sample requests"
	@echo "make test   - unit tests, clippy, and integration tests through the real Envoy"

toolchain:
	@rustup target list --installed | grep -qx wasm32-wasip1 || rustup target add wasm32-wasip1

wasm: toolchain
	cargo build --release --target wasm32-wasip1

# The backend emulator (tools/emulator): encode and PD servers on 127.0.0.1.
emulator:
	cargo build --release -p vlm-emulator

# The offload transcode service (tools/transcoder), for transcode: "offload".
transcoder:
	cargo build --release -p vlm-transcode

venv: $(VENV)/.stamp
$(VENV)/.stamp: tests/requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r tests/requirements.txt
	touch $@

testdata: $(TESTDATA)
$(TESTDATA):
	scripts/fetch-testdata.sh

unit:
	cargo test --workspace

lint: toolchain
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo clippy --release --target wasm32-wasip1 -- -D warnings

integration: wasm emulator transcoder venv testdata
	$(PYTEST) tests/integration

test: unit lint integration validate-deploy gpu-test

# Deploy (deploy/): the module image, and every manifest and Envoy config
# checked (schemas, kustomize, envoy --mode validate; tests/deploy).
.PHONY: oci validate-deploy
oci: wasm
	python3 deploy/oci/build.py

$(VENV)/.deploy-stamp: $(VENV)/.stamp tests/deploy/requirements.txt
	$(VENV)/bin/pip install -q --disable-pip-version-check -r tests/deploy/requirements.txt
	touch $@

validate-deploy: oci venv $(VENV)/.deploy-stamp testdata
	tests/deploy/fetch-tools.sh
	$(PYTEST) tests/deploy

demo: wasm emulator venv testdata
	$(PY) tools/demo.py

# The same stack, left running for other clients until Ctrl-C.
stack: wasm emulator venv testdata
	$(PY) tools/stack.py

clean:
	cargo clean
	rm -rf $(VENV) .cache

# Image-path benchmark: the filter in V8 inside Envoy vs the same core native vs
# Pillow and pyvips, text-only overhead (wrk) and a VM memory soak; writes
# bench/results/image.{md,json}. See bench/README-image.md.
BENCH_REPS ?= 5
BENCH_SOAK ?= 1000

.PHONY: bench-image
bench-image: wasm venv testdata
	$(VENV)/bin/pip install -q --disable-pip-version-check -r bench/requirements.txt
	@command -v wrk >/dev/null || apt-get install -y -qq wrk || { apt-get update -qq && apt-get install -y -qq wrk; }
	cargo build --release --example bench_image
	CARGO_TARGET_DIR=target/null-filter cargo build --release --target wasm32-wasip1 --manifest-path bench/null-filter/Cargo.toml
	$(PY) bench/bench_image.py --native target/release/examples/bench_image --reps $(BENCH_REPS) --soak $(BENCH_SOAK) \
	  --null-wasm target/null-filter/wasm32-wasip1/release/null_filter.wasm

# Head-of-line blocking on one worker (bench/bench_hol.py): text-only latency
# alone, beside a steady 4K image stream shrunk in the filter, and beside the same
# stream offloaded to vlm-transcode; writes bench/results/hol.{md,json}.
HOL_SECONDS ?= 30
HOL_ARGS    ?=
.PHONY: bench-hol
bench-hol: wasm transcoder venv testdata
	$(PY) bench/bench_hol.py --seconds $(HOL_SECONDS) $(HOL_ARGS)

# Fuzzing (not part of `make test`): each cargo-fuzz target of fuzz/ for
# FUZZ_SECONDS, one job, on seeds from fuzz/gen_seeds.py. A failing input is
# left in fuzz/artifacts/<target>/; it belongs in tests/data/fuzz-regressions/.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := request encode_requests prefill pipeline datauri_base64 probe_decode config prometheus offload_answer
CARGO_FUZZ   := .cache/tools/bin/cargo-fuzz
# No leak check: natively jpeg-decoder decodes on worker threads whose
# thread-locals LeakSanitizer reports (on wasm32 it has no threads).
FUZZ_FLAGS   := -max_total_time=$(FUZZ_SECONDS) -malloc_limit_mb=256 -rss_limit_mb=1536 -timeout=10 \
                -detect_leaks=0 -print_final_stats=1

.PHONY: fuzz soak
fuzz: venv
	@rustup toolchain list | grep -q '^nightly' || { echo "make fuzz needs a nightly toolchain: rustup toolchain install nightly"; exit 1; }
	@test -x $(CARGO_FUZZ) || cargo install cargo-fuzz --version 0.13.2 --locked --root .cache/tools
	$(PY) fuzz/gen_seeds.py
	@mkdir -p fuzz/logs; for t in $(FUZZ_TARGETS); do \
	  RUSTUP_TOOLCHAIN=nightly $(CARGO_FUZZ) fuzz run $$t fuzz/corpus/$$t -- $(FUZZ_FLAGS) > fuzz/logs/$$t.log 2>&1 \
	    || { tail -40 fuzz/logs/$$t.log; echo "fuzz: $$t failed; its input is in fuzz/artifacts/$$t/"; exit 1; }; \
	  echo "fuzz $$t: $$(grep -o 'Done [0-9]* runs in [0-9]* second' fuzz/logs/$$t.log), no failure"; \
	done

# Soak (not part of `make test`): SOAK_SECONDS of mixed traffic with aborts and
# faults through Envoy and the emulator (tools/soak.py); bench/README-reliability.md.
SOAK_SECONDS ?= 600
soak: wasm emulator venv
	$(PY) tools/soak.py --seconds $(SOAK_SECONDS) --report bench/results/soak.json

# TTFT under bursty traces: vanilla, static and dynamic through Envoy + the
# filter + the emulated EPD cluster, peaks 4/5/7/10 req/s, seeds 1/2/3
# (tools/bench; about 40 minutes); writes bench/results/emulated/.
# Extra flags: make bench BENCH_ARGS="..." (e.g. --seed 1 for one seed).
BENCH_ARGS ?=
.PHONY: bench
bench: wasm emulator venv testdata
	@test -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf || apt-get install -y -qq fonts-dejavu-core || { apt-get update -qq && apt-get install -y -qq fonts-dejavu-core; }
	cargo build --release -p vlm-bench
	target/release/vlm-bench bench $(BENCH_ARGS)

# The GPU backend (gpu/): its CPU tests with the tiny configuration, in their own virtualenv
# (torch and transformers, pinned in gpu/requirements-cpu.txt). See gpu/README.md.
VENV_GPU := .venv-gpu

.PHONY: gpu-venv gpu-test
gpu-venv: $(VENV_GPU)/.stamp
$(VENV_GPU)/.stamp: gpu/requirements-cpu.txt
	python3 -m venv $(VENV_GPU)
	$(VENV_GPU)/bin/pip install -q --disable-pip-version-check -r gpu/requirements-cpu.txt
	touch $@

gpu-test: gpu-venv
	cd gpu && OMP_NUM_THREADS=1 ../$(VENV_GPU)/bin/python -m pytest -q -p no:cacheprovider tests
