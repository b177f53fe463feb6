//! # lockstock-testkit
//!
//! Test tooling for [lockstock](https://docs.rs/lockstock) and for applications that use it,
//! in the spirit of `sqlx-test` and `tokio-test`: use it as a dev-dependency.
//!
//! * [`sandbox`]: a throwaway MariaDB server (`mariadbd` from the system packages) with its own
//!   data directory and socket, started in about a second, killed and removed when the process
//!   exits — also when it panics or is killed (a watchdog process follows the owner).
//!   [`database_url`] gives every test a database on one shared server, or on `DATABASE_URL`.
//! * [`fixtures`]: a fresh migrated database per test, coupon campaigns, funded accounts, pools
//!   and [`fixtures::concurrently`] for races (threads with a connection each, started together).
//! * [`rng`]: a seeded, replayable generator and [`rng::seed`] (`LOCKSTOCK_SEED`).
//! * [`workload`]: a mixed, fault-tolerant workload that records every operation and its answer,
//!   and [`workload::verify`], which checks the database against that history.
//! * [`strategies`]: contention strategies for one hot campaign and one hot account (the
//!   library's, hand-written Diesel, waiting locks, conditional updates, combining) with a
//!   harness that runs and checks them — for benchmarks and reports.
//! * [`redis`]: a throwaway `redis-server` (no persistence, a socket of its own, the same cleanup
//!   guarantees) and a minimal RESP client, for the report's Redis-gate comparison.
//! * [`galera`]: a throwaway MariaDB Galera cluster (3 nodes by default) on loopback ports,
//!   with per-node kill, stop, restart, pause and resume, and the same cleanup guarantees.
//!
//! Unix only (the sandbox starts processes and follows them with a watchdog).
#![warn(
    missing_docs,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used
)]

pub mod fixtures;
pub mod galera;
pub mod redis;
pub mod rng;
pub mod sandbox;
pub mod strategies;
pub mod workload;

pub use galera::{
    GaleraBuilder, GaleraCluster, GaleraError, NodePorts, NodeStatus, StuckMajority, STUCK_MAJORITY,
};
pub use sandbox::{database_url, inherit_no_descriptors, Sandbox, SandboxError};
