//! The segment store: what a mount retains of its stream, published as one immutable snapshot.
//!
//! The ingest thread is the only writer. Every chunk a source delivers becomes a [`Chunk`] (shared
//! `Bytes`, never copied again) appended to the open segment; a full segment is sealed and shared by
//! every later snapshot. Each append publishes a new [`Snapshot`] through one `ArcSwap`, so a reader
//! (a worker) sees one consistent state: the retained chunks, their byte offsets, the source's state
//! and the stream's response head, with no lock and no second swap to agree with.
//!
//! Each snapshot also carries the mount's settings (`S`, the mount's `MountSettings` in the
//! server): a reload reaches readers with the stream, in the same swap, so no reader sees data
//! of one publication with settings of another. The store knows nothing of what they hold.
//!
//! Offsets are absolute byte counts since the mount was created; they keep counting across source
//! restarts, so a listener's position survives an encoder reconnecting within the grace period.

use std::io::IoSlice;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use bytes::Bytes;

/// A segment is sealed once it holds this many chunks; bounds the per-append copies of chunk
/// lists (the open segment's for each snapshot, the oldest segment's when eviction trims its
/// leading chunks: a few `Bytes` clones each), whatever the window size. Each seal copies the
/// list of sealed segments, so far fewer chunks per segment would make seals the cost.
const SEGMENT_MAX_CHUNKS: usize = 8;
/// ...or this many bytes; bounds how much memory one segment keeps alive past the window.
const SEGMENT_MAX_BYTES: usize = 64 * 1024;

/// Copies a piece read from a source into memory the store may keep, as one allocation or two.
///
/// The allocator (jemalloc) serves a request from the smallest of its size classes that holds
/// it, four classes to each doubling: a 3,200-byte piece (128 kbit/s merged over 200 ms) takes
/// 3,584 bytes, 12% more than it holds. A mount retains its burst in such pieces: at 1,000
/// mounts × 10 listeners the cut saved 4-5 MiB of RSS, back to back (many-stations.md, fourth
/// pass). Cut at the largest class that fits (3,072 bytes, then 128), the two allocations hold
/// their bytes with next to no slack. A piece is cut only
/// where that saves more than a second chunk costs the store; glibc's malloc, with no classes to
/// speak of, loses nothing by it.
pub(crate) fn copy_in(data: &[u8]) -> (Bytes, Option<Bytes>) {
    let head = class_floor(data.len());
    let tail = data.len() - head;
    if head == 0
        || tail == 0
        || class_ceil(data.len()) - data.len() < class_ceil(tail) - tail + CUT_COST
    {
        return (Bytes::copy_from_slice(data), None);
    }
    (
        Bytes::copy_from_slice(&data[..head]),
        Some(Bytes::copy_from_slice(&data[head..])),
    )
}

/// What a second chunk costs: its [`Chunk`] in a segment, and its share of the bookkeeping.
const CUT_COST: usize = 64;

/// The distance between jemalloc's size classes around `n` bytes: four classes per doubling
/// above 64 bytes, every 16 bytes (its quantum) below.
fn class_spacing(n: usize) -> usize {
    let doubling = usize::BITS - 1 - n.max(1).leading_zeros();
    (1usize << doubling.saturating_sub(2)).max(16)
}

/// The largest size class at most `n` (`n` itself if it is one).
fn class_floor(n: usize) -> usize {
    n & !(class_spacing(n) - 1)
}

/// The size class a request of `n` bytes is served from.
fn class_ceil(n: usize) -> usize {
    let floor = class_floor(n);
    if floor == n {
        n
    } else {
        floor + class_spacing(n)
    }
}

/// One piece of the stream as the source delivered it.
#[derive(Clone, Debug)]
pub(crate) struct Chunk {
    /// Absolute offset of the chunk's first byte.
    pub offset: u64,
    pub data: Bytes,
    /// When ingest received it: write coalescing flushes a listener once its oldest unsent byte is
    /// this old.
    pub arrived: Instant,
    /// Where in the chunk a player may first start (a frame or page boundary, as the format layer
    /// found it), if anywhere: join points are chosen among these. A piece a source
    /// sent usually begins with the rest of a frame and goes on with whole ones, so the chunk
    /// marks the first whole frame rather than being stored as two chunks: at a thousand MP3
    /// mounts the second chunk per piece cost about 1.7 MiB (its entry, its share of segments and
    /// snapshots; docs/performance/many-stations.md, eighth pass).
    /// A `u32`, so that the chunk stays 64 bytes (a piece is at most a read, far below 4 GiB).
    join: Option<u32>,
}

impl Chunk {
    /// The stream offset of the chunk's join point, if it has one.
    fn join_at(&self) -> Option<u64> {
        self.join.map(|at| self.offset + u64::from(at))
    }
}

/// What a mount keeps readable behind its live edge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Keep {
    /// Newcomers join at a join point at most this far behind ([`Snapshot::join_point`]): a
    /// chunk that starts further back is not kept for them, even with its mark within the burst
    /// (they join at the next chunk's, at most a piece later).
    pub burst: u64,
    /// What the furthest-behind listener still needs: the chunks it has yet to read.
    pub behind: u64,
}

impl Keep {
    /// This many bytes, for newcomers and listeners behind alike.
    pub fn window(bytes: u64) -> Keep {
        Keep {
            burst: bytes,
            behind: bytes,
        }
    }
}

/// Contiguous chunks, immutable once published.
#[derive(Debug, Default)]
pub(crate) struct Segment {
    chunks: Vec<Chunk>,
}

impl Segment {
    fn start(&self) -> u64 {
        self.chunks.first().map_or(0, |c| c.offset)
    }
}

