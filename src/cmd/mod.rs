//! The tools behind the CLI: `inspect`, `infer`, `bench`, `convert` and `devices`. Each
//! takes parsed arguments and writes to the given streams, so tests can call
//! them without spawning the binary.

pub mod bench;
pub mod convert;
pub mod devices;
pub mod infer;
pub mod inspect;

use std::collections::HashMap;

/// Parses `NAME=D0,D1,...` or `D0,D1,...` (first input) shape overrides.
pub fn parse_input_shapes(items: &[String]) -> Result<HashMap<String, Vec<usize>>, String> {
    let mut out = HashMap::new();
    for item in items {
        let (name, dims) = match item.rsplit_once('=') {
            Some((n, d)) => (n.trim().to_string(), d),
            None => (String::new(), item.as_str()),
        };
        let shape = dims
            .split([',', 'x'])
            .map(|d| {
                d.trim().parse::<usize>().map_err(|_| format!("--input-shape `{item}`: `{d}` is not a dimension size"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        out.insert(name, shape);
    }
    Ok(out)
}

/// Peak resident set size of this process in KiB (Linux `VmHWM`), if known.
pub fn peak_rss_kb() -> Option<u64> {
    proc_status_kb("VmHWM:")
}

/// Resident set size now, in KiB (Linux `VmRSS`), if known.
pub fn rss_kb() -> Option<u64> {
    proc_status_kb("VmRSS:")
}

fn proc_status_kb(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|l| l.strip_prefix(field)).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_shapes_parse_named_and_positional() {
        let m = parse_input_shapes(&["image=1,3,224,224".into(), "2x4".into()]).unwrap();
        assert_eq!(m["image"], vec![1, 3, 224, 224]);
        assert_eq!(m[""], vec![2, 4]);
        assert!(parse_input_shapes(&["x=1,a".into()]).unwrap_err().contains("`a`"));
    }
}
