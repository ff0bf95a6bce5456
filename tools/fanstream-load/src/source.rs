//! The load source: an Icecast `PUT` as encoders send it, then records at a steady pace.
//!
//! Like ffmpeg and liquidsoap, it sends `Authorization: Basic`, a `Content-Type` and
//! `Expect: 100-continue`, and sends no body before the server answered. Pieces go out on an
//! absolute schedule (piece `k` at `t0 + k * interval`), so a late piece does not shift the ones
//! after it and listeners can tell how many bytes were sent by any instant.
//!
//! With `--piece-bytes` below the scheduled piece, each piece goes out as writes of that many
//! bytes, each its own syscall (and, with `TCP_NODELAY`, its own segment), spread over the
//! piece's interval in bursts every millisecond: a source writing tiny pieces at the same
//! bitrate, whose own thread still keeps the pace.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base64::Engine;

use crate::record::{Generator, RECORD_BYTES};
use crate::schedule::{unix_us, Schedule};

/// How long the server may take to answer the source's request.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Writes smaller than a piece go out in a burst this often.
const BURST_EVERY: Duration = Duration::from_millis(1);

#[derive(Clone, Debug)]
pub struct SourceOpts {
    pub addr: SocketAddr,
    pub mount: String,
    pub user: String,
    pub password: String,
    /// Bytes per write; None: one write per scheduled piece.
    pub piece_bytes: Option<usize>,
}

/// What a source thread reports when it stops.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SourceReport {
    pub mount: String,
    pub sent_bytes: u64,
    /// The latest a piece went out after its scheduled time: the machine's lag, not the server's.
    pub max_late_ms: f64,
    pub error: Option<String>,
}

pub struct RunningSource {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<SourceReport>,
}

impl RunningSource {
    pub fn stop(self) -> SourceReport {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_else(|_| SourceReport {
            error: Some("source thread panicked".into()),
            ..SourceReport::default()
        })
    }
}

/// Connects and waits for the server's go-ahead (`100 Continue` or `200 OK`).
pub fn connect(o: &SourceOpts) -> Result<TcpStream, String> {
    let mut s = TcpStream::connect_timeout(&o.addr, HANDSHAKE_TIMEOUT)
        .map_err(|e| format!("source connect to {}: {e}", o.addr))?;
    s.set_nodelay(true).ok();
    let auth =
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", o.user, o.password));
    let head = format!(
        "PUT {} HTTP/1.1\r\nHost: {}\r\nAuthorization: Basic {auth}\r\nUser-Agent: fanstream-load\r\n\
         Content-Type: audio/mpeg\r\nIce-Name: fanstream-load\r\nIce-Public: 0\r\n\
         Expect: 100-continue\r\n\r\n",
        o.mount, o.addr
    );
    s.write_all(head.as_bytes()).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).ok();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s
            .read(&mut buf)
            .map_err(|e| format!("source {}: no answer: {e}", o.mount))?;
        if n == 0 {
            return Err(format!("source {}: closed before answering", o.mount));
        }
        got.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&got);
    let line = line.lines().next().unwrap_or_default();
    let status = line.split_whitespace().nth(1).unwrap_or_default();
    if status != "100" && status != "200" {
        return Err(format!("source {} refused: {line}", o.mount));
    }
    s.set_read_timeout(None).ok();
    Ok(s)
}

/// Sends the stream from `schedule.t0` until stopped, on its own thread.
pub fn start(o: SourceOpts, stream: TcpStream, schedule: Schedule) -> RunningSource {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    // The server may still send a `200 OK` after `100 Continue`, and nothing else: drain it so
    // that it never fills our receive buffer.
    if let Ok(mut r) = stream.try_clone() {
        std::thread::spawn(move || {
            let mut sink = [0u8; 512];
            while matches!(r.read(&mut sink), Ok(n) if n > 0) {}
        });
    }
    let thread = std::thread::Builder::new()
        .name("load-source".into())
        .spawn(move || send(o, stream, schedule, &flag))
        .expect("spawn source thread");
    RunningSource { stop, thread }
}

fn send(
    o: SourceOpts,
    mut stream: TcpStream,
    schedule: Schedule,
    stop: &AtomicBool,
) -> SourceReport {
    let mut report = SourceReport {
        mount: o.mount.clone(),
        ..SourceReport::default()
    };
    let mut generator = Generator::default();
    let records = schedule.piece_bytes as usize / RECORD_BYTES;
    let write_bytes = o
        .piece_bytes
        .map_or(schedule.piece_bytes as usize, |b| b.max(1));
    let writes = (schedule.piece_bytes as usize).div_ceil(write_bytes);
    let bursts = (schedule.interval_us / BURST_EVERY.as_micros() as u64).max(1) as usize;
    let per_burst = writes.div_ceil(bursts);
    let start = Instant::now() + Duration::from_micros(schedule.t0_us.saturating_sub(unix_us()));
    for k in 0u64.. {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let due = start + Duration::from_micros(k * schedule.interval_us);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        } else {
            report.max_late_ms = report.max_late_ms.max((now - due).as_secs_f64() * 1e3);
        }
        let piece = generator.piece(records, unix_us());
        for (i, part) in piece.chunks(write_bytes).enumerate() {
            if i > 0 && i % per_burst == 0 {
                let at = due + BURST_EVERY * (i / per_burst) as u32;
                let now = Instant::now();
                if at > now {
                    std::thread::sleep(at - now);
                }
            }
            if let Err(e) = stream.write_all(part) {
                report.error = Some(format!("source {}: {e}", o.mount));
                return report;
            }
        }
        report.sent_bytes = generator.offset();
    }
    report
}
