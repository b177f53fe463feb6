//! [`BalanceLedger`]: charge, deduct, refund, transfer and holds (reserve, capture, release,
//! expire) — never negative, never applied twice, every change journaled.
//!
//! # How a change is made
//! One SERIALIZABLE transaction per call (see [`TxnRunner`]):
//! 1. `SELECT ... FROM user_balance WHERE user_id = ? FOR UPDATE NOWAIT` — through the primary key,
//!    so InnoDB takes one record lock. A transfer locks both rows in ascending `user_id` order
//!    (a receiver it creates is written, and so locked, first; no lock read after that waits).
//!    If the account has active holds (or a hold is placed), the server clock and the sum of its
//!    holds not yet expired on it are read next (see `holds`): the *available* balance is the
//!    posted balance minus them.
//! 2. Check the available balance against the request (nothing written on refusal).
//! 3. `INSERT` the journal entry, `SELECT LAST_INSERT_ID()`, `UPDATE` the balance, `COMMIT`.
//!
//! There is no "does this key exist?" read before the insert: under SERIALIZABLE a read of a
//! missing key locks the gap around it, which would block other users' inserts. Instead the
//! UNIQUE(user_id, idempotency_key) index rejects a reused key, and only then — or when the
//! request is refused — is the key looked up, in a lock-free snapshot. A key that exists always
//! wins: the same request gets its original entry back, a different one [`Error::IdempotencyConflict`](crate::Error::IdempotencyConflict),
//! whatever the balance is now (TigerBeetle's `exists` semantics). A refused request whose key
//! cannot be looked up (the server gone, the journal locked past the deadline) answers
//! [`Error::OutcomeUnknown`](crate::Error::OutcomeUnknown): an earlier call may have applied it
//! — unless the refusal itself shows that no call of the request was ever applied: its account
//! did not exist (no earlier call can have recorded a key of such an account:
//! [`Error::AccountNotFound`](crate::Error::AccountNotFound) stands), or it is a capture or
//! release refused by a hold that expired, ended otherwise than it ends it, or holds less than
//! the capture (a hold ends once: the same request applied before would have ended it as this
//! one ends it), or a refund refused as more than its deduct has left where less has been
//! refunded than it asks for (a deduct's refunded amount only grows): the refusal stands.
//!
//! Every call has ONE [`Deadline`](crate::Deadline), fixed when it starts (the policy's
//! [`RetryPolicy::deadline`](crate::RetryPolicy::deadline)) and shared by all it does: the
//! transaction that creates a missing account, every retry, every round of a batch and every
//! key lookup. Once it has passed nothing more is sent.
//!
//! # Modules
//! * `types`: the public types ([`Entry`], [`Transfer`], [`Balance`], [`HistoryPage`],
//!   [`AccountOp`]) and the journal's rows;
//! * `request`: validation, [`request_hash`], the row a request writes and the answer a row
//!   under its key gives;
//! * `rows`: every statement, shared by the single and the batch path (the lock, the journal
//!   INSERT of one or N rows with their ids, the balance UPDATE, key lookups of one or N keys);
//! * `ops`: the single operations and reads; `idempotency`: the loop around every single write;
//! * `holds`: [`BalanceLedger::hold`], [`capture`](BalanceLedger::capture),
//!   [`release`](BalanceLedger::release), [`expire_holds`](BalanceLedger::expire_holds) — the
//!   lifecycle, statement by statement;
//! * `batch`: [`BalanceLedger::apply_many`]; `audit`: [`BalanceLedger::audit`].

mod audit;
mod batch;
mod holds;
mod idempotency;
mod ops;
mod request;
mod rows;
#[cfg(test)]
mod tests;
mod types;

pub use crate::records::{AuditReport, EntryKind, HoldState};
pub use crate::validate::{
    validate_amount, validate_expiry, validate_key, MAX_AMOUNT, MAX_HOLD_DURATION, MAX_KEY_BYTES,
};
pub(crate) use batch::check_ending;
pub use holds::MAX_EXPIRY_BATCH;
pub use request::request_hash;
pub(crate) use request::KeyLookup;
#[cfg(test)]
pub(crate) use request::Request;
pub(crate) use types::BeforeSending;
pub use types::{AccountOp, Balance, Entry, ExpiredHolds, HistoryPage, Hold, Transfer};

use crate::txn::{RetryPolicy, TxnPolicy, TxnRunner};

/// Largest page [`BalanceLedger::history`] returns.
pub const MAX_HISTORY_PAGE: u32 = 1000;

