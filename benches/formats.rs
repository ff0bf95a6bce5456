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

    let mut g = c.benchmark_group("formats");
    g.throughput(Throughput::Bytes(mp3.len() as u64));
    g.bench_function("mpeg: 128 kbit/s MP3 in 1000 B pieces", |b| {
        b.iter(|| black_box(bench_api::mpeg_frames(black_box(&mp3))))
    });
    g.throughput(Throughput::Bytes(random.len() as u64));
    g.bench_function("mpeg: noise labelled MP3 in 1000 B pieces", |b| {
        b.iter(|| black_box(bench_api::mpeg_frames(black_box(&random))))
    });
    g.finish();
}

criterion_group!(benches, mpeg);
criterion_main!(benches);
