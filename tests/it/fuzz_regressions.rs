//! Every input a fuzz target ever crashed on (`fuzz/regressions/<target>/`),
//! replayed through the same function the fuzzer calls (`fuzz/src/lib.rs`,
//! included here), so a crash that was fixed stays fixed. The seed-like inputs
//! next to them cover each target's main paths in the normal suite too.

use std::path::Path;

#[allow(dead_code)]
#[path = "../../fuzz/src/lib.rs"]
mod bodies;

#[test]
fn every_saved_fuzz_crash_is_handled() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
    let mut replayed = Vec::new();
    for (target, run) in bodies::TARGETS {
        let Ok(dir) = std::fs::read_dir(root.join(target)) else { continue };
        let mut files: Vec<_> = dir.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        files.sort();
        for file in files {
            let data = std::fs::read(&file).unwrap();
            // `cargo +nightly fuzz run TARGET FILE` (in fuzz/) reproduces a failure.
            let outcome = std::panic::catch_unwind(|| run(&data));
            assert!(outcome.is_ok(), "{target} panicked on {}", file.display());
            replayed.push(format!("{target}/{}", file.file_name().unwrap().to_string_lossy()));
        }
    }
    println!("replayed {} saved fuzz inputs: {}", replayed.len(), replayed.join(", "));
    assert!(!replayed.is_empty(), "no saved inputs found under {}", root.display());
}
