//! The optional parts (Cargo features) compiled into this binary, and the
//! error a config gets when it asks for one that is not, so a small build
//! fails `check` with the feature to rebuild with instead of a parse error.

/// Every optional Cargo feature, in Cargo.toml's order, and whether this binary has it.
/// A new optional part is one line here plus its `#[cfg]`s.
pub const FEATURES: [(&str, bool); 9] = [
    ("onnx", cfg!(feature = "onnx")),
    ("broker", cfg!(feature = "broker")),
    ("v4l2", cfg!(feature = "v4l2")),
    ("http-source", cfg!(feature = "http-source")),
    ("serial", cfg!(feature = "serial")),
    ("tls", cfg!(feature = "tls")),
    ("threads", cfg!(feature = "threads")),
    ("http-server", cfg!(feature = "http-server")),
    ("model-fetch", cfg!(feature = "model-fetch")),
];

/// True when this binary was built with `feature`.
pub fn has(feature: &str) -> bool {
    FEATURES.iter().any(|(name, on)| *name == feature && *on)
}

/// The names of the features this binary was built with, in Cargo.toml's order.
pub fn enabled() -> Vec<&'static str> {
    FEATURES.iter().filter(|(_, on)| *on).map(|(name, _)| *name).collect()
}

/// The names of the features this binary was built without.
pub fn missing() -> Vec<&'static str> {
    FEATURES.iter().filter(|(_, on)| !*on).map(|(name, _)| *name).collect()
}

/// The error for `what` (e.g. "source type `http`") in a binary built without `feature`.
pub fn not_built(feature: &str, what: &str) -> String {
    let has = enabled();
    let has = if has.is_empty() { "none".to_string() } else { has.join(", ") };
    format!(
        "{what} needs edgeinfer built with the `{feature}` feature (this binary has: {has}); \
         rebuild with `cargo build --release --features {feature}`, or with the default features"
    )
}

/// Ok when this binary has `feature`, else [`not_built`]'s message.
pub fn require(feature: &str, what: &str) -> Result<(), String> {
    if has(feature) {
        Ok(())
    } else {
        Err(not_built(feature, what))
    }
}

/// The `--version` text: version, target, and which optional features are in.
pub fn long_version() -> String {
    let list = |v: Vec<&str>| if v.is_empty() { "none".to_string() } else { v.join(", ") };
    format!(
        "{} ({}-{})\nfeatures: {}\nleft out: {}",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::ARCH,
        std::env::consts::OS,
        list(enabled()),
        list(missing())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_matches_the_cfgs_and_the_message_names_the_feature() {
        // Each feature checked through a path of its own, not through the table.
        assert_eq!(has("tls"), cfg!(feature = "tls"));
        assert_eq!(has("http-source"), cfg!(feature = "http-source"));
        assert!(!has("no-such-feature"));
        assert_eq!(enabled().len() + missing().len(), FEATURES.len());
        let e = require("no-such-feature", "source type `x`").unwrap_err();
        assert!(e.starts_with("source type `x` needs edgeinfer built with the `no-such-feature` feature"), "{e}");
        assert!(e.contains("--features no-such-feature"), "{e}");
        for name in enabled() {
            assert!(require(name, "it").is_ok());
        }
        for name in missing() {
            assert!(require(name, "it").unwrap_err().contains(&format!("`{name}` feature")));
        }
        let v = long_version();
        assert!(v.starts_with(env!("CARGO_PKG_VERSION")) && v.contains("\nfeatures: "), "{v}");
    }
}
