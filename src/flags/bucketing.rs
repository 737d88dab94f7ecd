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
    // The joined key is built on the stack (no allocation on the request path); reading
    // from an in-memory slice cannot fail.
    let (salt, id) = (salt.as_bytes(), driver_id.as_bytes());
    let len = salt.len() + 1 + id.len();
    let mut buf = [0u8; 128];
    if len <= buf.len() {
        buf[..salt.len()].copy_from_slice(salt);
        buf[salt.len()] = b':';
        buf[salt.len() + 1..len].copy_from_slice(id);
        murmur3::murmur3_32(&mut &buf[..len], 0).unwrap_or_default()
    } else {
        let mut stream = salt.chain(&b":"[..]).chain(id);
        murmur3::murmur3_32(&mut stream, 0).unwrap_or_default()
    }
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

#[cfg(test)]
mod distribution {
    use proptest::prelude::*;

    use super::*;
    use crate::domain::Cohort;
    use crate::flags::Flag;

    fn flag(threshold: u32, salt: &str) -> Flag {
        Flag {
            threshold,
            salt: salt.to_owned(),
            allow: Default::default(),
            deny: Default::default(),
            guard: None,
        }
    }

    /// 100,000 driver ids (UUIDs, as the database issues them): the share on
    /// atomic_async is within ±0.5 percentage points of the rollout percentage.
    #[test]
    fn shares_match_the_percentage() {
        let ids: Vec<String> = (0..100_000u128)
            .map(|i| uuid::Uuid::from_u128(i.wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835)).to_string())
            .collect();
        for percent in [1u32, 10, 50, 90] {
            let f = flag(percent * 100, "trip_accept_v2");
            let on = ids.iter().filter(|id| f.decide(id) == Cohort::AtomicAsync).count();
            let share = on as f64 / ids.len() as f64 * 100.0;
            assert!((share - f64::from(percent)).abs() <= 0.5, "{percent}%: {share:.3}%");
        }
    }

    proptest! {
        /// Raising the percentage never moves a driver from atomic_async back to legacy.
        #[test]
        fn raising_the_percentage_only_adds_drivers(id in "[a-z0-9-]{1,40}", salt in "[a-z_]{1,20}", a in 0u32..=10_000, b in 0u32..=10_000) {
            let (low, high) = (a.min(b), a.max(b));
            if flag(low, &salt).decide(&id) == Cohort::AtomicAsync {
                prop_assert_eq!(flag(high, &salt).decide(&id), Cohort::AtomicAsync);
            }
        }

        /// The cohort depends only on salt, id and percentage: the same on every instance
        /// and after every restart (no process state, no randomness).
        #[test]
        fn cohort_is_deterministic(id in ".{0,64}", salt in ".{1,32}", threshold in 0u32..=10_000) {
            let bucket = bucket(&salt, &id);
            prop_assert_eq!(bucket, murmur3::murmur3_32(&mut format!("{salt}:{id}").as_bytes(), 0).unwrap() % BUCKETS);
            prop_assert_eq!(flag(threshold, &salt).decide(&id) == Cohort::AtomicAsync, bucket < threshold);
        }
    }
}
