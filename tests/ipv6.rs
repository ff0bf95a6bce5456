//! IPv6: the binary with `listen = "[::]:PORT"` serves IPv4 and IPv6 clients on the one socket
//! (dual stack), an IPv6 listener streams byte-exact beside IPv4 ones, per-address limits apply
//! to IPv6 addresses, and an IPv4 client is named as IPv4 (not `::ffff:a.b.c.d`) in logs and
//! limits.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::clients::*;
use common::process::scratch_dir;
use common::*;

#[test]
fn a_dual_stack_listener_serves_ipv6_and_ipv4_byte_exact_with_per_address_limits() {
    let dir = scratch_dir("ipv6_dual_stack");
    let server = fanstream_listening(
        &dir,
        "max_connections_per_ip = 1\n[defaults]\nmax_write_delay_ms = 0\n",
        "[::]:0",
    );
    let mut program = server.program;
    assert!(server.addr.is_ipv6(), "listening on {}", server.addr);
    let port = server.addr.port();
    let v4: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let v6: SocketAddr = format!("[::1]:{port}").parse().unwrap();

    // The source over IPv4; once past its handshake it no longer counts against its address.
    let mut source = Source::connect(v4, "/live");
    let mut six = Listener::connect(v6, "/live");
    let mut four = Listener::connect(v4, "/live");

    // One connection per address: a second from ::1 is refused, and so is a second from
    // 127.0.0.1, which is logged as IPv4.
    let (status, head, _) = request(v6, b"GET /live HTTP/1.0\r\n\r\n");
    assert_eq!(status, 429, "{head}");
    program.wait_line("the IPv6 refusal logged", DEADLINE, |l| {
        l.contains("per_ip_limit") && l.contains("peer=[::1]:")
    });
    let (status, head, _) = request(v4, b"GET /live HTTP/1.0\r\n\r\n");
    assert_eq!(status, 429, "{head}");
    program.wait_line("the IPv4 refusal logged as IPv4", DEADLINE, |l| {
        l.contains("per_ip_limit") && l.contains("peer=127.0.0.1:")
    });

    let total = 300_000u64;
    source.send_pattern(0, total, 4000, Duration::ZERO);
    for (who, l) in [("IPv6 listener", &mut six), ("IPv4 listener", &mut four)] {
        l.read_at_least(total as usize);
        assert!(
            l.body[..total as usize] == pattern(0, total as usize)[..],
            "{who}: not the stream byte for byte"
        );
    }
}
