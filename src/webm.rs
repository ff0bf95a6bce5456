//! WebM and Matroska (EBML elements) at ingest. A player can decode nothing before the stream's
//! header, sent once at its start: the EBML header, the Segment's head, and the Segment's
//! level-1 elements before its first Cluster (SeekHead, Info, Tracks with each codec's private
//! data, Tags...). And it can start only at a Cluster, whose head carries the timestamp its
//! blocks count from. So the framer keeps the header aside for late joiners, as Icecast 2.4 does,
//! and marks each Cluster start as a join point: in a stream with video, only a Cluster whose
//! first video block is a keyframe (a SimpleBlock with its keyframe flag, or a BlockGroup without
//! a ReferenceBlock), since a player joining before one shows nothing, or garbage, until the next.
//!
//! Every byte passes, in order, unchanged. The framer reads element heads (an ID and a size, each
//! a variable-length integer) and steps over bodies it does not need as they arrive: a Cluster is
//! never held whole, whatever its size, known or unknown (live muxers and Chromium's
//! MediaRecorder write all ones; such a Cluster ends at the next level-1 element or EBML header).
//! What it keeps: the header as it gathers (bounded by [`MAX_HEADER_BYTES`], and passed on as
//! well). What it holds back from the stream: a head cut by the end of a push that may be a
//! Cluster's (12 bytes at most), and a Cluster's first bytes until it is known whether a player
//! may start there (bounded by [`MAX_UNDECIDED_BYTES`]). The rest of a push goes on as slices of
//! it, cut where join points are.
//!
//! A new EBML header in the stream (a source that starts a new file on the same connection)
//! starts a new header set, which listeners joining from its first Cluster on get. A stream that
//! is not WebM at all still flows, as it did before there was a parser: until an EBML header is
//! found, each push is a join point and its bytes are counted in [`Event::Unsynced`] (passed, not
//! dropped). Bytes that break a WebM stream later (an element that cannot be where it is) are
//! passed and counted the same way, and the framer looks for the next Cluster or EBML header.

use std::collections::VecDeque;

use bytes::{Buf, Bytes, BytesMut};

use crate::format::{Event, FormatError, MAX_HEADER_BYTES, MAX_LOGICAL_STREAMS};

// Element IDs, with their length marker, as the Matroska specification writes them.
pub(crate) const EBML: u32 = 0x1A45_DFA3;
pub(crate) const SEGMENT: u32 = 0x1853_8067;
pub(crate) const CLUSTER: u32 = 0x1F43_B675;
const SEEK_HEAD: u32 = 0x114D_9B74;
const INFO: u32 = 0x1549_A966;
pub(crate) const TRACKS: u32 = 0x1654_AE6B;
const CUES: u32 = 0x1C53_BB6B;
const ATTACHMENTS: u32 = 0x1941_A469;
const CHAPTERS: u32 = 0x1043_A770;
const TAGS: u32 = 0x1254_C367;
pub(crate) const VOID: u32 = 0xEC;
pub(crate) const CRC32: u32 = 0xBF;
// A Cluster's children.
const TIMESTAMP: u32 = 0xE7;
const SILENT_TRACKS: u32 = 0x5854;
const POSITION: u32 = 0xA7;
const PREV_SIZE: u32 = 0xAB;
pub(crate) const SIMPLE_BLOCK: u32 = 0xA3;
pub(crate) const BLOCK_GROUP: u32 = 0xA0;
const ENCRYPTED_BLOCK: u32 = 0xAF;
// A BlockGroup's.
pub(crate) const BLOCK: u32 = 0xA1;
const REFERENCE_BLOCK: u32 = 0xFB;
// In the header: Tracks, Info and Tags.
pub(crate) const TRACK_ENTRY: u32 = 0xAE;
pub(crate) const TRACK_NUMBER: u32 = 0xD7;
pub(crate) const TRACK_TYPE: u32 = 0x83;
pub(crate) const CODEC_ID: u32 = 0x86;
const TITLE: u32 = 0x7BA9;
const TAG: u32 = 0x7373;
const SIMPLE_TAG: u32 = 0x67C8;
const TAG_NAME: u32 = 0x45A3;
const TAG_STRING: u32 = 0x4487;

/// TrackType of a video track.
const VIDEO: u64 = 1;
/// A SimpleBlock's flag for a keyframe.
const KEYFRAME: u8 = 0x80;
/// The longest element head: a 4-byte ID and an 8-byte size.
pub(crate) const MAX_HEAD: usize = 12;
/// Most bytes of an EBML header: real ones take some 40 (versions and the DocType); a larger
/// claim is taken for garbage that happens to hold the ID, not for a header too large.
pub(crate) const MAX_EBML_HEADER_BYTES: u64 = 4096;
/// Most bytes of a Cluster held back until its first video block shows whether a player may
/// start there: audio blocks muxed before it, or a keyframe in a BlockGroup (whose
/// ReferenceBlock, if any, follows the frame). Past this the Cluster goes on unmarked.
const MAX_UNDECIDED_BYTES: u64 = 256 * 1024;

/// An element head: its ID, its size (None: unknown, all ones), and the bytes it takes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Head {
    pub id: u32,
    pub size: Option<u64>,
    pub len: usize,
}

#[derive(Debug, PartialEq)]
pub(crate) enum Parsed {
    /// Consistent so far: more bytes decide.
    Need,
    /// No element head: the bytes up to this many (from the head's first) show it.
    No(usize),
    Yes(Head),
}

/// Reads an element head from the start of `b`, refusing it at the first byte that shows it is
/// none, so that where a broken stream is resumed does not depend on how its bytes arrived.
pub(crate) fn read_head(b: &[u8]) -> Parsed {
    let Some(&first) = b.first() else {
        return Parsed::Need;
    };
    let id_len = first.leading_zeros() as usize + 1;
    if id_len > 4 {
        return Parsed::No(1);
    }
    let Some(id_bytes) = b.get(..id_len) else {
        return Parsed::Need;
    };
    let id = id_bytes.iter().fold(0u32, |v, &x| v << 8 | u32::from(x));
    // IDs whose value bits are all zeros or all ones are reserved.
    let value_mask = (1u32 << (7 * id_len)) - 1;
    if id & value_mask == 0 || id & value_mask == value_mask {
        return Parsed::No(id_len);
    }
    let Some(&s0) = b.get(id_len) else {
        return Parsed::Need;
    };
    let Some(size_len) = vint_len(s0) else {
        return Parsed::No(id_len + 1);
    };
    let Some((size, _)) = vint(&b[id_len..]) else {
        return Parsed::Need;
    };
    let unknown = (1u64 << (7 * size_len)) - 1;
    Parsed::Yes(Head {
        id,
        size: (size != unknown).then_some(size),
        len: id_len + size_len,
    })
}

/// The bytes a variable-length integer (an element's size, a block's track number) takes, from
/// its first byte; None past 8.
pub(crate) fn vint_len(first: u8) -> Option<usize> {
    let len = first.leading_zeros() as usize + 1;
    (len <= 8).then_some(len)
}

