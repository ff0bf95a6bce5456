//! ICY listeners: a player's view of a stream with metadata blocks (`Icy-MetaData: 1`).
//!
//! After every `icy-metaint` bytes of audio comes one block: a length byte L, then 16·L bytes of
//! `StreamTitle='...';` padded with zeros (L = 0 when the title did not change). [`IcyParser`]
//! splits what a listener receives exactly there, as a player does, hands the audio to the
//! listener's [`Verifier`] (so the audio between blocks is checked byte for byte like a plain
//! listener's) and counts blocks, titles and framing errors. A block out of place shows twice:
//! audio read as a block (a framing error, or a length that swallows audio) and block bytes read
//! as audio (corruption found by the verifier).
//!
//! Per byte it costs the plain listener's work plus a compare per read; a block's text is kept
//! only while it is being read.

use crate::record::Verifier;

/// Which listeners ask for ICY: listener `index` (over all processes) takes mount
/// `index % mounts`, and a share `share` of each mount's listeners, spread evenly, are ICY.
pub fn is_icy(index: usize, mounts: usize, share: f64) -> bool {
    if share <= 0.0 {
        return false;
    }
    if share >= 1.0 {
        return true;
    }
    let k = (index / mounts.max(1)) as f64;
    ((k + 1.0) * share).floor() > (k * share).floor()
}

/// The `icy-metaint` of a response head, if it has one.
pub fn metaint_of(head: &str) -> Option<usize> {
    head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("icy-metaint")
            .then(|| value.trim().parse().ok())?
    })
}

/// What one ICY listener saw, summed over listeners in reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IcyCounts {
    /// Blocks read, empty ones included.
    pub blocks: u64,
    /// Blocks with a title (non-empty).
    pub titles: u64,
    /// Blocks that are not `StreamTitle='...';` padded with fewer than 16 zeros, and ICY
    /// response heads without the `icy-metaint` asked for.
    pub framing_errors: u64,
}

impl IcyCounts {
    pub fn add(&mut self, o: &IcyCounts) {
        self.blocks += o.blocks;
        self.titles += o.titles;
        self.framing_errors += o.framing_errors;
    }
}

#[derive(Debug)]
enum State {
    /// Audio: this many bytes before the next block.
    Audio(usize),
    /// The block's length byte is next.
    Length,
    /// Inside a block's text: this many bytes still to come.
    Text(usize),
}

/// One ICY listener's framing, from its first body byte on.
#[derive(Debug)]
pub struct IcyParser {
    metaint: usize,
    state: State,
    /// The block being read (non-empty blocks only).
    text: Vec<u8>,
    pub counts: IcyCounts,
}

impl IcyParser {
    pub fn new(metaint: usize) -> Self {
        IcyParser {
            metaint: metaint.max(1),
            state: State::Audio(metaint.max(1)),
            text: Vec::new(),
            counts: IcyCounts::default(),
        }
    }

    /// Splits the next received bytes: audio to `verifier` (with `on_record` as in
    /// [`Verifier::feed`]), blocks checked and counted.
    pub fn feed(&mut self, mut data: &[u8], verifier: &mut Verifier, f: &mut impl FnMut(u64)) {
        while !data.is_empty() {
            match self.state {
                State::Audio(left) => {
                    let take = left.min(data.len());
                    verifier.feed(&data[..take], f);
                    data = &data[take..];
                    self.state = if take == left {
                        State::Length
                    } else {
                        State::Audio(left - take)
                    };
                }
                State::Length => {
                    let len = data[0] as usize * 16;
                    data = &data[1..];
                    if len == 0 {
                        self.counts.blocks += 1;
                        self.state = State::Audio(self.metaint);
                    } else {
                        self.text.clear();
                        self.state = State::Text(len);
                    }
                }
                State::Text(left) => {
                    let take = left.min(data.len());
                    self.text.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if take == left {
                        self.end_block();
                    } else {
                        self.state = State::Text(left - take);
                    }
                }
            }
        }
    }

    fn end_block(&mut self) {
        self.counts.blocks += 1;
        self.counts.titles += 1;
        if !valid_block(&self.text) {
            self.counts.framing_errors += 1;
        }
        self.text.clear();
        if self.text.capacity() > 256 {
            // A long block is rare: do not keep its memory for every listener.
            self.text.shrink_to(64);
        }
        self.state = State::Audio(self.metaint);
    }
}

