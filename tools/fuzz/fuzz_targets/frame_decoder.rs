//! Fuzz target: the frame `Decoder` (with and without required masking) on
//! arbitrary bytes, fed in chunks whose sizes come from the input. It must
//! never panic, and chunking must never change what is decoded. The checks
//! live in `src/lib.rs`, shared with `tests/fuzz_corpus.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| hookstream_fuzz::check_frame_decoder(data));