/// Whether a source feeds the mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum SourceState {
    Live,
    /// The source went away at this instant; listeners wait for the grace period.
    Gone(Instant),
    /// The grace period ended: listeners move to this fallback mount.
    MovedTo(String),
    /// The grace period ended with no fallback: listeners are closed.
    Closed,
}

/// What a listener is sent before the stream's bytes, and what status pages show: built once per
/// source connection.
#[derive(Clone, Debug, Default)]
pub(crate) struct StreamInfo {
    /// The HTTP response head (status line, Content-Type, icy-* headers, blank line).
    pub response_head: Bytes,
    /// Bytes every listener needs first, whatever its join point (the demo's WAV header).
    pub preamble: Bytes,
    pub meta: StreamMeta,
}

impl StreamInfo {
    /// Builds the response head every listener of this stream gets, once: Content-Type, and the
    /// source's description as the `icy-*` headers players show.
    pub fn new(meta: StreamMeta, preamble: Bytes) -> Self {
        let bitrate = meta.bitrate_kbps.map(|b| b.to_string());
        let icy: Vec<(&str, String)> = [
            ("icy-name", &meta.name),
            ("icy-genre", &meta.genre),
            ("icy-description", &meta.description),
            ("icy-url", &meta.url),
            ("icy-pub", &meta.public),
            ("icy-br", &bitrate),
        ]
        .into_iter()
        .filter_map(|(name, value)| Some((name, value.clone()?)))
        .collect();
        StreamInfo {
            response_head: Bytes::from(crate::http::stream_head(&meta.content_type, &icy)),
            preamble,
            meta,
        }
    }
}

/// What is playing now, from the source's metadata updates or its stream's own tags; replaced
/// whole on each change and published with the stream.
#[derive(Debug, Default)]
pub(crate) struct NowPlaying {
    pub title: Option<String>,
    pub artist: Option<String>,
    /// A URL for the song or the show (`StreamUrl` in ICY blocks).
    pub url: Option<String>,
    /// Counts changes since the mount appeared (0: nothing was ever set): an ICY listener is sent
    /// the title again only when this moved since its previous block.
    pub version: u64,
    /// When it last changed, on the wall clock.
    pub updated: Option<std::time::SystemTime>,
    /// The ICY metadata block for it, built once and shared by every ICY listener.
    pub icy_block: Bytes,
}

/// A title and the stream offset it plays from, until the next one.
#[derive(Debug, Clone)]
pub(crate) struct TitleSpan {
    pub from: u64,
    pub now: Arc<NowPlaying>,
}

/// Most titles a snapshot keeps: a station changing its title every second keeps its window's
/// worth, and a listener further behind than the oldest kept hears that one a little early.
const MAX_TITLES: usize = 64;

/// `titles` with `next` playing from `from` on, less those that ended before `start` (the
/// oldest retained byte): what a snapshot keeps.
fn titles_with(titles: &[TitleSpan], start: u64, next: Option<TitleSpan>) -> Arc<[TitleSpan]> {
    let kept = titles.len() + usize::from(next.is_some());
    let ended = titles
        .windows(2)
        .take_while(|pair| pair[1].from <= start)
        .count()
        .max(kept.saturating_sub(MAX_TITLES));
    titles.iter().skip(ended).cloned().chain(next).collect()
}

impl NowPlaying {
    /// What players show: `artist - title`, or whichever of the two is known.
    pub fn display(&self) -> Option<String> {
        match (&self.artist, &self.title) {
            (Some(a), Some(t)) => Some(format!("{a} - {t}")),
            (a, t) => t.clone().or_else(|| a.clone()),
        }
    }

    /// `artist` and `title` as Icecast's status documents give them: apart for a stream that
    /// carries its own tags (Ogg comments, `own_tags`), else all in `title` as players show it
    /// (`artist - title`), where panels and now-playing widgets read it.
    pub fn icecast(&self, own_tags: bool) -> (Option<String>, Option<String>) {
        if own_tags {
            (self.artist.clone(), self.title.clone())
        } else {
            (None, self.display())
        }
    }
}

/// What the source said about its stream (from its `ice-*`/`icy-*` headers), for listeners'
/// `icy-*` headers and the status pages.
#[derive(Clone, Debug, Default)]
pub(crate) struct StreamMeta {
    pub content_type: String,
    pub name: Option<String>,
    pub description: Option<String>,
    pub genre: Option<String>,
    pub url: Option<String>,
    /// `ice-public`: whether the source asked to be listed in directories.
    pub public: Option<String>,
    pub bitrate_kbps: Option<u32>,
    /// `ice-audio-info` as sent (`channels=2;samplerate=44100;bitrate=128`).
    pub audio_info: Option<String>,
    /// When the source connected, on the wall clock (status pages show it as a date).
    pub started: Option<std::time::SystemTime>,
    /// What the format layer found the stream to be (`MP3`, `Vorbis`, `Opus`, ...), once known.
    pub subtype: Option<String>,
    /// The encoder's address and `User-Agent`, for the admin API's stats (none for the demo).
    pub source_ip: Option<String>,
    pub user_agent: Option<String>,
    /// The upstream a relay pulls the stream from (its URL without credentials); none for a
    /// pushed source.
    pub relayed_from: Option<String>,
}

