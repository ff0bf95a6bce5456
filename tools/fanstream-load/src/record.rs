//! The stream the load source sends, and the verifier each listener runs on it.
//!
//! The stream is a sequence of fixed-size records, record `n` at absolute offset `n * 64`:
//!
//! ```text
//! [0..8)   n (little-endian)          the counter: a record's place in the stream
//! [8..16)  send time, unix µs          when the source sent it: end-to-end latency
//! [16..24) n ^ time ^ KEY              a check that makes a record recognisable anywhere
//! [24..64) FILLER                      fixed bytes: corruption anywhere in a record is seen
//! ```
//!
//! It is labelled `audio/mpeg`, and it is MPEG as far as a server's framer looks: every sixth
//! record's filler starts with an MPEG-1 Layer III frame header (128 kbit/s, 48 kHz, 384 bytes,
//! six records), so frame headers follow one another every 384 bytes from offset 24, and
//! fanstream's MP3 framer locks on the stream as on an encoder's. A stream it never locked on
//! would keep every source's framer searching, with the memory and work of a lookback that
//! real streams do not cost (`fanstream_source_unsynced_bytes_total` says which it was). The
//! frame's audio is not audio: a decoder would find nothing to play, and no load run plays it.
//!
//! A listener joins at any byte (fanstream at a chunk boundary, Icecast wherever its burst
//! starts): the verifier searches for the first valid record, checks the bytes before it against
//! the tail of the record they belong to, and from then on knows the offset of every byte. A
//! record that is valid but carries the wrong counter is a gap (counter ahead) or a duplicate
//! (behind); an invalid one starts a new search, and where the stream is found again tells a gap,
//! a duplicate or corruption apart. Bytes are compared in whole records, so the per-byte work is a
//! 40-byte `memcmp` and two integer compares per 64 bytes.

pub const RECORD_BYTES: usize = 64;
const RECORD: u64 = RECORD_BYTES as u64;
const KEY: u64 = 0x9E37_79B9_7F4A_7C15;
const FILLER_AT: usize = 24;
const FILLER: [u8; RECORD_BYTES - FILLER_AT] = filler();
/// An MPEG-1 Layer III frame header: 128 kbit/s, 48 kHz, no padding, joint stereo; its frame is
/// 144 × 128,000 / 48,000 = 384 bytes.
const FRAME_HEADER: [u8; 4] = [0xFF, 0xFB, 0x94, 0x64];
/// Records in one frame.
const RECORDS_PER_FRAME: u64 = 6;
/// The filler of the records that start a frame: the header, then the filler's other bytes.
const FRAME_FILLER: [u8; RECORD_BYTES - FILLER_AT] = frame_filler();
/// A search keeps this much: enough to try every start within one record.
const SEARCH_BYTES: usize = 2 * RECORD_BYTES;

const fn filler() -> [u8; RECORD_BYTES - FILLER_AT] {
    let mut f = [0u8; RECORD_BYTES - FILLER_AT];
    let mut i = 0;
    while i < f.len() {
        f[i] = b'A' + (i % 26) as u8;
        i += 1;
    }
    f
}

const fn frame_filler() -> [u8; RECORD_BYTES - FILLER_AT] {
    let mut f = filler();
    let mut i = 0;
    while i < FRAME_HEADER.len() {
        f[i] = FRAME_HEADER[i];
        i += 1;
    }
    f
}

/// Record `n`'s filler.
fn filler_of(n: u64) -> &'static [u8; RECORD_BYTES - FILLER_AT] {
    if n.is_multiple_of(RECORDS_PER_FRAME) {
        &FRAME_FILLER
    } else {
        &FILLER
    }
}

/// Writes record `n` sent at `sent_us` into `out`.
pub fn encode(n: u64, sent_us: u64, out: &mut [u8]) {
    out[0..8].copy_from_slice(&n.to_le_bytes());
    out[8..16].copy_from_slice(&sent_us.to_le_bytes());
    out[16..24].copy_from_slice(&(n ^ sent_us ^ KEY).to_le_bytes());
    out[FILLER_AT..RECORD_BYTES].copy_from_slice(filler_of(n));
}

