//! The tools behind the CLI: `inspect`, `infer`, `bench`, `convert`, `devices` and `model`. Each
//! takes parsed arguments and writes to the given streams, so tests can call
//! them without spawning the binary.

pub mod bench;
pub mod convert;
pub mod devices;
pub mod infer;
pub mod inspect;
pub mod model;

use std::collections::HashMap;

/// Parses `NAME=D0,D1,...` or `D0,D1,...` (first input) shape overrides. An
/// empty shape or `scalar` (`sr=`, `sr=scalar`) is rank 0: a scalar input.
pub fn parse_input_shapes(items: &[String]) -> Result<HashMap<String, Vec<usize>>, String> {
    let mut out = HashMap::new();
    for item in items {
        let (name, dims) = match item.rsplit_once('=') {
            Some((n, d)) => (n.trim().to_string(), d),
            None => (String::new(), item.as_str()),
        };
        let shape = if dims.trim().is_empty() || dims.trim() == "scalar" {
            Vec::new()
        } else {
            dims.split([',', 'x'])
                .map(|d| {
                    d.trim().parse::<usize>().map_err(|_| {
                        format!("--input-shape `{item}`: `{d}` is not a dimension size (`NAME=scalar` for a scalar)")
                    })
                })
                .collect::<Result<Vec<_>, _>>()?
        };
        if out.insert(name.clone(), shape).is_some() {
            let which = if name.is_empty() { "the first input".to_string() } else { format!("input `{name}`") };
            return Err(format!("--input-shape `{item}`: {which} is given a shape twice"));
        }
    }
    Ok(out)
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

    #[test]
    fn input_shapes_take_scalars_and_refuse_a_second_shape() {
        let m = parse_input_shapes(&["sr=".into(), "gain=scalar".into(), "scalar".into()]).unwrap();
        assert_eq!(m["sr"], Vec::<usize>::new());
        assert_eq!(m["gain"], Vec::<usize>::new());
        assert_eq!(m[""], Vec::<usize>::new());
        assert!(parse_input_shapes(&["sr=1,scalar".into()]).unwrap_err().contains("`scalar`"));
        let twice = parse_input_shapes(&["x=1,2".into(), "x=1,3".into()]).unwrap_err();
        assert!(twice.contains("input `x` is given a shape twice"), "{twice}");
    }
}