/// One consistent view of a mount, replaced whole on every change.
#[derive(Debug)]
pub(crate) struct Snapshot<S> {
    /// Sealed segments, oldest first; rebuilt only when a segment is sealed or evicted.
    sealed: Arc<[Arc<Segment>]>,
    /// The segment still being filled.
    open: Arc<Segment>,
    /// Offset of the oldest retained byte.
    pub start: u64,
    /// Offset one past the newest byte (the live edge).
    pub end: u64,
    pub state: SourceState,
    pub info: Arc<StreamInfo>,
    /// Header pages a player needs before the stream (Ogg), sent to each new listener.
    pub headers: Bytes,
    /// Where `headers` begin to apply: join points lie at or after it.
    pub headers_from: u64,
    pub now_playing: Arc<NowPlaying>,
    /// The titles that played in the window, oldest first, the last being `now_playing`: a
    /// listener behind the live edge (a newcomer in its burst) hears each one where it began in
    /// the stream, not when it was set.
    pub titles: Arc<[TitleSpan]>,
    /// The mount's settings in force for this publication.
    pub settings: Arc<S>,
    /// The stream as HLS segments and playlist, when the mount has them.
    pub hls: Option<Arc<crate::hls::Window>>,
}

/// Where a position stands relative to a snapshot.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Position {
    /// Data is available from here.
    Behind,
    /// Nothing new to send.
    AtEdge,
    /// The bytes at this position were already evicted from the window.
    Evicted,
}

impl<S> Snapshot<S> {
    pub fn position(&self, pos: u64) -> Position {
        if pos < self.start {
            Position::Evicted
        } else if pos >= self.end {
            Position::AtEdge
        } else {
            Position::Behind
        }
    }

    /// The title playing at stream offset `pos`.
    pub fn title_at(&self, pos: u64) -> &NowPlaying {
        self.titles
            .iter()
            .rev()
            .find(|t| t.from <= pos)
            .or(self.titles.first())
            .map_or(&self.now_playing, |t| &t.now)
    }

    /// Retained bytes: what this mount costs in memory (payload only).
    pub fn retained_bytes(&self) -> u64 {
        self.end - self.start
    }

    fn segments(&self) -> impl Iterator<Item = &Arc<Segment>> {
        self.sealed.iter().chain(std::iter::once(&self.open))
    }

    /// The chunk holding byte `pos`, as (segment index, chunk index), or None outside the window.
    fn locate(&self, pos: u64) -> Option<(usize, usize)> {
        if pos < self.start || pos >= self.end {
            return None;
        }
        let nsealed = self.sealed.len();
        // Segments are in offset order: the last one starting at or before `pos` holds it.
        let seg = if self.open.chunks.first().is_some_and(|c| c.offset <= pos) {
            nsealed
        } else {
            self.sealed.partition_point(|s| s.start() <= pos) - 1
        };
        let chunks = if seg == nsealed {
            &self.open.chunks
        } else {
            &self.sealed[seg].chunks
        };
        let idx = chunks.partition_point(|c| c.offset <= pos) - 1;
        Some((seg, idx))
    }

    /// Chunks from the one holding `pos` to the live edge.
    fn chunks_from(&self, pos: u64) -> impl Iterator<Item = &Chunk> {
        let (seg, idx) = self.locate(pos).unwrap_or((usize::MAX, 0));
        // `skip` jumps straight to the segment (a slice iterator's `nth`), where `skip_while`
        // stepped through every older one: a window holds dozens.
        self.segments()
            .skip(seg)
            .enumerate()
            .flat_map(move |(i, s)| {
                let skip = if i == 0 { idx } else { 0 };
                s.chunks[skip..].iter()
            })
    }

    /// The stream from `pos` on, as the pieces it is stored in (the first one cut at `pos`).
    pub fn pieces_from(&self, pos: u64) -> impl Iterator<Item = &[u8]> {
        self.chunks_from(pos).map(move |c| {
            let skip = pos.saturating_sub(c.offset) as usize;
            &c.data[skip..]
        })
    }

    /// The bytes from `pos` to the next sync point (the rest of the frame or page a listener
    /// stopped inside, after a partial write), at most `max` of them; empty when `pos` is a sync
    /// point or outside the window. A listener leaving the stream gets them first, so that what
    /// it received ends on a whole frame or page.
    pub fn rest_of_frame(&self, pos: u64, max: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for c in self.chunks_from(pos) {
            let skip = pos.saturating_sub(c.offset) as usize;
            // The chunk's bytes up to its join point, if that is still ahead.
            let upto = match c.join_at() {
                Some(at) if at >= pos => (at - c.offset) as usize,
                _ => c.data.len(),
            };
            let take = (upto - skip).min(max - out.len());
            out.extend_from_slice(&c.data[skip..skip + take]);
            if upto < c.data.len() || out.len() >= max {
                break;
            }
        }
        out
    }

    /// When the oldest byte at or after `pos` arrived, for write coalescing.
    pub fn arrival_of(&self, pos: u64) -> Option<Instant> {
        self.chunks_from(pos).next().map(|c| c.arrived)
    }

    /// Fills `out` with slices covering the stream from `pos` on, up to `max_slices` slices or
    /// `max_bytes` bytes, for one vectored write. Returns the number of bytes covered.
    pub fn gather<'a>(
        &'a self,
        pos: u64,
        out: &mut Vec<IoSlice<'a>>,
        max_slices: usize,
        max_bytes: usize,
    ) -> usize {
        let mut total = 0;
        for chunk in self.chunks_from(pos) {
            if out.len() >= max_slices || total >= max_bytes {
                break;
            }
            // Only the first chunk can start before `pos` (a partial write left us mid-chunk).
            let skip = pos.saturating_sub(chunk.offset) as usize;
            let data = &chunk.data[skip..];
            out.push(IoSlice::new(data));
            total += data.len();
        }
        total
    }

    /// The join point for a new listener: the first sync point (a frame or page boundary) at
    /// most `burst` bytes behind the live edge, so a player starts at once with at most `burst`
    /// bytes of backlog, and never before the current header pages apply. Failing that, the live
    /// edge, where the next piece of a stream in sync begins; but with no sync point at all since
    /// the headers (an Ogg stream whose header pages are still arriving), the oldest byte that may
    /// be joined, so that the player gets every header page.
    pub fn join_point(&self, burst: u64) -> u64 {
        let floor = self.start.max(self.headers_from);
        let target = self.end.saturating_sub(burst).max(floor);
        let joins_from = |from: u64| {
            self.chunks_from(from)
                .filter_map(Chunk::join_at)
                .find(move |&at| at >= from)
        };
        if let Some(at) = joins_from(target) {
            return at;
        }
        if joins_from(floor).is_some() {
            self.end
        } else {
            floor.min(self.end)
        }
    }
}

