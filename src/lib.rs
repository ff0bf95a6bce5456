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
