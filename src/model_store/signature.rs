//! Ed25519 model signatures (ring). A signature covers the model's SHA-256
//! and size, not its name, so a signed file may be renamed. Keys: a PKCS#8
//! private key in PEM (`edgeinfer model keygen`, or `openssl genpkey
//! -algorithm ed25519`) stays on the PC that signs; boards get the 32-byte
//! public key in base64.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};

/// Largest signature file read (they are about 400 bytes).
pub const MAX_BYTES: u64 = 64 << 10;

/// Schema id of signature files, also the first line of the signed message.
pub const SIGNATURE_SCHEMA: &str = "edgeinfer/model-signature/v1";

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// The signature file of a model: `MODEL.sig` (`digits.onnx` -> `digits.onnx.sig`).
pub fn path_for(model: &Path) -> PathBuf {
    let mut p = model.as_os_str().to_owned();
    p.push(".sig");
    PathBuf::from(p)
}

/// The bytes a signature covers.
fn message(sha256: &str, size: u64) -> Vec<u8> {
    format!("{SIGNATURE_SCHEMA}\n{sha256}\n{size}\n").into_bytes()
}

/// A trusted Ed25519 public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    /// From base64 of its 32 bytes.
    pub fn parse(text: &str) -> Result<PublicKey, String> {
        let bytes = B64.decode(text.trim()).map_err(|e| format!("not base64: {e}"))?;
        let bytes: [u8; 32] =
            bytes.try_into().map_err(|b: Vec<u8>| format!("an ed25519 public key is 32 bytes, this is {}", b.len()))?;
        Ok(PublicKey(bytes))
    }

    /// Base64 of its 32 bytes.
    pub fn to_base64(&self) -> String {
        B64.encode(self.0)
    }
}

/// A signing key read from a PKCS#8 PEM file.
pub struct SigningKey(Ed25519KeyPair);

impl SigningKey {
    /// A new random key, as PKCS#8 PEM text.
    pub fn generate_pem() -> Result<String, String> {
        let rng = ring::rand::SystemRandom::new();
        let doc = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| "cannot generate a key".to_string())?;
        let body = B64.encode(doc.as_ref());
        let lines: Vec<&str> = body.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap_or("")).collect();
        Ok(format!("-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n", lines.join("\n")))
    }

    /// From PKCS#8 PEM text (`-----BEGIN PRIVATE KEY-----`).
    pub fn from_pem(text: &str) -> Result<SigningKey, String> {
        let body: String = text
            .lines()
            .map(str::trim)
            .skip_while(|l| *l != "-----BEGIN PRIVATE KEY-----")
            .skip(1)
            .take_while(|l| *l != "-----END PRIVATE KEY-----")
            .collect();
        if body.is_empty() {
            return Err("no `-----BEGIN PRIVATE KEY-----` block (a PKCS#8 PEM ed25519 key is needed)".into());
        }
        let der = B64.decode(body).map_err(|e| format!("the PEM block is not base64: {e}"))?;
        Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
            .map(SigningKey)
            .map_err(|e| format!("not an ed25519 PKCS#8 key: {e}"))
    }

    /// Its public key.
    pub fn public(&self) -> PublicKey {
        let mut k = [0u8; 32];
        k.copy_from_slice(self.0.public_key().as_ref());
        PublicKey(k)
    }

    /// Signs a model of this hash and size.
    pub fn sign(&self, file: &str, sha256: &str, size: u64) -> Signature {
        let sig = self.0.sign(&message(sha256, size));
        Signature {
            file: file.to_string(),
            sha256: sha256.to_string(),
            size,
            public_key: self.public().to_base64(),
            signature: B64.encode(sig.as_ref()),
        }
    }
}

/// A signature file's content.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signature {
    /// The file name when it was signed (informative).
    pub file: String,
    /// SHA-256 of the model, hex.
    pub sha256: String,
    /// Size of the model in bytes.
    pub size: u64,
    /// The signer's public key, base64.
    pub public_key: String,
    /// The ed25519 signature, base64.
    pub signature: String,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct SignatureFile {
    schema: String,
    #[serde(flatten)]
    sig: Signature,
}

impl Signature {
    /// From a signature file's JSON.
    pub fn parse(text: &str) -> Result<Signature, String> {
        let f: SignatureFile = serde_json::from_str(text).map_err(|e| format!("not a model signature: {e}"))?;
        if f.schema != SIGNATURE_SCHEMA {
            return Err(format!("schema `{}` is not {SIGNATURE_SCHEMA}", f.schema));
        }
        Ok(f.sig)
    }

    /// The signature file's JSON.
    pub fn to_json(&self) -> String {
        let f = SignatureFile { schema: SIGNATURE_SCHEMA.into(), sig: self.clone() };
        serde_json::to_string_pretty(&f).unwrap_or_default() + "\n"
    }

    /// Checks that it is for a file of this hash and size and was made by one of
    /// `trusted`; the key that made it.
    pub fn verify<'k>(&self, sha256: &str, size: u64, trusted: &'k [PublicKey]) -> Result<&'k PublicKey, String> {
        if !self.sha256.eq_ignore_ascii_case(sha256) || self.size != size {
            return Err(format!(
                "the signature is for another file (sha256 {}, {} bytes), not this one (sha256 {sha256}, {size} bytes)",
                self.sha256, self.size
            ));
        }
        let signer = PublicKey::parse(&self.public_key).map_err(|e| format!("public_key: {e}"))?;
        let key = trusted
            .iter()
            .find(|k| **k == signer)
            .ok_or_else(|| format!("signed by {}, which is not in models.public_keys", signer.to_base64()))?;
        let sig = B64.decode(&self.signature).map_err(|e| format!("signature: not base64: {e}"))?;
        UnparsedPublicKey::new(&ED25519, key.0)
            .verify(&message(sha256, size), &sig)
            .map_err(|_| "the signature does not verify (the file or the signature was altered)".to_string())?;
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_only_for_its_file_and_a_trusted_key() {
        let key = SigningKey::from_pem(&SigningKey::generate_pem().unwrap()).unwrap();
        let other = SigningKey::from_pem(&SigningKey::generate_pem().unwrap()).unwrap();
        let sha = "ab".repeat(32);
        let sig = Signature::parse(&key.sign("m.onnx", &sha, 100).to_json()).unwrap();
        let trusted = [other.public(), key.public()];
        assert_eq!(sig.verify(&sha, 100, &trusted).unwrap(), &key.public());
        assert!(sig.verify(&sha, 101, &trusted).unwrap_err().contains("for another file"));
        assert!(sig.verify(&"cd".repeat(32), 100, &trusted).unwrap_err().contains("for another file"));
        assert!(sig.verify(&sha, 100, &[other.public()]).unwrap_err().contains("not in models.public_keys"));
        // A signature copied from another file, with this file's hash written in, fails.
        let mut forged = key.sign("m.onnx", &"cd".repeat(32), 100);
        forged.sha256 = sha.clone();
        assert!(forged.verify(&sha, 100, &trusted).unwrap_err().contains("does not verify"));
        assert_eq!(PublicKey::parse(&key.public().to_base64()).unwrap(), key.public());
        assert!(PublicKey::parse("AAAA").unwrap_err().contains("32 bytes"));
        assert!(Signature::parse("{}").is_err());
        assert!(SigningKey::from_pem("hello").err().unwrap().contains("BEGIN PRIVATE KEY"));
        assert_eq!(path_for(Path::new("/m/a.onnx")), PathBuf::from("/m/a.onnx.sig"));
    }
}
