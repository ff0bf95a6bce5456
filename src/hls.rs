//! HLS segments and the live playlist that lists the latest of them: an MP3 or AAC (ADTS)
//! mount's stream cut into packed audio (RFC 8216, section 3.4) at frame boundaries, and an Ogg
//! Opus, Vorbis or FLAC mount's packets, or a WebM (Matroska) mount's audio track's
//! ([`crate::webm_blocks`]: Opus, Vorbis, FLAC; video left out), put into fragmented MP4
//! ([`crate::fmp4`]) with an init segment (`EXT-X-MAP`). What follows is said of packed audio;
//! the Ogg path walks whole pages instead of frames, the WebM path elements and blocks, both
//! take each packet's duration from the packet ([`crate::ogg_codecs`]), and cut the same way.
//!
//! Built at ingest, once for every client: the [`Segmenter`] walks the frames the MPEG framer
//! already delimited (a `sync` piece starts on a frame header), copies each frame once into the
//! segment being built, and closes the segment before the frame that would take it past
//! `hls_segment_secs` of audio. Durations come from the frames' samples and sample rate, never
//! from the wall clock, so a segment's `EXTINF` is what a player decodes from it. Each segment
//! opens with an ID3 tag holding the `com.apple.streaming.transportStreamTimestamp` PRIV frame
//! (the 90 kHz timestamp of its first sample, continuous across segments), and the now-playing
//! title and artist as `TIT2`/`TPE1`: a title change closes the segment, so the next one starts
//! with the new title at its position in the stream, a tag every player reads, where one inside
//! a segment would be stray bytes to a decoder.
//!
//! A [`Window`] is what readers get: the retained segments, immutable and shared, and the
//! playlist text, rendered once per new segment. Segments stay fetchable for a while after
//! leaving the playlist (RFC 8216, 6.2.2: a player may have just read the playlist that listed
//! them). Their names carry the segmenter's creation time, so that a mount that goes and comes
//! back never reuses a URL a cache may hold.
//!
//! A source change (an encoder restart, another codec) closes the open segment, and the next
//! segment carries `EXT-X-DISCONTINUITY`. A torn frame (the framer lost its lock inside it) is
//! cut out of the segment; bytes that are not frames or tags are left out until the framer finds
//! frames again.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};

use crate::fmp4::{fragment, init_segment};
use crate::mpeg::{found_at, Found, Kind};
use crate::ogg_codecs::{Codec, Headers};
use crate::webm_blocks::{Blocks, Item};

/// The PRIV owner whose 8 bytes are a segment's first timestamp (RFC 8216, 3.4).
const TIMESTAMP_OWNER: &[u8] = b"com.apple.streaming.transportStreamTimestamp\0";
/// MPEG timestamps count 90 kHz ticks, in 33 bits.
const TICKS_PER_SEC: u64 = 90_000;
const TICKS_MASK: u64 = (1 << 33) - 1;

/// The mount's HLS settings, as the segmenter applies them from its next segment on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Params {
    /// Most seconds of audio in a segment: the playlist's target duration.
    pub segment_secs: u64,
    /// Segments listed in the playlist.
    pub segments: usize,
}

/// Most segments a playlist lists, however short title updates cut them.
const MAX_LISTED: usize = 100;

impl Params {
    /// How many of `segments` (oldest first) the playlist lists: the newest `self.segments`,
    /// and more while they span less than three target durations, the least RFC 8216 (6.2.2)
    /// allows and about where players start (hls.js: three target durations from the live
    /// edge). Title updates cut segments short: a station changing its title every second
    /// would otherwise list six seconds where players need twelve. Less 5%, since segments end
    /// on a frame or page short of the target; at most [`MAX_LISTED`].
    fn listed(self, segments: &VecDeque<Arc<Segment>>) -> usize {
        let goal = 0.95 * 3.0 * self.segment_secs as f64;
        let mut span = 0.0;
        let mut listed = 0;
        for s in segments.iter().rev() {
            if (listed >= self.segments && span >= goal) || listed == MAX_LISTED {
                break;
            }
            span += s.duration;
            listed += 1;
        }
        listed
    }
}

/// The now-playing title at a frame, as the store publishes it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Title<'a> {
    /// Changes with every title update: a new one closes the segment.
    pub version: u64,
    pub title: Option<&'a str>,
    pub artist: Option<&'a str>,
}

/// One packed audio segment, immutable once published.
#[derive(Debug)]
pub(crate) struct Segment {
    /// Its media sequence number.
    pub seq: u64,
    /// Its file name in the mount's directory: `EPOCH-SEQ.mp3` or `.aac`.
    pub name: String,
    /// Seconds of audio: its frames' samples over their sample rate.
    pub duration: f64,
    /// The wall-clock time of its first sample (`EXT-X-PROGRAM-DATE-TIME`).
    pub date: SystemTime,
    /// It starts a new source's stream (`EXT-X-DISCONTINUITY`).
    pub discontinuity: bool,
    pub kind: Media,
    /// Packed audio: the ID3 tag, then whole frames. fMP4: a fragment (`moof`, `mdat`).
    pub data: Bytes,
    /// fMP4: the init segment it needs (`EXT-X-MAP`).
    pub init: Option<Arc<Init>>,
    /// fMP4: the `EXT-X-DATERANGE` line of the title that starts with it, if one does (packed
    /// audio carries its titles in its ID3 tags).
    pub daterange: Option<String>,
}

/// An fMP4 init segment, shared by the segments of one stream.
#[derive(Debug)]
pub(crate) struct Init {
    /// Its file name: `EPOCH-init-N.mp4`.
    pub name: String,
    pub data: Bytes,
}

/// What a segment holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Media {
    /// MPEG audio frames (MP3, MP2), packed.
    Mp3,
    /// ADTS frames, packed.
    Aac,
    /// An Ogg stream's packets (Opus, Vorbis, FLAC) in an fMP4 fragment.
    Fmp4,
}

