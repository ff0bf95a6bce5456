//! The access log (`access_log = "PATH"`, or `-` for stderr): one line per finished request or
//! listener, in the combined log format Icecast writes, with the seconds connected at the end:
//!
//! ```text
//! 192.0.2.7 - - [30/Nov/2026:03:47:50 +0000] "GET /live HTTP/1.1" 200 1234567 "-" "mpv 0.35" 3600
//! ```
//!
//! Threads hand a [`Record`] over a bounded channel to one writer thread, which formats and
//! writes it: a worker never waits on the disk. When the writer falls behind by [`QUEUE`]
//! records, further ones are dropped and counted, and the writer says how many in the log. On
//! `SIGHUP` the file is reopened, so that logrotate can move it away.

use std::fs::OpenOptions;
use std::io::{self, BufWriter, Write};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crossbeam::channel::{self, Receiver, RecvTimeoutError, Sender, TrySendError};

use crate::dates::Date;
use crate::http::Request;

/// Records waiting for the writer at most.
const QUEUE: usize = 65_536;
/// Longest field kept (a request line, a user agent): a line stays a line.
const MAX_FIELD_BYTES: usize = 1024;

/// One finished request or listener.
#[derive(Debug)]
pub(crate) struct Record {
    pub peer: IpAddr,
    /// When the request arrived.
    pub started: SystemTime,
    /// `GET /live HTTP/1.1`.
    pub request: String,
    pub status: u16,
    /// Bytes sent, response head included.
    pub bytes: u64,
    pub referer: Option<String>,
    pub user_agent: Option<String>,
}

impl Record {
    /// A record of `req` from `peer`, arriving now.
    pub fn of(req: &Request, peer: IpAddr, status: u16, bytes: u64) -> Record {
        let query = if req.query.is_empty() {
            String::new()
        } else {
            format!("?{}", req.query)
        };
        Record {
            peer,
            started: SystemTime::now(),
            request: format!(
                "{} {}{query} HTTP/1.{}",
                req.method.as_str(),
                req.path,
                req.version
            ),
            status,
            bytes,
            referer: req.header("referer").map(String::from),
            user_agent: req.header("user-agent").map(String::from),
        }
    }

    /// The line for this record, written at `ended`.
    fn line(&self, ended: SystemTime) -> String {
        let secs = ended
            .duration_since(self.started)
            .unwrap_or_default()
            .as_secs();
        format!(
            "{} - - [{}] \"{}\" {} {} \"{}\" \"{}\" {secs}\n",
            self.peer,
            Date::of(self.started).clf(),
            field(Some(&self.request)),
            self.status,
            self.bytes,
            field(self.referer.as_deref()),
            field(self.user_agent.as_deref()),
        )
    }
}

/// A field as it goes between quotes: `-` when absent, quotes and control characters escaped so
/// that a client cannot forge a line, and bounded.
fn field(value: Option<&str>) -> String {
    let Some(value) = value.filter(|v| !v.is_empty()) else {
        return "-".into();
    };
    let mut out = String::with_capacity(value.len().min(MAX_FIELD_BYTES));
    for c in value.chars() {
        if out.len() >= MAX_FIELD_BYTES {
            break;
        }
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32 & 0xff)),
            c => out.push(c),
        }
    }
    out
}

enum Msg {
    /// A record, and when its request or listener ended.
    Record(Box<Record>, SystemTime),
    Reopen,
    /// Everything sent before has been written: the writer ends.
    Close,
}

/// The sending end, shared by every thread; a server without `access_log` has none, and
/// recording costs nothing there.
#[derive(Default)]
pub(crate) struct AccessLog {
    tx: Option<Sender<Msg>>,
    /// Records dropped because the writer was behind, not yet reported.
    dropped: Arc<AtomicU64>,
}

impl AccessLog {
    /// Opens `path` (`-` for stderr) for appending, now, so that a bad path stops the start-up
    /// with a message naming the setting; returns the sending end and the writer to run.
    pub fn open(path: &str) -> io::Result<(AccessLog, Writer)> {
        let target = match path {
            "-" => None,
            p => Some(PathBuf::from(p)),
        };
        let out = open(target.as_ref())?;
        let (tx, rx) = channel::bounded(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let log = AccessLog {
            tx: Some(tx),
            dropped: dropped.clone(),
        };
        let writer = Writer {
            rx,
            target,
            out,
            dropped,
        };
        Ok((log, writer))
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    pub fn record(&self, record: Record) {
        if let Some(tx) = &self.tx {
            let msg = Msg::Record(Box::new(record), SystemTime::now());
            if let Err(TrySendError::Full(_)) = tx.try_send(msg) {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Reopens the file (after logrotate moved it).
    pub fn reopen(&self) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Msg::Reopen);
        }
    }

    /// Asks the writer to end once it has written what was sent before.
    pub fn close(&self) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Msg::Close);
        }
    }
}

fn open(target: Option<&PathBuf>) -> io::Result<BufWriter<Box<dyn Write + Send>>> {
    let out: Box<dyn Write + Send> = match target {
        None => Box::new(io::stderr()),
        Some(path) => Box::new(OpenOptions::new().create(true).append(true).open(path)?),
    };
    Ok(BufWriter::new(out))
}

/// The writer thread's side.
pub(crate) struct Writer {
    rx: Receiver<Msg>,
    /// None for stderr.
    target: Option<PathBuf>,
    out: BufWriter<Box<dyn Write + Send>>,
    dropped: Arc<AtomicU64>,
}

impl Writer {
    /// Writes records until told to close, flushing whenever the queue runs empty (so a line is
    /// in the file within moments of its request's end, and a busy server writes in blocks).
    pub fn run(mut self) {
        loop {
            let msg = match self.rx.recv_timeout(Duration::from_secs(1)) {
                Ok(msg) => msg,
                Err(RecvTimeoutError::Timeout) => {
                    self.report_dropped();
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            };
            match msg {
                Msg::Record(r, ended) => self.write(r.line(ended).as_bytes()),
                Msg::Reopen => {
                    let _ = self.out.flush();
                    match open(self.target.as_ref()) {
                        Ok(out) => self.out = out,
                        Err(e) => {
                            tracing::error!(error = %e, path = ?self.target, "access_log cannot be reopened; writing on to the old file")
                        }
                    }
                }
                Msg::Close => break,
            }
            if self.rx.is_empty() {
                self.report_dropped();
                if let Err(e) = self.out.flush() {
                    tracing::warn!(error = %e, "access_log write failed");
                }
            }
        }
        let _ = self.out.flush();
    }

    fn write(&mut self, line: &[u8]) {
        if let Err(e) = self.out.write_all(line) {
            tracing::warn!(error = %e, "access_log write failed");
        }
    }

    fn report_dropped(&mut self) {
        let n = self.dropped.swap(0, Ordering::Relaxed);
        if n > 0 {
            tracing::warn!(
                records = n,
                "access_log: the writer fell behind; records dropped"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn a_record_is_one_combined_log_line_that_cannot_be_forged() {
        let started = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let r = Record {
            peer: "192.0.2.7".parse().unwrap(),
            started,
            request: "GET /live HTTP/1.1".into(),
            status: 200,
            bytes: 1234,
            referer: None,
            user_agent: Some("evil\" 200 1\nfake".into()),
        };
        assert_eq!(
            r.line(started + Duration::from_secs(61)),
            "192.0.2.7 - - [14/Nov/2023:22:13:20 +0000] \"GET /live HTTP/1.1\" 200 1234 \"-\" \"evil\\\" 200 1\\x0afake\" 61\n"
        );
    }
}