/// The (counter, send time) of a valid record, or None.
fn decode(rec: &[u8]) -> Option<(u64, u64)> {
    let word = |i: usize| u64::from_le_bytes(rec[i..i + 8].try_into().expect("8 bytes"));
    let (n, sent) = (word(0), word(8));
    (word(16) == n ^ sent ^ KEY && rec[FILLER_AT..RECORD_BYTES] == filler_of(n)[..])
        .then_some((n, sent))
}

/// Produces the source's stream, a whole number of records at a time.
#[derive(Default)]
pub struct Generator {
    next: u64,
}

impl Generator {
    /// The next `records` records, stamped `sent_us`.
    pub fn piece(&mut self, records: usize, sent_us: u64) -> Vec<u8> {
        let mut out = vec![0u8; records * RECORD_BYTES];
        for rec in out.chunks_exact_mut(RECORD_BYTES) {
            encode(self.next, sent_us, rec);
            self.next += 1;
        }
        out
    }

    /// Bytes produced so far.
    pub fn offset(&self) -> u64 {
        self.next * RECORD
    }
}

/// Integrity errors seen by one listener, each counted once per incident.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Errors {
    /// The stream jumped ahead: bytes were lost.
    pub gaps: u64,
    pub gap_bytes: u64,
    /// The stream went back: bytes were sent twice.
    pub duplicates: u64,
    /// Bytes that are not the stream (or a join that did not line up).
    pub corrupt: u64,
}

impl Errors {
    pub fn total(&self) -> u64 {
        self.gaps + self.duplicates + self.corrupt
    }

    pub fn add(&mut self, o: &Errors) {
        self.gaps += o.gaps;
        self.gap_bytes += o.gap_bytes;
        self.duplicates += o.duplicates;
        self.corrupt += o.corrupt;
    }
}

/// Verifies one listener's stream from its first byte on.
#[derive(Default)]
pub struct Verifier {
    /// Locked on: the offset of the record being assembled in `carry`. None while searching.
    next: Option<u64>,
    /// While searching after an error: the offset `carry[0]` should have had.
    expected: Option<u64>,
    /// A partial record (locked) or the bytes being searched.
    carry: Vec<u8>,
    /// Offset of the listener's first byte, known once locked.
    joined_at: Option<u64>,
    /// One past the furthest byte verified.
    furthest: u64,
    /// Junk came before the first record (counted once).
    join_junk: bool,
    pub errors: Errors,
}

impl Verifier {
    /// Checks the next bytes of the stream; `on_record` is given the send time of each record
    /// they complete (for the end-to-end latency of every byte).
    pub fn feed(&mut self, data: &[u8], on_record: &mut impl FnMut(u64)) {
        self.check_bytes(data, on_record);
    }

    fn check_bytes(&mut self, mut data: &[u8], f: &mut impl FnMut(u64)) {
        while !data.is_empty() {
            let Some(next) = self.next else {
                let take = data.len().min(SEARCH_BYTES - self.carry.len());
                self.carry.extend_from_slice(&data[..take]);
                data = &data[take..];
                self.search(f);
                continue;
            };
            if self.carry.is_empty() && data.len() >= RECORD_BYTES {
                // The common case: a whole record in place, no copy.
                let (rec, rest) = data.split_at(RECORD_BYTES);
                data = rest;
                self.check(next, rec, f);
            } else {
                let take = data.len().min(RECORD_BYTES - self.carry.len());
                self.carry.extend_from_slice(&data[..take]);
                data = &data[take..];
                if self.carry.len() == RECORD_BYTES {
                    let rec = std::mem::take(&mut self.carry);
                    self.check(next, &rec, f);
                    if self.next.is_some() {
                        self.carry = rec;
                        self.carry.clear();
                    }
                }
            }
        }
    }

    /// Where the listener joined, once known.
    pub fn joined_at(&self) -> Option<u64> {
        self.joined_at
    }

    /// Stream bytes received from the join point, less what was lost in gaps.
    pub fn delivered_bytes(&self) -> u64 {
        self.joined_at.map_or(0, |j| {
            self.furthest
                .saturating_sub(j)
                .saturating_sub(self.errors.gap_bytes)
        })
    }

