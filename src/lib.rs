//! fanstream: a live broadcast streaming server. One source per mount, the same bytes to many
//! listeners over long-lived HTTP responses, at a cost per listener close to nothing.
//!
//! # The data path, stage by stage
//!
//! ```text
//!  encoder ──PUT/SOURCE──▶ acceptor ──▶ worker: router ──▶ source ──▶ ingest ──▶ store (ArcSwap<Snapshot>)
//!  demo, relay ──────────────────────────────────────────────────────▲    │ wakes its mount's workers
//!  player  ◀──long GET──── fanout on each worker ◀── admission ◀── router ◀┘
//! ```
//!
//! - [`acceptor`](acceptor): one thread accepts TCP connections, on the plain port and the TLS
//!   one, and hands each, over a crossbeam channel, to the least-loaded worker. Behind a trusted
//!   proxy, the client's address comes from the proxy ([`proxy`]) once the worker has read it.
//! - [`worker`](worker): N threads, each pinned to a core and running its own current-thread tokio
//!   runtime. It runs a TLS connection's handshake ([`tls`]; the connection is then a
//!   [`conn::Io`] like a plain one, down to the fan-out's writes). Its router reads the request
//!   head ([`http`]) and hands the request to a stage (or answers `/`, the [`page`]):
//!   [`status`] pages, listener [`admission`], or the [`source`] handshake.
//! - [`source`](source): checks and authenticates an encoder, then hands it to ingest.
//! - [`ingest`](ingest): one thread claims mounts for sources, reads every source (decoding
//!   [`chunked`] bodies), appends each piece as shared `Bytes` to its mount's [`store`], publishes
//!   an immutable snapshot (stream and the mount's settings) through one `ArcSwap`, and wakes
//!   once each worker with listeners of that mount, telling it which mount published. The
//!   [`demo`] is a source like any other, on its own thread, and so is each fallback file
//!   ([`file_source`]); so is a [`relay`], which pulls a mount from another server (on the
//!   `fs-relays` thread); an edge also registers with its origin for spill-over
//!   ([`registration`], a task on that thread). [`fallbacks`] finds where a mount's listeners go
//!   while it has no source.
//! - [`admission`](admission) answers a listener with the stream's head (or, when the mount
//!   is full, redirects it to a registered edge: [`edges`]) and hands it to its
//!   worker's [`fanout`](fanout) loop, which writes the listeners of the mounts that published,
//!   and those whose coalesced write fell due, from the snapshot with vectored writes, applying
//!   the lag policy.
//! - HLS: for a mount with `hls` on, ingest also cuts an MP3 or AAC stream into packed-audio
//!   segments, and an Ogg Opus, Vorbis or FLAC one into fMP4 segments, and renders its playlist
//!   ([`hls`]), published in the same snapshot; the router hands `/MOUNT/index.m3u8` and segment
//!   requests to [`hls_http`], which answers them as cacheable keep-alive HTTP/1.1 responses,
//!   and holds a blocking playlist reload until ingest wakes it with the segment it waits for.
//! - [`metrics`] and [`admin`]: Prometheus metrics, per-thread CPU read at scrape time
//!   ([`threads`]), listener-seconds and CPU per listener kept by each worker ([`usage`]), served
//!   from their own thread. [`status`]: `/status.json` and Icecast's `/status-json.xsl`;
//!   [`page`]: the page at `/` that lists and plays the mounts.
//! - [`admin_api`]: Icecast's admin API (`/admin/stats`, `listclients`, `killclient`,
//!   `moveclients`...) on both ports; what a listener is doing lives on its worker, so kills,
//!   moves and lag reports are messages to the worker holding it ([`conn::Control`]), and
//!   [`clients`] lists each mount's listeners. [`shoutcast`] takes SHOUTcast v1 sources on their
//!   own port; [`playlists`] answers `.m3u`/`.xspf`; [`access_log`] writes a line per finished
//!   request or listener from its own thread.
//! - [`server`] wires the stages and owns their start and stop order; `main.rs` reads flags and
//!   signals.
//!
//! # Layers: how the modules stack
//!
//! Each module imports only from modules listed before it here (checked by reading the `use`
//! lines: there is no import loop), so the lower layers know nothing of the ones above.
//!
//! 1. **Wire and data** (std and crates only): [`http`] (request heads, short responses),
//!    [`chunked`], the stream formats ([`format`], what every parser yields; [`mpeg`] frames;
//!    [`ogg`] pages; [`webm`] elements; [`framing`], which picks one by Content-Type), [`icy`] (metadata blocks
//!    between the audio), [`tls`] (the certificate, a TLS connection the fan-out can write
//!    like a socket, and the client side of a handshake), [`http_client`] (the URL, the
//!    connection, plain or TLS, and the request and response head a relay pulls with and an
//!    edge registers with), [`dates`] (the date formats Icecast and HLS print), [`markup`] (text made safe in XML and
//!    HTML), [`ogg_codecs`] (the
//!    header packets of Opus, Vorbis and FLAC in Ogg, and each packet's duration), [`fmp4`]
//!    (fragmented MP4 for them), [`webm_blocks`] (a WebM stream's audio track, its codec and
//!    packets, for HLS), [`hls`] (MP3 and AAC cut into HLS packed-audio segments, Ogg and WebM
//!    Opus, Vorbis and FLAC into fMP4 ones, and their live playlist), [`store`] (the segment store and its snapshot, generic over the
//!    settings it carries), [`threads`] (named, pinned, CPU-accounted threads), [`series`]
//!    (counters and gauges labelled by mount, light at thousands of mounts), [`open_files`],
//!    [`sd_notify`] (telling systemd the server is ready, reloading or stopping).
//! 2. **Vocabulary** shared by the stages: [`config`], [`cors`] (which web pages may read what,
//!    and the preflight's answer), [`proxy`] (the client's address behind a trusted proxy: the
//!    PROXY protocol header, `X-Forwarded-For`, `Forwarded`), [`reasons`] (`Refusal`,
//!    `Disconnect`: the fixed reason labels), [`metrics`], [`usage`], [`clients`] (who listens to
//!    each mount), [`mounts`] (the mount table), [`fallbacks`] (following a mount's
//!    fallback chain to a live mount), [`edges`] (the edges registered for spill-over),
//!    [`auth`] (with the relay credentials), [`listener_auth`] (a mount's listeners checked
//!    by URL or users file), [`logs`] (log lines that summarise a
//!    flood per reason), [`access_log`] (one line per finished request, to a writer thread),
//!    [`heads`] (request heads not read yet: the per-address limit on them, and the idle one
//!    closed to make room at the limit), [`shared`] (the state every thread shares, `Stop`),
//!    [`conn`] (what one stage hands the next, the guards that count connections, and the one
//!    writer of refusals).
//! 3. **Stages**: [`acceptor`], [`status`], [`page`] (the HTML page at `/`, from the status
//!    document), [`playlists`] (`.m3u`, `.xspf`), [`metadata`] (title updates), [`admission`],
//!    [`fanout`], [`source`], [`shoutcast`] (SHOUTcast v1 sources), [`ingest`], [`demo`],
//!    [`file_source`] (a `fallback_file` played in a loop), [`relay`] (mounts pulled from another server), [`registration`] (an edge
//!    registering with its origin), [`admin_api`] (Icecast's admin commands,
//!    on both ports), [`admin`], [`hls_http`] (HLS playlists and segments as cacheable
//!    keep-alive HTTP/1.1 responses), and [`worker`] (the router, which calls admission, source,
//!    metadata, the admin API, playlists, HLS and status).
//! 4. **Wiring**: [`server`].
//! 5. **Entry**: `main.rs`.
//!
//! Outside the data path: `bench_api` exposes internals to the criterion benches (`benches/`),
//! and `tools/fanstream-load/` is the load tool behind `make load`, `sweep` and `compare`.

