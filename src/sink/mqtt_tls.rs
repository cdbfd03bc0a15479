//! TLS for `mqtts://` brokers: builds the rustls client configuration from
//! `[mqtt.tls]` (CA file or system roots, client certificate and key for
//! mutual TLS, ALPN, server name override) and turns handshake failures into
//! messages that say what to fix.
//!
//! Only the `ring` crypto provider is compiled in, and it is passed explicitly,
//! so nothing depends on a process-wide default provider. The key is read once
//! at start-up; neither its text nor its path's contents ever reach a log line.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    AlertDescription, CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig,
    SignatureScheme,
};
use thiserror::Error;

use super::config::MqttTlsConfig;

/// A TLS setting that cannot be used; the message names the key and the file.
#[derive(Debug, Error)]
#[error("mqtt.tls.{key}: {reason}")]
pub struct TlsError {
    /// The key under `[mqtt.tls]` at fault.
    pub key: &'static str,
    /// Why, naming the file where there is one.
    pub reason: String,
}

fn bad(key: &'static str, reason: impl Into<String>) -> TlsError {
    TlsError { key, reason: reason.into() }
}

/// A ready TLS client configuration, and what it was made of (for logs and `check`).
#[derive(Clone)]
pub struct Tls {
    /// The rustls configuration handed to the MQTT client.
    pub config: Arc<ClientConfig>,
    /// One line describing it (no secrets).
    pub summary: String,
    /// Certificate verification is off (`insecure_skip_verify`).
    pub insecure: bool,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("summary", &self.summary).finish_non_exhaustive()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| bad(key, format!("{}: cannot read: {e}", path.display())))
}

/// Every certificate in a PEM file (at least one).
fn certificates(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(key, format!("{}: not valid PEM: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(bad(
            key,
            format!("{}: no certificate (no `BEGIN CERTIFICATE` block) in the PEM file", path.display()),
        ));
    }
    Ok(certs)
}

/// A private key, from a PEM file or an environment variable holding PEM text.
fn private_key(
    key_file: Option<&PathBuf>,
    key_env: Option<&String>,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Result<PrivateKeyDer<'static>, TlsError> {
    let (key, origin, pem) = match (key_file, key_env) {
        (Some(file), _) => {
            let path = resolve(file);
            ("key_file", path.display().to_string(), read("key_file", &path)?)
        }
        (None, Some(var)) => {
            let text = std::env::var(var)
                .map_err(|_| bad("key_env", format!("environment variable `{var}` is not set (or not UTF-8)")))?;
            ("key_env", format!("environment variable `{var}`"), text.into_bytes())
        }
        (None, None) => return Err(bad("key_file", "cert_file needs key_file or key_env")),
    };
    // The parser's own messages may quote lines of the key: never pass them on.
    match PrivateKeyDer::from_pem_slice(&pem) {
        Ok(k) => Ok(k),
        Err(_) if String::from_utf8_lossy(&pem).contains("ENCRYPTED") => Err(bad(
            key,
            format!("{origin}: the private key is encrypted; give an unencrypted key (openssl pkey -in k.pem -out plain.pem)"),
        )),
        Err(_) => Err(bad(
            key,
            format!("{origin}: no private key (a `BEGIN PRIVATE KEY`, `RSA PRIVATE KEY` or `EC PRIVATE KEY` block) in the PEM text"),
        )),
    }
}

