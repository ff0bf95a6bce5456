#![no_main]
//! See `fanstream::fuzzing::config` for the properties checked.

libfuzzer_sys::fuzz_target!(|data: &[u8]| fanstream::fuzzing::config(data));
