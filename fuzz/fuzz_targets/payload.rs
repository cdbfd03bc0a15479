//! libFuzzer entry for [`edgeinfer_fuzz::payload`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| edgeinfer_fuzz::payload(data));
