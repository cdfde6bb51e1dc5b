//! Runs the kept fuzz corpus (`fuzz/corpus/<target>/`) through the same checks
//! the fuzz targets run, so every input the fuzzer kept (the seeds, what it found
//! interesting, past crashes) stays a regression test without cargo-fuzz.

use std::fs;
use std::path::PathBuf;

use punchline_proto::fuzzing::TARGETS;

#[test]
fn every_kept_fuzz_input_passes_its_target() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    for (name, check) in TARGETS {
        let dir = root.join(name);
        let entries = fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("corpus of {name} at {}: {e}", dir.display()));
        let (mut inputs, mut seeds) = (0, 0);
        for entry in entries {
            let path = entry.expect("corpus entry").path();
            let data = fs::read(&path).expect("corpus file");
            let decoded = check(&data);
            // The seeds are well-formed by construction (examples/fuzz_seeds.rs),
            // except the typed codes meant to be refused.
            let is_seed = path
                .file_name()
                .is_some_and(|f| f.to_string_lossy().starts_with("seed-"));
            if is_seed && *name != "typed_code" {
                assert!(decoded > 0, "seed {} decodes to nothing", path.display());
                seeds += 1;
            }
            inputs += 1;
        }
        assert!(inputs > 0, "the corpus of {name} is empty");
        assert!(seeds > 0 || *name == "typed_code", "no seeds for {name}");
    }
}
