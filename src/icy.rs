//! ICY metadata, the in-band protocol of SHOUTcast and Icecast: a player that asks with
//! `Icy-MetaData: 1` is told `icy-metaint: N`, and after every N bytes of audio it receives one
//! metadata block: a length byte L, then L·16 bytes of `StreamTitle='...';StreamUrl='...';`
//! padded with zeros (L = 0, a single zero byte, when nothing changed since its previous block).
//!
//! A block is built once per title change and shared by every listener. [`Cadence`] lays out one
//! listener's write: the shared audio slices with the shared blocks between them, so the audio is
//! never copied per listener.

use std::io::IoSlice;

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The most text a block's length byte can announce.
const MAX_BLOCK_TEXT: usize = 255 * 16;
/// The block sent when the title did not change since the listener's previous block.
static EMPTY_BLOCK: Bytes = Bytes::from_static(&[0]);

/// The metadata block for a title (and a URL, when set), ready to send. What could end the quoted
/// value early (`'`) becomes a typographic apostrophe and control characters become spaces, so
/// no title can forge another field; what does not fit the 4080 bytes a block holds is cut at a
/// character boundary.
pub(crate) fn block(title: &str, url: Option<&str>) -> Bytes {
    let url_field = url
        .map(|u| format!("StreamUrl='{}';", truncate(&clean(u), MAX_BLOCK_TEXT / 4)))
        .unwrap_or_default();
    let room = MAX_BLOCK_TEXT - "StreamTitle='';".len() - url_field.len();
    let text = format!(
        "StreamTitle='{}';{url_field}",
        truncate(&clean(title), room)
    );
    let units = text.len().div_ceil(16);
    let mut out = BytesMut::with_capacity(1 + units * 16);
    out.put_u8(units as u8);
    out.put_slice(text.as_bytes());
    out.put_bytes(0, units * 16 - text.len());
    out.freeze()
}

fn clean(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '\'' => '\u{2019}',
            c if c.is_control() => ' ',
            c => c,
        })
        .collect()
}

fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Where one listener stands in its ICY framing.
#[derive(Debug)]
pub(crate) struct Cadence {
    /// Audio bytes between blocks (the `icy-metaint` the listener was told).
    metaint: usize,
    /// Audio bytes still to send before the next block.
    until_block: usize,
    /// The rest of a block that a write cut short: it goes out before any more audio.
    partial: Option<Bytes>,
    /// The title version of the last block sent with text.
    sent_version: u64,
}

/// One part of a laid-out write, to account for a write that took only some of it.
#[derive(Debug)]
pub(crate) enum Step {
    Audio(usize),
    /// A block; `version` is set when it carries that title version.
    Block {
        bytes: Bytes,
        version: Option<u64>,
    },
}

impl Cadence {
    pub fn new(metaint: usize) -> Self {
        Cadence {
            metaint,
            until_block: metaint,
            partial: None,
            sent_version: 0,
        }
    }

    /// The listener moves to another mount: title versions are counted per mount, so the one
    /// it was sent means nothing there, and its next block carries the new mount's title.
    pub fn forget_title(&mut self) {
        self.sent_version = u64::MAX;
    }

    /// A cadence whose first interval already holds `sent` bytes (a preamble sent before the
    /// stream); None if they fill it, as a block would be owed inside them.
    pub fn after(metaint: usize, sent: usize) -> Option<Self> {
        (sent < metaint).then(|| Cadence {
            until_block: metaint - sent,
            ..Cadence::new(metaint)
        })
    }

    /// Lays out one vectored write: the rest of a cut block, then `audio` (the stream from the
    /// listener's position `pos`, in pieces) with a block every `metaint` bytes. `title_at`
    /// gives the block and title version (0: no title yet) of the title playing at a stream
    /// offset: each block carries the title of the audio after it, so a listener behind the
    /// live edge hears a title change where it is in the stream. Stops before `max_slices`
    /// slices. `plan` records the parts for [`Cadence::wrote`].
    pub fn lay_out<'a, 'b: 'a>(
        &'a self,
        audio: impl Iterator<Item = &'a [u8]>,
        pos: u64,
        title_at: impl Fn(u64) -> (&'b Bytes, u64),
        iov: &mut Vec<IoSlice<'a>>,
        plan: &mut Vec<Step>,
        max_slices: usize,
    ) {
        iov.clear();
        plan.clear();
        if let Some(rest) = &self.partial {
            iov.push(IoSlice::new(rest));
            plan.push(Step::Block {
                bytes: rest.clone(),
                version: None,
            });
        }
        let mut until = self.until_block;
        let mut version = self.sent_version;
        let mut at = pos;
        for mut data in audio {
            while !data.is_empty() {
                if iov.len() + 2 > max_slices {
                    return;
                }
                if until == 0 {
                    let current = title_at(at);
                    let (blk, v) = if current.1 != version {
                        version = current.1;
                        (current.0, Some(version))
                    } else {
                        (&EMPTY_BLOCK, None)
                    };
                    iov.push(IoSlice::new(blk));
                    plan.push(Step::Block {
                        bytes: blk.clone(),
                        version: v,
                    });
                    until = self.metaint;
                }
                let take = data.len().min(until);
                iov.push(IoSlice::new(&data[..take]));
                plan.push(Step::Audio(take));
                until -= take;
                at += take as u64;
                data = &data[take..];
            }
        }
    }