/// The stream a source sends, as the segmenter takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Source {
    /// MPEG or ADTS frames, cut into packed audio.
    Packed(Kind),
    /// Ogg pages, whose Opus, Vorbis or FLAC stream (if any) goes into fMP4 fragments.
    Ogg,
    /// WebM or Matroska, whose first Opus, Vorbis or FLAC track (if any) goes into fMP4
    /// fragments; other tracks (video) are left out.
    Webm,
}

impl Segment {
    pub fn content_type(&self) -> &'static str {
        content_type(self.kind)
    }

    /// A strong validator: a name is never reused for other bytes.
    pub fn etag(&self) -> String {
        format!("\"{}\"", self.name)
    }
}

fn content_type(kind: Media) -> &'static str {
    match kind {
        Media::Mp3 => "audio/mpeg",
        Media::Aac => "audio/aac",
        Media::Fmp4 => "audio/mp4",
    }
}

fn extension(kind: Media) -> &'static str {
    match kind {
        Media::Mp3 => "mp3",
        Media::Aac => "aac",
        Media::Fmp4 => "m4s",
    }
}

fn media(kind: Kind) -> Media {
    match kind {
        Kind::Mp3 => Media::Mp3,
        Kind::Adts => Media::Aac,
    }
}

/// What readers of a mount's snapshot see of its HLS stream.
#[derive(Debug)]
pub(crate) struct Window {
    /// Oldest first; the playlist lists the newest of them.
    segments: Vec<Arc<Segment>>,
    /// The live playlist (`index.m3u8`), rendered once.
    pub playlist: Bytes,
    /// Changes whenever the playlist does.
    pub playlist_etag: String,
    /// `EXT-X-TARGETDURATION`.
    pub target_secs: u64,
}

impl Window {
    /// The media sequence number of the newest segment.
    pub fn newest_seq(&self) -> u64 {
        self.segments.last().map_or(0, |s| s.seq)
    }

    /// A retained segment by its file name.
    pub fn segment(&self, name: &str) -> Option<&Arc<Segment>> {
        self.segments.iter().rev().find(|s| s.name == name)
    }

    /// The size of the newest segment (for the benches: what the segmenter made).
    #[doc(hidden)]
    pub fn newest_bytes(&self) -> usize {
        self.segments.last().map_or(0, |s| s.data.len())
    }

    /// A retained segment's init segment by its file name.
    pub fn init(&self, name: &str) -> Option<&Arc<Init>> {
        self.segments
            .iter()
            .rev()
            .filter_map(|s| s.init.as_ref())
            .find(|i| i.name == name)
    }
}

/// The codecs of Ogg streams and WebM tracks the segmenter puts into fMP4, as the format layer
/// names them in a mount's subtype (`Speex`, an Ogg stream of no codec known, a WebM stream of
/// video only or of other audio, is not segmented).
pub(crate) const FMP4_CODECS: [&str; 3] = ["Opus", "Vorbis", "FLAC"];

/// What the segmenter makes of a source's `Content-Type`: None for a format it does not cut.
pub(crate) fn source_for(content_type: &str) -> Option<Source> {
    match crate::framing::mpeg_kind(content_type) {
        Some(kind) => Some(Source::Packed(kind)),
        None if crate::framing::is_ogg(content_type) => Some(Source::Ogg),
        None => crate::framing::is_webm(content_type).then_some(Source::Webm),
    }
}

/// Whether a file name in a mount's directory is one the segmenter makes (`EPOCH-SEQ.mp3`,
/// `.aac` or `.m4s`, `EPOCH-init-N.mp4`), so the router knows the request is for HLS without
/// looking the mount up.
pub(crate) fn is_segment_name(name: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit());
    if let Some(stem) = name.strip_suffix(".mp4") {
        return stem
            .split_once("-init-")
            .is_some_and(|(epoch, n)| digits(epoch) && digits(n));
    }
    let Some(stem) = [".mp3", ".aac", ".m4s"]
        .iter()
        .find_map(|ext| name.strip_suffix(ext))
    else {
        return false;
    };
    stem.split_once('-')
        .is_some_and(|(epoch, seq)| digits(epoch) && digits(seq))
}

/// Where the frame walk stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Walk {
    /// Not on a frame boundary: waits for the framer's next sync point.
    Lost,
    /// At a frame boundary.
    Boundary,
    /// This many bytes of the current frame still to copy.
    Frame(usize),
    /// This many bytes of a tag in the stream still to leave out.
    Skip(usize),
}

/// The segment being built.
struct Building {
    data: BytesMut,
    /// Bytes and samples of its whole frames; a torn frame is cut back to them.
    committed: usize,
    committed_samples: u64,
    /// Samples of every frame begun, the last one perhaps not whole yet.
    samples: u64,
    rate: u32,
    stream: u16,
    title_version: u64,
    date: SystemTime,
    discontinuity: bool,
}

/// One mount's segmenter; lives on the ingest thread, across the mount's sources.
pub(crate) struct Segmenter {
    /// Milliseconds since the Unix epoch at creation: the prefix of its segments' names.
    epoch: u64,
    /// The current source's frames; None when its format is not segmented.
    kind: Option<Kind>,
    params: Params,
    walk: Walk,
    /// Bytes at a boundary too few to tell a frame from a tag, waiting for the next piece.
    held: BytesMut,
    building: Option<Building>,
    next_seq: u64,
    /// The next segment follows a source change.
    discontinuity: bool,
    /// Discontinuities among segments no longer retained (`EXT-X-DISCONTINUITY-SEQUENCE`).
    discontinuities_dropped: u64,
    /// The timeline: 90 kHz ticks at the start of the current run of one sample rate, and the
    /// samples since, so that no rounding accumulates.
    run_ticks: u64,
    run_samples: u64,
    run_rate: u32,
    /// A wall-clock time and the tick it stands for, set at a source's first frame: segment
    /// dates follow the audio's own timing from there.
    anchor: Option<(SystemTime, u64)>,
    segments: VecDeque<Arc<Segment>>,
    /// The current source's Ogg pages, when it sends Ogg.
    ogg: Option<OggPages>,
    /// The current source's WebM elements, when it sends WebM.
    webm: Option<Blocks>,
    /// The audio stream of an Ogg or WebM source, as it goes into fMP4.
    fmp4: Fmp4Stream,
    /// Decode time, in the track's samples, of the next packet: fragments' `tfdt`.
    fmp4_time: u64,
    /// The rate `fmp4_time` counts at: a stream at another rate carries it on rescaled.
    fmp4_rate: u32,
    /// Init segments made so far, for their names.
    inits: u64,
}