/// A mount's published state; shared by the ingest thread (writer) and all workers (readers).
pub(crate) struct Store<S> {
    current: ArcSwap<Snapshot<S>>,
}

impl<S> Store<S> {
    pub fn load(&self) -> arc_swap::Guard<Arc<Snapshot<S>>> {
        self.current.load()
    }
    pub fn load_full(&self) -> Arc<Snapshot<S>> {
        self.current.load_full()
    }
}

/// The ingest thread's side of a store: the mutable build state behind the published snapshots.
pub(crate) struct StoreWriter<S> {
    store: Arc<Store<S>>,
    sealed: Vec<Arc<Segment>>,
    sealed_shared: Arc<[Arc<Segment>]>,
    open: Vec<Chunk>,
    open_bytes: usize,
    /// Chunks retained, sealed and open: what the mount's memory costs beyond its bytes.
    pieces: usize,
    start: u64,
    end: u64,
    state: SourceState,
    info: Arc<StreamInfo>,
    headers: Bytes,
    headers_from: u64,
    now_playing: Arc<NowPlaying>,
    titles: Arc<[TitleSpan]>,
    settings: Arc<S>,
    hls: Option<Arc<crate::hls::Window>>,
}

impl<S> StoreWriter<S> {
    /// An empty store, closed until a source goes live.
    pub fn new(settings: Arc<S>) -> Self {
        let info = Arc::new(StreamInfo::default());
        let first = Snapshot {
            sealed: Arc::from(Vec::new()),
            open: Arc::new(Segment::default()),
            start: 0,
            end: 0,
            state: SourceState::Closed,
            info: info.clone(),
            headers: Bytes::new(),
            headers_from: 0,
            now_playing: Arc::default(),
            titles: Arc::from(Vec::new()),
            settings: settings.clone(),
            hls: None,
        };
        StoreWriter {
            store: Arc::new(Store {
                current: ArcSwap::from_pointee(first),
            }),
            sealed: Vec::new(),
            sealed_shared: Arc::from(Vec::new()),
            open: Vec::new(),
            open_bytes: 0,
            pieces: 0,
            start: 0,
            end: 0,
            state: SourceState::Closed,
            info,
            headers: Bytes::new(),
            headers_from: 0,
            now_playing: Arc::default(),
            titles: Arc::from(Vec::new()),
            settings,
            hls: None,
        }
    }

    pub fn store(&self) -> &Arc<Store<S>> {
        &self.store
    }

    pub fn settings(&self) -> &Arc<S> {
        &self.settings
    }

    /// Publishes new settings (a reload); they apply from this snapshot on.
    pub fn set_settings(&mut self, settings: Arc<S>) {
        self.settings = settings;
        self.publish();
    }

    pub fn state(&self) -> &SourceState {
        &self.state
    }

    /// The HLS window the next publication carries.
    pub fn set_hls(&mut self, hls: Option<Arc<crate::hls::Window>>) {
        self.hls = hls;
    }

    /// The live edge: the offset the next byte appended gets.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// How many chunks the store retains now.
    pub fn retained_pieces(&self) -> usize {
        self.pieces
    }

    /// Appends one chunk and publishes the new snapshot. `keep` says what behind the live edge
    /// must stay readable (for newcomers, the mount's burst; for those behind, what its
    /// furthest-behind listener needs); `join` is where in the chunk a player may first start,
    /// if anywhere.
    pub fn append(&mut self, data: Bytes, arrived: Instant, keep: Keep, join: Option<usize>) {
        self.push(data, arrived, keep, join);
        self.publish();
    }

    /// As [`Self::append`], without publishing: pieces that arrived together go out in one
    /// snapshot ([`Self::publish`] after the last), not one each.
    pub fn push(&mut self, data: Bytes, arrived: Instant, keep: Keep, join: Option<usize>) {
        if data.is_empty() {
            return;
        }
        let len = data.len();
        let join = join
            .filter(|&at| at < len)
            .and_then(|at| u32::try_from(at).ok());
        self.open.push(Chunk {
            offset: self.end,
            data,
            arrived,
            join,
        });
        self.open_bytes += len;
        self.pieces += 1;
        self.end += len as u64;
        let sealed = self.open.len() >= SEGMENT_MAX_CHUNKS || self.open_bytes >= SEGMENT_MAX_BYTES;
        if sealed {
            let seg = Arc::new(Segment {
                chunks: std::mem::take(&mut self.open),
            });
            self.open_bytes = 0;
            self.sealed.push(seg);
        }
        // On every append, not only when a segment seals: a mount then retains what it must
        // keep, not that plus a whole open segment (up to 8 pieces of a merging source).
        if self.evict(keep) || sealed {
            self.sealed_shared = Arc::from(self.sealed.as_slice());
        }
    }