    /// Accounts for a write of `n` bytes of the laid-out `plan`; returns how many of them were
    /// audio, by which the listener's stream position advances.
    pub fn wrote(&mut self, mut n: usize, plan: &mut Vec<Step>) -> usize {
        let mut audio = 0;
        for step in plan.drain(..) {
            if n == 0 {
                break;
            }
            match step {
                Step::Audio(len) => {
                    let k = len.min(n);
                    audio += k;
                    self.until_block -= k;
                    n -= k;
                }
                Step::Block { bytes, version } => {
                    if n < bytes.len() {
                        self.partial = Some(bytes.slice(n..));
                        n = 0;
                    } else {
                        n -= bytes.len();
                        self.partial = None;
                    }
                    // A block begun is a block owed in full: from here on the cadence counts
                    // the next interval, whatever is left of this block.
                    self.until_block = self.metaint;
                    if let Some(v) = version {
                        self.sent_version = v;
                    }
                }
            }
        }
        audio
    }

    /// Nothing is owed but audio: no block is cut short.
    pub fn between_blocks(&self) -> bool {
        self.partial.is_none()
    }
}

/// A stream with ICY metadata between its audio, taken apart again (what a relay receives when it
/// asks with `Icy-MetaData: 1`): the audio as slices of the pieces read, never copied, and each
/// block's title. The block layout is the one [`block`] builds, as Icecast and SHOUTcast send it.
pub(crate) struct Deinterleaver {
    metaint: usize,
    /// Audio bytes left before the next block's length byte.
    audio_left: usize,
    /// Inside a block: its text so far, and how many bytes of it are still to come.
    block: Option<(Vec<u8>, usize)>,
}

/// What one metadata block said.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct StreamTitle {
    pub title: String,
    pub url: Option<String>,
}

/// A block that is not ICY metadata: the stream is not framed as its `icy-metaint` says.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct NotMetadata;

impl Deinterleaver {
    /// For a stream whose blocks fall every `metaint` audio bytes (at least 1).
    pub fn new(metaint: usize) -> Self {
        Deinterleaver {
            metaint: metaint.max(1),
            audio_left: metaint.max(1),
            block: None,
        }
    }

    /// Splits `input`: its audio goes to `audio`, and each complete block with text to `titles`
    /// (an empty block, sent when nothing changed, yields nothing).
    pub fn push(
        &mut self,
        mut input: Bytes,
        audio: &mut Vec<Bytes>,
        titles: &mut Vec<StreamTitle>,
    ) -> Result<(), NotMetadata> {
        while !input.is_empty() {
            match &mut self.block {
                None if self.audio_left > 0 => {
                    let n = self.audio_left.min(input.len());
                    audio.push(input.split_to(n));
                    self.audio_left -= n;
                }
                None => {
                    let len = input[0] as usize * 16;
                    input.advance(1);
                    if len == 0 {
                        self.audio_left = self.metaint;
                    } else {
                        self.block = Some((Vec::with_capacity(len), len));
                    }
                }
                Some((text, left)) => {
                    let n = (*left).min(input.len());
                    text.extend_from_slice(&input.split_to(n));
                    *left -= n;
                    if *left == 0 {
                        let text = std::mem::take(text);
                        self.block = None;
                        self.audio_left = self.metaint;
                        titles.push(parse_block(&text)?);
                    }
                }
            }
        }
        Ok(())
    }
}

