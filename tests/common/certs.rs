//! A certificate authority made for a test, and the server certificates it signs (rcgen).

use std::path::{Path, PathBuf};

use rcgen::{CertificateParams, CertifiedIssuer, IsCa, KeyPair, SerialNumber};
use rustls::pki_types::CertificateDer;

/// A test CA, and server certificates it signs.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    pub dir: PathBuf,
}

impl Ca {
    pub fn new(dir: &Path) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "fanstream test CA");
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.join("ca.pem"), issuer.pem()).unwrap();
        Ca {
            issuer,
            dir: dir.to_path_buf(),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Points a server's config at the certificate and key [`Ca::issue`] wrote last.
    pub fn serve_with(&self, config: &mut fanstream::Config) {
        config.startup.tls_cert = Some(self.dir.join("cert.pem"));
        config.startup.tls_key = Some(self.dir.join("key.pem"));
    }

    /// Writes a server certificate for 127.0.0.1 and localhost with this serial to
    /// DIR/cert.pem and its key to DIR/key.pem; returns the certificate as DER.
    pub fn issue(&self, serial: u64) -> CertificateDer<'static> {
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        params.serial_number = Some(SerialNumber::from(serial));
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        std::fs::write(self.dir.join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(self.dir.join("key.pem"), key.serialize_pem()).unwrap();
        cert.der().clone()
    }
}
