//! TLS with rustls: the server's certificate and settings ([`server_config`]), [`TlsConn`], a
//! connection past its handshake, and the client side a relay pulls `https://` upstreams with
//! ([`client_config`], [`connect`]).
//!
//! The handshake is tokio-rustls's; the session is then taken out of its stream and kept with
//! the socket in a `TlsConn` of ours, for two reasons tokio-rustls's stream cannot serve: the
//! fan-out writes a listener from a synchronous pass with a gathered list of shared pieces
//! ([`TlsConn::try_write_vectored`], the same call as a plain socket's, parking on the socket's
//! writability the same way), and a session is a plain value that can move with its socket.
//!
//! The crypto provider is *ring*: it builds with a C compiler alone, in seconds, where
//! aws-lc-rs needs CMake and minutes of C on the 2-core machines this is built on; its AES-GCM
//! and ChaCha20 come from the same BoringSSL assembly. What aws-lc-rs would add (FIPS,
//! post-quantum key exchange) a radio stream does not need yet; changing provider is one line
//! here.

use std::cell::RefCell;
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::ServerName;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig, ServerConnection};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Most encrypted bytes a session holds for its socket. A listener's write takes no more
/// plaintext than fits, so a stalled TLS listener costs this much beyond its socket buffer,
/// and the lag policy sees it as it sees a plain one.
pub(crate) const SESSION_BUFFER_BYTES: usize = 64 * 1024;

/// The certificates in the PEM file at `path`, at least one; the error names the setting
/// (`key`), the file and what is wrong with it.
fn pem_certificates(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{key} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{key} {}: no certificate in the file",
            path.display()
        ));
    }
    Ok(certs)
}

/// The certificate chain and key at these PEM files, as a server config: TLS 1.2 and 1.3,
/// ALPN `http/1.1` (a client offering only `h2` is refused at the handshake rather than
/// misunderstood after it). The error names the file and what is wrong with it.
pub(crate) fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, String> {
    let chain = pem_certificates("tls_cert", cert)?;
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| key_error(key, e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| {
            format!(
                "tls_cert {} with tls_key {}: {e}",
                cert.display(),
                key.display()
            )
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// What is wrong with a key file, in the operator's terms: "no items found" says nothing about
/// the two usual mistakes, a passphrase-protected key (rustls reads no encrypted keys) and the
/// certificate given as the key.
fn key_error(key: &Path, e: rustls::pki_types::pem::Error) -> String {
    let text = std::fs::read_to_string(key).unwrap_or_default();
    let why = if matches!(e, rustls::pki_types::pem::Error::NoItemsFound) {
        if text.contains("ENCRYPTED PRIVATE KEY") || text.contains("Proc-Type: 4,ENCRYPTED") {
            format!(
                "the key is encrypted with a passphrase, which fanstream cannot ask for; write it \
                 out decrypted (openssl pkey -in {0} -out {0}.plain) and keep that file readable \
                 by fanstream alone",
                key.display()
            )
        } else if text.contains("BEGIN CERTIFICATE") {
            "it holds a certificate and no private key (tls_cert and tls_key swapped?)".into()
        } else {
            "no PEM private key in the file".into()
        }
    } else {
        e.to_string()
    };
    format!("tls_key {}: {why}", key.display())
}

/// The settings a relay's `https://` connections use: the system's roots (as `curl` and every
/// other client on the machine trust them: rustls-native-certs reads `/etc/ssl/certs`, or
/// `SSL_CERT_FILE` and `SSL_CERT_DIR` when set, so `update-ca-certificates` reaches fanstream
/// without a rebuild, which compiled-in roots would need), plus the certificates in `ca_file`
/// (an operator's own CA for a private origin). TLS 1.2 and 1.3, ALPN `http/1.1`. The error
/// names the file and what is wrong with it; roots of the system that do not load are skipped.
pub(crate) fn client_config(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    let (added, _) = roots.add_parsable_certificates(native.certs);
    if let Some(path) = ca_file {
        let certs = pem_certificates("relay_ca_file", path)?;
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| format!("relay_ca_file {}: {e}", path.display()))?;
        }
    } else if added == 0 {
        tracing::warn!(errors = ?native.errors, "no system root certificate loaded: https upstreams will fail unless relay_ca_file is set");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Runs the client side of a handshake with `host` (its name for SNI and the certificate check)
/// on `tcp`. Err says what failed, for the relay's log line.
pub(crate) async fn connect(
    config: Arc<ClientConfig>,
    host: &str,
    tcp: TcpStream,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let name = ServerName::try_from(host.to_string()).map_err(|e| format!("{host}: {e}"))?;
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())
}

/// Why a handshake gave no session.
#[derive(Debug)]
pub(crate) enum HandshakeError {
    /// The client sent a plain HTTP request to the TLS port.
    PlainHttp,
    /// Not TLS, or no common version, cipher or protocol, or the socket failed.
    Failed(io::Error),
}

impl From<io::Error> for HandshakeError {
    fn from(e: io::Error) -> Self {
        HandshakeError::Failed(e)
    }
}

/// A TLS connection past its handshake: the socket and its session.
pub(crate) struct TlsConn {
    tcp: TcpStream,
    /// Borrowed for each call and never across an await: the fan-out writes through a shared
    /// reference, since a parked listener's waiting task holds its connection too.
    session: RefCell<ServerConnection>,
}

impl TlsConn {
    /// Runs the server side of a handshake on `tcp` with `config`, `already_read` being its
    /// first bytes (what came after a PROXY header in the same read); the session it yields
    /// goes with the socket into [`TlsConn::new`]. The socket is borrowed, so that the caller
    /// keeps it to close as it likes if the handshake fails or takes too long.
    ///
    /// `turn` is awaited, and held to the end, once the client's whole ClientHello is in: the
    /// work (key exchange, signature) starts there. Reading the ClientHello is parsing alone,
    /// and holds no turn, so that clients that never finish sending one (a flood of stalled
    /// handshakes) keep no one else waiting.
    pub async fn handshake<T>(
        config: Arc<ServerConfig>,
        tcp: &mut TcpStream,
        already_read: &[u8],
        turn: impl std::future::Future<Output = T>,
    ) -> Result<ServerConnection, HandshakeError> {
        // A session's state is kilobytes: a client that sends nothing gets none.
        let first = match already_read.first() {
            Some(&b) => b,
            None => {
                let mut b = [0u8; 1];
                tcp.peek(&mut b).await?;
                b[0]
            }
        };
        // A TLS record starts with its type (22, a handshake); a request line with a method in
        // capitals. Someone who typed http:// for this port is told so, in plain HTTP.
        if first.is_ascii_uppercase() {
            return Err(HandshakeError::PlainHttp);
        }
        let io = Replayed {
            first: already_read,
            tcp,
        };
        let hello =
            tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io).await?;
        let _turn = turn.await;
        let stream = hello.into_stream(config).await?;
        Ok(stream.into_inner().1)
    }

    /// A connection whose handshake [`TlsConn::handshake`] made.
    pub fn new(tcp: TcpStream, mut session: ServerConnection) -> TlsConn {
        session.set_buffer_limit(Some(SESSION_BUFFER_BYTES));
        TlsConn {
            tcp,
            session: RefCell::new(session),
        }
    }

    /// The socket and the session, to move to another thread's runtime (a source, to ingest).
    pub fn into_parts(self) -> (TcpStream, ServerConnection) {
        (self.tcp, self.session.into_inner())
    }

    pub fn socket(&self) -> &TcpStream {
        &self.tcp
    }

    /// Writes as much as the socket takes of what the session holds encrypted; `WouldBlock`
    /// while some is left.
    fn send_pending(&self, session: &mut ServerConnection) -> io::Result<()> {
        while session.wants_write() {
            if session.write_tls(&mut SocketWriter(&self.tcp))? == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
        }
        Ok(())
    }

    /// As a plain socket's `try_write_vectored`: takes plaintext from `bufs`, encrypts it and
    /// writes it; `WouldBlock` when the socket is full. Encrypted bytes the socket did not
    /// take stay in the session and go first at the next call, so what is accepted (the count
    /// returned) is sent in order. Nothing is accepted while earlier bytes wait: the session
    /// holds at most one write's worth.
    pub fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut session = self.session.borrow_mut();
        self.send_pending(&mut session)?;
        let n = session.writer().write_vectored(bufs)?;
        if n == 0 && bufs.iter().any(|b| !b.is_empty()) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        match self.send_pending(&mut session) {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => Err(e),
            _ => Ok(n),
        }
    }

    /// Writes what the session still holds encrypted from earlier writes; `WouldBlock` while
    /// some is left. A write's last bytes may stay there when the socket was full: without a
    /// next write (the source paused, or the stream is at its end) they go out only this way.
    pub fn send_unsent(&self) -> io::Result<()> {
        self.send_pending(&mut self.session.borrow_mut())
    }

    /// Whether the session holds encrypted bytes the socket has not taken yet.
    pub fn holds_unsent(&self) -> bool {
        self.session.borrow().wants_write()
    }

    /// Waits until the socket may take more.
    pub async fn writable(&self) -> io::Result<()> {
        self.tcp.writable().await
    }
}

