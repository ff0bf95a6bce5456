//! Listener authentication as Icecast does it: URL auth against a small HTTP server run here
//! (allow, deny, a slow answer that holds up no one else, the result on timeout, and the
//! `listener_remove` call when a listener leaves), and a users file with curl `-u`.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::process::{require, scratch_dir};
use common::*;
use fanstream::config::ListenerAuthKind;
use fanstream::MountSettings;

/// A form POST the auth server got: its path and its fields, decoded.
#[derive(Debug)]
struct Call {
    path: String,
    fields: Vec<(String, String)>,
}

impl Call {
    fn field(&self, name: &str) -> &str {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map_or("", |(_, v)| v.as_str())
    }
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}

/// The auth server: answers `icecast-auth-user: 1` to user `allow` (and to every
/// `listener_remove`), nothing of the kind to `deny`, and to `slow` only after 4 seconds.
/// Each call is sent on the channel as it arrives.
fn auth_server() -> (SocketAddr, mpsc::Receiver<Call>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let tx = tx.clone();
            thread::spawn(move || answer(conn, tx));
        }
    });
    (addr, rx)
}

fn answer(mut conn: TcpStream, calls: mpsc::Sender<Call>) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut length = 0;
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).unwrap();
        if h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().unwrap();
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    let fields: Vec<(String, String)> = String::from_utf8(body)
        .unwrap()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect();
    let call = Call { path, fields };
    let user = call.field("user").to_string();
    let action = call.field("action").to_string();
    let _ = calls.send(call);
    if user == "slow" {
        thread::sleep(Duration::from_secs(4));
    }
    let allow = user == "allow" || user == "slow" || action == "listener_remove";
    let head = if allow {
        "HTTP/1.1 200 OK\r\nicecast-auth-user: 1\r\nContent-Length: 0\r\n\r\n"
    } else {
        "HTTP/1.1 200 OK\r\nicecast-auth-message: not today\r\nContent-Length: 0\r\n\r\n"
    };
    let _ = conn.write_all(head.as_bytes());
}

/// Sends a GET with Basic credentials and reads the answer's head.
fn get(addr: SocketAddr, target: &str, user: &str) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(
        s,
        "GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: test-player/1.0\r\nAuthorization: Basic {}\r\n\r\n",
        basic(user, "pw")
    )
    .unwrap();
    let head = read_head(&mut s);
    (s, head)
}

fn next_call(calls: &mpsc::Receiver<Call>) -> Call {
    calls
        .recv_timeout(DEADLINE)
        .expect("the auth server got a call")
}

#[test]
fn url_auth_asks_the_auth_server_and_a_slow_answer_holds_up_no_one_else() {
    let (auth, calls) = auth_server();
    let srv = TestServer::start(|c| {
        // One worker: the slow listener's and the others' share it.
        c.startup.workers = 1;
        let url_auth = |allow_on_timeout| MountSettings {
            auth: Some(ListenerAuthKind::Url),
            listener_add_url: Some(format!("http://{auth}/add")),
            listener_remove_url: Some(format!("http://{auth}/remove")),
            auth_timeout_ms: 2000,
            auth_allow_on_timeout: allow_on_timeout,
            ..c.defaults.clone()
        };
        c.mounts.insert("/a".into(), url_auth(false));
        c.mounts.insert("/lenient".into(), url_auth(true));
    });
    let mut source = Source::connect(srv.addr, "/a");
    let mut lenient = Source::connect(srv.addr, "/lenient");
    let feeding = thread::spawn(move || {
        for at in (0..).step_by(1000).take(3000) {
            if source.stream.write_all(&pattern(at, 1000)).is_err()
                || lenient.stream.write_all(&pattern(at, 1000)).is_err()
            {
                return;
            }
            thread::sleep(Duration::from_millis(5));
        }
    });

    // Allowed: the form carries what Icecast's does.
    let (mut allowed, head) = get(srv.addr, "/a?token=abc", "allow");
    assert!(head.starts_with("HTTP/1.0 200"), "{head}");
    let add = next_call(&calls);
    assert_eq!(add.path, "/add");
    assert_eq!(add.field("action"), "listener_add");
    assert_eq!(add.field("mount"), "/a?token=abc");
    assert_eq!(add.field("user"), "allow");
    assert_eq!(add.field("pass"), "pw");
    assert_eq!(add.field("ip"), "127.0.0.1");
    assert_eq!(add.field("agent"), "test-player/1.0");
    assert_eq!(add.field("server"), "127.0.0.1");
    assert_eq!(add.field("port"), srv.addr.port().to_string());
    let client = add.field("client").to_string();
    assert!(client.parse::<u64>().is_ok(), "{add:?}");

    // Denied: 401 with a challenge.
    let (_, head) = get(srv.addr, "/a", "deny");
    assert!(head.starts_with("HTTP/1.0 401"), "{head}");
    assert!(
        head.contains("WWW-Authenticate: Basic realm=\"fanstream listener\""),
        "{head}"
    );
    assert_eq!(next_call(&calls).field("user"), "deny");

    // Slow: while its call is pending, the listener on the same worker keeps receiving.
    let addr = srv.addr;
    let slow = thread::spawn(move || get(addr, "/a", "slow").1);
    assert_eq!(next_call(&calls).field("user"), "slow");
    let pending_since = Instant::now();
    let mut buf = vec![0; 65536];
    let mut received = 0;
    while pending_since.elapsed() < Duration::from_millis(1500) {
        received += common::read_some(&mut allowed, &mut buf).unwrap();
    }
    assert!(
        received > 100_000,
        "the allowed listener got {received} bytes while the slow auth call was pending"
    );
    // Past auth_timeout_ms, without auth_allow_on_timeout: 503.
    let head = slow.join().unwrap();
    assert!(head.starts_with("HTTP/1.0 503"), "{head}");
    assert!(
        pending_since.elapsed() < Duration::from_secs(4),
        "the timeout, not the answer"
    );
    // With it: let in.
    let (_, head) = get(srv.addr, "/lenient", "slow");
    assert!(head.starts_with("HTTP/1.0 200"), "{head}");
    assert_eq!(next_call(&calls).field("user"), "slow");

    // The allowed listener leaves: listener_remove, with its id and how long it listened.
    drop(allowed);
    let remove = next_call(&calls);
    assert_eq!(remove.path, "/remove");
    assert_eq!(remove.field("action"), "listener_remove");
    assert_eq!(remove.field("client"), client);
    assert_eq!(remove.field("mount"), "/a?token=abc");
    assert!(
        remove.field("duration").parse::<u64>().unwrap() >= 1,
        "{remove:?}"
    );
    srv.wait_metric(
        "fanstream_rejected_requests_total",
        &["reason=\"auth_unavailable\""],
        |v| v == 1.0,
    );
    drop(srv);
    let _ = feeding.join();
}

