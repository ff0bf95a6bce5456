//! Shared test support: an in-process server on loopback ephemeral ports, raw source and listener
//! clients, a verifiable byte pattern, and waiting on /metrics with deadlines.
#![allow(dead_code)] // each test binary uses its own part of this module

pub mod certs;
pub mod clients;
pub mod devtools;
pub mod media;
pub mod process;
pub mod upstream;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use base64::Engine;
use fanstream::config::Startup;
use fanstream::{Config, Server, Stop};

pub const PASSWORD: &str = "test-secret";
/// Generous: CI machines are shared and slow; conditions normally hold in milliseconds.
pub const DEADLINE: Duration = Duration::from_secs(30);

pub struct TestServer {
    pub server: Option<Server>,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    /// The TLS port, when started with [`TestServer::start_tls`].
    pub tls: Option<SocketAddr>,
}

/// The config tests start from: 2 unpinned workers, no demo, a known password, a 1 s grace.
pub fn test_config() -> Config {
    let mut config = Config {
        startup: Startup {
            workers: 2,
            pin_workers: false,
            demo: false,
            ..Startup::default()
        },
        source_password: Some(PASSWORD.into()),
        ..Config::default()
    };
    config.defaults.source_grace_secs = 1;
    config
}

impl TestServer {
    /// Starts a server with test defaults (2 unpinned workers, no demo, a known password), then
    /// lets `adjust` change the config.
    pub fn start(adjust: impl FnOnce(&mut Config)) -> TestServer {
        TestServer::start_on("127.0.0.1:0".parse().unwrap(), adjust, false)
    }

    /// [`TestServer::start`] with a TLS port on loopback too; `adjust` must set `tls_cert` and
    /// `tls_key`.
    pub fn start_tls(adjust: impl FnOnce(&mut Config)) -> TestServer {
        TestServer::start_on("127.0.0.1:0".parse().unwrap(), adjust, true)
    }

    /// Like [`TestServer::start`], listening on `listen` (to bring a stopped server back on its
    /// address).
    pub fn start_at(listen: SocketAddr, adjust: impl FnOnce(&mut Config)) -> TestServer {
        TestServer::start_on(listen, adjust, false)
    }

    /// Like [`TestServer::start`], on a listener the test bound first: its address is known
    /// before the config is (an edge's `public_url`).
    pub fn start_on_listener(
        listener: TcpListener,
        adjust: impl FnOnce(&mut Config),
    ) -> TestServer {
        TestServer::start_with(listener, adjust, false)
    }

    fn start_on(listen: SocketAddr, adjust: impl FnOnce(&mut Config), tls: bool) -> TestServer {
        TestServer::start_with(TcpListener::bind(listen).unwrap(), adjust, tls)
    }

    fn start_with(
        listener: TcpListener,
        adjust: impl FnOnce(&mut Config),
        tls: bool,
    ) -> TestServer {
        let mut config = test_config();
        adjust(&mut config);
        let admin = TcpListener::bind("127.0.0.1:0").unwrap();
        let tls_listener = tls.then(|| TcpListener::bind("127.0.0.1:0").unwrap());
        let server = Server::start_with_tls(config, listener, Some(admin), tls_listener)
            .expect("server starts");
        TestServer {
            addr: server.listen_addr(),
            admin: server.admin_addr().unwrap(),
            tls: server.tls_addr(),
            server: Some(server),
        }
    }

    pub fn metrics(&self) -> String {
        let (_, _, body) = request(self.admin, b"GET /metrics HTTP/1.0\r\n\r\n");
        String::from_utf8(body).unwrap()
    }

    /// Sum of a metric's samples whose labels include all of `labels` (e.g. `mount="/live"`).
    pub fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        metric_value(&self.metrics(), name, labels)
    }

    /// Waits until the metric satisfies `ok`, failing the test with the last value at the deadline.
    pub fn wait_metric(&self, name: &str, labels: &[&str], ok: impl Fn(f64) -> bool) -> f64 {
        let start = Instant::now();
        loop {
            let v = self.metric(name, labels);
            if ok(v) {
                return v;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "timed out waiting on {name}{labels:?}; last value {v}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn stop(&mut self, how: Stop) {
        if let Some(s) = self.server.take() {
            s.stop(how);
            s.join();
        }
    }
}

/// Declares `mount` in the config with the `[defaults]` settings as they stand (so adjust them
/// first). A declared mount keeps its series once its source has left, where an undeclared
/// mount's go with it: tests that read a mount's counters after its grace period declare it.
pub fn declare(config: &mut Config, mount: &str) {
    config
        .mounts
        .insert(mount.to_string(), config.defaults.clone());
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop(Stop::Now);
    }
}

