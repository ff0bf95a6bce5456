//! MPEG audio frames (MP3, and MP2/MP1) and ADTS frames (AAC), found as a source's bytes arrive, so
//! that every join point of the stream is the first byte of a frame: a player that starts on a
//! header plays at once, one that starts mid-frame searches for seconds.
//!
//! Every byte but the tags passes, in order, unchanged: the framer only decides where the
//! stream's pieces are cut and which cuts a listener may start from. What it holds back at any
//! moment:
//! - at a source's start: its first bytes, up to the 10 of an ID3v2 tag's header;
//! - locked on a stream: the trailing partial frame (or the first bytes of a header or tag);
//! - searching: one candidate header, until the header it announces after its frame length
//!   confirms or refutes it, so at most the longest frame plus a header (MP3: 2,881 + 4 bytes,
//!   MPEG-2.5 layer II at 160 kbit/s and 8 kHz; ADTS: 8,191 + 7 bytes, the largest 13-bit frame
//!   length). Bytes that cannot start a candidate go on at once.
//!
//! Lock takes three headers in a row, each at the length the one before announces, with the same
//! version, layer and sample rate (MP3) or profile, sample rate and channels (ADTS): the first of
//! the three frames goes on unmarked, the second is the first join point. A random header passes a
//! single check about once in 7,000 bytes of noise, two in a row far more rarely, and waiting for a
//! third costs no hold-back because the first frame is already passed on. Once locked, each next
//! header is checked and a wrong one drops back to searching.
//!
//! Tags are left out of the stream, and not counted as unsynced: an ID3v2 tag (with its footer)
//! at a source's start or wherever a frame could start once locked, and an ID3v1 `TAG` block
//! between frames. No listener starts on one (join points are frames), so every tag a player
//! gets is in the middle of its stream, where decoders take it for a broken frame (FFmpeg's
//! "Header missing", mpv's "Error decoding audio"): the leading tag of an encoder that
//! reconnects (FFmpeg writes one), or those between the files a playlist source sends as they
//! are (a file's ID3v1 at its end, the next one's ID3v2). Players do not read titles from them
//! mid-stream; titles reach listeners as ICY metadata. A tag's bytes are skipped as they arrive,
//! so a tag with cover art holds nothing back.
//!
//! A stream that is not MPEG at all must stay joinable as it was before there was a parser: after
//! [`PASS_THROUGH_AFTER`] bytes since the last lock that were not tags, the first unplaced byte of
//! each push is a join point again (the encoder's own boundaries, as near as a held candidate
//! allows), while the search for a lock goes on. Unplaced bytes (not frames, not tags) are counted
//! in [`Event::Unsynced`], with `dropped: false`.
//!
//! [`Framer::subtype`] is None until the first lock: the `Content-Type` says what a source claims,
//! the subtype says what its frames turned out to be (`MP3`, `MP2`, `MP1`, `AAC`).

use bytes::{Bytes, BytesMut};

use crate::format::Event;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Mp3,
    Adts,
}

/// Bytes since the last lock (tags aside) after which pushes are join points again. A real MPEG
/// stream locks within three frames (about 1.3 KB at 128 kbit/s, 24 KB for three of the largest
/// ADTS frames); 64 KiB, 4 s at 128 kbit/s and a default burst, without a lock means the stream is
/// not what its `Content-Type` says, and the encoder's boundaries are the best join points left.
const PASS_THROUGH_AFTER: u64 = 64 * 1024;

/// The largest ID3v2 tag taken for one (its size field allows 256 MiB). Tags are left out of
/// the stream, so a false one would cost listeners that much; cover art runs to a few hundred
/// KB. A larger "tag" is taken for garbage, and passed on.
const MAX_ID3V2_BYTES: usize = 4 * 1024 * 1024;

/// Bytes an ID3v1 tag takes: `TAG` and 125 bytes of fixed fields.
const ID3V1_BYTES: usize = 128;

/// What makes one stream's frames: a header that differs in these is not the next frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stream {
    /// MP3: version, layer and sample rate index; ADTS: profile, sample rate index and channels.
    id: u16,
    /// The subtype a lock on this stream reports.
    codec: &'static str,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Header {
    stream: Stream,
    /// The whole frame, header included.
    len: usize,
    /// Audio samples the frame decodes to, per channel, and their rate: its duration.
    samples: u32,
    rate: u32,
}

/// What the bytes at a position turn out to be, as far as the bytes there so far tell.
#[derive(Debug, PartialEq, Eq)]
enum Parsed<T> {
    /// Consistent so far; more bytes decide.
    Need,
    No,
    Yes(T),
}

/// Kilobits per second by bitrate index (0 is free format and 15 is invalid: both refused).
const BITRATES_KBPS: [[u16; 15]; 5] = [
    // MPEG-1 layer I, II, III
    [
        0, 32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448,
    ],
    [
        0, 32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384,
    ],
    [
        0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320,
    ],
    // MPEG-2 and 2.5 layer I; layers II and III
    [
        0, 32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256,
    ],
    [0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160],
];

/// Hertz by sample rate index, for MPEG-1, 2 and 2.5.
const SAMPLE_RATES: [[u32; 3]; 3] = [
    [44100, 48000, 32000],
    [22050, 24000, 16000],
    [11025, 12000, 8000],
];

/// An MPEG audio frame header (4 bytes); each byte is checked as soon as it is there, so that a
/// false candidate is refuted without waiting for the rest.
fn mp3_header(b: &[u8]) -> Parsed<Header> {
    let Some(&b0) = b.first() else {
        return Parsed::Need;
    };
    if b0 != 0xFF {
        return Parsed::No;
    }
    let Some(&b1) = b.get(1) else {
        return Parsed::Need;
    };
    // Version bits: 00 MPEG-2.5, 01 reserved, 10 MPEG-2, 11 MPEG-1. Layer bits: 00 reserved,
    // 01 layer III, 10 layer II, 11 layer I.
    let (version_bits, layer_bits) = ((b1 >> 3) & 3, (b1 >> 1) & 3);
    if b1 & 0xE0 != 0xE0 || version_bits == 1 || layer_bits == 0 {
        return Parsed::No;
    }
    let Some(&b2) = b.get(2) else {
        return Parsed::Need;
    };
    let (bitrate_index, rate_index, padding) = (b2 >> 4, (b2 >> 2) & 3, usize::from((b2 >> 1) & 1));
    if bitrate_index == 0 || bitrate_index == 15 || rate_index == 3 {
        return Parsed::No;
    }
    let Some(&b3) = b.get(3) else {
        return Parsed::Need;
    };
    if b3 & 3 == 2 {
        // Reserved emphasis.
        return Parsed::No;
    }
    let version = match version_bits {
        3 => 0,
        2 => 1,
        _ => 2,
    };
    let layer = 4 - usize::from(layer_bits);
    let table = match (version, layer) {
        (0, l) => l - 1,
        (_, 1) => 3,
        _ => 4,
    };
    let bitrate = u32::from(BITRATES_KBPS[table][usize::from(bitrate_index)]) * 1000;
    let rate = SAMPLE_RATES[version][usize::from(rate_index)];
    let len = match layer {
        1 => (12 * bitrate / rate) as usize * 4 + padding * 4,
        // Layer III outside MPEG-1 carries half the samples per frame.
        3 if version > 0 => (72 * bitrate / rate) as usize + padding,
        _ => (144 * bitrate / rate) as usize + padding,
    };
    let samples = match layer {
        1 => 384,
        3 if version > 0 => 576,
        _ => 1152,
    };
    Parsed::Yes(Header {
        stream: Stream {
            id: u16::from(version_bits) << 4 | u16::from(layer_bits) << 2 | u16::from(rate_index),
            codec: ["MP1", "MP2", "MP3"][layer - 1],
        },
        len,
        samples,
        rate,
    })
}

