//! The format parsers at ingest: what parsing costs per source byte, paid once per mount.
//! `cargo bench --bench formats`.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use fanstream::bench_api;

/// MPEG framing: a 128 kbit/s MP3 stream (the usual case, locked) and noise labelled MP3 (the
/// search, which a stream that is not MPEG pays for every byte).
fn mpeg(c: &mut Criterion) {
    // 10 s of MPEG-1 layer III at 128 kbit/s and 44.1 kHz, padded as an encoder pads to keep the
    // bitrate: 417 or 418 bytes a frame. The framer reads only headers, so the payload is noise.
    let mut seed = 0x9E37_79B9_7F4A_7C15_u64;
    let mut noise = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed as u8
    };
    let (mut mp3, mut remainder) = (Vec::new(), 0);
    for _ in 0..383 {
        remainder += 144 * 128_000 % 44_100;
        let padded = remainder >= 44_100;
        if padded {
            remainder -= 44_100;
        }
        mp3.extend([0xFF, 0xFB, if padded { 0x92 } else { 0x90 }, 0x64]);
        mp3.extend((4..417 + usize::from(padded)).map(|_| noise()));
    }
    let random: Vec<u8> = (0..mp3.len()).map(|_| noise()).collect();
    assert_eq!(bench_api::mpeg_frames(&mp3), mp3.len(), "a byte was lost");
    assert!(
        bench_api::hls_mpeg(&mp3) > mp3.len() / 2,
        "the segmenter made segments"
    );

    let mut g = c.benchmark_group("formats");
    g.throughput(Throughput::Bytes(mp3.len() as u64));
    g.bench_function("mpeg: 128 kbit/s MP3 in 1000 B pieces", |b| {
        b.iter(|| black_box(bench_api::mpeg_frames(black_box(&mp3))))
    });
    g.throughput(Throughput::Bytes(random.len() as u64));
    g.bench_function("mpeg: noise labelled MP3 in 1000 B pieces", |b| {
        b.iter(|| black_box(bench_api::mpeg_frames(black_box(&random))))
    });
    // The same stream framed and cut into HLS packed-audio segments, as a mount with `hls` on
    // costs at ingest: the difference from the first is the segmenter's (a copy of each byte
    // into its segment, and a header read per frame).
    g.throughput(Throughput::Bytes(mp3.len() as u64));
    g.bench_function(
        "hls: 128 kbit/s MP3 framed and segmented, 1000 B pieces",
        |b| b.iter(|| black_box(bench_api::hls_mpeg(black_box(&mp3)))),
    );
    g.finish();
}

/// A minute of Ogg Opus at 128 kbit/s, built here (no encoder needed): 20 ms packets of 320 bytes,
/// 12 to a page (about 4 KiB, as libogg pages them), after the two header pages.
fn ogg_opus_stream() -> Vec<u8> {
    const SERIAL: u32 = 0x0f5e_a11d;
    let mut out = ogg_page(
        0x02,
        SERIAL,
        0,
        0,
        &[b"OpusHead\x01\x02\x38\x01\x80\xbb\0\0\0\0\0"],
    );
    out.extend(ogg_page(0, SERIAL, 1, 0, &[b"OpusTags\0\0\0\0\0\0\0\0"]));
    let mut noise = 0x2545_f491_u32;
    let packet: Vec<u8> = (0..320)
        .map(|_| {
            noise ^= noise << 13;
            noise ^= noise >> 17;
            noise ^= noise << 5;
            noise as u8
        })
        .collect();
    for page in 0..250u32 {
        let granule = u64::from(page + 1) * 12 * 960;
        out.extend(ogg_page(0, SERIAL, page + 2, granule, &[&packet[..]; 12]));
    }
    out
}

