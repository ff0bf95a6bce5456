//! Behind a proxy: Debian's HAProxy, started by each test on loopback with a generated config,
//! in front of the fanstream binary. With `send-proxy-v2` (PROXY protocol) and in HTTP mode with
//! `option forwardfor`, the listener's address that fanstream logs and counts against
//! `max_connections_per_ip` is the client's, not the proxy's; an untrusted peer's
//! `X-Forwarded-For` is ignored; a PROXY header from an untrusted address is refused, and so is
//! a connection without one when they are required. On the TLS port, HAProxy passing TLS
//! through with `send-proxy-v2` names the client the same way.
//!
//! Clients take their own loopback addresses (127.0.0.2, 127.0.0.3: all of 127.0.0.0/8 is this
//! host), so that the proxy (127.0.0.1, the trusted one) and each client are told apart.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::certs::Ca;
use common::clients::*;
use common::process::{require, scratch_dir};
use common::*;

/// A listener from the address `from`: its connection past the response head, and the head.
fn listen_from(from: &str, to: SocketAddr, extra: &str) -> (TcpStream, String) {
    let mut s = connect_from(from, to);
    write!(s, "GET /live HTTP/1.0\r\nHost: radio.test\r\n{extra}\r\n").unwrap();
    let head = read_head(&mut s);
    (s, head)
}

/// Reads `n` bytes of stream and checks they are the source's pattern, byte for byte.
fn assert_streams(s: &mut TcpStream, n: usize, who: &str) {
    let mut body = vec![0u8; n];
    s.read_exact(&mut body)
        .unwrap_or_else(|e| panic!("{who}: {e}"));
    let start = locate(&body).unwrap_or_else(|| panic!("{who}: not the stream"));
    assert_eq!(
        body,
        pattern(start, n),
        "{who}: not the stream byte for byte"
    );
}

/// A source on /live, through `addr`, with 200,000 bytes sent and taken in by the server (as its
/// admin port's metrics say) before any listener joins.
fn live_source(addr: SocketAddr, admin: SocketAddr) -> Source {
    let mut source = Source::connect(addr, "/live");
    source.send_pattern(0, 200_000, 4000, Duration::ZERO);
    wait_until("the source's bytes ingested", || {
        let (_, _, body) = request(admin, b"GET /metrics HTTP/1.0\r\n\r\n");
        metric_value(
            &String::from_utf8_lossy(&body),
            "fanstream_source_received_bytes_total",
            &["mount=\"/live\""],
        ) == 200_000.0
    });
    source
}

fn metric(admin: SocketAddr, labels: &[&str]) -> f64 {
    let (_, _, body) = request(admin, b"GET /metrics HTTP/1.0\r\n\r\n");
    metric_value(
        &String::from_utf8(body).unwrap(),
        "fanstream_rejected_requests_total",
        labels,
    )
}

/// A connection the server closes without answering: EOF or a reset, no byte.
fn assert_closed_unanswered(mut s: TcpStream, who: &str) {
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("{who}: answered {:?}", String::from_utf8_lossy(&buf[..n])),
    }
}