/// Title text as encoders and upstreams send it: UTF-8 when it is valid UTF-8, else
/// Windows-1252. Old Windows encoders (SAM, Winamp plug-ins) send their code page without
/// saying so, and Icecast gives ICY titles in Latin-1, whose printable characters Windows-1252
/// shares (as WHATWG's decoders take the label `iso-8859-1`); valid UTF-8 is rarely anything else.
pub(crate) fn decode_text(raw: &[u8]) -> String {
    match std::str::from_utf8(raw) {
        Ok(text) => text.to_string(),
        Err(_) => windows_1252(raw),
    }
}

/// Decodes Windows-1252: Latin-1, with typographic characters in 0x80-0x9F (the five bytes it
/// leaves undefined come out as the C1 controls of the same numbers).
pub(crate) fn windows_1252(raw: &[u8]) -> String {
    const HIGH: [char; 32] = [
        '\u{20AC}', '\u{81}', '\u{201A}', '\u{192}', '\u{201E}', '\u{2026}', '\u{2020}',
        '\u{2021}', '\u{2C6}', '\u{2030}', '\u{160}', '\u{2039}', '\u{152}', '\u{8D}', '\u{17D}',
        '\u{8F}', '\u{90}', '\u{2018}', '\u{2019}', '\u{201C}', '\u{201D}', '\u{2022}', '\u{2013}',
        '\u{2014}', '\u{2DC}', '\u{2122}', '\u{161}', '\u{203A}', '\u{153}', '\u{9D}', '\u{17E}',
        '\u{178}',
    ];
    raw.iter()
        .map(|&b| match b {
            0x80..=0x9F => HIGH[usize::from(b - 0x80)],
            _ => char::from(b),
        })
        .collect()
}

