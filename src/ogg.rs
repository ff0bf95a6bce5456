//! Ogg pages (RFC 3533) at ingest. Every listener of a mount shares one stream, so what reaches it
//! must be whole, checked pages: one torn or corrupt page would reach every player at once. A
//! player also cannot decode anything before it has the header packets of every logical stream,
//! and those are sent once at the start of a chain; a listener who joins later needs them kept
//! aside and sent first. So the framer checks each page's CRC, keeps the header pages of the
//! current chain, reads the titles they carry, and marks the pages where a player may start.
//!
//! Packets are reassembled only while a logical stream is in its headers: to count the header
//! packets (the codec's first packet says how many there are) and to read the comment header.
//! Audio pages pass whole, never looked into.
//!
//! # A new chain is a clean boundary
//!
//! Listeners connected when a stream starts over (an encoder restarted without ending its
//! stream, or a relay that failed over to another upstream, whose pages go on from the mount's
//! grace period) get the new chain's headers right after the old chain's pages. For a decoder
//! that is a chain boundary only if the old chain's streams ended (an EOS page each, RFC 3533)
//! and the new streams' serials differ from the old ones: two origins fed by one encoder send
//! the same serial, and ffmpeg then takes the new header packets for audio of the old stream.
//! So the framer ends the streams the listeners were in with an empty EOS page, and gives a
//! new stream that comes with a serial they already had another one (its pages rewritten, and
//! their CRC, on this one thread, once per mount: not per listener). A new source on a mount
//! in its grace period starts from where the one before left ([`Framer::following`]).

use bytes::{Buf, Bytes, BytesMut};

use crate::format::{Event, FormatError, MAX_HEADER_BYTES, MAX_LOGICAL_STREAMS};

const CAPTURE: &[u8; 4] = b"OggS";
const HEADER_LEN: usize = 27;

const CONTINUED: u8 = 0x01;
const BOS: u8 = 0x02;
const EOS: u8 = 0x04;

/// CRC-32 as Ogg defines it: polynomial 0x04c11db7, MSB first, no reflection, no final XOR.
static CRC_TABLE: [u32; 256] = crc_table();

const fn crc_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut r = (i as u32) << 24;
        let mut bit = 0;
        while bit < 8 {
            r = if r & 0x8000_0000 != 0 {
                (r << 1) ^ 0x04c1_1db7
            } else {
                r << 1
            };
            bit += 1;
        }
        table[i] = r;
        i += 1;
    }
    table
}

fn crc_update(crc: u32, data: &[u8]) -> u32 {
    data.iter().fold(crc, |crc, &b| {
        (crc << 8) ^ CRC_TABLE[usize::from((crc >> 24) as u8 ^ b)]
    })
}

/// The CRC of a whole page, computed as if its CRC field were zero.
pub(crate) fn page_crc(page: &[u8]) -> u32 {
    let crc = crc_update(0, &page[..22]);
    let crc = crc_update(crc, &[0; 4]);
    crc_update(crc, &page[26..])
}

/// What the bytes at a capture pattern turn out to be.
enum Scan {
    /// Could still become a page: more bytes are needed to tell.
    Incomplete,
    /// Not a page (wrong version, or its CRC does not match): resynchronise after its first byte.
    /// `checked`: the bytes its CRC was computed over, 0 if it was refused before.
    Invalid { checked: usize },
    /// A whole, checked page of this many bytes.
    Page(usize),
}

/// Looks at `buf`, which starts with the capture pattern.
fn check_page(buf: &[u8]) -> Scan {
    if buf.len() > 4 && buf[4] != 0 {
        return Scan::Invalid { checked: 0 };
    }
    if buf.len() < HEADER_LEN {
        return Scan::Incomplete;
    }
    let table_end = HEADER_LEN + usize::from(buf[26]);
    if buf.len() < table_end {
        return Scan::Incomplete;
    }
    let len = table_end
        + buf[HEADER_LEN..table_end]
            .iter()
            .map(|&l| usize::from(l))
            .sum::<usize>();
    if buf.len() < len {
        return Scan::Incomplete;
    }
    let stored = u32::from_le_bytes([buf[22], buf[23], buf[24], buf[25]]);
    if page_crc(&buf[..len]) == stored {
        Scan::Page(len)
    } else {
        Scan::Invalid { checked: len }
    }
}

/// Where the next capture pattern starts in `buf`, if it is there whole.
fn find_capture(buf: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = buf[from..].iter().position(|&b| b == CAPTURE[0]) {
        let at = from + i;
        if buf[at..].starts_with(CAPTURE) {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

/// How many bytes at the end of `buf` could be the start of a capture pattern cut by the end of
/// the piece: they are kept for the next one.
fn capture_prefix_len(buf: &[u8]) -> usize {
    (1..CAPTURE.len())
        .rev()
        .find(|&n| buf.ends_with(&CAPTURE[..n]))
        .unwrap_or(0)
}

/// A whole, checked page.
struct Page<'a>(&'a [u8]);

impl<'a> Page<'a> {
    fn flags(&self) -> u8 {
        self.0[5]
    }

    fn serial(&self) -> u32 {
        u32::from_le_bytes([self.0[14], self.0[15], self.0[16], self.0[17]])
    }

    /// The page's packet pieces in order: each a run of segments with whether it ends its
    /// packet (a segment shorter than 255 bytes does; a packet whose last segment on the page is
    /// 255 bytes long goes on in the next page).
    fn pieces(&self) -> Pieces<'a> {
        let table_end = HEADER_LEN + usize::from(self.0[26]);
        Pieces {
            lacing: &self.0[HEADER_LEN..table_end],
            body: &self.0[table_end..],
        }
    }

    /// The first packet that starts on this page (not the tail of one from an earlier page).
    fn first_packet_start(&self) -> Option<&'a [u8]> {
        let mut pieces = self.pieces();
        if self.flags() & CONTINUED != 0 {
            pieces.next();
        }
        pieces.next().map(|(bytes, _)| bytes)
    }
}

struct Pieces<'a> {
    lacing: &'a [u8],
    body: &'a [u8],
}