/// Keeps point/money balances: charge, deduct, refund, transfer, holds, balance, history, audit.
///
/// Holds a [`TxnPolicy`], no connection; share one ledger between threads.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use diesel::{Connection, MysqlConnection};
/// use lockstock::{BalanceLedger, Error};
/// use rust_decimal::Decimal;
/// let dec = Decimal::new;
///
/// let url = lockstock_testkit::sandbox::database_url("doc_ledger")?;
/// let mut conn = MysqlConnection::establish(&url)?;
/// # use diesel::connection::SimpleConnection;
/// # conn.batch_execute("DROP DATABASE doc_ledger; CREATE DATABASE doc_ledger; USE doc_ledger")?; // a fresh run each time
/// lockstock::run_migrations(&mut conn)?;
/// let ledger = BalanceLedger::new();
///
/// ledger.charge(&mut conn, 7, dec(100_00, 2), "charge-1")?;
/// let spent = ledger.deduct(&mut conn, 7, dec(30_00, 2), "order-1")?;
/// assert_eq!(spent.balance_after, dec(70_00, 2));
///
/// // The same key and request again: the original entry, nothing applied twice.
/// assert_eq!(ledger.deduct(&mut conn, 7, dec(30_00, 2), "order-1")?.id, spent.id);
///
/// // Partial refund, linked to the deduct; refunds can never exceed it.
/// let back = ledger.refund(&mut conn, spent.id, dec(10_00, 2), "refund-1")?;
/// assert_eq!(back.related_entry_id, Some(spent.id));
/// assert!(matches!(
///     ledger.refund(&mut conn, spent.id, dec(25_00, 2), "refund-2"),
///     Err(Error::RefundExceedsDeduct { .. })
/// ));
///
/// assert!(matches!(
///     ledger.deduct(&mut conn, 7, dec(1_000_00, 2), "order-2"),
///     Err(Error::InsufficientBalance { .. })
/// ));
/// assert_eq!(ledger.balance(&mut conn, 7)?.balance, dec(80_00, 2));
///
/// // Checkout: reserve 50, capture the 45 the payment charged (the other 5 are released).
/// let expires_at = chrono::Utc::now().naive_utc() + chrono::Duration::minutes(15);
/// let hold = ledger.hold(&mut conn, 7, dec(50_00, 2), "checkout-1", expires_at)?;
/// let balance = ledger.balance(&mut conn, 7)?;
/// assert_eq!((balance.balance, balance.available), (dec(80_00, 2), dec(30_00, 2)));
/// ledger.capture(&mut conn, hold.id, dec(45_00, 2), "paid-1")?;
/// // A cancelled order: its hold is released, nothing posted.
/// let cancelled = ledger.hold(&mut conn, 7, dec(10_00, 2), "checkout-2", expires_at)?;
/// ledger.release(&mut conn, cancelled.id, "cancel-2")?;
/// let balance = ledger.balance(&mut conn, 7)?;
/// assert_eq!((balance.balance, balance.held), (dec(35_00, 2), dec(0, 0)));
/// assert!(ledger.audit(&mut conn, 7)?.is_consistent());
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct BalanceLedger {
    runner: TxnRunner,
    /// The policy's runner trying each transaction once: [`expire_holds`](Self::expire_holds)
    /// skips a locked account instead of waiting for it. Boxed: it is rarely used, and the
    /// ledger is embedded by value (in [`CombiningLedger`](crate::combine::CombiningLedger)).
    sweeper: Box<TxnRunner>,
}

impl Default for BalanceLedger {
    fn default() -> Self {
        Self::with_policy(TxnPolicy::default())
    }
}

impl BalanceLedger {
    /// A ledger with the default policy (SERIALIZABLE, NOWAIT locks, bounded retries).
    pub fn new() -> Self {
        Self::default()
    }

    /// A ledger with `policy`.
    pub fn with_policy(policy: TxnPolicy) -> Self {
        let once = TxnPolicy {
            retry: RetryPolicy {
                max_attempts: 1,
                ..policy.retry.clone()
            },
            ..policy.clone()
        };
        Self {
            runner: TxnRunner::new(policy),
            sweeper: Box::new(TxnRunner::new(once)),
        }
    }

    /// The policy.
    pub fn policy(&self) -> &TxnPolicy {
        self.runner.policy()
    }

    /// The transaction runner (for batch and combining layers built on the ledger).
    pub fn runner(&self) -> &TxnRunner {
        &self.runner
    }
}
