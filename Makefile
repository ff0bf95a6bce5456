# fanstream: every command a developer or CI needs. `make test` is what .ci/run runs.
SHELL := /bin/bash
CARGO ?= cargo
# Programs the tests drive for real; installed from Debian when missing. The tests start their
# own Prometheus on an ephemeral loopback port, so a system one (Debian's package starts a service
# on :9090 where systemd runs) does not interfere. Recommends are skipped: they would add
# prometheus-node-exporter, another service, which no test needs.
TEST_PROGRAMS := ffmpeg ffprobe curl prometheus promtool
APT_PACKAGES := ffmpeg curl prometheus

.PHONY: run build release test deps fmt fmt-check clippy unit

## make run: build and start the server on its embedded defaults (demo tone on /demo, port 8000).
run:
	$(CARGO) run --release --bin fanstream -- $(ARGS)

build:
	$(CARGO) build --all-targets

release:
	$(CARGO) build --release --bins

## make deps: install what the tests need (Debian packages) when it is missing.
deps:
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

## make test: install test dependencies, then format check, lints and every test.
test: deps fmt-check clippy
	$(CARGO) test --all-targets

unit:
	$(CARGO) test --lib
