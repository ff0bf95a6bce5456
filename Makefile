# fanstream: every command a developer or CI needs. `make test` is what .ci/run runs.
SHELL := /bin/bash
CARGO ?= cargo
# Programs the tests drive for real; installed from Debian when missing. The tests start their
# own Prometheus on an ephemeral loopback port, so a system one (Debian's package starts a service
# on :9090 where systemd runs) does not interfere. Recommends are skipped: they would add
# prometheus-node-exporter, another service, which no test needs. The real clients of the formats
# and titles tests (tests/formats.rs, titles.rs, browser.rs): libshout encoders (ezstream, ices2,
# GStreamer's shout2send), liquidsoap, players (mpv, GStreamer's souphttpsrc and decoders) and a
# headless browser. Chromium runs as root with --no-sandbox, so its recommended chromium-sandbox
# is not needed either.
# The package test (tests/package.rs) builds the Debian package and checks it with Debian's own
# tools: lintian, dpkg-shlibdeps (dpkg-dev; cargo-deb computes Depends with it), adduser (the
# package's postinst), systemd-analyze (the package `systemd`: its tools only; nothing here makes
# it the container's init), logrotate and man (man-db, to render the manual page).
# tests/admin_api.rs compares the admin API with Debian's Icecast 2.4 (icecast2), which it starts
# itself on an ephemeral loopback port; where an init system runs, the package's own service
# listens on :8000 and must be stopped before `make run`.
# tests/hls.rs puts nginx (nginx-light: the proxy and its cache are all it needs) in front of
# fanstream as an HLS cache, started by the test with its own config on a loopback port.
TEST_PROGRAMS := ffmpeg ffprobe curl prometheus promtool ezstream ices2 liquidsoap mpv \
  gst-launch-1.0 gst-inspect-1.0 chromium timeout lintian dpkg-shlibdeps adduser systemd-analyze \
  logrotate man icecast2 haproxy nginx cvlc runuser openssl
APT_PACKAGES := ffmpeg curl prometheus ezstream ices2 liquidsoap mpv gstreamer1.0-tools \
  gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad chromium coreutils \
  lintian dpkg-dev adduser systemd logrotate man-db icecast2 haproxy nginx-light vlc-bin \
  vlc-plugin-base util-linux openssl
# GStreamer elements the tests use, which come in plugin packages rather than as programs.
TEST_GST_ELEMENTS := souphttpsrc decodebin oggdemux matroskademux opusdec vorbisdec mpegaudioparse identity

.PHONY: run build release deb man install deb-deps test deps fuzz-deps fmt fmt-check clippy unit soak fuzz load sweep many-mounts compare coalescing icy-compare tls-compare tree hls-load bench icecast fonts

# Load runs (make load / sweep / many-mounts / compare / coalescing / icy-compare / tls-compare / tree): see README, "Performance".
CLIENTS ?= 1000
BITRATE_KBPS ?= 128
SECONDS ?= 30
WORKERS ?= 0
# Mounts, one source each, the listeners spread over them: one count for load, coalescing and
# icy-compare; for sweep and compare a list, run at each count (MOUNTS=1,100,1000).
MOUNTS ?= 1
# Extra flags for fanstream-load, e.g. LOAD_FLAGS="--min-write-bytes 8192 --max-write-delay-ms 100".
LOAD_FLAGS ?=
COUNTS ?= 100,1000,5000,10000,19000
BITRATES ?= 128,2000
SWEEP_SECONDS ?= 20
LOAD_BIN := target/release/fanstream-load
RESULTS := docs/performance

## make run: build and start the server on its embedded defaults (demo tone on /demo, port 8000).
run:
	$(CARGO) run --release --bin fanstream -- $(ARGS)

# At the root cargo acts on the server (the root package) alone: --workspace adds the load tool
# (tools/fanstream-load).
build:
	$(CARGO) build --workspace --all-targets

release:
	$(CARGO) build --release --workspace --bins

## make deb: the Debian package, target/debian/fanstream_VERSION-1_ARCH.deb (README, "Install as
## a service"); its contents are listed in Cargo.toml, [package.metadata.deb].
deb: man deb-deps
	$(CARGO) deb --no-build --strip --profile $(DEB_PROFILE)

# The profile `make deb` and `make install` build: release. The package test (tests/package.rs)
# uses DEB_PROFILE=dev, the profile `cargo test` has just built: a release build of its own took
# 5 of make test's minutes on 2 cores (3 of them jemalloc's C build, which no other profile's
# build can share), and what the test checks (the package's files, Debian's tools, installing,
# serving, purging) is the same either way. cargo-deb warns that it is meant for releases.
DEB_PROFILE ?= release
DEB_BIN := target/$(if $(filter dev,$(DEB_PROFILE)),debug,$(DEB_PROFILE))/fanstream

