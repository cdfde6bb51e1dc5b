//! Fuzz target: see `punchline_proto::fuzzing::typed_code`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    punchline_proto::fuzzing::typed_code(data);
});
