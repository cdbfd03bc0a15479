//! Downloads a model over HTTPS into the models directory (feature
//! `model-fetch`): HTTPS only, the server's certificate checked against
//! `[models] ca_file` or the system's CA certificates (rustls with ring), the
//! size capped while reading, the SHA-256 compared before the file gets its
//! name. A download is written to a temporary file of its own and linked to
//! its name only once whole and checked (never over an existing file), so a
//! cut connection or two concurrent downloads never leave a model that looks
//! complete but is not.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::incoming::{check_sha256, file_name, part_path, publish, rename, same_file, Downloaded};

/// Where to download from and what to expect.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// `https://...` URL of the model.
    pub url: &'a str,
    /// Its SHA-256, hex (the download is refused if it differs).
    pub sha256: &'a str,
    /// File name in the models directory (default: the URL's last path segment).
    pub name: Option<&'a str>,
    /// Also fetch `URL.sig` (models must be signed).
    pub signature: bool,
}

use super::signature::MAX_BYTES as MAX_SIGNATURE_BYTES;

/// An HTTPS client trusting the CA certificates in `ca_file` (PEM), or the system's.
pub fn agent(ca_file: Option<&Path>) -> Result<ureq::Agent, String> {
    use ureq::tls::{Certificate, RootCerts, TlsConfig, TlsProvider};
    let ders: Vec<Vec<u8>> = match ca_file {
        Some(path) => {
            use rustls::pki_types::pem::PemObject;
            let bytes = std::fs::read(path).map_err(|e| format!("models.ca_file: {}: {e}", path.display()))?;
            let certs = rustls::pki_types::CertificateDer::pem_slice_iter(&bytes)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("models.ca_file: {}: not valid PEM: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!("models.ca_file: {}: no `BEGIN CERTIFICATE` block", path.display()));
            }
            certs.into_iter().map(|c| c.to_vec()).collect()
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            if found.certs.is_empty() {
                return Err("no system CA certificates: install ca-certificates or set models.ca_file".into());
            }
            found.certs.into_iter().map(|c| c.to_vec()).collect()
        }
    };
    let roots: Vec<Certificate<'static>> = ders.iter().map(|d| Certificate::from_der(d).to_owned()).collect();
    let tls = TlsConfig::builder()
        .provider(TlsProvider::Rustls)
        .root_certs(RootCerts::Specific(Arc::new(roots)))
        .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .build();
    let timeout = Some(Duration::from_secs(30));
    Ok(ureq::Agent::config_builder()
        // A server that trickles bytes must not hold the pipeline's reload slot for hours:
        // the whole download gets the time of 256 MiB at 100 kB/s.
        .timeout_global(Some(Duration::from_secs(45 * 60)))
        .https_only(true)
        .http_status_as_error(false)
        .user_agent(format!("edgeinfer/{}", env!("CARGO_PKG_VERSION")))
        .tls_config(tls)
        .timeout_connect(timeout)
        .timeout_recv_response(timeout)
        .timeout_per_read(Some(Duration::from_secs(60)))
        .build()
        .into())
}

/// The URL as shown in messages: without its query (which may hold a token).
fn shown(url: &str) -> &str {
    url.split('?').next().unwrap_or(url)
}

/// Streams `url` into `part` (created fresh), at most `max_bytes` (named `cap_key` in errors);
/// SHA-256 and size.
fn download(
    agent: &ureq::Agent,
    url: &str,
    part: &Path,
    max_bytes: u64,
    cap_key: &str,
) -> Result<(String, u64), String> {
    let mut resp = agent.get(url).call().map_err(|e| format!("GET {}: {e}", shown(url)))?;
    if resp.status() != 200 {
        return Err(format!("GET {}: HTTP {}", shown(url), resp.status()));
    }
    if let Some(len) = resp.body().content_length().filter(|&l| l > max_bytes) {
        return Err(format!("GET {}: {len} bytes, above {cap_key} ({max_bytes})", shown(url)));
    }
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(part)
        .map_err(|e| format!("{}: {e}", part.display()))?;
    let mut body = resp.body_mut().with_config().limit(u64::MAX).reader().take(max_bytes.saturating_add(1));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut n = 0u64;
    loop {
        let got = body.read(&mut buf).map_err(|e| format!("GET {}: cut after {n} bytes: {e}", shown(url)))?;
        if got == 0 {
            break;
        }
        n += got as u64;
        if n > max_bytes {
            return Err(format!("GET {}: more than {cap_key} ({max_bytes})", shown(url)));
        }
        h.update(&buf[..got]);
        out.write_all(&buf[..got]).map_err(|e| format!("{}: {e}", part.display()))?;
    }
    out.sync_all().map_err(|e| format!("{}: {e}", part.display()))?;
    Ok((h.finalize().iter().map(|b| format!("{b:02x}")).collect(), n))
}