/// A variable-length integer (its length marker taken off) at the start of `b`, and the bytes
/// it takes; None if `b` holds fewer, or its first byte marks no length.
pub(crate) fn vint(b: &[u8]) -> Option<(u64, usize)> {
    let len = vint_len(*b.first()?)?;
    let bytes = b.get(..len)?;
    let value = bytes[1..]
        .iter()
        .fold(u64::from(bytes[0]) & (0xFF >> len), |v, &x| {
            v << 8 | u64::from(x)
        });
    Some((value, len))
}

pub(crate) fn is_level1(id: u32) -> bool {
    matches!(
        id,
        SEEK_HEAD | INFO | TRACKS | CUES | ATTACHMENTS | CHAPTERS | TAGS | CLUSTER
    )
}

/// Whether an element may be a Cluster's child.
pub(crate) fn is_cluster_child(id: u32) -> bool {
    matches!(
        id,
        TIMESTAMP
            | SILENT_TRACKS
            | POSITION
            | PREV_SIZE
            | SIMPLE_BLOCK
            | BLOCK_GROUP
            | ENCRYPTED_BLOCK
            | VOID
            | CRC32
    )
}

/// The children of a master element whose body is `body`, each as (ID, body, bytes taken), as
/// far as they parse with a known size that fits.
pub(crate) fn children(mut body: &[u8]) -> impl Iterator<Item = (u32, &[u8], usize)> {
    std::iter::from_fn(move || {
        let Parsed::Yes(h) = read_head(body) else {
            return None;
        };
        let end = h.len.checked_add(usize::try_from(h.size?).ok()?)?;
        let content = body.get(h.len..end)?;
        body = &body[end..];
        Some((h.id, content, end))
    })
}

pub(crate) fn uint(b: &[u8]) -> u64 {
    b.iter().take(8).fold(0, |v, &x| v << 8 | u64::from(x))
}

/// An EBML string: trailing zeros are padding.
fn text(b: &[u8]) -> String {
    let end = b.iter().rposition(|&x| x != 0).map_or(0, |i| i + 1);
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// A track from the header's Tracks.
#[derive(Clone, Debug, PartialEq)]
struct Track {
    number: u64,
    video: bool,
    codec: &'static str,
}

/// The codec's name for status pages, from its Matroska CodecID.
pub(crate) fn codec_name(id: &[u8]) -> &'static str {
    let end = id.iter().rposition(|&x| x != 0).map_or(0, |i| i + 1);
    match &id[..end] {
        b"A_OPUS" => "Opus",
        b"A_VORBIS" => "Vorbis",
        b"A_FLAC" => "FLAC",
        b"A_MPEG/L3" => "MP3",
        b"A_MPEG/L2" => "MP2",
        b"V_VP8" => "VP8",
        b"V_VP9" => "VP9",
        b"V_AV1" => "AV1",
        b"V_THEORA" => "Theora",
        b"V_MPEG4/ISO/AVC" => "H.264",
        b"V_MPEGH/ISO/HEVC" => "HEVC",
        id if id.starts_with(b"A_AAC") => "AAC",
        id if id.starts_with(b"A_PCM") => "PCM",
        _ => "Unknown",
    }
}

fn read_tracks(body: &[u8]) -> Result<Vec<Track>, FormatError> {
    let mut tracks = Vec::new();
    for (_, entry, _) in children(body).filter(|&(id, ..)| id == TRACK_ENTRY) {
        if tracks.len() == MAX_LOGICAL_STREAMS {
            return Err(FormatError::TooManyStreams);
        }
        let mut track = Track {
            number: 0,
            video: false,
            codec: "Unknown",
        };
        for (id, value, _) in children(entry) {
            match id {
                TRACK_NUMBER => track.number = uint(value),
                TRACK_TYPE => track.video = uint(value) == VIDEO,
                CODEC_ID => track.codec = codec_name(value),
                _ => {}
            }
        }
        tracks.push(track);
    }
    Ok(tracks)
}

/// TITLE and ARTIST from Tags (SimpleTags, which may nest); the first of each counts.
fn read_tags(body: &[u8], title: &mut Option<String>, artist: &mut Option<String>) {
    fn simple_tag(body: &[u8], title: &mut Option<String>, artist: &mut Option<String>) {
        let (mut name, mut value) = (None, None);
        for (id, content, _) in children(body) {
            match id {
                TAG_NAME => name = Some(text(content)),
                TAG_STRING => value = Some(text(content)),
                SIMPLE_TAG => simple_tag(content, title, artist),
                _ => {}
            }
        }
        let (Some(name), Some(value)) = (name, value) else {
            return;
        };
        let slot = if name.eq_ignore_ascii_case("TITLE") {
            title
        } else if name.eq_ignore_ascii_case("ARTIST") {
            artist
        } else {
            return;
        };
        slot.get_or_insert(value);
    }
    for (_, tag, _) in children(body).filter(|&(id, ..)| id == TAG) {
        for (_, st, _) in children(tag).filter(|&(id, ..)| id == SIMPLE_TAG) {
            simple_tag(st, title, artist);
        }
    }
}

/// Where an element head is read.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Place {
    /// Right after an EBML header: the Segment's head.
    Segment,
    /// Inside the Segment, between its level-1 elements.
    Level1,
    /// Inside a Cluster, between its children.
    Cluster,
    /// Inside a BlockGroup of a Cluster whose join point is still undecided.
    BlockGroup,
}

/// What the bytes of an element body are for.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Body {
    /// Passed on unread: audio and video, Cues, and whatever else the framer needs not.
    Skip,
    /// Part of the header: kept (and passed on, for listeners connected since the stream's
    /// start). `from`: where its body starts in the header.
    Header { id: u32, from: usize },
    /// The first bytes of a block in a Cluster whose join point is undecided: its track number
    /// and, in a SimpleBlock, its flags, read into the head buffer.
    BlockStart { simple: bool },
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum State {
    /// No element to place: looking for an EBML header (and, once a header went out, a
    /// Cluster). `window`: the last bytes seen, `seen` how many of them count (at most 4).
    Searching { window: u32, seen: u8 },
    /// Reading an element head that starts at stream offset `start`, into the head buffer.
    Head { place: Place, start: u64 },
    /// In an element body, `left` bytes to go.
    Body { left: u64, body: Body },
}

/// The header of a stream, from its EBML header until its first Cluster.
struct Gathering {
    bytes: BytesMut,
    tracks: Vec<Track>,
    title: Option<String>,
    artist: Option<String>,
}

/// The BlockGroup being read in an undecided Cluster.
struct Group {
    end: u64,
    /// Whether its Block belongs to a video track (None: no Block read yet).
    video: Option<bool>,
    referenced: bool,
}

/// The longest run of the last bytes seen (`window`, `seen` of them) that starts element `id`.
fn partial_match(window: u32, seen: u8, id: u32) -> u64 {
    (1..=u32::from(seen.min(3)))
        .rev()
        .find(|&k| window & ((1 << (8 * k)) - 1) == id >> (8 * (4 - k)))
        .map_or(0, u64::from)
}

