//! libFuzzer entry for [`edgeinfer_fuzz::onnx`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| edgeinfer_fuzz::onnx(data));
