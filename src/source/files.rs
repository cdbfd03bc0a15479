//! The `files` source: replays images, `.npy` tensors and JSON values from a
//! directory, a single file or a glob, at `rate_hz` files per second.
//!
//! - `path` is relative to the config file's directory unless absolute. A
//!   directory means its files (not subdirectories, not hidden files); a
//!   pattern with `*`, `?` or `[` is a glob. Files are taken in name order.
//! - `.jpg`/`.jpeg`/`.png` become frames, `.npy` tensors fed as they are,
//!   `.json` values: an array of numbers (nested arrays are flattened) or an
//!   object of name: number (names kept in the file's order). Other files are
//!   ignored.
//! - A file that cannot be read or decoded is logged, counted in the
//!   pipeline's `errors` and skipped. Nothing to read at all is an error (the
//!   source is retried with backoff: the files may yet appear).
//! - With `loop`, the listing is made again on every pass, so files added in
//!   the meantime are picked up.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant, SystemTime};

use glob::MatchOptions;

use super::config::SourceConfig;
use crate::message::{Frame, Input};
use crate::preprocess::decode_image;
use crate::tensor::Tensor;

use super::{SourceCtx, SourceEnd, SourceError};

/// The file kinds the source reads, by extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Image,
    Npy,
    Json,
}

const KINDS: &str = ".jpg, .jpeg, .png, .npy or .json";

fn kind_of(path: &Path) -> Option<Kind> {
    let ext = path.extension()?.to_str()?.to_ascii_lowercase();
    match ext.as_str() {
        "jpg" | "jpeg" | "png" => Some(Kind::Image),
        "npy" => Some(Kind::Npy),
        "json" => Some(Kind::Json),
        _ => None,
    }
}

/// Runs the source until it finishes, fails or is stopped.
pub fn run(cfg: &SourceConfig, ctx: &SourceCtx) -> Result<SourceEnd, SourceError> {
    let SourceConfig::Files { path, rate_hz, repeat } = cfg else {
        return Err(SourceError(format!("files source started with a `{}` source config", cfg.kind())));
    };
    if !(rate_hz.is_finite() && *rate_hz >= 0.0) {
        return Err(SourceError(format!("files source: `rate_hz` must be 0 or more, got {rate_hz}")));
    }
    // File n is due at start + n / rate_hz: absolute deadlines, so the rate does not drift.
    let start = Instant::now();
    let mut pushed: u64 = 0;
    loop {
        let files = list_files(&ctx.base_dir, path)?;
        let mut pushed_this_pass = 0;
        for file in &files {
            if ctx.stopped() {
                return Ok(SourceEnd::Stopped);
            }
            if *rate_hz > 0.0 && !ctx.sleep_until(start + Duration::from_secs_f64(pushed as f64 / rate_hz)) {
                return Ok(SourceEnd::Stopped);
            }
            match load(file) {
                Ok(input) => {
                    if !ctx.push(input) {
                        return Ok(SourceEnd::Stopped);
                    }
                    pushed += 1;
                    pushed_this_pass += 1;
                }
                Err(e) => {
                    ctx.metrics.errors.fetch_add(1, Relaxed);
                    log::warn!("pipeline `{}`: skipping {e}", ctx.pipeline);
                }
            }
        }
        if !repeat {
            return Ok(SourceEnd::Finished);
        }
        if pushed_this_pass == 0 {
            // Looping over files that all fail would spin: back off instead.
            return Err(SourceError(format!(
                "files source: none of the {} files at {} could be read",
                files.len(),
                ctx.base_dir.join(path).display()
            )));
        }
    }
}

/// The readable files `spec` names, in name order; an error naming the path when there are none.
fn list_files(base: &Path, spec: &str) -> Result<Vec<PathBuf>, SourceError> {
    let shown = base.join(spec);
    let mut files = if spec.contains(['*', '?', '[']) {
        glob_files(base, spec)?
    } else {
        let meta =
            std::fs::metadata(&shown).map_err(|e| SourceError(format!("files source: {}: {e}", shown.display())))?;
        if meta.is_dir() {
            dir_files(&shown)?
        } else {
            vec![shown.clone()]
        }
    };
    files.sort();
    files.retain(|f| {
        let known = kind_of(f).is_some();
        if !known {
            log::debug!("files source: ignoring {}: not {KINDS}", f.display());
        }
        known
    });
    if files.is_empty() {
        return Err(SourceError(format!("files source: no {KINDS} files at {}", shown.display())));
    }
    Ok(files)
}

