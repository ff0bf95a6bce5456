//! Mounts that come and go: thousands of short-lived sources on new names must leave `/metrics`,
//! the status pages and the alerts as they found them; past `max_mount_series` mounts share
//! `mount="other"`; `fanstream_source_up` speaks for declared mounts and live ones only.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use fanstream::{Config, MountSettings};

/// Sources connected at once.
const BATCH: usize = 50;

/// Lines of `/metrics` that are samples, not comments.
fn samples(text: &str) -> Vec<&str> {
    text.lines().filter(|l| !l.starts_with('#')).collect()
}

/// Sample lines labelled with a mount whose label starts with `prefix` (`/churn-`, `other`).
fn mount_lines<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
    let needle = format!("mount=\"{prefix}");
    samples(text)
        .into_iter()
        .filter(|l| l.contains(&needle))
        .collect()
}

fn status(srv: &TestServer, path: &str) -> String {
    let raw = format!("GET {path} HTTP/1.0\r\n\r\n");
    String::from_utf8(request(srv.admin, raw.as_bytes()).2).unwrap()
}

/// A listener that asks for ICY metadata blocks, past its response head.
fn icy_listener(addr: SocketAddr, mount: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(s, "GET {mount} HTTP/1.0\r\nIcy-MetaData: 1\r\n\r\n").unwrap();
    let head = read_head(&mut s);
    assert!(head.contains("icy-metaint:"), "{head}");
    s
}

/// One short-lived source on `mount`: it sends a little, some get a listener (a plain one that
/// is left to be closed by the server after the grace period, or an ICY one that hangs up
/// first), then it goes. Returns a listener still held, if any.
fn short_lived(addr: SocketAddr, mount: &str, i: usize) -> Option<thread::JoinHandle<()>> {
    let mut source = Source::connect(addr, mount);
    source.send(&pattern(0, 1000));
    let held = match i % 4 {
        0 => {
            let mut l = Listener::connect(addr, mount);
            Some(thread::spawn(move || {
                l.read_to_end();
                assert_exact_suffix(&l.body, 1000, "a churned mount's listener");
            }))
        }
        1 => {
            drop(icy_listener(addr, mount));
            None
        }
        _ => None,
    };
    drop(source);
    held
}