/// `StreamTitle='...';` (other fields may follow, each `Name='...';`), valid UTF-8, then fewer
/// than 16 zeros of padding and nothing else.
fn valid_block(text: &[u8]) -> bool {
    let end = text.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
    let (body, pad) = text.split_at(end);
    pad.len() < 16
        && !body.contains(&0)
        && std::str::from_utf8(body)
            .is_ok_and(|s| s.starts_with("StreamTitle='") && s.ends_with("';"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Errors, Generator};

    /// A block as the server lays it out.
    fn block(text: &str) -> Vec<u8> {
        let units = text.len().div_ceil(16);
        let mut b = vec![units as u8];
        b.extend_from_slice(text.as_bytes());
        b.resize(1 + units * 16, 0);
        b
    }

    /// The stream with a block after every `metaint` bytes: `blocks[i]` after the i-th interval,
    /// an empty block when there are no more.
    fn framed(stream: &[u8], metaint: usize, blocks: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, chunk) in stream.chunks(metaint).enumerate() {
            out.extend_from_slice(chunk);
            if chunk.len() == metaint {
                out.extend_from_slice(blocks.get(i).map_or(&[0u8][..], |b| b));
            }
        }
        out
    }

    fn stream(records: usize) -> Vec<u8> {
        let mut g = Generator::default();
        (0..records).flat_map(|i| g.piece(1, i as u64)).collect()
    }

    fn parse(data: &[u8], metaint: usize, piece: usize) -> (IcyParser, Verifier) {
        let mut p = IcyParser::new(metaint);
        let mut v = Verifier::default();
        for c in data.chunks(piece) {
            p.feed(c, &mut v, &mut |_| {});
        }
        (p, v)
    }

    #[test]
    fn blocks_are_stripped_and_the_audio_verifies_at_any_split() {
        let s = stream(100);
        let blocks = vec![
            block("StreamTitle='one';"),
            vec![0],
            block("StreamTitle='a title of thirty-two bytes!!!';"),
        ];
        let data = framed(&s, 1000, &blocks);
        for piece in [1, 2, 7, 63, 64, 65, 999, 1000, 1001, 4096, 1 << 20] {
            let (p, v) = parse(&data, 1000, piece);
            assert_eq!(v.errors, Errors::default(), "pieces of {piece}");
            assert_eq!(v.delivered_bytes(), s.len() as u64, "pieces of {piece}");
            assert_eq!(
                p.counts,
                IcyCounts {
                    blocks: 6,
                    titles: 2,
                    framing_errors: 0
                },
                "pieces of {piece}"
            );
        }
    }

    #[test]
    fn a_block_out_of_place_is_caught() {
        let s = stream(100);
        let good = framed(&s, 1000, &[block("StreamTitle='one';")]);
        // The block one byte late: the byte before it is read as the length byte.
        let mut late = good.clone();
        late.swap(1000, 999);
        let (p, v) = parse(&late, 1000, 333);
        assert!(
            v.errors.total() + p.counts.framing_errors > 0,
            "{:?} {:?}",
            v.errors,
            p.counts
        );
        // A block missing: audio read as a block.
        let mut missing = s[..1000].to_vec();
        missing.extend_from_slice(&s[1000..]);
        let (p, v) = parse(&missing, 1000, 4096);
        assert!(v.errors.total() + p.counts.framing_errors > 0);
    }

    #[test]
    fn a_block_that_is_not_a_title_is_a_framing_error() {
        let s = stream(40);
        for bad in [block("StreamTitle='unterminated"), block("Title='x';"), {
            // Padding of a whole unit or more.
            let mut b = block("StreamTitle='x';");
            b[0] += 1;
            b.extend_from_slice(&[0; 16]);
            b
        }] {
            let (p, v) = parse(&framed(&s, 1000, &[bad]), 1000, 500);
            assert_eq!(p.counts.framing_errors, 1);
            assert_eq!(v.errors, Errors::default());
        }
    }

    #[test]
    fn the_share_of_icy_listeners_is_spread_over_each_mount() {
        let icy = |n: usize, mounts: usize, share: f64| -> Vec<usize> {
            (0..mounts)
                .map(|m| {
                    (0..n)
                        .filter(|i| i % mounts == m && is_icy(*i, mounts, share))
                        .count()
                })
                .collect()
        };
        assert_eq!(icy(100, 1, 0.0), [0]);
        assert_eq!(icy(100, 1, 1.0), [100]);
        assert_eq!(icy(100, 1, 0.25), [25]);
        assert_eq!(icy(100, 2, 0.5), [25, 25]);
        assert_eq!(icy(90, 3, 1.0 / 3.0), [10, 10, 10]);
    }

    #[test]
    fn reads_the_metaint_of_a_head() {
        let head = "HTTP/1.0 200 OK\r\nContent-Type: audio/mpeg\r\nICY-MetaInt: 8192\r\n";
        assert_eq!(metaint_of(head), Some(8192));
        assert_eq!(metaint_of("HTTP/1.0 200 OK\r\n"), None);
    }
}
