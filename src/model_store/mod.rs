//! Where models may come from at run time, and proof of where they came
//! from. `reload_model` reads only regular files inside the models
//! directory (`[models] dir`, else the directory of the pipeline's
//! configured model): no `..`, no symbolic link that leads out, no device
//! or FIFO, nothing above `max_bytes`, because the path arrives in an MQTT
//! message. With `public_keys` set, a model must also carry a valid ed25519
//! signature (`MODEL.sig`, made by `edgeinfer model sign`) over its SHA-256.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

pub mod active;
#[cfg(feature = "model-fetch")]
pub mod fetch;
pub mod incoming;
pub mod probation;
pub mod signature;

pub use signature::{PublicKey, Signature};

/// `[models]`: the models directory and the keys models must be signed with.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelsConfig {
    /// The directory `reload_model` may read from (relative: to the config file);
    /// default: the directory of each pipeline's configured model.
    pub dir: Option<PathBuf>,
    /// Largest model file accepted at run time, in bytes.
    pub max_bytes: u64,
    /// Ed25519 public keys (base64, from `edgeinfer model keygen`); with any, models
    /// loaded at run time must be signed by one of them.
    pub public_keys: Vec<String>,
    /// CA certificates (PEM) for `update_model` downloads; absent: the system's.
    pub ca_file: Option<PathBuf>,
    /// Where the model each pipeline runs after an update is kept across restarts
    /// (default: `active.json` in `dir`; without `dir`, not kept).
    pub state_file: Option<PathBuf>,
    /// Inferences a model swapped in at run time is on probation for (0: none).
    pub probation_inferences: u32,
    /// Largest share of failed inferences on probation before the old model comes back.
    pub max_error_rate: f64,
    /// Largest median inference latency on probation, as a multiple of the old model's.
    pub max_latency_ratio: f64,
}

/// Default of `max_bytes`: 256 MiB, more than any model a board runs, far below what
/// would exhaust its memory.
pub const DEFAULT_MAX_BYTES: u64 = 256 << 20;

/// Most inferences on probation (their latencies are kept until it ends).
pub const MAX_PROBATION: u32 = 100_000;

impl Default for ModelsConfig {
    fn default() -> Self {
        ModelsConfig {
            dir: None,
            max_bytes: DEFAULT_MAX_BYTES,
            public_keys: Vec::new(),
            ca_file: None,
            state_file: None,
            probation_inferences: 50,
            max_error_rate: 0.2,
            max_latency_ratio: 3.0,
        }
    }
}

impl ModelsConfig {
    /// Checks the values; the error names the key (without the `models.` prefix).
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.max_bytes == 0 {
            return Err(("max_bytes".into(), "must be at least 1".into()));
        }
        self.keys().map_err(|(ix, e)| (format!("public_keys[{ix}]"), e))?;
        if self.probation_inferences > MAX_PROBATION {
            return Err(("probation_inferences".into(), format!("must be 0..={MAX_PROBATION}")));
        }
        if !(0.0..=1.0).contains(&self.max_error_rate) {
            return Err(("max_error_rate".into(), "must be 0 to 1".into()));
        }
        if !(self.max_latency_ratio >= 1.0 && self.max_latency_ratio.is_finite()) {
            return Err(("max_latency_ratio".into(), "must be a number >= 1".into()));
        }
        Ok(())
    }

    /// The state file of updated models, if there is one (`resolve` makes paths absolute).
    pub fn active_models(&self, resolve: &dyn Fn(&Path) -> PathBuf) -> Option<active::ActiveModels> {
        let path = match (&self.state_file, &self.dir) {
            (Some(f), _) => resolve(f),
            (None, Some(d)) => resolve(d).join("active.json"),
            (None, None) => return None,
        };
        Some(active::ActiveModels::new(path))
    }

    /// The probation bounds of a model swapped in at run time.
    pub fn probation(&self) -> probation::Bounds {
        probation::Bounds {
            inferences: self.probation_inferences,
            max_error_rate: self.max_error_rate,
            max_latency_ratio: self.max_latency_ratio,
        }
    }

    /// The trusted keys; the error gives the index of a bad one.
    pub fn keys(&self) -> Result<Vec<PublicKey>, (usize, String)> {
        self.public_keys.iter().enumerate().map(|(ix, k)| PublicKey::parse(k).map_err(|e| (ix, e))).collect()
    }

    /// The store for a pipeline whose configured model is `model` (both resolved).
    pub fn store(&self, resolve: &dyn Fn(&Path) -> PathBuf, model: &Path) -> Result<Store, String> {
        let dir = match &self.dir {
            Some(d) => resolve(d),
            None => model.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from(".")),
        };
        let keys = self.keys().map_err(|(ix, e)| format!("models.public_keys[{ix}]: {e}"))?;
        Store::new(&dir, self.max_bytes, keys)
    }
}

