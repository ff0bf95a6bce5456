//! A relay facing bad upstreams over and over (refused connections, non-2xx answers, garbage,
//! redirect loops, stalls, a content type change) fails over 200 times and more without a
//! panic or a leak: the server's descriptors and memory come back to what they were.
//!
//! Its own test binary: descriptors and RSS are the process's, and another test running beside
//! it in the same process would move them.

mod common;

use std::net::TcpListener;
use std::time::{Duration, Instant};

use common::upstream::BadUpstream;
use common::*;
use fanstream::config::RelaySettings;

/// Descriptors the process holds now.
fn open_descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// The process's resident memory, in KiB, once the allocator has given back what it can (the
/// tests run on glibc's, which otherwise keeps freed memory).
fn rss_kib() -> u64 {
    // SAFETY: malloc_trim only releases free memory at the top of glibc's heaps and arenas.
    unsafe { libc::malloc_trim(0) };
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn two_hundred_failovers_on_bad_upstreams_leak_no_descriptor_and_no_memory() {
    let bad = BadUpstream::start();
    // A port nobody listens on: connections to it are refused.
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let bad_url = |path: &str| format!("http://{}{path}", bad.addr);
    let mut upstreams = vec![format!("http://{closed}/live")];
    upstreams.extend(["/error", "/missing", "/garbage", "/loop", "/badicy"].map(bad_url));
    // Ten relays of six bad upstreams each fail 60 times a round; with the backoff (0.5-1 s,
    // then 1-2 s, 2-4 s) four rounds take a few seconds. Two more relays stall, and meet a
    // content type change within the mount's grace period.
    let mut relays: Vec<RelaySettings> = (0..10)
        .map(|i| RelaySettings {
            mount: format!("/bad{i}"),
            upstreams: upstreams.clone(),
            user: None,
            password: None,
            on_demand: false,
            prefer_first: false,
            retry_secs: 30,
        })
        .collect();
    relays.push(RelaySettings {
        mount: "/stalled".into(),
        upstreams: vec![bad_url("/stall")],
        ..relays[0].clone()
    });
    relays.push(RelaySettings {
        mount: "/flipped".into(),
        upstreams: vec![bad_url("/briefly"), bad_url("/ogg")],
        ..relays[0].clone()
    });
    let config = |relays: &[RelaySettings]| {
        let mut config = test_config();
        config.source_timeout_secs = 1;
        config.defaults.source_grace_secs = 2;
        config.startup.relays = relays.to_vec();
        config
    };
    let server = TestServer::start(|c| *c = config(&relays));
    let reload = |relays: &[RelaySettings]| {
        server
            .server
            .as_ref()
            .unwrap()
            .reload(config(relays))
            .unwrap();
    };
    let total = || server.metric("fanstream_relay_failovers_total", &[]);

    // A first 200 warm up what is made once or kept for reuse (metric series, the runtime's
    // and the allocator's free lists), then the relays go and the baseline is taken once their
    // connections have closed: a leak grows with every failover, a cache does not.
    wait_until("200 failovers to warm up", || total() >= 200.0);
    reload(&[]);
    wait_until("the relays' upstream connections to close", || {
        bad.open.load(std::sync::atomic::Ordering::SeqCst) == 0
    });
    let no_mounts = || {
        let (_, _, body) = request(server.addr, b"GET /status.json HTTP/1.0\r\n\r\n");
        let status: serde_json::Value = serde_json::from_slice(&body).unwrap();
        status["mounts"].as_array().unwrap().is_empty()
    };
    // The mounts the relays fed (their stream kept) close once their grace period is over.
    wait_until("the relayed mounts to close", no_mounts);
    let (fds, rss) = (open_descriptors(), rss_kib());
    let started = total();

    let clock = Instant::now();
    reload(&relays);
    wait_until("200 failovers more", || total() >= started + 200.0);
    let took = clock.elapsed();
    for reason in [
        "connect",
        "status",
        "not_found",
        "bad_response",
        "redirect_loop",
        "bad_metadata",
        "stalled",
        "closed",
        "content_type",
    ] {
        let n = server.metric(
            "fanstream_relay_failovers_total",
            &[&format!("reason=\"{reason}\"")],
        );
        assert!(n >= 1.0, "no {reason} failover: {}", server.metrics());
    }
    assert!(
        took < Duration::from_secs(20),
        "200 failovers took {took:?}: the backoff is capped"
    );
    let during = open_descriptors();
    reload(&[]);
    wait_until("the relays' upstream connections to close again", || {
        bad.open.load(std::sync::atomic::Ordering::SeqCst) == 0
    });
    wait_until("the descriptors to come back to the baseline", || {
        open_descriptors() <= fds
    });
    wait_until("the relayed mounts to close again", no_mounts);
    let after = rss_kib();
    // A leak of 5 KiB per failover would be 1 MiB over 200 (one read buffer, 64 KiB, would be
    // 12 MiB); what the allocator keeps back, and the bad upstream's own log of requests, are
    // a few hundred KiB.
    assert!(
        after <= rss + 1024,
        "RSS {rss} KiB before, {after} KiB after {} failovers",
        total() - started
    );
    assert_eq!(server.metric("fanstream_panics_total", &[]), 0.0);
    assert_eq!(server.metric("fanstream_relay_up", &[]), 0.0);
    println!(
        "{} failovers in {took:?}; descriptors {fds} before, {during} during, {} after; RSS {rss} KiB before, {after} KiB after",
        total() - started,
        open_descriptors()
    );
}
