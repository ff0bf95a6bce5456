//! What the formats and titles tests check in captured bytes, parsed here rather than trusted to
//! a player: MPEG audio and ADTS frame headers, Ogg pages, and ICY metadata blocks.

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// MPEG audio (MP1/2/3) and AAC in ADTS

/// kbit/s by [version row][layer row][index]: rows V1 L1, V1 L2, V1 L3, V2/2.5 L1, V2/2.5 L2&L3.
const MPEG_KBPS: [[u32; 16]; 5] = [
    [
        0, 32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448, 0,
    ],
    [
        0, 32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 0,
    ],
    [
        0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 0,
    ],
    [
        0, 32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256, 0,
    ],
    [
        0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160, 0,
    ],
];

/// The length of the MPEG audio frame whose 4-byte header starts `b`, if it is a valid header
/// (sync word, no reserved version/layer, a bitrate that is neither free nor bad, a sample rate).
pub fn mpeg_frame_len(b: &[u8]) -> Option<usize> {
    if b.len() < 4 || b[0] != 0xFF || b[1] & 0xE0 != 0xE0 {
        return None;
    }
    let version = (b[1] >> 3) & 3; // 0 = 2.5, 1 = reserved, 2 = 2, 3 = 1
    let layer = (b[1] >> 1) & 3; // 1 = III, 2 = II, 3 = I
    let bitrate_index = (b[2] >> 4) as usize;
    let rate_index = ((b[2] >> 2) & 3) as usize;
    let padding = ((b[2] >> 1) & 1) as usize;
    if version == 1 || layer == 0 || rate_index == 3 {
        return None;
    }
    let row = match (version == 3, layer) {
        (true, 3) => 0,
        (true, 2) => 1,
        (true, _) => 2,
        (false, 3) => 3,
        (false, _) => 4,
    };
    let kbps = MPEG_KBPS[row][bitrate_index] as usize;
    if kbps == 0 {
        return None;
    }
    let base = [44100, 48000, 32000][rate_index];
    let rate = match version {
        3 => base,
        2 => base / 2,
        _ => base / 4,
    };
    let len = match layer {
        3 => (12 * kbps * 1000 / rate + padding) * 4,
        2 => 144 * kbps * 1000 / rate + padding,
        _ if version == 3 => 144 * kbps * 1000 / rate + padding,
        _ => 72 * kbps * 1000 / rate + padding,
    };
    Some(len)
}

/// The length of the ADTS frame whose header starts `b`, if it is a valid header.
pub fn adts_frame_len(b: &[u8]) -> Option<usize> {
    if b.len() < 7 || b[0] != 0xFF || b[1] & 0xF6 != 0xF0 {
        return None;
    }
    let rate_index = (b[2] >> 2) & 0xF;
    let len = (((b[3] & 3) as usize) << 11) | ((b[4] as usize) << 3) | ((b[5] >> 5) as usize);
    (rate_index < 13 && len >= 7).then_some(len)
}

/// Checks that `bytes` starts on a frame header and that each frame's computed length lands on the
/// next header, through the whole capture (its last frame may be cut short); returns the length of
/// the complete frames (a decoder given a cut last frame reports an error). Panics naming `who` and
/// the offset where the chain breaks.
pub fn assert_frame_chain(bytes: &[u8], frame_len: fn(&[u8]) -> Option<usize>, who: &str) -> usize {
    let head: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
    let mut at = 0;
    let mut frames = 0;
    let mut complete = 0;
    while at < bytes.len() {
        let rest = &bytes[at..];
        match frame_len(rest) {
            Some(len) => {
                frames += 1;
                at += len;
                if at <= bytes.len() {
                    complete = at;
                }
            }
            // A header cut by the end of the capture.
            None if rest.len() < 7 => break,
            None => panic!(
                "{who}: no frame header at byte {at} of {} (after {frames} frames; the capture \
                 starts with {})",
                bytes.len(),
                head.join(" ")
            ),
        }
    }
    assert!(frames >= 2, "{who}: only {frames} frame(s) in the capture");
    complete
}

