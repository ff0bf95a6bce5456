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
//! bitrate. Every source of a run is sent from one thread ([`start`]).

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

/// Sources being sent, all from one thread.
pub struct RunningSources {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<SourceReport>>,
}

impl RunningSources {
    /// Stops every source; their reports, in the order they were given.
    pub fn stop(self) -> Vec<SourceReport> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_else(|_| {
            vec![SourceReport {
                error: Some("source thread panicked".into()),
                ..SourceReport::default()
            }]
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

/// Sends every source's stream from `schedule.t0` until stopped, all from one thread. The
/// sources share the schedule, so one wake-up per piece interval (and per burst of small
/// writes) serves them all: a thread per source would wake 50,000 times a second at 1,000
/// sources, on the cores the server under test runs on, and put its preemptions and evicted
/// caches into the server's figures at many mounts and not at one (the eleventh pass,
/// docs/performance/many-stations.md). A real server's encoders run on other machines.
pub fn start(sources: Vec<(SourceOpts, TcpStream)>, schedule: Schedule) -> RunningSources {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    for (_, stream) in &sources {
        // The server may still send a `200 OK` after `100 Continue`, and nothing else: drain it
        // so that it never sits unread. A thread blocked in `read` never runs again.
        if let Ok(mut r) = stream.try_clone() {
            std::thread::spawn(move || {
                let mut sink = [0u8; 512];
                while matches!(r.read(&mut sink), Ok(n) if n > 0) {}
            });
        }
    }
    let thread = std::thread::Builder::new()
        .name("load-sources".into())
        .spawn(move || send(sources, schedule, &flag))
        .expect("spawn the sources' thread");
    RunningSources { stop, thread }
}

/// One source being sent.
struct Sending {
    o: SourceOpts,
    stream: TcpStream,
    generator: Generator,
    /// This interval's piece, sent a burst at a time.
    piece: Vec<u8>,
    /// Bytes per write, and writes per burst.
    write_bytes: usize,
    per_burst: usize,
    report: SourceReport,
}

fn send(
    sources: Vec<(SourceOpts, TcpStream)>,
    schedule: Schedule,
    stop: &AtomicBool,
) -> Vec<SourceReport> {
    let records = schedule.piece_bytes as usize / RECORD_BYTES;
    let bursts = (schedule.interval_us / BURST_EVERY.as_micros() as u64).max(1) as usize;
    let mut sending: Vec<Sending> = sources
        .into_iter()
        .map(|(o, stream)| {
            let write_bytes = o
                .piece_bytes
                .map_or(schedule.piece_bytes as usize, |b| b.max(1));
            let writes = (schedule.piece_bytes as usize).div_ceil(write_bytes);
            Sending {
                report: SourceReport {
                    mount: o.mount.clone(),
                    ..SourceReport::default()
                },
                o,
                stream,
                generator: Generator::default(),
                piece: Vec::new(),
                write_bytes,
                per_burst: writes.div_ceil(bursts).max(1),
            }
        })
        .collect();
    let start = Instant::now() + Duration::from_micros(schedule.t0_us.saturating_sub(unix_us()));
    for k in 0u64.. {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let due = start + Duration::from_micros(k * schedule.interval_us);
        for burst in 0.. {
            let at = due + BURST_EVERY * burst;
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            let mut more = false;
            for s in sending.iter_mut().filter(|s| s.report.error.is_none()) {
                if burst == 0 {
                    let late = Instant::now().saturating_duration_since(due);
                    s.report.max_late_ms = s.report.max_late_ms.max(late.as_secs_f64() * 1e3);
                    // Stamped as it goes out, after the sources before it in this interval.
                    s.piece = s.generator.piece(records, unix_us());
                }
                let burst_bytes = s.write_bytes * s.per_burst;
                let from = (burst as usize * burst_bytes).min(s.piece.len());
                let to = (from + burst_bytes).min(s.piece.len());
                for part in s.piece[from..to].chunks(s.write_bytes) {
                    if let Err(e) = s.stream.write_all(part) {
                        s.report.error = Some(format!("source {}: {e}", s.o.mount));
                        break;
                    }
                }
                if to < s.piece.len() {
                    more = true;
                } else if s.report.error.is_none() {
                    s.report.sent_bytes = s.generator.offset();
                }
            }
            if !more {
                break;
            }
        }
    }
    sending.into_iter().map(|s| s.report).collect()
}