/// An ADTS frame header (7 bytes; the CRC that may follow is inside the frame length).
fn adts_header(b: &[u8]) -> Parsed<Header> {
    let Some(&b0) = b.first() else {
        return Parsed::Need;
    };
    if b0 != 0xFF {
        return Parsed::No;
    }
    let Some(&b1) = b.get(1) else {
        return Parsed::Need;
    };
    // Sync 0xFFF, the MPEG version bit, layer 00, protection_absent.
    if b1 & 0xF6 != 0xF0 {
        return Parsed::No;
    }
    let Some(&b2) = b.get(2) else {
        return Parsed::Need;
    };
    // Sample rate indexes 13 and 14 are reserved, 15 (explicit rate) has no place in ADTS.
    if (b2 >> 2) & 0xF > 12 {
        return Parsed::No;
    }
    let (Some(&b3), Some(&b4), Some(&b5)) = (b.get(3), b.get(4), b.get(5)) else {
        return Parsed::Need;
    };
    let len = usize::from(b3 & 3) << 11 | usize::from(b4) << 3 | usize::from(b5 >> 5);
    let header_len = if b1 & 1 == 1 { 7 } else { 9 };
    if len < header_len {
        return Parsed::No;
    }
    let Some(&b6) = b.get(6) else {
        return Parsed::Need;
    };
    Parsed::Yes(Header {
        stream: Stream {
            // Profile, sample rate index and the channel configuration's first bit, then its two
            // others.
            id: u16::from(b2 & 0xFD) << 2 | u16::from(b3 >> 6),
            codec: "AAC",
        },
        len,
        // 1,024 samples per raw data block, and the frame holds one to four.
        samples: 1024 * (1 + u32::from(b6 & 3)),
        rate: ADTS_RATES[usize::from((b2 >> 2) & 0xF)],
    })
}

/// Hertz by ADTS sample rate index (13 and up are refused).
const ADTS_RATES: [u32; 13] = [
    96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350,
];

/// What starts at a frame boundary, as a locked framer, the HLS segmenter and a fallback file's
/// reader walk a stream's frames: the frame's length and timing, with what identifies its
/// stream, or a tag's length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Found {
    Frame {
        len: usize,
        samples: u32,
        rate: u32,
        /// Differs between two frames that are not of one stream (version, layer, profile,
        /// sample rate, channels).
        stream: u16,
    },
    Tag(usize),
    /// Too few bytes to tell.
    Need,
    No,
}

/// What `b` starts with, if it is at a frame boundary of a `kind` stream.
pub(crate) fn found_at(kind: Kind, b: &[u8]) -> Found {
    let header = match kind {
        Kind::Mp3 => mp3_header(b),
        Kind::Adts => adts_header(b),
    };
    match header {
        Parsed::Yes(h) => {
            return Found::Frame {
                len: h.len,
                samples: h.samples,
                rate: h.rate,
                stream: h.stream.id,
            }
        }
        Parsed::Need if b.len() < DECIDE_BYTES => return Found::Need,
        _ => {}
    }
    for tag in [id3v2_tag(b), id3v1_tag(b)] {
        match tag {
            Parsed::Yes(len) => return Found::Tag(len),
            Parsed::Need if b.len() < DECIDE_BYTES => return Found::Need,
            _ => {}
        }
    }
    Found::No
}

/// An ID3v2 tag's whole length, footer included.
fn id3v2_tag(b: &[u8]) -> Parsed<usize> {
    let n = b.len().min(3);
    if b[..n] != b"ID3"[..n] {
        return Parsed::No;
    }
    let Some(h) = b.get(..10) else {
        return Parsed::Need;
    };
    // Versions 2.2 to 2.4 exist; undefined flags are zero; the size is 28 bits, 7 per byte.
    if !(2..=4).contains(&h[3])
        || h[4] == 0xFF
        || h[5] & 0x0F != 0
        || h[6..].iter().any(|&x| x >= 0x80)
    {
        return Parsed::No;
    }
    let size = h[6..].iter().fold(0, |n, &x| n << 7 | usize::from(x));
    if size > MAX_ID3V2_BYTES {
        return Parsed::No;
    }
    let footer = if h[3] == 4 && h[5] & 0x10 != 0 { 10 } else { 0 };
    Parsed::Yes(10 + size + footer)
}

/// An ID3v1 tag's length, from the `TAG` it starts with.
fn id3v1_tag(b: &[u8]) -> Parsed<usize> {
    let n = b.len().min(3);
    if b[..n] != b"TAG"[..n] {
        Parsed::No
    } else if n < 3 {
        Parsed::Need
    } else {
        Parsed::Yes(ID3V1_BYTES)
    }
}

/// The most a header or tag needs to be told apart: ID3v2's 10-byte header.
const DECIDE_BYTES: usize = 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// The source's first bytes: an ID3v2 tag there (ffmpeg's MP3 muxer writes one) is left
    /// out, then the search starts.
    Start,
    /// No lock: every byte goes on at once, and a copy of the latest ones is searched.
    Searching,
    /// Frames of `stream`: the next frame or tag starts after `skip` more bytes, which are left
    /// out if `tag` (the rest of a tag).
    Locked {
        stream: Stream,
        skip: usize,
        tag: bool,
    },
    /// The rest of the leading tag to leave out, then the search.
    LeadingTag { skip: usize },
}