/// An Ogg source's audio stream as the segmenter follows it, page by page.
#[derive(Default)]
struct OggPages {
    /// The audio stream's serial number; pages of other logical streams are passed over.
    serial: Option<u32>,
    /// The start of a packet that goes on in the next page.
    partial: Vec<u8>,
    /// The start of a page that goes on in the next piece.
    held: BytesMut,
}

/// An Ogg or WebM source's audio stream, as its packets go into fMP4 fragments.
#[derive(Default)]
struct Fmp4Stream {
    /// Its headers, read so far or all read (the codec then known).
    headers: Option<Headers>,
    /// Made once the headers are all read.
    init: Option<Arc<Init>>,
    /// The segment being built: its packets (slices of the pages or blocks, copied once into
    /// the fragment), their samples, when and where (decode time) it starts.
    packets: Vec<(u32, Bytes)>,
    samples: u64,
    date: Option<SystemTime>,
    start: u64,
    /// The title version of the segment being built, and its `EXT-X-DATERANGE` line when its
    /// title is not the previous segment's.
    title_version: Option<u64>,
    daterange: Option<String>,
}

impl Segmenter {
    pub fn new(params: Params) -> Self {
        Segmenter {
            epoch: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or(Duration::ZERO)
                .as_millis() as u64,
            kind: None,
            params,
            walk: Walk::Lost,
            held: BytesMut::new(),
            building: None,
            next_seq: 0,
            discontinuity: false,
            discontinuities_dropped: 0,
            run_ticks: 0,
            run_samples: 0,
            run_rate: 0,
            anchor: None,
            segments: VecDeque::new(),
            ogg: None,
            webm: None,
            fmp4: Fmp4Stream::default(),
            fmp4_time: 0,
            fmp4_rate: 0,
            inits: 0,
        }
    }

    /// A new source took the mount, sending `source` (None: a format not segmented, whose
    /// mount then has no HLS stream). True if the window changed.
    pub fn start_source(&mut self, source: Option<Source>) -> bool {
        let mut changed = self.end_source();
        self.kind = match source {
            Some(Source::Packed(kind)) => Some(kind),
            _ => None,
        };
        self.ogg = (source == Some(Source::Ogg)).then(OggPages::default);
        self.webm = (source == Some(Source::Webm)).then(Blocks::new);
        if source.is_none() && !self.segments.is_empty() {
            self.segments.clear();
            changed = true;
        }
        changed
    }

    /// The source left: the open segment is closed with what it has, and the next source's
    /// segments follow a discontinuity. True if the window changed.
    pub fn end_source(&mut self) -> bool {
        let changed = self.close() | self.close_fmp4();
        self.fmp4 = Fmp4Stream::default();
        if let Some(ogg) = self.ogg.as_mut() {
            *ogg = OggPages::default();
        }
        if let Some(webm) = self.webm.as_mut() {
            *webm = Blocks::new();
        }
        self.walk = Walk::Lost;
        self.held.clear();
        self.anchor = None;
        if self.next_seq > 0 {
            self.discontinuity = true;
        }
        changed
    }

    /// Takes a piece of the stream as the framer cut it (`sync`: a frame starts at its first
    /// byte). True if a segment was completed, and the window changed.
    pub fn push(&mut self, data: &Bytes, sync: bool, params: Params, title: Title) -> bool {
        self.params = params;
        if self.ogg.is_some() {
            return self.push_ogg(data, title);
        }
        if self.webm.is_some() {
            return self.push_webm(data, title);
        }
        let Some(kind) = self.kind else {
            return false;
        };
        if sync && !(self.walk == Walk::Boundary && self.held.is_empty()) {
            // The framer says a frame starts here: a walk that disagrees was inside a frame the
            // framer gave up on, which is cut out.
            self.tear();
            self.walk = Walk::Boundary;
        }
        let data = if self.held.is_empty() {
            data.clone()
        } else {
            self.held.extend_from_slice(data);
            self.held.split().freeze()
        };
        let mut changed = false;
        let mut pos = 0;
        while pos < data.len() {
            let rest = &data[pos..];
            match self.walk {
                Walk::Lost => break,
                Walk::Frame(left) => {
                    let n = left.min(rest.len());
                    let b = self.building.as_mut().expect("a frame goes into a segment");
                    b.data.extend_from_slice(&rest[..n]);
                    pos += n;
                    self.walk = if n == left {
                        b.committed = b.data.len();
                        b.committed_samples = b.samples;
                        Walk::Boundary
                    } else {
                        Walk::Frame(left - n)
                    };
                }
                Walk::Skip(left) => {
                    let n = left.min(rest.len());
                    pos += n;
                    self.walk = if n == left {
                        Walk::Boundary
                    } else {
                        Walk::Skip(left - n)
                    };
                }
                Walk::Boundary => match found_at(kind, rest) {
                    Found::Frame {
                        len,
                        samples,
                        rate,
                        stream,
                    } => {
                        changed |= self.begin_frame(kind, samples, rate, stream, title);
                        self.walk = Walk::Frame(len);
                    }
                    // The source's own tags are left out: a segment's tag is its first bytes.
                    Found::Tag(len) => self.walk = Walk::Skip(len),
                    Found::Need => {
                        self.held.extend_from_slice(rest);
                        break;
                    }
                    Found::No => {
                        self.walk = Walk::Lost;
                        break;
                    }
                },
            }
        }
        changed
    }

