//! Secrets named in the config by an environment variable or a file (never
//! inline, never logged): the remote commands' HMAC key, the status page's
//! password.

use std::path::{Path, PathBuf};

/// The secret from environment variable `env` or the first line of file
/// `file` (made absolute by `resolve`; trailing whitespace removed); `None`
/// when neither is set. Errors name the config key (`keys`: the env key and
/// the file key) and refuse an empty secret.
pub fn read(
    env: Option<&str>,
    file: Option<&Path>,
    keys: (&str, &str),
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Result<Option<Vec<u8>>, String> {
    let (env_key, file_key) = keys;
    let secret = if let Some(var) = env {
        let v = std::env::var(var).map_err(|_| format!("{env_key}: environment variable `{var}` is not set"))?;
        (env_key, v)
    } else if let Some(file) = file {
        let path = resolve(file);
        let text = std::fs::read_to_string(&path).map_err(|e| format!("{file_key}: {}: {e}", path.display()))?;
        (file_key, text.lines().next().unwrap_or("").trim_end().to_string())
    } else {
        return Ok(None);
    };
    match secret {
        (key, s) if s.is_empty() => Err(format!("{key}: the secret is empty")),
        (_, s) => Ok(Some(s.into_bytes())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_come_from_the_environment_or_a_file_and_errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let resolve = |p: &Path| dir.path().join(p);
        let keys = ("x.secret_env", "x.secret_file");
        std::fs::write(dir.path().join("s"), "k3y  \nignored\n").unwrap();
        assert_eq!(read(None, Some(Path::new("s")), keys, &resolve).unwrap(), Some(b"k3y".to_vec()));
        std::env::set_var("EDGEINFER_TEST_SECRET_SET", "from-env");
        assert_eq!(read(Some("EDGEINFER_TEST_SECRET_SET"), None, keys, &resolve).unwrap(), Some(b"from-env".to_vec()));
        let e = read(Some("EDGEINFER_TEST_SECRET_UNSET"), None, keys, &resolve).unwrap_err();
        assert!(e.starts_with("x.secret_env: ") && e.contains("EDGEINFER_TEST_SECRET_UNSET"), "{e}");
        let e = read(None, Some(Path::new("missing")), keys, &resolve).unwrap_err();
        assert!(e.starts_with("x.secret_file: "), "{e}");
        std::fs::write(dir.path().join("empty"), "\n").unwrap();
        let e = read(None, Some(Path::new("empty")), keys, &resolve).unwrap_err();
        assert_eq!(e, "x.secret_file: the secret is empty");
        assert_eq!(read(None, None, keys, &resolve).unwrap(), None);
    }
}