/// The length of the ID3v2 tag that starts `bytes`, or 0.
pub fn id3v2_len(bytes: &[u8]) -> usize {
    if bytes.len() < 10 || !bytes.starts_with(b"ID3") {
        return 0;
    }
    10 + bytes[6..10]
        .iter()
        .fold(0usize, |n, &b| (n << 7) | (b & 0x7F) as usize)
}

/// Asserts that `received` is a run of `sent` (a listener's bytes are the source's, from its own
/// join point, without a byte added, lost or changed); returns where in `sent` it starts.
pub fn assert_slice_of(received: &[u8], sent: &[u8], who: &str) -> usize {
    let probe = &received[..received.len().min(256)];
    let at = super::find(sent, probe)
        .unwrap_or_else(|| panic!("{who}: the first bytes received are nowhere in what was sent"));
    let expected = &sent[at..(at + received.len()).min(sent.len())];
    if let Some(i) = received.iter().zip(expected).position(|(a, b)| a != b) {
        panic!(
            "{who}: byte {i} after the join point ({at}) differs from what the source sent \
             ({} bytes received)",
            received.len()
        );
    }
    assert!(
        received.len() <= expected.len(),
        "{who}: {} bytes received, more than the {} sent after the join point",
        received.len(),
        expected.len()
    );
    at
}

// ---------------------------------------------------------------------------------------------
// Ogg

#[derive(Debug, Clone)]
pub struct OggPage {
    pub offset: usize,
    /// 0x01 continued packet, 0x02 beginning of stream, 0x04 end of stream.
    pub header_type: u8,
    pub granule: u64,
    pub serial: u32,
    pub sequence: u32,
    pub len: usize,
    /// The first bytes of the page body (identifies header packets: `OpusHead`, `\x01vorbis`).
    pub body_start: Vec<u8>,
}

impl OggPage {
    pub fn bos(&self) -> bool {
        self.header_type & 0x02 != 0
    }

    /// A codec header packet starts this page (identification, comments or setup).
    pub fn is_codec_header(&self) -> bool {
        let b = &self.body_start;
        b.starts_with(b"OpusHead")
            || b.starts_with(b"OpusTags")
            || (b.len() >= 7 && matches!(b[0], 1 | 3 | 5) && &b[1..7] == b"vorbis")
    }
}

/// Walks the Ogg pages of `bytes` from its first byte; panics naming `who` if it does not start
/// with a page or a page is malformed. A page cut by the end of the capture ends the walk.
pub fn ogg_pages(bytes: &[u8], who: &str) -> Vec<OggPage> {
    let mut pages = Vec::new();
    let mut at = 0;
    while at + 27 <= bytes.len() {
        let p = &bytes[at..];
        assert!(
            &p[..4] == b"OggS" && p[4] == 0,
            "{who}: no Ogg page at byte {at} of {} (starts {:02x?})",
            bytes.len(),
            &p[..8]
        );
        let nsegs = p[26] as usize;
        if at + 27 + nsegs > bytes.len() {
            break;
        }
        let body: usize = p[27..27 + nsegs].iter().map(|&l| l as usize).sum();
        let len = 27 + nsegs + body;
        if at + len > bytes.len() {
            break;
        }
        let body_at = 27 + nsegs;
        pages.push(OggPage {
            offset: at,
            header_type: p[5],
            granule: u64::from_le_bytes(p[6..14].try_into().unwrap()),
            serial: u32::from_le_bytes(p[14..18].try_into().unwrap()),
            sequence: u32::from_le_bytes(p[18..22].try_into().unwrap()),
            len,
            body_start: p[body_at..(body_at + 16).min(len)].to_vec(),
        });
        at += len;
    }
    pages
}

// ---------------------------------------------------------------------------------------------
// ICY metadata

