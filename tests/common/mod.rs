//! Shared helpers of the integration tests: a fresh, migrated database per test on the
//! project's throwaway MariaDB (or on `DATABASE_URL`).
#![allow(dead_code)]

use diesel::connection::SimpleConnection;
use diesel::{Connection, MysqlConnection};

/// A fresh database named `name` with lockstock's migrations applied; returns its URL and a
/// connection. `name` must be unique within the test binary.
pub fn fresh_database(name: &str) -> (String, MysqlConnection) {
    let url = lockstock_testkit::sandbox::database_url(name)
        .unwrap_or_else(|e| panic!("database {name}: {e}"));
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

mod rng;
#[allow(unused_imports)] // not every test binary draws random numbers
pub use rng::Rng;
