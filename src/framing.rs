//! Picks a source's parser ([`crate::format`]) by its `Content-Type`, and runs it.

use bytes::Bytes;

use crate::format::{Event, FormatError};
use crate::{mpeg, ogg, webm};

/// Whether a stream of this `Content-Type` carries its metadata itself (Ogg comments, WebM
/// tags): ICY blocks inserted into it would corrupt it.
pub(crate) fn carries_own_metadata(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    ["ogg", "opus", "webm", "matroska"]
        .iter()
        .any(|k| essence.to_ascii_lowercase().contains(k))
}

/// The frames an MPEG `Content-Type` announces (parameters and case ignored), None for any other.
pub(crate) fn mpeg_kind(content_type: &str) -> Option<mpeg::Kind> {
    match essence(content_type).as_str() {
        "audio/mpeg" | "audio/mp3" | "audio/mpeg3" => Some(mpeg::Kind::Mp3),
        "audio/aac" | "audio/aacp" | "audio/x-aac" => Some(mpeg::Kind::Adts),
        _ => None,
    }
}

fn essence(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

/// Whether a `Content-Type` announces an Ogg stream (parameters and case ignored).
pub(crate) fn is_ogg(content_type: &str) -> bool {
    matches!(
        essence(content_type).as_str(),
        "audio/ogg" | "application/ogg" | "audio/opus" | "video/ogg" | "audio/x-ogg"
    )
}

/// Whether a `Content-Type` announces a WebM or Matroska stream (parameters and case ignored).
pub(crate) fn is_webm(content_type: &str) -> bool {
    matches!(
        essence(content_type).as_str(),
        "audio/webm" | "video/webm" | "audio/x-matroska" | "video/x-matroska"
    )
}

/// Whether a player decoding a stream of one `Content-Type` can go on decoding one of the other
/// without starting anew: the same MPEG frames, Ogg for Ogg (a player follows a new chain's
/// header pages), or else the same type. Listeners moved mid-stream (`/admin/moveclients`,
/// fallbacks) are moved only between such streams: MP3 frames followed by Ogg pages stop every
/// player.
pub(crate) fn same_format(a: &str, b: &str) -> bool {
    match (mpeg_kind(a), mpeg_kind(b)) {
        (Some(x), Some(y)) => x == y,
        (None, None) => (is_ogg(a) && is_ogg(b)) || essence(a) == essence(b),
        _ => false,
    }
}

/// One source connection's parser.
pub(crate) enum Format {
    PassThrough,
    Mpeg(mpeg::Framer),
    Ogg(ogg::Framer),
    Webm(webm::Framer),
}

impl Format {
    /// The parser for a source's `Content-Type` (parameters and case ignored).
    pub fn for_content_type(content_type: &str) -> Format {
        if let Some(kind) = mpeg_kind(content_type) {
            return Format::Mpeg(mpeg::Framer::new(kind));
        }
        if is_ogg(content_type) {
            Format::Ogg(ogg::Framer::new())
        } else if is_webm(content_type) {
            Format::Webm(webm::Framer::new())
        } else {
            Format::PassThrough
        }
    }

    /// Parses the next piece of the stream, appending what it yields to `out`.
    pub fn push(&mut self, data: Bytes, out: &mut Vec<Event>) -> Result<(), FormatError> {
        match self {
            Format::PassThrough => {
                if !data.is_empty() {
                    out.push(Event::Data {
                        bytes: data,
                        join: Some(0),
                    });
                }
                Ok(())
            }
            Format::Mpeg(f) => {
                f.push(data, out);
                Ok(())
            }
            Format::Ogg(f) => f.push(data, out),
            Format::Webm(f) => f.push(data, out),
        }
    }

    /// The source ended: whatever the parser still holds (a partial frame) goes out as it is,
    /// so that no byte the encoder sent is lost to an encoder restart.
    pub fn finish(&mut self, out: &mut Vec<Event>) {
        match self {
            Format::PassThrough => {}
            Format::Mpeg(f) => f.finish(out),
            Format::Ogg(f) => f.finish(out),
            Format::Webm(f) => f.finish(out),
        }
    }

    /// Where an Ogg stream stands for the listeners, for the next source of the mount.
    pub fn tail(&self) -> Option<ogg::Tail> {
        match self {
            Format::Ogg(f) => Some(f.tail()),
            _ => None,
        }
    }

    /// Makes this source's Ogg stream follow, for the listeners, the one that left at `tail`:
    /// its first chain ends the old streams and takes serials of its own
    /// ([`ogg::Framer::following`]).
    pub fn follow(&mut self, tail: ogg::Tail) {
        if let Format::Ogg(f) = self {
            *f = ogg::Framer::following(tail);
        }
    }

    /// What the stream turned out to be, for status pages (`MP3`, `AAC`, `Vorbis`, `Opus`,
    /// `FLAC`, `Speex`, `Theora`, several joined with `/`); None until known.
    pub fn subtype(&self) -> Option<String> {
        match self {
            Format::PassThrough => None,
            Format::Mpeg(f) => f.subtype(),
            Format::Ogg(f) => f.subtype(),
            Format::Webm(f) => f.subtype(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webm_and_matroska_are_framed_and_get_no_icy_blocks() {
        for t in [
            "audio/webm",
            "video/webm; codecs=\"vp8, opus\"",
            "Audio/X-Matroska",
            "video/x-matroska",
        ] {
            assert!(
                matches!(Format::for_content_type(t), Format::Webm(_)),
                "{t}"
            );
            assert!(carries_own_metadata(t), "{t}");
        }
        assert!(matches!(
            Format::for_content_type("audio/flac"),
            Format::PassThrough
        ));
    }

    #[test]
    fn listeners_move_only_between_streams_a_player_can_go_on_decoding() {
        assert!(same_format("audio/mpeg", "audio/mp3; charset=x"));
        assert!(same_format("audio/ogg", "application/ogg"));
        assert!(same_format("audio/aac", "audio/aacp"));
        assert!(same_format("audio/webm", "Audio/WebM"));
        assert!(!same_format("audio/mpeg", "audio/ogg"));
        assert!(!same_format("audio/mpeg", "audio/aac"));
        assert!(!same_format("audio/ogg", "audio/webm"));
        assert!(!same_format("audio/webm", "audio/flac"));
    }
}