/// One source's MPEG or ADTS framer.
pub(crate) struct Framer {
    kind: Kind,
    state: State,
    /// Searching: a copy of the latest bytes passed on (at most three of the longest frames and a
    /// header), where a lock is looked for across pieces without holding anything back.
    lookback: BytesMut,
    /// Searching: where in `lookback` candidates are still undecided, in order.
    pending: Vec<usize>,
    /// Searching: how much of `lookback` was looked through for candidates.
    scanned: usize,
    /// Locked: the first bytes of a frame boundary, held because they alone cannot tell a header
    /// from a tag or from garbage (fewer than [`DECIDE_BYTES`]; only ever while locked, when the
    /// stream is known to be flowing frames).
    held: BytesMut,
    /// Bytes passed since the last join point: searching, a piece is a join point again once
    /// this reaches [`PASS_THROUGH_AFTER`], so that false locks in noise cannot starve a stream of
    /// join points either.
    since_join: u64,
    /// The stream of the latest lock, kept when the lock is lost: it is still what the source sent.
    last_lock: Option<Stream>,
}

impl Framer {
    pub fn new(kind: Kind) -> Self {
        Framer {
            kind,
            state: State::Start,
            lookback: BytesMut::new(),
            pending: Vec::new(),
            scanned: 0,
            held: BytesMut::new(),
            since_join: 0,
            last_lock: None,
        }
    }

    pub fn push(&mut self, data: Bytes, out: &mut Vec<Event>) {
        if data.is_empty() {
            return;
        }
        // Held boundary bytes go first: the piece joins them (a copy of at most one piece, only
        // when a boundary fell in the last few bytes of the previous one).
        let data = if self.held.is_empty() {
            data
        } else {
            self.held.extend_from_slice(&data);
            self.held.split().freeze()
        };
        // The first place in the push a player may start: the push is stored as one piece
        // marked there (the bytes before are the rest of the frame in progress), not cut into a
        // continuation and a run of frames, since every piece costs the store an entry. A tag
        // in it is cut out, and the piece goes on as the runs around it.
        let mut join = None;
        let mut runs = Runs::default();
        let mut unplaced = 0;
        let mut pos = 0;
        while pos < data.len() {
            match self.state {
                State::Start => {
                    let rest = &data[pos..];
                    match id3v2_tag(rest) {
                        Parsed::Yes(len) => self.state = State::LeadingTag { skip: len },
                        Parsed::Need => {
                            self.held.extend_from_slice(rest);
                            break;
                        }
                        Parsed::No => self.state = State::Searching,
                    }
                }
                State::LeadingTag { skip } => {
                    let n = skip.min(data.len() - pos);
                    runs.cut(pos, pos + n);
                    pos += n;
                    self.state = if n == skip {
                        State::Searching
                    } else {
                        State::LeadingTag { skip: skip - n }
                    };
                }
                State::Searching => {
                    // Everything goes on now; the search only looks.
                    if self.last_lock.is_none() || self.since_join >= PASS_THROUGH_AFTER {
                        join.get_or_insert(pos);
                    }
                    let rest = &data[pos..];
                    unplaced += rest.len();
                    self.search(rest);
                    // A lock whose next header the piece cut short holds those bytes.
                    unplaced -= self.held.len();
                    pos = data.len();
                }
                State::Locked { stream, skip, tag } => {
                    if skip > 0 {
                        let n = skip.min(data.len() - pos);
                        if tag {
                            runs.cut(pos, pos + n);
                        }
                        pos += n;
                        self.state = State::Locked {
                            stream,
                            skip: skip - n,
                            tag,
                        };
                        continue;
                    }
                    let rest = &data[pos..];
                    match self.at_boundary(stream, rest) {
                        Boundary::Frame(len) => {
                            join.get_or_insert(pos);
                            let n = len.min(rest.len());
                            pos += n;
                            self.state = State::Locked {
                                stream,
                                skip: len - n,
                                tag: false,
                            };
                        }
                        Boundary::Tag(len) => {
                            self.state = State::Locked {
                                stream,
                                skip: len,
                                tag: true,
                            };
                        }
                        Boundary::Undecided => {
                            self.held.extend_from_slice(rest);
                            break;
                        }
                        Boundary::Lost => {
                            self.state = State::Searching;
                            self.forget();
                        }
                    }
                }
            }
        }
        let end = data.len() - self.held.len();
        for (start, end) in runs.kept(end) {
            let bytes = data.slice(start..end);
            let join = join
                .filter(|at| (start..end).contains(at))
                .map(|at| at - start);
            self.since_join = match join {
                Some(at) => (bytes.len() - at) as u64,
                None => self.since_join + bytes.len() as u64,
            };
            out.push(Event::Data { join, bytes });
        }
        if unplaced > 0 {
            out.push(Event::Unsynced {
                bytes: unplaced,
                dropped: false,
            });
        }
    }

    /// The source ended: what is held goes on, unmarked, so no byte it sent is lost.
    pub fn finish(&mut self, out: &mut Vec<Event>) {
        if !self.held.is_empty() {
            let bytes = self.held.split().freeze();
            out.push(Event::Data { bytes, join: None });
        }
    }

    pub fn subtype(&self) -> Option<String> {
        self.last_lock.map(|s| s.codec.to_string())
    }

    fn header(&self, b: &[u8]) -> Parsed<Header> {
        match self.kind {
            Kind::Mp3 => mp3_header(b),
            Kind::Adts => adts_header(b),
        }
    }

    /// What starts at a frame boundary of the locked stream.
    fn at_boundary(&self, stream: Stream, b: &[u8]) -> Boundary {
        match found_at(self.kind, b) {
            Found::Frame {
                len, stream: id, ..
            } if id == stream.id => Boundary::Frame(len),
            Found::Tag(len) => Boundary::Tag(len),
            Found::Need => Boundary::Undecided,
            // A frame of another stream, or neither frame nor tag.
            Found::Frame { .. } | Found::No => Boundary::Lost,
        }
    }

