//! Entry points for the `cargo fuzz` targets in `fuzz/` (built only with `--cfg fuzzing`): each
//! feeds arbitrary bytes to one parser that faces the network or the operator, and checks the
//! properties that must hold for every input, not only that nothing panics.

use bytes::BytesMut;

use crate::chunked::ChunkedDecoder;
use crate::http::{self, MAX_HEAD_BYTES};

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