#[test]
fn behind_haproxy_send_proxy_v2_the_client_is_logged_and_counted() {
    let dir = scratch_dir("proxies_v2");
    let server = fanstream(
        &dir,
        "trusted_proxies = [\"127.0.0.1\"]\nproxy_protocol = true\nmax_connections_per_ip = 1\n[defaults]\nmax_write_delay_ms = 0\n",
    );
    let admin = server.admin;
    let hap = haproxy(&dir, "tcp", "", server.addr, "send-proxy-v2");
    // The source goes through HAProxy too: every connection must start with a PROXY header.
    let mut source = live_source(hap.addr, server.admin);

    let (mut first, head) = listen_from("127.0.0.2", hap.addr, "");
    assert!(head.starts_with("HTTP/1.0 200"), "{head}");
    // Counted as 127.0.0.2, not as the proxy: a second from it is over the limit of one...
    let (_, head) = listen_from("127.0.0.2", hap.addr, "");
    assert!(head.starts_with("HTTP/1.0 429"), "{head}");
    // ...and another client behind the same proxy is not.
    let (mut other, head) = listen_from("127.0.0.3", hap.addr, "");
    assert!(head.starts_with("HTTP/1.0 200"), "{head}");
    let mut log = server.program;
    log.wait_line(
        "the refusal logged with the client's address",
        DEADLINE,
        |l| l.contains("per_ip_limit") && l.contains("peer=127.0.0.2:"),
    );
    source.send_pattern(200_000, 400_000, 4000, Duration::ZERO);
    assert_streams(&mut first, 100_000, "first listener");
    assert_streams(&mut other, 100_000, "other listener");

    // Straight to fanstream: from an untrusted address, a PROXY header claiming anything is
    // refused; from the trusted one, a connection without a header is too.
    let mut forged = connect_from("127.0.0.2", server.addr);
    // Closed at accept, with a reset: the write itself may fail.
    let _ =
        forged.write_all(b"PROXY TCP4 192.0.2.1 127.0.0.1 1234 8000\r\nGET /live HTTP/1.0\r\n\r\n");
    assert_closed_unanswered(forged, "untrusted PROXY header");
    let mut bare = connect_from("127.0.0.1", server.addr);
    let _ = bare.write_all(b"GET /live HTTP/1.0\r\n\r\n");
    assert_closed_unanswered(bare, "no PROXY header");
    assert_eq!(metric(admin, &["reason=\"untrusted_proxy\""]), 1.0);
    assert_eq!(metric(admin, &["reason=\"bad_proxy_header\""]), 1.0);
    drop(hap);
}

#[test]
fn behind_haproxy_forwardfor_the_client_is_logged_and_counted_and_forgeries_do_not_count() {
    let dir = scratch_dir("proxies_xff");
    let access_log = dir.join("access.log");
    let server = fanstream(
        &dir,
        &format!(
            "trusted_proxies = [\"127.0.0.1\"]\nmax_connections_per_ip = 1\naccess_log = {:?}\n[defaults]\nmax_write_delay_ms = 0\n",
            access_log.display().to_string()
        ),
    );
    let admin = server.admin;
    // HTTP mode cannot carry a source's unframed PUT body: the source connects directly, from
    // the trusted address, with no X-Forwarded-For: it is itself.
    let mut source = live_source(server.addr, server.admin);
    let hap = haproxy(&dir, "http", "  option forwardfor", server.addr, "");

    // A client's own X-Forwarded-For is kept by HAProxy, which adds its own line after it.
    let (mut first, head) = listen_from("127.0.0.2", hap.addr, "X-Forwarded-For: 192.0.2.1\r\n");
    assert!(head.starts_with("HTTP/1.0 200"), "{head}");
    let (_, head) = listen_from("127.0.0.2", hap.addr, "X-Forwarded-For: 192.0.2.2\r\n");
    assert!(head.starts_with("HTTP/1.0 429"), "{head}");
    let (mut other, head) = listen_from("127.0.0.3", hap.addr, "");
    assert!(head.starts_with("HTTP/1.0 200"), "{head}");
    let mut log = server.program;
    log.wait_line(
        "the refusal logged with the client's address",
        DEADLINE,
        |l| l.contains("per_ip_limit") && l.contains("peer=127.0.0.2:"),
    );
    source.send_pattern(200_000, 400_000, 4000, Duration::ZERO);
    assert_streams(&mut first, 100_000, "first listener");
    assert_streams(&mut other, 100_000, "other listener");
    // The admin API's listener list names the clients, not the proxy...
    let (status, _, body) = request(
        admin,
        b"GET /admin/listclients?mount=/live HTTP/1.0\r\n\r\n",
    );
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, 200, "{body}");
    for ip in ["<IP>127.0.0.2</IP>", "<IP>127.0.0.3</IP>"] {
        assert!(body.contains(ip), "{ip} not in {body}");
    }
    assert!(!body.contains("<IP>127.0.0.1</IP>"), "{body}");
    // ...and so does the access log, once they have gone.
    drop((first, other));
    source.send_pattern(400_000, 500_000, 4000, Duration::ZERO);
    wait_until("both listeners in the access log", || {
        std::fs::read_to_string(&access_log).is_ok_and(|log| {
            ["127.0.0.2 ", "127.0.0.3 "].iter().all(|ip| {
                log.lines()
                    .any(|l| l.starts_with(ip) && l.contains("\"GET /live HTTP/1.0\" 200 "))
            })
        })
    });
    drop(hap);
}