    /// The current window, None while no segment is complete.
    pub fn window(&self) -> Option<Arc<Window>> {
        if self.segments.is_empty() {
            return None;
        }
        let segments: Vec<Arc<Segment>> = self.segments.iter().cloned().collect();
        let listed = self.params.listed(&self.segments);
        let first = segments.len() - listed;
        let target_secs = segments[first..]
            .iter()
            .map(|s| s.duration.round() as u64)
            .max()
            .unwrap_or(0)
            .max(self.params.segment_secs);
        let discontinuity_seq = self.discontinuities_dropped
            + segments[..first].iter().filter(|s| s.discontinuity).count() as u64;
        // fMP4 segments (`EXT-X-MAP`) need version 7 (RFC 8216, 7); packed audio, 3.
        let fmp4 = segments[first..].iter().any(|s| s.init.is_some());
        // CAN-BLOCK-RELOAD: a player may ask for the playlist once it lists a segment to come
        // (`_HLS_msn`), and get it as soon as it does rather than polling for it.
        let mut text = format!(
            "#EXTM3U\n#EXT-X-VERSION:{}\n#EXT-X-TARGETDURATION:{target_secs}\n#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES\n#EXT-X-MEDIA-SEQUENCE:{}\n#EXT-X-DISCONTINUITY-SEQUENCE:{discontinuity_seq}\n",
            if fmp4 { 7 } else { 3 },
            segments[first].seq
        );
        let mut map: Option<&str> = None;
        for s in &segments[first..] {
            if s.discontinuity {
                text.push_str("#EXT-X-DISCONTINUITY\n");
            }
            if let Some(init) = &s.init {
                if map != Some(init.name.as_str()) {
                    let _ = writeln!(text, "#EXT-X-MAP:URI=\"{}\"", init.name);
                    map = Some(init.name.as_str());
                }
            }
            if let Some(range) = &s.daterange {
                let _ = writeln!(text, "{range}");
            }
            let _ = write!(
                text,
                "#EXT-X-PROGRAM-DATE-TIME:{}\n#EXTINF:{:.5},\n{}\n",
                crate::dates::rfc3339_millis(s.date),
                s.duration,
                s.name
            );
        }
        let last = segments.last().expect("not empty");
        Some(Arc::new(Window {
            playlist_etag: format!("\"{}-{listed}\"", last.name),
            segments,
            playlist: Bytes::from(text),
            target_secs,
        }))
    }

    /// A frame of `samples` at `rate` starts: closes the segment first if the frame would take
    /// it past the target, or is of another stream, or the title changed. True if one closed.
    fn begin_frame(
        &mut self,
        kind: Kind,
        samples: u32,
        rate: u32,
        stream: u16,
        title: Title,
    ) -> bool {
        let cut = self.building.as_ref().is_some_and(|b| {
            b.stream != stream
                || b.title_version != title.version
                || (b.samples + u64::from(samples)) > self.params.segment_secs * u64::from(rate)
        });
        let closed = cut && self.close();
        if self.building.is_none() {
            self.open(kind, rate, stream, title);
        }
        let b = self.building.as_mut().expect("opened");
        b.samples += u64::from(samples);
        closed
    }

    /// Opens a segment at the timeline's current tick, its ID3 tag first.
    fn open(&mut self, kind: Kind, rate: u32, stream: u16, title: Title) {
        if rate != self.run_rate {
            self.run_ticks = self.ticks();
            self.run_samples = 0;
            self.run_rate = rate;
        }
        let ticks = self.ticks();
        let (since, at) = *self.anchor.get_or_insert((SystemTime::now(), ticks));
        let date = since + Duration::from_micros(ticks.saturating_sub(at) * 100 / 9);
        let mut data = BytesMut::with_capacity(self.expected_bytes(kind));
        id3_tag(&mut data, ticks & TICKS_MASK, title);
        self.building = Some(Building {
            committed: data.len(),
            data,
            committed_samples: 0,
            samples: 0,
            rate,
            stream,
            title_version: title.version,
            date,
            discontinuity: std::mem::take(&mut self.discontinuity),
        });
    }

    /// What a segment's buffer is given at first: the size of the latest segment of the same
    /// kind, so that it is not grown over and over.
    fn expected_bytes(&self, kind: Kind) -> usize {
        self.segments
            .back()
            .filter(|s| s.kind == media(kind))
            .map_or(16 * 1024, |s| s.data.len() + s.data.len() / 8)
    }

    fn ticks(&self) -> u64 {
        if self.run_rate == 0 {
            return self.run_ticks;
        }
        self.run_ticks + self.run_samples * TICKS_PER_SEC / u64::from(self.run_rate)
    }

    /// Cuts a frame the walk is inside out of the segment.
    fn tear(&mut self) {
        self.held.clear();
        if let Some(b) = self.building.as_mut() {
            b.data.truncate(b.committed);
            b.samples = b.committed_samples;
        }
    }

    /// Publishes the segment being built, with its whole frames; true if it had any.
    fn close(&mut self) -> bool {
        self.tear();
        let Some(b) = self.building.take() else {
            return false;
        };
        if b.committed_samples == 0 {
            // Only its tag: nothing to play. Its discontinuity waits for the next one.
            self.discontinuity |= b.discontinuity;
            return false;
        }
        let kind = media(self.kind.unwrap_or(Kind::Mp3));
        self.run_samples += b.committed_samples;
        self.add(
            kind,
            b.committed_samples as f64 / f64::from(b.rate),
            b.date,
            b.discontinuity,
            b.data.freeze(),
            (None, None),
        );
        true
    }

