//! The source's pace, shared by every process of a run: from it a listener knows how many bytes
//! the source had sent by any instant, and so how many it was owed.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::record::RECORD_BYTES;

/// Microseconds since the Unix epoch: the clock every process of a run shares.
pub fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    /// When piece 0 is sent (unix µs).
    pub t0_us: u64,
    /// A whole number of records.
    pub piece_bytes: u64,
    pub interval_us: u64,
}

impl Schedule {
    /// Pieces of `interval_ms` at `bitrate_kbps`, rounded to whole records (at least one).
    pub fn new(t0_us: u64, bitrate_kbps: u64, interval_ms: u64) -> Schedule {
        let bytes = bitrate_kbps * 1000 / 8 * interval_ms / 1000;
        let records = (bytes / RECORD_BYTES as u64).max(1);
        Schedule {
            t0_us,
            piece_bytes: records * RECORD_BYTES as u64,
            interval_us: interval_ms * 1000,
        }
    }

    /// Bytes the source had sent by `at_us` on schedule.
    pub fn sent_by(&self, at_us: u64) -> u64 {
        if at_us < self.t0_us {
            return 0;
        }
        ((at_us - self.t0_us) / self.interval_us + 1) * self.piece_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_are_whole_records_at_the_bitrate() {
        let s = Schedule::new(0, 128, 20);
        assert_eq!(s.piece_bytes, 320);
        assert_eq!(s.interval_us, 20_000);
        let s = Schedule::new(0, 2000, 20);
        assert_eq!(s.piece_bytes % RECORD_BYTES as u64, 0);
        // 2 Mbit/s is 5,000 bytes per 20 ms: 78 whole records.
        assert_eq!(s.piece_bytes, 78 * 64);
        assert_eq!(s.sent_by(0), 4992);
    }

    #[test]
    fn sent_by_counts_pieces_due() {
        let s = Schedule::new(1_000_000, 128, 20);
        assert_eq!(s.sent_by(999_999), 0);
        assert_eq!(s.sent_by(1_000_000), 320);
        assert_eq!(s.sent_by(1_019_999), 320);
        assert_eq!(s.sent_by(1_020_000), 640);
        assert_eq!(s.sent_by(2_000_000), 51 * 320);
    }
}
