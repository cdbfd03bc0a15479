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

/// A user name and its password (from `password_env` or `password_file`), if a user name is
/// configured; `table` names the config table in errors (`http`, `broker`).
pub fn login(
    table: &str,
    username: Option<&str>,
    password_env: Option<&str>,
    password_file: Option<&Path>,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Result<Option<(String, String)>, String> {
    let Some(user) = username else { return Ok(None) };
    let keys = (format!("{table}.password_env"), format!("{table}.password_file"));
    let password = read(password_env, password_file, (&keys.0, &keys.1), resolve)?
        .ok_or_else(|| format!("{table}.username: needs password_env or password_file"))?;
    let password = String::from_utf8(password).map_err(|_| format!("{table}: the password is not UTF-8"))?;
    Ok(Some((user.to_string(), password)))
}

/// Checks a user name with its password source (`*_env` or `*_file`): a user name
/// needs exactly one, a password needs the user name. The error names the key.
pub fn check_login(username: Option<&str>, password_env: bool, password_file: bool) -> Result<(), (String, String)> {
    if password_env && password_file {
        return Err(("password_env".into(), "give password_env or password_file, not both".into()));
    }
    let has_password = password_env || password_file;
    match username {
        Some(u) if u.is_empty() || u.contains(':') => {
            Err(("username".into(), "must be non-empty and without `:`".into()))
        }
        Some(_) if !has_password => Err(("username".into(), "needs password_env or password_file".into())),
        None if has_password => Err(("username".into(), "a password is set: give the user name too".into())),
        _ => Ok(()),
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

    #[test]
    fn a_login_needs_a_user_and_exactly_one_password_source() {
        assert_eq!(check_login(None, false, false), Ok(()));
        assert_eq!(check_login(Some("u"), false, true), Ok(()));
        assert_eq!(check_login(Some("u"), false, false).unwrap_err().0, "username");
        assert_eq!(check_login(None, true, false).unwrap_err().0, "username");
        assert_eq!(check_login(Some("u"), true, true).unwrap_err().0, "password_env");
        assert_eq!(check_login(Some("a:b"), true, false).unwrap_err().0, "username");
    }
}
