//! The audio codecs an Ogg stream carries, as far as HLS needs them: each logical stream's
//! header packets read into what an MP4 sample entry says of the codec, and
//! each audio packet's duration in samples, from the packet itself (never the wall clock):
//! - **Opus** (RFC 7845): `OpusHead`, then `OpusTags`; a packet's duration from its TOC byte, at
//!   48 kHz whatever the input rate was.
//! - **Vorbis** (Vorbis I specification): the identification header (rate, channels, the two
//!   block sizes), the comment header, the setup header (whose last fields, the modes, say which
//!   block size each mode uses); a packet lasts a quarter of the previous block plus a quarter of
//!   its own, as the decoder overlaps them.
//! - **FLAC** (the Ogg mapping of FLAC 1.0): the first packet holds `STREAMINFO`, the metadata
//!   blocks after it are passed over; each audio packet is one FLAC frame, whose header gives its
//!   block size.

/// Opus runs at 48 kHz whatever the input was: its track's timescale.
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

/// A Vorbis stream, from its three header packets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Vorbis {
    pub channels: u8,
    pub rate: u32,
    /// The identification, comment and setup headers, as the MP4 sample entry carries them.
    pub headers: [Vec<u8>; 3],
    /// The short and long block sizes.
    blocksizes: [u32; 2],
    /// Each mode's block flag (long blocks), in mode order.
    modes: Vec<bool>,
    /// The previous packet's block size: the overlap it leaves to the next.
    previous: u32,
}

impl Vorbis {
    /// The stream, once all three headers are read; None if they are not Vorbis headers or the
    /// setup header's modes cannot be found.
    fn parse(ident: &[u8], comment: &[u8], setup: &[u8]) -> Option<Vorbis> {
        if ident.len() < 30
            || !ident.starts_with(b"\x01vorbis")
            || !comment.starts_with(b"\x03vorbis")
        {
            return None;
        }
        let channels = ident[11];
        let rate = u32::from_le_bytes(ident[12..16].try_into().ok()?);
        let sizes = ident[28];
        let blocksizes = [1u32 << (sizes & 0x0F), 1u32 << (sizes >> 4)];
        if channels == 0 || rate == 0 || !(64..=8192).contains(&blocksizes[0]) {
            return None;
        }
        let modes = vorbis_modes(setup)?;
        Some(Vorbis {
            channels,
            rate,
            headers: [ident.to_vec(), comment.to_vec(), setup.to_vec()],
            blocksizes,
            modes,
            previous: blocksizes[0],
        })
    }

    /// Samples an audio packet adds: a quarter of the previous block and a quarter of its own.
    /// None for a header packet or a mode the setup did not define.
    fn samples(&mut self, p: &[u8]) -> Option<u32> {
        let first = *p.first()?;
        if first & 1 != 0 {
            return None;
        }
        // After the packet-type bit: the mode number, in ilog(modes - 1) bits; a long block then
        // says in its next bit which block size came before it.
        let bits = usize::BITS - (self.modes.len() - 1).leading_zeros();
        let mode = (usize::from(first) >> 1) & ((1 << bits) - 1);
        let long = *self.modes.get(mode)?;
        let current = self.blocksizes[usize::from(long)];
        let previous = if long {
            // The previous-window flag is in the first byte while there are at most 64 modes.
            self.blocksizes[usize::from(first >> (1 + bits) & 1)]
        } else {
            self.previous
        };
        self.previous = current;
        Some((previous + current) / 4)
    }
}

/// Each mode's block flag, read from the end of a setup header: the modes are its last fields
/// (block flag 1 bit, window type 16, transform type 16, mapping 8), after their count less one
/// in 6 bits, and then the framing bit. What comes before them has no length that could be
/// skipped without decoding the codebooks, so the modes are found backwards, as libavcodec and
/// liboggz find them: the longest run of well-formed modes preceded by a count that matches it.
fn vorbis_modes(setup: &[u8]) -> Option<Vec<bool>> {
    if !setup.starts_with(b"\x05vorbis") {
        return None;
    }
    // Vorbis packs bits from each byte's least significant one.
    let bit = |at: usize| setup[at / 8] >> (at % 8) & 1;
    // The `n` bits at `at`, read as the decoder reads a field.
    let field = |at: usize, n: usize| (0..n).fold(0u32, |v, i| v | u32::from(bit(at + i)) << i);
    let body = 7 * 8;
    let mut end = (body..setup.len() * 8).rev().find(|&at| bit(at) == 1)?;
    let mut count = None;
    for modes in 1..=64usize {
        let Some(start) = end.checked_sub(41).filter(|&s| s >= body + 6) else {
            break;
        };
        if field(start + 1, 16) != 0 || field(start + 17, 16) != 0 || field(start + 33, 8) > 63 {
            break;
        }
        if field(start - 6, 6) as usize + 1 == modes {
            count = Some((modes, start));
        }
        end = start;
    }
    let (modes, first) = count?;
    Some((0..modes).map(|m| bit(first + 41 * m) == 1).collect())
}

