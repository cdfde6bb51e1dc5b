//! Fuzz target: see `punchline_proto::fuzzing::rendezvous_input`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    punchline_proto::fuzzing::rendezvous_input(data);
});