/// A listener's stream split into audio and ICY metadata blocks, as a player reads it.
#[derive(Default)]
pub struct IcyCapture {
    pub metaint: usize,
    pub audio: Vec<u8>,
    /// Each block's raw bytes (without its length byte) with the audio byte count before it.
    pub blocks: Vec<(usize, Vec<u8>)>,
    pending: Vec<u8>,
}

impl IcyCapture {
    pub fn new(metaint: usize) -> IcyCapture {
        IcyCapture {
            metaint,
            ..IcyCapture::default()
        }
    }

    /// Takes more bytes of the response body.
    pub fn feed(&mut self, data: &[u8]) {
        self.pending.extend_from_slice(data);
        loop {
            let until_block = self.metaint - self.audio.len() % self.metaint;
            let at_block = self.audio.len().is_multiple_of(self.metaint) && !self.audio.is_empty();
            let expecting_block =
                at_block && self.blocks.last().map(|b| b.0) != Some(self.audio.len());
            if expecting_block {
                let Some(&l) = self.pending.first() else {
                    return;
                };
                let n = 16 * l as usize;
                if self.pending.len() < 1 + n {
                    return;
                }
                let block = self.pending[1..1 + n].to_vec();
                self.pending.drain(..1 + n);
                self.blocks.push((self.audio.len(), block));
            } else {
                if self.pending.is_empty() {
                    return;
                }
                let n = until_block.min(self.pending.len());
                self.audio.extend(self.pending.drain(..n));
            }
        }
    }

    /// Every title the blocks carried, in order (empty blocks carry none).
    pub fn titles(&self) -> Vec<String> {
        self.blocks
            .iter()
            .filter(|(_, b)| !b.is_empty())
            .filter_map(|(_, b)| {
                icy_fields(b)
                    .into_iter()
                    .find(|(k, _)| k == "StreamTitle")
                    .map(|(_, v)| v)
            })
            .collect()
    }
}

/// Parses a block's text as a lenient player does: `Key='value';` pairs, a value ending at the
/// first `';`, then zero padding. A title that could forge a field shows here as an extra pair.
pub fn icy_fields(block: &[u8]) -> Vec<(String, String)> {
    let end = block.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    let text = String::from_utf8_lossy(&block[..end]).to_string();
    let mut fields = Vec::new();
    let mut rest = text.as_str();
    while let Some(eq) = rest.find("='") {
        let key = rest[..eq].to_string();
        let after = &rest[eq + 2..];
        let (value, next) = match after.find("';") {
            Some(i) => (&after[..i], &after[i + 2..]),
            None => (after.trim_end_matches('\''), ""),
        };
        fields.push((key, value.to_string()));
        rest = next;
    }
    fields
}

/// Checks one block's layout: text of `Key='value';` pairs, then only zero bytes, no control
/// byte in the text; panics naming `who`.
pub fn assert_block_well_formed(block: &[u8], who: &str) {
    let end = block.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    let text = &block[..end];
    assert!(
        text.ends_with(b"';"),
        "{who}: block text does not end with `';`: {:?}",
        String::from_utf8_lossy(block)
    );
    assert!(
        text.iter().all(|&b| b >= 0x20 && b != 0x7F),
        "{who}: control byte in block {:?}",
        String::from_utf8_lossy(block)
    );
    assert!(
        block.len() - end < 16,
        "{who}: block is {} bytes for {end} bytes of text (16-byte units, padded by at most 15)",
        block.len()
    );
}

/// Asks for a stream with `Icy-MetaData: 1`; returns the stream past its head, and the head.
pub fn icy_listener(addr: std::net::SocketAddr, mount: &str) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(super::DEADLINE)).unwrap();
    write!(
        s,
        "GET {mount} HTTP/1.0\r\nHost: test\r\nUser-Agent: fanstream-icy-test\r\nIcy-MetaData: 1\r\n\r\n"
    )
    .unwrap();
    let head = super::read_head(&mut s);
    assert!(head.contains(" 200 "), "listener refused: {head:?}");
    (s, head)
}