/// The trust anchors: the CA file, or the system's roots.
fn roots(cfg: &MqttTlsConfig, resolve: &dyn Fn(&Path) -> PathBuf) -> Result<(RootCertStore, String), TlsError> {
    let mut store = RootCertStore::empty();
    match &cfg.ca_file {
        Some(file) => {
            let path = resolve(file);
            let certs = certificates("ca_file", &path)?;
            let n = certs.len();
            for (i, cert) in certs.into_iter().enumerate() {
                store.add(cert).map_err(|e| {
                    bad(
                        "ca_file",
                        format!("{}: certificate {} is not a usable CA certificate: {e}", path.display(), i + 1),
                    )
                })?;
            }
            Ok((store, format!("CA file {} ({n} certificate{})", path.display(), if n == 1 { "" } else { "s" })))
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _ignored) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = found.errors.first().map(|e| format!(" ({e})")).unwrap_or_default();
                return Err(bad(
                    "ca_file",
                    format!("not set, and no system CA certificates were found{why}: install ca-certificates or set mqtt.tls.ca_file"),
                ));
            }
            Ok((store, format!("system CA certificates ({added})")))
        }
    }
}

/// Reads and checks every file `[mqtt.tls]` names and builds the client
/// configuration. Paths are resolved with `resolve` (relative to the config file).
pub fn load(cfg: &MqttTlsConfig, resolve: &dyn Fn(&Path) -> PathBuf) -> Result<Tls, TlsError> {
    let provider = provider();
    let (store, mut summary) = roots(cfg, resolve)?;
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("ca_file", format!("TLS setup failed: {e}")))?;
    let override_name = match &cfg.server_name {
        Some(name) => Some(
            ServerName::try_from(name.clone())
                .map_err(|_| bad("server_name", format!("`{name}` is not a DNS name or an IP address")))?,
        ),
        None => None,
    };
    let builder = if cfg.insecure_skip_verify {
        summary = "certificate verification OFF (insecure_skip_verify)".into();
        builder.dangerous().with_custom_certificate_verifier(Arc::new(AnyCert(provider.clone())))
    } else {
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone())
            .build()
            .map_err(|e| bad("ca_file", format!("cannot use the CA certificates: {e}")))?;
        match override_name {
            Some(name) => {
                summary.push_str(&format!(", verified as `{}`", name.to_str()));
                builder.dangerous().with_custom_certificate_verifier(Arc::new(NamedAs { inner: webpki, name }))
            }
            None => builder.with_webpki_verifier(webpki),
        }
    };
    let mut config = match &cfg.cert_file {
        Some(file) => {
            let path = resolve(file);
            let chain = certificates("cert_file", &path)?;
            let key = private_key(cfg.key_file.as_ref(), cfg.key_env.as_ref(), resolve)?;
            let key_key = if cfg.key_file.is_some() { "key_file" } else { "key_env" };
            summary.push_str(&format!(", client certificate {}", path.display()));
            builder.with_client_auth_cert(chain, key).map_err(|e| match e {
                rustls::Error::InconsistentKeys(_) => {
                    bad(key_key, format!("the private key does not belong to the certificate in {}", path.display()))
                }
                e => bad(key_key, format!("cannot use the key with {}: {e}", path.display())),
            })?
        }
        None if cfg.key_file.is_some() || cfg.key_env.is_some() => {
            return Err(bad("cert_file", "a client key is set but no cert_file"));
        }
        None => builder.with_no_client_auth(),
    };
    if !cfg.alpn.is_empty() {
        config.alpn_protocols = cfg.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        summary.push_str(&format!(", ALPN {}", cfg.alpn.join(",")));
    }
    Ok(Tls { config: Arc::new(config), summary, insecure: cfg.insecure_skip_verify })
}

/// The TLS server configuration of the embedded broker's `[broker.tls]` listener:
/// its certificate chain and key, checked to belong together. Errors name the
/// `broker.tls` key and the file, never the key's text.
pub fn server(
    cfg: &super::config::BrokerTlsConfig,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Result<Arc<ServerConfig>, String> {
    let named = |e: TlsError| format!("broker.tls.{}: {}", e.key, e.reason);
    let path = resolve(&cfg.cert_file);
    let chain = certificates("cert_file", &path).map_err(named)?;
    let key = private_key(cfg.key_file.as_ref(), cfg.key_env.as_ref(), resolve).map_err(named)?;
    let key_key = if cfg.key_file.is_some() { "key_file" } else { "key_env" };
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("broker.tls: TLS setup failed: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => {
                format!(
                    "broker.tls.{key_key}: the private key does not belong to the certificate in {}",
                    path.display()
                )
            }
            e => format!("broker.tls.{key_key}: cannot use the key with {}: {e}", path.display()),
        })?;
    Ok(Arc::new(config))
}