#[test]
fn an_untrusted_peers_x_forwarded_for_is_ignored() {
    let dir = scratch_dir("proxies_untrusted_xff");
    let server = fanstream(
        &dir,
        "trusted_proxies = [\"127.0.0.1\"]\nmax_connections_per_ip = 1\n",
    );
    let _source = live_source(server.addr, server.admin);
    let (_held, head) = listen_from("127.0.0.2", server.addr, "X-Forwarded-For: 192.0.2.1\r\n");
    assert!(head.starts_with("HTTP/1.0 200"), "{head}");
    // Another claimed address does not make it another client.
    let (_, head) = listen_from("127.0.0.2", server.addr, "X-Forwarded-For: 192.0.2.2\r\n");
    assert!(head.starts_with("HTTP/1.0 429"), "{head}");
    let mut log = server.program;
    let line = log.wait_line("the refusal logged", DEADLINE, |l| {
        l.contains("per_ip_limit")
    });
    assert!(line.contains("peer=127.0.0.2:"), "{line}");
}

#[test]
fn behind_haproxy_send_proxy_v1_the_client_is_counted() {
    let dir = scratch_dir("proxies_v1");
    let server = fanstream(
        &dir,
        "trusted_proxies = [\"127.0.0.0/8\"]\nproxy_protocol = true\nmax_connections_per_ip = 1\n[defaults]\nmax_write_delay_ms = 0\n",
    );
    let hap = haproxy(&dir, "tcp", "", server.addr, "send-proxy");
    let mut source = live_source(hap.addr, server.admin);
    // The clients' own loopback addresses are in the trusted range too: the PROXY header, not
    // the connection, names them.
    let (mut first, head) = listen_from("127.0.0.2", hap.addr, "");
    assert!(head.starts_with("HTTP/1.0 200"), "{head}");
    let (_, head) = listen_from("127.0.0.2", hap.addr, "");
    assert!(head.starts_with("HTTP/1.0 429"), "{head}");
    let (_other, head) = listen_from("127.0.0.3", hap.addr, "");
    assert!(head.starts_with("HTTP/1.0 200"), "{head}");
    let mut log = server.program;
    log.wait_line(
        "the refusal logged with the client's address",
        DEADLINE,
        |l| l.contains("per_ip_limit") && l.contains("peer=127.0.0.2:"),
    );
    source.send_pattern(200_000, 400_000, 4000, Duration::ZERO);
    assert_streams(&mut first, 100_000, "first listener");
    drop(hap);
}

/// curl over TLS from the address `from` to `url`, trusting `ca`, writing the body to `out`,
/// ending at `secs`; `-w` prints the status.
fn curl_tls_from(from: &str, ca: &Path, url: &str, out: &Path, secs: u32) -> Command {
    require("curl");
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--http1.1", "--interface", from, "--cacert"])
        .arg(ca)
        .args(["--max-time", &secs.to_string(), "-w", "%{http_code}", "-o"])
        .arg(out)
        .arg(url);
    cmd
}