// Layer 1: wire and data.
pub(crate) mod chunked;
pub(crate) mod dates;
pub(crate) mod fmp4;
pub(crate) mod format;
pub(crate) mod framing;
pub(crate) mod hls;
pub(crate) mod http;
pub(crate) mod http_client;
pub(crate) mod icy;
pub(crate) mod markup;
pub(crate) mod mpeg;
pub(crate) mod ogg;
pub(crate) mod ogg_codecs;
pub mod open_files;
pub mod sd_notify;
pub(crate) mod series;
pub(crate) mod store;
pub(crate) mod threads;
pub(crate) mod tls;
pub(crate) mod webm;
pub(crate) mod webm_blocks;
// Layer 2: vocabulary.
pub(crate) mod access_log;
pub(crate) mod auth;
pub(crate) mod clients;
pub mod config;
pub(crate) mod conn;
pub(crate) mod cors;
pub(crate) mod edges;
pub(crate) mod fallbacks;
pub(crate) mod heads;
pub(crate) mod listener_auth;
pub(crate) mod logs;
pub(crate) mod metrics;
pub(crate) mod mounts;
pub(crate) mod proxy;
pub(crate) mod reasons;
pub(crate) mod shared;
pub(crate) mod usage;
// Layer 3: stages.
pub(crate) mod acceptor;
pub(crate) mod admin;
pub(crate) mod admin_api;
pub(crate) mod admission;
pub(crate) mod demo;
pub(crate) mod fanout;
pub(crate) mod file_source;
pub(crate) mod hls_http;
pub(crate) mod ingest;
pub(crate) mod metadata;
pub(crate) mod page;
pub(crate) mod playlists;
pub(crate) mod registration;
pub(crate) mod relay;
pub(crate) mod shoutcast;
pub(crate) mod source;
pub(crate) mod status;
pub(crate) mod worker;
// Layer 4: wiring.
pub mod server;

