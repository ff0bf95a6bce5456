//! Retention by need: a mount keeps its burst plus what its furthest-behind listener still needs,
//! never more than its window, and gives memory back when that listener leaves.

mod common;

use std::thread;
use std::time::Duration;

use common::*;

const LIVE: &str = "mount=\"/live\"";
const BURST: u64 = 16 * 1024;
const MAX_LAG: u64 = 400 * 1024;
/// Small pieces, a little apart, so that ingest stores most as chunks of their own.
const PIECE: usize = 500;
/// Eviction is exact to a piece, but ingest merges a small source's reads (see ingest's doc), so
/// a piece can hold many sends: the cap allows this much over the window.
const SLACK: u64 = 2 * 64 * 1024;

fn retained(srv: &TestServer) -> u64 {
    srv.metric("fanstream_retained_bytes", &[LIVE]) as u64
}

/// Sends the pattern `from..to` and waits until ingest has it.
fn feed(srv: &TestServer, source: &mut Source, from: u64, to: u64) {
    source.send_pattern(from, to, PIECE, Duration::from_micros(100));
    srv.wait_metric("fanstream_source_received_bytes_total", &[LIVE], |v| {
        v == to as f64
    });
}

#[test]
fn a_mount_keeps_what_its_furthest_behind_listener_needs_and_no_more() {
    let srv = TestServer::start(|c| {
        c.defaults.burst_bytes = BURST;
        c.defaults.max_lag_bytes = MAX_LAG;
        c.defaults.min_write_bytes = 1;
        c.defaults.max_write_delay_ms = 0;
        // The slow listener's kernel buffers hold little, so that it falls behind in the store.
        c.listener_send_buffer_bytes = 4096;
        declare(c, "/live");
    });
    // Not audio: the stream is a verifiable pattern, stored as it comes.
    let mut source = Source::connect_typed(srv.addr, "/live", "application/octet-stream");
    // Without listeners a mount keeps its burst (the window would be 400 KiB), less the piece
    // the burst's far edge falls in, where no newcomer joins.
    feed(&srv, &mut source, 0, 300_000);
    let idle = retained(&srv);
    assert!(
        (BURST / 2..=BURST).contains(&idle),
        "a mount without listeners retains {idle} bytes for a {BURST}-byte burst"
    );

    // A listener that reads everything, from its burst to past the end of the third phase.
    let fast = thread::spawn({
        let addr = srv.addr;
        move || {
            let mut l = Listener::connect(addr, "/live");
            l.read_at_least(700_000);
            l
        }
    });
    // A listener that stops reading: what it is owed piles up in the store, not in the kernel.
    let slow = Listener::connect_small_buffer(srv.addr, "/live");
    wait_until("both listeners", || {
        srv.server.as_ref().unwrap().listeners() == 2
    });
    feed(&srv, &mut source, 300_000, 600_000);
    let behind = retained(&srv);
    // The slow one holds at most its kernel buffers (a few KiB each way) of the ~316 KB it is
    // owed: the rest must still be in the store.
    assert!(
        behind >= 250_000,
        "retained {behind} bytes while a listener is about 300 KB behind"
    );

    // Far past the lag limit: the store stays within the window whatever the slow one owes.
    feed(&srv, &mut source, 600_000, 1_100_000);
    let capped = retained(&srv);
    assert!(
        capped <= MAX_LAG + SLACK,
        "retained {capped} bytes for a {MAX_LAG}-byte window"
    );
    // Kept what it needed, while the slow one held memory: every byte, none skipped.
    let fast = fast.join().expect("the reading listener");
    let runs = exact_runs(&fast.body);
    assert_eq!(runs.len(), 1, "the reading listener lost bytes: {runs:?}");
    assert!(
        runs[0].0 >= 300_000 - BURST,
        "joined at {} for a {BURST}-byte burst",
        runs[0].0
    );

    // The listeners leave (the server finds out at their next write): memory goes back to the
    // burst as the next segments are sealed.
    drop(fast);
    drop(slow);
    let mut at = 1_100_000;
    wait_until("the listeners gone and retention back to the burst", || {
        feed(&srv, &mut source, at, at + 32 * 1024);
        at += 32 * 1024;
        srv.server.as_ref().unwrap().listeners() == 0 && retained(&srv) <= BURST
    });
}

