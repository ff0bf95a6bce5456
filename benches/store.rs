//! The segment store: what ingest pays to publish a chunk, and what a worker pays to read.
//! `make bench` (cargo bench --bench store).

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use fanstream::bench_api::Store;

/// A source's small pieces (128 kbit/s every 20 ms).
const PIECE: usize = 320;
/// The default window: burst plus lag limit.
const WINDOW: u64 = 65_536 + 524_288;

/// A store in steady state: its window full.
fn full_store() -> Store {
    let mut s = Store::default();
    for _ in 0..(WINDOW as usize / PIECE + 100) {
        s.append(Bytes::from(vec![0u8; PIECE]), WINDOW);
    }
    s
}

fn publish(c: &mut Criterion) {
    let mut s = full_store();
    let piece = Bytes::from(vec![0u8; PIECE]);
    let mut g = c.benchmark_group("store");
    g.throughput(Throughput::Elements(1));
    g.bench_function("publish a 320 B chunk", |b| {
        b.iter(|| s.append(black_box(piece.clone()), WINDOW))
    });
    g.finish();
}

/// Ingest's cost per piece as mounts grow: one piece (an encoder's 100 ms at 128 kbit/s, merged
/// as ingest merges it, and copied out of a read buffer as ingest copies it) appended to each of
/// N stores in turn, each keeping a 64 KiB burst, as mounts without listeners do. Flat in N
/// means no work over all mounts per piece; what grows is only cache misses.
fn publish_across_mounts(c: &mut Criterion) {
    const MERGED: usize = 1_600;
    const BURST: u64 = 65_536;
    let read_buffer = vec![0u8; MERGED];
    let mut g = c.benchmark_group("store");
    g.throughput(Throughput::Elements(1));
    for mounts in [1usize, 1_000] {
        let mut stores: Vec<Store> = (0..mounts).map(|_| Store::default()).collect();
        for s in &mut stores {
            for _ in 0..(BURST as usize / MERGED + 10) {
                s.append(Bytes::copy_from_slice(&read_buffer), BURST);
            }
        }
        let mut next = 0;
        g.bench_function(format!("a 1600 B piece to one of {mounts} mounts"), |b| {
            b.iter(|| {
                stores[next].append(Bytes::copy_from_slice(black_box(&read_buffer)), BURST);
                next = (next + 1) % mounts;
            })
        });
    }
    g.finish();
}

fn read(c: &mut Criterion) {
    let s = full_store();
    let snap = s.load();
    let mut g = c.benchmark_group("store");
    let mut out = Vec::with_capacity(64);
    g.bench_function("gather the newest chunk", |b| {
        b.iter(|| {
            out.clear();
            black_box(snap.gather(black_box(snap.end() - PIECE as u64), &mut out, 64))
        })
    });
    g.bench_function("gather 64 chunks from 64 KiB behind", |b| {
        b.iter(|| {
            out.clear();
            black_box(snap.gather(black_box(snap.end() - 65_536), &mut out, 64))
        })
    });
    g.bench_function("join point 64 KiB behind", |b| {
        b.iter(|| black_box(snap.join_point(black_box(65_536))))
    });
    g.bench_function("load the snapshot", |b| b.iter(|| black_box(s.load())));
    g.finish();
}

criterion_group!(benches, publish, publish_across_mounts, read);
criterion_main!(benches);
