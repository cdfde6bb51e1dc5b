//! Fuzz target: see `punchline_proto::fuzzing::chat_payload`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    punchline_proto::fuzzing::chat_payload(data);
});
