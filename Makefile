# fanstream: every command a developer or CI needs. `make test` is what .ci/run runs.
SHELL := /bin/bash
CARGO ?= cargo
# Programs the tests drive for real; installed from Debian when missing. The tests start their
# own Prometheus on an ephemeral loopback port, so a system one (Debian's package starts a service
# on :9090 where systemd runs) does not interfere. Recommends are skipped: they would add
# prometheus-node-exporter, another service, which no test needs.
TEST_PROGRAMS := ffmpeg ffprobe curl prometheus promtool
APT_PACKAGES := ffmpeg curl prometheus

.PHONY: run build release test deps fuzz-deps fmt fmt-check clippy unit soak fuzz

## make run: build and start the server on its embedded defaults (demo tone on /demo, port 8000).
run:
	$(CARGO) run --release --bin fanstream -- $(ARGS)

build:
	$(CARGO) build --all-targets

release:
	$(CARGO) build --release --bins

## make deps: install what the tests need (Debian packages) when it is missing.
deps: fuzz-deps
	@missing=""; for p in $(TEST_PROGRAMS); do command -v $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing test dependencies (missing:$$missing)"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $(APT_PACKAGES) >/dev/null; \
	fi
	@for p in $(TEST_PROGRAMS); do command -v $$p >/dev/null 2>&1 || { echo "error: $$p is still missing after install"; exit 1; }; done

fmt:
	$(CARGO) fmt --all

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --all-targets -- -D warnings

## make test: install test dependencies, then format check, lints, every test (the soak for 60 s)
## and a short fuzz run of each parser.
test: deps fmt-check clippy
	$(CARGO) test --all-targets
	$(MAKE) fuzz FUZZ_SECONDS=$(TEST_FUZZ_SECONDS)

unit:
	$(CARGO) test --lib

## make soak: the soak run against the real binary (SOAK_SECONDS, default 600); `make test` runs 60 s of it.
SOAK_SECONDS ?= 600
soak:
	SOAK_SECONDS=$(SOAK_SECONDS) $(CARGO) test --release --test soak -- --nocapture

## make fuzz: each cargo-fuzz target for FUZZ_SECONDS, from the committed seeds (fuzz/seeds/);
## new inputs it finds go to target/fuzz-corpus/, a crash to fuzz/artifacts/.
FUZZ_SECONDS ?= 300
TEST_FUZZ_SECONDS ?= 30
FUZZ_TARGETS := request_head chunked config
# cargo fuzz needs nightly-only flags (-Zsanitizer=address); the machine's one toolchain is stable,
# and RUSTC_BOOTSTRAP lets it take them. -a keeps debug assertions (overflow checks) on.
fuzz: fuzz-deps
	@for t in $(FUZZ_TARGETS); do \
	  mkdir -p target/fuzz-corpus/$$t; log=target/fuzz-corpus/$$t.log; \
	  echo "fuzzing $$t for $(FUZZ_SECONDS) s (log: $$log)"; \
	  if RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run --fuzz-dir fuzz -O -a $$t target/fuzz-corpus/$$t fuzz/seeds/$$t \
	       -- -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 >$$log 2>&1; then \
	    grep -E '^Done' $$log; \
	  else \
	    grep -E -A2 'panicked at|ERROR:|SUMMARY|Test unit written' $$log | head -n 30; echo "fuzz target $$t failed: the input is in fuzz/artifacts/$$t/"; exit 1; \
	  fi; \
	done

fuzz-deps:
	@command -v cargo-fuzz >/dev/null 2>&1 || $(CARGO) install cargo-fuzz --version '^0.13' --locked