/// A mount whose newcomers reach their worker `join_delay_ms` after taking their join point,
/// while its source writes about 4 MB/s (4 KiB a millisecond): the burst moves on by more than
/// itself meanwhile. Returns once `n` newcomers have each read `read` bytes with none missing;
/// a newcomer whose join point is evicted before its first write is dropped at once (its
/// stream ends with nothing) or skips (its bytes have a gap).
fn newcomers_during_a_fast_source(join_delay_ms: u64, max_lag: u64, n: usize, read: usize) {
    let srv = TestServer::start(|c| {
        c.defaults.burst_bytes = BURST;
        c.defaults.min_write_bytes = 1;
        c.defaults.max_write_delay_ms = 0;
        c.defaults.max_lag_bytes = max_lag;
        c.join_delay_injection_ms = join_delay_ms;
        declare(c, "/live");
    });
    let mut source = Source::connect_typed(srv.addr, "/live", "application/octet-stream");
    feed(&srv, &mut source, 0, 100_000);
    let writing = source.keep_writing(100_000, 4096, Duration::from_millis(1));
    for i in 0..n {
        let mut l = Listener::connect(srv.addr, "/live");
        l.read_at_least(read);
        let runs = exact_runs(&l.body);
        assert_eq!(runs.len(), 1, "listener {i} lost bytes: {runs:?}");
    }
    writing.stop();
}

#[test]
fn listeners_joining_while_a_source_writes_fast_keep_their_join_point() {
    // 50 ms, as on a busy machine; the window holds every join point meanwhile, and a reading
    // listener keeps up.
    newcomers_during_a_fast_source(50, 4 << 20, 10, 2 * BURST as usize);
}

#[test]
fn a_newcomer_whose_join_point_is_evicted_before_its_first_write_joins_at_the_burst() {
    // The window is the burst, and the delay 200 ms: the join point is gone before the worker
    // takes the newcomer. It has had none of the stream: it is not a listener that fell behind,
    // and gets the stream from the burst as it is then. (Past its first write it is one: with a
    // window of 4 ms of this stream, a reader on a busy machine may then fall out of it.)
    newcomers_during_a_fast_source(200, BURST, 3, 4096);
}

#[test]
fn a_newcomer_whose_join_point_goes_with_a_source_change_joins_the_new_source() {
    // As above, with a source change in between: the newcomer was sent its response head by the
    // first source and took its join point there; while it is on its way to its worker (3 s,
    // time enough for what follows on a busy machine), that source leaves, another takes the
    // mount and writes past the window (and the slack of merged pieces). The stream has no
    // header pages that the newcomer could have missed, so it joins the new source at its burst
    // rather than being dropped for a lag it never had.
    const WINDOW: u64 = 64 * 1024;
    let srv = TestServer::start(|c| {
        c.defaults.burst_bytes = BURST;
        c.defaults.min_write_bytes = 1;
        c.defaults.max_write_delay_ms = 0;
        c.defaults.max_lag_bytes = WINDOW;
        c.join_delay_injection_ms = 3000;
        declare(c, "/live");
    });
    let mut first = Source::connect_typed(srv.addr, "/live", "application/octet-stream");
    feed(&srv, &mut first, 0, 100_000);
    // Past its response head, its snapshot (and so its join point) is the first source's.
    let mut newcomer = Listener::connect(srv.addr, "/live");
    drop(first);
    srv.wait_metric("fanstream_source_up", &[LIVE], |v| v == 0.0);
    let mut second = Source::connect_typed(srv.addr, "/live", "application/octet-stream");
    // Its own stream, far from the first's, so that bytes of each are told apart.
    const SECOND: u64 = 10_000_000;
    let written = 2 * (WINDOW + SLACK);
    second.send_pattern(SECOND, SECOND + written, PIECE, Duration::from_micros(100));
    srv.wait_metric("fanstream_source_received_bytes_total", &[LIVE], |v| {
        v == (100_000 + written) as f64
    });
    // It keeps writing, as a live source does, while the newcomer reads (slowly enough that a
    // reader on a busy machine stays within the window).
    let writing = second.keep_writing(SECOND + written, 4096, Duration::from_millis(10));
    newcomer.read_at_least(4096);
    writing.stop();
    let runs = exact_runs(&newcomer.body);
    assert_eq!(runs.len(), 1, "the newcomer's stream: {runs:?}");
    assert!(
        runs[0].0 >= SECOND + written - BURST,
        "the newcomer joined at {}, not at the new source's burst",
        runs[0].0
    );
}
