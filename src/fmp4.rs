//! Fragmented MP4 (ISO BMFF, as CMAF and HLS use it) for Opus: the init segment a player reads
//! once (`ftyp`, `moov` with an `Opus` sample entry and its `dOps` box, as "Encapsulation of
//! Opus in ISO Base Media File Format" specifies), and fragments (`moof` with one track run,
//! then `mdat`), each holding whole Opus packets taken out of their Ogg pages. The packets'
//! durations come from their TOC bytes, not from the wall clock.

/// Opus runs at 48 kHz whatever the input was: the track's timescale.
pub(crate) const OPUS_RATE: u32 = 48_000;

/// What an Opus stream's identification header (`OpusHead`) says, as `dOps` carries it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct OpusHead {
    pub channels: u8,
    pub pre_skip: u16,
    pub input_rate: u32,
    pub gain: i16,
    pub mapping_family: u8,
    /// Family other than 0: stream count, coupled count, then one mapping byte per channel.
    pub mapping: Vec<u8>,
}

impl OpusHead {
    /// Parses an `OpusHead` packet (RFC 7845, 5.1); None if it is not one.
    pub fn parse(p: &[u8]) -> Option<OpusHead> {
        if p.len() < 19 || !p.starts_with(b"OpusHead") || p[8] >> 4 != 0 {
            return None;
        }
        let channels = p[9];
        let mapping_family = p[18];
        let mapping = if mapping_family == 0 {
            Vec::new()
        } else {
            p.get(19..21 + usize::from(channels))?.to_vec()
        };
        Some(OpusHead {
            channels,
            pre_skip: u16::from_le_bytes([p[10], p[11]]),
            input_rate: u32::from_le_bytes([p[12], p[13], p[14], p[15]]),
            gain: i16::from_le_bytes([p[16], p[17]]),
            mapping_family,
            mapping,
        })
    }
}

/// Samples (at 48 kHz) an Opus packet decodes to, from its TOC byte and frame count (RFC 6716,
/// 3.1); None for a packet too short to say.
pub(crate) fn opus_packet_samples(p: &[u8]) -> Option<u32> {
    let toc = *p.first()?;
    let config = toc >> 3;
    // Frame length in 48 kHz samples: SILK 10/20/40/60 ms, hybrid 10/20 ms, CELT 2.5/5/10/20 ms.
    let frame = match config {
        0..=11 => [480, 960, 1920, 2880][usize::from(config & 3)],
        12..=15 => [480, 960][usize::from(config & 1)],
        _ => [120, 240, 480, 960][usize::from(config & 3)],
    };
    let frames = match toc & 3 {
        0 => 1,
        1 | 2 => 2,
        _ => u32::from(*p.get(1)? & 0x3F),
    };
    Some(frame * frames)
}

/// Appends an ISO BMFF box: its size, its type, and what `body` writes.
fn boxed(out: &mut Vec<u8>, kind: &[u8; 4], body: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(kind);
    body(out);
    let size = (out.len() - start) as u32;
    out[start..start + 4].copy_from_slice(&size.to_be_bytes());
}

/// A full box: a box whose body starts with a version and 24 bits of flags.
fn full(
    out: &mut Vec<u8>,
    kind: &[u8; 4],
    version: u8,
    flags: u32,
    body: impl FnOnce(&mut Vec<u8>),
) {
    boxed(out, kind, |o| {
        o.push(version);
        o.extend_from_slice(&flags.to_be_bytes()[1..]);
        body(o);
    });
}

fn u16s(out: &mut Vec<u8>, v: &[u16]) {
    for x in v {
        out.extend_from_slice(&x.to_be_bytes());
    }
}

fn u32s(out: &mut Vec<u8>, v: &[u32]) {
    for x in v {
        out.extend_from_slice(&x.to_be_bytes());
    }
}