    /// Adds `passed` to the lookback and looks for three headers in a row in it; on a lock,
    /// works out where the next frame begins after what was passed.
    fn search(&mut self, passed: &[u8]) {
        // With nothing kept from earlier pieces, the piece is searched where it lies, and only
        // what may still start a lock is copied: most pieces of a stream that is not MPEG (or
        // not yet locked) then leave nothing behind, and the framer holds no buffer.
        let in_place = self.lookback.is_empty();
        if !in_place {
            self.lookback.extend_from_slice(passed);
        }
        // Candidates: those still undecided, then every 0xFF that arrived since; each is
        // looked at again only while undecided, so small pieces do not rescan the lookback.
        let pending = std::mem::take(&mut self.pending);
        let b = if in_place { passed } else { &self.lookback[..] };
        // Found with memchr (SIMD): a stream that is not MPEG, or not yet locked, is scanned
        // whole, piece after piece, on the ingest thread.
        let from = self.scanned.min(b.len());
        let fresh = memchr::memchr_iter(0xFF, &b[from..]).map(move |i| from + i);
        let mut undecided = Vec::new();
        for i in pending.into_iter().chain(fresh) {
            match self.chain(&b[i..]) {
                Parsed::No => {}
                Parsed::Need => undecided.push(i),
                Parsed::Yes((stream, next)) => {
                    // `next` bytes from `i` is a frame boundary past the third header: walk on
                    // to the first boundary beyond what was passed.
                    let mut at = i + next;
                    while at < b.len() {
                        match self.header(&b[at..]) {
                            Parsed::Yes(h) if h.stream == stream => at += h.len,
                            // Cut off at the end of what was passed: decided with the next piece.
                            Parsed::Need => break,
                            _ => {
                                at = usize::MAX;
                                break;
                            }
                        }
                    }
                    if at != usize::MAX {
                        if in_place {
                            self.lookback.extend_from_slice(passed);
                        }
                        self.lock(stream, at, passed.len());
                        return;
                    }
                }
            }
        }
        // Keep what may still start a lock: from the first undecided candidate, within the
        // bound of three of the longest frames and a header.
        let len = b.len();
        let keep_from = undecided
            .first()
            .copied()
            .unwrap_or(len)
            .max(len.saturating_sub(self.max_lookback()));
        if in_place {
            self.lookback.extend_from_slice(&passed[keep_from..]);
        } else if keep_from == len {
            // Nothing to keep: the buffer goes with it.
            self.lookback = BytesMut::new();
        } else {
            let _ = self.lookback.split_to(keep_from);
        }
        self.pending = undecided
            .into_iter()
            .filter(|&i| i >= keep_from)
            .map(|i| i - keep_from)
            .collect();
        self.scanned = len - keep_from;
    }

    /// Locks on `stream`, whose next boundary is `at` bytes into the lookback, the last
    /// `fresh` bytes of which came with the current piece and are not passed on yet.
    fn lock(&mut self, stream: Stream, at: usize, fresh: usize) {
        let len = self.lookback.len();
        if at < len {
            // The piece ended inside that boundary's header. Its bytes are still this piece's:
            // hold them, so that the frame is a join point when the rest arrives. Had an earlier
            // piece already passed them, the lock waits for the next three frames instead.
            if len - at > fresh {
                let _ = self.lookback.split_to(at);
                self.pending.clear();
                self.scanned = 0;
                return;
            }
            self.held.extend_from_slice(&self.lookback[at..]);
        }
        self.last_lock = Some(stream);
        self.forget();
        self.state = State::Locked {
            stream,
            skip: at.saturating_sub(len),
            tag: false,
        };
    }

    /// Drops what the search kept, buffers and all: it starts afresh, and a locked framer needs
    /// none of them (cleared and kept, the lookback of the search before a lock stayed with
    /// every source for good: about 3 MiB at 1,000 MP3 sources).
    fn forget(&mut self) {
        self.lookback = BytesMut::new();
        self.pending = Vec::new();
        self.scanned = 0;
    }

    /// Three headers of one stream in a row from the start of `b`: the stream and the offset
    /// just past the third frame's header start plus its length (the fourth boundary).
    fn chain(&self, b: &[u8]) -> Parsed<(Stream, usize)> {
        let mut at = 0;
        let mut stream = None;
        for _ in 0..3 {
            let h = match b.get(at..).map_or(Parsed::Need, |rest| self.header(rest)) {
                Parsed::Yes(h) => h,
                Parsed::Need => return Parsed::Need,
                Parsed::No => return Parsed::No,
            };
            if stream.is_some_and(|s| s != h.stream) {
                return Parsed::No;
            }
            stream = Some(h.stream);
            at += h.len;
        }
        Parsed::Yes((stream.expect("three headers"), at))
    }

    fn max_lookback(&self) -> usize {
        match self.kind {
            Kind::Mp3 => 3 * 2881 + 4,
            Kind::Adts => 3 * 8191 + 7,
        }
    }
}

/// The parts of a push that go on: all of it but the tags cut out, in order.
#[derive(Default)]
struct Runs {
    /// Where the run going on starts.
    start: usize,
    /// Runs ended by a tag.
    done: Vec<(usize, usize)>,
}

impl Runs {
    /// Leaves out `from..to` (contiguous with any cut before it, or after kept bytes).
    fn cut(&mut self, from: usize, to: usize) {
        if from > self.start {
            self.done.push((self.start, from));
        }
        self.start = to;
    }

    /// The runs kept, the last one ending at `end` (no allocation for a push without a tag).
    fn kept(self, end: usize) -> impl Iterator<Item = (usize, usize)> {
        let last = (end > self.start).then_some((self.start, end));
        self.done.into_iter().chain(last)
    }
}

/// What a locked framer finds at a frame boundary.
enum Boundary {
    /// The next frame, this long.
    Frame(usize),
    /// A tag, this long: the frames go on after it.
    Tag(usize),
    /// Too few bytes to tell: hold them for the next piece.
    Undecided,
    /// Neither: the lock is lost.
    Lost,
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::process::Command;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::OnceLock;

    use super::*;

    #[test]
    fn a_locked_framer_keeps_no_search_buffer() {
        // 384-byte frames (MPEG-1 layer III, 128 kbit/s, 48 kHz) in pieces shorter than a frame,
        // so that the search spans pieces and fills its lookback before the lock.
        let frame: Vec<u8> = [0xFF, 0xFB, 0x94, 0x64]
            .into_iter()
            .chain(std::iter::repeat_n(0, 380))
            .collect();
        let stream = Bytes::from(frame.repeat(8));
        let mut f = Framer::new(Kind::Mp3);
        let mut out = Vec::new();
        let mut searched_across_pieces = false;
        for at in (0..stream.len()).step_by(100) {
            f.push(stream.slice(at..(at + 100).min(stream.len())), &mut out);
            searched_across_pieces |= f.lookback.capacity() > 0;
        }
        assert!(
            searched_across_pieces,
            "the search kept bytes between pieces"
        );
        assert_eq!(f.subtype().as_deref(), Some("MP3"), "locked");
        assert_eq!(f.lookback.capacity(), 0, "the lookback's buffer is gone");
        assert_eq!(f.pending.capacity(), 0);
    }