# The binary, and the manual page it renders from its flags and the README.
MAN_PAGE := target/man/fanstream.8.gz
man:
	$(CARGO) build --profile $(DEB_PROFILE) --bin fanstream
	mkdir -p $(dir $(MAN_PAGE))
	set -o pipefail; $(DEB_BIN) --man | gzip -9n >$(MAN_PAGE)

## make install: the package's files under PREFIX (the config under SYSCONFDIR), for hosts
## without dpkg; DESTDIR stages them. An existing config is left as it is.
PREFIX ?= /usr/local
SYSCONFDIR ?= $(PREFIX)/etc
install: man
	install -D -s -m 755 $(DEB_BIN) $(DESTDIR)$(PREFIX)/bin/fanstream
	install -D -m 644 $(MAN_PAGE) $(DESTDIR)$(PREFIX)/share/man/man8/fanstream.8.gz
	install -D -m 644 -t $(DESTDIR)$(PREFIX)/share/doc/fanstream README.md LICENSE
	install -D -m 644 packaging/fanstream.logrotate $(DESTDIR)$(SYSCONFDIR)/logrotate.d/fanstream
	[ -e $(DESTDIR)$(SYSCONFDIR)/fanstream/fanstream.toml ] || \
	  install -D -m 644 packaging/fanstream.toml $(DESTDIR)$(SYSCONFDIR)/fanstream/fanstream.toml
	install -d $(DESTDIR)$(PREFIX)/lib/systemd/system
	sed -e 's|/usr/bin/fanstream|$(PREFIX)/bin/fanstream|g' -e 's|/etc/fanstream|$(SYSCONFDIR)/fanstream|g' \
	  packaging/fanstream.service >$(DESTDIR)$(PREFIX)/lib/systemd/system/fanstream.service

# cargo-deb and cargo-fuzz are built without optimisation (--debug): packaging and driving the
# fuzzer take as long either way (3.8 s for the package with each), and the build is about half.
# cargo-deb's version is the one tested: it only warns when given the dev profile (see above).
deb-deps:
	@command -v cargo-deb >/dev/null 2>&1 || $(CARGO) install cargo-deb --version '=3.8.0' --locked --debug

## make deps: install what the tests need (Debian packages) when it is missing.
deps: fuzz-deps deb-deps
	@missing=""; for p in $(TEST_PROGRAMS); do command -v $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	for e in $(TEST_GST_ELEMENTS); do gst-inspect-1.0 $$e >/dev/null 2>&1 || missing="$$missing gst:$$e"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing test dependencies (missing:$$missing)"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $(APT_PACKAGES) >/dev/null; \
	fi
	@for p in $(TEST_PROGRAMS); do command -v $$p >/dev/null 2>&1 || { echo "error: $$p is still missing after install"; exit 1; }; done
	@for e in $(TEST_GST_ELEMENTS); do gst-inspect-1.0 $$e >/dev/null 2>&1 || { echo "error: GStreamer element $$e is still missing after install"; exit 1; }; done

fmt:
	$(CARGO) fmt --all

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## make test: install test dependencies, then format check, lints, every test (the soak for 60 s)
## and a short fuzz run of each parser.
test: deps fmt-check clippy
	$(CARGO) test --workspace --all-targets
	$(MAKE) fuzz FUZZ_SECONDS=$(TEST_FUZZ_SECONDS) FUZZ_BUILD="$(TEST_FUZZ_BUILD)"

unit:
	$(CARGO) test -p fanstream --lib

## make load: one load run (CLIENTS, BITRATE_KBPS, SECONDS, WORKERS, MOUNTS); summary in target/load/.
load: release
	$(LOAD_BIN) run --clients $(CLIENTS) --bitrate-kbps $(BITRATE_KBPS) --seconds $(SECONDS) \
	  --workers $(WORKERS) --mounts $(MOUNTS) $(LOAD_FLAGS)

## make sweep: runs at COUNTS listeners, BITRATES and MOUNTS, table and charts into target/load/
## and docs/.
SWEEP_FILES := sweep.md sweep.json $(foreach c,sweep-cpu sweep-memory sweep-mounts-cpu sweep-mounts-memory,$(c).png $(c).svg)
sweep: release fonts
	$(LOAD_BIN) sweep --counts $(COUNTS) --bitrates $(BITRATES) --seconds $(SWEEP_SECONDS) \
	  --workers $(WORKERS) --mounts $(MOUNTS) $(LOAD_FLAGS)
	mkdir -p $(RESULTS)
	cp $(addprefix target/load/,$(SWEEP_FILES)) $(RESULTS)/