/// One Ogg page holding whole packets, with its CRC (polynomial 0x04c11db7, computed bit by bit:
/// this runs once, before measuring).
fn ogg_page(flags: u8, serial: u32, sequence: u32, granule: u64, packets: &[&[u8]]) -> Vec<u8> {
    let mut lacing = Vec::new();
    for p in packets {
        lacing.extend(std::iter::repeat_n(255u8, p.len() / 255));
        lacing.push((p.len() % 255) as u8);
    }
    let mut page = b"OggS\0".to_vec();
    page.push(flags);
    page.extend_from_slice(&granule.to_le_bytes());
    page.extend_from_slice(&serial.to_le_bytes());
    page.extend_from_slice(&sequence.to_le_bytes());
    page.extend_from_slice(&[0; 4]);
    page.push(lacing.len() as u8);
    page.extend_from_slice(&lacing);
    for p in packets {
        page.extend_from_slice(p);
    }
    let mut crc = 0u32;
    for &b in &page {
        crc ^= u32::from(b) << 24;
        for _ in 0..8 {
            crc = if crc & 0x8000_0000 != 0 {
                (crc << 1) ^ 0x04c1_1db7
            } else {
                crc << 1
            };
        }
    }
    page[22..26].copy_from_slice(&crc.to_le_bytes());
    page
}

fn ogg(c: &mut Criterion) {
    let stream = ogg_opus_stream();
    assert_eq!(
        bench_api::ogg_pages(&stream),
        stream.len(),
        "every page of the built stream passes"
    );
    let mut g = c.benchmark_group("formats");
    g.throughput(Throughput::Bytes(stream.len() as u64));
    g.bench_function("ogg: a minute of Opus at 128 kbit/s, 4 KiB pieces", |b| {
        b.iter(|| black_box(bench_api::ogg_pages(black_box(&stream))))
    });
    assert!(
        bench_api::hls_ogg(&stream) > stream.len() / 2,
        "the segmenter made fMP4 segments"
    );
    g.bench_function(
        "hls: a minute of Opus paged and cut into fMP4, 4 KiB pieces",
        |b| b.iter(|| black_box(bench_api::hls_ogg(black_box(&stream)))),
    );
    g.finish();
}

/// A minute of Ogg FLAC, built here: the mapping's first packet (`STREAMINFO`: blocks of 4,096
/// samples, 44.1 kHz, stereo, 16 bits), a comment block, then one frame of 4,096 samples a page,
/// 8 KiB each (about 700 kbit/s, what FLAC makes of music). The segmenter reads each frame's
/// header for its duration and copies the frame once into its fragment.
fn ogg_flac_stream() -> Vec<u8> {
    const SERIAL: u32 = 0xf1ac_0001;
    let mut first = b"\x7FFLAC\x01\x00\x00\x01fLaC\x00\x00\x00\x22".to_vec();
    first.extend([0x10, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0x0A, 0xC4, 0x42, 0xF0]);
    first.extend([0; 20]);
    let mut out = ogg_page(0x02, SERIAL, 0, 0, &[&first]);
    out.extend(ogg_page(
        0,
        SERIAL,
        1,
        0,
        &[b"\x84\x00\x00\x08\x00\x00\x00\x00\x00\x00\x00\x00"],
    ));
    let mut noise = 0x2545_f491_u32;
    let mut frame = vec![0xFF, 0xF8, 0xC9, 0x18, 0x00];
    frame.extend((5..8192).map(|_| {
        noise ^= noise << 13;
        noise ^= noise >> 17;
        noise ^= noise << 5;
        noise as u8
    }));
    for page in 0..646u32 {
        let granule = u64::from(page + 1) * 4096;
        out.extend(ogg_page(0, SERIAL, page + 2, granule, &[&frame[..]]));
    }
    out
}

/// The same for FLAC: the bulkiest stream per second of audio the segmenter takes.
fn ogg_flac(c: &mut Criterion) {
    let stream = ogg_flac_stream();
    assert_eq!(bench_api::ogg_pages(&stream), stream.len());
    assert!(
        bench_api::hls_ogg(&stream) > stream.len() / 2,
        "the segmenter made fMP4 segments"
    );
    let mut g = c.benchmark_group("formats");
    g.throughput(Throughput::Bytes(stream.len() as u64));
    g.bench_function("ogg: a minute of FLAC at 700 kbit/s, 4 KiB pieces", |b| {
        b.iter(|| black_box(bench_api::ogg_pages(black_box(&stream))))
    });
    g.bench_function(
        "hls: a minute of FLAC paged and cut into fMP4, 4 KiB pieces",
        |b| b.iter(|| black_box(bench_api::hls_ogg(black_box(&stream)))),
    );
    g.finish();
}

criterion_group!(benches, mpeg, ogg, ogg_flac);
criterion_main!(benches);