impl<'a> Iterator for Pieces<'a> {
    type Item = (&'a [u8], bool);

    fn next(&mut self) -> Option<Self::Item> {
        if self.lacing.is_empty() {
            return None;
        }
        let segments = self
            .lacing
            .iter()
            .position(|&l| l < 255)
            .map_or(self.lacing.len(), |i| i + 1);
        let len: usize = self.lacing[..segments]
            .iter()
            .map(|&l| usize::from(l))
            .sum();
        let ends = self.lacing[segments - 1] < 255;
        self.lacing = &self.lacing[segments..];
        let (piece, rest) = self.body.split_at(len);
        self.body = rest;
        Some((piece, ends))
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Codec {
    Vorbis,
    Opus,
    Flac,
    Speex,
    Theora,
    Other,
}

impl Codec {
    fn name(self) -> &'static str {
        match self {
            Codec::Vorbis => "Vorbis",
            Codec::Opus => "Opus",
            Codec::Flac => "FLAC",
            Codec::Speex => "Speex",
            Codec::Theora => "Theora",
            Codec::Other => "Unknown",
        }
    }
}

/// How many header packets a logical stream has, once its first packet told.
#[derive(Clone, Copy)]
enum HeaderCount {
    Exactly(u64),
    /// FLAC whose first packet says 0 ("unknown"): metadata blocks until the one marked last.
    UntilLastFlacBlock,
}

/// One logical stream of the current chain.
struct Stream {
    serial: u32,
    codec: Codec,
    count: HeaderCount,
    /// Header packets complete so far.
    packets: u64,
    /// Whether all its header packets have been seen: its later pages are data.
    done: bool,
    /// The header packet being reassembled, when it is one whose content is read.
    packet: Vec<u8>,
    /// Whether the last piece seen left a packet unfinished.
    in_packet: bool,
    ended: bool,
    title: Option<String>,
    artist: Option<String>,
}

impl Stream {
    fn new(serial: u32) -> Self {
        Stream {
            serial,
            codec: Codec::Other,
            count: HeaderCount::Exactly(1),
            packets: 0,
            done: false,
            packet: Vec::new(),
            in_packet: false,
            ended: false,
            title: None,
            artist: None,
        }
    }

    /// Reads the header packets that end on `page`.
    fn feed(&mut self, page: &Page) {
        let continued = page.flags() & CONTINUED != 0;
        for (i, (piece, ends)) in page.pieces().enumerate() {
            if self.done {
                break;
            }
            if i == 0 && continued != self.in_packet {
                // The start of this packet, or the end of the last one, was lost with a page.
                self.packet.clear();
                self.in_packet = false;
                if continued {
                    continue;
                }
            }
            if self.reads_packet() {
                self.packet.extend_from_slice(piece);
            }
            self.in_packet = !ends;
            if ends {
                let packet = std::mem::take(&mut self.packet);
                self.header_packet(&packet);
                self.packets += 1;
                self.done = match self.count {
                    HeaderCount::Exactly(n) => self.packets >= n,
                    HeaderCount::UntilLastFlacBlock => {
                        packet.first().is_some_and(|b| b & 0x80 != 0)
                    }
                };
            }
        }
    }

    /// Whether the content of the header packet in progress is needed: the first (which codec)
    /// and the second (the comment header), or for FLAC every metadata block (its type, and
    /// whether it is the last).
    fn reads_packet(&self) -> bool {
        self.packets <= 1 || self.codec == Codec::Flac
    }

    fn header_packet(&mut self, packet: &[u8]) {
        if self.packets == 0 {
            self.identify(packet);
            return;
        }
        let comments = match self.codec {
            Codec::Vorbis if self.packets == 1 => packet.strip_prefix(b"\x03vorbis"),
            Codec::Opus if self.packets == 1 => packet.strip_prefix(b"OpusTags"),
            Codec::Theora if self.packets == 1 => packet.strip_prefix(b"\x81theora"),
            Codec::Speex if self.packets == 1 => Some(packet),
            // Metadata block type 4 is VORBIS_COMMENT, after its 4-byte block header.
            Codec::Flac if packet.first().is_some_and(|b| b & 0x7f == 4) => packet.get(4..),
            _ => None,
        };
        if let Some(comments) = comments {
            let (title, artist) = read_comments(comments);
            self.title = self.title.take().or(title);
            self.artist = self.artist.take().or(artist);
        }
    }

    /// Recognises the codec from its first packet, and with it how many header packets follow.
    fn identify(&mut self, packet: &[u8]) {
        let (codec, count) = if packet.starts_with(b"\x01vorbis") {
            (Codec::Vorbis, HeaderCount::Exactly(3))
        } else if packet.starts_with(b"OpusHead") {
            (Codec::Opus, HeaderCount::Exactly(2))
        } else if packet.starts_with(b"\x80theora") {
            (Codec::Theora, HeaderCount::Exactly(3))
        } else if let (true, Some(&[hi, lo])) = (packet.starts_with(b"\x7fFLAC"), packet.get(7..9))
        {
            // Bytes 7..9: how many metadata blocks follow STREAMINFO (0: not said); byte 13
            // starts the STREAMINFO block header, whose top bit says it is the last block.
            let follow = u16::from_be_bytes([hi, lo]);
            let count = match (follow, packet.get(13)) {
                (0, Some(b)) if b & 0x80 == 0 => HeaderCount::UntilLastFlacBlock,
                _ => HeaderCount::Exactly(1 + u64::from(follow)),
            };
            (Codec::Flac, count)
        } else if let (true, Some(extra)) = (packet.starts_with(b"Speex   "), packet.get(68..72)) {
            // Bytes 68..72: extra_headers, the header packets after the two every stream has.
            let extra = u32::from_le_bytes([extra[0], extra[1], extra[2], extra[3]]);
            (Codec::Speex, HeaderCount::Exactly(2 + u64::from(extra)))
        } else {
            return;
        };
        self.codec = codec;
        self.count = count;
    }
}

/// TITLE and ARTIST from a Vorbis comment block (vendor string, then `KEY=value` fields, every
/// length a little-endian u32), read only as far as the packet goes; the first of each counts.
fn read_comments(mut data: &[u8]) -> (Option<String>, Option<String>) {
    let (mut title, mut artist) = (None, None);
    let count = take_field(&mut data).and_then(|_vendor| take_u32(&mut data));
    // Each field takes at least its 4-byte length, so a false count ends with the data.
    for _ in 0..count.unwrap_or(0) {
        let Some(comment) = take_field(&mut data) else {
            break;
        };
        let Some(eq) = comment.iter().position(|&b| b == b'=') else {
            continue;
        };
        let (key, value) = (&comment[..eq], &comment[eq + 1..]);
        let slot = if key.eq_ignore_ascii_case(b"TITLE") {
            &mut title
        } else if key.eq_ignore_ascii_case(b"ARTIST") {
            &mut artist
        } else {
            continue;
        };
        if slot.is_none() {
            *slot = Some(String::from_utf8_lossy(value).into_owned());
        }
    }
    (title, artist)
}

fn take_u32(data: &mut &[u8]) -> Option<u32> {
    let (n, rest) = data.split_first_chunk::<4>()?;
    *data = rest;
    Some(u32::from_le_bytes(*n))
}

fn take_field<'a>(data: &mut &'a [u8]) -> Option<&'a [u8]> {
    let mut rest = *data;
    let len = usize::try_from(take_u32(&mut rest)?).ok()?;
    if rest.len() < len {
        return None;
    }
    let (field, rest) = rest.split_at(len);
    *data = rest;
    Some(field)
}

/// The logical streams that began together (one, or several multiplexed: Theora with Vorbis), and
/// the header pages a player needs before any of their data.
struct Chain {
    streams: Vec<Stream>,
    /// Only BOS pages so far: a BOS page of another serial is one more stream of this chain. The
    /// spec puts every BOS page of a chain before its other pages, so the first other page ends it.
    in_bos_pages: bool,
    /// The chain's Headers event has been emitted: its pages from here on are data.
    complete: bool,
    header_pages: BytesMut,
}

/// Where a checked page goes.
enum Placed {
    /// A page of no stream that began since the framer started: without that stream's headers no
    /// player can use it (a source that starts mid-stream).
    Unknown,
    /// One of the chain's header pages; `completes`: the chain's headers are complete with it.
    Header { completes: bool },
    /// `completes`: the chain's headers were complete before this page, only now known (the
    /// chain's streams needed nothing after their BOS pages, and this is the first page after
    /// them).
    Data { sync: bool, completes: bool },
}

impl Chain {
    fn new() -> Self {
        Chain {
            streams: Vec::new(),
            in_bos_pages: true,
            complete: false,
            header_pages: BytesMut::new(),
        }
    }

    fn keep_header_page(&mut self, page: &Page) -> Result<(), FormatError> {
        if self.header_pages.len() + page.0.len() > MAX_HEADER_BYTES {
            return Err(FormatError::HeadersTooLarge);
        }
        self.header_pages.extend_from_slice(page.0);
        Ok(())
    }

    /// Marks the chain complete when it just became so (called once its BOS pages are over).
    fn completes(&mut self) -> bool {
        let ready = !self.complete && self.streams.iter().all(|s| s.done);
        self.complete |= ready;
        ready
    }

    /// Whether a player may start at this data page of `stream`. Audio: at any page (a packet
    /// continued from the page before is dropped by the decoder). With video, only where a
    /// keyframe starts, and only on the video stream's own page: a player joining there gets the
    /// other streams from their next page on.
    fn sync_point(&self, stream: &Stream, page: &Page) -> bool {
        if !self.streams.iter().any(|s| s.codec == Codec::Theora) {
            return true;
        }
        // A Theora data packet's first bit is 0, its second 0 for an intra frame; an empty
        // packet repeats the last frame.
        stream.codec == Codec::Theora
            && page
                .first_packet_start()
                .and_then(|p| p.first())
                .is_some_and(|b| b & 0xc0 == 0)
    }
}

