//! # lockstock
//!
//! Correct point/money balances and first-come-first-served coupons on MySQL/MariaDB through
//! Diesel.
//!
//! * [`BalanceLedger`] charges, deducts, refunds and transfers, and holds points (reserve at
//!   checkout, capture on payment, release on cancel or expiry). A balance never goes negative,
//!   holds never reserve more than is available, an idempotency key never applies a change
//!   twice, and every change is journaled with the balance after it.
//! * [`CouponIssuer`] issues a limited stock first come, first served: never over-issued, one
//!   coupon per user, redeemed once.
//!
//! Both lock the hot row with `SELECT ... FOR UPDATE NOWAIT` through its primary key inside a
//! SERIALIZABLE transaction, retry refusals with bounded jittered backoff under a deadline
//! ([`TxnPolicy`]), and answer with typed [`Error`]s. They hold policy, not connections: every
//! call takes a `&mut MysqlConnection` (an r2d2 pooled connection derefs to one).
//!
//! ```
//! use diesel::{Connection, MysqlConnection};
//! use lockstock::{BalanceLedger, CouponIssuer, Error};
//! use rust_decimal::Decimal;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Your own server: MysqlConnection::establish("mysql://app@db/shop"). Here: $DATABASE_URL,
//! // or a throwaway MariaDB that lockstock-testkit starts (and removes) itself.
//! let url = lockstock_testkit::database_url("doc_crate")?;
//! let mut conn = MysqlConnection::establish(&url)?;
//! # use diesel::connection::SimpleConnection;
//! # conn.batch_execute("DROP DATABASE doc_crate; CREATE DATABASE doc_crate; USE doc_crate")?; // a fresh run each time
//! lockstock::run_migrations(&mut conn)?;
//!
//! let ledger = BalanceLedger::new();
//! ledger.charge(&mut conn, 42, Decimal::new(10_000, 2), "topup-2026-11-27-1")?;
//! match ledger.deduct(&mut conn, 42, Decimal::new(250_000, 2), "order-981") {
//!     Err(Error::InsufficientBalance { available, .. }) => {
//!         assert_eq!(available, Decimal::new(10_000, 2)); // nothing was written
//!     }
//!     other => panic!("expected a refusal, got {other:?}"),
//! }
//! let paid = ledger.deduct(&mut conn, 42, Decimal::new(2_500, 2), "order-982")?;
//! assert_eq!(paid.balance_after, Decimal::new(7_500, 2));
//! // A retry with the same key returns the same entry and changes nothing.
//! assert_eq!(ledger.deduct(&mut conn, 42, Decimal::new(2_500, 2), "order-982")?.id, paid.id);
//! assert_eq!(ledger.balance(&mut conn, 42)?.balance, Decimal::new(7_500, 2));
//!
//! let issuer = CouponIssuer::new();
//! assert!(matches!(issuer.issue(&mut conn, 42, 1), Err(Error::CampaignNotFound { .. })));
//! # Ok(())
//! # }
//! ```
//!
//! Hot rows: [`CombiningIssuer`] and [`CombiningLedger`] (in [`combine`]) combine concurrent
//! requests for one campaign or account into one transaction over an r2d2 pool. Tests and
//! examples: the `lockstock-testkit` crate starts a private MariaDB.
#![warn(
    missing_docs,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::missing_errors_doc
)]

/// Emits a `tracing` event when the `tracing` feature is on; compiles to nothing otherwise.
macro_rules! trace_event {
    ($($arg:tt)*) => {
        #[cfg(feature = "tracing")]
        tracing::debug!($($arg)*);
    };
}

// The README's Rust blocks are compiled by `cargo test --doc` (not part of the documentation).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

pub mod combine;
pub mod coupon;
pub mod error;
pub mod ledger;
mod records;
pub mod route;
pub mod schema;
mod statements;
pub mod txn;
mod util;
mod validate;

pub use combine::{CombinerStats, CombiningIssuer, CombiningLedger};
pub use coupon::{
    Campaign, Coupon, CouponIssuer, CouponStatus, Discount, IssuedCoupon, NewCampaign, NewCoupon,
    StockRowWait,
};
pub use error::{Error, Result, ServerError, ServerErrorKind};
pub use ledger::{
    AccountOp, AuditReport, Balance, BalanceLedger, Entry, EntryKind, ExpiredHolds, HistoryPage,
    Hold, HoldState, Transfer,
};
pub use route::{ReadConsistency, Router, RouterBuilder, RouterStats};
pub use txn::{
    Deadline, Isolation, RetryPolicy, SessionSettings, StatementCache, TxnPolicy, TxnRunner,
};

