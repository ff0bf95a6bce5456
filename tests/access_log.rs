//! The access log: after a run, one combined-format line per listener (with the bytes it got and
//! the seconds it stayed) and per request, parsed; and the real binary reopening it on `SIGHUP`
//! after a logrotate-style rename.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::clients::*;
use common::process::scratch_dir;
use common::*;
use fanstream::Stop;

/// One line as Icecast writes it: `IP - - [DATE] "REQUEST" STATUS BYTES "REFERER" "AGENT" SECS`.
#[derive(Debug)]
struct Line {
    ip: String,
    date: String,
    request: String,
    status: u16,
    bytes: u64,
    referer: String,
    agent: String,
    seconds: u64,
}

fn not_a_line<T>(line: &str) -> T {
    panic!("not a combined log line: {line:?}")
}

fn parse_line(line: &str) -> Line {
    let (ip, rest) = line
        .split_once(" - - [")
        .unwrap_or_else(|| not_a_line(line));
    let (date, rest) = rest.split_once("] \"").unwrap_or_else(|| not_a_line(line));
    let (request, rest) = rest.split_once("\" ").unwrap_or_else(|| not_a_line(line));
    let mut words = rest.splitn(3, ' ');
    let status = words
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| not_a_line(line));
    let bytes = words
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| not_a_line(line));
    let rest = words.next().unwrap_or_else(|| not_a_line(line));
    let quoted: Vec<&str> = rest.split('"').collect();
    let [_, referer, _, agent, secs] = quoted[..] else {
        return not_a_line(line);
    };
    Line {
        ip: ip.into(),
        date: date.into(),
        request: request.into(),
        status,
        bytes,
        referer: referer.into(),
        agent: agent.into(),
        seconds: secs.trim().parse().unwrap_or_else(|_| not_a_line(line)),
    }
}

/// A listener with its own User-Agent and Referer, past its response head.
fn listen(addr: SocketAddr, agent: &str) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(
        s,
        "GET /live HTTP/1.1\r\nHost: test\r\nUser-Agent: {agent}\r\nReferer: http://player.example/\r\n\r\n"
    )
    .unwrap();
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.0 200"), "{head}");
    (s, head)
}

fn read_n(s: &mut TcpStream, n: usize) {
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).unwrap();
}

fn lines(path: &Path) -> Vec<Line> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(parse_line)
        .collect()
}