/// Places a checked page in the current chain, starting a new chain at a BOS page that cannot
/// belong to it.
fn place(slot: &mut Option<Chain>, page: &Page) -> Result<Placed, FormatError> {
    let serial = page.serial();
    let eos = page.flags() & EOS != 0;
    if page.flags() & BOS != 0 {
        // A new chain: after the last one ended, after its data began (a source that restarted
        // its encoder without ending the stream), or a serial it already has.
        let chain = match slot {
            Some(c)
                if c.in_bos_pages
                    && !c.streams.iter().all(|s| s.ended)
                    && !c.streams.iter().any(|s| s.serial == serial) =>
            {
                c
            }
            _ => slot.insert(Chain::new()),
        };
        if chain.streams.len() >= MAX_LOGICAL_STREAMS {
            return Err(FormatError::TooManyStreams);
        }
        chain.keep_header_page(page)?;
        let mut stream = Stream::new(serial);
        stream.feed(page);
        // A codec not known here: only its BOS page is kept as its header.
        stream.done |= stream.codec == Codec::Other;
        stream.ended = eos;
        chain.streams.push(stream);
        return Ok(Placed::Header { completes: false });
    }
    let Some(chain) = slot.as_mut() else {
        return Ok(Placed::Unknown);
    };
    let Some(i) = chain.streams.iter().position(|s| s.serial == serial) else {
        return Ok(Placed::Unknown);
    };
    chain.in_bos_pages = false;
    let completes = chain.completes();
    chain.streams[i].ended |= eos;
    if chain.streams[i].done {
        let sync = chain.complete && chain.sync_point(&chain.streams[i], page);
        return Ok(Placed::Data { sync, completes });
    }
    chain.keep_header_page(page)?;
    chain.streams[i].feed(page);
    Ok(Placed::Header {
        completes: chain.completes(),
    })
}

/// The pages at the front of the buffer that go out as one `Data` event.
#[derive(Default)]
struct Run {
    len: usize,
    header: bool,
    /// Where its first sync point is: a run carries one mark, as a stored chunk does, so the
    /// pages of one push go out as one event whether or not the first is a sync point.
    join: Option<usize>,
}

/// What the listeners got of one logical stream: its serial as sent, the sequence number its
/// next page takes, and whether its EOS page went out.
#[derive(Clone, Debug, PartialEq)]
struct Sent {
    serial: u32,
    next_sequence: u32,
    ended: bool,
}

/// Where a mount's Ogg stream stood for its listeners when its source ended: the next source's
/// framer starts from it ([`Framer::following`]).
#[derive(Clone, Debug, Default)]
pub(crate) struct Tail(Vec<Sent>);

/// An empty page that ends a logical stream: no packet ends on it (granule position -1).
fn eos_page(serial: u32, sequence: u32) -> [u8; HEADER_LEN] {
    let mut page = [0u8; HEADER_LEN];
    page[..4].copy_from_slice(CAPTURE);
    page[5] = EOS;
    page[6..14].copy_from_slice(&u64::MAX.to_le_bytes());
    page[14..18].copy_from_slice(&serial.to_le_bytes());
    page[18..22].copy_from_slice(&sequence.to_le_bytes());
    let crc = page_crc(&page);
    page[22..26].copy_from_slice(&crc.to_le_bytes());
    page
}

/// One source's Ogg framer.
pub(crate) struct Framer {
    /// Input not yet emitted: the run of checked pages at its front, then bytes still to scan
    /// (at most a page in the making once a push is done).
    buf: BytesMut,
    run: Run,
    /// Bytes dropped and not yet reported.
    dropped: usize,
    chain: Option<Chain>,
    /// Bytes received, and bytes CRC-checked for captures that were no page: a resync looks for
    /// the next capture inside a failed page, so crafted garbage (captures claiming 64 KiB pages,
    /// a few bytes apart) could make every byte cost a whole page's CRC on the one ingest thread
    /// that serves every mount. Past [`WASTE_PER_BYTE`] the source is refused.
    received: u64,
    wasted: u64,
    /// The current chain's streams as the listeners got them.
    sent: Vec<Sent>,
    /// The serials of the chain before, as sent: the current chain does not take them again.
    before: Vec<u32>,
    /// Each stream of the current chain: the serial the source gave it, and the one sent.
    serials: Vec<(u32, u32)>,
}

/// CRC work on failed pages allowed per byte received (plus [`WASTE_ALLOWANCE`]): a real stream
/// with the odd corrupt page stays far below; random bytes cost about 2; crafted captures cost
/// thousands.
const WASTE_PER_BYTE: u64 = 8;
const WASTE_ALLOWANCE: u64 = 1 << 20;

impl Framer {
    pub fn new() -> Self {
        Framer {
            buf: BytesMut::new(),
            run: Run::default(),
            dropped: 0,
            chain: None,
            received: 0,
            wasted: 0,
            sent: Vec::new(),
            before: Vec::new(),
            serials: Vec::new(),
        }
    }

    /// A framer for the next source of a mount whose listeners got the stream up to `tail`.
    pub fn following(tail: Tail) -> Self {
        Framer {
            sent: tail.0,
            ..Framer::new()
        }
    }

    /// Where the stream stands for the listeners, for the next source's framer.
    pub fn tail(&self) -> Tail {
        Tail(self.sent.clone())
    }

    pub fn push(&mut self, data: Bytes, out: &mut Vec<Event>) -> Result<(), FormatError> {
        self.received += data.len() as u64;
        // Grown to what it holds, not by doubling: between runs it holds a page in the making,
        // up to a second of the stream, on every mount. The price is a copy of that page so far
        // at each push it has no room for (a few per page), on the ingest thread.
        if self.buf.capacity() - self.buf.len() < data.len() {
            let mut grown = BytesMut::with_capacity(self.buf.len() + data.len());
            grown.extend_from_slice(&self.buf);
            self.buf = grown;
        }
        self.buf.extend_from_slice(&data);
        self.scan(false, out)?;
        self.flush(out);
        Ok(())
    }

    /// The source ended: a page still waiting for bytes never gets them. Pages already here that
    /// were waiting behind it (its length field was torn) still go out.
    pub fn finish(&mut self, out: &mut Vec<Event>) {
        // An error here is about pages that cannot be served; they are dropped like the rest.
        let _ = self.scan(true, out);
        let rest = self.buf.len() - self.run.len;
        self.drop_bytes(rest, out);
        self.flush(out);
    }

    /// The codecs of the current chain, in the order their streams began.
    pub fn subtype(&self) -> Option<String> {
        let chain = self.chain.as_ref()?;
        let names: Vec<&str> = chain.streams.iter().map(|s| s.codec.name()).collect();
        Some(names.join("/"))
    }

    /// Takes every whole page from the buffer; `at_end`: no more bytes will come, so a page that
    /// is not whole is not a page.
    fn scan(&mut self, at_end: bool, out: &mut Vec<Event>) -> Result<(), FormatError> {
        loop {
            let rest = &self.buf[self.run.len..];
            let Some(at) = find_capture(rest) else {
                let keep = if at_end { 0 } else { capture_prefix_len(rest) };
                self.drop_bytes(rest.len() - keep, out);
                return Ok(());
            };
            self.drop_bytes(at, out);
            match check_page(&self.buf[self.run.len..]) {
                Scan::Incomplete if !at_end => return Ok(()),
                // Resynchronise on the next capture pattern, which may lie inside this one's
                // claimed length when bytes were lost.
                Scan::Incomplete => self.drop_bytes(1, out),
                Scan::Invalid { checked } => {
                    self.wasted += checked as u64;
                    if self.wasted > WASTE_PER_BYTE * self.received + WASTE_ALLOWANCE {
                        return Err(FormatError::TooMuchGarbage);
                    }
                    self.drop_bytes(1, out);
                }
                Scan::Page(len) => self.take_page(len, out)?,
            }
        }
    }

    fn take_page(&mut self, len: usize, out: &mut Vec<Event>) -> Result<(), FormatError> {
        self.relabel(len, out);
        let start = self.run.len;
        let page = Page(&self.buf[start..start + len]);
        let placed = place(&mut self.chain, &page)?;
        if !matches!(placed, Placed::Unknown) {
            let (serial, ends) = (page.serial(), page.flags() & EOS != 0);
            let sequence = u32::from_le_bytes([page.0[18], page.0[19], page.0[20], page.0[21]]);
            let next_sequence = sequence.wrapping_add(1);
            match self.sent.iter_mut().find(|s| s.serial == serial) {
                Some(sent) => {
                    sent.next_sequence = next_sequence;
                    sent.ended |= ends;
                }
                None => self.sent.push(Sent {
                    serial,
                    next_sequence,
                    ended: ends,
                }),
            }
        }
        match placed {
            Placed::Unknown => self.drop_bytes(len, out),
            Placed::Header { completes } => {
                self.append(len, true, false, out);
                if completes {
                    self.flush(out);
                    self.emit_headers(out);
                }
            }
            Placed::Data { sync, completes } => {
                if completes {
                    self.flush(out);
                    self.emit_headers(out);
                }
                self.append(len, false, sync, out);
            }
        }
        Ok(())
    }

