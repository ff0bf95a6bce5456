//! fanstream: a live broadcast streaming server. One source per mount, the same bytes to many
//! listeners over long-lived HTTP responses, at a cost per listener close to nothing.
//!
//! # Layout: the data path, stage by stage
//!
//! ```text
//!  encoder ──PUT/SOURCE──▶ acceptor ──▶ worker (request head) ──▶ ingest ──▶ store (ArcSwap<Snapshot>)
//!                                                                     │ one wake-up per worker
//!  player  ◀──long GET──── listener writers on each worker ◀──────────┘
//! ```
//!
//! - [`acceptor`](acceptor): one thread accepts TCP connections and hands each, over a crossbeam
//!   channel, to the least-loaded worker.
//! - [`worker`](worker): N threads, each pinned to a core and running its own current-thread tokio
//!   runtime. A worker reads the request head ([`http`]) and routes it: a listener stays on this
//!   worker; a source ([`source`]) is handed to the ingest thread.
//! - [`ingest`](ingest): one thread reads every source (decoding [`chunked`] bodies), appends each
//!   piece as shared `Bytes` to its mount's [`store`], publishes an immutable snapshot through one
//!   `ArcSwap`, and wakes each worker once. It also runs the [`demo`] generator and the grace timers.
//! - [`listener`](listener): on each worker, one fan-out loop writes every listener of its shard
//!   from the snapshot with vectored writes, coalescing small pieces, applying the lag policy.
//! - [`metrics`] and [`admin`]: Prometheus metrics, per-thread CPU read at scrape time
//!   ([`threads`]), listener-seconds and CPU per listener kept by each worker ([`usage`]), served
//!   from their own thread. [`status`]: `/status.json` and Icecast's `/status-json.xsl`.
//! - [`config`]: defaults, TOML file, validation. [`server`] starts and stops it all.
//!
//! Outside the data path: `bench_api` exposes internals to the criterion benches (`benches/`),
//! and `src/bin/fanstream-load/` is the load tool behind `make load`, `sweep` and `compare`.

pub(crate) mod acceptor;
pub(crate) mod admin;
pub(crate) mod auth;
pub(crate) mod chunked;
pub mod config;
pub(crate) mod demo;
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzzing;
pub(crate) mod http;
pub(crate) mod ingest;
pub(crate) mod listener;
pub(crate) mod metrics;
pub(crate) mod mounts;
pub mod server;
pub(crate) mod source;
pub(crate) mod status;
pub(crate) mod store;
pub(crate) mod threads;
pub(crate) mod usage;
pub(crate) mod worker;

pub use config::{Config, LagPolicy, MountSettings};
pub use server::{Server, Stop};

/// Internals that the criterion benches in `benches/` measure. Not an API: hidden from the
/// docs, and free to change with the internals.
#[doc(hidden)]
pub mod bench_api {
    use std::io::IoSlice;
    use std::sync::Arc;
    use std::time::Instant;

    use bytes::Bytes;

    use crate::store::{Snapshot, StoreWriter, StreamInfo};

    /// A live mount's store, written as ingest writes it.
    pub struct Store(StoreWriter);

    impl Default for Store {
        fn default() -> Self {
            let mut w = StoreWriter::new();
            w.go_live(StreamInfo::default());
            Store(w)
        }
    }

    impl Store {
        /// Appends one chunk and publishes the new snapshot, keeping `window` bytes readable.
        pub fn append(&mut self, data: Bytes, window: u64) {
            self.0.append(data, Instant::now(), window);
        }

        /// The published snapshot, as a worker loads it.
        pub fn load(&self) -> Snap {
            Snap(self.0.store().load_full())
        }
    }

    /// One published snapshot.
    pub struct Snap(Arc<Snapshot>);

    impl Snap {
        /// Offset one past the newest byte.
        pub fn end(&self) -> u64 {
            self.0.end
        }

        /// Slices from `pos` on for one vectored write; returns the bytes covered.
        pub fn gather<'a>(
            &'a self,
            pos: u64,
            out: &mut Vec<IoSlice<'a>>,
            max_slices: usize,
        ) -> usize {
            self.0.gather(pos, out, max_slices, usize::MAX)
        }

        /// Where a new listener starts, `burst` bytes behind the edge.
        pub fn join_point(&self, burst: u64) -> u64 {
            self.0.join_point(burst)
        }
    }

    /// Parses one request head; returns its length, or None if incomplete or refused.
    pub fn parse_request_head(buf: &[u8]) -> Option<usize> {
        crate::http::parse_head(buf).ok().flatten().map(|(_, n)| n)
    }
}
