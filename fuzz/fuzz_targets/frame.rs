//! libFuzzer entry for [`edgeinfer_fuzz::frame`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| edgeinfer_fuzz::frame(data));
