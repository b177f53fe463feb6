//! # lockstock-testkit
//!
//! Test tooling for [lockstock](https://docs.rs/lockstock) and for applications that use it,
//! in the spirit of `sqlx-test` and `tokio-test`: use it as a dev-dependency.
//!
//! * [`sandbox`]: a throwaway MariaDB server (`mariadbd` from the system packages) with its own
//!   data directory and socket, started in about a second, killed and removed when the process
//!   exits — also when it panics or is killed (a watchdog process follows the owner).
//!   [`database_url`] gives every test a database on one shared server, or on `DATABASE_URL`.
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

pub mod galera;
pub mod sandbox;

pub use galera::{GaleraBuilder, GaleraCluster, GaleraError, NodePorts, NodeStatus};
pub use sandbox::{database_url, Sandbox, SandboxError};