    fn check(&mut self, at: u64, rec: &[u8], f: &mut impl FnMut(u64)) {
        let want = at / RECORD;
        match decode(rec) {
            Some((n, sent)) => {
                if n > want {
                    self.errors.gaps += 1;
                    self.errors.gap_bytes += (n - want) * RECORD;
                } else if n < want {
                    self.errors.duplicates += 1;
                }
                self.accept(n, sent, f);
            }
            None => {
                self.next = None;
                self.expected = Some(at);
                self.carry.clear();
                self.carry.extend_from_slice(rec);
                self.search(f);
            }
        }
    }

    /// Record `n` was good: the stream goes on after it.
    fn accept(&mut self, n: u64, sent: u64, f: &mut impl FnMut(u64)) {
        let end = (n + 1) * RECORD;
        self.next = Some(end);
        self.furthest = self.furthest.max(end);
        f(sent);
    }

    /// Looks for a valid record in `carry`; on finding one, locks on and replays what follows it.
    fn search(&mut self, f: &mut impl FnMut(u64)) {
        let found = (0..=self.carry.len().saturating_sub(RECORD_BYTES))
            .filter(|_| self.carry.len() >= RECORD_BYTES)
            .find_map(|p| decode(&self.carry[p..p + RECORD_BYTES]).map(|r| (p, r)));
        let Some((p, (n, sent))) = found else {
            if self.carry.len() == SEARCH_BYTES {
                // No record starts in the first half: those bytes are not the stream.
                self.carry.drain(..RECORD_BYTES);
                match &mut self.expected {
                    Some(e) => *e += RECORD,
                    None if !self.join_junk => {
                        self.join_junk = true;
                        self.errors.corrupt += 1;
                    }
                    None => {}
                }
            }
            return;
        };
        let at = n * RECORD;
        match self.expected.take() {
            Some(e) => {
                let e = e + p as u64;
                if at > e {
                    self.errors.gaps += 1;
                    self.errors.gap_bytes += at - e;
                } else if at < e {
                    self.errors.duplicates += 1;
                } else {
                    self.errors.corrupt += 1;
                }
            }
            None if self.joined_at.is_none() => {
                // Junk is not the stream: the listener's stream starts at the record found.
                let joined = if self.join_junk {
                    at
                } else {
                    at.saturating_sub(p as u64)
                };
                self.joined_at = Some(joined);
                self.furthest = joined;
                if p > 0 && !self.join_junk && !tail_matches(n, &self.carry[..p]) {
                    self.errors.corrupt += 1;
                }
            }
            // Junk was already counted when it was dropped.
            None => {}
        }
        self.accept(n, sent, f);
        let rest = self.carry.split_off(p + RECORD_BYTES);
        self.carry.clear();
        self.check_bytes(&rest, f);
    }
}