use diesel::mysql::MysqlConnection;
use diesel_migrations::EmbeddedMigrations;

/// The schema migrations, embedded in the crate.
pub const MIGRATIONS: EmbeddedMigrations = diesel_migrations::embed_migrations!("migrations");

/// Applies every pending migration in [`MIGRATIONS`].
///
/// Not bounded by a deadline (a migration's DDL may rightly take long): run it at deployment,
/// not on a request path; [`run_migrations_by`] bounds it. The caller's session is left as
/// found, as by [`run_migrations_by`].
///
/// # Errors
/// As [`run_migrations_by`], without the deadline's.
pub fn run_migrations(conn: &mut MysqlConnection) -> Result<()> {
    txn::migrations::run(conn, None)
}

/// Applies every pending migration in [`MIGRATIONS`], returning by `deadline` (plus the default
/// policy's [`unresponsive_grace`](TxnPolicy::unresponsive_grace)) also when the server stops
/// answering: the watchdog then shuts the connection down (see
/// [the txn module](crate::txn#a-server-that-never-answers)); a migration cut off so (or by a
/// `KILL`, a crash) may have been applied in part: its DDL commits statement by statement, and
/// Diesel records the migration only after its last one. A migration that changes tables a
/// running application uses (the holds migration: its ALTERs wait for the tables' readers, and
/// the server's bound below may stop one of them after the ones before it committed) sends each
/// statement only where its work is not there yet, so running the migrations again applies it.
/// The ones that create the schema in a new database do not (a table of that name that is there
/// already may be another application's): running them again after such a cut fails on what
/// the cut-off one created ("already exists"); undo that part by hand (the migration's
/// `down.sql` names what it creates) and run them again. The server is told the deadline too: as
/// each migration starts, its `lock_wait_timeout` and (MariaDB, but not on a Galera node, whose
/// other nodes would finish a replicated DDL cut short on this one) its `max_statement_time`
/// become the time left (`lock_wait_timeout` in whole seconds, rounded down where no
/// `max_statement_time` bounds it: under a second left, no wait at all), so that a migration
/// waiting for a table another session holds fails by the deadline ([`Error::Migration`]) in the
/// server as well, rather than waiting on and applying itself after the call answered. (Within
/// one migration a statement that starts late
/// may still wait up to the time left as that migration started.)
///
/// Several processes may run the migrations at once (each as it starts): one that fails on
/// what another created meanwhile ("already exists", "Duplicate ...") waits up to 10 s (within
/// its deadline) for the other to record every migration, and then answers `Ok`.
///
/// The caller's session is left as found: Diesel runs each migration in a transaction whose
/// COMMIT follows the session's `completion_type`, so lockstock sets `NO_CHAIN` (and
/// `autocommit = 1`, so that reading which migrations are applied leaves no transaction open)
/// and puts the caller's values back afterwards (where it cannot, it ends the session and the
/// connection is marked broken; the answer is still the migrations'). Inside a transaction the caller opened through Diesel, or on
/// MariaDB with a raw `BEGIN`, nothing is applied (only the server's version and Galera state
/// are read): DDL would commit it (MySQL 8 has no
/// `@@in_transaction`: there a raw `BEGIN` is committed by the migrations).
///
/// # Errors
/// [`Error::Timeout`] when `deadline` has passed before anything was sent;
/// [`Error::NestedTransaction`] inside the caller's open transaction (nothing applied);
/// [`Error::ConnectionBroken`] on a connection an earlier call left broken (a watchdog cut, a
/// failed ROLLBACK: nothing sent);
/// [`Error::NotReplicated`] on a MariaDB Galera node through a session whose replication is
/// off (nothing applied: the DDL would stay on this node);
/// [`Error::Migration`] when a migration (or reading which are applied) fails, or the deadline
/// passed before the next one started (no migration starts past it: the ones before are applied
/// and recorded, it and the rest pending — run again);
/// [`Error::ServerUnresponsive`] when the server did not answer by the deadline plus the grace
/// (the connection is shut down and marked broken); [`Error::Server`] when the session could
/// not be set up (nothing applied).
pub fn run_migrations_by(conn: &mut MysqlConnection, deadline: Deadline) -> Result<()> {
    txn::migrations::run(conn, Some(deadline))
}
