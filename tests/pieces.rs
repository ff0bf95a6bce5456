//! A source writing one byte at a time, beside one writing encoder-sized pieces at the same
//! bitrate: ingest merges the tiny writes, so the mount keeps about as many pieces and its
//! listeners get about as many writes per byte as the normal mount's, and every byte arrives.

mod common;

use std::io::Write;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// About 4 s at 16 KB/s (128 kbit/s) on each mount.
const TOTAL: u64 = 64_000;
const LISTENERS: usize = 5;

/// Sends the pattern up to `TOTAL` at 16 bytes a millisecond, one byte per write (and, with
/// `TCP_NODELAY`, per segment), as the source did.
fn send_bytewise(mut source: Source) -> Source {
    source.stream.set_nodelay(true).unwrap();
    let start = Instant::now();
    let bytes = pattern(0, TOTAL as usize);
    for (ms, burst) in bytes.chunks(16).enumerate() {
        let due = start + Duration::from_millis(ms as u64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        for b in burst {
            source.stream.write_all(std::slice::from_ref(b)).unwrap();
        }
    }
    source
}

/// Sends the pattern up to `TOTAL` as an encoder does: 320 bytes every 20 ms.
fn send_pieces(mut source: Source) -> Source {
    let start = Instant::now();
    let mut at = 0;
    for k in 0.. {
        if at >= TOTAL {
            break;
        }
        let due = start + Duration::from_millis(20 * k);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        let n = 320.min(TOTAL - at);
        source.send(&pattern(at, n as usize));
        at += n;
    }
    source
}

#[test]
fn a_byte_at_a_time_source_costs_about_what_an_encoder_sized_one_does() {
    // Declared, so that their counters outlive the sources' grace period (an undeclared mount's
    // series leave with it).
    let srv = TestServer::start(|c| {
        declare(c, "/tiny");
        declare(c, "/normal");
    });
    let mounts = ["/tiny", "/normal"];
    let sources: Vec<Source> = mounts
        .iter()
        .map(|m| Source::connect(srv.addr, m))
        .collect();
    // Listeners join before the first byte: each must get the whole stream.
    let listeners: Vec<_> = mounts
        .iter()
        .flat_map(|m| (0..LISTENERS).map(move |i| (*m, i)))
        .map(|(mount, i)| {
            let mut l = Listener::connect(srv.addr, mount);
            thread::spawn(move || {
                l.read_to_end();
                (format!("{mount} listener {i}"), l.body)
            })
        })
        .collect();
    wait_until("every listener admitted", || {
        srv.server.as_ref().unwrap().listeners() == 2 * LISTENERS
    });
    let mut sources = sources.into_iter();
    let tiny = sources.next().unwrap();
    let normal = sources.next().unwrap();
    let senders = [
        thread::spawn(move || send_bytewise(tiny)),
        thread::spawn(move || send_pieces(normal)),
    ];
    let sources: Vec<Source> = senders.into_iter().map(|h| h.join().unwrap()).collect();
    for m in mounts {
        srv.wait_metric(
            "fanstream_source_received_bytes_total",
            &[&format!("mount=\"{m}\"")],
            |v| v == TOTAL as f64,
        );
    }
    let pieces = |m: &str| srv.metric("fanstream_retained_pieces", &[&format!("mount=\"{m}\"")]);
    let (tiny_pieces, normal_pieces) = (pieces("/tiny"), pieces("/normal"));
    eprintln!("retained pieces: {tiny_pieces} on /tiny, {normal_pieces} on /normal");
    assert!(normal_pieces > 0.0, "the normal mount keeps its pieces");
    // Unmerged, the tiny mount would keep about one piece per byte: 64,000.
    assert!(
        tiny_pieces <= 3.0 * normal_pieces,
        "{tiny_pieces} pieces retained for the tiny mount, {normal_pieces} for the normal one"
    );

    drop(sources); // after the 1 s grace, every listener is closed
    for h in listeners {
        let (who, body) = h.join().unwrap();
        assert_eq!(assert_exact_suffix(&body, TOTAL, &who), 0, "{who}");
    }
    let per_byte = |m: &str| {
        let label = format!("mount=\"{m}\"");
        let writes = srv.metric("fanstream_write_syscalls_total", &[&label]);
        let sent = srv.metric("fanstream_sent_bytes_total", &[&label]);
        assert_eq!(sent, (LISTENERS as u64 * TOTAL) as f64, "{m}: bytes sent");
        writes / sent
    };
    let (tiny_writes, normal_writes) = (per_byte("/tiny"), per_byte("/normal"));
    eprintln!(
        "writes per KB: {:.3} on /tiny, {:.3} on /normal",
        tiny_writes * 1e3,
        normal_writes * 1e3
    );
    assert!(
        tiny_writes <= 2.0 * normal_writes,
        "writes per byte: {tiny_writes} on the tiny mount, {normal_writes} on the normal one"
    );
}
