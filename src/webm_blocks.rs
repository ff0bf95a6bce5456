//! The packets of a WebM (Matroska) stream's audio track, for HLS: the segmenter puts them
//! into fMP4 as it does an Ogg stream's. Fed the stream as its source sends it, in pieces that
//! may cut an element anywhere, it reads each file's Tracks (from its
//! EBML header on: a source may start a new file on the same connection) for the first audio
//! track whose codec [`crate::fmp4`] takes, with the codec's headers from its CodecPrivate:
//! - Opus: the `OpusHead` packet, the same bytes as an Ogg Opus stream's first packet;
//! - Vorbis: the three header packets, Xiph-laced;
//! - FLAC (Matroska; WebM has no FLAC): `fLaC` and the metadata blocks, `STREAMINFO` first.
//!
//! A track with ContentEncodings (compressed or encrypted frames) is not followed. Then, in the
//! Clusters, come the track's blocks (SimpleBlocks, and Blocks in BlockGroups), each parted into
//! its frames (no lacing, or Xiph, EBML or fixed-size lacing), each frame a packet.
//!
//! Memory stays bounded whatever the stream: a Cluster, of known size or unknown (all ones, as
//! live muxers and MediaRecorder write it; it ends at the next level-1 element), is walked
//! element by element, never held. What is held: an element head (12 bytes at most), the
//! Tracks element (at most [`MAX_HEADER_BYTES`], past which the framer refuses the source
//! anyway), and a block of the followed track that a piece cut, up to [`MAX_BLOCK_BYTES`].
//! Other tracks' blocks (video) are read no further than their track number. Bytes that are no
//! element where they are (garbage, a torn element) are passed over up to the next Cluster or
//! EBML header, as the framer ([`crate::webm`]) does, so that what comes out does not depend on
//! how the stream was cut into pieces.

use bytes::{Bytes, BytesMut};

use crate::format::MAX_HEADER_BYTES;
use crate::ogg_codecs::{Codec, Headers, OpusHead};
use crate::webm::{
    children, codec_name, is_cluster_child, is_level1, read_head, uint, vint, vint_len, Head,
    Parsed, BLOCK, BLOCK_GROUP, CLUSTER, CODEC_ID, CRC32, EBML, MAX_EBML_HEADER_BYTES, MAX_HEAD,
    SEGMENT, SIMPLE_BLOCK, TRACKS, TRACK_ENTRY, TRACK_NUMBER, TRACK_TYPE, VOID,
};

// A TrackEntry's children the framer needs not.
const CODEC_PRIVATE: u32 = 0x63A2;
const CONTENT_ENCODINGS: u32 = 0x6D80;
/// TrackType of an audio track.
const AUDIO: u64 = 2;
/// Most bytes of a block of the followed track held while a piece cut it. An Opus packet is at
/// most some 60 KB (120 ms at 510 kbit/s), a FLAC frame rarely over 100 KB: a block larger than
/// this is no audio a player would take, and is passed over, its packets lost to HLS.
pub(crate) const MAX_BLOCK_BYTES: u64 = 1 << 20;

/// What the reader finds, in stream order.
#[derive(Debug, PartialEq)]
pub(crate) enum Item {
    /// A file's Tracks were read: the codec of the audio track followed from here on, None if
    /// the file has none the segmenter takes.
    Track(Option<Codec>),
    /// A packet of that track: one frame of a block.
    Packet(Bytes),
}

/// Where an element head is read.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Place {
    /// Right after an EBML header: the Segment's head.
    Segment,
    /// Inside the Segment, between its level-1 elements.
    Level1,
    Cluster,
    BlockGroup,
}

/// What an element body's bytes are for.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Body {
    Skip,
    /// The EBML header's, held whole (4 KiB at most): a new file starts after it.
    Ebml,
    /// The Tracks element's, held whole.
    Tracks,
    /// A block's first bytes, up to its track number (read into the head buffer). `size`: its
    /// body's.
    BlockTrack {
        size: u64,
    },
    /// A block of the followed track, held until its last byte.
    Block,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum State {
    /// Looking for an EBML header or a Cluster; `window`: the last bytes seen, `seen` how many
    /// of them count (at most 4).
    Searching { window: u32, seen: u8 },
    /// Reading an element head into the head buffer.
    Head { place: Place },
    /// In an element body, `left` bytes to go.
    Body { left: u64, body: Body },
}

