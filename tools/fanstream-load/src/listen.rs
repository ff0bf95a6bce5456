//! Load listeners: thousands of connections in one process on one current-thread tokio runtime,
//! each verifying every byte it receives.
//!
//! Lean on purpose, so that the server, not this tool, limits a run: one task per connection,
//! one 64 KiB read buffer shared by all of them (a current-thread runtime runs one task at a
//! time), no timer per connection (the deadline ends the runtime), and per-byte work limited to
//! the record check. Each second it prints a progress line (JSON) and at the deadline a report.
//!
//! A share of the listeners (`icy_share`) ask for ICY metadata (`Icy-MetaData: 1`): they split
//! the blocks off as a player does ([`crate::icy`]) and verify the audio between them exactly as
//! plain listeners verify theirs. The report counts them apart.
//!
//! With `tls_ca`, every listener connects over TLS (trusting that CA for the name `localhost`)
//! and reads through its session into a buffer of its own: a session cannot read into the
//! shared buffer, which must not be held across the read's await.
//!
//! On loopback, listeners connect from addresses spread over 127.0.0.0/8 ([`source_address`]),
//! as an audience comes from many: from 127.0.0.1 alone, a ramp of thousands a second met
//! fanstream's limit on request heads pending per address (`max_pending_heads_per_ip`, 64),
//! which turned away newcomers whenever the workers were a few milliseconds behind reading heads
//! (37-130 of 19,000 in a run, closed at once), a limit a real audience's ramp never meets.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::time::Duration;

use std::path::PathBuf;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;

use crate::icy::{self, IcyCounts, IcyParser};
use crate::record::{Errors, Verifier};
use crate::schedule::{unix_us, Schedule};

/// Connecting and receiving the response head must take no longer than this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Loopback addresses listeners connect from, in turn: enough that no one address has more
/// than a few pending request heads at a ramp of 2,000 a second.
const SOURCE_ADDRESSES: usize = 250;

/// The address listener `index` connects from when the server is on IPv4 loopback: one of
/// 127.0.1.1 to 127.0.1.250, in turn. Elsewhere, the system picks as for any connection.
fn source_address(index: usize, server: SocketAddr) -> Option<SocketAddr> {
    match server.ip() {
        IpAddr::V4(ip) if ip.is_loopback() => {
            let host = 1 + (index % SOURCE_ADDRESSES) as u8;
            Some(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::new(127, 0, 1, host)),
                0,
            ))
        }
        _ => None,
    }
}

/// Connects to `server` from `from` (any port), or from where the system picks.
async fn connect(server: SocketAddr, from: Option<SocketAddr>) -> io::Result<TcpStream> {
    let Some(from) = from else {
        return TcpStream::connect(server).await;
    };
    let socket = TcpSocket::new_v4()?;
    socket.bind(from)?;
    socket.connect(server).await
}

const READ_BUFFER_BYTES: usize = 64 * 1024;
const HEAD_MAX_BYTES: usize = 8 * 1024;
/// Each TLS listener's read buffer: a TLS record's plaintext is at most 16 KiB.
const TLS_READ_BYTES: usize = 16 * 1024;
/// Latencies are counted per millisecond up to this.
const LATENCY_MAX_MS: usize = 10_000;

#[derive(Clone, Debug)]
pub struct ListenOpts {
    pub addr: SocketAddr,
    pub mounts: Vec<String>,
    pub clients: usize,
    /// Spreads listeners over mounts across processes: listener `i` takes mount
    /// `(first_index + i) % mounts`.
    pub first_index: usize,
    /// Connections started per second by this process.
    pub ramp_per_sec: f64,
    pub start_us: u64,
    /// The deadline: every connection closes then.
    pub end_us: u64,
    /// Latency is sampled from here on (after the ramp and each listener's burst).
    pub measure_from_us: u64,
    pub schedule: Schedule,
    /// Bytes sent in the last this-many ms before the deadline are not owed yet (they may be in
    /// flight or held by write coalescing).
    pub allowance_ms: u64,
    /// The share of listeners that ask for ICY metadata (0 to 1).
    pub icy_share: f64,
    /// The `icy-metaint` the server was configured with; None: whatever it says.
    pub icy_metaint: Option<usize>,
    /// Connect over TLS, trusting the CA in this PEM file for the name `localhost`.
    pub tls_ca: Option<PathBuf>,
}

