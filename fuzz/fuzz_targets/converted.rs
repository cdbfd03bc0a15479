//! libFuzzer entry for [`edgeinfer_fuzz::converted`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| edgeinfer_fuzz::converted(data));
