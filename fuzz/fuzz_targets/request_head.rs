#![no_main]
//! See `fanstream::fuzzing::request_head` for the properties checked.

libfuzzer_sys::fuzz_target!(|data: &[u8]| fanstream::fuzzing::request_head(data));
