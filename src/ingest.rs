//! The ingest thread: reads every source, appends what arrives to its mount's store, publishes the
//! new snapshot and wakes each worker once.
//!
//! It is the only writer of the stores and of the mount table, so claiming a mount (exactly one
//! source wins), publishing and the grace timers need no locks: they run on one thread, in one
//! current-thread runtime, borrowing the state between awaits only.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::runtime::Runtime;
use tokio::sync::mpsc;
use tokio::task::LocalSet;

use crate::chunked::ChunkedDecoder;
use crate::mounts::Mount;
use crate::server::{stopped, Shared};
use crate::source::SourceConn;
use crate::store::{SourceState, StoreWriter, StreamInfo};
use crate::worker::refuse;

/// Each read buffer allocation; reads fill it piece by piece and each piece is frozen into a
/// chunk that shares the allocation, so small reads do not cost an allocation each.
const READ_BUF_BYTES: usize = 64 * 1024;
/// Below this much free room, the next read gets a fresh allocation.
const MIN_READ_ROOM: usize = 4 * 1024;

/// One mount as ingest keeps it.
struct Entry {
    writer: StoreWriter,
    mount: Arc<Mount>,
    /// Bumped on every claim: a grace timer or a source task from an earlier claim sees that it
    /// no longer owns the mount.
    generation: u64,
}

/// Ingest's state; lives on the ingest thread only.
pub(crate) struct Ingest {
    shared: Arc<Shared>,
    entries: RefCell<HashMap<String, Entry>>,
}

/// Why a claim failed.
pub(crate) enum ClaimError {
    /// A source is live on the mount.
    InUse,
    /// `max_sources` sources are live.
    TooManySources,
}

/// A source's hold on a mount, from a successful claim.
#[derive(Clone, Copy)]
pub(crate) struct Claim {
    generation: u64,
}

impl Ingest {
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Takes `path` for a new source: creates the mount, or revives it within its grace period.
    pub fn claim(&self, path: &str, info: StreamInfo) -> Result<Claim, ClaimError> {
        let mut entries = self.entries.borrow_mut();
        let shared = &self.shared;
        let live = entries
            .values()
            .filter(|e| *e.writer.state() == SourceState::Live)
            .count();
        let taken = entries
            .get(path)
            .is_some_and(|e| *e.writer.state() == SourceState::Live);
        if taken {
            return Err(ClaimError::InUse);
        }
        if live >= shared.config.load().max_sources {
            return Err(ClaimError::TooManySources);
        }
        let entry = entries.entry(path.to_string()).or_insert_with(|| {
            let config = shared.config.load();
            let settings = config.mount(path);
            let writer = StoreWriter::new();
            let mount = Arc::new(Mount {
                path: path.to_string(),
                store: writer.store().clone(),
                settings: ArcSwap::from_pointee(settings),
                inject_panic: config.panic_injection_mount.as_deref() == Some(path),
                listeners: AtomicUsize::new(0),
                listener_peak: AtomicUsize::new(0),
            });
            shared.metrics.new_mount(path);
            shared.mounts.insert(mount.clone());
            Entry {
                writer,
                mount,
                generation: 0,
            }
        });
        entry.generation += 1;
        entry.writer.go_live(info);
        shared.metrics.source_up.with_label_values(&[path]).set(1);
        shared
            .metrics
            .source_connects
            .with_label_values(&[path])
            .inc();
        Ok(Claim {
            generation: entry.generation,
        })
    }

    /// Appends a piece of the stream and wakes the workers. False if the claim is stale.
    pub fn append(&self, path: &str, claim: Claim, data: Bytes) -> bool {
        let mut entries = self.entries.borrow_mut();
        let Some(entry) = entries
            .get_mut(path)
            .filter(|e| e.generation == claim.generation)
        else {
            return false;
        };
        let len = data.len() as u64;
        let window = entry.mount.settings.load().window_bytes();
        entry.writer.append(data, Instant::now(), window);
        let m = &self.shared.metrics;
        m.source_received_bytes
            .with_label_values(&[path])
            .inc_by(len);
        m.retained_bytes
            .with_label_values(&[path])
            .set(entry.writer.store().load().retained_bytes() as i64);
        drop(entries);
        self.shared.wake_workers();
        true
    }

    /// The source went away: listeners wait `source_grace_secs` for another, then move to the
    /// fallback mount or are closed.
    pub fn release(self: &Rc<Self>, path: &str, claim: Claim, reason: &'static str) {
        let grace = {
            let mut entries = self.entries.borrow_mut();
            let Some(entry) = entries
                .get_mut(path)
                .filter(|e| e.generation == claim.generation)
            else {
                return;
            };
            entry.writer.set_state(SourceState::Gone(Instant::now()));
            Duration::from_secs(entry.mount.settings.load().source_grace_secs)
        };
        let m = &self.shared.metrics;
        m.source_up.with_label_values(&[path]).set(0);
        m.source_disconnects
            .with_label_values(&[path, reason])
            .inc();
        self.shared.wake_workers();
        let this = self.clone();
        let path = path.to_string();
        tokio::task::spawn_local(async move {
            tokio::time::sleep(grace).await;
            this.expire(&path, claim);
        });
    }