#[test]
fn thousands_of_short_lived_mounts_leave_metrics_and_status_as_they_were() {
    const MOUNTS: usize = 2000;
    let started = Instant::now();
    let srv = TestServer::start(|_| {});
    // A first mount creates what is created once (the reasons a source ends, ...); after it,
    // /metrics is at its resting size.
    let warm = short_lived(srv.addr, "/churn-warm", 0);
    warm.unwrap().join().unwrap();
    wait_until("the warm-up mount gone", || {
        mount_lines(&srv.metrics(), "/churn-").is_empty()
    });
    let baseline = samples(&srv.metrics()).len();

    let mut held = Vec::new();
    for batch in 0..MOUNTS / BATCH {
        let threads: Vec<_> = (0..BATCH)
            .map(|j| {
                let addr = srv.addr;
                let i = batch * BATCH + j;
                thread::spawn(move || short_lived(addr, &format!("/churn-{i}"), i))
            })
            .collect();
        held.extend(threads.into_iter().filter_map(|t| t.join().unwrap()));
        if batch == 0 {
            // While the first batch waits out its grace period, its series are there.
            assert!(!mount_lines(&srv.metrics(), "/churn-").is_empty());
        }
    }
    for l in held {
        l.join().unwrap();
    }
    let mut text = String::new();
    // Mounts in their grace period pile up faster than they expire: past the first 1000,
    // `max_mount_series` counted them under `other`, which must go with them too.
    wait_until("every churned mount's series gone", || {
        text = srv.metrics();
        mount_lines(&text, "/churn-").is_empty() && mount_lines(&text, "other").is_empty()
    });
    let after = samples(&text).len();
    assert!(
        after.abs_diff(baseline) <= 3,
        "/metrics had {baseline} samples before {MOUNTS} mounts came and went, {after} after"
    );
    assert_eq!(metric_value(&text, "fanstream_listeners", &[]), 0.0);
    for page in ["/status.json", "/status-json.xsl"] {
        let body = status(&srv, page);
        assert!(
            !body.contains("/churn-"),
            "{page} still lists a mount: {body}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn past_max_mount_series_mounts_share_other_until_they_leave() {
    let srv = TestServer::start(|c| c.max_mount_series = 5);
    // One after another, so that the first five are the ones with their own label.
    let mut sources: Vec<Source> = (0..8)
        .map(|i| {
            let mut s = Source::connect(srv.addr, &format!("/cap-{i}"));
            s.send(&pattern(0, 1000 * (i + 1)));
            s
        })
        .collect();
    srv.wait_metric("fanstream_source_received_bytes_total", &[], |v| {
        v == 36_000.0
    });
    let text = srv.metrics();
    let up: Vec<&str> = samples(&text)
        .into_iter()
        .filter(|l| l.starts_with("fanstream_source_up{"))
        .collect();
    let expected: Vec<String> = (0..5)
        .map(|i| format!("fanstream_source_up{{mount=\"/cap-{i}\"}} 1"))
        .chain(["fanstream_source_up{mount=\"other\"} 3".to_string()])
        .collect();
    let mut up_sorted = up.clone();
    up_sorted.sort();
    assert_eq!(up_sorted, expected);
    assert_eq!(
        metric_value(&text, "fanstream_mount_series_overflow_total", &[]),
        3.0
    );
    assert_eq!(
        metric_value(
            &text,
            "fanstream_source_received_bytes_total",
            &["mount=\"other\""]
        ),
        (6_000 + 7_000 + 8_000) as f64
    );
    // The status page still tells the mounts apart.
    let doc: serde_json::Value = serde_json::from_str(&status(&srv, "/status.json")).unwrap();
    let mounts = doc["mounts"].as_array().unwrap();
    assert_eq!(mounts.len(), 8);
    for m in mounts {
        let i: u64 = m["mount"].as_str().unwrap()["/cap-".len()..]
            .parse()
            .unwrap();
        assert_eq!(m["received_bytes"], 1000 * (i + 1), "{m}");
    }
    let mut l = Listener::connect(srv.addr, "/cap-7");
    l.read_at_least(8000);
    srv.wait_metric("fanstream_listeners", &["mount=\"other\""], |v| v == 1.0);

    // An aggregated mount leaves: the others keep `other`.
    sources.pop();
    l.read_to_end();
    srv.wait_metric("fanstream_source_up", &["mount=\"other\""], |v| v == 2.0);
    // All leave: every series goes, and the slots are free again.
    sources.clear();
    wait_until("the capped mounts' series gone", || {
        let text = srv.metrics();
        mount_lines(&text, "/cap-").is_empty() && mount_lines(&text, "other").is_empty()
    });
    let _next = Source::connect(srv.addr, "/cap-next");
    srv.wait_metric("fanstream_source_up", &["mount=\"/cap-next\""], |v| {
        v == 1.0
    });
    assert_eq!(
        srv.metric("fanstream_mount_series_overflow_total", &[]),
        3.0
    );
}

#[test]
fn source_up_is_reported_for_declared_mounts_and_live_ones_only() {
    let srv = TestServer::start(|c| declare(c, "/declared"));
    // Ingest declares the mounts as it starts, just after the server returns.
    wait_until("the declared mount's series", || {
        srv.metrics()
            .contains("fanstream_source_up{mount=\"/declared\"} 0\n")
    });

    // A declared mount's source comes and goes: its series stay, at 0 once it is away.
    let declared = Source::connect(srv.addr, "/declared");
    srv.wait_metric("fanstream_source_up", &["mount=\"/declared\""], |v| {
        v == 1.0
    });
    drop(declared);
    // An undeclared mount is reported while it lives, then not at all.
    let passing = Source::connect(srv.addr, "/passing");
    srv.wait_metric("fanstream_source_up", &["mount=\"/passing\""], |v| v == 1.0);
    drop(passing);
    wait_until("/passing gone", || {
        mount_lines(&srv.metrics(), "/passing").is_empty()
    });
    let text = srv.metrics();
    assert!(
        text.contains("fanstream_source_up{mount=\"/declared\"} 0\n"),
        "{text}"
    );
    assert_eq!(
        metric_value(
            &text,
            "fanstream_source_connects_total",
            &["mount=\"/declared\""]
        ),
        1.0
    );

    // A reload adds and removes declared mounts' series.
    let mut config = Config {
        source_password: Some(PASSWORD.into()),
        ..Config::default()
    };
    declare(&mut config, "/added");
    srv.server.as_ref().unwrap().reload(config).unwrap();
    wait_until("the reload applied", || {
        let text = srv.metrics();
        text.contains("fanstream_source_up{mount=\"/added\"} 0\n")
            && mount_lines(&text, "/declared").is_empty()
    });
}

#[test]
fn a_mount_declared_while_counted_under_other_gets_its_own_series_once_it_has_left() {
    let srv = TestServer::start(|c| c.max_mount_series = 0);
    let source = Source::connect(srv.addr, "/late");
    srv.wait_metric("fanstream_source_up", &["mount=\"other\""], |v| v == 1.0);
    let mut config = Config {
        source_password: Some(PASSWORD.into()),
        max_mount_series: 0,
        ..Config::default()
    };
    config.mounts.insert(
        "/late".into(),
        MountSettings {
            source_grace_secs: 1,
            ..MountSettings::default()
        },
    );
    srv.server.as_ref().unwrap().reload(config).unwrap();
    // Declared now, but live under `other`: no series of its own saying it is down.
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(300) {
        assert!(mount_lines(&srv.metrics(), "/late").is_empty());
        thread::sleep(Duration::from_millis(50));
    }
    drop(source);
    wait_until("/late's own series", || {
        let text = srv.metrics();
        text.contains("fanstream_source_up{mount=\"/late\"} 0\n")
            && mount_lines(&text, "other").is_empty()
    });
}
