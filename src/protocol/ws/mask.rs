//! XOR masking of frame payloads (RFC 6455 §5.3). Every byte a client sends
//! passes through here, so the fast path works a machine word at a time; the
//! byte-by-byte version is the reference it is tested against.

/// Bytes handled per step of the fast path. Eight `u64` lanes give LLVM a
/// block it turns into SIMD loads and XORs, without any `unsafe` here.
const BLOCK_BYTES: usize = 64;

/// The mask rotated so that its byte 0 applies to the first byte of the
/// buffer, which sits at position `offset` of the payload.
fn rotate_mask(mask: [u8; 4], offset: usize) -> [u8; 4] {
    let phase = offset % 4;
    [
        mask[phase],
        mask[(phase + 1) % 4],
        mask[(phase + 2) % 4],
        mask[(phase + 3) % 4],
    ]
}

/// XORs `buf` in place with `mask`, where `buf[0]` is byte `offset` of the
/// payload (so a payload can be unmasked in pieces as it arrives). Masking
/// and unmasking are the same operation.
///
/// Works on 64-byte blocks as eight native-endian `u64`s, then on single
/// `u64`s, then on the last few bytes: the repeated 4-byte mask is the same
/// pattern in every word because 8 is a multiple of 4, and loading through
/// `from_ne_bytes` is safe for any alignment (the compiler emits unaligned
/// vector loads). Measured on x86-64 at about the speed of `memcpy` for
/// 64 KiB.
pub fn unmask(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    let rotated = rotate_mask(mask, offset);
    let word_mask = u64::from_ne_bytes([
        rotated[0], rotated[1], rotated[2], rotated[3], rotated[0], rotated[1], rotated[2],
        rotated[3],
    ]);

    let mut blocks = buf.chunks_exact_mut(BLOCK_BYTES);
    for block in &mut blocks {
        unmask_words(block, word_mask);
    }
    // Short payloads (most client messages) and the end of long ones: whole
    // words first, then single bytes. Blocks and words are multiples of 4
    // bytes long, so every piece starts at phase 0 of the rotated mask.
    let rest = blocks.into_remainder();
    debug_assert!(rest.len() < BLOCK_BYTES);
    let mut words = rest.chunks_exact_mut(8);
    for word_bytes in &mut words {
        unmask_words(word_bytes, word_mask);
    }
    let tail = words.into_remainder();
    debug_assert!(tail.len() < 8);
    unmask_bytewise(tail, rotated, 0);
}

/// XORs a slice whose length is a multiple of 8 with `word_mask`, one `u64`
/// at a time.
#[inline(always)]
fn unmask_words(buf: &mut [u8], word_mask: u64) {
    debug_assert!(buf.len() % 8 == 0);
    for word_bytes in buf.chunks_exact_mut(8) {
        let mut word = [0u8; 8];
        word.copy_from_slice(word_bytes);
        let unmasked = u64::from_ne_bytes(word) ^ word_mask;
        word_bytes.copy_from_slice(&unmasked.to_ne_bytes());
    }
}

/// The reference implementation of [`unmask`]: one byte at a time.
pub fn unmask_bytewise(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    for (index, byte) in buf.iter_mut().enumerate() {
        let mask_index = (offset.wrapping_add(index)) % 4;
        debug_assert!(mask_index < 4);
        *byte ^= mask[mask_index];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic, non-repeating test bytes without a dependency.
    fn pattern(len: usize, seed: u32) -> Vec<u8> {
        let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                state as u8
            })
            .collect()
    }

    #[test]
    fn fast_equals_bytewise_for_every_length_alignment_and_offset() {
        let masks = [
            [0, 0, 0, 0],
            [0xFF; 4],
            [0x12, 0x34, 0x56, 0x78],
            [1, 2, 3, 4],
        ];
        for len in 0..=257 {
            for alignment in 0..8 {
                for offset in 0..4 {
                    for mask in masks {
                        let original = pattern(alignment + len, (len * 31 + alignment) as u32);
                        let mut fast = original.clone();
                        let mut slow = original.clone();
                        unmask(&mut fast[alignment..], mask, offset);
                        unmask_bytewise(&mut slow[alignment..], mask, offset);
                        assert_eq!(
                            fast, slow,
                            "len {len} alignment {alignment} offset {offset}"
                        );
                        // The bytes in front of the slice are untouched.
                        assert_eq!(fast[..alignment], original[..alignment]);
                    }
                }
            }
        }
    }

    #[test]
    fn unmasking_in_pieces_equals_unmasking_at_once() {
        let mask = [0xA1, 0xB2, 0xC3, 0xD4];
        let original = pattern(300, 7);
        let mut whole = original.clone();
        unmask(&mut whole, mask, 0);
        for split in 0..=original.len() {
            let mut pieces = original.clone();
            let (head, tail) = pieces.split_at_mut(split);
            unmask(head, mask, 0);
            unmask(tail, mask, split);
            assert_eq!(pieces, whole, "split {split}");
        }
    }

    #[test]
    fn masking_twice_is_the_identity() {
        let original = pattern(1000, 3);
        let mut data = original.clone();
        unmask(&mut data, [9, 8, 7, 6], 1);
        assert_ne!(data, original);
        unmask(&mut data, [9, 8, 7, 6], 1);
        assert_eq!(data, original);
    }
}