    /// Drops what no one can be sent any more: the oldest sealed segments, then the leading
    /// chunks of the oldest one left; true if it dropped anything. A chunk goes once the
    /// furthest-behind listener is past it and it starts beyond the burst. The chunk the burst's
    /// far edge falls in goes too: a newcomer joins at the boundary after it, so a mount whose
    /// listeners keep up retains less than its burst, not up to a piece more (at 1,000 mounts,
    /// some 3 MB of 3,200-byte pieces). Each piece is an allocation of its own (ingest copies it
    /// out of its read buffer), so memory comes back a piece at a time, not a segment at a time.
    /// The newest chunk always stays.
    fn evict(&mut self, keep: Keep) -> bool {
        let end = self.end;
        // A chunk from `offset` to `next`.
        let gone = |offset: u64, next: u64| end - next >= keep.behind && end - offset > keep.burst;
        let mut drop = 0;
        while drop + 1 < self.sealed.len() + usize::from(!self.open.is_empty()) {
            let last = self.sealed[drop].chunks.last().map_or(0, |c| c.offset);
            let next_start = self
                .sealed
                .get(drop + 1)
                .map_or_else(|| self.open[0].offset, |s| s.start());
            if gone(last, next_start) {
                drop += 1;
            } else {
                break;
            }
        }
        if drop > 0 {
            self.pieces -= self
                .sealed
                .drain(..drop)
                .map(|s| s.chunks.len())
                .sum::<usize>();
        }
        let mut trimmed = 0;
        if let Some(first) = self.sealed.first() {
            // Never the segment's last chunk, which the whole-segment pass above has weighed.
            let beyond = first
                .chunks
                .windows(2)
                .take_while(|pair| gone(pair[0].offset, pair[1].offset))
                .count();
            if beyond > 0 {
                self.pieces -= beyond;
                self.sealed[0] = Arc::new(Segment {
                    chunks: first.chunks[beyond..].to_vec(),
                });
            }
            trimmed = beyond;
        }
        self.start = self
            .sealed
            .first()
            .map(|s| s.start())
            .or_else(|| self.open.first().map(|c| c.offset))
            .unwrap_or(self.end);
        if self.titles.get(1).is_some_and(|t| t.from <= self.start) {
            self.titles = titles_with(&self.titles, self.start, None);
        }
        drop + trimmed > 0
    }

    /// `now` plays from the live edge on.
    fn set_title(&mut self, now: NowPlaying) {
        self.now_playing = Arc::new(now);
        let span = TitleSpan {
            from: self.end,
            now: self.now_playing.clone(),
        };
        self.titles = titles_with(&self.titles, self.start, Some(span));
    }

    /// A source took the mount: new stream info, state Live, no header pages or title yet (they
    /// belong to the source that sent them).
    pub fn go_live(&mut self, info: StreamInfo) {
        self.info = Arc::new(info);
        self.state = SourceState::Live;
        self.headers = Bytes::new();
        self.headers_from = self.end;
        // A new version with an empty title: ICY listeners who heard the old source's title are
        // told it no longer plays.
        self.set_title(NowPlaying {
            version: self.now_playing.version + 1,
            icy_block: crate::icy::block("", None),
            ..NowPlaying::default()
        });
        self.publish();
    }

    /// New header pages, which apply from the next byte on (the pages themselves are already in
    /// the stream, for listeners connected now).
    pub fn set_headers(&mut self, headers: Bytes) {
        self.headers = headers;
        self.headers_from = self.end;
        self.publish();
    }

    /// A new title (and artist, URL), published with the stream.
    pub fn set_now_playing(
        &mut self,
        title: Option<String>,
        artist: Option<String>,
        url: Option<String>,
    ) {
        let mut now = NowPlaying {
            title,
            artist,
            url,
            version: self.now_playing.version + 1,
            updated: Some(std::time::SystemTime::now()),
            icy_block: Bytes::new(),
        };
        now.icy_block = crate::icy::block(&now.display().unwrap_or_default(), now.url.as_deref());
        self.set_title(now);
        self.publish();
    }

    /// Records what the stream turned out to be; published only when it changed.
    pub fn set_subtype(&mut self, subtype: Option<String>) {
        if self.info.meta.subtype != subtype {
            let mut info = StreamInfo::clone(&self.info);
            info.meta.subtype = subtype;
            self.info = Arc::new(info);
            self.publish();
        }
    }

    /// Replaces what listeners are sent first and status pages show, from the next snapshot on
    /// (the mount's description changed by a reload).
    pub fn set_info(&mut self, info: StreamInfo) {
        self.info = Arc::new(info);
        self.publish();
    }

    /// Publishes a new source state. A closed mount keeps its bytes so that listeners get a last
    /// flush; they are freed with the last snapshot once every worker has let the mount go.
    pub fn set_state(&mut self, state: SourceState) {
        self.state = state;
        self.publish();
    }