/// `curl -sS -o FILE -w %{http_code} --max-time SECS [-u USER:PASS] -D HEADERS URL`: the
/// status and the response head (curl's exit is a timeout for a stream that plays).
fn curl(addr: SocketAddr, mount: &str, credentials: Option<&str>) -> (u16, String, usize) {
    require("curl");
    let dir = scratch_dir("listener_auth_curl");
    let (body, headers) = (dir.join("body"), dir.join("head"));
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "2", "-w", "%{http_code}", "-o"])
        .arg(&body)
        .arg("-D")
        .arg(&headers);
    if let Some(c) = credentials {
        cmd.args(["-u", c]);
    }
    let out = cmd.arg(format!("http://{addr}{mount}")).output().unwrap();
    let status = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let head = std::fs::read_to_string(&headers).unwrap_or_default();
    let len = std::fs::read(&body).map_or(0, |b| b.len());
    (status, head, len)
}

#[test]
fn htpasswd_auth_with_curl() {
    let dir = scratch_dir("htpasswd");
    let users = dir.join("users");
    // A bcrypt line (as `htpasswd -B` writes) and one in Icecast's own format (MD5 in hex).
    let bcrypted = bcrypt::hash("opensesame", 5).unwrap();
    std::fs::write(
        &users,
        format!(
            "# listeners\nalice:{bcrypted}\nbob:{}\n",
            md5_hex("hunter2")
        ),
    )
    .unwrap();
    let srv = TestServer::start(|c| {
        c.mounts.insert(
            "/members".into(),
            MountSettings {
                auth: Some(ListenerAuthKind::Htpasswd),
                htpasswd_file: Some(users.clone()),
                ..c.defaults.clone()
            },
        );
    });
    let mut source = Source::connect(srv.addr, "/members");
    source.send_pattern(0, 100_000, 10_000, Duration::ZERO);

    for who in ["alice:opensesame", "bob:hunter2"] {
        let (status, head, len) = curl(srv.addr, "/members", Some(who));
        assert_eq!(status, 200, "{who}: {head}");
        assert!(len > 10_000, "{who}: got the stream, {len} bytes");
    }
    for who in [Some("alice:wrong"), Some("mallory:opensesame"), None] {
        let (status, head, _) = curl(srv.addr, "/members", who);
        assert_eq!(status, 401, "{who:?}: {head}");
        assert!(
            head.contains("WWW-Authenticate: Basic realm=\"fanstream listener\""),
            "{head}"
        );
    }
    // The file is read again when it changes: a user added is let in.
    std::fs::write(
        &users,
        format!("alice:{bcrypted}\ncarol:{}\n", md5_hex("s3cret")),
    )
    .unwrap();
    let later = std::time::SystemTime::now() + Duration::from_secs(2);
    std::fs::File::options()
        .write(true)
        .open(&users)
        .unwrap()
        .set_modified(later)
        .unwrap();
    let (status, head, _) = curl(srv.addr, "/members", Some("carol:s3cret"));
    assert_eq!(status, 200, "{head}");
    let (status, _, _) = curl(srv.addr, "/members", Some("bob:hunter2"));
    assert_eq!(status, 401, "bob is gone from the file");
}

fn md5_hex(s: &str) -> String {
    use md5::Digest;
    md5::Md5::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