/// One connection's state, read by the progress lines and the report.
#[derive(Default)]
struct Conn {
    connect_us: u64,
    ttfb_us: Option<u64>,
    verifier: Verifier,
    /// Why it never streamed (connect error, HTTP status...).
    failed: Option<String>,
    /// The server closed it before the deadline.
    closed_early: bool,
    /// It asked for ICY metadata.
    wants_icy: bool,
    /// Its ICY framing, once the response head said `icy-metaint`.
    icy: Option<IcyParser>,
    /// An ICY response head without the `icy-metaint` asked for.
    icy_head_error: bool,
}

impl Conn {
    /// Integrity errors, ICY framing errors counted as corruption.
    fn errors(&self) -> Errors {
        let mut e = self.verifier.errors;
        e.corrupt += self.icy_counts().framing_errors;
        e
    }

    fn icy_counts(&self) -> IcyCounts {
        let mut c = self.icy.as_ref().map(|p| p.counts).unwrap_or_default();
        c.framing_errors += u64::from(self.icy_head_error);
        c
    }
}

/// Printed each second.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    pub streaming: usize,
    pub failed: usize,
    pub closed: usize,
    pub bytes: u64,
    pub errors: u64,
}

/// Printed at the deadline.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct ListenReport {
    pub clients: usize,
    pub streaming_at_end: usize,
    pub failed: BTreeMap<String, usize>,
    pub closed_early: usize,
    pub errors: Errors,
    pub listeners_with_errors: usize,
    pub delivered_bytes: u64,
    pub owed_bytes: u64,
    /// Listeners that got less than 99.9% of what they were owed.
    pub listeners_short: usize,
    pub ttfb_us: Vec<u64>,
    /// End-to-end latency (source send time to receipt) of every record received after
    /// `measure_from_us`: milliseconds to count.
    pub latency_ms: BTreeMap<u64, u64>,
    /// The ICY listeners among them (included in every figure above, framing errors counted as
    /// corrupt).
    pub icy: IcyReport,
}

/// The ICY listeners' share of a report.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct IcyReport {
    /// Listeners that asked for ICY metadata.
    pub clients: usize,
    pub streaming_at_end: usize,
    /// Their blocks, titles and framing errors.
    pub counts: IcyCounts,
    /// Their integrity errors (framing errors counted as corrupt).
    pub errors: Errors,
    pub listeners_with_errors: usize,
    /// Streaming ones that never saw a block.
    pub listeners_without_blocks: usize,
    pub delivered_bytes: u64,
    pub owed_bytes: u64,
}

impl IcyReport {
    pub fn add(&mut self, o: &IcyReport) {
        self.clients += o.clients;
        self.streaming_at_end += o.streaming_at_end;
        self.counts.add(&o.counts);
        self.errors.add(&o.errors);
        self.listeners_with_errors += o.listeners_with_errors;
        self.listeners_without_blocks += o.listeners_without_blocks;
        self.delivered_bytes += o.delivered_bytes;
        self.owed_bytes += o.owed_bytes;
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
pub enum Line {
    Progress(Progress),
    Report(Box<ListenReport>),
}

type Conns = Rc<Vec<RefCell<Conn>>>;

struct Shared {
    opts: ListenOpts,
    conns: Conns,
    buffer: RefCell<Vec<u8>>,
    /// Records received in the window by their latency in ms (the last slot: that or more).
    latency: RefCell<Vec<u64>>,
    /// Set when listeners connect over TLS.
    tls: Option<TlsConnector>,
}

/// A TLS client trusting only the CA at `ca`, TLS 1.3 or 1.2, ALPN `http/1.1`.
fn tls_connector(ca: &std::path::Path) -> TlsConnector {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).expect("the CA file") {
        roots
            .add(cert.expect("a CA certificate"))
            .expect("a usable CA");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    TlsConnector::from(Arc::new(config))
}

pub fn run(opts: ListenOpts) -> ListenReport {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let shared = Rc::new(Shared {
            conns: Rc::new((0..opts.clients).map(|_| RefCell::default()).collect()),
            buffer: RefCell::new(vec![0; READ_BUFFER_BYTES]),
            latency: RefCell::new(vec![0; LATENCY_MAX_MS + 1]),
            tls: opts.tls_ca.as_deref().map(tls_connector),
            opts,
        });
        let start = at(shared.opts.start_us);
        for i in 0..shared.opts.clients {
            let delay = Duration::from_secs_f64(i as f64 / shared.opts.ramp_per_sec.max(1.0));
            let s = shared.clone();
            tokio::task::spawn_local(async move {
                tokio::time::sleep_until(start + delay).await;
                listen(&s, i).await;
            });
        }
        let end = at(shared.opts.end_us);
        let mut tick =
            tokio::time::interval_at(start + Duration::from_secs(1), Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(end) => break,
                _ = tick.tick() => print_line(&Line::Progress(progress(&shared.conns))),
            }
        }
        report(&shared)
    })
}