pub fn metric_value(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            (metric == name && labels.iter().all(|lab| rest.contains(lab)))
                .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// Polls `cond` until it holds or the deadline passes.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sends raw bytes, reads the whole answer until the server closes: (status, head, body).
pub fn request(addr: SocketAddr, raw: &[u8]) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(raw).unwrap();
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    split_response(&all)
}

pub fn split_response(all: &[u8]) -> (u16, String, Vec<u8>) {
    let end = find(all, b"\r\n\r\n").unwrap_or_else(|| {
        panic!(
            "no complete response head in {:?}",
            String::from_utf8_lossy(all)
        )
    });
    let head = String::from_utf8_lossy(&all[..end + 4]).to_string();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    (status, head, all[end + 4..].to_vec())
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

pub fn basic(user: &str, pass: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
}

/// A source connected with `PUT`, past its `200 OK`.
pub struct Source {
    pub stream: TcpStream,
}

impl Source {
    pub fn connect(addr: SocketAddr, mount: &str) -> Source {
        let head = format!(
            "PUT {mount} HTTP/1.1\r\nHost: test\r\nAuthorization: Basic {}\r\nContent-Type: audio/mpeg\r\nIce-Name: Test Radio\r\nIce-Genre: Test\r\nIce-Bitrate: 128\r\n\r\n",
            basic("source", PASSWORD)
        );
        Source::connect_raw(addr, head.as_bytes())
    }

    /// A `PUT` source announcing `content_type` (e.g. `audio/aac`, `audio/ogg`).
    pub fn connect_typed(addr: SocketAddr, mount: &str, content_type: &str) -> Source {
        let head = format!(
            "PUT {mount} HTTP/1.1\r\nHost: test\r\nAuthorization: Basic {}\r\nContent-Type: {content_type}\r\nIce-Name: Test Radio\r\n\r\n",
            basic("source", PASSWORD)
        );
        Source::connect_raw(addr, head.as_bytes())
    }

    /// Sends `bytes` in pieces of `piece` bytes at `bytes_per_sec`, on an absolute schedule (as an
    /// encoder writing whatever sizes it likes in real time), until all are sent or `stop` holds.
    pub fn send_paced(
        &mut self,
        bytes: &[u8],
        piece: usize,
        bytes_per_sec: u64,
        stop: &std::sync::atomic::AtomicBool,
    ) {
        let start = Instant::now();
        let mut sent = 0usize;
        for chunk in bytes.chunks(piece) {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                return;
            }
            let due = Duration::from_secs_f64(sent as f64 / bytes_per_sec as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
            self.send(chunk);
            sent += chunk.len();
        }
    }

    /// Sends `head` and reads the answer up to the end of its head; panics unless it is 200.
    pub fn connect_raw(addr: SocketAddr, head: &[u8]) -> Source {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        stream.write_all(head).unwrap();
        let answer = read_head(&mut stream);
        assert!(
            answer.starts_with("HTTP/1.0 200"),
            "source refused: {answer:?}"
        );
        Source { stream }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Sends the pattern from `from` to `to` in pieces of `piece` bytes, pausing `pause` between.
    pub fn send_pattern(&mut self, from: u64, to: u64, piece: usize, pause: Duration) {
        let mut at = from;
        while at < to {
            let n = (piece as u64).min(to - at);
            self.send(&pattern(at, n as usize));
            at += n;
            if !pause.is_zero() {
                std::thread::sleep(pause);
            }
        }
    }

    /// Goes on sending the pattern from `from` on its own thread, `piece` bytes every `pause`, as
    /// a live encoder does, until [`Writing::stop`].
    pub fn keep_writing(mut self, from: u64, piece: usize, pause: Duration) -> Writing {
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = std::thread::spawn({
            let done = done.clone();
            move || {
                let mut at = from;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    self.send_pattern(at, at + piece as u64, piece, pause);
                    at += piece as u64;
                }
                at
            }
        });
        Writing { done, thread }
    }
}

/// A source writing on its own thread ([`Source::keep_writing`]).
pub struct Writing {
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl Writing {
    /// Stops after the piece being sent; returns where the stream it sent ends.
    pub fn stop(self) -> u64 {
        self.done.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().expect("the writing source")
    }
}

/// `Read::read`, retried on EINTR. A read with a timeout returns EINTR when the process was
/// stopped and resumed (SIGSTOP/SIGCONT, as a loaded machine's job control does), handler or
/// not; that is neither an error of the server nor the end of the stream.
pub fn read_some(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match r.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

/// Reads a response head byte by byte, so that no body byte is consumed.
pub fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match read_some(stream, &mut b) {
            Ok(1) => head.push(b[0]),
            other => panic!(
                "connection ended inside a response head ({other:?}): {:?}",
                String::from_utf8_lossy(&head)
            ),
        }
    }
    String::from_utf8(head).unwrap()
}

/// A listener past its response head.
pub struct Listener {
    pub stream: TcpStream,
    pub head: String,
    pub body: Vec<u8>,
}

impl Listener {
    pub fn connect(addr: SocketAddr, mount: &str) -> Listener {
        let stream = TcpStream::connect(addr).unwrap();
        Listener::on(stream, mount)
    }

    /// A listener whose receive buffer is tiny, so that it stalls quickly when it stops reading.
    pub fn connect_small_buffer(addr: SocketAddr, mount: &str) -> Listener {
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        sock.connect(&addr.into()).unwrap();
        Listener::on(sock.into(), mount)
    }

    fn on(mut stream: TcpStream, mount: &str) -> Listener {
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        write!(
            stream,
            "GET {mount} HTTP/1.1\r\nHost: test\r\nUser-Agent: fanstream-test\r\n\r\n"
        )
        .unwrap();
        let head = read_head(&mut stream);
        assert!(
            head.starts_with("HTTP/1.0 200 OK\r\n"),
            "listener refused: {head:?}"
        );
        Listener {
            stream,
            head,
            body: Vec::new(),
        }
    }

    /// Reads until at least `n` body bytes have arrived.
    pub fn read_at_least(&mut self, n: usize) {
        let mut buf = vec![0u8; 64 * 1024];
        while self.body.len() < n {
            match read_some(&mut self.stream, &mut buf) {
                Ok(0) => panic!("stream ended after {} of {n} bytes", self.body.len()),
                Ok(k) => self.body.extend_from_slice(&buf[..k]),
                Err(e) => panic!("read failed after {} of {n} bytes: {e}", self.body.len()),
            }
        }
    }

    /// Reads until the server closes the stream.
    pub fn read_to_end(&mut self) {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match read_some(&mut self.stream, &mut buf) {
                Ok(0) => return,
                Ok(k) => self.body.extend_from_slice(&buf[..k]),
                Err(e) => panic!("read failed after {} bytes: {e}", self.body.len()),
            }
        }
    }
}