    /// Before the page of `len` bytes after the run is placed: at a BOS page that starts a new
    /// chain, ends the streams the listeners are in ([`Framer::end_chain`]) and picks the new
    /// stream's serial as sent (its own, unless the listeners had it already); then writes the
    /// serial to send into the page, if it differs.
    fn relabel(&mut self, len: usize, out: &mut Vec<Event>) {
        let at = self.run.len;
        let page = Page(&self.buf[at..at + len]);
        let serial = page.serial();
        if page.flags() & BOS != 0 {
            // As `place` decides: the BOS pages of one chain come together, each a new serial.
            let joins = self
                .chain
                .as_ref()
                .is_some_and(|c| c.in_bos_pages && !c.streams.iter().all(|s| s.ended))
                && !self.serials.iter().any(|&(from, _)| from == serial);
            if !joins {
                self.end_chain(out);
            }
            let mut to = serial;
            while self.before.contains(&to) || self.serials.iter().any(|&(_, t)| t == to) {
                to = to.wrapping_add(1);
            }
            self.serials.push((serial, to));
        }
        let Some(&(_, to)) = self.serials.iter().find(|&&(from, _)| from == serial) else {
            return;
        };
        if to != serial {
            let at = self.run.len;
            let page = &mut self.buf[at..at + len];
            page[14..18].copy_from_slice(&to.to_le_bytes());
            let crc = page_crc(page);
            page[22..26].copy_from_slice(&crc.to_le_bytes());
        }
    }

    /// The current chain is over: an EOS page goes out for each of its streams that did not
    /// end, after the pages before (so the run goes out first), and a new chain avoids its
    /// serials.
    fn end_chain(&mut self, out: &mut Vec<Event>) {
        let mut eos = BytesMut::new();
        for s in self.sent.iter().filter(|s| !s.ended) {
            eos.extend_from_slice(&eos_page(s.serial, s.next_sequence));
        }
        self.before = self.sent.drain(..).map(|s| s.serial).collect();
        self.serials.clear();
        self.chain = None;
        if !eos.is_empty() {
            self.flush(out);
            out.push(Event::Data {
                bytes: eos.freeze(),
                join: None,
            });
        }
    }

    /// Adds the page after the run to it, or starts a new run with it if the run is of the other
    /// kind (header pages or data pages). The first sync page of a run marks it; a later one
    /// adds nothing a newcomer needs, since it joins at the first of a chunk at most a burst
    /// behind (in an audio stream every page is one).
    fn append(&mut self, len: usize, header: bool, sync: bool, out: &mut Vec<Event>) {
        if self.run.len > 0 && self.run.header != header {
            self.flush(out);
        }
        if self.run.len == 0 {
            self.run = Run {
                len: 0,
                header,
                join: None,
            };
        }
        if sync && self.run.join.is_none() {
            self.run.join = Some(self.run.len);
        }
        self.run.len += len;
    }

    /// Drops `n` bytes after the run (which goes out first, being before them in the stream).
    fn drop_bytes(&mut self, n: usize, out: &mut Vec<Event>) {
        if n == 0 {
            return;
        }
        self.flush(out);
        self.buf.advance(n);
        self.dropped += n;
    }

    /// Reports dropped bytes, then emits the run: in stream order, as the run is only ever built
    /// after the drops not yet reported.
    fn flush(&mut self, out: &mut Vec<Event>) {
        if self.dropped > 0 {
            out.push(Event::Unsynced {
                bytes: std::mem::take(&mut self.dropped),
                dropped: true,
            });
        }
        if self.run.len > 0 {
            // The run is copied out, and the buffer keeps only what follows it (the start of
            // the next page). Split off, the run would share the framer's buffer and keep all
            // of it for as long as the store keeps the run. At 500 Opus mounts of 1 s pages,
            // RSS 63.0 MB against 65.4 and 67.3 so (docs/performance/many-stations.md, tenth
            // pass). Not cut at the allocator's size classes as reads are
            // (`store::copy_in`): a run is one event, marked at its first sync point, and a
            // second part would hide the sync points in it.
            let bytes = Bytes::copy_from_slice(&self.buf[..self.run.len]);
            self.buf.advance(self.run.len);
            out.push(Event::Data {
                bytes,
                join: self.run.join,
            });
            self.run.len = 0;
        }
    }

    fn emit_headers(&mut self, out: &mut Vec<Event>) {
        let Some(chain) = self.chain.as_mut() else {
            return;
        };
        out.push(Event::Headers(chain.header_pages.split().freeze()));
        let title = chain.streams.iter().find_map(|s| s.title.clone());
        let artist = chain.streams.iter().find_map(|s| s.artist.clone());
        if title.is_some() || artist.is_some() {
            out.push(Event::Tags { title, artist });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use bytes::Bytes;

    use super::*;
    use crate::format::testing::{assert_plays, temp_file, tool, Rng};

    /// The header, a full segment table, and 255 segments of 255 bytes.
    const MAX_PAGE: usize = HEADER_LEN + 255 + 255 * 255;

    /// An Ogg file from ffmpeg: a real encoder's pages, as a source would send them.
    fn encode(name: &str, args: &[&str]) -> Vec<u8> {
        let path = temp_file(name);
        let path = path.to_str().expect("a UTF-8 temp path");
        let mut all = vec!["-v", "error", "-y"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["-f", "ogg", path]);
        let run = tool("ffmpeg", &all);
        assert!(
            run.status.success(),
            "ffmpeg {all:?}: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        let file = std::fs::read(path).expect("read what ffmpeg wrote");
        std::fs::remove_file(path).expect("remove the encoded file");
        file
    }

    const TONE: &[&str] = &["-f", "lavfi", "-i", "sine=frequency=440:duration=3"];
    const TAGS: &[&str] = &["-metadata", "title=T", "-metadata", "artist=A"];

    fn audio(name: &str, codec: &[&str]) -> Vec<u8> {
        encode(name, &[TONE, codec, TAGS].concat())
    }

    fn opus() -> &'static [u8] {
        static FILE: OnceLock<Vec<u8>> = OnceLock::new();
        FILE.get_or_init(|| audio("opus.ogg", &["-c:a", "libopus"]))
    }

    fn vorbis() -> &'static [u8] {
        static FILE: OnceLock<Vec<u8>> = OnceLock::new();
        FILE.get_or_init(|| audio("vorbis.ogg", &["-c:a", "libvorbis"]))
    }

    /// A second, shorter track with other tags, to chain after the first.
    fn opus_second() -> &'static [u8] {
        static FILE: OnceLock<Vec<u8>> = OnceLock::new();
        FILE.get_or_init(|| {
            encode(
                "opus-second.ogg",
                &[
                    "-f",
                    "lavfi",
                    "-i",
                    "sine=frequency=660:duration=2",
                    "-c:a",
                    "libopus",
                    "-metadata",
                    "title=Second",
                    "-metadata",
                    "ARTIST=Bé",
                ],
            )
        })
    }

