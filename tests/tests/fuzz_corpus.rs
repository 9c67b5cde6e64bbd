//! Every committed fuzz corpus input, replayed through its target's own
//! checks on the stable toolchain, so CI catches a change that breaks an
//! invariant the fuzzers hold (cargo-fuzz itself needs nightly and runs
//! outside CI; see fuzz/README.md).
//!
//! Each target is compiled here as a module, with this file's
//! `fuzz_target!` in place of libfuzzer's: it turns the target's body into
//! `run(bytes)`, building a typed input the way libfuzzer-sys does
//! (`Arbitrary::arbitrary_take_rest`). `filemq_subscriber` is left out: it
//! needs the client's `fuzzing` feature, which this workspace does not
//! build, and its corpus takes minutes in a debug build.

use std::path::Path;

macro_rules! fuzz_target {
    (|$data:ident: &[u8]| $body:block) => {
        pub fn run($data: &[u8]) $body
    };
    (|$input:ident: $ty:ty| $body:block) => {
        pub fn run(bytes: &[u8]) {
            if let Ok($input) =
                <$ty as arbitrary::Arbitrary>::arbitrary_take_rest(arbitrary::Unstructured::new(bytes))
            {
                $body
            }
        }
    };
}

#[allow(unused_attributes, dead_code)]
#[path = "../../fuzz/fuzz_targets/zpipes_codec.rs"]
mod zpipes_codec;

#[allow(unused_attributes, dead_code)]
#[path = "../../fuzz/fuzz_targets/filemq_codec.rs"]
mod filemq_codec;

#[allow(unused_attributes, dead_code)]
#[path = "../../fuzz/fuzz_targets/zpipes_service.rs"]
mod zpipes_service;

#[allow(unused_attributes, dead_code)]
#[path = "../../fuzz/fuzz_targets/filemq_service.rs"]
mod filemq_service;

#[allow(unused_attributes, dead_code)]
#[path = "../../fuzz/fuzz_targets/transfer_receiver.rs"]
mod transfer_receiver;

/// Runs every input of `fuzz/corpus/TARGET`; returns how many.
fn replay(target: &str, run: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target);
    let mut inputs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("a corpus entry").path())
        .collect();
    inputs.sort();
    for input in &inputs {
        let bytes = std::fs::read(input).expect("a corpus input");
        // The input's name says which one failed.
        eprintln!("{target}: {}", input.display());
        run(&bytes);
    }
    assert!(!inputs.is_empty(), "{} holds no corpus", dir.display());
    inputs.len()
}

#[test]
fn zpipes_codec_corpus_holds() {
    replay("zpipes_codec", zpipes_codec::run);
}

#[test]
fn filemq_codec_corpus_holds() {
    replay("filemq_codec", filemq_codec::run);
}

#[test]
fn zpipes_service_corpus_holds() {
    replay("zpipes_service", zpipes_service::run);
}

#[test]
fn filemq_service_corpus_holds() {
    replay("filemq_service", filemq_service::run);
}

#[test]
fn transfer_receiver_corpus_holds() {
    replay("transfer_receiver", transfer_receiver::run);
}
