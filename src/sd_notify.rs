//! Telling a service manager how start-up, reloads and stops are going: systemd's notification
//! protocol (`sd_notify(3)`), written directly since it is one datagram.
//!
//! A unit with `Type=notify` sets `NOTIFY_SOCKET` to a datagram socket: a path, or a name in the
//! abstract namespace when it starts with '@'. Each message is newline-separated `KEY=VALUE`
//! assignments in one datagram (`READY=1`, `STOPPING=1`, `RELOADING=1`, `STATUS=...`). Without
//! the variable, every call does nothing, so the server runs the same outside systemd.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The service manager's notification socket, when one was given.
pub struct Notifier {
    socket: UnixDatagram,
    to: SocketAddr,
}

impl Notifier {
    /// The socket `NOTIFY_SOCKET` names, or `None` when it is not set.
    pub fn from_env() -> io::Result<Option<Notifier>> {
        match std::env::var_os("NOTIFY_SOCKET") {
            Some(name) => Notifier::to(name.to_str().ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "NOTIFY_SOCKET is not UTF-8")
            })?)
            .map(Some),
            None => Ok(None),
        }
    }

    /// A notifier for the socket `name`, spelt as `NOTIFY_SOCKET` spells it.
    pub fn to(name: &str) -> io::Result<Notifier> {
        let to = match name.strip_prefix('@') {
            Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name)?,
            None if name.starts_with('/') => SocketAddr::from_pathname(name)?,
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("NOTIFY_SOCKET={name:?} is neither a path nor '@' and a name"),
                ))
            }
        };
        Ok(Notifier {
            socket: UnixDatagram::unbound()?,
            to,
        })
    }

    /// Sends `state` (`KEY=VALUE` lines) as one datagram.
    pub fn send(&self, state: &str) -> io::Result<()> {
        self.socket.send_to_addr(state.as_bytes(), &self.to)?;
        Ok(())
    }
}

/// The message that starts a reload: `RELOADING=1` with the monotonic clock, which systemd
/// requires with it (since version 253) to tell this reload from an earlier one.
pub fn reloading() -> String {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a pointer to a live, owned one.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let usec = now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1_000;
    format!("RELOADING=1\nMONOTONIC_USEC={usec}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn received(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 256];
        let n = socket.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn one_datagram_to_a_path_or_an_abstract_name() {
        let path = std::env::temp_dir().join(format!("fanstream-notify-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let by_path = UnixDatagram::bind(&path).unwrap();
        Notifier::to(path.to_str().unwrap())
            .unwrap()
            .send("READY=1\nSTATUS=serving")
            .unwrap();
        assert_eq!(received(&by_path), "READY=1\nSTATUS=serving");
        std::fs::remove_file(&path).unwrap();

        let name = format!("fanstream-notify-test-{}", std::process::id());
        let by_name =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
        Notifier::to(&format!("@{name}"))
            .unwrap()
            .send("STOPPING=1")
            .unwrap();
        assert_eq!(received(&by_name), "STOPPING=1");
    }

    #[test]
    fn a_name_that_is_neither_is_refused() {
        let e = Notifier::to("relative/socket").err().unwrap();
        assert!(e.to_string().contains("relative/socket"), "{e}");
    }

    #[test]
    fn reloading_carries_the_monotonic_clock() {
        let message = reloading();
        let usec: u64 = message
            .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
            .unwrap()
            .parse()
            .unwrap();
        assert!(usec > 0);
    }
}