/// The models directory of one pipeline, with the size cap and the trusted keys.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
    max_bytes: u64,
    keys: Vec<PublicKey>,
}

/// Who signed a model that was checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Provenance {
    /// SHA-256 of the file, hex.
    pub sha256: String,
    /// The key that signed it (base64), or None when no keys are configured.
    pub signed_by: Option<String>,
}

impl Store {
    /// A store over `dir` (which must exist).
    pub fn new(dir: &Path, max_bytes: u64, keys: Vec<PublicKey>) -> Result<Store, String> {
        let dir = dir.canonicalize().map_err(|e| format!("models directory {}: {e}", dir.display()))?;
        Ok(Store { dir, max_bytes, keys })
    }

    /// The size cap, in bytes.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// The directory, with symbolic links resolved.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// True when models must be signed.
    pub fn requires_signatures(&self) -> bool {
        !self.keys.is_empty()
    }

    /// `path` (absolute, or relative to the models directory) if it is a regular
    /// file inside the directory, within the size cap, after resolving symbolic
    /// links; else an error that names the path and the rule it breaks.
    pub fn confine(&self, path: &Path) -> Result<PathBuf, String> {
        self.confine_capped(path, self.max_bytes, "models.max_bytes")
    }

    fn confine_capped(&self, path: &Path, cap: u64, cap_key: &str) -> Result<PathBuf, String> {
        let shown = path.display();
        if path.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(format!("{shown}: `..` is not allowed in a model path"));
        }
        let joined = if path.is_absolute() { path.to_path_buf() } else { self.dir.join(path) };
        let real = joined.canonicalize().map_err(|e| format!("{shown}: {e}"))?;
        if !real.starts_with(&self.dir) {
            let via = if real != joined { format!(" (it leads to {})", real.display()) } else { String::new() };
            return Err(format!("{shown} is outside the models directory {}{via}", self.dir.display()));
        }
        let meta = std::fs::metadata(&real).map_err(|e| format!("{shown}: {e}"))?;
        if !meta.is_file() {
            return Err(format!("{shown} is not a regular file"));
        }
        if meta.len() > cap {
            return Err(format!("{shown} is {} bytes, above {cap_key} ({cap})", meta.len()));
        }
        Ok(real)
    }

    /// The SHA-256 of a confined model and, when keys are configured, the key that
    /// signed it: `MODEL.sig` must exist, name the same hash and size, and verify.
    pub fn check(&self, model: &Path) -> Result<Provenance, String> {
        let (sha256, size) = sha256_of(model, self.max_bytes)?;
        if self.keys.is_empty() {
            return Ok(Provenance { sha256, signed_by: None });
        }
        // The signature obeys the directory's rules too: a symlink to /dev/zero or a FIFO
        // beside a model must not hang or exhaust the loader.
        let sig_path = self
            .confine_capped(&signature::path_for(model), signature::MAX_BYTES, "the signature size limit")
            .map_err(|e| format!("{e} (models must be signed: models.public_keys is set)"))?;
        let text = std::fs::read_to_string(&sig_path).map_err(|e| format!("{}: {e}", sig_path.display()))?;
        let sig = Signature::parse(&text).map_err(|e| format!("{}: {e}", sig_path.display()))?;
        let key = sig
            .verify(&sha256, size, &self.keys)
            .map_err(|e| format!("{}: {e} ({})", sig_path.display(), model.display()))?;
        Ok(Provenance { sha256, signed_by: Some(key.to_base64()) })
    }
}

