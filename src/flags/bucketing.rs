//! Sticky bucketing: `murmur3_x86_32("{salt}:{driver_id}", seed 0) mod 10000`, the same
//! scheme as Unleash's gradual rollout, so a driver's bucket is the same on every instance
//! and across restarts, and raising the percentage only ever adds drivers.

use std::io::Read;

/// Number of buckets: percent in steps of 0.01.
pub const BUCKETS: u32 = 10_000;

/// The driver's bucket in `0..10000` under `salt`. Hashes `salt`, `:` and the id as one
/// stream, without building the joined string.
pub fn bucket(salt: &str, driver_id: &str) -> u32 {
    hash(salt, driver_id) % BUCKETS
}

/// `murmur3_x86_32("{salt}:{driver_id}", 0)`.
pub fn hash(salt: &str, driver_id: &str) -> u32 {
    let mut stream = salt.as_bytes().chain(&b":"[..]).chain(driver_id.as_bytes());
    // Reading from in-memory slices cannot fail.
    murmur3::murmur3_32(&mut stream, 0).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn murmur(s: &str, seed: u32) -> u32 {
        murmur3::murmur3_32(&mut s.as_bytes(), seed).unwrap()
    }

    /// Reference values of MurmurHash3_x86_32 (Appleby's SMHasher; the vectors Unleash's
    /// client specifications check their normalisation against).
    #[test]
    fn murmur3_reference_vectors() {
        assert_eq!(murmur("", 0), 0);
        assert_eq!(murmur("", 1), 0x514E_28B7);
        assert_eq!(murmur("", 0xffff_ffff), 0x81F1_6F39);
        assert_eq!(murmur("test", 0), 0xba6b_d213);
        assert_eq!(murmur("Hello, world!", 0), 0xc036_3e43);
        assert_eq!(murmur("The quick brown fox jumps over the lazy dog", 0), 0x2e4f_f723);
        assert_eq!(murmur("aaaa", 0x9747_b28c), 0x5A97_808A);
        assert_eq!(murmur("abc", 0), 0xB3DD_93FA);
    }

    /// Unleash's `normalizedValue(id, groupId)` is `murmur3("{groupId}:{id}", 0) % 100 + 1`;
    /// its clients (node, java, go) pin these two values in their tests.
    #[test]
    fn matches_unleash_normalisation() {
        let unleash = |group: &str, id: &str| hash(group, id) % 100 + 1;
        assert_eq!(unleash("gr1", "123"), 73);
        assert_eq!(unleash("groupX", "999"), 25);
        assert_eq!(hash("gr1", "123"), murmur("gr1:123", 0));
    }
}