    /// The grace period ended: if no source came back, the mount closes (or moves its listeners)
    /// and leaves the table.
    fn expire(&self, path: &str, claim: Claim) {
        let mut entries = self.entries.borrow_mut();
        let Some(entry) = entries.get_mut(path) else {
            return;
        };
        if entry.generation != claim.generation
            || !matches!(entry.writer.state(), SourceState::Gone(_))
        {
            return;
        }
        let next = match &entry.mount.settings.load().fallback_mount {
            Some(f) if f != path => SourceState::MovedTo(f.clone()),
            _ => SourceState::Closed,
        };
        tracing::info!(mount = %path, then = ?next, "source did not return within the grace period");
        entry.writer.set_state(next);
        self.shared.mounts.remove(&entry.mount);
        self.shared
            .metrics
            .retained_bytes
            .with_label_values(&[path])
            .set(0);
        entries.remove(path);
        drop(entries);
        self.shared.wake_workers();
    }
}

pub(crate) fn run(
    rt: Runtime,
    shared: Arc<Shared>,
    mut sources: mpsc::UnboundedReceiver<SourceConn>,
    ready: std::sync::mpsc::SyncSender<()>,
) {
    let local = LocalSet::new();
    local.block_on(&rt, async move {
        let ingest = Rc::new(Ingest {
            shared: shared.clone(),
            entries: RefCell::new(HashMap::new()),
        });
        if shared.config.load().startup.demo {
            if let Some(play) = crate::demo::start(ingest.clone()) {
                tokio::task::spawn_local(play);
            }
        }
        // Start-up waits for this: the demo is live before the server says it started.
        let _ = ready.send(());
        let mut stop = shared.stop.clone();
        loop {
            tokio::select! {
                _ = stopped(&mut stop) => break,
                Some(conn) = sources.recv() => {
                    tokio::task::spawn_local(serve_source(ingest.clone(), conn));
                }
            }
        }
        tracing::debug!("ingest stopped");
    });
    // Dropping the LocalSet drops every source task, closing the encoders' connections.
}

/// Claims the mount, answers the encoder, then reads its stream until it ends.
async fn serve_source(ingest: Rc<Ingest>, conn: SourceConn) {
    let shared = ingest.shared.clone();
    let SourceConn {
        stream,
        peer,
        mount,
        info,
        expect_continue,
        chunked,
        leftover,
    } = conn;
    let Ok(mut stream) = TcpStream::from_std(stream) else {
        return;
    };
    let claim = match ingest.claim(&mount, info) {
        Ok(c) => c,
        Err(e) => {
            let (status, phrase, reason) = match e {
                ClaimError::InUse => (403, "Forbidden", "mount_in_use"),
                ClaimError::TooManySources => (503, "Service Unavailable", "too_many_sources"),
            };
            refuse(&shared, &mut stream, peer, status, phrase, &[], reason).await;
            return;
        }
    };
    tracing::info!(%peer, %mount, "source connected");
    let mut answer = Vec::new();
    if expect_continue {
        answer.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
    }
    answer.extend_from_slice(b"HTTP/1.0 200 OK\r\nServer: fanstream\r\n\r\n");
    let reason = match tokio::time::timeout(
        crate::worker::RESPONSE_TIMEOUT,
        stream.write_all(&answer),
    )
    .await
    {
        Ok(Ok(())) => read_stream(&ingest, &mount, claim, &mut stream, chunked, leftover).await,
        _ => "write_error",
    };
    tracing::info!(%peer, %mount, reason, "source disconnected");
    ingest.release(&mount, claim, reason);
}

/// Reads the body until the encoder closes, stalls, or breaks the framing; returns why it ended.
async fn read_stream(
    ingest: &Ingest,
    mount: &str,
    claim: Claim,
    stream: &mut TcpStream,
    chunked: bool,
    leftover: Vec<u8>,
) -> &'static str {
    let timeout = Duration::from_secs(ingest.shared.config.load().source_timeout_secs);
    let mut decoder = chunked.then(ChunkedDecoder::default);
    let mut buf = BytesMut::from(&leftover[..]);
    let mut decoded = BytesMut::new();
    loop {
        if !buf.is_empty() {
            let raw = buf.split().freeze();
            let piece = match decoder.as_mut() {
                None => raw,
                Some(d) => {
                    if decoded.capacity() - decoded.len() < MIN_READ_ROOM {
                        decoded.reserve(READ_BUF_BYTES);
                    }
                    if let Err(e) = d.decode(&raw, &mut decoded) {
                        return e.reason();
                    }
                    decoded.split().freeze()
                }
            };
            if !piece.is_empty() && !ingest.append(mount, claim, piece) {
                return "replaced";
            }
            if decoder.as_ref().is_some_and(|d| d.is_done()) {
                return "end_of_stream";
            }
        }
        if buf.capacity() < MIN_READ_ROOM {
            buf.reserve(READ_BUF_BYTES);
        }
        match tokio::time::timeout(timeout, stream.read_buf(&mut buf)).await {
            Err(_) => return "source_timeout",
            Ok(Ok(0)) => return "closed",
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return "read_error",
        }
    }
}