/// A FLAC stream, from its `STREAMINFO` block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Flac {
    pub channels: u8,
    pub rate: u32,
    pub bits_per_sample: u8,
    /// The 34 bytes of `STREAMINFO`, as `dfLa` carries them.
    pub streaminfo: Vec<u8>,
}

impl Flac {
    /// From the first packet of Ogg FLAC: `\x7FFLAC`, version, header count, `fLaC`, then the
    /// `STREAMINFO` block (type 0, 34 bytes).
    fn parse(p: &[u8]) -> Option<Flac> {
        if !p.starts_with(b"\x7FFLAC") || p.get(9..13)? != b"fLaC" || p.get(13)? & 0x7F != 0 {
            return None;
        }
        let info = p.get(17..17 + 34)?;
        let rate = u32::from(info[10]) << 12 | u32::from(info[11]) << 4 | u32::from(info[12]) >> 4;
        let channels = (info[12] >> 1 & 7) + 1;
        let bits_per_sample = ((info[12] & 1) << 4 | info[13] >> 4) + 1;
        (rate > 0).then(|| Flac {
            channels,
            rate,
            bits_per_sample,
            streaminfo: info.to_vec(),
        })
    }
}

/// Samples in a FLAC frame, from its header's block size code; None if `p` does not start with
/// a frame header (a metadata block is not one).
pub(crate) fn flac_frame_samples(p: &[u8]) -> Option<u32> {
    if p.len() < 5 || p[0] != 0xFF || p[1] & 0xFE != 0xF8 {
        return None;
    }
    // After the four fixed bytes, the frame or sample number, UTF-8 coded in 1 to 7 bytes;
    // block sizes coded 6 and 7 follow it.
    let number = match p[4].leading_ones() {
        0 => 1,
        n @ 2..=7 => n as usize,
        _ => return None,
    };
    let after = 4 + number;
    match p[2] >> 4 {
        0 => None,
        1 => Some(192),
        n @ 2..=5 => Some(576 << (n - 2)),
        6 => p.get(after).map(|&b| u32::from(b) + 1),
        7 => p
            .get(after..after + 2)
            .map(|b| u32::from(u16::from_be_bytes([b[0], b[1]])) + 1),
        n => Some(256 << (n - 8)),
    }
}

/// A logical stream's codec, with what its sample entry needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Codec {
    Opus(OpusHead),
    Vorbis(Vorbis),
    Flac(Flac),
}

impl Codec {
    /// The track's timescale: samples a second.
    pub fn rate(&self) -> u32 {
        match self {
            Codec::Opus(_) => OPUS_RATE,
            Codec::Vorbis(v) => v.rate,
            Codec::Flac(f) => f.rate,
        }
    }

    /// Samples an audio packet lasts; None for a packet that is not audio (a header, a FLAC
    /// metadata block), or too short to say.
    pub fn samples(&mut self, p: &[u8]) -> Option<u32> {
        match self {
            Codec::Opus(_) => opus_packet_samples(p),
            Codec::Vorbis(v) => v.samples(p),
            Codec::Flac(_) => flac_frame_samples(p),
        }
    }
}

/// A logical stream's header packets as they come, from its first (the BOS page's) on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Headers {
    /// `OpusHead` read; packets are passed over up to `OpusTags`.
    Opus(OpusHead),
    /// The Vorbis headers read so far (identification, then comment).
    Vorbis(Vec<Vec<u8>>),
    /// All known: audio packets may come.
    Done(Codec),
}