    /// Most bytes the framer may hold: a candidate's frame and all but one byte of the header that
    /// confirms it (MPEG-2.5 layer II at 160 kbit/s and 8 kHz, padded; a 13-bit ADTS length).
    fn max_held(kind: Kind) -> usize {
        match kind {
            Kind::Mp3 => 2881 + 4 - 1,
            Kind::Adts => 8191 + 7 - 1,
        }
    }

    /// A few seconds of a real encoder's output, and what ffprobe calls its codec.
    struct Sample {
        name: &'static str,
        kind: Kind,
        codec: &'static str,
        subtype: &'static str,
        bytes: Vec<u8>,
    }

    fn temp_path(name: &str) -> PathBuf {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        std::env::temp_dir().join(format!("fanstream-mpeg-{}-{n}-{name}", std::process::id()))
    }

    fn encode(name: &str, args: &[&str]) -> Vec<u8> {
        let path = temp_path(name);
        let out = Command::new("ffmpeg")
            .args(["-v", "error", "-y", "-f", "lavfi", "-i"])
            .arg("sine=frequency=440:duration=3")
            .args(args)
            .arg(&path)
            .output()
            .expect("these tests need ffmpeg and ffprobe (make deps installs them)");
        assert!(
            out.status.success(),
            "ffmpeg {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let bytes = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        bytes
    }

    fn samples() -> &'static [Sample] {
        static SAMPLES: OnceLock<Vec<Sample>> = OnceLock::new();
        SAMPLES.get_or_init(|| {
            // ffmpeg's MP3 muxer leads with an ID3v2.4 tag and a Xing/Info frame.
            let mp3 = "-c:a libmp3lame -f mp3";
            [
                ("cbr", Kind::Mp3, "mp3", "MP3", &*format!("{mp3} -b:a 128k")),
                (
                    "id3v23",
                    Kind::Mp3,
                    "mp3",
                    "MP3",
                    &format!("{mp3} -b:a 128k -id3v2_version 3 -metadata title=T"),
                ),
                ("vbr", Kind::Mp3, "mp3", "MP3", &format!("{mp3} -q:a 4")),
                (
                    "mpeg2",
                    Kind::Mp3,
                    "mp3",
                    "MP3",
                    &format!("{mp3} -ac 1 -ar 22050 -b:a 32k"),
                ),
                ("mp2", Kind::Mp3, "mp2", "MP2", "-c:a mp2 -b:a 192k -f mp2"),
                (
                    "adts",
                    Kind::Adts,
                    "aac",
                    "AAC",
                    "-c:a aac -b:a 128k -f adts",
                ),
            ]
            .into_iter()
            .map(|(name, kind, codec, subtype, args)| Sample {
                name,
                kind,
                codec,
                subtype,
                bytes: encode(name, &args.split(' ').collect::<Vec<_>>()),
            })
            .collect()
        })
    }

    impl Sample {
        /// What the framer passes on: the file without its leading ID3v2 tag.
        fn body(&self) -> &[u8] {
            &self.bytes[b_packets_start(&self.bytes)..]
        }
    }