// The verifiable stream: 8-byte little-endian words, word k = k * ODD. Any 16 received bytes tell
// their absolute offset (multiplying by the inverse recovers k), so a listener's capture is
// checked byte for byte against the stream from its own join point.
const ODD: u64 = 0x9E37_79B9_7F4A_7C15;

fn inverse(a: u64) -> u64 {
    // Newton's iteration for the inverse of an odd number modulo 2^64.
    let mut x = a;
    for _ in 0..6 {
        x = x.wrapping_mul(2u64.wrapping_sub(a.wrapping_mul(x)));
    }
    x
}

/// The stream's bytes from `offset`, `len` of them.
pub fn pattern(offset: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 16);
    let mut k = offset / 8;
    let skip = (offset % 8) as usize;
    while out.len() < len + skip {
        out.extend_from_slice(&k.wrapping_mul(ODD).to_le_bytes());
        k += 1;
    }
    out.drain(..skip);
    out.truncate(len);
    out
}

/// The absolute offset of the stream position `bytes` starts at, if it is a pattern position.
pub fn locate(bytes: &[u8]) -> Option<u64> {
    let inv = inverse(ODD);
    for align in 0..8usize {
        if bytes.len() < align + 16 {
            return None;
        }
        let word = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap());
        let k = word(align).wrapping_mul(inv);
        if k < (1 << 40) && word(align + 8) == (k + 1).wrapping_mul(ODD) {
            let offset = (k * 8).checked_sub(align as u64)?;
            return Some(offset);
        }
    }
    None
}

/// Asserts that `received` is exactly the stream from its join point to `end`; returns the join
/// point.
pub fn assert_exact_suffix(received: &[u8], end: u64, who: &str) -> u64 {
    let start = locate(received).unwrap_or_else(|| {
        panic!(
            "{who}: received {} bytes that are not the stream",
            received.len()
        )
    });
    assert_eq!(
        start + received.len() as u64,
        end,
        "{who}: joined at {start}, received {} bytes, stream ended at {end}",
        received.len()
    );
    let expected = pattern(start, received.len());
    if let Some(i) = received.iter().zip(&expected).position(|(a, b)| a != b) {
        panic!("{who}: byte {i} after join point {start} differs");
    }
    start
}