fn glob_files(base: &Path, spec: &str) -> Result<Vec<PathBuf>, SourceError> {
    let pattern = if Path::new(spec).is_absolute() {
        spec.to_string()
    } else {
        // The base directory is a literal path, whatever characters it holds.
        format!("{}/{spec}", glob::Pattern::escape(&base.to_string_lossy()))
    };
    // `*` does not cross `/` nor match hidden files, as in a shell.
    let options =
        MatchOptions { case_sensitive: true, require_literal_separator: true, require_literal_leading_dot: true };
    let matches = glob::glob_with(&pattern, options)
        .map_err(|e| SourceError(format!("files source: bad glob pattern `{spec}`: {e}")))?;
    Ok(matches
        .filter_map(|m| match m {
            Ok(path) => Some(path),
            Err(e) => {
                log::debug!("files source: {e}");
                None
            }
        })
        .filter(|p| p.is_file())
        .collect())
}

fn dir_files(dir: &Path) -> Result<Vec<PathBuf>, SourceError> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| SourceError(format!("files source: cannot list {}: {e}", dir.display())))?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| SourceError(format!("files source: cannot list {}: {e}", dir.display())))?;
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        // `is_file` follows symlinks: a link to a file counts, a subdirectory does not.
        if !hidden && entry.path().is_file() {
            files.push(entry.path());
        }
    }
    Ok(files)
}