## make many-mounts: CLIENTS listeners on each of MANY_MOUNTS counts of mounts, ROUNDS times in
## alternating order; CPU per listener-second (whole server and workers) against the first count.
MANY_MOUNTS ?= 1,1000
ROUNDS ?= 5
MANY_MOUNTS_STEM = mounts-$(CLIENTS)c-$(BITRATE_KBPS)k-$(subst $(comma),-,$(MANY_MOUNTS))
many-mounts: release
	$(LOAD_BIN) mounts --clients $(CLIENTS) --bitrate-kbps $(BITRATE_KBPS) --seconds $(SECONDS) \
	  --workers $(WORKERS) --mounts $(MANY_MOUNTS) --rounds $(ROUNDS) $(LOAD_FLAGS)
	mkdir -p $(RESULTS)
	cp target/load/$(MANY_MOUNTS_STEM).md target/load/$(MANY_MOUNTS_STEM).json $(RESULTS)/

## make compare: the same load against Icecast 2.4 and fanstream, side by side, at each of MOUNTS.
# The tool names the table after the mount counts unless it is the one mount of old:
# compare-1000c-128k.md, compare-1000c-128k-mounts-1-100-1000.md.
comma := ,
COMPARE_STEM := compare-$(CLIENTS)c-$(BITRATE_KBPS)k$(if $(filter-out 1,$(MOUNTS)),-mounts-$(subst $(comma),-,$(MOUNTS)))
compare: release icecast
	$(LOAD_BIN) compare --clients $(CLIENTS) --bitrate-kbps $(BITRATE_KBPS) --seconds $(SECONDS) \
	  --workers $(WORKERS) --mounts $(MOUNTS) $(LOAD_FLAGS)
	mkdir -p $(RESULTS)
	cp target/load/$(COMPARE_STEM).md target/load/$(COMPARE_STEM).json $(RESULTS)/

## make coalescing: fanstream at several write coalescing settings (PAIRS of bytes:ms), one table.
PAIRS ?= 4096:0,4096:200,16384:500,65536:500,65536:1000
coalescing: release
	$(LOAD_BIN) coalesce --pairs $(PAIRS) --clients $(CLIENTS) --bitrate-kbps $(BITRATE_KBPS) \
	  --seconds $(SECONDS) --workers $(WORKERS) --mounts $(MOUNTS) $(LOAD_FLAGS)
	mkdir -p $(RESULTS)
	cp target/load/coalescing-$(CLIENTS)c-$(BITRATE_KBPS)k.md $(RESULTS)/

## make icy-compare: the same load twice, all plain then all ICY listeners (titles every TITLE_EVERY_SECS), one table.
TITLE_EVERY_SECS ?= 5
icy-compare: release
	$(LOAD_BIN) icy-compare --clients $(CLIENTS) --bitrate-kbps $(BITRATE_KBPS) --seconds $(SECONDS) \
	  --workers $(WORKERS) --mounts $(MOUNTS) --title-every-secs $(TITLE_EVERY_SECS) $(LOAD_FLAGS)
	mkdir -p $(RESULTS)
	cp target/load/icy-$(CLIENTS)c-$(BITRATE_KBPS)k.md target/load/icy-$(CLIENTS)c-$(BITRATE_KBPS)k.json $(RESULTS)/

## make tls-compare: the same load twice, all plain then all TLS listeners, one table.
tls-compare: release
	$(LOAD_BIN) tls-compare --clients $(CLIENTS) --bitrate-kbps $(BITRATE_KBPS) --seconds $(SECONDS) \
	  --workers $(WORKERS) --mounts $(MOUNTS) $(LOAD_FLAGS)
	mkdir -p $(RESULTS)
	cp target/load/tls-$(CLIENTS)c-$(BITRATE_KBPS)k.md target/load/tls-$(CLIENTS)c-$(BITRATE_KBPS)k.json $(RESULTS)/

