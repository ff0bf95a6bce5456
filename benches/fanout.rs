//! Fan-out cost per listener per chunk on one worker: what the fan-out loop does for each
//! listener of a round, one shared gather of the snapshot's slices and one vectored write, to
//! in-memory sinks (the loop's own cost) and to loopback sockets (with the syscall, which
//! dominates). Writing one 320-byte chunk per write against ten at once (3,200 bytes, as write
//! coalescing does) shows why coalescing pays. `make bench` (cargo bench --bench fanout).

use std::io::{self, IoSlice, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use fanstream::bench_api::{Snap, Store};

const PIECE: usize = 320;
const WINDOW: u64 = 65_536 + 524_288;
const MEMORY_LISTENERS: usize = 1000;
const SOCKET_LISTENERS: usize = 100;

/// A sink that takes every byte offered, like a socket with room, but copies nothing.
struct Discard(u64);

impl Write for Discard {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let n: usize = bufs.iter().map(|b| black_box(b.len())).sum();
        self.0 += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Connected loopback pairs: (the server's side, written; the client's side, drained).
fn loopback_pairs(n: usize) -> Vec<(TcpStream, TcpStream)> {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    (0..n)
        .map(|_| {
            let client = TcpStream::connect(l.local_addr().unwrap()).expect("connect");
            let (server, _) = l.accept().expect("accept");
            server.set_nonblocking(true).unwrap();
            client.set_nonblocking(true).unwrap();
            (server, client)
        })
        .collect()
}

fn drain(pairs: &mut [(TcpStream, TcpStream)]) {
    let mut buf = [0u8; 16 * 1024];
    for (_, client) in pairs {
        while matches!(client.read(&mut buf), Ok(n) if n > 0) {}
    }
}

/// One round: the shared gather, then one vectored write per listener.
fn round<W: Write>(snap: &Snap, pos: u64, sinks: &mut [W]) {
    let mut slices = Vec::with_capacity(64);
    snap.gather(pos, &mut slices, 64);
    for s in sinks {
        let n = s.write_vectored(&slices).expect("room in the sink");
        black_box(n);
    }
}

fn fanout(c: &mut Criterion) {
    let mut store = Store::default();
    for _ in 0..(WINDOW as usize / PIECE) {
        store.append(Bytes::from(vec![0u8; PIECE]), WINDOW);
    }
    let snap = store.load();
    let mut pairs = loopback_pairs(SOCKET_LISTENERS);
    let mut g = c.benchmark_group("fan-out per listener");
    for (label, chunks) in [("1 chunk of 320 B", 1u64), ("10 chunks, 3200 B", 10)] {
        let pos = snap.end() - chunks * PIECE as u64;
        let mut sinks: Vec<Discard> = (0..MEMORY_LISTENERS).map(|_| Discard(0)).collect();
        g.throughput(Throughput::Elements(MEMORY_LISTENERS as u64));
        g.bench_function(format!("in-memory sinks, {label}"), |b| {
            b.iter(|| round(&snap, pos, &mut sinks))
        });
        g.throughput(Throughput::Elements(SOCKET_LISTENERS as u64));
        g.bench_function(format!("loopback sockets, {label}"), |b| {
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    let mut writers: Vec<&TcpStream> = pairs.iter().map(|(s, _)| s).collect();
                    let t = Instant::now();
                    round(&snap, pos, &mut writers);
                    spent += t.elapsed();
                    // Reading is the listeners' work, not the server's: not timed.
                    drain(&mut pairs);
                }
                spent
            })
        });
    }
    g.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