#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzzing;

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

    /// A live mount's store, written as ingest writes it (with no settings attached: the benches
    /// measure the store alone).
    pub struct Store(StoreWriter<()>);

    impl Default for Store {
        fn default() -> Self {
            let mut w = StoreWriter::new(Arc::new(()));
            w.go_live(StreamInfo::default());
            Store(w)
        }
    }

    impl Store {
        /// Appends one chunk and publishes the new snapshot, keeping `window` bytes readable.
        pub fn append(&mut self, data: Bytes, window: u64) {
            self.0.append(
                data,
                Instant::now(),
                crate::store::Keep::window(window),
                Some(0),
            );
        }

        /// The published snapshot, as a worker loads it.
        pub fn load(&self) -> Snap {
            Snap(self.0.store().load_full())
        }
    }

    /// One published snapshot.
    pub struct Snap(Arc<Snapshot<()>>);

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

    /// Pushes `data` through a fresh MP3 framer in 1000-byte pieces, as an encoder writes, and
    /// finishes it; returns the bytes it passed on in Data events.
    pub fn mpeg_frames(data: &[u8]) -> usize {
        use crate::format::Event;
        use crate::mpeg::{Framer, Kind};

        let data = Bytes::copy_from_slice(data);
        let mut framer = Framer::new(Kind::Mp3);
        let mut out = Vec::new();
        for start in (0..data.len()).step_by(1000) {
            framer.push(data.slice(start..(start + 1000).min(data.len())), &mut out);
        }
        framer.finish(&mut out);
        out.iter()
            .map(|e| match e {
                Event::Data { bytes, .. } => bytes.len(),
                _ => 0,
            })
            .sum()
    }

    /// Pushes `data` through a fresh MP3 framer in 1000-byte pieces, and what it passes through
    /// an HLS segmenter (4 s segments), as ingest does for a mount with `hls` on; returns the
    /// bytes of the segments it made.
    pub fn hls_mpeg(data: &[u8]) -> usize {
        hls(
            format_of(crate::hls::Source::Packed(crate::mpeg::Kind::Mp3)),
            crate::hls::Source::Packed(crate::mpeg::Kind::Mp3),
            data,
            1000,
        )
    }

    /// Pushes an Ogg stream (Opus, Vorbis, FLAC) through a new Ogg framer in 4 KiB pieces, and
    /// what it passes through an HLS segmenter making fMP4 segments; returns the bytes of the
    /// segments.
    pub fn hls_ogg(data: &[u8]) -> usize {
        hls(
            format_of(crate::hls::Source::Ogg),
            crate::hls::Source::Ogg,
            data,
            4096,
        )
    }

    /// The parser ingest runs for a stream the segmenter takes.
    fn format_of(source: crate::hls::Source) -> crate::framing::Format {
        use crate::hls::Source;
        use crate::mpeg::Kind;
        crate::framing::Format::for_content_type(match source {
            Source::Packed(Kind::Mp3) => "audio/mpeg",
            Source::Packed(Kind::Adts) => "audio/aac",
            Source::Ogg => "audio/ogg",
            Source::Webm => "audio/webm",
        })
    }

    fn hls(
        mut format: crate::framing::Format,
        source: crate::hls::Source,
        data: &[u8],
        piece: usize,
    ) -> usize {
        use crate::format::Event;
        use crate::hls::{Params, Segmenter, Title};

        let params = Params {
            segment_secs: 4,
            segments: 6,
        };
        let title = Title {
            version: 0,
            title: None,
            artist: None,
        };
        let mut segmenter = Segmenter::new(params);
        segmenter.start_source(Some(source));
        let data = Bytes::copy_from_slice(data);
        let mut out = Vec::new();
        let mut made = 0;
        for start in (0..data.len()).step_by(piece) {
            let _ = format.push(data.slice(start..(start + piece).min(data.len())), &mut out);
            for event in out.drain(..) {
                if let Event::Data { bytes, join } = event {
                    for (run, sync) in crate::format::runs(&bytes, join) {
                        if segmenter.push(&run, sync, params, title) {
                            made += segmenter.window().map_or(0, |w| w.newest_bytes());
                        }
                    }
                }
            }
        }
        made
    }

    /// Pushes `data` through a new Ogg framer in 4 KiB pieces, as a source writes them, and
    /// ends it; returns how many bytes it passed as stream data.
    pub fn ogg_pages(data: &[u8]) -> usize {
        let mut framer = crate::ogg::Framer::new();
        let mut out = Vec::new();
        let mut passed = 0;
        let mut count = |out: &mut Vec<crate::format::Event>| {
            for event in out.drain(..) {
                if let crate::format::Event::Data { bytes, .. } = event {
                    passed += bytes.len();
                }
            }
        };
        for piece in data.chunks(4096) {
            if framer
                .push(Bytes::copy_from_slice(piece), &mut out)
                .is_err()
            {
                break;
            }
            count(&mut out);
        }
        framer.finish(&mut out);
        count(&mut out);
        passed
    }

    /// The TLS server settings fanstream runs with, for the PEM files given, and the most
    /// encrypted bytes a session holds (benches/tls_memory.rs measures a session's memory).
    pub fn tls_server_config(
        cert: &std::path::Path,
        key: &std::path::Path,
    ) -> Result<Arc<rustls::ServerConfig>, String> {
        crate::tls::server_config(cert, key)
    }

    pub const TLS_SESSION_BUFFER_BYTES: usize = crate::tls::SESSION_BUFFER_BYTES;
}
