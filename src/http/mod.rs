//! The built-in status page and Prometheus `/metrics`, served on `[http]
//! listen` (off unless the table is there; loopback by default). The page
//! is one HTML file with a small script that polls `/api/status`; plots and
//! the camera view are SVG rendered here, so nothing is fetched from the
//! internet. Reads the same counters as the health message, never the
//! inference path's locks for longer than a copy.
//!
//! The settings are always compiled (a config with `[http]` gets a clear
//! error from a binary built without feature `http-server`); the server is not.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[cfg(feature = "http-server")]
mod plot;
#[cfg(feature = "http-server")]
mod prometheus;
#[cfg(feature = "http-server")]
mod server;
#[cfg(feature = "http-server")]
pub use server::{bind, start, PipelineView, Server, Sources};

/// `[http]`: where the status page and `/metrics` listen, and who may see them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address to listen on (loopback unless the user binds elsewhere).
    pub listen: SocketAddr,
    /// Basic-auth user name; with it a password is required on every page.
    pub username: Option<String>,
    /// Environment variable holding the basic-auth password.
    pub password_env: Option<String>,
    /// File holding the basic-auth password (first line).
    pub password_file: Option<PathBuf>,
    /// How often the page asks for new figures, in milliseconds.
    pub refresh_ms: u64,
}

/// Default address of the status page.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: DEFAULT_LISTEN.parse().expect("a valid address"),
            username: None,
            password_env: None,
            password_file: None,
            refresh_ms: 2000,
        }
    }
}

impl HttpConfig {
    /// Checks the values; the error names the key (without the `http.` prefix).
    pub fn validate(&self) -> Result<(), (String, String)> {
        crate::features::require("http-server", "the [http] status page").map_err(|r| ("listen".into(), r))?;
        crate::secret::check_login(
            self.username.as_deref(),
            self.password_env.is_some(),
            self.password_file.is_some(),
        )?;
        if !(200..=60_000).contains(&self.refresh_ms) {
            return Err(("refresh_ms".into(), "must be 200..=60000".into()));
        }
        Ok(())
    }

    /// The basic-auth credentials (`user`, `password`), if configured; `resolve`
    /// makes a relative path absolute.
    pub fn credentials(&self, resolve: &dyn Fn(&Path) -> PathBuf) -> Result<Option<(String, String)>, String> {
        let (env, file) = (self.password_env.as_deref(), self.password_file.as_deref());
        crate::secret::login("http", self.username.as_deref(), env, file, resolve)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> HttpConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn defaults_are_loopback_without_auth() {
        let c = parse("");
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert!(c.listen.ip().is_loopback());
        assert_eq!(c.credentials(&|p| p.to_path_buf()).unwrap(), None);
        if cfg!(feature = "http-server") {
            c.validate().unwrap();
        } else {
            assert!(c.validate().unwrap_err().1.contains("`http-server` feature"));
        }
    }

    #[cfg(feature = "http-server")]
    #[test]
    fn auth_needs_a_user_and_exactly_one_password_source() {
        let bad = |text: &str, key: &str, why: &str| {
            let (k, r) = parse(text).validate().unwrap_err();
            assert_eq!(k, key, "{text}: {r}");
            assert!(r.contains(why), "{text}: {r}");
        };
        bad("username = \"admin\"", "username", "needs password_env or password_file");
        bad("password_env = \"PW\"", "username", "give the user name too");
        bad("username = \"a\"\npassword_env = \"A\"\npassword_file = \"f\"", "password_env", "not both");
        bad("username = \"a:b\"\npassword_env = \"A\"", "username", "without `:`");
        bad("refresh_ms = 10", "refresh_ms", "200..=60000");
        assert!(toml::from_str::<HttpConfig>("listen = \"nowhere\"").is_err());
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pw"), "hunter2\n").unwrap();
        let c = parse("username = \"admin\"\npassword_file = \"pw\"");
        c.validate().unwrap();
        let creds = c.credentials(&|p| dir.path().join(p)).unwrap();
        assert_eq!(creds, Some(("admin".to_string(), "hunter2".to_string())));
    }
}