/// One source's WebM stream, read for its audio track's packets.
pub(crate) struct Blocks {
    /// Stream offset of the next byte to read.
    pos: u64,
    state: State,
    head: [u8; MAX_HEAD],
    head_len: usize,
    /// The followed track's number, from the current file's Tracks.
    track: Option<u64>,
    in_cluster: bool,
    /// Where the current Cluster and BlockGroup end, when known.
    cluster_end: Option<u64>,
    group_end: Option<u64>,
    /// The Tracks element, or the followed track's block, that a piece cut.
    held: BytesMut,
    /// Blocks of the followed track passed over (too large, or lacing that does not add up).
    dropped: u64,
}

impl Blocks {
    pub fn new() -> Self {
        Blocks {
            pos: 0,
            state: State::Searching { window: 0, seen: 0 },
            head: [0; MAX_HEAD],
            head_len: 0,
            track: None,
            in_cluster: false,
            cluster_end: None,
            group_end: None,
            held: BytesMut::new(),
            dropped: 0,
        }
    }

    /// Reads the next piece of the stream, appending what it finds to `out`.
    pub fn push(&mut self, data: &Bytes, out: &mut Vec<Item>) {
        let mut i = 0;
        while i < data.len() {
            i += self.step(data, i, out);
        }
    }

    /// Reads from `data[i..]`; returns how many bytes it took (at least one).
    fn step(&mut self, data: &Bytes, i: usize, out: &mut Vec<Item>) -> usize {
        let avail = data.len() - i;
        match self.state {
            State::Searching {
                mut window,
                mut seen,
            } => {
                for (n, &b) in data[i..].iter().enumerate() {
                    seen = (seen + 1).min(4);
                    window = window << 8 | u32::from(b);
                    self.pos += 1;
                    if seen == 4 && (window == EBML || window == CLUSTER) {
                        self.head[..4].copy_from_slice(&window.to_be_bytes());
                        self.head_len = 4;
                        self.state = State::Head {
                            place: Place::Level1,
                        };
                        return n + 1;
                    }
                }
                self.state = State::Searching { window, seen };
                avail
            }
            State::Head { place } => {
                let had = self.head_len;
                let take = (MAX_HEAD - had).min(avail);
                self.head[had..had + take].copy_from_slice(&data[i..i + take]);
                match read_head(&self.head[..had + take]) {
                    Parsed::Need => {
                        self.head_len += take;
                        self.pos += take as u64;
                        take
                    }
                    Parsed::No(n) => {
                        // The bytes before this piece were a consistent head so far: `n > had`.
                        let took = n.saturating_sub(had).max(1);
                        self.pos += took as u64;
                        self.lose_sync();
                        took
                    }
                    Parsed::Yes(h) => {
                        self.pos += (h.len - had) as u64;
                        self.head_len = 0;
                        self.on_head(place, h, out);
                        h.len - had
                    }
                }
            }
            State::Body { left, body } => {
                let take = usize::try_from(left).unwrap_or(usize::MAX).min(avail);
                let bytes = &data[i..i + take];
                let (took, body) = match body {
                    Body::Skip => (take, body),
                    Body::Ebml | Body::Tracks | Body::Block => {
                        self.held.extend_from_slice(bytes);
                        (take, body)
                    }
                    // The whole block in this piece: its packets are slices of it.
                    Body::BlockTrack { .. }
                        if self.head_len == 0 && take as u64 == left && left <= MAX_BLOCK_BYTES =>
                    {
                        self.block(&data.slice(i..i + take), out);
                        (take, Body::Skip)
                    }
                    Body::BlockTrack { size } => self.block_track(size, bytes),
                };
                self.pos += took as u64;
                let left = left - took as u64;
                self.state = State::Body { left, body };
                if left == 0 {
                    self.body_done(body, out);
                }
                took
            }
        }
    }