    /// Publishes the current state as the next snapshot.
    pub fn publish(&mut self) {
        let snap = Snapshot {
            sealed: self.sealed_shared.clone(),
            open: Arc::new(Segment {
                chunks: self.open.clone(),
            }),
            start: self.start,
            end: self.end,
            state: self.state.clone(),
            info: self.info.clone(),
            headers: self.headers.clone(),
            headers_from: self.headers_from,
            now_playing: self.now_playing.clone(),
            titles: self.titles.clone(),
            settings: self.settings.clone(),
            hls: self.hls.clone(),
        };
        self.store.current.store(Arc::new(snap));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A live store with a fixed window, for appending in tests.
    struct TestWriter {
        w: StoreWriter<u32>,
        window: u64,
    }

    impl TestWriter {
        fn append(&mut self, data: Bytes, arrived: Instant) {
            self.w
                .append(data, arrived, Keep::window(self.window), Some(0));
        }
        /// Appends `data` now, a player able to first start `join` bytes into it, if anywhere.
        fn marked(&mut self, data: impl Into<Bytes>, join: Option<usize>) {
            let keep = Keep::window(self.window);
            self.w.append(data.into(), Instant::now(), keep, join);
        }
        fn store(&self) -> &Arc<Store<u32>> {
            self.w.store()
        }
        fn go_live(&mut self, info: StreamInfo) {
            self.w.go_live(info);
        }
        fn set_state(&mut self, state: SourceState) {
            self.w.set_state(state);
        }
    }

    fn writer(window: u64) -> TestWriter {
        let mut w = StoreWriter::new(Arc::new(1));
        w.go_live(StreamInfo::default());
        TestWriter { w, window }
    }

    fn collect<S>(snap: &Snapshot<S>, pos: u64) -> Vec<u8> {
        let mut out = Vec::new();
        let mut slices = Vec::new();
        snap.gather(pos, &mut slices, usize::MAX, usize::MAX);
        for s in &slices {
            out.extend_from_slice(s);
        }
        out
    }

    fn pattern(n: usize, from: u64) -> Bytes {
        Bytes::from(
            (0..n as u64)
                .map(|i| ((from + i) % 251) as u8)
                .collect::<Vec<_>>(),
        )
    }

    #[test]
    fn memory_comes_back_a_piece_at_a_time_not_a_segment_at_a_time() {
        const PIECE: u64 = 100;
        // A window that ends mid-segment: whole-segment eviction would keep up to a segment
        // more than it.
        let window = 10 * PIECE + 50;
        let mut w = writer(window);
        let start = Instant::now();
        let mut end = 0;
        for _ in 0..10 * SEGMENT_MAX_CHUNKS as u64 {
            w.append(pattern(PIECE as usize, end), start);
            end += PIECE;
            let snap = w.store().load();
            // After every append, at a seal or between seals: at most one piece more than the
            // window (the one the window's first byte is in).
            assert!(
                snap.retained_bytes() < window + PIECE,
                "{} bytes retained for a window of {window}",
                snap.retained_bytes()
            );
            assert!(
                snap.retained_bytes() >= window.min(end),
                "the window is kept"
            );
            assert_eq!(
                collect(&snap, snap.start),
                pattern((end - snap.start) as usize, snap.start).to_vec()
            );
        }
        assert_eq!(
            w.w.retained_pieces() as u64,
            w.store().load().retained_bytes() / PIECE,
            "pieces counted as they go"
        );
    }

    #[test]
    fn the_burst_keeps_only_chunks_a_newcomer_can_join_in() {
        const PIECE: u64 = 100;
        let burst = 10 * PIECE + 50;
        let mut w = writer(1 << 20);
        let start = Instant::now();
        let mut end = 0;
        for _ in 0..10 * SEGMENT_MAX_CHUNKS as u64 {
            let keep = Keep { burst, behind: 0 };
            w.w.append(pattern(PIECE as usize, end), start, keep, Some(0));
            end += PIECE;
            let snap = w.store().load();
            // No listener behind: the chunk the burst's far edge falls in serves no one, since
            // a newcomer joins at the boundary after it.
            assert!(
                snap.retained_bytes() <= burst,
                "{} retained",
                snap.retained_bytes()
            );
            assert!(
                snap.retained_bytes() > burst.min(end) - PIECE,
                "the burst is kept"
            );
            assert_eq!(
                snap.start,
                snap.join_point(burst),
                "a newcomer joins at the first byte"
            );
        }
        // A listener mid-chunk, further back than the burst, keeps the chunk it is in and all
        // after it, and nothing before.
        let mut w = writer(1 << 20);
        let at = 5 * PIECE + PIECE / 2;
        let mut end = 0;
        for _ in 0..40 {
            let keep = Keep {
                burst,
                behind: (end + PIECE).saturating_sub(at),
            };
            w.w.append(pattern(PIECE as usize, end), start, keep, Some(0));
            end += PIECE;
            if end > at + burst + PIECE {
                let snap = w.store().load();
                assert_eq!(snap.start, 5 * PIECE);
                assert_eq!(
                    collect(&snap, at),
                    pattern((end - at) as usize, at).to_vec()
                );
            }
        }
        // Once it has left, the store shrinks to what newcomers can join in.
        let keep = Keep { burst, behind: 0 };
        w.w.append(pattern(PIECE as usize, end), start, keep, Some(0));
        assert!(w.store().load().retained_bytes() <= burst);
    }

    #[test]
    fn reads_every_byte_from_any_position_across_segments() {
        let mut w = writer(1 << 30);
        let now = Instant::now();
        let mut off = 0u64;
        for i in 0..300 {
            let n = 1 + (i * 37) % 500;
            w.append(pattern(n, off), now);
            off += n as u64;
        }
        let snap = w.store().load_full();
        assert!(snap.sealed.len() >= 4, "test must span several segments");
        assert_eq!(snap.end, off);
        for pos in [0, 1, 499, 500, 12_345, off - 1] {
            let got = collect(&snap, pos);
            assert_eq!(got.len() as u64, off - pos, "length from {pos}");
            assert_eq!(
                got,
                pattern((off - pos) as usize, pos).to_vec(),
                "bytes from {pos}"
            );
        }
        assert!(collect(&snap, off).is_empty());
    }

    fn copied_in(data: &[u8]) -> Vec<Bytes> {
        let (head, tail) = copy_in(data);
        std::iter::once(head).chain(tail).collect()
    }

    #[test]
    fn copies_are_cut_at_size_classes() {
        // jemalloc's classes from 2 KiB to 8 KiB, and a few small ones.
        for class in [
            16, 32, 48, 64, 80, 96, 112, 128, 160, 2048, 2560, 3072, 3584, 4096, 5120,
        ] {
            assert_eq!(class_floor(class), class);
            assert_eq!(class_ceil(class), class);
        }
        assert_eq!(class_ceil(3200), 3584);
        assert_eq!(class_floor(3200), 3072);
        assert_eq!(class_ceil(100), 112);
        let data: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
        let parts: Vec<Bytes> = copied_in(&data[..3200]);
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [3072, 128]
        );
        assert_eq!(parts.concat(), data[..3200]);
        // A class, or a piece whose cut would save less than a chunk costs, stays whole.
        for n in [1, 3072, 3584, 3580, 100] {
            let parts: Vec<Bytes> = copied_in(&data[..n]);
            assert_eq!(parts.len(), 1, "{n} bytes");
            assert_eq!(parts[0], data[..n]);
        }
        // Whatever the length, the parts hold the bytes in order, and cost no more than a
        // whole copy would.
        for n in 1..4096 {
            let parts: Vec<Bytes> = copied_in(&data[..n]);
            assert_eq!(parts.concat(), data[..n], "{n} bytes");
            let cost: usize = parts.iter().map(|p| class_ceil(p.len())).sum();
            assert!(cost <= class_ceil(n), "{n} bytes cost {cost}");
        }
    }