    /// Publishes a segment under the next sequence number (with, for fMP4, its init segment and
    /// the title range it starts); the oldest beyond the retained window go.
    fn add(
        &mut self,
        kind: Media,
        duration: f64,
        date: SystemTime,
        discontinuity: bool,
        data: Bytes,
        (init, daterange): (Option<Arc<Init>>, Option<String>),
    ) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.segments.push_back(Arc::new(Segment {
            seq,
            name: format!("{}-{seq}.{}", self.epoch, extension(kind)),
            duration,
            date,
            discontinuity,
            kind,
            data,
            init,
            daterange,
        }));
        // Kept fetchable: those listed, and as many again plus one for players that read an
        // earlier playlist (RFC 8216, 6.2.2).
        let retained = 2 * self.params.listed(&self.segments) + 1;
        while self.segments.len() > retained {
            if self.segments.pop_front().is_some_and(|s| s.discontinuity) {
                self.discontinuities_dropped += 1;
            }
        }
    }

    /// Takes whole Ogg pages (a page cut by the piece's end waits for the rest). True if a
    /// segment was completed.
    fn push_ogg(&mut self, data: &Bytes, title: Title) -> bool {
        let Some(ogg) = self.ogg.as_mut() else {
            return false;
        };
        let data = if ogg.held.is_empty() {
            data.clone()
        } else {
            ogg.held.extend_from_slice(data);
            ogg.held.split().freeze()
        };
        let mut changed = false;
        let mut pos = 0;
        while pos < data.len() {
            let b = &data[pos..];
            let whole = match b.get(26) {
                _ if !b.starts_with(&b"OggS"[..b.len().min(4)]) => None,
                Some(&n) => b.get(27..27 + usize::from(n)).map(|lacing| {
                    27 + usize::from(n) + lacing.iter().map(|&l| usize::from(l)).sum::<usize>()
                }),
                None => Some(usize::MAX),
            };
            match whole {
                // Not a page: the framer passes whole pages only, so the walk is lost until
                // the next piece.
                None => break,
                Some(len) if len > b.len() => {
                    if let Some(ogg) = self.ogg.as_mut() {
                        ogg.held.extend_from_slice(b);
                    }
                    break;
                }
                Some(len) => {
                    changed |= self.ogg_page(&data.slice(pos..pos + len), title);
                    pos += len;
                }
            }
        }
        changed
    }

    /// One whole page: a new audio stream's first page starts reading its headers, and the
    /// last of them makes a new init segment; its audio packets go into the segment.
    fn ogg_page(&mut self, page: &Bytes, title: Title) -> bool {
        let (flags, serial) = (
            page[5],
            u32::from_le_bytes([page[14], page[15], page[16], page[17]]),
        );
        let segments = usize::from(page[26]);
        let lacing = &page[27..27 + segments];
        let mut packets: Vec<Bytes> = Vec::new();
        let mut start = 27 + segments;
        let mut at = start;
        let Some(ogg) = self.ogg.as_mut() else {
            return false;
        };
        // A packet that went on from the previous page, unless that page was lost.
        let continued = flags & 1 != 0;
        if !continued {
            ogg.partial.clear();
        }
        for (i, &l) in lacing.iter().enumerate() {
            at += usize::from(l);
            if l < 255 {
                let packet = page.slice(start..at);
                if i == 0 && continued && !ogg.partial.is_empty() {
                    ogg.partial.extend_from_slice(&packet);
                    packets.push(Bytes::from(std::mem::take(&mut ogg.partial)));
                } else if !(i == 0 && continued) {
                    packets.push(packet);
                }
                start = at;
            }
        }
        if start < at {
            ogg.partial.extend_from_slice(&page[start..at]);
        }
        let mut changed = false;
        if flags & 2 != 0 {
            // A stream begins; an audio one replaces the one followed so far (a chain). Its
            // segments wait for its last header.
            let Some(headers) = packets.first().and_then(|p| Headers::begin(p)) else {
                return false;
            };
            ogg.serial = Some(serial);
            changed |= self.close_fmp4();
            if self.next_seq > 0 {
                self.discontinuity = true;
            }
            self.fmp4.init = None;
            self.fmp4.headers = Some(headers);
            self.headers_read();
            return changed;
        }
        if ogg.serial != Some(serial) || self.fmp4.headers.is_none() {
            ogg.partial.clear();
            return false;
        }
        for packet in packets {
            if self.fmp4.init.is_none() {
                let headers = self.fmp4.headers.take().expect("a stream followed");
                match headers.next(&packet) {
                    Ok(headers) => self.fmp4.headers = Some(headers),
                    // Headers of a stream that cannot be followed: its pages are passed over
                    // until the next chain.
                    Err(()) => {
                        if let Some(ogg) = self.ogg.as_mut() {
                            ogg.serial = None;
                        }
                    }
                }
                self.headers_read();
                continue;
            }
            changed |= self.fmp4_packet(packet, title);
        }
        changed
    }

    /// Takes a piece of a WebM stream: its audio track's packets go into the segment. True if
    /// a segment was completed.
    fn push_webm(&mut self, data: &Bytes, title: Title) -> bool {
        let Some(webm) = self.webm.as_mut() else {
            return false;
        };
        let mut items = Vec::new();
        webm.push(data, &mut items);
        let mut changed = false;
        for item in items {
            match item {
                Item::Track(codec) => changed |= self.webm_track(codec),
                Item::Packet(packet) => changed |= self.fmp4_packet(packet, title),
            }
        }
        changed
    }

    /// A WebM file's audio track, read from its Tracks: the first file's, or a new file's on
    /// the same connection. A new file of the same stream (the same init segment) goes on in
    /// the same segment, as the audio does; another stream, or none, closes it, and the next
    /// segment follows a discontinuity, with the new init segment.
    fn webm_track(&mut self, codec: Option<Codec>) -> bool {
        let same = match (&codec, &self.fmp4.init) {
            (Some(codec), Some(init)) => init.data[..] == init_segment(codec)[..],
            _ => false,
        };
        if same {
            return false;
        }
        let changed = self.close_fmp4();
        if self.next_seq > 0 {
            self.discontinuity = true;
        }
        self.fmp4.init = None;
        self.fmp4.headers = codec.map(Headers::Done);
        self.headers_read();
        changed
    }

    /// Makes the stream's init segment once its headers are all read (the window changes only
    /// with its first segment).
    fn headers_read(&mut self) {
        if let (None, Some(Headers::Done(codec))) = (&self.fmp4.init, &self.fmp4.headers) {
            let rate = codec.rate();
            if self.fmp4_rate != 0 && self.fmp4_rate != rate {
                self.fmp4_time = self.fmp4_time * u64::from(rate) / u64::from(self.fmp4_rate);
            }
            self.fmp4_rate = rate;
            self.inits += 1;
            self.fmp4.init = Some(Arc::new(Init {
                name: format!("{}-init-{}.mp4", self.epoch, self.inits),
                data: Bytes::from(init_segment(codec)),
            }));
        }
    }

    /// An audio packet: closes the segment first if it would take it past the target, or the
    /// title changed (the next segment starts with the new title's `EXT-X-DATERANGE`).
    fn fmp4_packet(&mut self, packet: Bytes, title: Title) -> bool {
        let Some(Headers::Done(codec)) = self.fmp4.headers.as_mut() else {
            return false;
        };
        // Not audio (a FLAC metadata block, a stray header): left out.
        let Some(samples) = codec.samples(&packet) else {
            return false;
        };
        let rate = u64::from(codec.rate());
        let target = self.params.segment_secs * rate;
        let f = &self.fmp4;
        let full = !f.packets.is_empty()
            && (f.samples + u64::from(samples) > target || f.title_version != Some(title.version));
        let changed = full && self.close_fmp4();
        let ticks = self.fmp4_time * TICKS_PER_SEC / rate;
        let (since, at) = *self.anchor.get_or_insert((SystemTime::now(), ticks));
        let time = self.fmp4_time;
        let f = &mut self.fmp4;
        if f.packets.is_empty() {
            let date = since + Duration::from_micros(ticks.saturating_sub(at) * 100 / 9);
            f.date = Some(date);
            f.start = time;
            if f.title_version != Some(title.version) {
                f.title_version = Some(title.version);
                f.daterange = daterange(title, date);
            }
        }
        f.packets.push((samples, packet));
        f.samples += u64::from(samples);
        self.fmp4_time += u64::from(samples);
        changed
    }

    /// Publishes the segment being built as an fMP4 fragment; true if it had packets.
    fn close_fmp4(&mut self) -> bool {
        let f = &mut self.fmp4;
        if f.packets.is_empty() {
            return false;
        }
        let rate = match &f.headers {
            Some(Headers::Done(codec)) => codec.rate(),
            _ => return false,
        };
        let packets = std::mem::take(&mut f.packets);
        let samples = std::mem::take(&mut f.samples);
        let refs: Vec<(u32, &[u8])> = packets.iter().map(|(n, p)| (*n, &p[..])).collect();
        let data = fragment(self.next_seq as u32 + 1, f.start, &refs);
        let (date, init, range) = (f.date.take(), f.init.clone(), f.daterange.take());
        let discontinuity = std::mem::take(&mut self.discontinuity);
        self.add(
            Media::Fmp4,
            samples as f64 / f64::from(rate),
            date.unwrap_or_else(SystemTime::now),
            discontinuity,
            Bytes::from(data),
            (init, range),
        );
        true
    }
}