/// Verifies the broker's certificate against a configured name instead of the URL host.
#[derive(Debug)]
struct NamedAs {
    inner: Arc<WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for NamedAs {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _host: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner.verify_server_cert(end_entity, intermediates, &self.name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// `insecure_skip_verify`: any certificate is accepted (the handshake
/// signatures are still checked, so the connection is encrypted, not authenticated).
#[derive(Debug)]
struct AnyCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _host: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// What a failed TLS connection means for the user, if the error chain holds a
/// TLS failure. `handshake`: the failure happened while the TLS handshake ran
/// (a closed connection then usually means the port does not speak TLS).
pub fn explain(err: &(dyn std::error::Error + 'static), handshake: bool) -> Option<&'static str> {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return explain_rustls(tls);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if let Some(tls) = io.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
                return explain_rustls(tls);
            }
            if handshake
                && matches!(
                    io.kind(),
                    std::io::ErrorKind::UnexpectedEof
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::BrokenPipe
                )
            {
                return Some(
                    "the broker closed the connection during the TLS handshake: is this port a plaintext \
                     (mqtt://) listener, or does the broker refuse this client?",
                );
            }
        }
        next = e.source();
    }
    None
}

fn explain_rustls(e: &rustls::Error) -> Option<&'static str> {
    use AlertDescription as A;
    Some(match e {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                "the broker's certificate is not signed by a trusted CA (wrong or missing mqtt.tls.ca_file?)"
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "the broker's certificate has expired (or this device's clock is wrong)"
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "the broker's certificate is not valid yet (is this device's clock set?)"
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                "the broker's certificate is not issued for this host name: check the host in mqtt.url or set \
                 mqtt.tls.server_name"
            }
            CertificateError::Revoked => "the broker's certificate is revoked",
            _ => "the broker's certificate was rejected",
        },
        rustls::Error::AlertReceived(A::CertificateRequired) => {
            "the broker requires a client certificate: set mqtt.tls.cert_file and key_file (or key_env)"
        }
        rustls::Error::AlertReceived(
            A::BadCertificate
            | A::UnknownCA
            | A::CertificateUnknown
            | A::UnsupportedCertificate
            | A::CertificateExpired
            | A::CertificateRevoked
            | A::AccessDenied,
        ) => "the broker refused the client certificate (not signed by a CA it trusts, expired, or revoked)",
        rustls::Error::AlertReceived(A::HandshakeFailure) => {
            "the broker refused the TLS handshake (it may require a client certificate, or share no cipher suite)"
        }
        rustls::Error::AlertReceived(A::NoApplicationProtocol) => {
            "the broker accepts none of the ALPN protocols in mqtt.tls.alpn"
        }
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
            "the broker did not answer with TLS: is this a plaintext (mqtt://) port?"
        }
        rustls::Error::NoCertificatesPresented => "the broker sent no certificate",
        _ => "TLS failure",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> MqttTlsConfig {
        MqttTlsConfig::default()
    }