/// SHA-256 (hex) and size of a file, read in blocks and never more than `max_bytes`.
pub fn sha256_of(path: &Path, max_bytes: u64) -> Result<(String, u64), String> {
    use sha2::{Digest, Sha256};
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut h = Sha256::new();
    let n = std::io::copy(&mut f.take(max_bytes.saturating_add(1)), &mut h)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if n > max_bytes {
        return Err(format!("{}: larger than {max_bytes} bytes", path.display()));
    }
    let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok((hex, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &Path, max: u64) -> Store {
        Store::new(dir, max, Vec::new()).unwrap()
    }

    #[test]
    fn only_regular_files_inside_the_directory_within_the_cap_are_accepted() {
        let root = tempfile::tempdir().unwrap();
        let models = root.path().join("models");
        std::fs::create_dir(&models).unwrap();
        std::fs::write(models.join("ok.onnx"), b"0123456789").unwrap();
        std::fs::write(root.path().join("outside.onnx"), b"x").unwrap();
        std::os::unix::fs::symlink(root.path().join("outside.onnx"), models.join("link-out.onnx")).unwrap();
        std::os::unix::fs::symlink(models.join("ok.onnx"), models.join("link-in.onnx")).unwrap();
        std::fs::create_dir(models.join("sub")).unwrap();
        let s = store(&models, 10);
        let real = models.canonicalize().unwrap();
        assert_eq!(s.confine(Path::new("ok.onnx")).unwrap(), real.join("ok.onnx"));
        assert_eq!(s.confine(&models.join("ok.onnx")).unwrap(), real.join("ok.onnx"));
        assert_eq!(s.confine(Path::new("link-in.onnx")).unwrap(), real.join("ok.onnx"), "a link that stays inside");
        let refused = |p: &Path, why: &str| {
            let e = s.confine(p).unwrap_err();
            assert!(e.contains(why), "{}: {e}", p.display());
        };
        refused(Path::new("../outside.onnx"), "`..` is not allowed");
        refused(&root.path().join("outside.onnx"), "is outside the models directory");
        refused(Path::new("link-out.onnx"), "(it leads to ");
        refused(Path::new("/dev/zero"), "is outside the models directory");
        refused(Path::new("sub"), "is not a regular file");
        refused(Path::new("missing.onnx"), "No such file");
        std::fs::write(models.join("big.onnx"), [0u8; 11]).unwrap();
        refused(Path::new("big.onnx"), "11 bytes, above models.max_bytes (10)");
        // Even a store over / refuses a device.
        let everything = store(Path::new("/"), 1 << 30);
        assert!(everything.confine(Path::new("/dev/zero")).unwrap_err().contains("not a regular file"));
    }

    #[test]
    fn a_signature_file_over_64_kib_is_refused_unread() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 1 << 20);
        let sig = signature::path_for(&dir.path().join("m.onnx"));
        std::fs::write(&sig, vec![b'a'; signature::MAX_BYTES as usize + 1]).unwrap();
        let e = s.confine_capped(&sig, signature::MAX_BYTES, "the signature size limit").unwrap_err();
        assert!(e.contains("above the signature size limit (65536)"), "{e}");
        std::fs::write(&sig, vec![b'a'; signature::MAX_BYTES as usize]).unwrap();
        assert!(s.confine_capped(&sig, signature::MAX_BYTES, "the signature size limit").is_ok());
    }

    #[test]
    fn hashing_stops_at_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("m");
        std::fs::write(&f, b"abc").unwrap();
        let (sha, n) = sha256_of(&f, 3).unwrap();
        assert_eq!((sha.as_str(), n), ("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", 3));
        assert!(sha256_of(&f, 2).unwrap_err().contains("larger than 2 bytes"));
        assert_eq!(sha256_of(&f, u64::MAX).unwrap().1, 3, "no cap at all");
    }

    #[test]
    fn config_names_a_bad_key_by_index() {
        let c: ModelsConfig = toml::from_str("public_keys = [\"not base64!\"]").unwrap();
        let (key, why) = c.validate().unwrap_err();
        assert_eq!(key, "public_keys[0]");
        assert!(why.contains("base64"), "{why}");
        let c: ModelsConfig = toml::from_str("max_bytes = 0").unwrap();
        assert_eq!(c.validate().unwrap_err().0, "max_bytes");
        for (text, key) in [
            ("probation_inferences = 4000000000", "probation_inferences"),
            ("max_error_rate = 1.5", "max_error_rate"),
            ("max_latency_ratio = 0.5", "max_latency_ratio"),
        ] {
            assert_eq!(toml::from_str::<ModelsConfig>(text).unwrap().validate().unwrap_err().0, key, "{text}");
        }
    }
}