#[test]
fn every_listener_and_request_has_its_line_after_a_run() {
    let dir = scratch_dir("access_log_run");
    let path = dir.join("access.log");
    let log = path.to_str().unwrap().to_string();
    let mut srv = TestServer::start(|c| c.startup.access_log = Some(log));
    let mut source = Source::connect(srv.addr, "/live");
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let feeder = thread::spawn(move || {
        source.send_paced(&pattern(0, 64 << 20), 1000, 64_000, &flag);
    });

    let started = Instant::now();
    let (mut a, head_a) = listen(srv.addr, "agent-a");
    let (mut b, _) = listen(srv.addr, "agent-b");
    let (mut c, _) = listen(srv.addr, "agent-c");
    read_n(&mut a, 10_000);
    read_n(&mut b, 20_000);
    // `a` leaves after about a second, `b` after two; `c` stays until the server stops.
    thread::sleep(Duration::from_secs(1));
    drop(a);
    read_n(&mut c, 50_000);
    wait_until("b held two seconds", || {
        started.elapsed() > Duration::from_secs(2)
    });
    drop(b);
    srv.wait_metric("fanstream_listeners", &["mount=\"/live\""], |v| v == 1.0);
    let (status, _, _) = request(srv.addr, b"GET /status.json HTTP/1.0\r\n\r\n");
    assert_eq!(status, 200);
    let (status, _, _) = request(
        srv.addr,
        b"GET /nowhere HTTP/1.1\r\nUser-Agent: lost\r\n\r\n",
    );
    assert_eq!(status, 404);
    stop.store(true, Ordering::Relaxed);
    feeder.join().unwrap();
    srv.stop(Stop::Now);
    drop(c);

    let all = lines(&path);
    let listeners: Vec<&Line> = all
        .iter()
        .filter(|l| l.request == "GET /live HTTP/1.1")
        .collect();
    assert_eq!(listeners.len(), 3, "one line per listener: {all:#?}");
    // Seconds connected run until the server finds the listener gone, at its next write (up to
    // `max_write_delay_ms`, 1 s, later), and stretch on a busy machine: bounds, not values.
    for (agent, at_least, seconds) in [
        ("agent-a", 10_000, 1..=4),
        ("agent-b", 20_000, 2..=5),
        ("agent-c", 50_000, 2..=15),
    ] {
        let l = listeners
            .iter()
            .find(|l| l.agent == agent)
            .unwrap_or_else(|| panic!("no line for {agent}: {all:#?}"));
        assert_eq!(l.ip, "127.0.0.1");
        assert_eq!(l.status, 200);
        assert_eq!(l.referer, "http://player.example/");
        // What the kernel saw acknowledged: at least the head and what the client read.
        assert!(
            l.bytes >= (head_a.len() + at_least) as u64,
            "{agent} got at least {at_least} bytes: {l:?}"
        );
        assert!(seconds.contains(&l.seconds), "{agent}: {l:?}");
        assert_eq!(l.date.len(), 26, "{l:?}");
        assert!(l.date.ends_with(" +0000"), "{l:?}");
    }
    let status = all
        .iter()
        .find(|l| l.request == "GET /status.json HTTP/1.0")
        .unwrap_or_else(|| panic!("{all:#?}"));
    assert_eq!((status.status, status.referer.as_str()), (200, "-"));
    assert!(status.bytes > 100);
    let lost = all
        .iter()
        .find(|l| l.request == "GET /nowhere HTTP/1.1")
        .unwrap_or_else(|| panic!("{all:#?}"));
    assert_eq!((lost.status, lost.agent.as_str()), (404, "lost"));
    // The source too, with the bytes it sent (at 64 KB/s for some seconds).
    let source = all
        .iter()
        .find(|l| l.request == "PUT /live HTTP/1.1")
        .unwrap_or_else(|| panic!("{all:#?}"));
    assert_eq!(source.status, 200);
    assert!(source.bytes > 100_000 && source.seconds >= 2, "{source:?}");
    // And the scrapes of /metrics the test made on the admin port: nothing else.
    let others: Vec<_> = all
        .iter()
        .filter(|l| l.request != "GET /metrics HTTP/1.0")
        .collect();
    assert_eq!(
        others.len(),
        6,
        "three listeners, two requests, a source: {all:#?}"
    );
}

#[test]
fn sighup_reopens_the_access_log_after_logrotate_moved_it() {
    let dir = scratch_dir("access_log_sighup");
    let path = dir.join("access.log");
    let server = fanstream(
        &dir,
        &format!("access_log = {:?}\n", path.to_str().unwrap()),
    );
    let get = |what: &str| {
        let raw = format!("GET /status.json?{what} HTTP/1.0\r\n\r\n");
        assert_eq!(request(server.addr, raw.as_bytes()).0, 200);
    };
    get("before");
    wait_until("the first line", || {
        std::fs::read_to_string(&path).is_ok_and(|t| t.contains("?before"))
    });
    // logrotate: rename, then SIGHUP.
    let rotated = dir.join("access.log.1");
    std::fs::rename(&path, &rotated).unwrap();
    server.program.guard.signal(libc::SIGHUP);
    wait_until("a new access.log", || path.exists());
    get("after");
    wait_until("the line after the rotation in the new file", || {
        std::fs::read_to_string(&path).is_ok_and(|t| t.contains("?after"))
    });
    let old = std::fs::read_to_string(&rotated).unwrap();
    assert!(old.contains("?before") && !old.contains("?after"), "{old}");
}