    fn at(dir: &Path) -> impl Fn(&Path) -> PathBuf + '_ {
        move |p: &Path| dir.join(p)
    }

    #[test]
    fn a_missing_ca_file_names_the_key_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let c = MqttTlsConfig { ca_file: Some("nope.pem".into()), ..cfg() };
        let e = load(&c, &at(dir.path())).unwrap_err().to_string();
        assert!(e.starts_with("mqtt.tls.ca_file: ") && e.contains("nope.pem") && e.contains("cannot read"), "{e}");
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), "just text\n").unwrap();
        let c = MqttTlsConfig { ca_file: Some("ca.pem".into()), ..cfg() };
        let e = load(&c, &at(dir.path())).unwrap_err().to_string();
        assert!(e.contains("mqtt.tls.ca_file") && e.contains("no certificate"), "{e}");
    }

    #[test]
    fn a_key_file_without_a_key_is_refused_without_quoting_it() {
        let dir = tempfile::tempdir().unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["ca".into()]).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.cert.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LXNlY3JldA==\n").unwrap();
        let c = MqttTlsConfig {
            ca_file: Some("ca.pem".into()),
            cert_file: Some("ca.pem".into()),
            key_file: Some("key.pem".into()),
            ..cfg()
        };
        let e = load(&c, &at(dir.path())).unwrap_err().to_string();
        assert!(e.contains("mqtt.tls.key_file") && e.contains("key.pem") && e.contains("no private key"), "{e}");
        assert!(!e.contains("c2VjcmV0"), "{e}");
    }

    #[test]
    fn a_key_that_does_not_match_the_certificate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = rcgen::generate_simple_self_signed(vec!["a".into()]).unwrap();
        let b = rcgen::generate_simple_self_signed(vec!["b".into()]).unwrap();
        std::fs::write(dir.path().join("a.pem"), a.cert.pem()).unwrap();
        std::fs::write(dir.path().join("b.key"), b.key_pair.serialize_pem()).unwrap();
        let c = MqttTlsConfig {
            ca_file: Some("a.pem".into()),
            cert_file: Some("a.pem".into()),
            key_file: Some("b.key".into()),
            ..cfg()
        };
        let e = load(&c, &at(dir.path())).unwrap_err().to_string();
        assert!(e.contains("mqtt.tls.key_file") && e.contains("does not belong"), "{e}");
        // The matching key is accepted, from a file or an environment variable.
        std::fs::write(dir.path().join("a.key"), a.key_pair.serialize_pem()).unwrap();
        let ok = MqttTlsConfig { key_file: Some("a.key".into()), alpn: vec!["x-amzn-mqtt-ca".into()], ..c.clone() };
        let tls = load(&ok, &at(dir.path())).unwrap();
        assert_eq!(tls.config.alpn_protocols, vec![b"x-amzn-mqtt-ca".to_vec()]);
        std::env::set_var("EDGEINFER_TEST_TLS_KEY", a.key_pair.serialize_pem());
        let env = MqttTlsConfig { key_file: None, key_env: Some("EDGEINFER_TEST_TLS_KEY".into()), ..c.clone() };
        assert!(load(&env, &at(dir.path())).is_ok());
        let unset = MqttTlsConfig { key_file: None, key_env: Some("EDGEINFER_TEST_TLS_KEY_ABSENT".into()), ..c };
        let e = load(&unset, &at(dir.path())).unwrap_err().to_string();
        assert!(e.contains("mqtt.tls.key_env") && e.contains("EDGEINFER_TEST_TLS_KEY_ABSENT"), "{e}");
    }

    #[test]
    fn a_bad_server_name_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["ca".into()]).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.cert.pem()).unwrap();
        let c = MqttTlsConfig { ca_file: Some("ca.pem".into()), server_name: Some("not a name!".into()), ..cfg() };
        let e = load(&c, &at(dir.path())).unwrap_err().to_string();
        assert!(e.contains("mqtt.tls.server_name"), "{e}");
    }

    #[test]
    fn tls_failures_are_explained() {
        let unknown = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, unknown);
        assert!(explain(&io, true).unwrap().contains("ca_file"));
        let alert = rustls::Error::AlertReceived(AlertDescription::CertificateRequired);
        assert!(explain(&alert, false).unwrap().contains("cert_file"));
        let eof = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "tls handshake eof");
        assert!(explain(&eof, true).unwrap().contains("plaintext"));
        assert!(explain(&eof, false).is_none());
    }
}
