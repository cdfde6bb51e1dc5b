//! Fuzz target: see `punchline_proto::fuzzing::peer_link`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    punchline_proto::fuzzing::peer_link(data);
});