/// One source's WebM framer.
pub(crate) struct Framer {
    /// Stream offset of the next byte to parse.
    pos: u64,
    state: State,
    /// The element head (or block start) being read. After a head is read, its bytes stay here
    /// until the next one starts.
    head: [u8; MAX_HEAD],
    head_len: usize,
    /// The header being gathered, from an EBML header to its first Cluster.
    gathering: Option<Gathering>,
    /// A header went out: the stream is WebM, so a Cluster found after garbage is a place to
    /// resume, and pushes are no longer join points by themselves.
    synced: bool,
    /// The tracks of the header that went out last.
    tracks: Vec<Track>,
    /// Inside a Cluster, and where it ends if its size is known.
    in_cluster: bool,
    cluster_end: Option<u64>,
    /// Where the current Cluster starts, while it is not yet known whether a player may start
    /// there: its bytes are held back until then.
    undecided: Option<u64>,
    group: Option<Group>,
    /// Bytes not emitted yet from earlier pushes: the stream from `run_start` to where the
    /// current push starts.
    held: BytesMut,
    run_start: u64,
    /// Join points in the bytes not emitted yet, as stream offsets, in order: each goes out as
    /// the first byte of an event.
    joins: VecDeque<u64>,
    /// Unsynced bytes not reported yet.
    unsynced: usize,
}

impl Framer {
    pub fn new() -> Self {
        Framer {
            pos: 0,
            state: State::Searching { window: 0, seen: 0 },
            head: [0; MAX_HEAD],
            head_len: 0,
            gathering: None,
            synced: false,
            tracks: Vec::new(),
            in_cluster: false,
            cluster_end: None,
            undecided: None,
            group: None,
            held: BytesMut::new(),
            run_start: 0,
            joins: VecDeque::new(),
            unsynced: 0,
        }
    }

    /// The codecs of the stream's tracks, in the order of its Tracks element; None until a
    /// header with tracks is complete.
    pub fn subtype(&self) -> Option<String> {
        if self.tracks.is_empty() {
            return None;
        }
        let names: Vec<&str> = self.tracks.iter().map(|t| t.codec).collect();
        Some(names.join("/"))
    }

    pub fn push(&mut self, data: Bytes, out: &mut Vec<Event>) -> Result<(), FormatError> {
        if data.is_empty() {
            return Ok(());
        }
        let push_start = self.pos;
        if let State::Searching { window, seen } = self.state {
            // A stream that is not WebM (yet) is joined where the source's pieces begin, as
            // before there was a parser; not inside what may be an EBML header's ID.
            if !self.synced && partial_match(window, seen, EBML) == 0 {
                self.joins.push_back(push_start);
            }
        }
        // On a refusal the source ends, and `finish` sends what was parsed before it: the held
        // bytes must then be the stream up to where parsing stopped, as after any push.
        let mut verdict = Ok(());
        let mut i = 0;
        while i < data.len() {
            match self.step(&data, i, push_start, out) {
                Ok(n) => i += n,
                Err(e) => {
                    verdict = Err(e);
                    break;
                }
            }
        }
        if self
            .undecided
            .is_some_and(|start| self.pos - start > MAX_UNDECIDED_BYTES)
        {
            self.undecided = None;
        }
        let keep_from = self.keep_from();
        self.flush_to(keep_from, &data, push_start, out);
        let from = (self.run_start.saturating_sub(push_start)) as usize;
        let parsed = (self.pos - push_start) as usize;
        self.held.extend_from_slice(&data[from..parsed]);
        self.report_unsynced(out);
        verdict
    }

    /// The source ended: what is held goes out as it is.
    pub fn finish(&mut self, out: &mut Vec<Event>) {
        if let State::Searching { seen, .. } = self.state {
            self.unsynced += usize::from(seen);
        }
        self.flush_to(self.pos, &Bytes::new(), self.pos, out);
        self.report_unsynced(out);
    }

    /// Where the bytes held back at the end of a push start: at a Cluster whose join point is
    /// undecided, or at what may be a Cluster's head, cut by the end of the push.
    fn keep_from(&self) -> u64 {
        if let Some(start) = self.undecided {
            return start;
        }
        let cluster = CLUSTER.to_be_bytes();
        match self.state {
            State::Head {
                place: Place::Level1 | Place::Cluster,
                start,
            } => {
                let n = self.head_len.min(4);
                if n > 0 && self.head[..n] == cluster[..n] {
                    start
                } else {
                    self.pos
                }
            }
            State::Searching { window, seen } if self.synced => {
                self.pos - partial_match(window, seen, CLUSTER)
            }
            _ => self.pos,
        }
    }

    /// Emits the stream from `run_start` to `to`, cut at its join points.
    fn flush_to(&mut self, to: u64, data: &Bytes, push_start: u64, out: &mut Vec<Event>) {
        while self.run_start < to {
            while self.joins.front().is_some_and(|&j| j < self.run_start) {
                self.joins.pop_front();
            }
            let joined = self.joins.front() == Some(&self.run_start);
            if joined {
                self.joins.pop_front();
            }
            let end = self
                .joins
                .front()
                .copied()
                .filter(|&j| j < to)
                .unwrap_or(to);
            let bytes = self.take_run((end - self.run_start) as usize, data, push_start);
            out.push(Event::Data {
                bytes,
                join: joined.then_some(0),
            });
        }
    }

    /// The next `n` bytes of the run: held ones first (copied out, so that the held buffer
    /// never shares an allocation with what the store keeps), then shared slices of `data`.
    fn take_run(&mut self, n: usize, data: &Bytes, push_start: u64) -> Bytes {
        let held = self.held.len();
        let bytes = if held == 0 {
            let from = (self.run_start - push_start) as usize;
            data.slice(from..from + n)
        } else if n < held {
            let bytes = Bytes::copy_from_slice(&self.held[..n]);
            self.held.advance(n);
            bytes
        } else {
            let mut run = std::mem::take(&mut self.held);
            run.extend_from_slice(&data[..n - held]);
            run.freeze()
        };
        self.run_start += n as u64;
        bytes
    }

    fn report_unsynced(&mut self, out: &mut Vec<Event>) {
        if self.unsynced > 0 {
            out.push(Event::Unsynced {
                bytes: std::mem::take(&mut self.unsynced),
                dropped: false,
            });
        }
    }