    /// Reads a block's track number from `bytes` (the block's body, as far as this piece has
    /// it) into the head buffer; returns how many bytes it took and what the rest of the body
    /// is for: held if the block is the followed track's, passed over if not.
    fn block_track(&mut self, size: u64, bytes: &[u8]) -> (usize, Body) {
        let mut took = 0;
        for &b in bytes {
            self.head[self.head_len] = b;
            self.head_len += 1;
            took += 1;
            let Some(len) = vint_len(self.head[0]) else {
                self.head_len = 0;
                return (took, Body::Skip);
            };
            if self.head_len < len {
                continue;
            }
            let number = vint(&self.head[..len]).map(|(n, _)| n);
            let ours = number.is_some() && number == self.track;
            let body = if ours && size > MAX_BLOCK_BYTES {
                self.drop_block("larger than MAX_BLOCK_BYTES");
                Body::Skip
            } else if ours {
                self.held.extend_from_slice(&self.head[..len]);
                Body::Block
            } else {
                Body::Skip
            };
            self.head_len = 0;
            return (took, body);
        }
        (took, Body::BlockTrack { size })
    }

    fn body_done(&mut self, body: Body, out: &mut Vec<Item>) {
        match body {
            Body::Ebml => {
                // Garbage that holds the ID rarely holds elements that fill the size after it
                // (the framer's test too): only a real header ends the followed track.
                let header = self.held.split();
                if children(&header).map(|(.., n)| n).sum::<usize>() == header.len() {
                    self.track = None;
                    self.state = State::Head {
                        place: Place::Segment,
                    };
                } else {
                    self.lose_sync();
                }
                return;
            }
            Body::Tracks => {
                let tracks = self.held.split().freeze();
                let followed = follow(&tracks);
                self.track = followed.as_ref().map(|(n, _)| *n);
                out.push(Item::Track(followed.map(|(_, codec)| codec)));
            }
            Body::Block => {
                let block = self.held.split().freeze();
                self.block(&block, out);
            }
            // A block cut short by its own size (its track number longer than the block).
            Body::BlockTrack { .. } => self.head_len = 0,
            Body::Skip => {}
        }
        self.next_head();
    }

    /// A whole block: if it is the followed track's, its frames are packets.
    fn block(&mut self, b: &Bytes, out: &mut Vec<Item>) {
        let Some((number, n)) = vint(b) else {
            return;
        };
        if Some(number) != self.track {
            return;
        }
        // After the track number: a 16-bit timestamp, then the flags, whose bits 1-2 say how
        // the frames are laced.
        let frames = b
            .get(n + 2)
            .and_then(|&flags| laced(&b.slice(n + 3..), flags >> 1 & 3));
        match frames {
            Some(frames) => out.extend(frames.into_iter().map(Item::Packet)),
            None => self.drop_block("its lacing does not add up"),
        }
    }

    fn drop_block(&mut self, why: &str) {
        self.dropped += 1;
        // Once per source at warn: a stream that does it once likely does it in every block.
        if self.dropped == 1 {
            tracing::warn!(why, "a WebM audio block passed over: its packets are left out of HLS segments (logged once per source)");
        } else {
            tracing::debug!(
                why,
                dropped = self.dropped,
                "a WebM audio block passed over"
            );
        }
    }

    /// Acts on an element head read at `place`; its bytes are in the head buffer.
    fn on_head(&mut self, place: Place, h: Head, out: &mut Vec<Item>) {
        let end = h.size.map(|s| self.pos.saturating_add(s));
        match place {
            Place::Segment if h.id == SEGMENT => self.next_head(),
            Place::Segment => self.lose_sync(),
            Place::Cluster | Place::BlockGroup if h.id == EBML || is_level1(h.id) => {
                // An unknown-size Cluster ends here, as does one whose size was wrong.
                self.end_cluster();
                self.level1(h, out);
            }
            Place::Level1 => self.level1(h, out),
            Place::Cluster => {
                let fits = end.is_some_and(|e| self.cluster_end.is_none_or(|c| e <= c));
                if !fits || !is_cluster_child(h.id) {
                    self.lose_sync();
                } else if h.id == BLOCK_GROUP {
                    self.group_end = end;
                    self.next_head();
                } else {
                    self.enter_child(h, SIMPLE_BLOCK, out);
                }
            }
            Place::BlockGroup => {
                if end.is_none_or(|e| self.group_end.is_none_or(|g| e > g)) {
                    self.lose_sync();
                } else {
                    self.enter_child(h, BLOCK, out);
                }
            }
        }
    }