/// The `EXT-X-DATERANGE` of a title starting at `date` (RFC 8216, 4.3.2.7), with the title
/// and artist as client attributes `X-TITLE` and `X-ARTIST`; None without either. Quoted
/// strings cannot hold a quote or a line break: those become a space.
fn daterange(title: Title, date: SystemTime) -> Option<String> {
    if title.title.is_none() && title.artist.is_none() {
        return None;
    }
    let quoted = |s: &str| -> String {
        s.chars()
            .map(|c| if c == '"' || c.is_control() { ' ' } else { c })
            .collect()
    };
    let mut line = format!(
        "#EXT-X-DATERANGE:ID=\"title-{}\",CLASS=\"com.fanstream.title\",START-DATE=\"{}\"",
        title.version,
        crate::dates::rfc3339_millis(date)
    );
    for (name, value) in [("X-TITLE", title.title), ("X-ARTIST", title.artist)] {
        if let Some(v) = value {
            let _ = write!(line, ",{name}=\"{}\"", quoted(v));
        }
    }
    Some(line)
}

/// Writes an ID3v2.4 tag: the PRIV timestamp frame, then the title and artist if known.
fn id3_tag(out: &mut BytesMut, ticks: u64, title: Title) {
    let mut frames = Vec::with_capacity(64);
    let mut priv_frame = TIMESTAMP_OWNER.to_vec();
    priv_frame.extend_from_slice(&ticks.to_be_bytes());
    id3_frame(&mut frames, b"PRIV", &priv_frame);
    for (id, text) in [(b"TIT2", title.title), (b"TPE1", title.artist)] {
        if let Some(text) = text.filter(|t| !t.is_empty()) {
            // Encoding 3: UTF-8.
            let mut body = vec![3];
            body.extend_from_slice(text.as_bytes());
            id3_frame(&mut frames, id, &body);
        }
    }
    out.extend_from_slice(b"ID3\x04\x00\x00");
    out.extend_from_slice(&syncsafe(frames.len()));
    out.extend_from_slice(&frames);
}

fn id3_frame(out: &mut Vec<u8>, id: &[u8; 4], body: &[u8]) {
    out.extend_from_slice(id);
    out.extend_from_slice(&syncsafe(body.len()));
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(body);
}

