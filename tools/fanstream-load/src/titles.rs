//! Title updates during a run, as an encoder sends them: `GET /admin/metadata?mode=updinfo&
//! mount=/m&song=TEXT` with HTTP Basic credentials, every few seconds on every mount, so that ICY
//! listeners get blocks with titles and not only empty ones. Title `k` reads
//! `fanstream-load title k`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base64::Engine;

const TIMEOUT: Duration = Duration::from_secs(5);

/// What the updater did, for the summary.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct TitleReport {
    /// Updates answered `200`.
    pub sent: u64,
    /// Updates refused or unanswered.
    pub failed: u64,
}

pub struct RunningTitles {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<TitleReport>,
}

impl RunningTitles {
    pub fn stop(self) -> TitleReport {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// Updates the title of every mount every `every`, the first time at once, on its own thread.
pub fn start(
    addr: SocketAddr,
    mounts: Vec<String>,
    user: &str,
    password: &str,
    every: Duration,
) -> RunningTitles {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let thread = std::thread::Builder::new()
        .name("load-titles".into())
        .spawn(move || {
            let mut report = TitleReport::default();
            let start = Instant::now();
            for k in 1u64.. {
                for mount in &mounts {
                    match update(addr, mount, &auth, k) {
                        Ok(()) => report.sent += 1,
                        Err(e) => {
                            report.failed += 1;
                            eprintln!("title update {k} on {mount}: {e}");
                        }
                    }
                }
                let due = start + every.mul_f64(k as f64);
                while Instant::now() < due {
                    if flag.load(Ordering::Relaxed) {
                        return report;
                    }
                    std::thread::sleep((due - Instant::now()).min(Duration::from_millis(50)));
                }
            }
            report
        })
        .expect("spawn title thread");
    RunningTitles { stop, thread }
}

fn update(addr: SocketAddr, mount: &str, auth: &str, k: u64) -> Result<(), String> {
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(TIMEOUT)).ok();
    let req = format!(
        "GET /admin/metadata?mode=updinfo&mount={}&song=fanstream-load%20title%20{k} HTTP/1.0\r\n\
         Host: {addr}\r\nAuthorization: Basic {auth}\r\nUser-Agent: fanstream-load\r\n\r\n",
        mount.replace('/', "%2F")
    );
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&answer);
    let line = text.lines().next().unwrap_or_default();
    match line.split_whitespace().nth(1) {
        Some("200") => Ok(()),
        _ => Err(format!("answered {line:?}")),
    }
}
