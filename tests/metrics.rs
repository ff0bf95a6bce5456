//! /metrics after a known load: byte counters against what listeners really received, listener
//! gauges and disconnect reasons as listeners come and go, and CPU accounting (per thread, per
//! process, per listener) against the kernel's clocks.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const LIVE: &str = "mount=\"/live\"";
const OTHER: &str = "mount=\"/other\"";

fn reason(r: &str) -> String {
    format!("reason=\"{r}\"")
}

#[test]
fn bytes_sent_equal_bytes_received_and_listener_gauges_follow_listeners() {
    let srv = TestServer::start(|c| {
        c.defaults.burst_bytes = 16 * 1024;
        c.defaults.max_lag_bytes = 8 * 1024 * 1024;
        declare(c, "/live");
    });
    let mut source = Source::connect(srv.addr, "/live");
    source.send_pattern(0, 50_000, 1000, Duration::ZERO);
    srv.wait_metric("fanstream_source_received_bytes_total", &[LIVE], |v| {
        v >= 50_000.0
    });
    // A new mount's counters exist at zero before anything happens to them, so that rates and
    // alerts over them have data.
    let text = srv.metrics();
    for why in [
        "client_closed",
        "write_error",
        "slow",
        "source_gone",
        "shutdown",
        "send_timeout",
        "panic",
        "killed",
    ] {
        let series =
            format!("fanstream_listener_disconnects_total{{mount=\"/live\",reason=\"{why}\"}} 0\n");
        assert!(text.contains(&series), "no zero series {series:?}");
    }
    assert!(text.contains("fanstream_listener_connects_total{mount=\"/live\"} 0\n"));

    let readers: Vec<_> = (0..4)
        .map(|_| {
            let addr = srv.addr;
            thread::spawn(move || {
                let mut l = Listener::connect(addr, "/live");
                l.read_to_end();
                l.body
            })
        })
        .collect();
    srv.wait_metric("fanstream_listeners", &[LIVE], |v| v == 4.0);
    assert_eq!(
        srv.metric("fanstream_listener_connects_total", &[LIVE]),
        4.0
    );

    const TOTAL: u64 = 1_000_000;
    source.send_pattern(50_000, TOTAL, 4000, Duration::from_millis(1));
    drop(source); // after the 1 s grace the listeners are closed: reason source_gone
    let mut received = 0u64;
    for (i, r) in readers.into_iter().enumerate() {
        let body = r.join().unwrap();
        assert_exact_suffix(&body, TOTAL, &format!("listener {i}"));
        received += body.len() as u64;
    }
    srv.wait_metric("fanstream_listeners", &[LIVE], |v| v == 0.0);
    assert_eq!(
        srv.metric("fanstream_sent_bytes_total", &[LIVE]),
        received as f64,
        "fanstream_sent_bytes_total must be exactly what the listeners received"
    );
    assert_eq!(
        srv.metric("fanstream_source_received_bytes_total", &[LIVE]),
        TOTAL as f64
    );
    assert_eq!(
        srv.metric(
            "fanstream_listener_disconnects_total",
            &[LIVE, &reason("source_gone")]
        ),
        4.0
    );

    // A listener that hangs up: the gauge goes up, then down once the server notices (on its next
    // write), and the disconnect is counted as the client's doing.
    let mut other = Source::connect(srv.addr, "/other");
    other.send_pattern(0, 10_000, 1000, Duration::ZERO);
    srv.wait_metric("fanstream_source_received_bytes_total", &[OTHER], |v| {
        v >= 10_000.0
    });
    let mut quitter = Listener::connect(srv.addr, "/other");
    quitter.read_at_least(1);
    srv.wait_metric("fanstream_listeners", &[OTHER], |v| v == 1.0);
    assert_eq!(srv.metric("fanstream_listeners", &[]), 1.0);
    drop(quitter);
    let mut sent = 10_000;
    let start = Instant::now();
    while srv.metric(
        "fanstream_listener_disconnects_total",
        &[OTHER, &reason("client_closed")],
    ) < 1.0
    {
        assert!(
            start.elapsed() < DEADLINE,
            "the closed listener was never noticed"
        );
        other.send_pattern(sent, sent + 8192, 8192, Duration::ZERO);
        sent += 8192;
        thread::sleep(Duration::from_millis(5));
    }
    srv.wait_metric("fanstream_listeners", &[OTHER], |v| v == 0.0);
    assert_eq!(
        srv.metric("fanstream_listener_disconnects_total", &[OTHER]),
        1.0,
        "one listener left, once"
    );
}

/// Sum of every `fanstream_thread_cpu_seconds_total` series and `process_cpu_seconds_total`.
fn cpu(text: &str) -> (f64, f64) {
    (
        metric_value(text, "fanstream_thread_cpu_seconds_total", &[]),
        metric_value(text, "process_cpu_seconds_total", &[]),
    )
}