/// HAProxy in TCP mode passing TLS through to the TLS port, with `send-proxy-v2`: the PROXY
/// header comes in clear before the client's handshake, and the client curl connected from is
/// the one fanstream counts, lists and logs.
#[test]
fn behind_haproxy_passing_tls_through_with_send_proxy_v2_the_client_is_counted() {
    let dir = scratch_dir("proxies_tls");
    let ca = Ca::new(&dir);
    ca.issue(61);
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let server = fanstream_with(
        &dir,
        "trusted_proxies = [\"127.0.0.1\"]\nproxy_protocol = true\nmax_connections_per_ip = 1\n[defaults]\nmax_write_delay_ms = 0\n",
        "127.0.0.1:0",
        &[
            "--tls-listen",
            "127.0.0.1:0",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let admin = server.admin;
    let mut log = server.program;
    log.collect();
    let tls_addr: SocketAddr = log
        .log
        .iter()
        .find_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("tls=Some("))
        })
        .and_then(|a| a.trim_end_matches(')').parse().ok())
        .unwrap_or_else(|| panic!("no TLS address in {:?}", log.log));
    // The source through a proxy of its own to the plain port (which wants the header too).
    let plain_dir = dir.join("plain");
    std::fs::create_dir_all(&plain_dir).unwrap();
    let hap_plain = haproxy(&plain_dir, "tcp", "", server.addr, "send-proxy-v2");
    let mut source = live_source(hap_plain.addr, admin);
    let hap = haproxy(&dir, "tcp", "", tls_addr, "send-proxy-v2");
    let url = format!("https://127.0.0.1:{}/live", hap.addr.port());

    let first_out = dir.join("first.bin");
    let first = Program::spawn(
        "curl (first)",
        &mut curl_tls_from("127.0.0.2", &ca.path(), &url, &first_out, 20),
    );
    // The admin API lists it as 127.0.0.2, not as the proxy.
    wait_until("the TLS listener listed with its client's address", || {
        let (_, _, body) = request(
            admin,
            b"GET /admin/listclients?mount=/live HTTP/1.0\r\n\r\n",
        );
        String::from_utf8_lossy(&body).contains("<IP>127.0.0.2</IP>")
    });
    // Counted as 127.0.0.2: a second from it is over the limit of one, answered over TLS...
    let out = curl_tls_from("127.0.0.2", &ca.path(), &url, &dir.join("second.bin"), 5)
        .output()
        .expect("curl runs");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "429",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    log.wait_line(
        "the refusal logged with the client's address",
        DEADLINE,
        |l| l.contains("per_ip_limit") && l.contains("peer=127.0.0.2:"),
    );
    // ...and another client behind the same proxy is not.
    let other_out = dir.join("other.bin");
    let other = Program::spawn(
        "curl (other)",
        &mut curl_tls_from("127.0.0.3", &ca.path(), &url, &other_out, 20),
    );
    wait_until("the other TLS listener listed", || {
        let (_, _, body) = request(
            admin,
            b"GET /admin/listclients?mount=/live HTTP/1.0\r\n\r\n",
        );
        String::from_utf8_lossy(&body).contains("<IP>127.0.0.3</IP>")
    });
    source.send_pattern(200_000, 400_000, 4000, Duration::ZERO);
    for (out, who) in [(&first_out, "first"), (&other_out, "other")] {
        wait_until("100,000 bytes through the proxy over TLS", || {
            std::fs::metadata(out).is_ok_and(|m| m.len() >= 100_000)
        });
        let body = std::fs::read(out).unwrap();
        let start = locate(&body).unwrap_or_else(|| panic!("{who}: not the stream"));
        assert_eq!(body, pattern(start, body.len()), "{who}: not byte for byte");
    }
    drop((first, other));

    // Straight to the TLS port from an untrusted address: closed at accept, before any
    // handshake; from the trusted one without a header: closed as a bad header.
    let mut forged = connect_from("127.0.0.2", tls_addr);
    let _ = forged.write_all(b"PROXY TCP4 192.0.2.1 127.0.0.1 1234 8443\r\n\x16\x03\x01");
    assert_closed_unanswered(forged, "untrusted PROXY header on the TLS port");
    let mut bare = connect_from("127.0.0.1", tls_addr);
    let _ = bare.write_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03");
    assert_closed_unanswered(bare, "a handshake without a PROXY header");
    assert_eq!(metric(admin, &["reason=\"untrusted_proxy\""]), 1.0);
    assert_eq!(metric(admin, &["reason=\"bad_proxy_header\""]), 1.0);
    drop((hap, hap_plain));
}
