//! A flood of TLS handshakes that never finish, run beside the listeners (`run --tls-flood N`):
//! N connections to the TLS port, half sending the first bytes of a ClientHello whose record
//! says more is coming, half sending nothing, each held open until the server closes it and
//! then opened again, from the listeners' ramp to the end of the run. What it shows: whether
//! listeners still get in (their own handshakes among the flood's) and keep their stream while
//! the workers hold that many handshakes, and when the server lets go of a flood connection
//! (its `header_timeout_secs`).

use std::net::SocketAddr;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::schedule::unix_us;

/// A TLS record header (handshake, TLS 1.0 on the record as clients send it, 512 bytes
/// announced) and the start of a ClientHello (type 1, 508 bytes announced, version 1.2): the
/// server's TLS stack waits for the rest.
const PARTIAL_CLIENT_HELLO: &[u8] = &[
    0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03, 0x5a, 0x5a, 0x5a, 0x5a,
];

/// What the flood saw, for the summary.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct FloodReport {
    /// Connections held at once.
    pub connections: usize,
    /// Connections opened over the run (each closed one is opened again).
    pub opened: u64,
    /// Connections the server closed (end of stream or reset), and after how long from the
    /// connect: quantiles in seconds.
    pub closed_by_server: u64,
    pub closed_after_p50_secs: f64,
    pub closed_after_min_secs: f64,
    pub closed_after_max_secs: f64,
    /// Connections the server answered with a byte (a TLS alert): it should say nothing.
    pub answered: u64,
    /// Connections that could not be opened.
    pub connect_failed: u64,
}

pub struct RunningFlood {
    thread: JoinHandle<FloodReport>,
}

impl RunningFlood {
    pub fn stop(self) -> FloodReport {
        self.thread.join().unwrap_or_default()
    }
}

/// Holds `n` stalled handshakes against `addr` from `start_us` to `end_us` (unix µs), opened
/// over the first second, on a thread of its own.
pub fn start(addr: SocketAddr, n: usize, start_us: u64, end_us: u64) -> RunningFlood {
    let thread = std::thread::Builder::new()
        .name("load-flood".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            let local = tokio::task::LocalSet::new();
            let closes = local.block_on(&rt, async move {
                let tasks: Vec<_> = (0..n)
                    .map(|i| {
                        tokio::task::spawn_local(async move {
                            let delay = Duration::from_micros(
                                start_us.saturating_sub(unix_us())
                                    + (i as u64 * 1_000_000 / n.max(1) as u64),
                            );
                            tokio::time::sleep(delay).await;
                            hold(addr, i % 2 == 0, end_us).await
                        })
                    })
                    .collect();
                let mut all = Vec::new();
                for t in tasks {
                    all.push(t.await.unwrap_or_default());
                }
                all
            });
            let mut report = FloodReport {
                connections: n,
                ..FloodReport::default()
            };
            let mut after = Vec::new();
            for c in closes {
                report.opened += c.opened;
                report.answered += c.answered;
                report.connect_failed += c.connect_failed;
                after.extend(c.closed_after);
            }
            after.sort_by(f64::total_cmp);
            report.closed_by_server = after.len() as u64;
            if !after.is_empty() {
                report.closed_after_p50_secs = after[after.len() / 2];
                report.closed_after_min_secs = after[0];
                report.closed_after_max_secs = after[after.len() - 1];
            }
            report
        })
        .expect("a thread");
    RunningFlood { thread }
}

/// One flood slot's record.
#[derive(Default)]
struct Slot {
    opened: u64,
    answered: u64,
    connect_failed: u64,
    closed_after: Vec<f64>,
}

/// One slot: a stalled handshake, opened again each time the server closes it, until `end_us`.
async fn hold(addr: SocketAddr, partial: bool, end_us: u64) -> Slot {
    let mut slot = Slot::default();
    let end = tokio::time::Instant::now() + Duration::from_micros(end_us.saturating_sub(unix_us()));
    while tokio::time::Instant::now() < end {
        let Ok(Ok(mut s)) =
            tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await
        else {
            slot.connect_failed += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let opened = tokio::time::Instant::now();
        slot.opened += 1;
        if partial && s.write_all(PARTIAL_CLIENT_HELLO).await.is_err() {
            slot.closed_after.push(opened.elapsed().as_secs_f64());
            continue;
        }
        let mut byte = [0u8; 64];
        match tokio::time::timeout_at(end, s.read(&mut byte)).await {
            // Held to the end of the run: neither closed nor answered.
            Err(_) => break,
            Ok(Ok(n)) if n > 0 => slot.answered += 1,
            Ok(_) => {}
        }
        slot.closed_after.push(opened.elapsed().as_secs_f64());
    }
    slot
}
