//! Request parsing: the one piece of per-connection work before a listener or source is served.
//! `make bench` (cargo bench --bench http).

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use fanstream::bench_api::parse_request_head;

const LISTENER: &[u8] = b"GET /live HTTP/1.1\r\nHost: radio.example:8000\r\nUser-Agent: VLC/3.0.18 LibVLC/3.0.18\r\n\
Accept: */*\r\nAccept-Language: en_US\r\nIcy-MetaData: 1\r\nRange: bytes=0-\r\nConnection: close\r\n\r\n";

const SOURCE: &[u8] = b"PUT /live HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nAuthorization: Basic c291cmNlOmhhY2ttZQ==\r\n\
User-Agent: Lavf/59.27.100\r\nContent-Type: audio/mpeg\r\nIce-Name: Live\r\nIce-Description: A test\r\n\
Ice-Genre: Various\r\nIce-Public: 0\r\nExpect: 100-continue\r\n\r\n";

fn parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("http");
    g.bench_function("parse a player's GET", |b| {
        b.iter(|| parse_request_head(black_box(LISTENER)).expect("complete head"))
    });
    g.bench_function("parse an encoder's PUT", |b| {
        b.iter(|| parse_request_head(black_box(SOURCE)).expect("complete head"))
    });
    g.bench_function("incomplete head (first half)", |b| {
        b.iter(|| parse_request_head(black_box(&LISTENER[..LISTENER.len() / 2])))
    });
    g.finish();
}

criterion_group!(benches, parse);
criterion_main!(benches);