/// Splits `received` into runs that are each exact pieces of the stream, in increasing order
/// (a listener moved to the live edge shows several): returns (offset, len) per run.
pub fn exact_runs(received: &[u8]) -> Vec<(u64, usize)> {
    let mut runs = Vec::new();
    let mut at = 0;
    while at < received.len() {
        let rest = &received[at..];
        let start = locate(rest).unwrap_or_else(|| panic!("bytes at {at} are not the stream"));
        let expected = pattern(start, rest.len());
        let len = rest
            .iter()
            .zip(&expected)
            .position(|(a, b)| a != b)
            .unwrap_or(rest.len());
        if let Some(&(prev, plen)) = runs.last() {
            assert!(
                start >= prev + plen as u64,
                "run at {start} goes back before {}",
                prev + plen as u64
            );
        }
        runs.push((start, len));
        at += len;
    }
    runs
}

#[test]
fn pattern_offsets_are_recovered_at_any_alignment() {
    for off in [0u64, 1, 7, 8, 9, 1000, 123_457] {
        let p = pattern(off, 100);
        assert_eq!(locate(&p), Some(off), "offset {off}");
    }
    let mut joined = pattern(5, 50);
    joined.extend(pattern(300, 50));
    assert_eq!(exact_runs(&joined), vec![(5, 50), (300, 50)]);
}

impl Listener {
    /// Reads and checks every byte until the stream is had up to `last` (`u64::MAX` until the
    /// source has sent its last byte), the server closes, or the deadline after `last` is set
    /// passes; `who` names the listener if a read fails.
    pub fn check_until(mut self, last: &std::sync::atomic::AtomicU64, who: &str) -> StreamCheck {
        let mut check = StreamCheck::default();
        check.feed(&self.body);
        self.stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let mut deadline = None;
        loop {
            let target = last.load(std::sync::atomic::Ordering::Relaxed);
            if target != u64::MAX {
                if check.next.is_some_and(|n| n >= target) {
                    break;
                }
                if Instant::now() > *deadline.get_or_insert_with(|| Instant::now() + DEADLINE) {
                    break;
                }
            }
            match read_some(&mut self.stream, &mut buf) {
                Ok(0) => break,
                Ok(n) => check.feed(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("{who} failed: {e}"),
            }
        }
        check
    }
}

/// Checks a listener's bytes as they arrive, without keeping them: the first 16 bytes tell the
/// join point, every later byte must continue the stream exactly.
#[derive(Default)]
pub struct StreamCheck {
    head: Vec<u8>,
    /// Offset of the next expected byte, once known.
    pub next: Option<u64>,
    pub bytes: u64,
    /// Bytes that differed from the stream (a gap, a duplicate or corruption shows here).
    pub mismatches: u64,
}

impl StreamCheck {
    pub fn feed(&mut self, data: &[u8]) {
        self.bytes += data.len() as u64;
        let data = match self.next {
            Some(_) => data,
            None => {
                self.head.extend_from_slice(data);
                if self.head.len() < 24 {
                    return;
                }
                let Some(start) = locate(&self.head) else {
                    self.mismatches += self.head.len() as u64;
                    self.head.clear();
                    return;
                };
                self.next = Some(start);
                let head = std::mem::take(&mut self.head);
                return self.compare(&head);
            }
        };
        self.compare(data);
    }

    fn compare(&mut self, data: &[u8]) {
        let at = self.next.expect("join point known");
        let expected = pattern(at, data.len());
        self.mismatches += data.iter().zip(&expected).filter(|(a, b)| a != b).count() as u64;
        self.next = Some(at + data.len() as u64);
    }
}

#[test]
fn stream_check_catches_gaps_and_corruption() {
    let mut ok = StreamCheck::default();
    for piece in pattern(1234, 10_000).chunks(7) {
        ok.feed(piece);
    }
    assert_eq!((ok.mismatches, ok.next), (0, Some(11_234)));
    let mut gap = StreamCheck::default();
    gap.feed(&pattern(0, 100));
    gap.feed(&pattern(108, 100));
    assert!(gap.mismatches > 0);
    let mut bad = StreamCheck::default();
    let mut p = pattern(0, 100);
    p[50] ^= 1;
    bad.feed(&p);
    assert_eq!(bad.mismatches, 1);
}

/// A plain listener's bytes over `secs` of wall time (or until the stream ends).
pub fn capture_for(addr: SocketAddr, mount: &str, secs: f64) -> Vec<u8> {
    let mut l = Listener::connect(addr, mount);
    l.stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut buf = vec![0u8; 64 * 1024];
    while Instant::now() < end {
        match l.stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => l.body.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    l.body
}

/// A listener from now on, read on a thread until `stop` (or the stream ends): what a player
/// connected across a change receives.
pub fn background_capture(
    addr: SocketAddr,
    mount: &str,
    stop: &'static std::sync::atomic::AtomicBool,
) -> std::thread::JoinHandle<Vec<u8>> {
    let mut l = Listener::connect(addr, mount);
    std::thread::spawn(move || {
        l.stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            match l.stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => l.body.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
        }
        l.body
    })
}
