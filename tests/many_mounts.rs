//! Many stations on one server: a mount's publications cost only its own listeners. Idle mounts,
//! each with a listener, get no write and no byte while another mount streams, the streaming
//! mount's listeners still receive every byte, and a mount without listeners wakes no worker.

mod common;

use std::io::{ErrorKind, Read};
use std::thread;
use std::time::Duration;

use common::*;

const IDLE_MOUNTS: usize = 100;
/// What each idle mount's source sends before it falls silent: less than the burst, so that its
/// listener receives all of it on joining.
const IDLE_BYTES: u64 = 4_000;
const PIECE: usize = 1_000;
const TOTAL: u64 = 1_000_000;
const MIN_WRITE_BYTES: u64 = 8 * 1024;

#[test]
fn idle_mounts_cost_no_write_while_another_mount_streams() {
    let srv = TestServer::start(|c| {
        c.max_sources = IDLE_MOUNTS + 2;
        // The idle sources stay silent for the whole test.
        c.source_timeout_secs = 120;
        c.defaults.burst_bytes = 16 * 1024;
        c.defaults.max_lag_bytes = 4 * 1024 * 1024;
        c.defaults.min_write_bytes = MIN_WRITE_BYTES as usize;
        c.defaults.max_write_delay_ms = 50;
    });

    let mut idle = Vec::new();
    for i in 0..IDLE_MOUNTS {
        let mount = format!("/idle{i}");
        let mut source = Source::connect(srv.addr, &mount);
        source.send_pattern(0, IDLE_BYTES, PIECE, Duration::ZERO);
        idle.push((mount, source));
    }
    srv.wait_metric("fanstream_source_received_bytes_total", &[], |v| {
        v == (IDLE_MOUNTS as u64 * IDLE_BYTES) as f64
    });
    let mut idle_listeners = Vec::new();
    for (mount, _) in &idle {
        let mut l = Listener::connect(srv.addr, mount);
        l.read_at_least(IDLE_BYTES as usize);
        assert_exact_suffix(&l.body, IDLE_BYTES, mount);
        idle_listeners.push(l);
    }

    let mut source = Source::connect(srv.addr, "/live");
    source.send_pattern(0, 10_000, PIECE, Duration::ZERO);
    let live: Vec<_> = (0..4)
        .map(|_| {
            let mut l = Listener::connect(srv.addr, "/live");
            thread::spawn(move || {
                l.read_to_end();
                l.body
            })
        })
        .collect();
    wait_until("every listener", || {
        srv.server.as_ref().unwrap().listeners() == IDLE_MOUNTS + 4
    });
    let writes_before = srv.metric("fanstream_write_syscalls_total", &[]);
    let wakeups_before = srv.metric("fanstream_worker_wakeups_total", &[]);
    source.send_pattern(10_000, TOTAL, PIECE, Duration::from_millis(1));
    let publications = (TOTAL - 10_000) / PIECE as u64;
    srv.wait_metric("fanstream_sent_bytes_total", &["mount=\"/live\""], |v| {
        v >= 4.0 * (TOTAL - 10_000) as f64
    });
    let writes = srv.metric("fanstream_write_syscalls_total", &[]) - writes_before;
    // The live mount's four listeners take at most a write per publication each (coalescing
    // makes it far fewer); one write to each idle listener per publication would add 100 each.
    assert!(
        writes <= 4.0 * publications as f64,
        "{writes} writes for {publications} publications to 4 listeners"
    );

    // A worker is woken when its listeners have something to do: the first byte past the edge
    // (which starts the coalescing delay) and each `min_write_bytes` more, not every piece.
    let wakeups = srv.metric("fanstream_worker_wakeups_total", &[]) - wakeups_before;
    let owed = 2 * 2 * (TOTAL / MIN_WRITE_BYTES) + 20;
    assert!(
        wakeups <= owed as f64,
        "{wakeups} wake-ups for {publications} publications; at most {owed} expected"
    );

    // A mount nobody listens to wakes no worker at all. The live listeners first get the rest
    // of their stream (they joined at its start, so the wait above could end with up to 10,000
    // bytes each still owed, and their writes could wake a worker in the window below).
    srv.wait_metric("fanstream_sent_bytes_total", &["mount=\"/live\""], |v| {
        v >= 4.0 * TOTAL as f64
    });
    let quiet_from = srv.metric("fanstream_worker_wakeups_total", &[]);
    let mut unheard = Source::connect(srv.addr, "/unheard");
    unheard.send_pattern(0, 100_000, PIECE, Duration::from_millis(1));
    srv.wait_metric("fanstream_source_received_bytes_total", &[], |v| {
        v == (IDLE_MOUNTS as u64 * IDLE_BYTES + TOTAL + 100_000) as f64
    });
    assert_eq!(
        srv.metric("fanstream_worker_wakeups_total", &[]),
        quiet_from,
        "a mount without listeners woke a worker"
    );

    drop(source);
    for (i, h) in live.into_iter().enumerate() {
        let body = h.join().unwrap();
        assert_exact_suffix(&body, TOTAL, &format!("live listener {i}"));
    }
    for (l, (mount, _)) in idle_listeners.iter_mut().zip(&idle) {
        l.stream.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 1024];
        match l.stream.read(&mut buf) {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            other => panic!("{mount}'s listener got something new: {other:?}"),
        }
    }
}