pub fn print_line(line: &Line) {
    println!("{}", serde_json::to_string(line).expect("serialisable"));
}

/// The tokio instant of a unix time.
fn at(unix: u64) -> tokio::time::Instant {
    let now = unix_us();
    let now_i = tokio::time::Instant::now();
    if unix >= now {
        now_i + Duration::from_micros(unix - now)
    } else {
        now_i
            .checked_sub(Duration::from_micros(now - unix))
            .unwrap_or(now_i)
    }
}

async fn listen(s: &Shared, i: usize) {
    let conn = &s.conns[i];
    let index = s.opts.first_index + i;
    let wants_icy = icy::is_icy(index, s.opts.mounts.len(), s.opts.icy_share);
    {
        let mut c = conn.borrow_mut();
        c.connect_us = unix_us();
        c.wants_icy = wants_icy;
    }
    let mount = &s.opts.mounts[index % s.opts.mounts.len()];
    if let Some(tls) = &s.tls {
        let from = source_address(index, s.opts.addr);
        return listen_tls(s, conn, tls, from, mount, wants_icy).await;
    }
    let opened = open(
        s.opts.addr,
        source_address(index, s.opts.addr),
        mount,
        wants_icy,
    );
    let stream = match tokio::time::timeout(CONNECT_TIMEOUT, opened).await {
        Ok(Ok((stream, metaint, body))) => {
            headed(s, conn, wants_icy, metaint, &body);
            stream
        }
        Ok(Err(e)) => return conn.borrow_mut().failed = Some(e),
        Err(_) => return conn.borrow_mut().failed = Some("timeout".into()),
    };
    loop {
        if stream.readable().await.is_err() {
            break;
        }
        let mut buf = s.buffer.borrow_mut();
        match stream.try_read(&mut buf) {
            Ok(0) => break,
            Ok(n) => received(s, conn, &buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    conn.borrow_mut().closed_early = true;
}

/// Takes a response head's `icy-metaint` and the body bytes that came with it.
fn headed(s: &Shared, conn: &RefCell<Conn>, wants_icy: bool, metaint: Option<usize>, body: &[u8]) {
    if wants_icy {
        let mut c = conn.borrow_mut();
        // A player uses the interval it is told; one other than the server was given, or
        // none, is an error.
        c.icy_head_error =
            metaint.is_none() || s.opts.icy_metaint.is_some_and(|want| metaint != Some(want));
        c.icy = metaint.filter(|m| *m > 0).map(IcyParser::new);
    }
    if !body.is_empty() {
        received(s, conn, body);
    }
}

/// A listener over TLS: connects, shakes hands, asks, and reads through its session until the
/// server closes or the deadline ends the runtime.
async fn listen_tls(
    s: &Shared,
    conn: &RefCell<Conn>,
    tls: &TlsConnector,
    from: Option<SocketAddr>,
    mount: &str,
    wants_icy: bool,
) {
    let opened = async {
        let tcp = connect(s.opts.addr, from)
            .await
            .map_err(|e| format!("connect: {}", e.kind()))?;
        tcp.set_zero_linger().ok();
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("a name");
        let mut stream = tls
            .connect(name, tcp)
            .await
            .map_err(|e| format!("tls: {e}"))?;
        let (metaint, body) = request_head(&mut stream, s.opts.addr, mount, wants_icy).await?;
        Ok::<_, String>((stream, metaint, body))
    };
    let mut stream = match tokio::time::timeout(CONNECT_TIMEOUT, opened).await {
        Ok(Ok((stream, metaint, body))) => {
            headed(s, conn, wants_icy, metaint, &body);
            stream
        }
        Ok(Err(e)) => return conn.borrow_mut().failed = Some(e),
        Err(_) => return conn.borrow_mut().failed = Some("timeout".into()),
    };
    let mut buf = vec![0u8; TLS_READ_BYTES];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => received(s, conn, &buf[..n]),
        }
    }
    conn.borrow_mut().closed_early = true;
}

/// Sends the request on any stream and reads the response head: its `icy-metaint`, and the body
/// bytes that came with it, or why it failed.
async fn request_head<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    addr: SocketAddr,
    mount: &str,
    icy: bool,
) -> Result<(Option<usize>, Vec<u8>), String> {
    let icy = if icy { "Icy-MetaData: 1\r\n" } else { "" };
    let req =
        format!("GET {mount} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: fanstream-load\r\n{icy}\r\n");
    stream
        .write_all(req.as_bytes())
        .await
        .map_err(|e| format!("request: {}", e.kind()))?;
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 2048];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => return Err("closed before the head".into()),
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("head: {}", e.kind())),
        }
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            let text = String::from_utf8_lossy(&head[..end]);
            let status = text.split_whitespace().nth(1).unwrap_or("?").to_string();
            if status != "200" {
                return Err(format!("http {status}"));
            }
            let metaint = icy::metaint_of(&text);
            return Ok((metaint, head.split_off(end + 4)));
        }
        if head.len() > HEAD_MAX_BYTES {
            return Err("head too large".into());
        }
    }
}

