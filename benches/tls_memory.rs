//! The memory of a TLS listener's session, broken down: rustls sessions with fanstream's own
//! settings (`bench_api::tls_server_config`), each taken through a TLS 1.3 handshake with a
//! client, a request head read and a 16 KB piece written and sent, as a listener's session is
//! once it streams; the heap each holds is counted by a global allocator that tallies the
//! bytes live, per step. `cargo bench --bench tls_memory` (no criterion: one pass, figures
//! printed).

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{IoSlice, Read, Write};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use rustls::{ClientConfig, ClientConnection, ServerConnection};

/// The system allocator, counting the bytes asked for and not yet freed.
struct Counting;

static LIVE: AtomicI64 = AtomicI64::new(0);

// SAFETY: every call goes to the system allocator unchanged; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: the caller's layout, passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: a block this allocator gave, with its layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        // SAFETY: a block this allocator gave, with its layout.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const SESSIONS: usize = 1000;
const PIECE: usize = 16 * 1024;

fn live() -> i64 {
    LIVE.load(Ordering::Relaxed)
}

/// Moves what `$from` has to send into `$to` (a server or a client session, either way).
macro_rules! pump {
    ($from:expr, $to:expr) => {{
        let mut wire = Vec::new();
        while $from.wants_write() {
            $from.write_tls(&mut wire).unwrap();
        }
        let mut rd = &wire[..];
        while !rd.is_empty() {
            $to.read_tls(&mut rd).unwrap();
            $to.process_new_packets().unwrap();
        }
    }};
}

/// Heap bytes per session at each step, for `config`.
fn measure(what: &str, server_config: Arc<rustls::ServerConfig>, client_config: Arc<ClientConfig>) {
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut pairs = Vec::with_capacity(SESSIONS);
    let base = live();
    for _ in 0..SESSIONS {
        let mut s = ServerConnection::new(server_config.clone()).unwrap();
        s.set_buffer_limit(Some(fanstream::bench_api::TLS_SESSION_BUFFER_BYTES));
        let c = ClientConnection::new(client_config.clone(), name.clone()).unwrap();
        pairs.push((s, c));
    }
    let fresh = live();
    for (s, c) in pairs.iter_mut() {
        while s.is_handshaking() || c.is_handshaking() {
            pump!(c, s);
            pump!(s, c);
        }
        c.writer()
            .write_all(b"GET /live HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .unwrap();
        pump!(c, s);
        let mut head = [0u8; 256];
        let n = s.reader().read(&mut head).unwrap();
        assert!(n > 0);
    }
    // The clients go: what is left is the servers' sessions.
    let (mut servers, clients): (Vec<_>, Vec<_>) = pairs.into_iter().unzip();
    let with_clients = live();
    drop(clients);
    let handshaken = live();
    let piece = vec![0x5a_u8; PIECE];
    let mut sink = Vec::with_capacity(2 * PIECE);
    for s in servers.iter_mut() {
        let n = s.writer().write_vectored(&[IoSlice::new(&piece)]).unwrap();
        assert_eq!(n, PIECE);
        while s.wants_write() {
            s.write_tls(&mut sink).unwrap();
        }
        sink.clear();
    }
    let streaming = live();
    let per = |a: i64, b: i64| (b - a) as f64 / SESSIONS as f64;
    println!(
        "{what}: ServerConnection {} B inline; heap per session: new {:.0} B, after the handshake and the request head {:.0} B (clients included: {:.0} B), after a {PIECE} B piece written and sent {:.0} B",
        std::mem::size_of::<ServerConnection>(),
        per(base, fresh),
        per(base, handshaken),
        per(base, with_clients),
        per(base, streaming),
    );
    drop(servers);
    // The read buffer alone: new sessions given the first 5 bytes of a record.
    let mut fresh: Vec<_> = (0..SESSIONS)
        .map(|_| ServerConnection::new(server_config.clone()).unwrap())
        .collect();
    let before = live();
    for s in fresh.iter_mut() {
        s.read_tls(&mut &[0x16, 0x03, 0x01, 0x02, 0x00][..])
            .unwrap();
    }
    println!(
        "{what}: one read into a new session: {:.0} B more (its read buffer)",
        per(before, live())
    );
}

fn main() {
    let dir = std::env::temp_dir().join(format!("fanstream-tls-memory-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    let server =
        fanstream::bench_api::tls_server_config(&dir.join("cert.pem"), &dir.join("key.pem"))
            .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    let client = Arc::new(
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    measure("fanstream's settings", server.clone(), client.clone());
    let mut no_tickets = (*server).clone();
    no_tickets.send_tls13_tickets = 0;
    let no_tickets = Arc::new(no_tickets);
    measure(
        "without TLS 1.3 session tickets",
        no_tickets,
        client.clone(),
    );
    let chacha_client = Arc::new(
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::CryptoProvider {
            cipher_suites: vec![rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256],
            ..rustls::crypto::ring::default_provider()
        }))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates({
            let mut r = rustls::RootCertStore::empty();
            r.add(cert.der().clone()).unwrap();
            r
        })
        .with_no_client_auth(),
    );
    measure(
        "with ChaCha20-Poly1305 (a client preferring it)",
        server,
        chacha_client,
    );
}
