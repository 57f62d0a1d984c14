//! The permessage-deflate adapter of the test client
//! (tests/common/deflate.rs), byte for byte, without a server.

mod common;

use common::deflate::{deflate, inflate};

#[test]
fn inflate_undoes_deflate() {
    for len in [0usize, 1, 125, 126, 300, 65_535, 65_536, 200_000] {
        let plain: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        assert_eq!(inflate(&deflate(&plain)).unwrap(), plain, "length {len}");
    }
}