/// Reads one file into an input; the error names the file.
fn load(path: &Path) -> Result<Input, String> {
    let shown = path.display().to_string();
    let fail = |e: &dyn std::fmt::Display| format!("{shown}: {e}");
    let origin = Some(shown.clone());
    match kind_of(path) {
        Some(Kind::Image) => {
            let bytes = std::fs::read(path).map_err(|e| fail(&e))?;
            let image = decode_image(&bytes).map_err(|e| fail(&e))?;
            Ok(Input::Frame(Frame { image, captured: SystemTime::now(), origin }))
        }
        // Its error already names the file.
        Some(Kind::Npy) => match Tensor::read_npy(path) {
            Ok(tensor) => Ok(Input::Tensor { tensor, captured: SystemTime::now(), origin }),
            Err(e) => Err(e.to_string()),
        },
        Some(Kind::Json) => {
            let text = std::fs::read_to_string(path).map_err(|e| fail(&e))?;
            let values = super::lines::parse_json(&text).map_err(|e| fail(&e))?;
            Ok(values.into_input(origin))
        }
        None => Err(fail(&format!("not {KINDS}"))),
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    fn ctx(base: &Path) -> SourceCtx {
        crate::source::test_ctx(base)
    }

    fn files(path: &str, rate_hz: f64, repeat: bool) -> SourceConfig {
        SourceConfig::Files { path: path.into(), rate_hz, repeat }
    }

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    /// A short description of each queued input: the first value, or the file name.
    fn drain(ctx: &SourceCtx) -> Vec<String> {
        let mut out = Vec::new();
        while !ctx.queue.is_empty() {
            out.push(describe(ctx.queue.pop().unwrap()));
        }
        out
    }

    fn describe(input: Input) -> String {
        let name = |o: Option<&str>| Path::new(o.unwrap()).file_name().unwrap().to_string_lossy().to_string();
        match &input {
            Input::Values(v) => format!("{}", v.values[0]),
            Input::Frame(_) | Input::Tensor { .. } => name(input.origin()),
        }
    }

    #[test]
    fn a_directory_plays_its_files_in_name_order_once() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "b.json", "[2, 20]");
        write(dir.path(), "a.json", "[[1, 10], [11, 12]]");
        write(dir.path(), "c.json", r#"{"z": 3, "a": 30}"#);
        write(dir.path(), ".hidden.json", "[99]");
        write(dir.path(), "notes.txt", "not an input");
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        write(&dir.path().join("sub"), "d.json", "[98]");
        let ctx = ctx(dir.path());
        assert_eq!(run(&files(".", 0.0, false), &ctx).unwrap(), SourceEnd::Finished);
        let items: Vec<Input> =
            std::iter::from_fn(|| (!ctx.queue.is_empty()).then(|| ctx.queue.pop()).flatten()).collect();
        assert_eq!(items.len(), 3);
        let Input::Values(a) = &items[0] else { panic!("{:?}", items[0]) };
        assert_eq!(a.values, [1.0, 10.0, 11.0, 12.0]);
        assert!(a.names.is_none());
        assert!(a.origin.as_deref().unwrap().ends_with("a.json"));
        let Input::Values(c) = &items[2] else { panic!("{:?}", items[2]) };
        assert_eq!(c.values, [3.0, 30.0]);
        assert_eq!(c.names, Some(vec!["z".to_string(), "a".to_string()]));
        assert_eq!(ctx.metrics.errors.load(Relaxed), 0);
    }

    #[test]
    fn images_become_frames_and_npy_files_tensors() {
        let dir = tempfile::tempdir().unwrap();
        image::RgbImage::from_pixel(5, 4, image::Rgb([10, 20, 30])).save(dir.path().join("1.png")).unwrap();
        image::RgbImage::from_pixel(6, 2, image::Rgb([200, 0, 0])).save(dir.path().join("2.JPG")).unwrap();
        let t = Tensor::from_f32(vec![1, 3, 2], vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
        t.write_npy(&dir.path().join("3.npy")).unwrap();
        let ctx = ctx(dir.path());
        // An absolute path to the directory works as well as a relative one.
        let cfg = files(dir.path().to_str().unwrap(), 0.0, false);
        assert_eq!(run(&cfg, &ctx).unwrap(), SourceEnd::Finished);
        match ctx.queue.pop() {
            Some(Input::Frame(f)) => {
                assert_eq!(f.image.dimensions(), (5, 4));
                assert_eq!(f.image.get_pixel(0, 0), &image::Rgb([10, 20, 30]));
                assert_eq!(f.origin, Some(dir.path().join("1.png").display().to_string()));
            }
            other => panic!("{other:?}"),
        }
        match ctx.queue.pop() {
            Some(Input::Frame(f)) => assert_eq!(f.image.dimensions(), (6, 2)),
            other => panic!("{other:?}"),
        }
        match ctx.queue.pop() {
            Some(Input::Tensor { tensor, origin, .. }) => {
                assert_eq!(tensor, t);
                assert!(origin.unwrap().ends_with("3.npy"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_glob_selects_sorted_matches_relative_to_the_base_dir() {
        let base = tempfile::tempdir().unwrap();
        let data = base.path().join("data");
        std::fs::create_dir(&data).unwrap();
        for (name, v) in [("x3.json", 3), ("x1.json", 1), ("y.json", 9), ("x2.json", 2), (".x0.json", 0)] {
            write(&data, name, &format!("[{v}]"));
        }
        let ctx = ctx(base.path());
        assert_eq!(run(&files("data/x*.json", 0.0, false), &ctx).unwrap(), SourceEnd::Finished);
        assert_eq!(drain(&ctx), ["1", "2", "3"]);
        let absolute = format!("{}/*.json", data.display());
        assert_eq!(run(&files(&absolute, 0.0, false), &ctx).unwrap(), SourceEnd::Finished);
        assert_eq!(drain(&ctx), ["1", "2", "3", "9"]);
        // A single file.
        assert_eq!(run(&files("data/y.json", 0.0, false), &ctx).unwrap(), SourceEnd::Finished);
        assert_eq!(drain(&ctx), ["9"]);
    }

    #[test]
    fn bad_files_are_counted_and_skipped() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.png", "not a png");
        write(dir.path(), "b.json", "[1, 2]");
        write(dir.path(), "c.npy", "not an npy");
        write(dir.path(), "d.json", "[1, oops]");
        write(dir.path(), "e.json", "{\"a\": 5}");
        let ctx = ctx(dir.path());
        assert_eq!(run(&files(".", 0.0, false), &ctx).unwrap(), SourceEnd::Finished);
        assert_eq!(drain(&ctx), ["1", "5"]);
        assert_eq!(ctx.metrics.errors.load(Relaxed), 3);
    }

    #[test]
    fn nothing_to_read_is_an_error_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = ctx(dir.path());
        let e = run(&files("missing_dir", 1.0, false), &ctx).unwrap_err();
        assert!(e.0.contains("missing_dir"), "{e}");
        write(dir.path(), "readme.txt", "x");
        let e = run(&files(".", 1.0, false), &ctx).unwrap_err();
        assert!(e.0.contains("no .jpg"), "{e}");
        let e = run(&files("*.png", 1.0, false), &ctx).unwrap_err();
        assert!(e.0.contains("*.png"), "{e}");
        // Looping over files that all fail backs off instead of spinning.
        write(dir.path(), "bad.json", "oops");
        let e = run(&files(".", 0.0, true), &ctx).unwrap_err();
        assert!(e.0.contains("could be read"), "{e}");
    }

    #[test]
    fn loop_starts_over_and_picks_up_new_files() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.json", "[1]");
        write(dir.path(), "b.json", "[2]");
        let ctx = ctx(dir.path());
        let handle = {
            let ctx = ctx.clone();
            std::thread::spawn(move || run(&files(".", 100.0, true), &ctx))
        };
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !seen.contains(&"3".to_string()) {
            assert!(Instant::now() < deadline, "saw only {seen:?}");
            if seen.len() == 4 {
                write(dir.path(), "c.json", "[3]");
            }
            if ctx.queue.is_empty() {
                std::thread::sleep(Duration::from_millis(5));
            } else {
                seen.push(describe(ctx.queue.pop().unwrap()));
            }
        }
        assert_eq!(seen[..4], ["1", "2", "1", "2"]);
        ctx.stop.store(true, Relaxed);
        assert_eq!(handle.join().unwrap().unwrap(), SourceEnd::Stopped);
    }

    #[test]
    fn a_closed_queue_stops_the_source() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.json", "[1]");
        let ctx = ctx(dir.path());
        ctx.queue.close();
        assert_eq!(run(&files(".", 0.0, true), &ctx).unwrap(), SourceEnd::Stopped);
    }
}