/// Connects, sends the request (asking for ICY metadata if `icy`) and reads the response head:
/// the stream, the head's `icy-metaint` and any body bytes that came with the head, or why it
/// failed.
async fn open(
    addr: SocketAddr,
    from: Option<SocketAddr>,
    mount: &str,
    icy: bool,
) -> Result<(TcpStream, Option<usize>, Vec<u8>), String> {
    let mut stream = connect(addr, from)
        .await
        .map_err(|e| format!("connect: {}", e.kind()))?;
    // Closing with a reset leaves no TIME_WAIT behind: a sweep opens tens of thousands of
    // connections from loopback's one address and would run out of ephemeral ports.
    stream.set_zero_linger().ok();
    let icy = if icy { "Icy-MetaData: 1\r\n" } else { "" };
    let req =
        format!("GET {mount} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: fanstream-load\r\n{icy}\r\n");
    stream
        .write_all(req.as_bytes())
        .await
        .map_err(|e| format!("request: {}", e.kind()))?;
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 2048];
    loop {
        stream
            .readable()
            .await
            .map_err(|e| format!("head: {}", e.kind()))?;
        match stream.try_read(&mut buf) {
            Ok(0) => return Err("closed before the head".into()),
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(format!("head: {}", e.kind())),
        }
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            let text = String::from_utf8_lossy(&head[..end]);
            let status = text.split_whitespace().nth(1).unwrap_or("?").to_string();
            if status != "200" {
                return Err(format!("http {status}"));
            }
            let metaint = icy::metaint_of(&text);
            return Ok((stream, metaint, head.split_off(end + 4)));
        }
        if head.len() > HEAD_MAX_BYTES {
            return Err("head too large".into());
        }
    }
}

