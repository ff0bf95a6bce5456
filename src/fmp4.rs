//! Fragmented MP4 (ISO BMFF, as CMAF and HLS use it) for the codecs of Ogg streams: the init
//! segment a player reads once (`ftyp`, `moov` with the codec's sample entry), and fragments
//! (`moof` with one track run, then `mdat`), each holding whole packets taken out of their Ogg
//! pages, with the durations [`crate::ogg_codecs`] found in them. The sample entries:
//! - Opus: `Opus` with its `dOps` box, as "Encapsulation of Opus in ISO Base Media File Format"
//!   specifies;
//! - FLAC: `fLaC` with its `dfLa` box holding `STREAMINFO`, as "Encapsulation of FLAC in ISO
//!   Base Media File Format" specifies;
//! - Vorbis, which has no such specification: `mp4a` with an `esds` whose object type is 0xDD
//!   and whose decoder-specific information is the three header packets, Xiph-laced: the mapping
//!   GPAC and FFmpeg write and read (FFmpeg's `-c:a copy` of an Ogg Vorbis stream to MP4 makes
//!   it). FFmpeg and players built on it decode it; browsers do not (their MP4 parsers know
//!   no Vorbis).

use crate::ogg_codecs::{Codec, OpusHead, OPUS_RATE};

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

/// The init segment of a one-track stream of `codec`.
pub(crate) fn init_segment(codec: &Codec) -> Vec<u8> {
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
                    u32s(o, &[0, 0, codec.rate(), 0]);
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
                            match codec {
                                Codec::Opus(head) => opus_sample_entry(o, head),
                                Codec::Vorbis(v) => {
                                    let rate = v.rate;
                                    audio_sample_entry(o, b"mp4a", v.channels, 16, rate, |o| {
                                        vorbis_esds(o, &v.headers)
                                    })
                                }
                                Codec::Flac(f) => {
                                    let (c, bits, rate) = (f.channels, f.bits_per_sample, f.rate);
                                    audio_sample_entry(o, b"fLaC", c, bits, rate, |o| {
                                        // Version 0; STREAMINFO alone, marked the last block.
                                        full(o, b"dfLa", 0, 0, |o| {
                                            o.extend_from_slice(&[0x80, 0, 0, 34]);
                                            o.extend_from_slice(&f.streaminfo);
                                        })
                                    })
                                }
                            }
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

/// An audio sample entry of type `kind`, its codec's boxes written by `body`.
fn audio_sample_entry(
    out: &mut Vec<u8>,
    kind: &[u8; 4],
    channels: u8,
    sample_bits: u8,
    rate: u32,
    body: impl FnOnce(&mut Vec<u8>),
) {
    boxed(out, kind, |o| {
        // Reserved, data reference index 1, reserved.
        o.extend_from_slice(&[0; 6]);
        u16s(o, &[1]);
        u32s(o, &[0, 0]);
        // Channels, sample size, pre-defined, reserved, then the sample rate as 16.16 (0 for a
        // rate above 16 bits, as the FLAC mapping says; the timescale has it).
        u16s(o, &[u16::from(channels), u16::from(sample_bits), 0, 0]);
        u32s(o, &[if rate > 0xFFFF { 0 } else { rate << 16 }]);
        body(o);
    });
}

/// The `Opus` sample entry and its `dOps` box.
fn opus_sample_entry(out: &mut Vec<u8>, head: &OpusHead) {
    audio_sample_entry(out, b"Opus", head.channels, 16, OPUS_RATE, |o| {
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

/// An `esds` for Vorbis: an ES descriptor holding a decoder configuration of object type 0xDD
/// (Vorbis) whose decoder-specific information is the three headers, Xiph-laced (a count less
/// one, then the first two lengths in 255s, then the packets), and the SL configuration MP4
/// requires.
fn vorbis_esds(out: &mut Vec<u8>, headers: &[Vec<u8>; 3]) {
    let mut laced = vec![2];
    for h in &headers[..2] {
        laced.extend(std::iter::repeat_n(255, h.len() / 255));
        laced.push((h.len() % 255) as u8);
    }
    for h in headers {
        laced.extend_from_slice(h);
    }
    let mut specific = Vec::with_capacity(laced.len() + 5);
    descriptor(&mut specific, 0x05, &laced);
    // Object type Vorbis, stream type audio (5 << 2, and the reserved bit), buffer size,
    // maximum and average bitrates unknown.
    let mut config = vec![0xDD, 0x15, 0, 0, 0];
    config.extend_from_slice(&[0; 8]);
    config.extend_from_slice(&specific);
    let mut es = vec![0, 1, 0];
    descriptor(&mut es, 0x04, &config);
    // SL config: predefined 2, as MP4 files use.
    descriptor(&mut es, 0x06, &[2]);
    full(out, b"esds", 0, 0, |o| descriptor(o, 0x03, &es));
}

/// An MPEG-4 descriptor: its tag, its length in 7-bit groups (high first), its body.
fn descriptor(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
    out.push(tag);
    let n = body.len();
    let groups = (1..4).take_while(|i| n >> (7 * i) > 0).count();
    for i in (1..=groups).rev() {
        out.push(0x80 | (n >> (7 * i)) as u8 & 0x7F);
    }
    out.push(n as u8 & 0x7F);
    out.extend_from_slice(body);
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

    fn opus() -> Codec {
        Codec::Opus(OpusHead {
            channels: 2,
            pre_skip: 312,
            input_rate: 48000,
            gain: 0,
            mapping_family: 0,
            mapping: Vec::new(),
        })
    }

    #[test]
    fn boxes_add_up() {
        let init = init_segment(&opus());
        assert_eq!(&init[4..8], b"ftyp");
        let ftyp = u32::from_be_bytes(init[..4].try_into().unwrap()) as usize;
        let moov = u32::from_be_bytes(init[ftyp..ftyp + 4].try_into().unwrap()) as usize;
        assert_eq!(ftyp + moov, init.len());
        let frag = fragment(7, 960, &[(960, &[1, 2, 3][..]), (960, &[4, 5][..])]);
        let moof = u32::from_be_bytes(frag[..4].try_into().unwrap()) as usize;
        assert_eq!(&frag[moof + 4..moof + 8], b"mdat");
        assert_eq!(&frag[moof + 8..], &[1, 2, 3, 4, 5]);
    }

    #[test]
    fn descriptor_lengths_take_seven_bits_a_byte() {
        let mut out = Vec::new();
        descriptor(&mut out, 5, &[0; 3]);
        assert_eq!(out[..2], [5, 3]);
        let mut out = Vec::new();
        descriptor(&mut out, 5, &vec![0; 3300]);
        // 3300 = 25 * 128 + 100.
        assert_eq!(out[..3], [5, 0x80 | 25, 100]);
        assert_eq!(out.len(), 3 + 3300);
    }
}