    /// A head between the Segment's level-1 elements.
    fn level1(&mut self, h: Head, out: &mut Vec<Item>) {
        match h.id {
            // A new file, whose Tracks say which track to follow.
            EBML if h.size.is_some_and(|s| s <= MAX_EBML_HEADER_BYTES) => {
                self.enter_body(h, Body::Ebml, out);
            }
            CLUSTER => {
                self.in_cluster = true;
                self.cluster_end = h.size.map(|s| self.pos.saturating_add(s));
                self.next_head();
            }
            TRACKS if h.size.is_some_and(|s| s <= MAX_HEADER_BYTES as u64) => {
                self.enter_body(h, Body::Tracks, out);
            }
            id if (is_level1(id) || id == VOID || id == CRC32) && h.size.is_some() => {
                self.enter_body(h, Body::Skip, out);
            }
            _ => self.lose_sync(),
        }
    }

    /// Enters a child of a Cluster or a BlockGroup: a block (`block`, the ID blocks have
    /// there) is read as far as its track number, anything else passed over.
    fn enter_child(&mut self, h: Head, block: u32, out: &mut Vec<Item>) {
        let body = if h.id == block {
            Body::BlockTrack {
                size: h.size.unwrap_or(0),
            }
        } else {
            Body::Skip
        };
        self.enter_body(h, body, out);
    }

    fn enter_body(&mut self, h: Head, body: Body, out: &mut Vec<Item>) {
        let left = h.size.unwrap_or(0);
        self.state = State::Body { left, body };
        if left == 0 {
            self.body_done(body, out);
        }
    }

    /// Where the next element head is read: BlockGroups and Clusters of known size may end
    /// here.
    fn next_head(&mut self) {
        if self.group_end == Some(self.pos) {
            self.group_end = None;
        }
        if self.in_cluster && self.group_end.is_none() && self.cluster_end == Some(self.pos) {
            self.end_cluster();
        }
        let place = if self.group_end.is_some() {
            Place::BlockGroup
        } else if self.in_cluster {
            Place::Cluster
        } else {
            Place::Level1
        };
        self.state = State::Head { place };
    }

    fn end_cluster(&mut self) {
        self.in_cluster = false;
        self.cluster_end = None;
        self.group_end = None;
    }

    /// The bytes read since the last element are no element where they are: what follows is
    /// passed over up to an EBML header or a Cluster.
    fn lose_sync(&mut self) {
        self.state = State::Searching { window: 0, seen: 0 };
        self.head_len = 0;
        self.held.clear();
        self.end_cluster();
    }
}

/// A block's frames, from its data after the flags; `lacing` from the flags: 0 none, 1 Xiph,
/// 2 fixed-size, 3 EBML. None if the sizes do not add up. (CodecPrivate of Vorbis is Xiph-laced
/// the same way.)
fn laced(data: &Bytes, lacing: u8) -> Option<Vec<Bytes>> {
    if lacing == 0 {
        return Some(vec![data.clone()]);
    }
    let count = usize::from(*data.first()?) + 1;
    let mut at = 1;
    let mut sizes = Vec::with_capacity(count);
    match lacing {
        1 => {
            for _ in 1..count {
                let mut size = 0;
                loop {
                    let b = *data.get(at)?;
                    at += 1;
                    size += usize::from(b);
                    if b < 255 {
                        break;
                    }
                }
                sizes.push(size);
            }
        }
        2 => {
            let rest = data.len() - 1;
            if !rest.is_multiple_of(count) {
                return None;
            }
            sizes.resize(count - 1, rest / count);
        }
        _ => {
            // The first size, then each next one as a signed difference from the one before.
            let mut size: i64 = 0;
            for k in 1..count {
                let (raw, n) = vint(data.get(at..)?)?;
                at += n;
                size = if k == 1 {
                    i64::try_from(raw).ok()?
                } else {
                    let bias = (1i64 << (7 * n - 1)) - 1;
                    size.checked_add(raw as i64 - bias)?
                };
                sizes.push(usize::try_from(size).ok()?);
            }
        }
    }
    let mut frames = Vec::with_capacity(count);
    for size in sizes {
        let end = at.checked_add(size).filter(|&e| e <= data.len())?;
        frames.push(data.slice(at..end));
        at = end;
    }
    frames.push(data.slice(at..));
    Some(frames)
}