/// The `icy-metaint` value of a response head, if it has one.
pub fn icy_metaint(head: &str) -> Option<usize> {
    head.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("icy-metaint")
                .then(|| v.trim().to_string())
        })
        .and_then(|v| v.parse().ok())
}

/// Reads from `s` into `capture` until `done` holds (true), or the stream ends or `deadline`
/// passes (false).
pub fn read_while_open(
    s: &mut TcpStream,
    capture: &mut IcyCapture,
    deadline: Duration,
    mut done: impl FnMut(&IcyCapture) -> bool,
) -> bool {
    let start = Instant::now();
    let mut buf = vec![0u8; 16 * 1024];
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    while !done(capture) {
        if start.elapsed() > deadline {
            return false;
        }
        match super::read_some(s, &mut buf) {
            Ok(0) => return false,
            Ok(n) => capture.feed(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return false,
        }
    }
    true
}

/// Reads from `s` into `capture` until `done` holds, failing at `deadline` with `what`.
pub fn read_until(
    s: &mut TcpStream,
    capture: &mut IcyCapture,
    what: &str,
    deadline: Duration,
    mut done: impl FnMut(&IcyCapture) -> bool,
) {
    let start = Instant::now();
    let mut buf = vec![0u8; 16 * 1024];
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    while !done(capture) {
        assert!(
            start.elapsed() < deadline,
            "timed out waiting for {what}; {} audio bytes and {} blocks so far, titles {:?}",
            capture.audio.len(),
            capture.blocks.len(),
            capture.titles()
        );
        match super::read_some(s, &mut buf) {
            Ok(0) => panic!(
                "stream ended while waiting for {what}; titles {:?}",
                capture.titles()
            ),
            Ok(n) => capture.feed(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("read failed while waiting for {what}: {e}"),
        }
    }
}

#[test]
fn frame_headers_and_icy_blocks_parse() {
    // MPEG-1 Layer III, 128 kbit/s, 44.1 kHz, no padding: 417 bytes.
    assert_eq!(mpeg_frame_len(&[0xFF, 0xFB, 0x90, 0x64]), Some(417));
    // The same with padding: 418. 48 kHz: 384.
    assert_eq!(mpeg_frame_len(&[0xFF, 0xFB, 0x92, 0x64]), Some(418));
    assert_eq!(mpeg_frame_len(&[0xFF, 0xFB, 0x94, 0x64]), Some(384));
    // MPEG-2 Layer III 64 kbit/s 24 kHz: 72 * 64000 / 24000 = 192.
    assert_eq!(mpeg_frame_len(&[0xFF, 0xF3, 0x84, 0x64]), Some(192));
    assert_eq!(
        mpeg_frame_len(&[0xFF, 0xFB, 0xF0, 0x64]),
        None,
        "bad bitrate"
    );
    assert_eq!(mpeg_frame_len(&[0x4F, 0x67, 0x67, 0x53]), None, "OggS");
    // ADTS, 44.1 kHz, 371-byte frame.
    let adts = [
        0xFF,
        0xF1,
        0x50,
        0x80,
        (371 >> 3) as u8,
        ((371 & 7) << 5) as u8 | 0x1F,
        0xFC,
    ];
    assert_eq!(adts_frame_len(&adts), Some(371));

    let mut c = IcyCapture::new(4);
    let mut block = b"StreamTitle='a';".to_vec();
    block.resize(16, 0);
    let mut stream = b"abcd\x01".to_vec();
    stream.extend(&block);
    stream.extend(b"efgh\x00ij");
    for piece in stream.chunks(3) {
        c.feed(piece);
    }
    assert_eq!(c.audio, b"abcdefghij");
    assert_eq!(c.blocks.len(), 2);
    assert_eq!(c.titles(), vec!["a".to_string()]);
    assert_eq!(
        icy_fields(b"StreamTitle='a';StreamUrl='http://evil';x';\0\0"),
        vec![
            ("StreamTitle".to_string(), "a".to_string()),
            ("StreamUrl".to_string(), "http://evil".to_string())
        ]
    );
}
