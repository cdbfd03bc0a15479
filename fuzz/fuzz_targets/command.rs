//! libFuzzer entry for [`edgeinfer_fuzz::command`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| edgeinfer_fuzz::command(data));
