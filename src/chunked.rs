//! A streaming decoder for `Transfer-Encoding: chunked` source bodies (liquidsoap's chunked mode).
//!
//! Bytes arrive in arbitrary pieces; the decoder keeps its place between calls and appends only
//! payload to the output, so the stream's bytes reach the store exactly as the encoder meant them.

use bytes::BytesMut;

/// Largest chunk size accepted: far above any encoder's, small enough that a hostile size line
/// cannot make us wait on gigabytes.
const MAX_CHUNK_BYTES: u64 = 16 * 1024 * 1024;
/// Most hex digits in a size line: enough for any size with leading zeros, and a bound on how long
/// a line of zeros may run on.
const MAX_SIZE_DIGITS: u8 = 16;
/// Longest chunk extension or trailer line tolerated.
const MAX_LINE_BYTES: usize = 4096;

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ChunkedError {
    /// A size line that is not hexadecimal, or data not followed by CRLF.
    BadFraming,
    /// A chunk larger than [`MAX_CHUNK_BYTES`].
    ChunkTooLarge,
}

impl ChunkedError {
    pub fn reason(&self) -> &'static str {
        match self {
            ChunkedError::BadFraming => "bad_chunk_framing",
            ChunkedError::ChunkTooLarge => "chunk_too_large",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Size { value: u64, digits: u8 },
    Extension { value: u64, len: usize },
    SizeLf { value: u64 },
    Data { left: u64 },
    DataCr,
    DataLf,
    TrailerStart,
    TrailerLine { len: usize },
    TrailerEndLf,
    Done,
}

#[derive(Debug)]
pub(crate) struct ChunkedDecoder {
    state: State,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        ChunkedDecoder {
            state: State::Size {
                value: 0,
                digits: 0,
            },
        }
    }
}

impl ChunkedDecoder {
    /// True once the terminating zero-size chunk and its trailer were read.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Decodes `input`, appending payload bytes to `out`.
    pub fn decode(&mut self, mut input: &[u8], out: &mut BytesMut) -> Result<(), ChunkedError> {
        while !input.is_empty() {
            if let State::Data { left } = self.state {
                let n = (left.min(input.len() as u64)) as usize;
                out.extend_from_slice(&input[..n]);
                input = &input[n..];
                self.state = if left == n as u64 {
                    State::DataCr
                } else {
                    State::Data {
                        left: left - n as u64,
                    }
                };
                continue;
            }
            let b = input[0];
            input = &input[1..];
            self.state = self.step(b)?;
        }
        Ok(())
    }

    fn step(&self, b: u8) -> Result<State, ChunkedError> {
        use State::*;
        Ok(match self.state {
            Size { value, digits } => match b {
                b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' if digits < MAX_SIZE_DIGITS => {
                    let d = (b as char).to_digit(16).unwrap_or(0) as u64;
                    let value = value * 16 + d;
                    if value > MAX_CHUNK_BYTES {
                        return Err(ChunkedError::ChunkTooLarge);
                    }
                    Size {
                        value,
                        digits: digits + 1,
                    }
                }
                b';' | b' ' | b'\t' if digits > 0 => Extension { value, len: 0 },
                b'\r' if digits > 0 => SizeLf { value },
                b'\n' if digits > 0 => after_size(value),
                _ => return Err(ChunkedError::BadFraming),
            },
            Extension { value, len } => match b {
                b'\r' => SizeLf { value },
                b'\n' => after_size(value),
                _ if len >= MAX_LINE_BYTES => return Err(ChunkedError::BadFraming),
                _ => Extension {
                    value,
                    len: len + 1,
                },
            },
            SizeLf { value } => match b {
                b'\n' => after_size(value),
                _ => return Err(ChunkedError::BadFraming),
            },
            DataCr => match b {
                b'\r' => DataLf,
                b'\n' => Size {
                    value: 0,
                    digits: 0,
                },
                _ => return Err(ChunkedError::BadFraming),
            },
            DataLf => match b {
                b'\n' => Size {
                    value: 0,
                    digits: 0,
                },
                _ => return Err(ChunkedError::BadFraming),
            },
            TrailerStart => match b {
                b'\r' => TrailerEndLf,
                b'\n' => Done,
                _ => TrailerLine { len: 1 },
            },
            TrailerLine { len } => match b {
                b'\n' => TrailerStart,
                _ if len >= MAX_LINE_BYTES => return Err(ChunkedError::BadFraming),
                _ => TrailerLine { len: len + 1 },
            },
            TrailerEndLf => match b {
                b'\n' => Done,
                _ => return Err(ChunkedError::BadFraming),
            },
            // Bytes after the last chunk belong to no stream: ignore them.
            Done => Done,
            Data { .. } => unreachable!("data is consumed in bulk by decode"),
        })
    }
}

fn after_size(value: u64) -> State {
    if value == 0 {
        State::TrailerStart
    } else {
        State::Data { left: value }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_in_pieces(input: &[u8], piece: usize) -> Result<(Vec<u8>, bool), ChunkedError> {
        let mut d = ChunkedDecoder::default();
        let mut out = BytesMut::new();
        for p in input.chunks(piece.max(1)) {
            d.decode(p, &mut out)?;
        }
        Ok((out.to_vec(), d.is_done()))
    }

    #[test]
    fn decodes_whatever_the_split() {
        let body = b"5\r\nhello\r\n1;ext=1\r\n \r\nA\r\n0123456789\r\n0\r\nX-Trailer: 1\r\n\r\n";
        for piece in 1..body.len() {
            let (out, done) = decode_in_pieces(body, piece).unwrap();
            assert_eq!(out, b"hello 0123456789", "piece {piece}");
            assert!(done);
        }
    }

    #[test]
    fn accepts_bare_lf() {
        let (out, done) = decode_in_pieces(b"3\nabc\n0\n\n", 100).unwrap();
        assert_eq!(out, b"abc");
        assert!(done);
    }

    #[test]
    fn open_stream_is_not_done() {
        let (out, done) = decode_in_pieces(b"3\r\nabc\r\n4\r\nde", 2).unwrap();
        assert_eq!(out, b"abcde");
        assert!(!done);
    }

    #[test]
    fn rejects_bad_framing() {
        for bad in [&b"zz\r\n"[..], b"\r\n", b"3\r\nabcX", b"3\rX", b"-1\r\n"] {
            assert_eq!(
                decode_in_pieces(bad, 100).unwrap_err(),
                ChunkedError::BadFraming,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn an_endless_run_of_zeros_in_a_size_is_refused_not_counted_past_its_bound() {
        let mut size = vec![b'0'; 300];
        size.extend_from_slice(b"5\r\nhello\r\n");
        assert_eq!(
            decode_in_pieces(&size, 7).unwrap_err(),
            ChunkedError::BadFraming
        );
        let (out, _) = decode_in_pieces(b"00005\r\nhello\r\n", 3).unwrap();
        assert_eq!(out, b"hello");
    }

    #[test]
    fn rejects_absurd_sizes() {
        assert_eq!(
            decode_in_pieces(b"FFFFFFFFFFFFFFFFFFFF\r\n", 100).unwrap_err(),
            ChunkedError::ChunkTooLarge
        );
    }
}
