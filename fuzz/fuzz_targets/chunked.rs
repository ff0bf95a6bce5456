#![no_main]
//! See `fanstream::fuzzing::chunked` for the properties checked.

libfuzzer_sys::fuzz_target!(|data: &[u8]| fanstream::fuzzing::chunked(data));