/// Reads `StreamTitle='...';StreamUrl='...';` (zero padding after). A value ends at `';`, as
/// players read it, so a title holding a lone `'` survives. UTF-8, or else Windows-1252
/// ([`decode_text`]): Icecast upstreams send Latin-1.
fn parse_block(raw: &[u8]) -> Result<StreamTitle, NotMetadata> {
    let text = decode_text(raw);
    let text = text.trim_end_matches('\0');
    if !text.starts_with("Stream") {
        return Err(NotMetadata);
    }
    let field = |name: &str| {
        let start = text.find(&format!("{name}='"))? + name.len() + 2;
        let rest = &text[start..];
        let end = rest.find("';").unwrap_or(rest.len());
        Some(rest[..end].trim_end_matches('\'').to_string())
    };
    Ok(StreamTitle {
        title: field("StreamTitle").unwrap_or_default(),
        url: field("StreamUrl").filter(|u| !u.is_empty()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn titles_are_utf8_or_else_windows_1252() {
        assert_eq!(decode_text("Café “q”".as_bytes()), "Café “q”");
        assert_eq!(decode_text(b"Caf\xe9 \x93q\x94 \x80"), "Café “q” €");
        assert_eq!(windows_1252(b"\x81\xff"), "\u{81}ÿ");
        let block = parse_block(b"StreamTitle='Bj\xf6rk';\0\0").unwrap();
        assert_eq!(block.title, "Björk");
    }

    /// Splits what a listener received into audio and blocks, as a player does.
    fn parse(received: &[u8], metaint: usize) -> (Vec<u8>, Vec<String>) {
        let (mut audio, mut blocks) = (Vec::new(), Vec::new());
        let mut rest = received;
        while !rest.is_empty() {
            let take = rest.len().min(metaint);
            audio.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if rest.is_empty() {
                break;
            }
            let len = rest[0] as usize * 16;
            let text = &rest[1..1 + len];
            blocks.push(
                String::from_utf8_lossy(text)
                    .trim_end_matches('\0')
                    .to_string(),
            );
            rest = &rest[1 + len..];
        }
        (audio, blocks)
    }

    /// Runs a listener's cadence over `stream`, writing at most `cap` bytes per write.
    fn deliver(stream: &[u8], metaint: usize, cap: usize, titles: &[(usize, &str)]) -> Vec<u8> {
        let mut cadence = Cadence::new(metaint);
        let mut plan = Vec::new();
        let mut pos = 0;
        let mut out = Vec::new();
        let none = Bytes::from_static(&[0]);
        // Each title from its offset on, with its version.
        let spans: Vec<(usize, Bytes, u64)> = titles
            .iter()
            .enumerate()
            .map(|(i, (at, title))| (*at, block(title, None), i as u64 + 1))
            .collect();
        let title_at = |at: u64| {
            spans
                .iter()
                .rev()
                .find(|(from, _, _)| *from as u64 <= at)
                .map_or((&none, 0), |(_, b, v)| (b, *v))
        };
        while pos < stream.len() || !cadence.between_blocks() {
            let pieces = stream[pos..].chunks(100);
            let mut iov = Vec::new();
            cadence.lay_out(pieces, pos as u64, title_at, &mut iov, &mut plan, 64);
            let mut n = 0;
            for s in &iov {
                let k = s.len().min(cap - n);
                out.extend_from_slice(&s[..k]);
                n += k;
                if n == cap {
                    break;
                }
            }
            drop(iov);
            pos += cadence.wrote(n, &mut plan);
        }
        out
    }

    #[test]
    fn a_block_holds_the_title_padded_to_sixteen_bytes() {
        let b = block("Artist - Song", Some("http://x"));
        assert_eq!(b.len(), 1 + 16 * b[0] as usize);
        let text = String::from_utf8_lossy(&b[1..]);
        assert!(
            text.starts_with("StreamTitle='Artist - Song';StreamUrl='http://x';\0"),
            "{text}"
        );
    }

    #[test]
    fn a_title_cannot_forge_a_field_and_is_bounded() {
        let b = block("a';StreamUrl='http://evil';x\n", None);
        let text = String::from_utf8_lossy(&b[1..]);
        let text = text.trim_end_matches('\0');
        assert_eq!(text.matches('\'').count(), 2, "{text}");
        assert!(!text.contains('\n'));
        let long = block(&"é".repeat(10_000), Some("u"));
        assert_eq!(long.len(), 1 + 16 * long[0] as usize);
        assert!(long.len() <= 1 + 4080);
        assert!(
            std::str::from_utf8(&long[1..]).is_ok(),
            "cut inside a character"
        );
    }

    #[test]
    fn blocks_fall_every_metaint_bytes_whatever_the_writes_take() {
        let stream: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
        for cap in [1, 7, 999, 4096, 1 << 20] {
            let got = deliver(&stream, 1000, cap, &[(0, "one"), (20_000, "two")]);
            let (audio, blocks) = parse(&got, 1000);
            assert_eq!(audio, stream, "audio between blocks, writes of {cap}");
            assert_eq!(blocks.len(), 49);
            assert_eq!(blocks[0], "StreamTitle='one';");
            assert!(
                blocks[1..19].iter().all(|b| b.is_empty()),
                "unchanged: empty blocks"
            );
            let two = blocks
                .iter()
                .position(|b| b == "StreamTitle='two';")
                .unwrap();
            // Each block carries the title of the audio after it, whatever the writes: the
            // 20th block, at 20,000, the first of "two".
            assert_eq!(two, 19, "new title at block {two}, writes of {cap}");
            assert!(blocks[two + 1..].iter().all(|b| b.is_empty()));
        }
    }

    #[test]
    fn no_title_yet_sends_empty_blocks() {
        let stream = vec![1u8; 3000];
        let got = deliver(&stream, 1000, 10_000, &[]);
        assert_eq!(got.len(), 3000 + 2, "two empty blocks");
        assert_eq!((got[1000], got[2001]), (0, 0));
    }

    #[test]
    fn a_deinterleaver_gives_back_the_audio_and_titles_however_the_stream_is_cut() {
        let stream: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
        let sent = deliver(&stream, 1000, 1 << 20, &[(0, "one"), (20_000, "it's two")]);
        for piece in [1, 7, 999, 1 << 20] {
            let mut d = Deinterleaver::new(1000);
            let (mut audio, mut titles) = (Vec::new(), Vec::new());
            for p in sent.chunks(piece) {
                d.push(Bytes::copy_from_slice(p), &mut audio, &mut titles)
                    .unwrap();
            }
            assert_eq!(audio.concat(), stream, "pieces of {piece}");
            let titles: Vec<_> = titles.iter().map(|t| t.title.as_str()).collect();
            assert_eq!(titles, ["one", "it\u{2019}s two"], "pieces of {piece}");
        }
        let mut d = Deinterleaver::new(4);
        let mut titles = Vec::new();
        let with_url = [b"abcd".as_slice(), &block("T", Some("http://u"))].concat();
        d.push(Bytes::from(with_url), &mut Vec::new(), &mut titles)
            .unwrap();
        assert_eq!(
            titles,
            [StreamTitle {
                title: "T".into(),
                url: Some("http://u".into())
            }]
        );
    }

    #[test]
    fn a_stream_not_framed_as_announced_is_refused() {
        let mut d = Deinterleaver::new(4);
        let garbage = Bytes::from_static(b"abcd\x01not a metadata block");
        assert_eq!(
            d.push(garbage, &mut Vec::new(), &mut Vec::new()),
            Err(NotMetadata)
        );
    }
}