    #[test]
    fn gather_respects_slice_and_byte_limits() {
        let mut w = writer(1 << 30);
        for _ in 0..10 {
            w.append(Bytes::from(vec![7u8; 100]), Instant::now());
        }
        let snap = w.store().load_full();
        let mut v = Vec::new();
        assert_eq!(snap.gather(50, &mut v, 3, usize::MAX), 250);
        assert_eq!(v.len(), 3);
        v.clear();
        assert_eq!(snap.gather(0, &mut v, 64, 150), 200);
    }

    #[test]
    fn retention_is_bounded_by_the_window() {
        let window = 10_000u64;
        let mut w = writer(window);
        for _ in 0..10_000 {
            w.append(Bytes::from(vec![1u8; 333]), Instant::now());
            let snap = w.store().load_full();
            // The window stays readable...
            assert!(snap.retained_bytes() >= window.min(snap.end));
            // ...and no more than one sealed segment plus the open one lies beyond it.
            assert!(
                snap.retained_bytes() <= window + 2 * SEGMENT_MAX_BYTES as u64,
                "retained {} for window {window}",
                snap.retained_bytes()
            );
            let chunks = snap.segments().map(|s| s.chunks.len()).sum::<usize>();
            assert_eq!(w.w.retained_pieces(), chunks, "the count follows eviction");
        }
    }

    #[test]
    fn positions_before_the_window_are_evicted() {
        let mut w = writer(1000);
        for _ in 0..1000 {
            w.append(Bytes::from(vec![0u8; 100]), Instant::now());
        }
        let snap = w.store().load_full();
        assert_eq!(snap.position(0), Position::Evicted);
        assert_eq!(snap.position(snap.end), Position::AtEdge);
        assert_eq!(snap.position(snap.end - 1), Position::Behind);
    }

    #[test]
    fn the_rest_of_a_frame_runs_to_the_next_sync_point() {
        let mut w = writer(1 << 20);
        w.marked(Bytes::from_static(b"aaaa"), Some(0));
        w.marked(Bytes::from_static(b"bb"), None);
        w.marked(Bytes::from_static(b"cccc"), Some(0));
        let snap = w.store().load_full();
        assert_eq!(snap.rest_of_frame(0, 100), b"");
        assert_eq!(snap.rest_of_frame(1, 100), b"aaabb");
        assert_eq!(snap.rest_of_frame(4, 100), b"bb");
        assert_eq!(snap.rest_of_frame(1, 4), b"aaab");
        assert_eq!(snap.rest_of_frame(7, 100), b"ccc");
        assert_eq!(snap.rest_of_frame(10, 100), b"");
    }

    #[test]
    fn a_chunk_stays_64_bytes() {
        // A mount keeps dozens, and every snapshot copies the open segment's: its mark must not
        // make it a cache line longer.
        assert!(std::mem::size_of::<Chunk>() <= 64);
    }

    #[test]
    fn a_chunk_is_joined_at_its_mark_inside_and_a_frame_rest_ends_there() {
        // What a locked MP3 framer stores: each piece is the rest of a frame, then frames.
        let mut w = writer(1 << 20);
        w.marked(Bytes::from_static(b"aaaaBBBB"), Some(4));
        w.marked(Bytes::from_static(b"bbCCCC"), Some(2));
        w.marked(Bytes::from_static(b"cc"), None);
        let snap = w.store().load_full();
        assert_eq!(
            snap.join_point(1 << 20),
            4,
            "the first mark, not the chunk's start"
        );
        assert_eq!(
            snap.join_point(8),
            10,
            "the mark within the burst (from 8 on)"
        );
        assert_eq!(snap.join_point(1), 16, "none within: the live edge");
        assert_eq!(
            snap.rest_of_frame(4, 100),
            b"",
            "a mark is where a frame starts"
        );
        assert_eq!(snap.rest_of_frame(5, 100), b"BBBbb");
        assert_eq!(snap.rest_of_frame(1, 100), b"aaa");
        assert_eq!(snap.rest_of_frame(11, 100), b"CCCcc");
        // A mark past the piece's end (a framer holding bytes back) marks nothing.
        w.marked(Bytes::from_static(b"dd"), Some(2));
        assert_eq!(w.store().load().rest_of_frame(15, 100), b"cdd");
    }

    #[test]
    fn join_point_is_a_chunk_boundary_within_burst() {
        let mut w = writer(1 << 20);
        let mut boundaries = vec![];
        for i in 0..200 {
            boundaries.push(w.store().load().end);
            w.append(Bytes::from(vec![0u8; 100 + i]), Instant::now());
        }
        let snap = w.store().load_full();
        let jp = snap.join_point(5000);
        assert!(boundaries.contains(&jp), "{jp} is not a chunk boundary");
        assert!(snap.end - jp <= 5000);
        assert!(
            snap.end - jp > 5000 - 300,
            "burst too small: {}",
            snap.end - jp
        );
        assert_eq!(snap.join_point(0), snap.end);
        assert_eq!(snap.join_point(u64::MAX), 0);
    }