    /// Parses from `data[i..]`; returns how many bytes it took (at least one).
    fn step(
        &mut self,
        data: &Bytes,
        i: usize,
        push_start: u64,
        out: &mut Vec<Event>,
    ) -> Result<usize, FormatError> {
        match self.state {
            State::Searching {
                mut window,
                mut seen,
            } => {
                for (n, &b) in data[i..].iter().enumerate() {
                    if seen == 4 {
                        self.unsynced += 1;
                    } else {
                        seen += 1;
                    }
                    window = window << 8 | u32::from(b);
                    self.pos += 1;
                    if seen == 4 && (window == EBML || (self.synced && window == CLUSTER)) {
                        self.head[..4].copy_from_slice(&window.to_be_bytes());
                        self.head_len = 4;
                        self.state = State::Head {
                            place: Place::Level1,
                            start: self.pos - 4,
                        };
                        return Ok(n + 1);
                    }
                }
                self.state = State::Searching { window, seen };
                Ok(data.len() - i)
            }
            State::Head { place, start } => {
                let had = self.head_len;
                let take = (MAX_HEAD - had).min(data.len() - i);
                self.head[had..had + take].copy_from_slice(&data[i..i + take]);
                match read_head(&self.head[..had + take]) {
                    Parsed::Need => {
                        self.head_len += take;
                        self.pos += take as u64;
                        Ok(take)
                    }
                    Parsed::No(n) => {
                        // The bytes before this push were a consistent head so far: `n > had`.
                        let took = n.saturating_sub(had);
                        self.pos += took as u64;
                        self.head_len = 0;
                        self.lose_sync(start);
                        Ok(took)
                    }
                    Parsed::Yes(h) => {
                        self.pos += (h.len - had) as u64;
                        self.head_len = 0;
                        self.on_head(place, start, h, data, push_start, out)?;
                        Ok(h.len - had)
                    }
                }
            }
            State::Body { left, body } => {
                let take = usize::try_from(left)
                    .unwrap_or(usize::MAX)
                    .min(data.len() - i);
                let bytes = &data[i..i + take];
                let (took, body) = match body {
                    Body::Skip => (take, body),
                    Body::Header { .. } => {
                        if let Some(g) = self.gathering.as_mut() {
                            g.bytes.extend_from_slice(bytes);
                        }
                        (take, body)
                    }
                    Body::BlockStart { simple } => match self.block_start(simple, bytes) {
                        (took, true) => (took, Body::Skip),
                        (took, false) => (took, body),
                    },
                };
                self.pos += took as u64;
                let left = left - took as u64;
                self.state = State::Body { left, body };
                if left == 0 {
                    self.head_len = 0;
                    self.body_done(body)?;
                }
                Ok(took)
            }
        }
    }

    /// Reads a block's first bytes from `bytes` (its body, as far as this push has it) into the
    /// head buffer; returns how many it took, and whether it has read what it needs: the track,
    /// and for a SimpleBlock its flags. A video track's keyframe flag decides the Cluster's join
    /// point; a Block's track is noted for its BlockGroup to decide.
    fn block_start(&mut self, simple: bool, bytes: &[u8]) -> (usize, bool) {
        for (n, &b) in bytes.iter().enumerate() {
            self.head[self.head_len] = b;
            self.head_len += 1;
            let Some(track_len) = vint_len(self.head[0]) else {
                // Not a block a player can read: the next one may decide.
                return (n + 1, true);
            };
            let need = track_len + if simple { 3 } else { 0 };
            if self.head_len < need {
                continue;
            }
            // Whole: the head holds its bytes (0, never a track's number, if it did not).
            let track = vint(&self.head[..track_len]).map_or(0, |(t, _)| t);
            let video = self.tracks.iter().any(|t| t.number == track && t.video);
            if simple {
                if video {
                    let at = self.pos + n as u64 + 1;
                    self.decide(self.head[need - 1] & KEYFRAME != 0, at);
                }
            } else if let Some(g) = self.group.as_mut() {
                g.video = Some(video);
            }
            self.head_len = 0;
            return (n + 1, true);
        }
        (bytes.len(), false)
    }

    /// Where the next element head is read, after an element that ended here: BlockGroups and
    /// Clusters of known size may end here too.
    fn next_head(&mut self) {
        if self.group.as_ref().is_some_and(|g| g.end == self.pos) {
            if let Some(Group {
                video: Some(true),
                referenced,
                ..
            }) = self.group.take()
            {
                self.decide(!referenced, self.pos);
            }
        }
        if self.in_cluster && self.group.is_none() && self.cluster_end == Some(self.pos) {
            self.end_cluster();
        }
        let place = if self.group.is_some() {
            Place::BlockGroup
        } else if self.in_cluster {
            Place::Cluster
        } else {
            Place::Level1
        };
        self.state = State::Head {
            place,
            start: self.pos,
        };
    }

    fn body_done(&mut self, body: Body) -> Result<(), FormatError> {
        let (Body::Header { id, from }, Some(g)) = (body, self.gathering.as_mut()) else {
            self.next_head();
            return Ok(());
        };
        let content = &g.bytes[from..];
        match id {
            EBML => {
                // Garbage that holds the ID rarely holds elements that fill the size after it.
                if children(content).map(|(.., n)| n).sum::<usize>() != content.len() {
                    let start = self.pos - (g.bytes.len() as u64);
                    self.lose_sync(start);
                } else {
                    self.state = State::Head {
                        place: Place::Segment,
                        start: self.pos,
                    };
                }
                return Ok(());
            }
            TRACKS => g.tracks = read_tracks(content)?,
            INFO => {
                if let Some((_, title, _)) = children(content).find(|&(id, ..)| id == TITLE) {
                    g.title.get_or_insert(text(title));
                }
            }
            TAGS => read_tags(content, &mut g.title, &mut g.artist),
            _ => {}
        }
        self.next_head();
        Ok(())
    }

    /// Acts on an element head read at `place`, which starts at `start`; its bytes are in the
    /// head buffer.
    fn on_head(
        &mut self,
        place: Place,
        start: u64,
        h: Head,
        data: &Bytes,
        push_start: u64,
        out: &mut Vec<Event>,
    ) -> Result<(), FormatError> {
        let end = h.size.map(|s| self.pos.saturating_add(s));
        match place {
            Place::Segment if h.id == SEGMENT => {
                self.gather_head(h)?;
                self.next_head();
                Ok(())
            }
            Place::Segment => {
                self.lose_sync(start);
                Ok(())
            }
            Place::Cluster if h.id == EBML || is_level1(h.id) => {
                // An unknown-size Cluster ends here (and a known-size one whose size was wrong:
                // what follows is a level-1 element all the same).
                self.end_cluster();
                self.level1(start, h, end, data, push_start, out)
            }
            Place::Level1 => self.level1(start, h, end, data, push_start, out),
            Place::Cluster => {
                let fits = end.is_some_and(|e| self.cluster_end.is_none_or(|c| e <= c));
                let (Some(end), true) = (end.filter(|_| fits), is_cluster_child(h.id)) else {
                    self.lose_sync(start);
                    return Ok(());
                };
                let block = matches!(h.id, SIMPLE_BLOCK | BLOCK_GROUP | ENCRYPTED_BLOCK);
                if block && !self.tracks.iter().any(|t| t.video) {
                    // Audio only: a Cluster with a block in it is a join point.
                    self.decide(true, self.pos);
                }
                if self.undecided.is_some() && h.id == BLOCK_GROUP {
                    self.group = Some(Group {
                        end,
                        video: None,
                        referenced: false,
                    });
                    self.next_head();
                    return Ok(());
                }
                let body = if self.undecided.is_some() && h.id == SIMPLE_BLOCK {
                    Body::BlockStart { simple: true }
                } else {
                    Body::Skip
                };
                self.enter_body(h, body)
            }
            Place::BlockGroup => {
                let group_end = self.group.as_ref().map_or(0, |g| g.end);
                if end.is_none_or(|e| e > group_end) {
                    self.lose_sync(start);
                    return Ok(());
                }
                let body = match h.id {
                    BLOCK if self.undecided.is_some() => Body::BlockStart { simple: false },
                    REFERENCE_BLOCK => {
                        if let Some(g) = self.group.as_mut() {
                            g.referenced = true;
                        }
                        Body::Skip
                    }
                    _ => Body::Skip,
                };
                self.enter_body(h, body)
            }
        }
    }

