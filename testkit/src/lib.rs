//! # lockstock-testkit
//!
//! Test tooling for [lockstock](https://docs.rs/lockstock) and for applications that use it,
//! in the spirit of `sqlx-test` and `tokio-test`: use it as a dev-dependency.
//!
//! * [`sandbox`]: a throwaway MariaDB server (`mariadbd` from the system packages) with its own
//!   data directory and socket, started in about a second, killed and removed when the process
//!   exits — also when it panics or is killed (a watchdog process follows the owner).
//!   [`database_url`] gives every test a database on one shared server, or on `DATABASE_URL`.
//!
//! Unix only (the sandbox starts processes and follows them with a watchdog).
#![warn(
    missing_docs,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used
)]

pub mod sandbox;

pub use sandbox::{database_url, Sandbox, SandboxError};
