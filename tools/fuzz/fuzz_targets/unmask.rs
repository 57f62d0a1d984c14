//! Fuzz target: the word-at-a-time `unmask` equals `unmask_bytewise` for any
//! data, mask, offset and alignment. The checks live in `src/lib.rs`, shared
//! with `tests/fuzz_corpus.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| hookstream_fuzz::check_unmask(data));