impl Headers {
    /// The headers of a stream whose first packet is `p`; None for a codec not known here.
    pub fn begin(p: &[u8]) -> Option<Headers> {
        if let Some(head) = OpusHead::parse(p) {
            return Some(Headers::Opus(head));
        }
        if p.starts_with(b"\x01vorbis") {
            return Some(Headers::Vorbis(vec![p.to_vec()]));
        }
        // FLAC's metadata blocks after STREAMINFO say nothing the sample entry needs; the audio
        // packets are told from them by the frame header they start with.
        Flac::parse(p).map(|f| Headers::Done(Codec::Flac(f)))
    }

    /// Takes the stream's next packet while headers are still to come. Err when the headers
    /// turn out not to make a stream this can follow.
    pub fn next(self, p: &[u8]) -> Result<Headers, ()> {
        match self {
            Headers::Opus(head) if p.starts_with(b"OpusTags") => {
                Ok(Headers::Done(Codec::Opus(head)))
            }
            Headers::Opus(head) => Ok(Headers::Opus(head)),
            Headers::Vorbis(mut read) if read.len() == 2 => {
                read.push(p.to_vec());
                Vorbis::parse(&read[0], &read[1], &read[2])
                    .map(|v| Headers::Done(Codec::Vorbis(v)))
                    .ok_or(())
            }
            Headers::Vorbis(mut read) => {
                read.push(p.to_vec());
                Ok(Headers::Vorbis(read))
            }
            done @ Headers::Done(_) => Ok(done),
        }
    }
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
    fn opus_head_is_read_as_rfc_7845_says() {
        let mut head = b"OpusHead\x01\x02\x38\x01\x80\xbb\x00\x00\x00\x00\x00".to_vec();
        let parsed = OpusHead::parse(&head).unwrap();
        assert_eq!((parsed.channels, parsed.pre_skip), (2, 312));
        assert_eq!(parsed.input_rate, 48_000);
        head[8] = 0x10;
        assert_eq!(OpusHead::parse(&head), None);
    }

    /// Packs fields as a Vorbis encoder does: least significant bit first.
    fn pack(fields: &[(u32, usize)]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut at = 0;
        for &(v, n) in fields {
            for i in 0..n {
                if at % 8 == 0 {
                    out.push(0);
                }
                *out.last_mut().unwrap() |= ((v >> i & 1) as u8) << (at % 8);
                at += 1;
            }
        }
        out
    }

    fn vorbis_stream() -> Vorbis {
        let mut ident = b"\x01vorbis\0\0\0\0\x02\x44\xac\0\0".to_vec();
        ident.extend([0; 12]);
        // Block sizes 2^8 and 2^11, then the framing bit.
        ident.extend([0xB8, 1]);
        // Codebooks and the rest stand as noise before the modes: 2 modes, short then long.
        let mut setup = b"\x05vorbis".to_vec();
        let mut fields = vec![(0x2A5, 13), (1, 6)];
        fields.extend([(0, 1), (0, 16), (0, 16), (0, 8)]);
        fields.extend([(1, 1), (0, 16), (0, 16), (1, 8), (1, 1)]);
        setup.extend(pack(&fields));
        Vorbis::parse(&ident, b"\x03vorbis", &setup).unwrap()
    }

    #[test]
    fn vorbis_packets_last_half_of_each_block_overlapped() {
        let mut v = vorbis_stream();
        assert_eq!((v.channels, v.rate, v.blocksizes), (2, 44_100, [256, 2048]));
        assert_eq!(v.modes, [false, true]);
        // Mode 0 (short) after the initial short block; mode 1 (long) after a short one; long
        // after long; short after long.
        assert_eq!(v.samples(&[0b000]), Some(128));
        assert_eq!(v.samples(&[0b010]), Some(64 + 512));
        assert_eq!(v.samples(&[0b110]), Some(1024));
        assert_eq!(v.samples(&[0b000]), Some(512 + 64));
        assert_eq!(v.samples(&[0b001]), None, "a header packet");
    }

    #[test]
    fn vorbis_headers_come_in_three_packets() {
        let v = vorbis_stream();
        let mut h = Headers::begin(&v.headers[0]).unwrap();
        h = h.next(&v.headers[1]).unwrap();
        assert!(matches!(h, Headers::Vorbis(_)));
        assert_eq!(h.next(&v.headers[2]), Ok(Headers::Done(Codec::Vorbis(v))));
        let h = Headers::begin(&vorbis_stream().headers[0]).unwrap();
        assert!(h.next(b"\x03vorbis").unwrap().next(b"\x05vorbis").is_err());
    }