#[test]
fn thread_cpu_rises_with_work_and_never_exceeds_the_process_cpu() {
    let srv = TestServer::start(|c| {
        c.defaults.max_lag_bytes = 16 * 1024 * 1024;
        declare(c, "/live");
    });
    let workers = "thread=\"fs-worker-";
    // Threads register their clocks as they start, just after the server returns.
    let mut before = String::new();
    wait_until("every thread's CPU series", || {
        before = srv.metrics();
        [
            "fs-ingest",
            "fs-acceptor",
            "fs-admin",
            "fs-worker-0",
            "fs-worker-1",
        ]
        .iter()
        .all(|t| {
            before.contains(&format!(
                "fanstream_thread_cpu_seconds_total{{thread=\"{t}\"}}"
            ))
        })
    });
    let idle_workers = metric_value(&before, "fanstream_thread_cpu_seconds_total", &[workers]);

    let mut source = Source::connect(srv.addr, "/live");
    source.send(&pattern(0, 1000));
    srv.wait_metric("fanstream_source_received_bytes_total", &[LIVE], |v| {
        v >= 1000.0
    });
    let readers: Vec<_> = (0..20)
        .map(|_| {
            let addr = srv.addr;
            thread::spawn(move || {
                let mut l = Listener::connect(addr, "/live");
                l.read_to_end();
                l.body.len() as u64
            })
        })
        .collect();
    srv.wait_metric("fanstream_listeners", &[LIVE], |v| v == 20.0);
    let done = Arc::new(AtomicBool::new(false));
    let sender = {
        let done = done.clone();
        thread::spawn(move || {
            source.send_pattern(1000, 4_000_000, 8192, Duration::ZERO);
            done.store(true, Ordering::Relaxed);
            source
        })
    };

    // Thread clocks read in one scrape can never add up to more than the process clock read in
    // a later scrape: the process's CPU includes every thread's, and the kernel's clocks only
    // grow. (Within one scrape the two are read in no fixed order, so compare across scrapes.)
    // Both come from the same nanosecond scheduler accounting: no tolerance but float rounding.
    let mut prev = srv.metrics();
    let mut compared = 0;
    while compared < 10 || !done.load(Ordering::Relaxed) {
        let next = srv.metrics();
        let (threads, _) = cpu(&prev);
        let (_, process) = cpu(&next);
        assert!(
            threads <= process + 1e-6,
            "threads' CPU {threads} s exceeds the process's CPU {process} s read after it"
        );
        prev = next;
        compared += 1;
        assert!(compared < 100_000, "the sender never finished");
    }
    let source = sender.join().unwrap();
    drop(source);
    let received: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
    assert!(
        received >= 20 * 3_000_000,
        "listeners received only {received} bytes"
    );

    let after = srv.metrics();
    let busy_workers = metric_value(&after, "fanstream_thread_cpu_seconds_total", &[workers]);
    // Writing about 80 MB through loopback sockets costs the workers well over 5 ms.
    assert!(
        busy_workers - idle_workers > 0.005,
        "workers' CPU went from {idle_workers} s to {busy_workers} s for 80 MB of writes"
    );
    let (threads, process) = cpu(&after);
    assert!(threads > 0.0 && process > 0.0);
    assert!(
        metric_value(&after, "fanstream_listener_seconds_total", &[]) > 0.0,
        "no listener-seconds counted"
    );
    let rounds = metric_value(
        &after,
        "fanstream_fanout_round_cpu_per_listener_seconds_count",
        &[],
    );
    assert!(rounds > 0.0, "no fan-out round measured");
    let lag_samples = metric_value(&after, "fanstream_listener_lag_bytes_count", &[LIVE]);
    assert!(lag_samples >= 20.0, "only {lag_samples} lag samples");
}

#[test]
fn listener_seconds_add_up_to_listeners_times_time_connected() {
    let srv = TestServer::start(|c| c.defaults.max_lag_bytes = 16 * 1024 * 1024);
    let mut source = Source::connect(srv.addr, "/live");
    source.send(&pattern(0, 1000));
    srv.wait_metric("fanstream_source_received_bytes_total", &[LIVE], |v| {
        v >= 1000.0
    });
    let connected = Instant::now();
    let mut listeners: Vec<_> = (0..3)
        .map(|_| Listener::connect(srv.addr, "/live"))
        .collect();
    srv.wait_metric("fanstream_listeners", &[LIVE], |v| v == 3.0);
    // Keep data flowing (each piece is a pass of the fan-out loop) for about a second.
    let mut sent = 1000;
    while connected.elapsed() < Duration::from_secs(1) {
        source.send(&pattern(sent, 1000));
        sent += 1000;
        for l in &mut listeners {
            l.read_at_least((sent - 1000) as usize);
        }
    }
    let elapsed = connected.elapsed().as_secs_f64();
    // The last pass may be a piece behind; one more makes the counter current.
    source.send(&pattern(sent, 1000));
    sent += 1000;
    for l in &mut listeners {
        l.read_at_least((sent - 1000) as usize);
    }
    // Listeners joined a little after `connected`, and a worker credits the time since its
    // previous turn when its loop comes back round after a pass: a listener can read that pass's
    // bytes before its worker gets there (CI once scraped in between and found a whole wait of
    // the loop missing), so the scrape waits for the credit, at most the helpers' deadline. The
    // counter lies between three listeners over the streaming time less a margin...
    let lower = 3.0 * (elapsed - 0.25);
    let counted = srv.wait_metric("fanstream_listener_seconds_total", &[], |v| v >= lower);
    // ...and three over the whole time connected, taken after the scrape: a pass of the loop (a
    // timer's) may credit time up to the scrape.
    let upper = 3.0 * connected.elapsed().as_secs_f64();
    assert!(
        counted <= upper,
        "counted {counted} listener-seconds for 3 listeners over at most {:.3} s",
        upper / 3.0
    );
}
