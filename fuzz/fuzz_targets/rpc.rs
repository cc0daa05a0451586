#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| uringtgt_fuzz::rpc::run(data));