/// A socket whose first bytes were already read: they are read again first.
struct Replayed<'a> {
    first: &'a [u8],
    tcp: &'a mut TcpStream,
}

impl AsyncRead for Replayed<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.first.is_empty() {
            return Pin::new(&mut *this.tcp).poll_read(cx, buf);
        }
        let n = this.first.len().min(buf.remaining());
        buf.put_slice(&this.first[..n]);
        this.first = &this.first[n..];
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Replayed<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().tcp).poll_shutdown(cx)
    }
}

/// The socket as `std::io::Write`, for rustls: a write that would block says so.
struct SocketWriter<'a>(&'a TcpStream);

impl Write for SocketWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.0.try_write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The socket as `std::io::Read`, for rustls.
struct SocketReader<'a>(&'a TcpStream);

impl Read for SocketReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let mut session = this.session.borrow_mut();
            match session.reader().read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The peer closed without a close_notify, as encoders and players mostly do:
                // the end of the stream, as on a plain socket. (A live stream has no length a
                // truncation could shorten unnoticed.)
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Poll::Ready(Ok(())),
                Err(e) => return Poll::Ready(Err(e)),
            }
            // What the peer's messages asked for (a key update's answer) goes out with the
            // next write if the socket is full now.
            let _ = this.send_pending(&mut session);
            match session.read_tls(&mut SocketReader(&this.tcp)) {
                Ok(_) => {
                    // At the end of the stream too: the reader then says whether the peer
                    // closed cleanly.
                    if let Err(e) = session.process_new_packets() {
                        let _ = this.send_pending(&mut session);
                        return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    drop(session);
                    ready!(this.tcp.poll_read_ready(cx))?;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            match self.try_write_vectored(bufs) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(self.tcp.poll_write_ready(cx))?;
                }
                done => return Poll::Ready(done),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match self.send_pending(&mut self.session.borrow_mut()) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(self.tcp.poll_write_ready(cx))?;
                }
                done => return Poll::Ready(done),
            }
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.session.borrow_mut().send_close_notify();
        ready!(self.as_mut().poll_flush(cx))?;
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

impl AsFd for TlsConn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.tcp.as_fd()
    }
}