    fn sample(name: &str) -> &'static Sample {
        samples().iter().find(|s| s.name == name).unwrap()
    }

    /// What ffprobe makes of a capture: its codec and where its packets (frames) start. A capture
    /// that starts mid-frame still probes as its codec, but its first packet is not at 0.
    fn probe(bytes: &[u8], name: &str) -> (String, Vec<usize>) {
        let path = temp_path(name);
        std::fs::write(&path, bytes).unwrap();
        let out = Command::new("ffprobe")
            .args([
                "-v",
                "error",
                "-show_entries",
                "stream=codec_name:packet=pos",
                "-of",
                "csv=p=0",
            ])
            .arg(&path)
            .output()
            .expect("these tests need ffmpeg and ffprobe (make deps installs them)");
        std::fs::remove_file(&path).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.is_empty(),
            "ffprobe {name}: {stderr}"
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let mut codec = String::new();
        let mut packets = Vec::new();
        for line in text
            .lines()
            .map(|l| l.trim_end_matches(','))
            .filter(|l| !l.is_empty())
        {
            match line.parse() {
                Ok(pos) => packets.push(pos),
                Err(_) => codec = line.to_string(),
            }
        }
        (codec, packets)
    }

    /// What FFmpeg says, decoding a capture as MP3, at its error level (empty when it decodes
    /// cleanly).
    fn decode_errors(bytes: &[u8], name: &str) -> String {
        let path = temp_path(name);
        std::fs::write(&path, bytes).unwrap();
        let out = Command::new("ffmpeg")
            .args(["-v", "error", "-f", "mp3", "-i"])
            .arg(&path)
            .args(["-f", "null", "-"])
            .output()
            .expect("these tests need ffmpeg and ffprobe (make deps installs them)");
        std::fs::remove_file(&path).unwrap();
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// A framer's output for one input, push by push.
    struct Fed {
        pushes: Vec<Vec<Event>>,
        finish: Vec<Event>,
        /// The bytes held back after each push.
        held: Vec<usize>,
        /// Stream offset after the push in which the framer first locked: before it, pushes are
        /// passed through, each a join point as the encoder cut it.
        locked_from: Option<usize>,
    }

    impl Fed {
        fn events(&self) -> impl Iterator<Item = &Event> {
            self.pushes.iter().flatten().chain(&self.finish)
        }

        fn max_held(&self) -> usize {
            self.held.iter().copied().max().unwrap_or(0)
        }

        fn stream(&self) -> Vec<u8> {
            let mut all = Vec::new();
            for e in self.events() {
                if let Event::Data { bytes, .. } = e {
                    all.extend_from_slice(bytes);
                }
            }
            all
        }

        /// Join points from the first lock on: each must be a frame.
        fn frame_joins(&self) -> Vec<usize> {
            let from = self.locked_from.unwrap_or(usize::MAX);
            self.joins().into_iter().filter(|&at| at >= from).collect()
        }

        /// Offsets in the stream of each event's join point.
        fn joins(&self) -> Vec<usize> {
            let (mut at, mut joins) = (0, Vec::new());
            for e in self.events() {
                if let Event::Data { bytes, join } = e {
                    if let Some(j) = join {
                        joins.push(at + j);
                    }
                    at += bytes.len();
                }
            }
            joins
        }

        fn unsynced(&self) -> usize {
            self.events()
                .map(|e| match e {
                    Event::Unsynced { bytes, dropped } => {
                        assert!(!dropped, "the MPEG framer never drops");
                        *bytes
                    }
                    _ => 0,
                })
                .sum()
        }
    }

    fn feed(kind: Kind, input: &[u8], mut piece: impl FnMut() -> usize) -> Fed {
        let mut f = Framer::new(kind);
        let source = Bytes::copy_from_slice(input);
        let (mut pos, mut passed) = (0, 0);
        let mut held = Vec::new();
        let mut pushes = Vec::new();
        let mut locked_from = None;
        while pos < input.len() {
            let end = (pos + piece().max(1)).min(input.len());
            let mut out = Vec::new();
            f.push(source.slice(pos..end), &mut out);
            pos = end;
            for e in &out {
                if let Event::Data { bytes, .. } = e {
                    assert!(!bytes.is_empty(), "empty Data event");
                    passed += bytes.len();
                }
            }
            if locked_from.is_none() && f.subtype().is_some() {
                locked_from = Some(passed);
            }
            held.push(f.held.len());
            pushes.push(out);
        }
        let mut finish = Vec::new();
        f.finish(&mut finish);
        assert!(
            finish
                .iter()
                .all(|e| !matches!(e, Event::Data { join: Some(_), .. })),
            "finish marks a join point"
        );
        Fed {
            pushes,
            finish,
            held,
            locked_from,
        }
    }

    fn frame_len(kind: Kind, b: &[u8]) -> Option<usize> {
        let parsed = match kind {
            Kind::Mp3 => mp3_header(b),
            Kind::Adts => adts_header(b),
        };
        match parsed {
            Parsed::Yes(h) => Some(h.len),
            _ => None,
        }
    }

    /// A fixed-seed xorshift generator: the same "random" input on every run.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }

        /// Half 0xFF, the byte every header starts with, half anything.
        fn ff_heavy(&mut self, n: usize) -> Vec<u8> {
            (0..n)
                .map(|_| {
                    if self.next() & 1 == 0 {
                        0xFF
                    } else {
                        self.next() as u8
                    }
                })
                .collect()
        }
    }

    #[test]
    fn headers_give_frame_lengths_and_refuse_reserved_values() {
        let mp3 = |b: &[u8]| frame_len(Kind::Mp3, b);
        // MPEG-1 layer III, 128 kbit/s, 44.1 kHz, without and with padding.
        assert_eq!(mp3(&[0xFF, 0xFB, 0x90, 0x64]), Some(417));
        assert_eq!(mp3(&[0xFF, 0xFB, 0x92, 0x64]), Some(418));
        // MPEG-1 layer II 192 kbit/s 48 kHz; layer I 384 kbit/s 48 kHz, padded (a 4-byte slot).
        assert_eq!(mp3(&[0xFF, 0xFD, 0xA4, 0x00]), Some(576));
        assert_eq!(mp3(&[0xFF, 0xFF, 0xC6, 0x00]), Some(388));
        // MPEG-2 layer III 32 kbit/s 22.05 kHz: half the samples per frame.
        assert_eq!(mp3(&[0xFF, 0xF3, 0x40, 0xC4]), Some(104));
        // MPEG-2.5 layer II 160 kbit/s 8 kHz, padded: the longest frame.
        assert_eq!(mp3(&[0xFF, 0xE5, 0xEA, 0x00]), Some(2881));
        for bad in [
            [0xFF, 0xFB, 0x04, 0x64], // free format
            [0xFF, 0xFB, 0xF0, 0x64], // bitrate index 15
            [0xFF, 0xFB, 0x9C, 0x64], // sample rate index 3
            [0xFF, 0xEB, 0x90, 0x64], // reserved version
            [0xFF, 0xF9, 0x90, 0x64], // reserved layer
            [0xFF, 0xFB, 0x90, 0x66], // reserved emphasis
            [0xFF, 0x7B, 0x90, 0x64], // sync short of 11 bits
        ] {
            assert_eq!(mp3(&bad), None, "{bad:02X?}");
        }
        assert_eq!(mp3_header(&[0xFF, 0xFB, 0x90]), Parsed::Need);
        assert_eq!(mp3_header(&[0xFF, 0xFB, 0x9C]), Parsed::No);

        let adts = |b1: u8, b2: u8, len: usize| {
            let b = [
                0xFF,
                b1,
                b2,
                0x80 | (len >> 11) as u8,
                (len >> 3) as u8,
                (len << 5) as u8 | 0x1F,
                0xFC,
                0,
            ];
            frame_len(Kind::Adts, &b)
        };
        assert_eq!(adts(0xF1, 0x50, 371), Some(371));
        assert_eq!(adts(0xF1, 0x50, 8191), Some(8191));
        assert_eq!(adts(0xF1, 0x50, 7), Some(7));
        assert_eq!(adts(0xF1, 0x50, 6), None, "shorter than its header");
        // With a CRC (protection_absent 0) the header is 9 bytes.
        assert_eq!(adts(0xF0, 0x50, 9), Some(9));
        assert_eq!(adts(0xF0, 0x50, 8), None);
        assert_eq!(adts(0xF3, 0x50, 371), None, "layer must be 00");
        assert_eq!(adts(0xF1, 0x74, 371), None, "sample rate index 13");
        assert_eq!(adts_header(&[0xFF, 0xF1, 0x50, 0x80, 0x2E]), Parsed::Need);

        assert_eq!(
            id3v2_tag(b"ID3\x04\x00\x00\x00\x00\x01\x00"),
            Parsed::Yes(10 + 128)
        );
        assert_eq!(
            id3v2_tag(b"ID3\x04\x00\x10\x00\x00\x01\x00"),
            Parsed::Yes(10 + 128 + 10)
        );
        assert_eq!(id3v2_tag(b"ID3\x03\x00\x00\x00\x00\x80\x00"), Parsed::No);
        assert_eq!(
            id3v2_tag(b"ID3\x04\x00\x00\x02\x00\x00\x00"),
            Parsed::Yes(10 + 4 * 1024 * 1024)
        );
        assert_eq!(
            id3v2_tag(b"ID3\x04\x00\x00\x02\x00\x00\x01"),
            Parsed::No,
            "over 4 MiB"
        );
        assert_eq!(id3v2_tag(b"ID3\x03\x00"), Parsed::Need);
        assert_eq!(id3v2_tag(b"IDE"), Parsed::No);
    }

    #[test]
    fn every_byte_but_the_leading_tag_passes_and_joins_start_on_frames_whatever_the_pieces() {
        for s in samples() {
            let body = s.body();
            let (codec, packets) = probe(body, s.name);
            assert_eq!(codec, s.codec, "{}", s.name);
            let largest = packets
                .iter()
                .map(|&p| frame_len(s.kind, &body[p..]).unwrap())
                .max()
                .unwrap();
            for piece in [1, 7, 1000, 4096, s.bytes.len()] {
                let what = format!("{} in pieces of {piece}", s.name);
                assert_eq!(Framer::new(s.kind).subtype(), None);
                let fed = feed(s.kind, &s.bytes, || piece);
                assert!(
                    fed.stream() == body,
                    "{what}: output is not the input without its tag"
                );
                let locked_from = fed.locked_from.expect("locks");
                assert!(
                    fed.unsynced() <= locked_from,
                    "{what}: only bytes before the lock are unplaced"
                );
                assert!(
                    locked_from <= 3 * largest + piece + 64 * 1024,
                    "{what}: locked only at {locked_from}"
                );
                assert!(
                    fed.max_held() < DECIDE_BYTES,
                    "{what}: held {}",
                    fed.max_held()
                );
                let joins = fed.frame_joins();
                // A whole file in one piece locks in it, with nothing left to join.
                let once = fed.pushes.len() == 1;
                assert!(
                    once || !joins.is_empty(),
                    "{what}: no join point once locked"
                );
                for &at in &joins {
                    // ffmpeg's demuxer, which skips the Info frame, agrees on where frames are.
                    assert!(
                        packets.binary_search(&at).is_ok(),
                        "{what}: join at {at} is not a frame"
                    );
                    let len = frame_len(s.kind, &body[at..]).unwrap();
                    assert!(
                        at + len == body.len() || frame_len(s.kind, &body[at + len..]).is_some(),
                        "{what}: the frame at {at} does not end on a header"
                    );
                }
                // Locked: a push gives at most one piece (the end of the frame in progress, then
                // frames from its join point); a piece at least a frame long holds a join point.
                let mut passed = 0;
                for (i, out) in fed.pushes.iter().enumerate() {
                    if passed >= locked_from {
                        let data: Vec<Option<usize>> = out
                            .iter()
                            .filter_map(|e| match e {
                                Event::Data { join, .. } => Some(*join),
                                _ => None,
                            })
                            .collect();
                        assert!(data.len() <= 1, "{what}: push {i} gives {out:?}");
                        if piece > 2 * largest && i + 1 < fed.pushes.len() {
                            assert!(
                                data.iter().any(Option::is_some),
                                "{what}: push {i} has no join point"
                            );
                        }
                    }
                    passed += out
                        .iter()
                        .map(|e| match e {
                            Event::Data { bytes, .. } => bytes.len(),
                            _ => 0,
                        })
                        .sum::<usize>();
                }
                assert!(
                    fed.finish.is_empty(),
                    "{what}: a whole file leaves nothing held"
                );
            }
            let mut f = Framer::new(s.kind);
            f.push(Bytes::copy_from_slice(&s.bytes), &mut Vec::new());
            assert_eq!(f.subtype().as_deref(), Some(s.subtype), "{}", s.name);
        }
    }

    #[test]
    fn a_listener_joining_at_any_join_point_gets_a_stream_that_decodes() {
        std::thread::scope(|scope| {
            for s in samples() {
                scope.spawn(move || {
                    // Pieces smaller than a frame, so that the join points are many even in
                    // the 32 kbit/s sample.
                    let fed = feed(s.kind, &s.bytes, || 300);
                    let joins = fed.frame_joins();
                    // ffprobe wants a few frames to recognise MP2; a listener does not.
                    let joins = &joins[..joins.len().saturating_sub(8)];
                    assert!(joins.len() >= 20, "{}: {} joins", s.name, joins.len());
                    for k in 0..20 {
                        let at = joins[k * (joins.len() - 1) / 19];
                        let tail = &s.body()[at..];
                        assert!(frame_len(s.kind, tail).is_some(), "{} at {at}", s.name);
                        let (codec, packets) = probe(tail, s.name);
                        assert_eq!(codec, s.codec, "{} from {at}", s.name);
                        assert_eq!(
                            packets.first(),
                            Some(&0),
                            "{} from {at}: first frame not at 0",
                            s.name
                        );
                    }
                });
            }
        });
    }

    #[test]
    fn a_stream_that_is_not_mpeg_flows_unchanged_and_stays_joinable() {
        let mut rng = Rng(0x5EED_F00D);
        let inputs = [
            (
                "pattern",
                (0..300_000).map(|i| (i % 251) as u8).collect::<Vec<u8>>(),
            ),
            ("random", rng.bytes(300_000)),
            ("0xFF-heavy", rng.ff_heavy(300_000)),
        ];
        for (name, input) in &inputs {
            for kind in [Kind::Mp3, Kind::Adts] {
                for piece in [1, 7, 1000, 4096] {
                    let what = format!("{name} as {kind:?} in pieces of {piece}");
                    let fed = feed(kind, input, || piece);
                    assert!(fed.stream() == *input, "{what}: output differs from input");
                    assert!(
                        fed.max_held() <= max_held(kind),
                        "{what}: held {}",
                        fed.max_held()
                    );
                    // Join points at least as often as pass-through promises: after at most
                    // PASS_THROUGH_AFTER unplaced bytes, a held candidate and a piece.
                    let gap = PASS_THROUGH_AFTER as usize + max_held(kind) + piece;
                    let mut last = 0;
                    for at in fed.joins().into_iter().chain([input.len()]) {
                        assert!(
                            at - last <= gap,
                            "{what}: no join point from {last} to {at}"
                        );
                        last = at;
                    }
                    if *name == "pattern" {
                        // No 0xFF: nothing is a frame, everything is counted.
                        assert_eq!(fed.unsynced(), input.len(), "{what}");
                    }
                }
            }
        }
    }

    #[test]
    fn garbage_between_two_streams_is_passed_and_the_second_is_locked() {
        let (a, b) = (sample("cbr"), sample("mpeg2"));
        let mut rng = Rng(42);
        let mut garbage = rng.bytes(3000);
        garbage.extend(rng.ff_heavy(2000));
        let input = [&a.bytes[..], &garbage, &b.bytes].concat();
        let fed = feed(Kind::Mp3, &input, || 1000);
        // A's leading tag is left out; B's, after garbage that lost the lock, cannot be told
        // from more garbage and goes on.
        let stream = [a.body(), &garbage, &b.bytes].concat();
        let b_start = a.body().len() + garbage.len();
        assert!(fed.stream() == stream, "output differs");
        // The garbage, and what B sends before the framer locks on it again: its ID3 tag and
        // the three frames a lock takes, in pieces of 1000.
        let unsynced = fed.unsynced();
        let b_before_lock = b_packets_start(&b.bytes) + 3 * 418 + 1000;
        assert!(
            unsynced >= garbage.len() - 1000 && unsynced <= garbage.len() + b_before_lock,
            "unsynced {unsynced}"
        );

        let (_, a_packets) = probe(a.body(), "a");
        let (_, b_packets) = probe(&b.bytes, "b");
        let frames: Vec<usize> = a_packets
            .iter()
            .copied()
            .chain(b_packets.iter().map(|p| p + b_start))
            .collect();
        // Join points are frames, except those the pieces make before the first lock (none
        // here: A's first piece is its tag and first frames, and a lock is found in them) and
        // the piece boundaries that keep noise joinable (none: 5,000 bytes is under 64 KiB).
        let joins = fed.frame_joins();
        for at in &joins {
            assert!(
                frames.contains(at),
                "join at {at} is not a frame of either stream"
            );
        }
        let first_b = *joins
            .iter()
            .find(|&&at| at >= b_start)
            .expect("the second stream locks");
        // Three headers to lock, then the next piece joins at its first frame.
        assert!(
            first_b <= b_start + b_before_lock + 1000,
            "locked late, at {first_b}"
        );
        let (codec, packets) = probe(&stream[first_b..], "after-garbage");
        assert_eq!((codec.as_str(), packets[0]), ("mp3", 0));
    }

    #[test]
    fn tags_are_left_out_and_keep_the_lock() {
        let s = sample("cbr");
        let frames = s.body();
        assert!(
            frames.len() < s.bytes.len(),
            "ffmpeg's MP3 starts with a tag"
        );
        let mut id3v1 = b"TAG".to_vec();
        id3v1.resize(128, b' ');
        let mut id3v2 = b"ID3\x04\x00\x10\x00\x00\x02\x00".to_vec();
        id3v2.extend([0xFF; 256]);
        id3v2.extend(b"3DI\x04\x00\x10\x00\x00\x02\x00");
        // A file with its leading tag, its ID3v1 at its end, then the next file's tag and
        // frames: what a source sending files as they are (a playlist) sends.
        let input = [&s.bytes[..], &id3v1, &id3v2, frames].concat();
        for piece in [1, 9, 10, 11, 1000] {
            let fed = feed(Kind::Mp3, &input, || piece);
            assert!(
                fed.stream() == [frames, frames].concat(),
                "pieces of {piece}: the tags are not all left out"
            );
            assert!(
                fed.unsynced() <= fed.locked_from.unwrap(),
                "only bytes before the lock are unplaced"
            );
            // Still locked after the tags: the second copy's first frame (its Info frame) is a
            // join point, where a new lock would have passed it on unmarked.
            assert!(
                fed.joins().contains(&frames.len()),
                "pieces of {piece}: {:?}",
                fed.joins()
            );
            // FFmpeg took each tag for a broken frame ("Header missing").
            let errors = decode_errors(&fed.stream(), "untagged");
            assert!(errors.is_empty(), "pieces of {piece}: {errors}");
        }
        // A source that sends less than a tag's header and ends: what it sent goes on.
        let fed = feed(Kind::Mp3, b"ID3\x04", || 2);
        assert_eq!(fed.stream(), b"ID3\x04");
    }

    #[test]
    fn a_torn_last_frame_passes_and_finish_gives_what_is_held() {
        let s = sample("cbr");
        let lead = b_packets_start(&s.bytes);
        let torn = &s.bytes[..s.bytes.len() - 100];
        let fed = feed(Kind::Mp3, torn, || 4096);
        assert!(fed.stream() == torn[lead..], "nothing but the tag is lost");
        // The last piece ends inside a frame, far from its boundary: nothing is held back.
        assert!(fed.finish.is_empty(), "finish gave {:?}", fed.finish);
        // Cut a few bytes into a header instead: those are held, and finish passes them.
        let last = *probe(&s.bytes, "cbr").1.last().unwrap();
        let cut = &s.bytes[..last + 2];
        let fed = feed(Kind::Mp3, cut, || 4096);
        assert!(fed.stream() == cut[lead..], "nothing but the tag is lost");
        match &fed.finish[..] {
            [Event::Data { bytes, join: None }] => assert_eq!(bytes.len(), 2),
            other => panic!("finish gave {other:?}"),
        }
    }

    /// Where an MP3 file's first frame starts (after its ID3v2 tag, if any).
    fn b_packets_start(bytes: &[u8]) -> usize {
        match id3v2_tag(bytes) {
            Parsed::Yes(len) => len,
            _ => 0,
        }
    }

    #[test]
    fn any_input_in_any_pieces_passes_without_panic_and_only_tags_are_left_out() {
        let mut rng = Rng(0xDEC0DE);
        let real = [sample("cbr"), sample("adts")];
        for round in 0..300 {
            let mut input = Vec::new();
            for _ in 0..rng.below(12) + 1 {
                match rng.below(6) {
                    0 => {
                        let n = rng.below(5000);
                        input.extend(rng.bytes(n))
                    }
                    1 => {
                        let n = rng.below(5000);
                        input.extend(rng.ff_heavy(n))
                    }
                    2 | 3 => {
                        let s = &real[rng.below(2)].bytes;
                        let from = rng.below(s.len());
                        let to = (from + rng.below(20_000)).min(s.len());
                        input.extend(&s[from..to]);
                    }
                    4 => {
                        let mut tag = b"ID3\x04\x00".to_vec();
                        tag.push([0, 0x10][rng.below(2)]);
                        tag.extend((0..4).map(|_| rng.below(3) as u8));
                        input.extend(tag);
                    }
                    _ => input.extend(b"TAG"),
                }
            }
            for kind in [Kind::Mp3, Kind::Adts] {
                let fed = feed(kind, &input, || {
                    [1, rng.below(64), rng.below(5000)][rng.below(3)]
                });
                // Without a tag's signature, every byte passes; with one, what passes is the
                // input with parts left out.
                let stream = fed.stream();
                let tagged = [&b"ID3"[..], b"TAG"]
                    .iter()
                    .any(|sig| input.windows(3).any(|w| w == *sig));
                if tagged {
                    let mut rest = input.iter();
                    assert!(
                        stream.iter().all(|b| rest.any(|x| x == b)),
                        "round {round} as {kind:?}: output is not the input with parts left out"
                    );
                } else {
                    assert!(stream == input, "round {round} as {kind:?}: output differs");
                }
                assert!(
                    fed.max_held() <= max_held(kind),
                    "round {round}: held {}",
                    fed.max_held()
                );
            }
        }
    }
}