/// Whether `tail` matches the end of record `n - 1` wherever its bytes are known without its
/// send time (the counter and the filler).
fn tail_matches(n: u64, tail: &[u8]) -> bool {
    if n == 0 || tail.len() > RECORD_BYTES {
        return false;
    }
    let counter = (n - 1).to_le_bytes();
    let filler = filler_of(n - 1);
    let from = RECORD_BYTES - tail.len();
    tail.iter().enumerate().all(|(i, &b)| match from + i {
        q if q < 8 => b == counter[q],
        q if q < FILLER_AT => true,
        q => b == filler[q - FILLER_AT],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(records: u64) -> Vec<u8> {
        let mut g = Generator::default();
        (0..records).flat_map(|i| g.piece(1, 1_000 + i)).collect()
    }

    fn verify(parts: &[&[u8]]) -> Verifier {
        let mut v = Verifier::default();
        for p in parts {
            v.feed(p, &mut |_| {});
        }
        v
    }

    fn feed_in_pieces(data: &[u8], piece: usize) -> Verifier {
        let mut v = Verifier::default();
        for c in data.chunks(piece) {
            v.feed(c, &mut |_| {});
        }
        v
    }

    #[test]
    fn a_clean_stream_verifies_from_any_join_point_at_any_split() {
        let s = stream(40);
        for join in [0, 1, 7, 16, 23, 24, 63, 64, 65, 100, 640] {
            for piece in [1, 2, 3, 5, 31, 63, 64, 65, 100, 127, 320, 4096] {
                let v = feed_in_pieces(&s[join..], piece);
                assert_eq!(
                    v.errors,
                    Errors::default(),
                    "join {join}, pieces of {piece}"
                );
                assert_eq!(v.joined_at(), Some(join as u64), "join {join}");
                assert_eq!(
                    v.delivered_bytes(),
                    (s.len() - join) as u64,
                    "join {join}, pieces of {piece}"
                );
            }
        }
    }

    #[test]
    fn frame_headers_follow_one_another_every_384_bytes_and_a_join_at_one_verifies() {
        let s = stream(60);
        let frame = (RECORDS_PER_FRAME as usize) * RECORD_BYTES;
        assert_eq!(
            frame, 384,
            "the header's bitrate and rate make 384-byte frames"
        );
        let headers: Vec<usize> = (0..s.len() - 3)
            .filter(|&i| s[i] == 0xFF && s[i + 1] & 0xE0 == 0xE0)
            .collect();
        let expected: Vec<usize> = (FILLER_AT..s.len()).step_by(frame).collect();
        assert_eq!(
            headers, expected,
            "a frame sync at every frame start and nowhere else"
        );
        for join in expected {
            let v = feed_in_pieces(&s[join..], 320);
            assert_eq!(v.errors, Errors::default(), "join at frame start {join}");
            assert_eq!(v.joined_at(), Some(join as u64));
        }
    }

    #[test]
    fn a_clean_stream_verifies_split_at_every_position() {
        let s = stream(6);
        for cut in 0..s.len() {
            let v = verify(&[&s[..cut], &s[cut..]]);
            assert_eq!(v.errors, Errors::default(), "cut at {cut}");
            assert_eq!(v.delivered_bytes(), s.len() as u64);
        }
    }

    #[test]
    fn a_gap_is_caught_aligned_or_not() {
        let s = stream(40);
        for (from, len) in [(640, 64), (640, 320), (650, 100), (700, 1), (1000, 33)] {
            for piece in [1, 50, 320, 4096] {
                let mut cut = s[..from].to_vec();
                cut.extend_from_slice(&s[from + len..]);
                let v = feed_in_pieces(&cut, piece);
                assert_eq!(
                    v.errors.gaps, 1,
                    "gap of {len} at {from}, pieces of {piece}"
                );
                assert_eq!(v.errors.duplicates + v.errors.corrupt, 0);
                assert!(v.errors.gap_bytes >= len as u64);
                let mut sent = vec![];
                Verifier::default().feed(&s[100..256], &mut |t| sent.push(t));
                assert_eq!(sent, [1_002, 1_003]);
            }
        }
    }

    #[test]
    fn a_duplicate_is_caught_aligned_or_not() {
        let s = stream(40);
        for (from, len) in [(640, 64), (640, 320), (650, 100), (1000, 33)] {
            for piece in [1, 50, 320, 4096] {
                let mut dup = s[..from + len].to_vec();
                dup.extend_from_slice(&s[from..]);
                let v = feed_in_pieces(&dup, piece);
                assert_eq!(
                    v.errors.duplicates, 1,
                    "duplicate of {len} at {from}, pieces of {piece}"
                );
                assert_eq!(v.errors.gaps + v.errors.corrupt, 0);
            }
        }
    }

    #[test]
    fn a_corrupted_byte_is_caught_anywhere_in_a_record() {
        let s = stream(40);
        for at in [640, 641, 650, 660, 700, 703, 1000] {
            for piece in [1, 50, 320, 4096] {
                let mut bad = s.clone();
                bad[at] ^= 0x20;
                let v = feed_in_pieces(&bad, piece);
                assert_eq!(v.errors.corrupt, 1, "byte {at} flipped, pieces of {piece}");
                assert_eq!(v.errors.gaps + v.errors.duplicates, 0);
            }
        }
    }

    #[test]
    fn a_join_that_does_not_line_up_is_corruption() {
        let s = stream(10);
        let mut bad = b"xyz".to_vec();
        bad.extend_from_slice(&s[70..]);
        let v = verify(&[&bad]);
        assert_eq!(v.errors.corrupt, 1);
        let mut junk = vec![b'?'; 300];
        junk.extend_from_slice(&s);
        let v = verify(&[&junk]);
        assert_eq!(v.errors.corrupt, 1);
        assert_eq!(v.errors.gaps + v.errors.duplicates, 0);
    }
}