    /// Feeds the pieces in order, then ends the source.
    fn frame_pieces<'a>(pieces: impl IntoIterator<Item = &'a [u8]>) -> (Framer, Vec<Event>) {
        let mut framer = Framer::new();
        let mut out = Vec::new();
        for piece in pieces {
            framer
                .push(Bytes::copy_from_slice(piece), &mut out)
                .expect("a clean stream is accepted");
        }
        framer.finish(&mut out);
        (framer, out)
    }

    /// Feeds `data` in pieces of `piece` bytes, then ends the source.
    fn frame(data: &[u8], piece: usize) -> (Framer, Vec<Event>) {
        frame_pieces(data.chunks(piece))
    }

    /// The test's own page split of a file ffmpeg wrote, trusting its lengths.
    fn pages(data: &[u8]) -> Vec<&[u8]> {
        let mut pages = Vec::new();
        let mut rest = data;
        while !rest.is_empty() {
            assert!(rest.starts_with(b"OggS"), "not a page boundary");
            let segments = usize::from(rest[26]);
            let body: usize = rest[27..27 + segments]
                .iter()
                .map(|&l| usize::from(l))
                .sum();
            let (page, tail) = rest.split_at(27 + segments + body);
            pages.push(page);
            rest = tail;
        }
        pages
    }

    /// The file's leading pages, up to the one that completes `packets` packets of every stream
    /// begun so far.
    fn leading_header_pages(data: &[u8], packets: usize) -> Vec<u8> {
        let mut counts: Vec<(u32, usize)> = Vec::new();
        let mut out = Vec::new();
        for page in pages(data) {
            let serial = u32::from_le_bytes(page[14..18].try_into().unwrap());
            if !counts.iter().any(|(s, _)| *s == serial) {
                counts.push((serial, 0));
            }
            let ends = page[27..27 + usize::from(page[26])]
                .iter()
                .filter(|&&l| l < 255)
                .count();
            counts.iter_mut().find(|(s, _)| *s == serial).unwrap().1 += ends;
            out.extend_from_slice(page);
            if page[5] & BOS == 0 && counts.iter().all(|(_, n)| *n >= packets) {
                return out;
            }
        }
        panic!("the file has no complete headers");
    }

    /// The events with every run of `Data` (and of `Unsynced`) merged: what a listener connected
    /// from the start receives, whatever the pieces the source wrote.
    #[derive(Debug, PartialEq)]
    enum Merged {
        Data(Vec<u8>),
        Headers(Bytes),
        Tags(Option<String>, Option<String>),
        Dropped(usize),
    }

    fn merged(events: &[Event]) -> Vec<Merged> {
        let mut out: Vec<Merged> = Vec::new();
        for e in events {
            match (e, out.last_mut()) {
                (Event::Data { bytes, .. }, Some(Merged::Data(d))) => d.extend_from_slice(bytes),
                (Event::Data { bytes, .. }, _) => out.push(Merged::Data(bytes.to_vec())),
                (Event::Unsynced { bytes, dropped }, Some(Merged::Dropped(n))) => {
                    assert!(dropped);
                    *n += bytes
                }
                (Event::Unsynced { bytes, dropped }, _) => {
                    assert!(dropped);
                    out.push(Merged::Dropped(*bytes))
                }
                (Event::Headers(h), _) => out.push(Merged::Headers(h.clone())),
                (Event::Tags { title, artist }, _) => {
                    out.push(Merged::Tags(title.clone(), artist.clone()))
                }
            }
        }
        out
    }

    fn data(events: &[Event]) -> Vec<u8> {
        let mut out = Vec::new();
        for e in events {
            if let Event::Data { bytes, .. } = e {
                out.extend_from_slice(bytes);
            }
        }
        out
    }

    fn dropped(events: &[Event]) -> usize {
        events
            .iter()
            .map(|e| match e {
                Event::Unsynced { bytes, .. } => *bytes,
                _ => 0,
            })
            .sum()
    }

    fn headers(events: &[Event]) -> Vec<&Bytes> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Headers(h) => Some(h),
                _ => None,
            })
            .collect()
    }

    fn tags(events: &[Event]) -> Vec<(Option<&str>, Option<&str>)> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Tags { title, artist } => Some((title.as_deref(), artist.as_deref())),
                _ => None,
            })
            .collect()
    }

    /// Offsets in the data stream where a listener may start.
    fn sync_offsets(events: &[Event]) -> Vec<usize> {
        let mut at = 0;
        let mut out = Vec::new();
        for e in events {
            if let Event::Data { bytes, join } = e {
                if let Some(k) = join {
                    out.push(at + k);
                }
                at += bytes.len();
            }
        }
        out
    }

    /// What a listener joining at the `n`th sync point receives: the latest headers first, then
    /// the stream from there on.
    fn late_joiner(events: &[Event], n: usize) -> Vec<u8> {
        let mut head: Option<&Bytes> = None;
        let (mut skipped, mut joined) = (0, false);
        let mut out = Vec::new();
        for e in events {
            match e {
                Event::Headers(h) if !joined => head = Some(h),
                Event::Data { join: Some(_), .. } if !joined && skipped < n => skipped += 1,
                Event::Data {
                    bytes,
                    join: Some(k),
                } if !joined => {
                    joined = true;
                    out.extend_from_slice(head.expect("headers before a sync point"));
                    out.extend_from_slice(&bytes[*k..]);
                }
                Event::Data { bytes, .. } if joined => out.extend_from_slice(bytes),
                _ => {}
            }
        }
        assert!(joined, "no sync point {n}");
        out
    }

    /// What every clean file must give: the same stream whatever the pieces, every byte passed,
    /// one Headers event equal to its leading header pages (emitted after them, before the first
    /// sync point), its tags, and a late joiner's capture that plays.
    fn check_clean(
        name: &str,
        file: &[u8],
        header_packets: usize,
        subtype: &str,
        codecs: &str,
    ) -> Vec<Event> {
        let (framer, finest) = frame(file, 1);
        let fine_syncs = sync_offsets(&finest);
        let all = pages(file);
        // Two whole pages per piece, from the first page and from the second: each page follows
        // another in the same piece once.
        let pairs: Vec<Vec<u8>> = all.chunks(2).map(|p| p.concat()).collect();
        let shifted: Vec<Vec<u8>> = [&all[..1]]
            .into_iter()
            .chain(all[1..].chunks(2))
            .map(|p| p.concat())
            .collect();
        let feeds: [(&str, Vec<&[u8]>); 6] = [
            ("1000", file.chunks(1000).collect()),
            ("4096", file.chunks(4096).collect()),
            ("16384", file.chunks(16384).collect()),
            ("whole", vec![file]),
            ("page pairs", pairs.iter().map(|p| &p[..]).collect()),
            ("shifted pairs", shifted.iter().map(|p| &p[..]).collect()),
        ];
        for (piece, pieces) in feeds {
            let (_, events) = frame_pieces(pieces);
            assert_eq!(
                merged(&events),
                merged(&finest),
                "{name}: pieces of {piece}"
            );
            // Coarser pieces give fewer sync points, never false ones, and an event marks its
            // first: none is hidden before its mark, or in an event without one.
            let mut at = 0;
            for e in &events {
                if let Event::Data { bytes, join } = e {
                    let end = at + bytes.len();
                    let marked = join.map_or(end, |k| at + k);
                    if marked < end {
                        assert!(
                            fine_syncs.contains(&marked),
                            "{name}: {marked} is no sync point"
                        );
                    }
                    if let Some(s) = fine_syncs.iter().find(|&&s| s >= at && s < marked) {
                        panic!("{name}: pieces of {piece}: sync point {s} hidden in {at}..{end}");
                    }
                    at = end;
                }
            }
        }
        // All the pages of one push, of one kind, go out as one event: header pages, Headers,
        // Tags, data pages.
        assert_eq!(frame(file, file.len()).1.len(), 4, "{name}: one push");
        assert_eq!(data(&finest), file, "{name}: every byte passes");
        assert_eq!(dropped(&finest), 0, "{name}");
        let expected = leading_header_pages(file, header_packets);
        assert_eq!(headers(&finest), [&expected[..]], "{name}");
        let m = merged(&finest);
        assert_eq!(
            m[0],
            Merged::Data(expected.clone()),
            "{name}: header pages in-band"
        );
        assert_eq!(
            m[1],
            Merged::Headers(Bytes::from(expected.clone())),
            "{name}"
        );
        assert!(
            sync_offsets(&finest).iter().all(|&at| at >= expected.len()),
            "{name}: no sync point inside the headers"
        );
        assert_eq!(tags(&finest), [(Some("T"), Some("A"))], "{name}");
        assert_eq!(framer.subtype().as_deref(), Some(subtype), "{name}");

        let (_, events) = frame(file, 4096);
        let syncs = sync_offsets(&events).len();
        assert!(syncs >= 2, "{name}: {syncs} sync points");
        for n in [0, syncs / 2, syncs - 1] {
            assert_plays(
                &format!("{name}-late-{n}.ogg"),
                &late_joiner(&events, n),
                codecs,
            );
        }
        finest
    }

    #[test]
    fn opus_from_ffmpeg() {
        check_clean("opus", opus(), 2, "Opus", "opus");
    }

    #[test]
    fn vorbis_from_ffmpeg() {
        check_clean("vorbis", vorbis(), 3, "Vorbis", "vorbis");
    }

    #[test]
    fn flac_from_ffmpeg() {
        let file = audio("flac.ogg", &["-c:a", "flac"]);
        // STREAMINFO, then the one block ffmpeg writes: VORBIS_COMMENT.
        check_clean("flac", &file, 2, "FLAC", "flac");
    }

    #[test]
    fn speex_from_ffmpeg() {
        let file = audio("speex.ogg", &["-ar", "16000", "-c:a", "libspeex"]);
        check_clean("speex", &file, 2, "Speex", "speex");
    }

    /// Theora with Vorbis: both streams' headers in one set, and a listener starts only where a
    /// video keyframe starts a page.
    #[test]
    fn theora_with_vorbis_from_ffmpeg() {
        let file = encode(
            "theora.ogg",
            &[
                &["-f", "lavfi", "-i", "testsrc=size=64x48:rate=10:duration=3"],
                TONE,
                &["-c:v", "libtheora", "-g", "10", "-c:a", "libvorbis"],
                TAGS,
            ]
            .concat(),
        );
        let events = check_clean("theora", &file, 3, "Theora/Vorbis", "theora\nvorbis");
        // Sync points only at keyframes, mostly inside a push: each push of data pages is still
        // one event (one stored chunk), marked at its keyframe.
        let all = pages(&file);
        let header_pages = pages(&leading_header_pages(&file, 3)).len();
        let mut pushes = 0;
        let mut marked_inside = 0;
        for push in all[header_pages..].chunks(4) {
            let (mut framer, mut out) = (Framer::new(), Vec::new());
            framer
                .push(Bytes::from(all[..header_pages].concat()), &mut out)
                .unwrap();
            out.clear();
            framer.push(Bytes::from(push.concat()), &mut out).unwrap();
            // (length, mark) of each data event.
            let data: Vec<_> = out
                .iter()
                .filter_map(|e| match e {
                    Event::Data { bytes, join } => Some((bytes.len(), *join)),
                    _ => None,
                })
                .collect();
            assert_eq!(
                data.len(),
                1,
                "a push of {} data pages: {data:?}",
                push.len()
            );
            pushes += 1;
            marked_inside += usize::from(data[0].1.is_some_and(|k| k > 0));
        }
        assert!(
            marked_inside > 0,
            "no push of {pushes} had its keyframe inside"
        );
        let video_serial = &file[14..18];
        let stream = data(&events);
        for at in sync_offsets(&events) {
            let page = &stream[at..];
            assert_eq!(&page[14..18], video_serial, "a sync point on a video page");
            let first = page[27 + usize::from(page[26])];
            assert_eq!(first & 0xc0, 0, "a sync point starts a keyframe");
        }
    }

    /// Two files one after the other are a chained stream (what ices2 or liquidsoap send on a
    /// track change): a second set of headers and tags, for the second codec.
    #[test]
    fn chained_streams_replace_the_headers() {
        let chained = [vorbis(), opus_second()].concat();
        let (framer, events) = frame(&chained, 1);
        for piece in [1000, 4096, chained.len()] {
            assert_eq!(merged(&frame(&chained, piece).1), merged(&events));
        }
        assert_eq!(data(&events), chained);
        assert_eq!(
            headers(&events),
            [
                &leading_header_pages(vorbis(), 3)[..],
                &leading_header_pages(opus_second(), 2)[..]
            ]
        );
        assert_eq!(
            tags(&events),
            [(Some("T"), Some("A")), (Some("Second"), Some("Bé"))]
        );
        assert_eq!(framer.subtype().as_deref(), Some("Opus"));
        // The second chain's pages are no sync point before its headers are complete.
        let second = vorbis().len() + leading_header_pages(opus_second(), 2).len();
        let syncs = sync_offsets(&events);
        assert!(!syncs.iter().any(|&at| at >= vorbis().len() && at < second));
        // A listener joining right after the second set of headers gets that set.
        let n = syncs
            .iter()
            .position(|&at| at >= second)
            .expect("a sync point");
        assert_plays("chained-late.ogg", &late_joiner(&events, n), "opus");
    }

    /// An encoder that restarts without ending its stream (no EOS page): its new BOS page still
    /// starts a new chain.
    #[test]
    fn a_new_bos_without_eos_starts_a_chain() {
        let first = pages(opus());
        let cut: usize = first[..first.len() - 1].iter().map(|p| p.len()).sum();
        let restarted = [&opus()[..cut], opus_second()].concat();
        let (framer, events) = frame(&restarted, 4096);
        // The first stream is ended for the listeners, with an EOS page of its own.
        let last = Page(first[first.len() - 2]);
        let sequence = u32::from_le_bytes(last.0[18..22].try_into().unwrap());
        let eos = eos_page(last.serial(), sequence + 1);
        assert_eq!(
            data(&events),
            [&opus()[..cut], &eos, opus_second()].concat()
        );
        assert_eq!(headers(&events).len(), 2);
        assert_eq!(tags(&events).len(), 2);
        assert_eq!(framer.subtype().as_deref(), Some("Opus"));
        assert_plays("restarted.ogg", &data(&events), "opus");
    }

    /// Checks that `out` is `before`, an EOS page for the stream `before` was in, then `after`
    /// with another serial (its pages' CRCs right); returns that serial.
    fn check_clean_boundary(out: &[u8], before: &[u8], after: &[u8]) -> u32 {
        let old = Page(pages(before)[0]).serial();
        assert_eq!(out.len(), before.len() + HEADER_LEN + after.len());
        assert_eq!(&out[..before.len()], before);
        let eos = Page(&out[before.len()..before.len() + HEADER_LEN]);
        assert_eq!((eos.flags(), eos.serial()), (EOS, old));
        let new = pages(&out[before.len() + HEADER_LEN..]);
        let serial = Page(new[0]).serial();
        assert_ne!(serial, old, "the new chain takes another serial");
        for (page, original) in new.iter().zip(pages(after)) {
            assert_eq!(Page(page).serial(), serial);
            assert_eq!(
                page[22..26],
                page_crc(page).to_le_bytes(),
                "its CRC is right"
            );
            assert_eq!(
                (&page[..14], &page[18..22]),
                (&original[..14], &original[18..22])
            );
            assert_eq!(page[26..], original[26..]);
        }
        serial
    }

    /// A stream that starts over with the serial the listeners already had (an encoder
    /// restarted as it was): the old stream ends with an EOS page, the new one gets another
    /// serial, and a player across the switch decodes without an error (with the serial
    /// repeated, ffmpeg takes the new OpusHead and OpusTags for audio).
    #[test]
    fn a_new_chain_with_the_serial_of_the_old_one_gets_another() {
        let first = pages(opus());
        let cut: usize = first[..first.len() - 1].iter().map(|p| p.len()).sum();
        let restarted = [&opus()[..cut], opus()].concat();
        let (_, events) = frame(&restarted, 4096);
        let out = data(&events);
        check_clean_boundary(&out, &opus()[..cut], opus());
        assert_eq!(headers(&events).len(), 2);
        assert_plays("same-serial.ogg", &out, "opus");
    }

    /// A mount's next source (an encoder back within the grace period, a relay on its next
    /// upstream) follows the one before for the listeners: the same clean chain boundary; and
    /// after a source that ended its stream, no EOS page is added.
    #[test]
    fn a_source_that_follows_another_starts_a_clean_chain() {
        let first = pages(opus());
        let cut: usize = first[..first.len() - 1].iter().map(|p| p.len()).sum();
        let (framer, events) = frame(&opus()[..cut], 4096);
        let follow = |tail: Tail, data: &[u8]| {
            let mut next = Framer::following(tail);
            let mut out = Vec::new();
            next.push(Bytes::copy_from_slice(data), &mut out).unwrap();
            next.finish(&mut out);
            (next, out)
        };
        let (second, more) = follow(framer.tail(), opus());
        let out = [data(&events), data(&more)].concat();
        let serial = check_clean_boundary(&out, &opus()[..cut], opus());
        assert_plays("following.ogg", &out, "opus");
        // The second ended its stream (the file's last page is EOS): the third's pages follow
        // it directly, under a serial neither had.
        let (_, third) = follow(second.tail(), opus());
        let third = data(&third);
        assert_eq!(third.len(), opus().len());
        assert_ne!(Page(&third).serial(), serial);
        assert_plays("following-ended.ogg", &[out, third].concat(), "opus");
    }

    /// Bytes between pages are dropped and counted, the pages around them intact, whatever the
    /// pieces. Among them a false capture pattern whose header claims a 64 KiB page: the pages
    /// behind it wait for that page to be whole, and still come out when the source ends.
    #[test]
    fn garbage_between_pages_is_dropped() {
        let file = opus();
        let split: usize = pages(file)[..3].iter().map(|p| p.len()).sum();
        let mut garbage = b"junk OggS\x01 and OggS\0\0 more OggS".to_vec();
        let mut fake = b"OggS\0\0".to_vec();
        fake.extend_from_slice(&[0; 20]);
        fake.push(255);
        fake.extend_from_slice(&[255; 255]);
        garbage.extend_from_slice(&fake);
        let input = [&file[..split], &garbage, &file[split..]].concat();
        let (_, fine) = frame(&input, 1);
        for piece in [1, 1000, 4096, input.len()] {
            let (_, events) = frame(&input, piece);
            assert_eq!(merged(&events), merged(&fine), "pieces of {piece}");
            assert_eq!(data(&events), file, "pieces of {piece}");
            assert_eq!(dropped(&events), garbage.len(), "pieces of {piece}");
        }
        let m = merged(&fine);
        let at = m
            .iter()
            .position(|e| matches!(e, Merged::Dropped(_)))
            .unwrap();
        assert_eq!(
            m[at - 1],
            Merged::Data(file[pages(file)[..2].concat().len()..split].to_vec())
        );
        assert_eq!(m[at], Merged::Dropped(garbage.len()));
        assert_eq!(m[at + 1], Merged::Data(file[split..].to_vec()));
    }

    /// A page with one byte changed fails its CRC: it is dropped, the pages around it pass.
    #[test]
    fn a_corrupt_page_is_dropped() {
        let file = opus();
        let all = pages(file);
        let start: usize = all[..3].iter().map(|p| p.len()).sum();
        let len = all[3].len();
        let without = [&file[..start], &file[start + len..]].concat();
        // In the body, and in the header's granule position.
        for offset in [len / 2, 8] {
            let mut input = file.to_vec();
            input[start + offset] ^= 0x10;
            for piece in [1, 1000, 4096, input.len()] {
                let (_, events) = frame(&input, piece);
                assert_eq!(data(&events), without, "byte {offset}, pieces of {piece}");
                assert_eq!(dropped(&events), len, "byte {offset}, pieces of {piece}");
            }
        }
    }

    /// Bytes lost in the middle of a page, or a page cut by the end of the source: the torn page
    /// never reaches the stream.
    #[test]
    fn a_torn_page_is_dropped() {
        let file = opus();
        let all = pages(file);
        let start: usize = all[..3].iter().map(|p| p.len()).sum();
        let len = all[3].len();
        let torn = [&file[..start + len / 2], &file[start + len..]].concat();
        let without = [&file[..start], &file[start + len..]].concat();
        for piece in [1, 1000, 4096, torn.len()] {
            let (_, events) = frame(&torn, piece);
            assert_eq!(data(&events), without, "pieces of {piece}");
            assert_eq!(dropped(&events), len / 2, "pieces of {piece}");
        }
        let cut = &file[..file.len() - 100];
        let last = all.last().unwrap().len();
        for piece in [1, 4096, cut.len()] {
            let (_, events) = frame(cut, piece);
            assert_eq!(
                data(&events),
                file[..file.len() - last],
                "pieces of {piece}"
            );
            assert_eq!(dropped(&events), last - 100, "pieces of {piece}");
        }
    }

    /// A source that starts in the middle of a stream: without the BOS and header pages nothing
    /// can be played, so nothing is passed until a chain begins.
    #[test]
    fn pages_of_no_known_stream_are_dropped() {
        let all = pages(opus());
        let headless = all[2..].concat();
        let (framer, events) = frame(&headless, 4096);
        assert_eq!(data(&events), b"");
        assert_eq!(dropped(&events), headless.len());
        assert_eq!(framer.subtype(), None);
        let (framer, events) = frame(&[&headless[..], opus_second()].concat(), 4096);
        assert_eq!(data(&events), opus_second());
        assert_eq!(framer.subtype().as_deref(), Some("Opus"));
    }

    /// A page built here, with its CRC.
    fn page(flags: u8, serial: u32, sequence: u32, lacing: &[u8], body: &[u8]) -> Vec<u8> {
        let mut p = b"OggS\0".to_vec();
        p.push(flags);
        p.extend_from_slice(&0u64.to_le_bytes());
        p.extend_from_slice(&serial.to_le_bytes());
        p.extend_from_slice(&sequence.to_le_bytes());
        p.extend_from_slice(&[0; 4]);
        p.push(lacing.len() as u8);
        p.extend_from_slice(lacing);
        p.extend_from_slice(body);
        let crc = page_crc(&p);
        p[22..26].copy_from_slice(&crc.to_le_bytes());
        p
    }

    /// One packet alone on as many pages as it needs.
    fn packet_pages(flags: u8, serial: u32, sequence: u32, packet: &[u8]) -> Vec<u8> {
        let mut lacing = vec![255u8; packet.len() / 255];
        lacing.push((packet.len() % 255) as u8);
        let mut out = Vec::new();
        let (mut body, mut flags, mut sequence) = (packet, flags, sequence);
        for segs in lacing.chunks(255) {
            let len: usize = segs.iter().map(|&l| usize::from(l)).sum();
            out.extend(page(flags, serial, sequence, segs, &body[..len]));
            body = &body[len..];
            flags = CONTINUED;
            sequence += 1;
        }
        out
    }

    fn opus_head(serial: u32) -> Vec<u8> {
        packet_pages(
            BOS,
            serial,
            0,
            b"OpusHead\x01\x02\x38\x01\x80\xbb\0\0\0\0\0",
        )
    }

    /// OpusTags with one comment of `size` bytes.
    fn opus_tags(serial: u32, size: usize) -> Vec<u8> {
        let mut tags = b"OpusTags".to_vec();
        tags.extend_from_slice(&0u32.to_le_bytes());
        tags.extend_from_slice(&1u32.to_le_bytes());
        tags.extend_from_slice(&(size as u32).to_le_bytes());
        tags.extend_from_slice(b"TITLE=");
        tags.resize(tags.len() + size - 6, b'x');
        packet_pages(0, serial, 1, &tags)
    }

    #[test]
    fn headers_up_to_the_limit() {
        let fits = [opus_head(7), opus_tags(7, MAX_HEADER_BYTES - 2000)].concat();
        assert!(fits.len() <= MAX_HEADER_BYTES);
        let (_, events) = frame(&fits, 4096);
        assert_eq!(headers(&events), [&fits[..]]);
        let title = &tags(&events)[0].0.unwrap();
        assert_eq!(title.len(), MAX_HEADER_BYTES - 2006);

        let over = [opus_head(7), opus_tags(7, MAX_HEADER_BYTES)].concat();
        let mut framer = Framer::new();
        let mut out = Vec::new();
        let verdicts: Vec<_> = over
            .chunks(4096)
            .map(|c| framer.push(Bytes::copy_from_slice(c), &mut out))
            .collect();
        assert!(verdicts.contains(&Err(FormatError::HeadersTooLarge)));
        assert!(headers(&out).is_empty());
    }

    /// A run of pages the store keeps holds its own bytes and no more, and the framer holds no
    /// more than a page in the making and a push: a run split off the framer's buffer shared
    /// it, grown by doubling, for as long as the store kept the run.
    #[test]
    fn a_run_holds_its_bytes_alone_and_the_framer_a_page_at_most() {
        const PUSH: usize = 3200;
        let audio: Vec<Vec<u8>> = (0..10u8)
            .map(|i| packet_pages(0, 7, 2 + u32::from(i), &[i; 16_000]))
            .collect();
        let page_len = audio[0].len();
        let input = [opus_head(7), opus_tags(7, 100), audio.concat()].concat();
        let mut framer = Framer::new();
        let mut events = Vec::new();
        let mut most_held = 0;
        for push in input.chunks(PUSH) {
            framer
                .push(Bytes::copy_from_slice(push), &mut events)
                .unwrap();
            most_held = most_held.max(framer.buf.capacity());
        }
        let runs: Vec<Bytes> = events
            .into_iter()
            .filter_map(|e| match e {
                Event::Data { bytes, .. } => Some(bytes),
                _ => None,
            })
            .collect();
        // Header pages go out as data too (and as the headers newcomers get first).
        assert!(runs.concat() == input, "the runs are the stream");
        for run in runs {
            let len = run.len();
            assert!(
                run.try_into_mut().is_ok_and(|m| m.capacity() == len),
                "a run of {len} bytes shares its allocation, or holds more than its bytes"
            );
        }
        assert!(
            most_held <= page_len + PUSH,
            "the framer's buffer grew to {most_held} bytes for pages of {page_len}"
        );
    }

    /// A codec not known here (Ogg Skeleton, say) beside Opus: its BOS page is its whole header,
    /// and its pages in the chain's header phase are data, not header pages.
    #[test]
    fn an_unknown_codec_beside_opus() {
        let other_bos = page(BOS, 1, 0, &[8], b"fishead\0");
        let other_data = page(0, 1, 1, &[3], b"abc");
        let tags = opus_tags(2, 20);
        let audio = page(0, 2, 2, &[3], b"xyz");
        let input = [&other_bos[..], &opus_head(2), &other_data, &tags, &audio].concat();
        let (framer, events) = frame(&input, 1);
        assert_eq!(merged(&frame(&input, input.len()).1), merged(&events));
        let expected = [&other_bos[..], &opus_head(2), &tags].concat();
        assert_eq!(headers(&events), [&expected[..]]);
        assert_eq!(framer.subtype().as_deref(), Some("Unknown/Opus"));
        assert_eq!(data(&events), input);
        let syncs = sync_offsets(&events);
        assert_eq!(syncs, [input.len() - audio.len()]);
    }

    /// A stream that ends on its BOS page ends its chain: the next BOS page starts another.
    #[test]
    fn a_chain_can_end_within_its_bos_pages() {
        let ended = page(BOS | EOS, 1, 0, &[4], b"none");
        let next = page(BOS, 2, 0, &[4], b"next");
        let input = [&ended[..], &next, &page(0, 2, 1, &[4], b"data")].concat();
        let (_, events) = frame(&input, 4096);
        assert_eq!(headers(&events), [&next[..]]);
    }

    #[test]
    fn at_most_sixteen_streams_in_a_chain() {
        let bos: Vec<Vec<u8>> = (0..=MAX_LOGICAL_STREAMS as u32)
            .map(|serial| page(BOS, serial, 0, &[4], b"none"))
            .collect();
        let sixteen = bos[..MAX_LOGICAL_STREAMS].concat();
        let data_page = page(0, 3, 1, &[4], b"data");
        let (framer, events) = frame(&[&sixteen[..], &data_page].concat(), 4096);
        assert_eq!(headers(&events), [&sixteen[..]]);
        assert_eq!(
            framer.subtype().unwrap(),
            vec!["Unknown"; MAX_LOGICAL_STREAMS].join("/")
        );
        let mut framer = Framer::new();
        let mut out = Vec::new();
        assert_eq!(
            framer.push(Bytes::from(bos.concat()), &mut out),
            Err(FormatError::TooManyStreams)
        );
    }

    /// Feeds `input` in random pieces; the framer never panics, holds at most a page in the
    /// making between pushes, and accounts for every byte (passed or dropped). Returns the
    /// events, or stops at the first error (the source would be dropped there).
    fn feed_random(rng: &mut Rng, input: &[u8]) -> Vec<Event> {
        let mut framer = Framer::new();
        let mut out = Vec::new();
        let mut rest = input;
        while !rest.is_empty() {
            let (piece, tail) = rest.split_at((1 + rng.below(8192)).min(rest.len()));
            rest = tail;
            if framer
                .push(Bytes::copy_from_slice(piece), &mut out)
                .is_err()
            {
                return out;
            }
            assert!(framer.buf.len() < MAX_PAGE, "holds {}", framer.buf.len());
            let held = framer.chain.as_ref().map_or(0, |c| c.header_pages.len());
            assert!(held <= MAX_HEADER_BYTES);
        }
        framer.finish(&mut out);
        assert!(framer.buf.is_empty());
        // Every byte passed or dropped, and EOS pages added where a chain ended unfinished.
        let added = (data(&out).len() + dropped(&out))
            .checked_sub(input.len())
            .expect("no byte lost");
        assert_eq!(added % HEADER_LEN, 0, "only whole EOS pages added");
        out
    }

    /// Random bytes, with capture patterns whose headers claim pages up to the largest size.
    #[test]
    fn captures_claiming_long_pages_over_and_over_are_refused() {
        // Each capture claims 255 segments of 255 bytes, and the next one is 28 bytes on: once
        // 65 KB are in, every one of them is CRC-checked over 65 KB before it fails.
        let mut crafted = Vec::new();
        for _ in 0..6000 {
            crafted.extend_from_slice(b"OggS\0");
            crafted.extend_from_slice(&[0xFF; 23]);
        }
        let mut f = Framer::new();
        let mut out = Vec::new();
        let refused = crafted
            .chunks(4096)
            .map(|piece| f.push(Bytes::copy_from_slice(piece), &mut out))
            .find_map(Result::err);
        assert_eq!(refused, Some(FormatError::TooMuchGarbage));
        assert!(f.received < 96 * 1024, "refused after {} bytes", f.received);
    }

    #[test]
    fn random_bytes_never_pass() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut input = Vec::new();
        while input.len() < 2 << 20 {
            let n = rng.below(20_000);
            input.extend((0..n).map(|_| rng.next() as u8));
            input.extend_from_slice(b"OggS\0");
            input.extend((0..22).map(|_| rng.next() as u8));
        }
        let events = feed_random(&mut rng, &input);
        assert_eq!(data(&events), b"");
    }

    /// Valid pages of random flags, serials and contents (some with a codec's magic): whatever
    /// they claim, the framer never panics and keeps its bounds.
    #[test]
    fn random_valid_pages_never_panic() {
        let mut rng = Rng(42);
        let magics: [&[u8]; 7] = [
            b"\x01vorbis",
            b"OpusHead",
            b"\x80theora",
            b"\x7fFLAC\x01\x00\x00\x00fLaC\0\0\0\x22",
            b"Speex   ",
            b"OpusTags\xff\xff\xff\xff",
            b"",
        ];
        let (mut passed, mut header_sets) = (0, 0);
        for _ in 0..20 {
            let mut input = Vec::new();
            for sequence in 0..200 {
                let mut lacing: Vec<u8> = (0..rng.below(20)).map(|_| rng.next() as u8).collect();
                if rng.below(4) == 0 {
                    lacing.extend_from_slice(&[255; 255][..rng.below(255)]);
                }
                lacing.truncate(255);
                let len: usize = lacing.iter().map(|&l| usize::from(l)).sum();
                let mut body = magics[rng.below(magics.len())].to_vec();
                body.extend((0..len).map(|_| rng.next() as u8));
                body.truncate(len);
                let flags = rng.next() as u8 & 0x07;
                let serial = rng.below(4) as u32;
                input.extend(page(flags, serial, sequence, &lacing, &body));
            }
            let events = feed_random(&mut rng, &input);
            passed += data(&events).len();
            header_sets += headers(&events).len();
        }
        // The pages reached the framer's every stage, not only its CRC check.
        assert!(
            passed > 0 && header_sets > 0,
            "{passed} bytes, {header_sets} header sets"
        );
    }

    #[test]
    fn nothing_known_before_a_bos_page() {
        let mut framer = Framer::new();
        let mut out = Vec::new();
        framer
            .push(Bytes::from_static(b"no pages here"), &mut out)
            .unwrap();
        assert_eq!(framer.subtype(), None);
        framer.finish(&mut out);
        assert_eq!(
            out,
            [Event::Unsynced {
                bytes: 13,
                dropped: true
            }]
        );
    }
}
