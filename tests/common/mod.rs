//! Shared helpers of the integration tests: a fresh, migrated database per test on the
//! project's throwaway MariaDB (or on `DATABASE_URL`).
#![allow(dead_code)]

use diesel::connection::SimpleConnection;
use diesel::{Connection, MysqlConnection};

/// A fresh database named `name` with lockstock's migrations applied; returns its URL and a
/// connection. `name` must be unique within the test binary.
pub fn fresh_database(name: &str) -> (String, MysqlConnection) {
    let url =
        lockstock::sandbox::database_url(name).unwrap_or_else(|e| panic!("database {name}: {e}"));
    let mut conn = connect(&url);
    conn.batch_execute(&format!(
        "DROP DATABASE `{name}`; CREATE DATABASE `{name}`; USE `{name}`"
    ))
    .unwrap_or_else(|e| panic!("recreate {name}: {e}"));
    lockstock::run_migrations(&mut conn).unwrap_or_else(|e| panic!("migrate {name}: {e}"));
    (url, conn)
}

/// A new connection to `url`.
pub fn connect(url: &str) -> MysqlConnection {
    MysqlConnection::establish(url).unwrap_or_else(|e| panic!("connect {url}: {e}"))
}

/// A seed for randomised tests: `LOCKSTOCK_SEED` if set, else the clock; printed so that a
/// failing run can be replayed.
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

/// A small deterministic generator (splitmix64) for test workloads.
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
}