    #[test]
    fn offsets_continue_across_a_source_restart() {
        let mut w = writer(1 << 20);
        w.append(Bytes::from_static(b"abc"), Instant::now());
        w.set_state(SourceState::Gone(Instant::now()));
        w.go_live(StreamInfo::default());
        w.append(Bytes::from_static(b"def"), Instant::now());
        let snap = w.store().load_full();
        assert_eq!(collect(&snap, 0), b"abcdef");
        assert_eq!(snap.state, SourceState::Live);
    }

    #[test]
    fn arrival_is_that_of_the_chunk_holding_the_position() {
        let mut w = writer(1 << 20);
        let t0 = Instant::now();
        let t1 = t0 + std::time::Duration::from_millis(5);
        w.append(Bytes::from_static(b"aaaa"), t0);
        w.append(Bytes::from_static(b"bbbb"), t1);
        let snap = w.store().load_full();
        assert_eq!(snap.arrival_of(2), Some(t0));
        assert_eq!(snap.arrival_of(4), Some(t1));
        assert_eq!(snap.arrival_of(8), None);
    }

    #[test]
    fn new_settings_are_published_with_the_stream_they_apply_to() {
        let mut w = writer(1 << 20);
        w.append(Bytes::from_static(b"abc"), Instant::now());
        let before = w.store().load_full();
        w.w.set_settings(Arc::new(2));
        let after = w.store().load_full();
        assert_eq!((*before.settings, *after.settings), (1, 2));
        assert_eq!(collect(&after, 0), b"abc", "a reload keeps the stream");
        w.append(Bytes::from_static(b"d"), Instant::now());
        assert_eq!(
            *w.store().load().settings,
            2,
            "later publications keep them"
        );
    }

    #[test]
    fn joins_start_at_sync_points_after_the_current_headers() {
        let mut w = writer(1 << 20);
        // Header pages (not joinable), then data pages at offsets 10, 20, ... (joinable),
        // with unjoinable continuation pieces between them.
        w.marked(vec![0u8; 10], None);
        w.w.set_headers(Bytes::from_static(b"HEADERS"));
        for _ in 0..10 {
            w.marked(vec![1u8; 6], Some(0));
            w.marked(vec![2u8; 4], None);
        }
        let snap = w.store().load_full();
        assert_eq!(snap.end, 110);
        assert_eq!(&snap.headers[..], b"HEADERS");
        assert_eq!(
            snap.join_point(25),
            90,
            "the first sync point within the burst"
        );
        assert_eq!(
            snap.join_point(2),
            110,
            "none after the target: the live edge"
        );
        assert_eq!(snap.join_point(1000), 10, "never before the headers apply");
        // A new source starts a new header epoch.
        w.go_live(StreamInfo::default());
        w.marked(vec![3u8; 5], None);
        let snap = w.store().load_full();
        assert!(snap.headers.is_empty());
        assert_eq!(
            snap.join_point(1000),
            110,
            "no sync point yet: from where this source began"
        );
    }

    /// A listener behind the live edge hears each title where it began in the stream; titles
    /// that ended before the window are let go, and at most `MAX_TITLES` are kept.
    #[test]
    fn titles_are_kept_with_where_they_began_while_they_are_in_the_window() {
        let mut w = writer(1000);
        let title = |snap: &Snapshot<u32>, pos| snap.title_at(pos).title.clone();
        w.w.set_now_playing(Some("A".into()), None, None);
        w.append(pattern(600, 0), Instant::now());
        w.w.set_now_playing(Some("B".into()), None, None);
        w.append(pattern(300, 600), Instant::now());
        let snap = w.store().load_full();
        assert_eq!(title(&snap, 0).as_deref(), Some("A"));
        assert_eq!(title(&snap, 599).as_deref(), Some("A"));
        assert_eq!(title(&snap, 600).as_deref(), Some("B"));
        assert_eq!(title(&snap, 900).as_deref(), Some("B"));
        // Once the window has moved past B's start, A is gone.
        for i in 0..10 {
            w.append(pattern(300, 900 + i * 300), Instant::now());
        }
        let snap = w.store().load_full();
        assert!(snap.start > 600, "{}", snap.start);
        let kept: Vec<_> = snap.titles.iter().map(|t| t.now.title.clone()).collect();
        assert_eq!(kept, [Some("B".to_string())]);
        assert_eq!(title(&snap, snap.start).as_deref(), Some("B"));
        // A title a second or faster: the oldest go past MAX_TITLES.
        for i in 0..MAX_TITLES + 10 {
            w.w.set_now_playing(Some(format!("T{i}")), None, None);
            w.append(pattern(1, 0), Instant::now());
        }
        let snap = w.store().load_full();
        assert_eq!(snap.titles.len(), MAX_TITLES);
        assert_eq!(
            snap.titles.last().unwrap().now.version,
            snap.now_playing.version
        );
    }

    #[test]
    fn each_title_change_is_a_new_version_with_its_block() {
        let mut w = writer(1 << 20);
        let first = w.store().load().now_playing.version;
        w.w.set_now_playing(Some("Song".into()), Some("Band".into()), None);
        let snap = w.store().load_full();
        let np = &snap.now_playing;
        assert_eq!(np.version, first + 1);
        assert_eq!(np.display().as_deref(), Some("Band - Song"));
        assert!(np.icy_block[1..].starts_with(b"StreamTitle='Band - Song';"));
        assert!(np.updated.is_some());
        w.go_live(StreamInfo::default());
        let np = w.store().load().now_playing.clone();
        assert_eq!((np.version, np.title.clone()), (first + 2, None));
        assert!(np.icy_block[1..].starts_with(b"StreamTitle='';"));
    }
}