    /// A head between the Segment's level-1 elements.
    fn level1(
        &mut self,
        start: u64,
        h: Head,
        end: Option<u64>,
        data: &Bytes,
        push_start: u64,
        out: &mut Vec<Event>,
    ) -> Result<(), FormatError> {
        match h.id {
            EBML if h.size.is_some_and(|s| s <= MAX_EBML_HEADER_BYTES) => {
                self.gathering = Some(Gathering {
                    bytes: BytesMut::new(),
                    tracks: Vec::new(),
                    title: None,
                    artist: None,
                });
                self.gather_head(h)?;
                self.enter_body(h, self.header_body(EBML))
            }
            CLUSTER => {
                if let Some(g) = self.gathering.take() {
                    self.flush_to(start, data, push_start, out);
                    out.push(Event::Headers(g.bytes.freeze()));
                    if g.title.is_some() || g.artist.is_some() {
                        out.push(Event::Tags {
                            title: g.title,
                            artist: g.artist,
                        });
                    }
                    self.tracks = g.tracks;
                    self.synced = true;
                }
                self.in_cluster = true;
                self.cluster_end = end;
                self.undecided = Some(start);
                self.next_head();
                Ok(())
            }
            id if (is_level1(id) || id == VOID || id == CRC32) && end.is_some() => {
                if self.gathering.is_some() {
                    self.gather_head(h)?;
                    self.enter_body(h, self.header_body(id))
                } else {
                    self.enter_body(h, Body::Skip)
                }
            }
            _ => {
                self.lose_sync(start);
                Ok(())
            }
        }
    }

    fn header_body(&self, id: u32) -> Body {
        Body::Header {
            id,
            from: self.gathering.as_ref().map_or(0, |g| g.bytes.len()),
        }
    }

    /// Adds the element head just read to the header, refusing a header that would grow past
    /// [`MAX_HEADER_BYTES`] with the element's body.
    fn gather_head(&mut self, h: Head) -> Result<(), FormatError> {
        let Some(g) = self.gathering.as_mut() else {
            return Ok(());
        };
        // A Segment's size, often unknown, is not part of what the header holds.
        let body = if h.id == SEGMENT {
            0
        } else {
            h.size.unwrap_or(0)
        };
        if (g.bytes.len() + h.len) as u64 + body > MAX_HEADER_BYTES as u64 {
            return Err(FormatError::HeadersTooLarge);
        }
        g.bytes.extend_from_slice(&self.head[..h.len]);
        Ok(())
    }

    fn enter_body(&mut self, h: Head, body: Body) -> Result<(), FormatError> {
        let left = h.size.unwrap_or(0);
        self.state = State::Body { left, body };
        if left == 0 {
            self.body_done(body)?;
        }
        Ok(())
    }

    /// Decides the current Cluster's join point, at stream offset `at`: with `join`, a player may
    /// start at its first byte, unless more than [`MAX_UNDECIDED_BYTES`] went by to tell.
    fn decide(&mut self, join: bool, at: u64) {
        if let Some(start) = self.undecided.take() {
            if join && at - start <= MAX_UNDECIDED_BYTES {
                self.joins.push_back(start);
            }
        }
    }

    fn end_cluster(&mut self) {
        self.in_cluster = false;
        self.cluster_end = None;
        self.undecided = None;
        self.group = None;
    }

    /// The bytes from `start` to here are no element where they are: they pass, counted, and
    /// the framer looks for an EBML header or a Cluster after them. A header being gathered is
    /// abandoned: the next EBML header starts one anew.
    fn lose_sync(&mut self, start: u64) {
        self.unsynced += usize::try_from(self.pos - start).unwrap_or(usize::MAX);
        self.state = State::Searching { window: 0, seen: 0 };
        self.head_len = 0;
        self.gathering = None;
        self.end_cluster();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use super::*;
    use crate::format::testing::{assert_plays, random_pieces, tool, Rng};

    /// A WebM file from ffmpeg, written to a pipe as a live muxer writes it.
    fn encode(args: &[&str]) -> Vec<u8> {
        let mut all = vec!["-v", "error"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["-f", "webm", "-"]);
        let run = tool("ffmpeg", &all);
        assert!(
            run.status.success() && !run.stdout.is_empty(),
            "ffmpeg {all:?}: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        run.stdout
    }

    /// Opus, 8 s, about one Cluster a second, titled.
    fn opus() -> &'static [u8] {
        static FILE: OnceLock<Vec<u8>> = OnceLock::new();
        FILE.get_or_init(|| {
            encode(&[
                "-f",
                "lavfi",
                "-i",
                "sine=frequency=440:duration=8",
                "-c:a",
                "libopus",
                "-metadata",
                "title=T",
                "-metadata",
                "artist=A",
            ])
        })
    }

    /// VP8 with Opus, 6 s, a keyframe each second (where ffmpeg starts a Cluster).
    fn vp8() -> &'static [u8] {
        static FILE: OnceLock<Vec<u8>> = OnceLock::new();
        FILE.get_or_init(|| {
            encode(&[
                "-f",
                "lavfi",
                "-i",
                "testsrc=size=160x120:rate=25:duration=6",
                "-f",
                "lavfi",
                "-i",
                "sine=duration=6",
                "-c:v",
                "libvpx",
                "-g",
                "25",
                "-b:v",
                "200k",
                "-c:a",
                "libopus",
            ])
        })
    }

    /// The stream's level-1 elements after its EBML header and Segment head, as (start, ID,
    /// length), trusting the file's sizes (which ffmpeg writes known for Clusters).
    fn elements(file: &[u8]) -> Vec<(usize, u32, usize)> {
        let Parsed::Yes(ebml) = read_head(file) else {
            panic!("no EBML header");
        };
        let mut at = ebml.len + ebml.size.unwrap() as usize;
        let Parsed::Yes(segment) = read_head(&file[at..]) else {
            panic!("no Segment");
        };
        at += segment.len;
        let mut out = Vec::new();
        while at < file.len() {
            let Parsed::Yes(h) = read_head(&file[at..]) else {
                panic!("no element at {at}");
            };
            let len = h.len + h.size.expect("a known size") as usize;
            out.push((at, h.id, len));
            at += len;
        }
        out
    }

