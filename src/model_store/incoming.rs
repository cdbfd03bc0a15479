//! Puts a model that arrived (over HTTPS or MQTT) into the models directory
//! safely: under a temporary name of its own, given its real name only once
//! its SHA-256 matched, never over an existing file, with the directory
//! synced; a signature beside it replaced atomically.

use std::path::{Path, PathBuf};

/// A model in the models directory, downloaded or already there.
#[derive(Debug, Clone)]
pub struct Downloaded {
    /// Its path.
    pub path: PathBuf,
    /// Bytes downloaded (0 when the file was already there with this hash).
    pub bytes: u64,
    /// True when a file of that name and hash was already there.
    pub reused: bool,
}

/// The file name a model gets: letters, digits, `.`, `-`, `_`, not starting with `.`,
/// ending in a model's extension (so a download can never be named like the state file,
/// a signature or a temporary file).
pub fn file_name<'a>(url: &'a str, name: Option<&'a str>) -> Result<&'a str, String> {
    let name = match name {
        Some(n) => n,
        None => {
            let path = url.split(['?', '#']).next().unwrap_or("");
            path.rsplit('/')
                .next()
                .filter(|s| !s.is_empty())
                .ok_or_else(|| format!("{url}: nothing at its end names the file; give `name`"))?
        }
    };
    let ok = !name.starts_with('.')
        && name.len() <= 200
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if !ok {
        return Err(format!("model file name `{name}`: use letters, digits, `.`, `-` and `_`, not starting with `.`"));
    }
    if ![".onnx", ".nnef.tgz", ".nnef.tar"].iter().any(|ext| name.ends_with(ext) && name.len() > ext.len()) {
        return Err(format!("model file name `{name}`: must end in .onnx, .nnef.tgz or .nnef.tar"));
    }
    Ok(name)
}

pub(super) fn check_sha256(sha256: &str) -> Result<String, String> {
    let s = sha256.trim().to_ascii_lowercase();
    if s.len() != 64 || !s.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!("`sha256` must be 64 hex digits, got `{sha256}`"));
    }
    Ok(s)
}

/// A temporary name in `dir` no other download uses (two commands may fetch the same file).
pub(super) fn part_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!(".{name}.{:016x}.part", fastrand::u64(..)))
}

/// Stores `bytes` (a model received whole, from an MQTT message) as `name` in `dir` if their
/// SHA-256 is `sha256`; a file of that name and hash already there is used as is.
pub fn save(dir: &Path, name: &str, sha256: &str, max_bytes: u64, bytes: &[u8]) -> Result<Downloaded, String> {
    use sha2::Digest;
    let want = check_sha256(sha256)?;
    if bytes.len() as u64 > max_bytes {
        return Err(format!("{} bytes, above models.max_bytes ({max_bytes})", bytes.len()));
    }
    let got: String = sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect();
    if got != want {
        return Err(format!("SHA-256 {got} ({} bytes), expected {want}", bytes.len()));
    }
    let dest = dir.join(name);
    if dest.exists() {
        same_file(&dest, &want, max_bytes)?;
        return Ok(Downloaded { path: dest, bytes: 0, reused: true });
    }
    let part = part_path(dir, name);
    let written = write_synced(&part, bytes).and_then(|_| publish(&part, &dest));
    let _ = std::fs::remove_file(&part);
    if written? {
        Ok(Downloaded { path: dest, bytes: bytes.len() as u64, reused: false })
    } else {
        same_file(&dest, &want, max_bytes)?;
        Ok(Downloaded { path: dest, bytes: 0, reused: true })
    }
}

/// Writes `bytes` as the signature beside the model at `model`, replacing an older one atomically.
pub fn save_signature(model: &Path, bytes: &[u8]) -> Result<(), String> {
    let name = model.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let dir = model.parent().unwrap_or(Path::new("."));
    let part = part_path(dir, &format!("{name}.sig"));
    let done = write_synced(&part, bytes).and_then(|_| rename(&part, &super::signature::path_for(model)));
    if done.is_err() {
        let _ = std::fs::remove_file(&part);
    }
    done
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    let err = |e: std::io::Error| format!("{}: {e}", path.display());
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(path).map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)
}

/// Ok if `path` has SHA-256 `want`; else the error that it is another file.
pub(super) fn same_file(path: &Path, want: &str, max_bytes: u64) -> Result<(), String> {
    let (have, _) = super::sha256_of(path, max_bytes)?;
    if have != want {
        let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        return Err(format!(
            "{name} is already in the models directory with another SHA-256 ({have}); give the update a new name"
        ));
    }
    Ok(())
}

/// Gives `part` the name `dest` unless `dest` exists (a hard link cannot replace a file):
/// true when it did. The directory is synced so the name survives a power cut.
pub(super) fn publish(part: &Path, dest: &Path) -> Result<bool, String> {
    match std::fs::hard_link(part, dest) {
        Ok(()) => {
            sync_dir(dest);
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(format!("{} -> {}: {e}", part.display(), dest.display())),
    }
}

pub(super) fn rename(from: &Path, to: &Path) -> Result<(), String> {
    std::fs::rename(from, to).map_err(|e| format!("{} -> {}: {e}", from.display(), to.display()))?;
    sync_dir(to);
    Ok(())
}

fn sync_dir(file: &Path) {
    if let Some(d) = file.parent().and_then(|d| std::fs::File::open(d).ok()) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publishing_never_replaces_an_existing_model() {
        let dir = tempfile::tempdir().unwrap();
        let (part, dest) = (dir.path().join(".m.part"), dir.path().join("m.onnx"));
        std::fs::write(&part, b"new").unwrap();
        assert!(publish(&part, &dest).unwrap());
        assert_eq!(std::fs::read(&dest).unwrap(), b"new");
        // As fetch does: the temporary name goes once the model has its own.
        std::fs::remove_file(&part).unwrap();
        std::fs::write(&part, b"other").unwrap();
        assert!(!publish(&part, &dest).unwrap(), "the name is taken");
        assert_eq!(std::fs::read(&dest).unwrap(), b"new");
        assert_ne!(part_path(dir.path(), "m.onnx"), part_path(dir.path(), "m.onnx"));
    }

    #[test]
    fn a_model_received_whole_is_saved_only_with_its_hash_and_never_over_another() {
        let dir = tempfile::tempdir().unwrap();
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let e = save(dir.path(), "m.onnx", &"0".repeat(64), 10, b"abc").unwrap_err();
        assert!(e.contains("expected 0000"), "{e}");
        assert!(save(dir.path(), "m.onnx", abc, 2, b"abc").unwrap_err().contains("above models.max_bytes"));
        let got = save(dir.path(), "m.onnx", abc, 10, b"abc").unwrap();
        assert_eq!((got.bytes, got.reused), (3, false));
        assert!(save(dir.path(), "m.onnx", abc, 10, b"abc").unwrap().reused);
        std::fs::write(dir.path().join("n.onnx"), b"other").unwrap();
        assert!(save(dir.path(), "n.onnx", abc, 10, b"abc").unwrap_err().contains("with another SHA-256"));
        save_signature(&got.path, b"{}").unwrap();
        save_signature(&got.path, b"{\"v\": 2}").unwrap();
        assert_eq!(std::fs::read(dir.path().join("m.onnx.sig")).unwrap(), b"{\"v\": 2}");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left.len(), 3, "no temporary file left: {left:?}");
    }
}