/// The first audio track of a Tracks element whose codec the segmenter takes: its number and
/// codec.
fn follow(tracks: &[u8]) -> Option<(u64, Codec)> {
    children(tracks)
        .filter(|&(id, ..)| id == TRACK_ENTRY)
        .find_map(|(_, entry, _)| {
            let (mut number, mut audio, mut encoded) = (0, false, false);
            let (mut id, mut private): (&[u8], &[u8]) = (&[], &[]);
            for (child, value, _) in children(entry) {
                match child {
                    TRACK_NUMBER => number = uint(value),
                    TRACK_TYPE => audio = uint(value) == AUDIO,
                    CODEC_ID => id = value,
                    CODEC_PRIVATE => private = value,
                    CONTENT_ENCODINGS => encoded = true,
                    _ => {}
                }
            }
            if !audio || encoded || number == 0 {
                return None;
            }
            codec(id, private).map(|codec| (number, codec))
        })
}

/// A track's codec, from its CodecID and CodecPrivate; None for one the segmenter does not take.
fn codec(id: &[u8], private: &[u8]) -> Option<Codec> {
    match codec_name(id) {
        "Opus" => OpusHead::parse(private).map(Codec::Opus),
        "Vorbis" => {
            let packets = laced(&Bytes::copy_from_slice(private), 1)?;
            let [ident, comment, setup] = <[Bytes; 3]>::try_from(packets).ok()?;
            match Headers::begin(&ident)?
                .next(&comment)
                .ok()?
                .next(&setup)
                .ok()?
            {
                Headers::Done(codec @ Codec::Vorbis(_)) => Some(codec),
                _ => None,
            }
        }
        "FLAC" => {
            // What Ogg FLAC's first packet holds before `fLaC`: its mapping's signature,
            // version 1.0, and a header count (0: unknown), so that one parser reads both.
            let mut first = b"\x7FFLAC\x01\x00\x00\x00".to_vec();
            first.extend_from_slice(private);
            match Headers::begin(&first)? {
                Headers::Done(codec @ Codec::Flac(_)) => Some(codec),
                _ => None,
            }
        }
        _ => None,
    }
}

