//! Fuzz target: `parse_head` and `validate_upgrade` on arbitrary bytes;
//! feeding them byte by byte must give the same answer as feeding them at
//! once. The checks live in `src/lib.rs`, shared with `tests/fuzz_corpus.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| hookstream_fuzz::check_request_head(data));
