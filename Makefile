# vlm-budget — `make demo` runs the local stack, `make test` runs every test.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV     := .venv
PY       := $(VENV)/bin/python
WASM     := target/wasm32-wasip1/release/vlm_budget.wasm
TESTDATA := .cache/testdata/usr/share/backgrounds/rhythm.jpg
PYTEST   := $(VENV)/bin/pytest -q -p no:cacheprovider

.PHONY: help toolchain wasm emulator venv testdata unit lint integration test demo clean

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

integration: wasm emulator venv testdata
	$(PYTEST) tests/integration

test: unit lint integration validate-deploy

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