/// ID3v2.4 sizes: 28 bits, 7 per byte. Titles are bounded far below 256 MiB before they get here.
fn syncsafe(n: usize) -> [u8; 4] {
    let n = n.min((1 << 28) - 1) as u32;
    [
        (n >> 21) as u8 & 0x7F,
        (n >> 14) as u8 & 0x7F,
        (n >> 7) as u8 & 0x7F,
        n as u8 & 0x7F,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An MPEG-1 layer III header at 128 kbit/s and 44.1 kHz (417 bytes without padding).
    fn mp3_frame(fill: u8) -> Vec<u8> {
        let mut f = vec![0xFF, 0xFB, 0x90, 0x00];
        f.resize(417, fill);
        f
    }

    const PARAMS: Params = Params {
        segment_secs: 1,
        segments: 3,
    };

    /// The segments the playlist lists.
    fn listed(w: &Window) -> &[Arc<Segment>] {
        &w.segments[w.segments.len().saturating_sub(PARAMS.segments)..]
    }

    fn untitled() -> Title<'static> {
        Title {
            version: 0,
            title: None,
            artist: None,
        }
    }

    fn feed(s: &mut Segmenter, frames: usize, piece: usize, title: Title) {
        let mut all = Vec::new();
        for i in 0..frames {
            all.extend(mp3_frame(i as u8));
        }
        let all = Bytes::from(all);
        for (i, at) in (0..all.len()).step_by(piece).enumerate() {
            let chunk = all.slice(at..(at + piece).min(all.len()));
            s.push(&chunk, i == 0, PARAMS, title);
        }
    }

    /// Title updates every quarter second cut segments that short: the playlist lists enough
    /// of them to span three target durations, and keeps as many again fetchable.
    #[test]
    fn short_segments_cut_by_titles_are_listed_for_three_target_durations() {
        let mut s = Segmenter::new(PARAMS);
        s.start_source(Some(Source::Packed(Kind::Mp3)));
        for version in 1..=40 {
            let title = Title {
                version,
                title: Some("t"),
                artist: None,
            };
            // Ten frames, 0.26 s.
            feed(&mut s, 10, 1000, title);
        }
        let w = s.window().unwrap();
        let text = std::str::from_utf8(&w.playlist).unwrap();
        let durations: Vec<f64> = text
            .lines()
            .filter_map(|l| l.strip_prefix("#EXTINF:"))
            .map(|d| d.trim_end_matches(',').parse().unwrap())
            .collect();
        let span: f64 = durations.iter().sum();
        assert!(durations.len() > PARAMS.segments, "{text}");
        assert!(
            span >= 0.95 * 3.0 * w.target_secs as f64,
            "{span} s: {text}"
        );
        assert!(
            span < 3.0 * w.target_secs as f64 + 0.3,
            "no more than needed: {text}"
        );
        assert_eq!(w.segments.len(), 2 * durations.len() + 1);
    }

    #[test]
    fn segments_hold_whole_frames_up_to_the_target_duration() {
        let mut s = Segmenter::new(PARAMS);
        s.start_source(Some(Source::Packed(Kind::Mp3)));
        // 1 s at 44.1 kHz is 38.28 frames of 1,152 samples: 38 per segment.
        feed(&mut s, 200, 1000, untitled());
        let w = s.window().unwrap();
        assert_eq!(listed(&w).len(), 3);
        assert_eq!(
            w.segments.len(),
            5,
            "all of them retained while within 2n+1"
        );
        for seg in &w.segments {
            assert!((seg.duration - 38.0 * 1152.0 / 44100.0).abs() < 1e-9);
            let tag = 10 + 10 + TIMESTAMP_OWNER.len() + 8;
            assert_eq!(&seg.data[..3], b"ID3");
            assert_eq!(seg.data.len(), tag + 38 * 417);
            assert_eq!(&seg.data[tag..tag + 2], &[0xFF, 0xFB]);
        }
        // Timestamps follow the samples: each segment starts 38 frames after the previous one.
        let ts = |seg: &Segment| {
            let at = 20 + TIMESTAMP_OWNER.len();
            u64::from_be_bytes(seg.data[at..at + 8].try_into().unwrap())
        };
        assert_eq!(ts(&w.segments[0]), 0);
        assert_eq!(ts(&w.segments[1]), 38 * 1152 * 90_000 / 44100);
        let text = std::str::from_utf8(&w.playlist).unwrap();
        assert!(text.contains("#EXT-X-TARGETDURATION:1\n"), "{text}");
        assert!(text.contains("#EXT-X-MEDIA-SEQUENCE:2\n"), "{text}");
        assert!(text.contains("#EXTINF:0.99265,\n"), "{text}");
        assert_eq!(text.matches("#EXTINF").count(), 3);
        assert!(is_segment_name(&listed(&w)[0].name));
    }

    #[test]
    fn a_title_change_starts_a_segment_with_the_title() {
        let mut s = Segmenter::new(PARAMS);
        s.start_source(Some(Source::Packed(Kind::Mp3)));
        feed(&mut s, 10, 417, untitled());
        let titled = Title {
            version: 1,
            title: Some("Song"),
            artist: Some("Band"),
        };
        feed(&mut s, 50, 417, titled);
        let w = s.window().unwrap();
        assert_eq!(w.segments[0].data.len() - 73, 10 * 417, "cut at the change");
        let second = &w.segments[1].data;
        assert!(second.windows(8).any(|x| x == b"TIT2\0\0\0\x05"));
        assert!(second.windows(4).any(|x| x == b"Song"));
        assert!(second.windows(4).any(|x| x == b"Band"));
    }

    #[test]
    fn a_torn_frame_and_garbage_are_left_out_and_a_new_source_is_a_discontinuity() {
        let mut s = Segmenter::new(PARAMS);
        s.start_source(Some(Source::Packed(Kind::Mp3)));
        let frame = Bytes::from(mp3_frame(1));
        s.push(&frame, true, PARAMS, untitled());
        // Half a frame, then the framer resyncs on a new frame.
        s.push(&frame.slice(..200), false, PARAMS, untitled());
        s.push(&Bytes::from_static(b"garbage"), true, PARAMS, untitled());
        for _ in 0..3 {
            s.push(&frame, true, PARAMS, untitled());
        }
        assert!(s.end_source());
        let w = s.window().unwrap();
        assert_eq!(w.segments[0].data.len(), 73 + 4 * 417);
        s.start_source(Some(Source::Packed(Kind::Adts)));
        let mut adts = vec![0xFF, 0xF1, 0x50, 0x80, 0x2E, 0x7F, 0xFC];
        adts.resize(371, 0);
        for _ in 0..100 {
            s.push(&Bytes::from(adts.clone()), true, PARAMS, untitled());
        }
        let w = s.window().unwrap();
        let text = std::str::from_utf8(&w.playlist).unwrap();
        assert!(text.contains("#EXT-X-DISCONTINUITY\n"), "{text}");
        assert!(listed(&w).last().unwrap().name.ends_with(".aac"), "{text}");
    }

    /// A WebM stream as a live muxer writes it: `head`, then unknown-size Clusters of a
    /// second each (50 Opus packets of 20 ms as `track`, video blocks as track 1 between them),
    /// `secs` of them.
    fn webm(head: Vec<u8>, track: u8, secs: u8, first: u8) -> Vec<u8> {
        use crate::webm::CLUSTER;
        use crate::webm_blocks::testing::{el, packet, simple_block, unknown, TIMESTAMP};
        let mut out = head;
        for s in 0..secs {
            out.extend(unknown(CLUSTER));
            out.extend(el(TIMESTAMP, &[s]));
            for n in 0..50 {
                if n % 10 == 0 {
                    out.extend(simple_block(1, 0x80, &[], &[vec![0x9D; 500]]));
                }
                let p = packet(first.wrapping_add(s).wrapping_add(n), 30);
                out.extend(simple_block(track, 0x80, &[], &[p]));
            }
        }
        out
    }

    fn push_webm(s: &mut Segmenter, data: &[u8], piece: usize, title: Title) {
        let data = Bytes::copy_from_slice(data);
        for at in (0..data.len()).step_by(piece) {
            s.push(
                &data.slice(at..(at + piece).min(data.len())),
                false,
                PARAMS,
                title,
            );
        }
    }

    fn webm_segmenter() -> Segmenter {
        let mut s = Segmenter::new(PARAMS);
        s.start_source(source_for("video/webm; codecs=\"vp8, opus\""));
        s
    }

    #[test]
    fn a_webm_opus_stream_is_cut_into_fmp4_segments_whatever_the_pieces() {
        use crate::webm_blocks::testing::header;
        let stream = webm(header(2, 1), 2, 4, 0);
        let mut whole = webm_segmenter();
        push_webm(&mut whole, &stream, stream.len(), untitled());
        let w = whole.window().unwrap();
        // Four seconds of 48,000 samples: the fourth segment waits for the next packet.
        assert_eq!(w.segments.len(), 3);
        let init = w.segments[0].init.as_ref().expect("an init segment");
        assert!(init.data.windows(4).any(|b| b == b"Opus"));
        assert!(init.data.windows(4).any(|b| b == b"dOps"));
        for seg in &w.segments {
            assert_eq!(seg.kind, Media::Fmp4);
            assert!((seg.duration - 1.0).abs() < 1e-9, "{}", seg.duration);
            assert!(seg.data.windows(4).any(|b| b == b"moof"));
            assert!(!seg.discontinuity);
            assert!(Arc::ptr_eq(seg.init.as_ref().unwrap(), init));
        }
        let text = std::str::from_utf8(&w.playlist).unwrap();
        assert!(text.contains("#EXT-X-VERSION:7\n"), "{text}");
        assert!(
            text.contains(&format!("#EXT-X-MAP:URI=\"{}\"", init.name)),
            "{text}"
        );
        for piece in [1, 7, 100, 4096] {
            let mut s = webm_segmenter();
            push_webm(&mut s, &stream, piece, untitled());
            let pieces = s.window().unwrap();
            let data = |w: &Window| {
                w.segments
                    .iter()
                    .map(|s| s.data.clone())
                    .collect::<Vec<_>>()
            };
            assert_eq!(data(&pieces), data(&w), "pieces of {piece}");
        }
        // A WebM stream of no audio track taken: no segments, as an Ogg stream of Speex.
        let mut video = webm_segmenter();
        let mut only_video = header(2, 1);
        let at = only_video.windows(6).position(|b| b == b"A_OPUS").unwrap();
        only_video[at..at + 6].copy_from_slice(b"A_SPX!");
        push_webm(&mut video, &webm(only_video, 2, 3, 0), 4096, untitled());
        assert!(video.window().is_none());
    }

    #[test]
    fn a_new_webm_file_keeps_its_init_segment_unless_the_stream_changed() {
        use crate::webm_blocks::testing::header;
        let mut s = webm_segmenter();
        // A new file of the same stream half a second into a segment (after 25 of the
        // packets: two groups of a video block and ten audio ones, a video block and five
        // audio ones): the segment goes on.
        let mut stream = webm(header(2, 1), 2, 1, 0);
        let half = webm(header(2, 1), 2, 1, 50);
        let cut = header(2, 1).len() + 12 + 10 + 2 * (513 + 10 * 43) + 513 + 5 * 43;
        stream.extend(&half[..cut]);
        stream.extend(webm(header(2, 1), 2, 2, 100));
        push_webm(&mut s, &stream, 1000, untitled());
        let w = s.window().unwrap();
        assert_eq!(w.segments.len(), 3);
        for seg in &w.segments {
            assert!(!seg.discontinuity);
            assert!((seg.duration - 1.0).abs() < 1e-9, "{}", seg.duration);
            assert!(seg.init.as_ref().unwrap().name.ends_with("-init-1.mp4"));
        }
        let before = w.segments.len();
        // Stereo now: the open segment closes, the next one follows a discontinuity with a
        // new init segment.
        push_webm(&mut s, &webm(header(3, 2), 3, 3, 0), 1000, untitled());
        let w = s.window().unwrap();
        let changed = &w.segments[before + 1];
        assert!(changed.discontinuity);
        assert!(changed.init.as_ref().unwrap().name.ends_with("-init-2.mp4"));
        assert!(w.segments[before]
            .init
            .as_ref()
            .unwrap()
            .name
            .ends_with("-init-1.mp4"));
        let text = std::str::from_utf8(&w.playlist).unwrap();
        assert!(text.contains("#EXT-X-DISCONTINUITY\n"), "{text}");
    }

    #[test]
    fn a_title_on_a_webm_mount_is_a_daterange() {
        use crate::webm_blocks::testing::header;
        let mut s = webm_segmenter();
        push_webm(&mut s, &webm(header(2, 1), 2, 1, 0), 1000, untitled());
        let titled = Title {
            version: 1,
            title: Some("Song"),
            artist: Some("Band"),
        };
        push_webm(&mut s, &webm(Vec::new(), 2, 3, 0), 1000, titled);
        let w = s.window().unwrap();
        let range = w.segments[1].daterange.as_deref().expect("a date range");
        assert!(range.contains("X-TITLE=\"Song\""), "{range}");
        let text = std::str::from_utf8(&w.playlist).unwrap();
        assert!(text.contains(range), "{text}");
    }

    #[test]
    fn segment_names_are_recognised() {
        assert!(is_segment_name("1764476400123-0.mp3"));
        assert!(is_segment_name("1-22.aac"));
        for bad in [
            "index.m3u8",
            "1-2.ogg",
            "-2.mp3",
            "1-.mp3",
            "a-1.mp3",
            "12.mp3",
        ] {
            assert!(!is_segment_name(bad), "{bad}");
        }
    }
}
