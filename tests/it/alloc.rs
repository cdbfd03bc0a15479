//! Does the hot path allocate? A counting global allocator (per thread, so
//! parallel tests do not disturb each other) measures the sensor path: pushing
//! samples into the window ring buffer must not allocate at all; a whole
//! inference's allocations (inside tract, and the result) are printed.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use edgeinfer::config::{PreprocessConfig, SourceConfig};
use edgeinfer::engine::{LoadOptions, Model};
use edgeinfer::message::{Input, Values};
use edgeinfer::preprocess::stage::Preprocessor;

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations made by this thread so far.
pub(crate) fn allocs() -> u64 {
    ALLOCS.with(|c| c.get())
}

#[test]
fn window_path_does_not_allocate_per_sample() {
    let model = Model::load(&crate::model("vibration_int8.onnx"), &LoadOptions::default()).unwrap();
    let source: SourceConfig = toml::from_str("type = \"lines\"").unwrap();
    let mut pre = Preprocessor::new(&PreprocessConfig::Auto, &model.inputs()[0], &source.output()).unwrap();
    let mut session = model.session().unwrap();
    let mut buf = pre.buffer();
    let mut outputs = Vec::new();
    // One message of 64 samples (3 channels); the Values vector is made before counting.
    let message = Input::Values(Values {
        values: (0..64 * 3).map(|i| (i as f32 * 0.01).sin()).collect(),
        names: None,
        captured: std::time::SystemTime::now(),
        origin: None,
    });
    // Fill the first window and warm up the session and output vectors.
    for _ in 0..4 {
        pre.feed(&message, &mut buf, |t, _| session.run_into(std::slice::from_ref(t), &mut outputs).unwrap()).unwrap();
    }
    let mut windows = 0;
    let before = allocs();
    for _ in 0..16 {
        pre.feed(&message, &mut buf, |_, _| windows += 1).unwrap();
    }
    let per_sample = allocs() - before;
    // 16 messages of 64 samples, a window of 128 every 128 samples.
    assert_eq!(windows, 8);
    assert_eq!(per_sample, 0, "windowing 1024 samples ({windows} windows) allocated {per_sample} times");

    let before = allocs();
    let runs = 50;
    for _ in 0..runs {
        session.run_into(std::slice::from_ref(&buf), &mut outputs).unwrap();
    }
    let per_inference = (allocs() - before) as f64 / runs as f64;
    eprintln!("allocations: 0 per sample pushed; {per_inference:.1} per inference (inside tract; input and output buffers reused)");
}
