//! Upstreams that misbehave, for relay tests: each answer chosen by the path asked for.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// An upstream that misbehaves in a way chosen by the path asked for, recording each request.
pub struct BadUpstream {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<(Instant, String)>>>,
    /// Connections open now: a relay that leaked its upstream sockets would pile them up here.
    pub open: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl BadUpstream {
    pub fn start() -> BadUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let open = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, o, st) = (requests.clone(), open.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut served: Vec<JoinHandle<()>> = Vec::new();
            while !st.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let (r, o, st) = (r.clone(), o.clone(), st.clone());
                        o.fetch_add(1, Ordering::SeqCst);
                        served.push(std::thread::spawn(move || {
                            answer(s, &r, &st);
                            o.fetch_sub(1, Ordering::SeqCst);
                        }));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
                // A finished thread not joined keeps its stack: joined as they end, so that a
                // test counting the process's memory sees the server's, not this thread's.
                let (done, running) = served.into_iter().partition(|t| t.is_finished());
                served = running;
                for t in done {
                    let _ = t.join();
                }
            }
            for t in served {
                let _ = t.join();
            }
        });
        BadUpstream {
            addr,
            requests,
            open,
            stop,
            thread: Some(thread),
        }
    }

    /// When each request for `path` came, and the last one's text.
    pub fn requests(&self, path: &str) -> (Vec<Instant>, String) {
        let all = self.requests.lock().unwrap();
        let mine: Vec<_> = all
            .iter()
            .filter(|(_, req)| req.starts_with(&format!("GET {path} ")))
            .collect();
        let last = mine.last().map(|(_, r)| r.clone()).unwrap_or_default();
        (mine.iter().map(|(at, _)| *at).collect(), last)
    }
}

fn answer(mut s: TcpStream, requests: &Mutex<Vec<(Instant, String)>>, stop: &AtomicBool) {
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(_) if stop.load(Ordering::SeqCst) => return,
            Err(_) => {}
        }
    }
    let req = String::from_utf8_lossy(&head).to_string();
    let path = req.split(' ').nth(1).unwrap_or_default().to_string();
    requests.lock().unwrap().push((Instant::now(), req));
    let audio = "HTTP/1.0 200 OK\r\nContent-Type: audio/mpeg\r\n";
    let reply: Vec<u8> = match path.as_str() {
        "/missing" => b"HTTP/1.0 404 Not Found\r\n\r\n".to_vec(),
        "/error" => b"HTTP/1.0 500 Internal Server Error\r\n\r\n".to_vec(),
        "/garbage" => b"\x00\x17\xfe not http at all\r\n\r\n".to_vec(),
        "/loop" => b"HTTP/1.0 302 Found\r\nLocation: /loop\r\n\r\n".to_vec(),
        // A block of 16 bytes that is not `StreamTitle=...`.
        "/badicy" => {
            format!("{audio}icy-metaint: 8\r\n\r\n12345678\x01not a title here").into_bytes()
        }
        "/stall" => format!("{audio}\r\n").into_bytes(),
        // A redirect to the URL after `?`: to another server, or from http to https.
        p if p.starts_with("/redirect?") => format!(
            "HTTP/1.0 302 Found\r\nLocation: {}\r\n\r\n",
            &p["/redirect?".len()..]
        )
        .into_bytes(),
        // A stream of one type that soon ends, and one of another type: a relay that goes from
        // the first to the second meets a content type change.
        "/briefly" => [format!("{audio}\r\n").as_bytes(), &[0x55; 4000]].concat(),
        "/ogg" => b"HTTP/1.0 200 OK\r\nContent-Type: application/ogg\r\n\r\n".to_vec(),
        _ => b"HTTP/1.0 400 Bad Request\r\n\r\n".to_vec(),
    };
    let _ = s.write_all(&reply);
    if path == "/briefly" {
        return;
    }
    // Hold the connection until the relay lets it go (the stall: silent after its head).
    while !stop.load(Ordering::SeqCst) {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return,
        }
    }
}

impl Drop for BadUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