/// The init segment of a one-track Opus stream.
pub(crate) fn init_segment(head: &OpusHead) -> Vec<u8> {
    let mut out = Vec::with_capacity(1024);
    boxed(&mut out, b"ftyp", |o| {
        o.extend_from_slice(b"iso6");
        u32s(o, &[0]);
        o.extend_from_slice(b"iso6cmfcmp41");
    });
    boxed(&mut out, b"moov", |o| {
        full(o, b"mvhd", 0, 0, |o| {
            // Creation and modification times, timescale, duration (unknown: live).
            u32s(o, &[0, 0, 1000, 0]);
            // Rate 1.0, volume 1.0, reserved.
            u32s(o, &[0x0001_0000]);
            u16s(o, &[0x0100, 0]);
            u32s(o, &[0, 0]);
            // The unity matrix.
            u32s(
                o,
                &[0x0001_0000, 0, 0, 0, 0x0001_0000, 0, 0, 0, 0x4000_0000],
            );
            // Pre-defined, then the next track id.
            u32s(o, &[0, 0, 0, 0, 0, 0, 2]);
        });
        boxed(o, b"trak", |o| {
            // Enabled, in movie.
            full(o, b"tkhd", 0, 3, |o| {
                // Times, track id, reserved, duration, reserved.
                u32s(o, &[0, 0, 1, 0, 0, 0, 0]);
                // Layer, alternate group, volume 1.0, reserved.
                u16s(o, &[0, 0, 0x0100, 0]);
                u32s(
                    o,
                    &[0x0001_0000, 0, 0, 0, 0x0001_0000, 0, 0, 0, 0x4000_0000],
                );
                // Width, height: audio.
                u32s(o, &[0, 0]);
            });
            boxed(o, b"mdia", |o| {
                full(o, b"mdhd", 0, 0, |o| {
                    u32s(o, &[0, 0, OPUS_RATE, 0]);
                    // Language `und`, packed in 5 bits a letter; pre-defined.
                    u16s(o, &[0x55C4, 0]);
                });
                full(o, b"hdlr", 0, 0, |o| {
                    u32s(o, &[0]);
                    o.extend_from_slice(b"soun");
                    u32s(o, &[0, 0, 0]);
                    o.extend_from_slice(b"fanstream\0");
                });
                boxed(o, b"minf", |o| {
                    full(o, b"smhd", 0, 0, |o| u32s(o, &[0]));
                    boxed(o, b"dinf", |o| {
                        full(o, b"dref", 0, 0, |o| {
                            u32s(o, &[1]);
                            // Self-contained.
                            full(o, b"url ", 0, 1, |_| {});
                        });
                    });
                    boxed(o, b"stbl", |o| {
                        full(o, b"stsd", 0, 0, |o| {
                            u32s(o, &[1]);
                            opus_sample_entry(o, head);
                        });
                        full(o, b"stts", 0, 0, |o| u32s(o, &[0]));
                        full(o, b"stsc", 0, 0, |o| u32s(o, &[0]));
                        full(o, b"stsz", 0, 0, |o| u32s(o, &[0, 0]));
                        full(o, b"stco", 0, 0, |o| u32s(o, &[0]));
                    });
                });
            });
        });
        boxed(o, b"mvex", |o| {
            // Track 1, sample description 1, no defaults.
            full(o, b"trex", 0, 0, |o| u32s(o, &[1, 1, 0, 0, 0]));
        });
    });
    out
}

/// The `Opus` sample entry and its `dOps` box.
fn opus_sample_entry(out: &mut Vec<u8>, head: &OpusHead) {
    boxed(out, b"Opus", |o| {
        // Reserved, data reference index 1, reserved.
        o.extend_from_slice(&[0; 6]);
        u16s(o, &[1]);
        u32s(o, &[0, 0]);
        // Channels, sample size 16, pre-defined, reserved, sample rate 48000 as 16.16.
        u16s(o, &[u16::from(head.channels), 16, 0, 0]);
        u32s(o, &[OPUS_RATE << 16]);
        boxed(o, b"dOps", |o| {
            o.push(0);
            o.push(head.channels);
            u16s(o, &[head.pre_skip]);
            u32s(o, &[head.input_rate]);
            o.extend_from_slice(&head.gain.to_be_bytes());
            o.push(head.mapping_family);
            o.extend_from_slice(&head.mapping);
        });
    });
}

