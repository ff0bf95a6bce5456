//! Formats at ingest: what a source's bytes are, parsed once per mount as they arrive and never per
//! listener. A parser turns the pieces an encoder happens to write into [`Event`]s: runs of whole
//! frames or pages, each marked where a player may start (a *sync point*), the header a player
//! needs before any of them (Ogg, WebM), and the titles the stream carries. This file holds
//! what every parser yields; `framing` picks one by the source's `Content-Type`:
//! - `audio/mpeg` ([`mpeg`], MP3) and `audio/aac`, `audio/aacp` ([`mpeg`], ADTS): every byte passes,
//!   but cut at frame boundaries; a stream that is not what it says flows as it came, with the
//!   chunk boundaries as join points, as before there was a parser;
//! - `audio/ogg`, `application/ogg`, `audio/opus`, `video/ogg` ([`ogg`]): whole pages, the header
//!   pages of each logical stream kept for late joiners; garbage and torn pages are dropped;
//! - `audio/webm`, `video/webm`, `audio/x-matroska`, `video/x-matroska` ([`webm`]): every byte
//!   passes, the header before the first Cluster kept for late joiners, each Cluster (with video,
//!   each starting with a keyframe) a sync point; a stream that is not WebM flows as it came;
//! - anything else: passed through as it comes, every piece a sync point.

use bytes::Bytes;

/// What a parser makes of a source's bytes, in stream order.
#[derive(Debug, PartialEq)]
pub(crate) enum Event {
    /// Bytes to append to the stream: whole frames or pages (never a torn one, once the parser is
    /// in sync), or the rest of one and then whole ones. `join`: where in `bytes` a new listener
    /// may first start (`Some(0)`: at the first byte), if anywhere.
    Data { bytes: Bytes, join: Option<usize> },
    /// A complete new set of header pages (Ogg: every logical stream's BOS page and header
    /// packets; WebM: the EBML header, the Segment's head and its elements up to the first
    /// Cluster). Listeners joining from the next sync point on get it before the stream;
    /// listeners already connected got the same pages in the stream.
    Headers(Bytes),
    /// Now-playing metadata the stream itself carries (a Vorbis comment or OpusTags header, a
    /// WebM title or tags).
    Tags {
        title: Option<String>,
        artist: Option<String>,
    },
    /// Bytes the parser could not place: garbage between pages, a page whose CRC is wrong, bytes
    /// before the first frame. `dropped` says whether they were left out of the stream (Ogg) or
    /// passed on as they came (MPEG, WebM). Counted per mount.
    Unsynced { bytes: usize, dropped: bool },
}

/// `bytes` of a [`Event::Data`] as the runs its join point splits them into, each with whether
/// a player may start at its first byte: what a consumer that cuts at sync points (the HLS
/// segmenter) takes.
pub(crate) fn runs(bytes: &Bytes, join: Option<usize>) -> impl Iterator<Item = (Bytes, bool)> {
    let at = join.unwrap_or(bytes.len()).min(bytes.len());
    [(bytes.slice(..at), false), (bytes.slice(at..), true)]
        .into_iter()
        .filter(|(run, _)| !run.is_empty())
}

/// Why a source's stream cannot be served; the source is refused with a log line saying so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FormatError {
    /// Header pages above [`MAX_HEADER_BYTES`].
    HeadersTooLarge,
    /// More than [`MAX_LOGICAL_STREAMS`] logical streams in one Ogg chain, or tracks in one
    /// WebM header.
    TooManyStreams,
    /// So much of the stream is garbage that checking it costs far more than the stream brings
    /// (Ogg: captures claiming long pages whose CRC fails, over and over).
    TooMuchGarbage,
}

impl FormatError {
    pub fn reason(&self) -> &'static str {
        match self {
            FormatError::HeadersTooLarge => "headers_too_large",
            FormatError::TooManyStreams => "too_many_streams",
            FormatError::TooMuchGarbage => "too_much_garbage",
        }
    }
}

/// Most bytes of header pages one stream may need: they are kept, and sent to every new listener.
pub(crate) const MAX_HEADER_BYTES: usize = 256 * 1024;
/// Most logical streams in one Ogg chain, and tracks in one WebM header.
pub(crate) const MAX_LOGICAL_STREAMS: usize = 16;

/// What the parsers' unit tests share: real files from ffmpeg, pieces as an encoder might cut
/// them, and a player's verdict on a late joiner's capture.
#[cfg(test)]
pub(crate) mod testing {
    use std::path::PathBuf;
    use std::process::{Command, Output};

    /// Where a test's file goes: named by process, so that test runs side by side do not meet;
    /// removed once checked.
    pub fn temp_file(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join("fanstream-format-tests");
        std::fs::create_dir_all(&dir).expect("create the test directory");
        dir.join(format!("{}-{name}", std::process::id()))
    }

    pub fn tool(program: &str, args: &[&str]) -> Output {
        Command::new(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| {
                panic!("these tests run {program} (Debian package ffmpeg, `make deps`): {e}")
            })
    }

    /// A player given `capture` finds `codecs` (ffprobe's names, one per line) and decodes it
    /// to the end without an error.
    pub fn assert_plays(name: &str, capture: &[u8], codecs: &str) {
        let path = temp_file(name);
        std::fs::write(&path, capture).expect("write the capture");
        let path = path.to_str().expect("a UTF-8 temp path");
        let probe = tool(
            "ffprobe",
            &[
                "-v",
                "error",
                "-show_entries",
                "stream=codec_name",
                "-of",
                "csv=p=0",
                path,
            ],
        );
        assert!(probe.status.success(), "ffprobe {path}: {probe:?}");
        assert_eq!(
            String::from_utf8_lossy(&probe.stdout).trim(),
            codecs,
            "{name}"
        );
        let decode = tool("ffmpeg", &["-v", "error", "-i", path, "-f", "null", "-"]);
        assert!(
            decode.status.success() && decode.stderr.is_empty(),
            "ffmpeg decoding {path}: {}",
            String::from_utf8_lossy(&decode.stderr)
        );
        // Kept when it fails, to look at.
        std::fs::remove_file(path).expect("remove the capture");
    }

    /// A tiny deterministic generator (xorshift64*), so that a failure repeats.
    pub struct Rng(pub u64);

    impl Rng {
        pub fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        pub fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// `data` in pieces of 1 to `most` bytes, as an encoder's writes might cut it.
    pub fn random_pieces<'a>(rng: &mut Rng, data: &'a [u8], most: usize) -> Vec<&'a [u8]> {
        let mut pieces = Vec::new();
        let mut rest = data;
        while !rest.is_empty() {
            let (piece, tail) = rest.split_at((1 + rng.below(most)).min(rest.len()));
            pieces.push(piece);
            rest = tail;
        }
        pieces
    }
}