    /// Encodes 3 s of a tone with ffmpeg into Ogg, and checks every page's granule position
    /// (samples decoded by the end of its last packet) against the packets' durations summed:
    /// the durations are what a decoder makes of the packets, as a real encoder wrote them.
    /// Vorbis's first packet decodes to nothing (it only primes the overlap), so its duration is
    /// the offset between the two; the last page is left out (its granule trims the end).
    fn durations_match_granules(codec: &[&str], first_packet_decodes: bool) {
        let path = std::env::temp_dir().join(format!("fanstream-ogg-codecs-{}.ogg", codec[1]));
        let out = std::process::Command::new("ffmpeg")
            .args([
                "-hide_banner",
                "-loglevel",
                "error",
                "-y",
                "-f",
                "lavfi",
                "-i",
            ])
            .arg("aevalsrc=0.5*sin(2*PI*440*t)+0.2*(random(0)-0.5):s=48000:d=3")
            .args(codec)
            // A page every 100 ms: many pages, each a granule position to check.
            .args(["-f", "ogg", "-page_duration", "100000"])
            .arg(&path)
            .output()
            .expect("ffmpeg (Debian's package) is needed to encode the test streams");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let data = std::fs::read(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        let (mut at, mut partial, mut headers, mut total) = (0, Vec::new(), None, 0u64);
        let (mut first, mut pages) = (None, 0);
        while at + 27 <= data.len() {
            let page = &data[at..];
            let segments = usize::from(page[26]);
            let lacing = &page[27..27 + segments];
            let granule = u64::from_le_bytes(page[6..14].try_into().unwrap());
            let mut body = 27 + segments;
            let mut ended = false;
            for &l in lacing {
                partial.extend_from_slice(&page[body..body + usize::from(l)]);
                body += usize::from(l);
                if l < 255 {
                    let packet = std::mem::take(&mut partial);
                    ended = true;
                    headers = Some(match headers.take() {
                        None => Headers::begin(&packet).expect("a known codec"),
                        Some(Headers::Done(mut codec)) => {
                            if let Some(n) = codec.samples(&packet) {
                                first.get_or_insert(u64::from(n));
                                total += u64::from(n);
                            }
                            Headers::Done(codec)
                        }
                        Some(h) => h.next(&packet).expect("headers in order"),
                    });
                }
            }
            at += body;
            let last = page[5] & 4 != 0;
            if ended && !last && total > 0 {
                let offset = if first_packet_decodes {
                    0
                } else {
                    first.unwrap()
                };
                assert_eq!(total - offset, granule, "{codec:?}: page at {at}");
                pages += 1;
            }
        }
        assert!(pages > 5, "{codec:?}: only {pages} pages checked");
    }

    #[test]
    fn vorbis_durations_add_up_to_the_granule_positions_libvorbis_writes() {
        durations_match_granules(&["-c:a", "libvorbis"], false);
    }

    #[test]
    fn flac_durations_add_up_to_the_granule_positions_ffmpeg_writes() {
        durations_match_granules(&["-c:a", "flac"], true);
    }

    #[test]
    fn opus_durations_add_up_to_the_granule_positions_libopus_writes() {
        durations_match_granules(&["-c:a", "libopus"], true);
    }

    #[test]
    fn flac_frames_say_their_block_size() {
        // 4096 samples (code 12); 192 (code 1); 8-bit code 6 after a 2-byte frame number.
        assert_eq!(
            flac_frame_samples(&[0xFF, 0xF8, 0xC9, 0x18, 0x00]),
            Some(4096)
        );
        assert_eq!(
            flac_frame_samples(&[0xFF, 0xF9, 0x19, 0x18, 0x05]),
            Some(192)
        );
        assert_eq!(
            flac_frame_samples(&[0xFF, 0xF8, 0x69, 0x18, 0xC2, 0x80, 0x1F]),
            Some(32)
        );
        assert_eq!(flac_frame_samples(b"\x04\0\0\x20vendor"), None);
        let mut first = b"\x7FFLAC\x01\x00\x00\x01fLaC\x00\x00\x00\x22".to_vec();
        // Blocks of 4096, rate 44100, 2 channels, 16 bits.
        first.extend([0x10, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0x0A, 0xC4, 0x42, 0xF0]);
        first.extend([0; 20]);
        let Some(Headers::Done(Codec::Flac(f))) = Headers::begin(&first) else {
            panic!("not FLAC");
        };
        assert_eq!((f.rate, f.channels, f.bits_per_sample), (44_100, 2, 16));
    }
}
