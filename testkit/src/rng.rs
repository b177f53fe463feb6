//! A small deterministic generator (splitmix64) for randomised tests and workloads: replayable
//! from a seed, no dependency; and [`seed`], which takes the seed from `LOCKSTOCK_SEED` or the
//! clock and prints it so that a failing run can be replayed.
//!
//! ```
//! use lockstock_testkit::rng::{seed, Rng};
//!
//! let mut rng = Rng::new(seed("my_test"));
//! let roll = rng.below(6) + 1;
//! assert!((1..=6).contains(&roll));
//! ```

/// A small deterministic generator (splitmix64).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded generator.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// True with probability `per_mille / 1000`.
    pub fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

/// A seed for randomised tests: `LOCKSTOCK_SEED` if set, else the clock; printed to stderr
/// (`<test>: LOCKSTOCK_SEED=<seed>`) so that a failing run can be replayed.
pub fn seed(test: &str) -> u64 {
    let seed = std::env::var("LOCKSTOCK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("{test}: LOCKSTOCK_SEED={seed}");
    seed
}