/// Downloads the model (and its signature) into `dir`, checks its SHA-256, and gives
/// it its name. A file of that name and hash already there is used as is; one with
/// another hash is never replaced (a running or previous model may be it).
pub fn fetch(agent: &ureq::Agent, req: &Request, dir: &Path, max_bytes: u64) -> Result<Downloaded, String> {
    if !req.url.starts_with("https://") {
        return Err(format!("{}: models are downloaded over https:// only", shown(req.url)));
    }
    let want = check_sha256(req.sha256)?;
    let name = file_name(req.url, req.name)?;
    let dest = dir.join(name);
    let sig_url = format!("{}.sig", req.url.split('?').next().unwrap_or(req.url));
    let (bytes, reused) = if dest.exists() {
        same_file(&dest, &want, max_bytes)?;
        (0, true)
    } else {
        let part = part_path(dir, name);
        let got = download(agent, req.url, &part, max_bytes, "models.max_bytes").and_then(|(got, n)| {
            if got != want {
                return Err(format!("{}: SHA-256 {got} ({n} bytes), expected {want}", shown(req.url)));
            }
            Ok(n)
        });
        let published = got.and_then(|n| publish(&part, &dest).map(|fresh| (n, fresh)));
        let _ = std::fs::remove_file(&part);
        match published? {
            (n, true) => (n, false),
            // Another download of the same file got there first: fine if it is the same file.
            (_, false) => {
                same_file(&dest, &want, max_bytes)?;
                (0, true)
            }
        }
    };
    if req.signature {
        // Always fetched again: a stale or bad signature beside a reused file must not stick.
        let part = part_path(dir, &format!("{name}.sig"));
        let fetched = download(agent, &sig_url, &part, MAX_SIGNATURE_BYTES, "the signature size limit")
            .and_then(|_| rename(&part, &super::signature::path_for(&dest)));
        if let Err(e) = fetched {
            let _ = std::fs::remove_file(&part);
            if !reused {
                let _ = std::fs::remove_file(&dest);
            }
            return Err(format!("{e} (the signature; models must be signed)"));
        }
    }
    Ok(Downloaded { path: dest, bytes, reused })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_hashes_are_checked_before_anything_is_fetched() {
        assert_eq!(file_name("https://h/m/digits_v3.onnx?token=x", None).unwrap(), "digits_v3.onnx");
        assert_eq!(file_name("https://h/m/x", Some("d.onnx")).unwrap(), "d.onnx");
        assert_eq!(file_name("https://h/m/d.nnef.tgz", None).unwrap(), "d.nnef.tgz");
        assert!(file_name("https://h/m/", None).unwrap_err().contains("give `name`"));
        for bad in [".hidden", "a/b", "a b", "..", "active.json", "m.onnx.sig", "m.onnx.part", ".onnx"] {
            assert!(file_name("https://h/x", Some(bad)).is_err(), "{bad}");
        }
        assert!(check_sha256("abc").unwrap_err().contains("64 hex digits"));
        assert_eq!(check_sha256(&"AB".repeat(32)).unwrap(), "ab".repeat(32));
        let agent = ureq::agent();
        let dir = tempfile::tempdir().unwrap();
        let req = Request { url: "http://h/m.onnx", sha256: &"a".repeat(64), name: None, signature: false };
        assert!(fetch(&agent, &req, dir.path(), 10).unwrap_err().contains("https:// only"));
    }
}