    fn first_cluster(file: &[u8]) -> usize {
        elements(file)
            .iter()
            .find(|e| e.1 == CLUSTER)
            .expect("a Cluster")
            .0
    }

    fn cluster_starts(file: &[u8]) -> Vec<usize> {
        elements(file)
            .iter()
            .filter(|e| e.1 == CLUSTER)
            .map(|e| e.0)
            .collect()
    }

    /// Feeds the pieces in order, then ends the source.
    fn frame_pieces<'a>(pieces: impl IntoIterator<Item = &'a [u8]>) -> (Framer, Vec<Event>) {
        let mut framer = Framer::new();
        let mut out = Vec::new();
        for piece in pieces {
            framer
                .push(Bytes::copy_from_slice(piece), &mut out)
                .expect("a clean stream is accepted");
            assert!(
                framer.held.len() <= MAX_HEAD + MAX_UNDECIDED_BYTES as usize,
                "holds {} bytes",
                framer.held.len()
            );
        }
        framer.finish(&mut out);
        (framer, out)
    }

    fn frame(data: &[u8], piece: usize) -> (Framer, Vec<Event>) {
        frame_pieces(data.chunks(piece))
    }

    /// What a listener connected from the start receives and what the stream says of itself,
    /// whatever the pieces: every byte, the join points (as stream offsets), the header sets
    /// (each with the offset it applies from) and the titles, in order.
    #[derive(Debug, PartialEq)]
    struct Seen {
        data: Vec<u8>,
        joins: Vec<usize>,
        headers: Vec<(usize, Bytes)>,
        tags: Vec<(Option<String>, Option<String>)>,
        unsynced: usize,
    }

    fn seen(events: &[Event]) -> Seen {
        let mut s = Seen {
            data: Vec::new(),
            joins: Vec::new(),
            headers: Vec::new(),
            tags: Vec::new(),
            unsynced: 0,
        };
        for e in events {
            match e {
                Event::Data { bytes, join } => {
                    assert!(!bytes.is_empty(), "an empty Data event");
                    if let Some(k) = join {
                        s.joins.push(s.data.len() + k);
                    }
                    s.data.extend_from_slice(bytes);
                }
                Event::Headers(h) => s.headers.push((s.data.len(), h.clone())),
                Event::Tags { title, artist } => s.tags.push((title.clone(), artist.clone())),
                Event::Unsynced { bytes, dropped } => {
                    assert!(!dropped, "the WebM framer drops nothing");
                    s.unsynced += bytes;
                }
            }
        }
        s
    }

    /// What a listener joining at stream offset `at` (a join point) receives: the header set in
    /// force there, then the stream.
    fn late_joiner(s: &Seen, at: usize) -> Vec<u8> {
        assert!(s.joins.contains(&at), "{at} is no join point");
        let (_, header) = s
            .headers
            .iter()
            .rev()
            .find(|(from, _)| *from <= at)
            .expect("a header set before the join point");
        [&header[..], &s.data[at..]].concat()
    }

    /// The same stream however the encoder's writes split it: byte by byte, in random pieces
    /// small and large, and whole.
    fn split_invariant(name: &str, file: &[u8]) -> Seen {
        let (_, whole) = frame(file, file.len());
        let whole = seen(&whole);
        assert_eq!(whole.data, file, "{name}: every byte passes, in order");
        let (_, bytes) = frame(file, 1);
        let bytes = seen(&bytes);
        assert_eq!(
            (&bytes.joins, &bytes.headers, &bytes.tags, bytes.unsynced),
            (&whole.joins, &whole.headers, &whole.tags, whole.unsynced),
            "{name}: byte by byte"
        );
        assert_eq!(bytes, whole, "{name}: byte by byte");
        let mut rng = Rng(7);
        for most in [2, 13, 700, 5000, 70_000] {
            let (_, events) = frame_pieces(random_pieces(&mut rng, file, most));
            assert_eq!(seen(&events), whole, "{name}: random pieces up to {most}");
        }
        whole
    }

    fn el(id: u32, body: &[u8]) -> Vec<u8> {
        let id = id.to_be_bytes();
        let skip = id.iter().position(|&b| b != 0).unwrap();
        let mut out = id[skip..].to_vec();
        out.push(0x08);
        out.extend_from_slice(&(body.len() as u64).to_be_bytes()[1..]);
        out[id.len() - skip] = 0x01;
        out.extend_from_slice(body);
        out
    }

    /// An element of unknown size, as live muxers write Segments and Chromium Clusters.
    fn unknown(id: u32) -> Vec<u8> {
        let id = id.to_be_bytes();
        let skip = id.iter().position(|&b| b != 0).unwrap();
        [
            &id[skip..],
            &[0x01, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF],
        ]
        .concat()
    }

    #[test]
    fn element_heads() {
        // A 4-byte ID with its marker, a 1-byte size.
        assert_eq!(
            read_head(&[0x1A, 0x45, 0xDF, 0xA3, 0x9F]),
            Parsed::Yes(Head {
                id: EBML,
                size: Some(0x1F),
                len: 5
            })
        );
        // 1-byte ID, 2-byte size.
        assert_eq!(
            read_head(&[0xA3, 0x41, 0x0A]),
            Parsed::Yes(Head {
                id: SIMPLE_BLOCK,
                size: Some(0x10A),
                len: 3
            })
        );
        // All ones, at any length, is an unknown size.
        for size in [
            &[0xFF][..],
            &[0x7F, 0xFF],
            &[0x01, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF],
        ] {
            let head = [&[0x1F, 0x43, 0xB6, 0x75][..], size].concat();
            assert_eq!(
                read_head(&head),
                Parsed::Yes(Head {
                    id: CLUSTER,
                    size: None,
                    len: 4 + size.len()
                })
            );
        }
        // Eight bytes of size, not all ones.
        let head = [0x18, 0x53, 0x80, 0x67, 0x01, 0, 0, 0, 0, 0, 0x01, 0x02];
        assert_eq!(
            read_head(&head),
            Parsed::Yes(Head {
                id: SEGMENT,
                size: Some(0x102),
                len: 12
            })
        );
        // Cut anywhere: more bytes decide.
        for n in 0..head.len() {
            assert_eq!(read_head(&head[..n]), Parsed::Need, "{n} bytes");
        }
        // No ID is longer than 4 bytes, no size longer than 8; reserved IDs are none.
        assert_eq!(read_head(&[0x08, 0, 0, 0, 0]), Parsed::No(1));
        assert_eq!(read_head(&[0xEC, 0x00, 0x80]), Parsed::No(2));
        assert_eq!(read_head(&[0xFF, 0x80]), Parsed::No(1));
        assert_eq!(read_head(&[0x80, 0x80]), Parsed::No(1));
        assert_eq!(read_head(&[0x40, 0x00, 0x80]), Parsed::No(2));
    }

    #[test]
    fn opus_keeps_its_header_and_joins_at_every_cluster() {
        let file = opus();
        let s = split_invariant("opus", file);
        let first = first_cluster(file);
        assert_eq!(s.headers, [(first, Bytes::copy_from_slice(&file[..first]))]);
        // The stream's first byte (before its header came, a listener starts there), then every
        // Cluster.
        let clusters = cluster_starts(file);
        assert!(clusters.len() >= 6, "{} Clusters", clusters.len());
        assert_eq!(s.joins, [&[0][..], &clusters].concat());
        assert_eq!(s.tags, [(Some("T".into()), Some("A".into()))]);
        assert_eq!(s.unsynced, 0);
        let (framer, _) = frame(file, 4096);
        assert_eq!(framer.subtype().as_deref(), Some("Opus"));
        assert_plays("opus.webm", &late_joiner(&s, clusters[3]), "opus");
    }

    #[test]
    fn video_joins_only_at_clusters_that_start_with_a_keyframe() {
        let file = vp8();
        let s = split_invariant("vp8", file);
        let first = first_cluster(file);
        assert_eq!(s.headers, [(first, Bytes::copy_from_slice(&file[..first]))]);
        let clusters = keyframe_clusters(file);
        assert!(clusters.len() >= 5, "{} Clusters", clusters.len());
        assert_eq!(s.joins, [&[0][..], &clusters].concat());
        let (framer, _) = frame(file, 4096);
        assert_eq!(framer.subtype().as_deref(), Some("VP8/Opus"));
        assert_plays("vp8.webm", &late_joiner(&s, clusters[2]), "vp8\nopus");

        // The same Clusters with their first video block's keyframe flag cleared are not.
        let mut edited = file.to_vec();
        for &c in &clusters[1..3] {
            let at = first_video_simple_block(&edited, c).unwrap();
            edited[at] &= !KEYFRAME;
        }
        let (_, events) = frame(&edited, 1000);
        let joins = seen(&events).joins;
        assert_eq!(joins, [&[0][..], &clusters[..1], &clusters[3..]].concat());
    }

    /// The offset of the flags byte of the first SimpleBlock of track 1 (VP8) in the Cluster at
    /// `cluster`, if it has one.
    fn first_video_simple_block(file: &[u8], cluster: usize) -> Option<usize> {
        let Parsed::Yes(h) = read_head(&file[cluster..]) else {
            panic!("no Cluster");
        };
        let body = &file[cluster + h.len..cluster + h.len + h.size.unwrap() as usize];
        let mut at = cluster + h.len;
        for (id, content, n) in children(body) {
            if id == SIMPLE_BLOCK && content[0] == 0x81 {
                return Some(at + (n - content.len()) + 3);
            }
            at += n;
        }
        None
    }

    /// ffmpeg starts a Cluster at each keyframe, and the last one may hold only audio.
    fn keyframe_clusters(file: &[u8]) -> Vec<usize> {
        cluster_starts(file)
            .into_iter()
            .filter(|&c| first_video_simple_block(file, c).is_some_and(|f| file[f] & KEYFRAME != 0))
            .collect()
    }

    /// The file as a live muxer without seeking writes it (Chromium's MediaRecorder): Segment
    /// and Clusters of unknown size.
    fn with_unknown_sizes(file: &[u8]) -> (Vec<u8>, Vec<usize>) {
        let first = first_cluster(file);
        let Parsed::Yes(ebml) = read_head(file) else {
            panic!()
        };
        let segment = ebml.len + ebml.size.unwrap() as usize;
        let Parsed::Yes(seg) = read_head(&file[segment..]) else {
            panic!()
        };
        let mut out = [
            &file[..segment],
            &unknown(SEGMENT),
            &file[segment + seg.len..first],
        ]
        .concat();
        let mut clusters = Vec::new();
        for (at, id, len) in elements(file).into_iter().filter(|e| e.0 >= first) {
            assert_eq!(id, CLUSTER);
            let Parsed::Yes(h) = read_head(&file[at..]) else {
                panic!()
            };
            clusters.push(out.len());
            out.extend_from_slice(&unknown(CLUSTER));
            out.extend_from_slice(&file[at + h.len..at + len]);
        }
        (out, clusters)
    }

    #[test]
    fn unknown_size_clusters_end_at_the_next_cluster() {
        for (name, file, codecs) in [("opus", opus(), "opus"), ("vp8", vp8(), "vp8\nopus")] {
            let known = cluster_starts(file);
            let joined = if name == "vp8" {
                keyframe_clusters(file)
            } else {
                known.clone()
            };
            let (file, clusters) = with_unknown_sizes(file);
            let s = split_invariant(name, &file);
            assert_eq!(s.headers.len(), 1);
            assert_eq!(s.headers[0].0, clusters[0]);
            let expected: Vec<usize> = known
                .iter()
                .zip(&clusters)
                .filter(|(k, _)| joined.contains(k))
                .map(|(_, &c)| c)
                .collect();
            assert_eq!(s.joins, [&[0][..], &expected].concat(), "{name}");
            assert_eq!(s.unsynced, 0);
            assert_plays(
                &format!("unknown-{name}.webm"),
                &late_joiner(&s, clusters[2]),
                codecs,
            );
        }
    }

    /// Cues and Tags after the Clusters pass in the stream; an unknown-size Cluster ends at them.
    #[test]
    fn level1_elements_after_the_clusters_pass() {
        let (file, clusters) = with_unknown_sizes(opus());
        let tags = el(TAGS, &el(TAG, &el(SIMPLE_TAG, &el(TAG_NAME, b"X"))));
        let cues = el(CUES, b"cues");
        let last = *clusters.last().unwrap();
        let input = [&file[..last], &cues, &file[last..], &tags].concat();
        let s = split_invariant("cues and tags", &input);
        assert_eq!(s.headers.len(), 1);
        assert_eq!(s.joins.last(), Some(&(last + cues.len())));
        assert_eq!(s.unsynced, 0);
    }

    /// A BlockGroup is a keyframe when it has no ReferenceBlock, even after its Block.
    #[test]
    fn block_groups_are_keyframes_without_a_reference_block() {
        let ebml = el(EBML, &el(0x4282, b"webm"));
        let video = el(
            TRACK_ENTRY,
            &[
                el(TRACK_NUMBER, &[1]),
                el(TRACK_TYPE, &[1]),
                el(CODEC_ID, b"V_VP9"),
            ]
            .concat(),
        );
        let audio = el(
            TRACK_ENTRY,
            &[
                el(TRACK_NUMBER, &[2]),
                el(TRACK_TYPE, &[2]),
                el(CODEC_ID, b"A_OPUS"),
            ]
            .concat(),
        );
        let header = [ebml, unknown(SEGMENT), el(TRACKS, &[video, audio].concat())].concat();
        let block = |track: u8| el(BLOCK, &[&[0x80 | track, 0, 0, 0][..], &[7; 300]].concat());
        let cluster = |children: &[Vec<u8>]| {
            el(
                CLUSTER,
                &[&[el(TIMESTAMP, &[0])], children].concat().concat(),
            )
        };
        let audio_block = el(SIMPLE_BLOCK, &[0x82, 0, 0, 0x80, 9, 9]);
        let keyframe = cluster(&[audio_block.clone(), el(BLOCK_GROUP, &block(1))]);
        let delta = cluster(&[el(
            BLOCK_GROUP,
            &[block(1), el(REFERENCE_BLOCK, &[0xF0])].concat(),
        )]);
        let audio_only = cluster(&[audio_block]);
        let input = [&header[..], &keyframe, &delta, &audio_only, &keyframe].concat();
        let s = split_invariant("block groups", &input);
        let second_keyframe = header.len() + keyframe.len() + delta.len() + audio_only.len();
        assert_eq!(s.joins, [0, header.len(), second_keyframe]);
        let (framer, _) = frame(&input, 100);
        assert_eq!(framer.subtype().as_deref(), Some("VP9/Opus"));
    }

    #[test]
    fn a_new_ebml_header_starts_a_new_header_set() {
        let (second, clusters) = with_unknown_sizes(vp8());
        let input = [opus(), &second[..]].concat();
        let s = split_invariant("restarted", &input);
        let first = first_cluster(opus());
        let second_first = opus().len() + clusters[0];
        assert_eq!(
            s.headers,
            [
                (first, Bytes::copy_from_slice(&opus()[..first])),
                (
                    second_first,
                    Bytes::copy_from_slice(&input[opus().len()..second_first])
                )
            ]
        );
        let (framer, _) = frame(&input, 4096);
        assert_eq!(framer.subtype().as_deref(), Some("VP8/Opus"));
        let late = *s.joins.last().unwrap();
        assert!(late > second_first);
        assert_plays("restarted.webm", &late_joiner(&s, late), "vp8\nopus");
    }

    #[test]
    fn headers_up_to_the_limit() {
        let ebml = el(EBML, &el(0x4282, b"webm"));
        let segment = unknown(SEGMENT);
        let void = |n: usize| el(VOID, &vec![0; n]);
        let cluster = el(
            CLUSTER,
            &[
                el(TIMESTAMP, &[0]),
                el(SIMPLE_BLOCK, &[0x81, 0, 0, 0x80, 1]),
            ]
            .concat(),
        );
        let fill = MAX_HEADER_BYTES - ebml.len() - segment.len() - void(0).len();
        let fits = [&ebml[..], &segment, &void(fill)].concat();
        assert_eq!(fits.len(), MAX_HEADER_BYTES);
        let (_, events) = frame(&[&fits[..], &cluster].concat(), 4096);
        assert_eq!(seen(&events).headers, [(fits.len(), Bytes::from(fits))]);

        let over = [&ebml[..], &segment, &void(fill + 1), &cluster].concat();
        let mut framer = Framer::new();
        let mut out = Vec::new();
        // Refused at the element's head, before its body is gathered; what came before it
        // still goes out when the source ends.
        assert_eq!(
            framer.push(Bytes::copy_from_slice(&over[..100]), &mut out),
            Err(FormatError::HeadersTooLarge)
        );
        framer.finish(&mut out);
        let head = ebml.len() + segment.len() + void(fill + 1).len() - (fill + 1);
        assert_eq!(seen(&out).data, over[..head]);
    }

    /// Bytes that are no WebM pass as they came, each piece a join point as before there was a
    /// parser, and are counted.
    #[test]
    fn garbage_passes_as_before() {
        let mut rng = Rng(3);
        let garbage: Vec<u8> = (0..300_000).map(|_| rng.next() as u8).collect();
        let pieces = random_pieces(&mut rng, &garbage, 5000);
        let (framer, events) = frame_pieces(pieces.iter().copied());
        let s = seen(&events);
        assert_eq!(s.data, garbage);
        assert_eq!(s.unsynced, garbage.len());
        assert!(s.headers.is_empty());
        assert_eq!(framer.subtype(), None);
        let starts: Vec<usize> = pieces
            .iter()
            .scan(0, |at, p| {
                let start = *at;
                *at += p.len();
                Some(start)
            })
            .collect();
        assert_eq!(s.joins, starts);

        // Garbage in the stream, between Clusters: the stream resumes at the next Cluster.
        let file = opus();
        let clusters = cluster_starts(file);
        let input = [&file[..clusters[2]], &garbage[..2000], &file[clusters[2]..]].concat();
        let s = split_invariant("garbage in the stream", &input);
        assert_eq!(s.unsynced, 2000);
        assert_eq!(s.headers.len(), 1);
        let shifted: Vec<usize> = clusters
            .iter()
            .map(|&c| if c >= clusters[2] { c + 2000 } else { c })
            .collect();
        assert_eq!(s.joins, [&[0][..], &shifted].concat());
        assert_plays("after-garbage.webm", &late_joiner(&s, shifted[3]), "opus");

        // Garbage before it: the stream's header is found after it.
        let input = [&garbage[..1000], file].concat();
        let (_, events) = frame(&input, 4096);
        let s = seen(&events);
        assert_eq!(s.data, input);
        assert_eq!(s.unsynced, 1000);
        assert_eq!(
            s.headers,
            [(
                1000 + clusters[0],
                Bytes::copy_from_slice(&file[..clusters[0]])
            )]
        );
        let joins: Vec<usize> = clusters.iter().map(|c| c + 1000).collect();
        assert_eq!(s.joins, [&[0][..], &joins].concat());
    }

    /// Clusters pass as they arrive: between pushes the framer holds at most a Cluster's first
    /// bytes, up to its first video block's flags (audio blocks may come first), never a Cluster.
    #[test]
    fn clusters_pass_as_they_arrive() {
        for file in [opus(), vp8()] {
            let mut framer = Framer::new();
            let mut out = Vec::new();
            let mut received = 0;
            for piece in file.chunks(1000) {
                framer
                    .push(Bytes::copy_from_slice(piece), &mut out)
                    .unwrap();
                received += piece.len();
                assert!(framer.held.len() < 4096, "holds {}", framer.held.len());
                assert_eq!(seen(&out).data.len() + framer.held.len(), received);
            }
        }
    }

    /// A real stream with bytes changed at random, fed in random pieces: the framer never
    /// panics, passes every byte, and holds no more than it may.
    #[test]
    fn damaged_streams_never_panic() {
        let mut rng = Rng(11);
        for round in 0..60 {
            let mut input = if round % 2 == 0 { opus() } else { vp8() }.to_vec();
            for _ in 0..1 + rng.below(20) {
                let at = rng.below(input.len());
                input[at] = rng.next() as u8;
            }
            if round % 3 == 0 {
                let at = rng.below(input.len());
                input.truncate(at);
            }
            let mut framer = Framer::new();
            let mut out = Vec::new();
            for piece in random_pieces(&mut rng, &input, 3000) {
                if framer
                    .push(Bytes::copy_from_slice(piece), &mut out)
                    .is_err()
                {
                    break;
                }
                assert!(framer.held.len() <= MAX_HEAD + MAX_UNDECIDED_BYTES as usize);
            }
            framer.finish(&mut out);
            let _ = framer.subtype();
            assert!(input.starts_with(&seen(&out).data), "round {round}");
        }
    }
}
