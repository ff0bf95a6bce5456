//! Entry points for the `cargo fuzz` targets in `fuzz/` (built only with `--cfg fuzzing`): each
//! feeds arbitrary bytes to one parser that faces the network or the operator, and checks the
//! properties that must hold for every input, not only that nothing panics.

use bytes::{Bytes, BytesMut};

use crate::chunked::ChunkedDecoder;
use crate::format::Event;
use crate::http::{self, MAX_HEAD_BYTES};
use crate::webm;

/// The request-head parser: a complete head parses the same from exactly its own bytes, lies
/// within the head limit, and its path and credentials can be inspected without panicking.
pub fn request_head(data: &[u8]) {
    let Ok(Some((req, n))) = http::parse_head(data) else {
        return;
    };
    assert!(n <= data.len() && n <= MAX_HEAD_BYTES, "head length {n}");
    let (again, m) = http::parse_head(&data[..n])
        .expect("a complete head parses from its own bytes")
        .expect("a complete head is complete on its own");
    assert_eq!((m, &again.path, &again.method), (n, &req.path, &req.method));
    let _ = http::valid_mount_path(&req.path);
    let _ = req.basic_auth();
}

/// The chunked decoder: the first byte picks where the rest is split; decoding it in two pieces
/// must give the same payload and the same verdict as decoding it whole, since sources deliver
/// bytes in arbitrary pieces.
pub fn chunked(data: &[u8]) {
    let Some((&split, body)) = data.split_first() else {
        return;
    };
    let mut whole = ChunkedDecoder::default();
    let mut out_whole = BytesMut::new();
    let res_whole = whole.decode(body, &mut out_whole);

    let at = usize::from(split).min(body.len());
    let mut pieces = ChunkedDecoder::default();
    let mut out_pieces = BytesMut::new();
    let res_pieces = pieces
        .decode(&body[..at], &mut out_pieces)
        .and_then(|()| pieces.decode(&body[at..], &mut out_pieces));
    assert_eq!(res_whole, res_pieces, "verdict depends on how bytes arrive");
    if res_whole.is_ok() {
        assert_eq!(out_whole, out_pieces, "payload depends on how bytes arrive");
        assert_eq!(whole.is_done(), pieces.is_done());
        assert!(
            out_whole.len() <= body.len(),
            "payload larger than its encoding"
        );
    }
}

/// The config parser: any text either parses or is refused with a message, and a parsed config
/// can be validated without panicking.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match crate::config::Config::from_toml(text) {
        Ok(cfg) => {
            let _ = cfg.validate();
        }
        Err(msg) => assert!(!msg.is_empty(), "a refusal must say why"),
    }
}

/// The WebM framer: the first byte picks where the rest is split. Whole or in two pieces, every
/// byte passes, in order, and the verdict, the header sets and (from the first header set on,
/// before which each piece of a stream that is not WebM is a join point) the join points are the
/// same, since sources deliver bytes in arbitrary pieces. The HLS segmenter's reading of the
/// same bytes finds the same audio track and packets either way, and it segments them without
/// panicking.
pub fn webm(data: &[u8]) {
    let Some((&split, body)) = data.split_first() else {
        return;
    };
    let at = (usize::from(split) * 64).min(body.len());
    let whole = frame_webm(&[body]);
    let pieces = frame_webm(&[&body[..at], &body[at..]]);
    assert_eq!(whole.0, pieces.0, "verdict depends on how bytes arrive");
    if whole.0.is_ok() {
        assert_eq!(whole.1, body, "bytes lost or changed");
        assert_eq!(pieces.1, body, "bytes lost or changed");
        assert_eq!(whole.2, pieces.2, "header sets depend on how bytes arrive");
        let from = whole.2.first().map_or(usize::MAX, |(offset, _)| *offset);
        let after = |joins: &[usize]| -> Vec<usize> {
            joins.iter().copied().filter(|&j| j >= from).collect()
        };
        assert_eq!(
            after(&whole.3),
            after(&pieces.3),
            "join points depend on how bytes arrive"
        );
    }
    assert_eq!(
        webm_blocks(&[body]),
        webm_blocks(&[&body[..at], &body[at..]]),
        "the audio track's packets depend on how bytes arrive"
    );
    segment_webm(&[&body[..at], &body[at..]]);
}

/// What the HLS segmenter's WebM reader finds in `pieces`.
fn webm_blocks(pieces: &[&[u8]]) -> Vec<crate::webm_blocks::Item> {
    let mut blocks = crate::webm_blocks::Blocks::new();
    let mut items = Vec::new();
    for piece in pieces {
        blocks.push(&Bytes::copy_from_slice(piece), &mut items);
    }
    items
}

/// The HLS segmenter on a WebM source: it cuts whatever `pieces` hold without panicking (short
/// segments, so that fuzzed inputs make some), and its window renders.
fn segment_webm(pieces: &[&[u8]]) {
    use crate::hls::{Params, Segmenter, Source, Title};
    let params = Params {
        segment_secs: 1,
        segments: 3,
    };
    let title = Title {
        version: 0,
        title: Some("t"),
        artist: None,
    };
    let mut segmenter = Segmenter::new(params);
    segmenter.start_source(Some(Source::Webm));
    for piece in pieces {
        segmenter.push(&Bytes::copy_from_slice(piece), false, params, title);
    }
    segmenter.end_source();
    let _ = segmenter.window();
}

/// Frames `pieces` and ends the source: the verdict, the bytes passed, the header sets (each
/// with the stream offset it came at) and the join points.
#[allow(clippy::type_complexity)]
fn frame_webm(
    pieces: &[&[u8]],
) -> (
    Result<(), crate::format::FormatError>,
    Vec<u8>,
    Vec<(usize, Bytes)>,
    Vec<usize>,
) {
    let mut framer = webm::Framer::new();
    let mut events = Vec::new();
    let mut verdict = Ok(());
    for piece in pieces {
        verdict = framer.push(Bytes::copy_from_slice(piece), &mut events);
        if verdict.is_err() {
            break;
        }
    }
    framer.finish(&mut events);
    let _ = framer.subtype();
    let (mut data, mut headers, mut joins) = (Vec::new(), Vec::new(), Vec::new());
    for e in events {
        match e {
            Event::Data { bytes, join } => {
                joins.extend(join.map(|k| data.len() + k));
                data.extend_from_slice(&bytes);
            }
            Event::Headers(h) => headers.push((data.len(), h)),
            Event::Tags { .. } | Event::Unsynced { .. } => {}
        }
    }
    (verdict, data, headers, joins)
}
