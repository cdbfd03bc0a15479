//! `edgeinfer model keygen | sign | verify`: the PC side of signed model
//! updates. The private key never goes to a board; boards trust the public
//! key in `[models] public_keys` and check `MODEL.sig` before loading a model.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::model_store::signature::{path_for, PublicKey, Signature, SigningKey};

/// Largest model `sign` and `verify` hash: far above any model, a guard against a device file.
const MAX_MODEL_BYTES: u64 = 16 << 30;

/// Writes a new private key to `out` (mode 0600, never over an existing file) and
/// its public key to `OUT.pub`; prints the public key and the config line.
pub fn keygen(out: &Path, w: &mut dyn Write) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let pem = SigningKey::generate_pem().map_err(anyhow::Error::msg)?;
    let public = SigningKey::from_pem(&pem).map_err(anyhow::Error::msg)?.public().to_base64();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(|e| anyhow::anyhow!("{}: {e} (an existing key is never overwritten)", out.display()))?;
    f.write_all(pem.as_bytes())?;
    f.sync_all()?;
    let pub_path = pub_path(out);
    std::fs::write(&pub_path, format!("{public}\n"))?;
    writeln!(w, "private key: {} (keep it on this machine: it signs models)", out.display())?;
    writeln!(w, "public key:  {public} (also in {})", pub_path.display())?;
    writeln!(w, "boards that should trust it get, in their config:\n[models]\npublic_keys = [\"{public}\"]")?;
    Ok(())
}

fn pub_path(key: &Path) -> PathBuf {
    let mut p = key.as_os_str().to_owned();
    p.push(".pub");
    PathBuf::from(p)
}

/// Signs `model` with the key in `key_file`; writes the signature to `out` (default `MODEL.sig`).
pub fn sign(model: &Path, key_file: &Path, out: Option<&Path>, w: &mut dyn Write) -> anyhow::Result<PathBuf> {
    let text = std::fs::read_to_string(key_file).map_err(|e| anyhow::anyhow!("{}: {e}", key_file.display()))?;
    let key = SigningKey::from_pem(&text).map_err(|e| anyhow::anyhow!("{}: {e}", key_file.display()))?;
    let (sha256, size) = crate::model_store::sha256_of(model, MAX_MODEL_BYTES).map_err(anyhow::Error::msg)?;
    let name = model.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let sig = key.sign(&name, &sha256, size);
    let out = out.map(Path::to_path_buf).unwrap_or_else(|| path_for(model));
    std::fs::write(&out, sig.to_json()).map_err(|e| anyhow::anyhow!("{}: {e}", out.display()))?;
    writeln!(w, "signed {}: sha256 {sha256}, {size} bytes, key {}", model.display(), sig.public_key)?;
    writeln!(w, "wrote {} (copy it next to the model)", out.display())?;
    Ok(out)
}

/// Checks `MODEL.sig` (or `sig_file`) against `model` and the trusted keys (base64).
pub fn verify(model: &Path, sig_file: Option<&Path>, keys: &[String], w: &mut dyn Write) -> anyhow::Result<()> {
    if keys.is_empty() {
        anyhow::bail!("give the trusted keys with --public-key (base64, repeatable)");
    }
    let trusted: Vec<PublicKey> = keys
        .iter()
        .map(|k| PublicKey::parse(k).map_err(|e| anyhow::anyhow!("--public-key {k}: {e}")))
        .collect::<anyhow::Result<_>>()?;
    let sig_path = sig_file.map(Path::to_path_buf).unwrap_or_else(|| path_for(model));
    let text = std::fs::read_to_string(&sig_path).map_err(|e| anyhow::anyhow!("{}: {e}", sig_path.display()))?;
    let sig = Signature::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", sig_path.display()))?;
    let (sha256, size) = crate::model_store::sha256_of(model, MAX_MODEL_BYTES).map_err(anyhow::Error::msg)?;
    let key = sig.verify(&sha256, size, &trusted).map_err(|e| anyhow::anyhow!("{}: {e}", model.display()))?;
    writeln!(w, "{}: good signature by {} (sha256 {sha256})", model.display(), key.to_base64())?;
    Ok(())
}

/// What `edgeinfer model fetch` was given.
pub struct FetchArgs {
    /// https:// URL.
    pub url: String,
    /// Expected SHA-256, hex.
    pub sha256: String,
    /// Directory to write into.
    pub dir: PathBuf,
    /// File name (default: from the URL).
    pub name: Option<String>,
    /// Also fetch `URL.sig`.
    pub signature: bool,
    /// CA certificates to trust (default: the system's).
    pub ca_file: Option<PathBuf>,
    /// Size cap.
    pub max_bytes: u64,
}

/// Downloads a model as `update_model` does on a board.
#[cfg(feature = "model-fetch")]
pub fn fetch(a: &FetchArgs, w: &mut dyn Write) -> anyhow::Result<()> {
    use crate::model_store::fetch;
    let agent = fetch::agent(a.ca_file.as_deref()).map_err(anyhow::Error::msg)?;
    let req = fetch::Request { url: &a.url, sha256: &a.sha256, name: a.name.as_deref(), signature: a.signature };
    let got = fetch::fetch(&agent, &req, &a.dir, a.max_bytes).map_err(anyhow::Error::msg)?;
    if got.reused {
        writeln!(w, "{}: already there with this SHA-256", got.path.display())?;
    } else {
        writeln!(w, "wrote {} ({} bytes, SHA-256 checked)", got.path.display(), got.bytes)?;
    }
    Ok(())
}

/// Without feature `model-fetch`: the error naming it.
#[cfg(not(feature = "model-fetch"))]
pub fn fetch(_: &FetchArgs, _: &mut dyn Write) -> anyhow::Result<()> {
    anyhow::bail!(crate::features::not_built("model-fetch", "`edgeinfer model fetch`"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keygen_sign_verify_round_trip_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("signer.key");
        let mut out = Vec::new();
        keygen(&key, &mut out).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(keygen(&key, &mut Vec::new()).unwrap_err().to_string().contains("never overwritten"));
        let public = std::fs::read_to_string(dir.path().join("signer.key.pub")).unwrap().trim().to_string();
        assert!(String::from_utf8(out).unwrap().contains(&format!("public_keys = [\"{public}\"]")));

        let model = dir.path().join("m.onnx");
        std::fs::write(&model, b"model bytes").unwrap();
        let sig = sign(&model, &key, None, &mut Vec::new()).unwrap();
        assert_eq!(sig, dir.path().join("m.onnx.sig"));
        let mut said = Vec::new();
        verify(&model, None, std::slice::from_ref(&public), &mut said).unwrap();
        assert!(String::from_utf8(said).unwrap().contains("good signature by"));
        std::fs::write(&model, b"model bytes, altered").unwrap();
        let e = verify(&model, None, &[public], &mut Vec::new()).unwrap_err().to_string();
        assert!(e.contains("for another file"), "{e}");
    }
}