/// A fragment: `moof` (sequence number `sequence`, decode time `base` in 48 kHz samples, one
/// run of `packets` with their durations) then `mdat` with the packets, copied in once.
pub(crate) fn fragment(sequence: u32, base: u64, packets: &[(u32, &[u8])]) -> Vec<u8> {
    let data: usize = packets.iter().map(|(_, p)| p.len()).sum();
    let mut out = Vec::with_capacity(128 + 8 * packets.len() + data);
    let mut offset_at = 0;
    boxed(&mut out, b"moof", |o| {
        full(o, b"mfhd", 0, 0, |o| u32s(o, &[sequence]));
        boxed(o, b"traf", |o| {
            // default-base-is-moof: data offsets count from the moof's first byte.
            full(o, b"tfhd", 0, 0x02_0000, |o| u32s(o, &[1]));
            full(o, b"tfdt", 1, 0, |o| {
                o.extend_from_slice(&base.to_be_bytes())
            });
            // Data offset, and a duration and a size per sample.
            full(o, b"trun", 0, 0x00_0301, |o| {
                u32s(o, &[packets.len() as u32]);
                offset_at = o.len();
                u32s(o, &[0]);
                for (duration, p) in packets {
                    u32s(o, &[*duration, p.len() as u32]);
                }
            });
        });
    });
    // The first sample's byte, from the moof's start: past the moof and the mdat's header.
    let data_offset = (out.len() + 8) as u32;
    out[offset_at..offset_at + 4].copy_from_slice(&data_offset.to_be_bytes());
    boxed(&mut out, b"mdat", |o| {
        for (_, p) in packets {
            o.extend_from_slice(p);
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opus_packets_last_what_their_toc_says() {
        // CELT 20 ms, one frame; SILK 60 ms, two frames; CELT 2.5 ms, code 3 with 4 frames.
        assert_eq!(opus_packet_samples(&[0xF8]), Some(960));
        assert_eq!(opus_packet_samples(&[0x19]), Some(5760));
        assert_eq!(opus_packet_samples(&[0x83, 0x04]), Some(480));
        assert_eq!(opus_packet_samples(&[0x83]), None);
        assert_eq!(opus_packet_samples(&[]), None);
    }

    #[test]
    fn boxes_add_up() {
        let head = OpusHead {
            channels: 2,
            pre_skip: 312,
            input_rate: 48000,
            gain: 0,
            mapping_family: 0,
            mapping: Vec::new(),
        };
        let init = init_segment(&head);
        assert_eq!(&init[4..8], b"ftyp");
        let ftyp = u32::from_be_bytes(init[..4].try_into().unwrap()) as usize;
        let moov = u32::from_be_bytes(init[ftyp..ftyp + 4].try_into().unwrap()) as usize;
        assert_eq!(ftyp + moov, init.len());
        let frag = fragment(7, 960, &[(960, &[1, 2, 3][..]), (960, &[4, 5][..])]);
        let moof = u32::from_be_bytes(frag[..4].try_into().unwrap()) as usize;
        assert_eq!(&frag[moof + 4..moof + 8], b"mdat");
        assert_eq!(&frag[moof + 8..], &[1, 2, 3, 4, 5]);
        let mut head_packet = b"OpusHead\x01\x02\x38\x01\x80\xbb\x00\x00\x00\x00\x00".to_vec();
        assert_eq!(OpusHead::parse(&head_packet), Some(head.clone()));
        head_packet[8] = 0x10;
        assert_eq!(OpusHead::parse(&head_packet), None);
    }
}