## make tree: a two-tier tree, an origin and EDGES edges relaying each mount from it, the
## listeners split over the edges: CPU per listener-second and RSS per tier, one table.
# Two hops of write coalescing (a second each by default) are in flight at the window's end,
# hence the longer allowance.
EDGES ?= 2
TREE_STEM := tree-$(CLIENTS)c-$(BITRATE_KBPS)k
tree: release
	$(LOAD_BIN) run --edges $(EDGES) --name $(TREE_STEM) --allowance-ms 3000 --clients $(CLIENTS) \
	  --bitrate-kbps $(BITRATE_KBPS) --seconds $(SECONDS) --workers $(WORKERS) --mounts $(MOUNTS) $(LOAD_FLAGS)
	mkdir -p $(RESULTS)
	cp target/load/$(TREE_STEM).md target/load/$(TREE_STEM).json $(RESULTS)/

## make hls-load: CLIENTS HLS clients (verifying every segment) through nginx with proxy_cache,
## failing unless fanstream answered about one request per segment; then as many polling
## fanstream directly, beside as many direct listeners: fanstream's CPU in both, as a ratio
## (README, "HLS and CDNs"). Needs nginx (Debian's nginx-light).
hls-load: release
	$(LOAD_BIN) hls --clients $(CLIENTS) --seconds $(SECONDS) --workers $(WORKERS) --via nginx
	$(LOAD_BIN) hls --clients $(CLIENTS) --seconds $(SECONDS) --workers $(WORKERS) --via direct \
	  --compare-direct
	mkdir -p $(RESULTS)
	cp target/load/hls-$(CLIENTS)c-nginx/summary.json $(RESULTS)/hls-$(CLIENTS)c-nginx.json
	cp target/load/hls-$(CLIENTS)c-direct/summary.json $(RESULTS)/hls-$(CLIENTS)c-direct.json

## make bench: criterion benches (store, fan-out, request parsing).
bench:
	$(CARGO) bench -p fanstream --benches

# Debian packages the load targets need, installed when missing.
icecast:
	@command -v icecast2 >/dev/null 2>&1 || { SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq icecast2 >/dev/null; }

fonts:
	@[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || { SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq fonts-dejavu-core >/dev/null; }

## make soak: the soak run and the connection storm against the real binary, each for SOAK_SECONDS
## (default 600); `make test` runs 60 s of the soak and 12 s of the storm.
SOAK_SECONDS ?= 600
soak:
	SOAK_SECONDS=$(SOAK_SECONDS) $(CARGO) test --release --test soak --test storm -- --nocapture --test-threads 1

## make fuzz: each cargo-fuzz target for FUZZ_SECONDS, from the committed seeds (fuzz/seeds/);
## new inputs it finds go to target/fuzz-corpus/, a crash to fuzz/artifacts/.
FUZZ_SECONDS ?= 300
TEST_FUZZ_SECONDS ?= 20
FUZZ_TARGETS := request_head chunked config webm
# How the targets are built: optimised, with AddressSanitizer (cargo fuzz's default), for long
# runs. make test's short run builds them unoptimised and without the sanitizer: 2.4 minutes of
# build on 2 cores instead of 5.8, for fewer runs in its 20 s (request_head and chunked 4 times
# fewer, webm 6, config 25: serde and toml unoptimised; opt-level 1 brought the build back to
# 4.5 minutes). The seeds run whole either way; the parsers are safe Rust, and a panic, an
# overflow or a debug assertion stops a run either way. `make fuzz` is for depth.
FUZZ_BUILD ?= -O
TEST_FUZZ_BUILD := --dev -s none
# cargo fuzz needs nightly-only flags (-Zsanitizer=address, and coverage instrumentation); the
# machine's one toolchain is stable, and RUSTC_BOOTSTRAP lets it take them. -a keeps debug
# assertions (overflow checks) on.
fuzz: fuzz-deps
	@for t in $(FUZZ_TARGETS); do \
	  mkdir -p target/fuzz-corpus/$$t; log=target/fuzz-corpus/$$t.log; \
	  echo "fuzzing $$t for $(FUZZ_SECONDS) s (log: $$log)"; \
	  if RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run --fuzz-dir fuzz $(FUZZ_BUILD) -a $$t target/fuzz-corpus/$$t fuzz/seeds/$$t \
	       -- -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 >$$log 2>&1; then \
	    grep -E '^Done' $$log; \
	  else \
	    grep -E -A2 'panicked at|ERROR:|SUMMARY|Test unit written' $$log | head -n 30; echo "fuzz target $$t failed: the input is in fuzz/artifacts/$$t/"; exit 1; \
	  fi; \
	done

fuzz-deps:
	@command -v cargo-fuzz >/dev/null 2>&1 || $(CARGO) install cargo-fuzz --version '^0.13' --locked --debug
