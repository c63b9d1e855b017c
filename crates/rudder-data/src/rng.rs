//! Seeded random streams. Every random choice in rudder draws from a stream derived from the
//! run seed and a key path (e.g. `[epoch, batch]`), so results do not depend on the number of
//! threads or on the order in which parallel work is scheduled.

use rand::SeedableRng;

pub type Rng = rand_chacha::ChaCha8Rng;

/// SplitMix64 finaliser: a bijective 64-bit mixer.
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Hash a seed and a key path into one 64-bit value.
pub fn hash_keys(seed: u64, keys: &[u64]) -> u64 {
    let mut h = mix64(seed);
    for &k in keys {
        h = mix64(h ^ mix64(k.wrapping_add(0x632B_E59B_D9B4_E019)));
    }
    h
}

/// An independent random stream for `(seed, keys…)`.
pub fn stream(seed: u64, keys: &[u64]) -> Rng {
    let h = hash_keys(seed, keys);
    let mut s = [0u8; 32];
    for (k, chunk) in s.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(
            &mix64(h ^ (k as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93)).to_le_bytes(),
        );
    }
    Rng::from_seed(s)
}

/// A uniform number in [0, 1) determined by `(seed, keys…)` alone (no state).
pub fn unit(seed: u64, keys: &[u64]) -> f64 {
    (hash_keys(seed, keys) >> 11) as f64 / (1u64 << 53) as f64
}
