#![no_main]
//! See `fanstream::fuzzing::webm` for the properties checked.

libfuzzer_sys::fuzz_target!(|data: &[u8]| fanstream::fuzzing::webm(data));