fn received(s: &Shared, conn: &RefCell<Conn>, data: &[u8]) {
    let now = unix_us();
    let mut c = conn.borrow_mut();
    if c.ttfb_us.is_none() {
        c.ttfb_us = Some(now.saturating_sub(c.connect_us));
    }
    let Conn { verifier, icy, .. } = &mut *c;
    if now >= s.opts.measure_from_us {
        let mut latency = s.latency.borrow_mut();
        let last = latency.len() - 1;
        let mut f = |sent: u64| {
            latency[((now.saturating_sub(sent) / 1000) as usize).min(last)] += 1;
        };
        match icy {
            Some(p) => p.feed(data, verifier, &mut f),
            None => verifier.feed(data, &mut f),
        }
    } else {
        match icy {
            Some(p) => p.feed(data, verifier, &mut |_| {}),
            None => verifier.feed(data, &mut |_| {}),
        }
    }
}

fn progress(conns: &Conns) -> Progress {
    let mut p = Progress::default();
    for c in conns.iter() {
        let c = c.borrow();
        if c.failed.is_some() {
            p.failed += 1;
        } else if c.closed_early {
            p.closed += 1;
        } else if c.ttfb_us.is_some() {
            p.streaming += 1;
        }
        p.bytes += c.verifier.delivered_bytes();
        p.errors += c.errors().total();
    }
    p
}

fn report(s: &Shared) -> ListenReport {
    let o = &s.opts;
    let owed_until = o.end_us.saturating_sub(o.allowance_ms * 1000);
    let sent_then = o.schedule.sent_by(owed_until);
    let mut r = ListenReport {
        clients: o.clients,
        latency_ms: (s.latency.borrow().iter().enumerate())
            .filter(|(_, n)| **n > 0)
            .map(|(ms, n)| (ms as u64, *n))
            .collect(),
        ..ListenReport::default()
    };
    for c in s.conns.iter() {
        let c = c.borrow();
        let v = &c.verifier;
        if c.connect_us == 0 {
            // Its turn in the ramp never came: the run was shorter than the ramp.
            *r.failed.entry("not started".into()).or_default() += 1;
            continue;
        }
        // Owed from where it joined, or from when it asked if it never did.
        let owed = match v.joined_at() {
            Some(j) => sent_then.saturating_sub(j),
            None => sent_then.saturating_sub(o.schedule.sent_by(c.connect_us)),
        };
        let delivered = v.delivered_bytes().min(owed);
        r.owed_bytes += owed;
        r.delivered_bytes += delivered;
        if (delivered as f64) < owed as f64 * 0.999 {
            r.listeners_short += 1;
        }
        let errors = c.errors();
        r.errors.add(&errors);
        if errors.total() > 0 {
            r.listeners_with_errors += 1;
        }
        let streaming = c.failed.is_none() && !c.closed_early && c.ttfb_us.is_some();
        if c.wants_icy {
            let i = &mut r.icy;
            i.clients += 1;
            i.streaming_at_end += usize::from(streaming);
            let counts = c.icy_counts();
            i.counts.add(&counts);
            i.errors.add(&errors);
            i.listeners_with_errors += usize::from(errors.total() > 0);
            i.listeners_without_blocks += usize::from(streaming && counts.blocks == 0);
            i.delivered_bytes += delivered;
            i.owed_bytes += owed;
        }
        if let Some(t) = c.ttfb_us {
            r.ttfb_us.push(t);
        }
        if let Some(why) = &c.failed {
            *r.failed.entry(why.clone()).or_default() += 1;
        } else if c.closed_early {
            r.closed_early += 1;
        } else if c.ttfb_us.is_some() {
            r.streaming_at_end += 1;
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_listeners_come_from_spread_addresses() {
        let server: SocketAddr = "127.0.0.1:8000".parse().unwrap();
        let from: std::collections::BTreeSet<_> = (0..1000)
            .map(|i| source_address(i, server).unwrap().ip())
            .collect();
        assert_eq!(from.len(), SOURCE_ADDRESSES);
        assert!(from
            .iter()
            .all(|ip| matches!(ip, IpAddr::V4(v4) if v4.octets()[..3] == [127, 0, 1] && v4.octets()[3] >= 1)));
        assert_eq!(source_address(0, "[::1]:8000".parse().unwrap()), None);
        assert_eq!(source_address(0, "10.0.0.1:8000".parse().unwrap()), None);
    }
}