/// Hand-built WebM, for the tests here and the segmenter's.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    pub const TIMESTAMP: u32 = 0xE7;
    pub const DOC_TYPE: u32 = 0x4282;

    /// An element of known size: its ID, its size in 8 bytes, its body.
    pub fn el(id: u32, body: &[u8]) -> Vec<u8> {
        let mut out: Vec<u8> = id
            .to_be_bytes()
            .into_iter()
            .skip_while(|&b| b == 0)
            .collect();
        out.push(0x01);
        out.extend_from_slice(&(body.len() as u64).to_be_bytes()[1..]);
        out.extend_from_slice(body);
        out
    }

    /// The head of an element of unknown size (all ones), as live muxers write Clusters.
    pub fn unknown(id: u32) -> Vec<u8> {
        let mut out = id.to_be_bytes().to_vec();
        out.extend_from_slice(&[0x01, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]);
        out
    }

    pub fn opus_head(channels: u8) -> Vec<u8> {
        let mut head = b"OpusHead\x01".to_vec();
        head.extend_from_slice(&[channels, 0x38, 0x01, 0x80, 0xBB, 0, 0, 0, 0, 0]);
        head
    }

    /// A file's EBML header, Segment head, and Tracks: VP8 video as track 1, then Opus audio
    /// as track `audio`.
    pub fn header(audio: u8, channels: u8) -> Vec<u8> {
        let mut out = el(EBML, &el(DOC_TYPE, b"webm"));
        out.extend(unknown(SEGMENT));
        let video = [
            el(TRACK_NUMBER, &[1]),
            el(TRACK_TYPE, &[1]),
            el(CODEC_ID, b"V_VP8"),
        ]
        .concat();
        let opus = [
            el(TRACK_NUMBER, &[audio]),
            el(TRACK_TYPE, &[2]),
            el(CODEC_ID, b"A_OPUS"),
            el(CODEC_PRIVATE, &opus_head(channels)),
        ]
        .concat();
        out.extend(el(
            TRACKS,
            &[el(TRACK_ENTRY, &video), el(TRACK_ENTRY, &opus)].concat(),
        ));
        out
    }

    /// An Opus packet of 20 ms (CELT, one frame) whose payload tells it apart.
    pub fn packet(n: u8, len: usize) -> Vec<u8> {
        let mut p = vec![0xF8];
        p.resize(len, n);
        p
    }

    /// A SimpleBlock of `track` holding `frames` laced as `lacing` says (its bits in the flags,
    /// and the lacing head before the frames).
    pub fn simple_block(track: u8, flags: u8, lacing_head: &[u8], frames: &[Vec<u8>]) -> Vec<u8> {
        let mut body = vec![0x80 | track, 0, 0, flags];
        body.extend_from_slice(lacing_head);
        for f in frames {
            body.extend_from_slice(f);
        }
        el(SIMPLE_BLOCK, &body)
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use crate::format::testing::{random_pieces, tool, Rng};

    const BLOCK_DURATION: u32 = 0x9B;

    /// A stream with what live muxers write: an unknown-size Cluster, video blocks among the
    /// audio ones, a BlockGroup, then a Cluster of known size. Returns it and its packets.
    fn stream() -> (Vec<u8>, Vec<Vec<u8>>) {
        let mut out = header(2, 1);
        let mut packets = Vec::new();
        out.extend(unknown(CLUSTER));
        out.extend(el(TIMESTAMP, &[0]));
        for n in 0..4 {
            out.extend(simple_block(1, 0x80, &[], &[vec![0x9D; 300]]));
            packets.push(packet(n, 40 + usize::from(n)));
            out.extend(simple_block(2, 0x80, &[], &packets[packets.len() - 1..]));
        }
        packets.push(packet(9, 33));
        let block = [vec![0x82, 0, 0, 0], packets[4].clone()].concat();
        out.extend(el(
            BLOCK_GROUP,
            &[el(BLOCK, &block), el(BLOCK_DURATION, &[20])].concat(),
        ));
        let mut cluster = el(TIMESTAMP, &[100]);
        for n in 10..13 {
            packets.push(packet(n, 60));
            cluster.extend(simple_block(2, 0x80, &[], &packets[packets.len() - 1..]));
        }
        out.extend(el(CLUSTER, &cluster));
        (out, packets)
    }

    fn read(pieces: &[&[u8]]) -> Vec<Item> {
        let mut blocks = Blocks::new();
        let mut out = Vec::new();
        for piece in pieces {
            blocks.push(&Bytes::copy_from_slice(piece), &mut out);
        }
        out
    }

    fn opus(channels: u8) -> Item {
        Item::Track(Some(Codec::Opus(
            OpusHead::parse(&opus_head(channels)).unwrap(),
        )))
    }

    fn packets(items: &[Item]) -> Vec<&[u8]> {
        items
            .iter()
            .filter_map(|i| match i {
                Item::Packet(p) => Some(&p[..]),
                Item::Track(_) => None,
            })
            .collect()
    }

    #[test]
    fn the_audio_tracks_packets_come_out_whatever_the_pieces() {
        let (file, expected) = stream();
        let whole = read(&[&file]);
        assert_eq!(whole[0], opus(1));
        assert_eq!(packets(&whole), expected, "video blocks left out");
        // Cut at every offset: heads, track numbers, blocks and the Tracks split anywhere.
        for at in 0..=file.len() {
            assert_eq!(read(&[&file[..at], &file[at..]]), whole, "cut at {at}");
        }
        let bytes: Vec<&[u8]> = file.chunks(1).collect();
        assert_eq!(read(&bytes), whole, "byte by byte");
    }

    #[test]
    fn laced_blocks_are_parted_into_their_frames() {
        let frames = vec![packet(1, 300), packet(2, 20), packet(3, 7)];
        // Xiph: 300 is 255 + 45.
        let xiph = simple_block(2, 0x82, &[2, 255, 45, 20], &frames);
        // EBML: 300 (two bytes, 0x4000 | 300), then 20 - 300 = -280, biased by 8191 in two
        // bytes: 7911 | 0x4000.
        let ebml = simple_block(2, 0x86, &[2, 0x41, 0x2C, 0x5E, 0xE7], &frames);
        let fixed_frames = vec![packet(4, 50), packet(5, 50), packet(6, 50)];
        let fixed = simple_block(2, 0x84, &[2], &fixed_frames);
        let mut file = header(2, 1);
        file.extend(unknown(CLUSTER));
        file.extend([xiph, ebml, fixed].concat());
        let items = read(&[&file]);
        let expected: Vec<&[u8]> = frames
            .iter()
            .chain(&frames)
            .chain(&fixed_frames)
            .map(|f| &f[..])
            .collect();
        assert_eq!(packets(&items), expected);
        // Lacing that does not add up: the block is passed over, the next ones read.
        let mut bad = header(2, 1);
        bad.extend(unknown(CLUSTER));
        bad.extend(simple_block(2, 0x82, &[1, 255, 255], &[packet(7, 10)]));
        bad.extend(simple_block(2, 0x84, &[1], &[packet(8, 11)]));
        bad.extend(simple_block(2, 0x80, &[], &[packet(9, 12)]));
        assert_eq!(packets(&read(&[&bad])), vec![&packet(9, 12)[..]]);
    }

    #[test]
    fn a_new_ebml_header_starts_the_track_reading_again() {
        let (mut file, mut expected) = stream();
        // An encoder starting a new file on the same connection, in stereo, its audio as track
        // 1 now: no video.
        let mut second = el(EBML, &el(DOC_TYPE, b"webm"));
        second.extend(unknown(SEGMENT));
        let stereo = [
            el(TRACK_NUMBER, &[1]),
            el(TRACK_TYPE, &[2]),
            el(CODEC_ID, b"A_OPUS"),
            el(CODEC_PRIVATE, &opus_head(2)),
        ]
        .concat();
        second.extend(el(TRACKS, &el(TRACK_ENTRY, &stereo)));
        second.extend(unknown(CLUSTER));
        second.extend(simple_block(1, 0x80, &[], &[packet(20, 30)]));
        second.extend(simple_block(2, 0x80, &[], &[packet(21, 30)]));
        file.extend(&second);
        expected.push(packet(20, 30));
        let items = read(&[&file]);
        let tracks: Vec<&Item> = items
            .iter()
            .filter(|i| matches!(i, Item::Track(_)))
            .collect();
        assert_eq!(tracks, [&opus(1), &opus(2)]);
        assert_eq!(packets(&items), expected);
        let mut rng = Rng(7);
        for _ in 0..50 {
            assert_eq!(read(&random_pieces(&mut rng, &file, 100)), items);
        }
    }

    #[test]
    fn garbage_and_oversized_blocks_are_passed_over() {
        let (file, expected) = stream();
        let mut dirty = b"garbage before the header".to_vec();
        dirty.extend(&file);
        // Garbage inside a Cluster: the walk resumes at the next Cluster.
        dirty.extend(unknown(CLUSTER));
        dirty.extend(simple_block(2, 0x80, &[], &[packet(30, 10)]));
        dirty.extend([0x00, 0x00, 0x13, 0x37]);
        dirty.extend(simple_block(2, 0x80, &[], &[packet(31, 10)]));
        // The EBML header's ID in the garbage, not followed by a header: the track goes on.
        dirty.extend([0x1A, 0x45, 0xDF, 0xA3, 0x84, 0xDE, 0xAD, 0xBE, 0xEF]);
        dirty.extend(unknown(CLUSTER));
        dirty.extend(simple_block(2, 0x80, &[], &[packet(32, 10)]));
        // A block of the track over the limit, and one of another track as large.
        let big = vec![0xF8; MAX_BLOCK_BYTES as usize + 1];
        dirty.extend(simple_block(2, 0x80, &[], std::slice::from_ref(&big)));
        dirty.extend(simple_block(1, 0x80, &[], &[big]));
        dirty.extend(simple_block(2, 0x80, &[], &[packet(33, 10)]));
        let mut all = expected.clone();
        all.extend([packet(30, 10), packet(32, 10), packet(33, 10)]);
        let pieces: Vec<&[u8]> = dirty.chunks(4096).collect();
        let mut blocks = Blocks::new();
        let mut items = Vec::new();
        for piece in pieces {
            blocks.push(&Bytes::copy_from_slice(piece), &mut items);
            assert!(blocks.held.len() <= MAX_BLOCK_BYTES as usize + MAX_HEAD);
        }
        assert_eq!(packets(&items), all);
        assert_eq!(blocks.dropped, 1, "the large audio block");
        // Nothing but garbage: nothing found, nothing held.
        let mut rng = Rng(3);
        let noise: Vec<u8> = (0..100_000).map(|_| rng.next() as u8).collect();
        let mut blocks = Blocks::new();
        let mut items = Vec::new();
        blocks.push(&Bytes::from(noise), &mut items);
        assert!(blocks.held.len() <= MAX_HEADER_BYTES);
    }

    #[test]
    fn a_stream_without_an_audio_track_taken_has_no_track() {
        let mut file = el(EBML, &el(DOC_TYPE, b"webm"));
        file.extend(unknown(SEGMENT));
        let entry = |n: u8, kind: u8, id: &[u8]| {
            el(
                TRACK_ENTRY,
                &[
                    el(TRACK_NUMBER, &[n]),
                    el(TRACK_TYPE, &[kind]),
                    el(CODEC_ID, id),
                ]
                .concat(),
            )
        };
        file.extend(el(
            TRACKS,
            &[entry(1, 1, b"V_VP9"), entry(2, 2, b"A_AAC")].concat(),
        ));
        file.extend(unknown(CLUSTER));
        file.extend(simple_block(2, 0x80, &[], &[packet(1, 10)]));
        assert_eq!(read(&[&file]), [Item::Track(None)]);
    }

    /// A file from ffmpeg, as a live muxer writes it to a pipe.
    fn encode(codec: &str, muxer: &str) -> Vec<u8> {
        let run = tool(
            "ffmpeg",
            &[
                "-v",
                "error",
                "-f",
                "lavfi",
                "-i",
                "sine=duration=2",
                "-c:a",
                codec,
                "-f",
                muxer,
                "-",
            ],
        );
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        run.stdout
    }

    /// ffmpeg's Vorbis in WebM and FLAC in Matroska: their CodecPrivate read as Ogg's headers.
    #[test]
    fn vorbis_and_flac_tracks_from_ffmpeg_are_read() {
        for (codec, muxer, rate) in [("libvorbis", "webm", 44_100), ("flac", "matroska", 44_100)] {
            let items = read(&[&encode(codec, muxer)]);
            let Some(Item::Track(Some(found))) = items.first() else {
                panic!("{codec}: no track: {:?}", items.first());
            };
            let mut found = found.clone();
            assert_eq!(found.rate(), rate, "{codec}");
            let samples: u64 = packets(&items)
                .iter()
                .filter_map(|p| found.samples(p))
                .map(u64::from)
                .sum();
            // Two seconds, give or take a block the encoder adds or holds back.
            assert!(
                samples.abs_diff(2 * 44_100) <= 4096,
                "{codec}: {samples} samples"
            );
        }
    }
}
