//! libFuzzer entry for [`edgeinfer_fuzz::disk_queue`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| edgeinfer_fuzz::disk_queue(data));
