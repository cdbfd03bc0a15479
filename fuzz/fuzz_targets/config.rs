//! libFuzzer entry for [`edgeinfer_fuzz::config`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| edgeinfer_fuzz::config(data));
