//! Which model each pipeline runs after a run-time update, kept across
//! restarts in a small JSON file (`[models] state_file`, default
//! `active.json` in `[models] dir`). Written atomically (temporary file,
//! fsync, rename, directory fsync) so a power cut leaves the old or the new
//! file, never half of one. Read at start; an entry is used only if the
//! config still names the model it replaced and the file is still there with
//! the same SHA-256: an edited config, a removed model or a damaged file falls
//! back to the configured model, never stops the board.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// Schema id of the state file.
pub const ACTIVE_SCHEMA: &str = "edgeinfer/active-models/v1";

/// One pipeline's updated model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// The model file now running.
    pub path: PathBuf,
    /// Its SHA-256 when it was accepted.
    pub sha256: String,
    /// The model the config names (resolved): if the config changes, the entry is stale.
    pub configured: PathBuf,
    /// When it was accepted (RFC 3339).
    pub since: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct File {
    schema: String,
    pipelines: BTreeMap<String, Entry>,
}

/// The state file, shared by every pipeline's worker.
#[derive(Debug)]
pub struct ActiveModels {
    path: PathBuf,
    lock: Mutex<()>,
}

impl ActiveModels {
    /// The state file at `path` (created on the first update).
    pub fn new(path: PathBuf) -> Self {
        ActiveModels { path, lock: Mutex::new(()) }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn read(&self) -> Result<File, String> {
        match std::fs::read_to_string(&self.path) {
            Ok(text) => {
                let f: File = serde_json::from_str(&text)
                    .map_err(|e| format!("{}: not a state file: {e}", self.path.display()))?;
                if f.schema != ACTIVE_SCHEMA {
                    return Err(format!("{}: schema `{}` is not {ACTIVE_SCHEMA}", self.path.display(), f.schema));
                }
                Ok(f)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(File::default()),
            Err(e) => Err(format!("{}: {e}", self.path.display())),
        }
    }

    /// The entry of `pipeline`, if the file has one.
    pub fn get(&self, pipeline: &str) -> Result<Option<Entry>, String> {
        Ok(self.read()?.pipelines.remove(pipeline))
    }

    /// Records that `pipeline` runs `entry` (None: its configured model again).
    pub fn set(&self, pipeline: &str, entry: Option<Entry>) -> Result<(), String> {
        let _guard = self.lock.lock().map_err(|_| "internal: lock poisoned".to_string())?;
        // A damaged file is replaced rather than kept failing every update.
        let mut f = self.read().unwrap_or_default();
        f.schema = ACTIVE_SCHEMA.into();
        match entry {
            Some(e) => f.pipelines.insert(pipeline.to_string(), e),
            None => f.pipelines.remove(pipeline),
        };
        let text = serde_json::to_string_pretty(&f).map_err(|e| e.to_string())? + "\n";
        write_atomically(&self.path, text.as_bytes())
    }
}

/// Writes `bytes` to `path` so that a crash leaves the old or the new content.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let err = |e: std::io::Error| format!("{}: {e}", tmp.display());
    let mut f = std::fs::File::create(&tmp).map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))?;
    if let Some(dir) = path.parent().and_then(|d| std::fs::File::open(d).ok()) {
        let _ = dir.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_kept_replaced_and_removed_and_a_damaged_file_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let a = ActiveModels::new(dir.path().join("active.json"));
        assert_eq!(a.get("p").unwrap(), None, "no file yet");
        let e = Entry {
            path: "/m/v2.onnx".into(),
            sha256: "ab".into(),
            configured: "/m/v1.onnx".into(),
            since: "t".into(),
        };
        a.set("p", Some(e.clone())).unwrap();
        a.set("q", Some(e.clone())).unwrap();
        assert_eq!(a.get("p").unwrap(), Some(e.clone()));
        a.set("p", None).unwrap();
        assert_eq!(a.get("p").unwrap(), None);
        assert_eq!(a.get("q").unwrap(), Some(e.clone()));
        assert!(!dir.path().join("active.json.tmp").exists());
        std::fs::write(a.path(), "{not json").unwrap();
        assert!(a.get("q").unwrap_err().contains("not a state file"));
        a.set("q", Some(e.clone())).unwrap();
        assert_eq!(a.get("q").unwrap(), Some(e));
    }
}
