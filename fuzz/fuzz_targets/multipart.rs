//! libFuzzer entry for [`edgeinfer_fuzz::multipart`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| edgeinfer_fuzz::multipart(data));
