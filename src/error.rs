//! Typed errors, and the one table that classifies server errors.
//!
//! Diesel's MySQL backend keeps the server's error number for only a few errors (1062 becomes
//! `UniqueViolation`, 1213 `SerializationFailure`); everything else arrives as `Unknown` with the
//! message text alone. lockstock therefore classifies by message text, with every pattern for both
//! MariaDB and MySQL 8 kept in [`CLASSIFICATION`] and unit-tested against both servers' texts.
//! The session runs with `lc_messages = 'en_US'` so the texts are stable.

use std::fmt;
use std::time::Duration;

use chrono::NaiveDateTime;
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use rust_decimal::Decimal;

/// Result type of every fallible lockstock call.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a server error means to lockstock, classified from Diesel's error.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServerErrorKind {
    /// MySQL 8 refused a `NOWAIT` locking read because another transaction holds the row (3572).
    LockRefused,
    /// A lock was not granted in time (1205). MariaDB also reports a `NOWAIT` refusal this way.
    /// Only the statement was rolled back; lockstock rolls back the whole transaction.
    LockWaitTimeout,
    /// InnoDB chose this transaction as a deadlock victim and rolled it back (1213).
    Deadlock,
    /// "Record has changed since last read" (1020): a snapshot conflict; the transaction must restart.
    RecordChanged,
    /// A UNIQUE or PRIMARY KEY constraint rejected a write (1062).
    DuplicateKey,
    /// A CHECK constraint rejected a write (MariaDB 4025, MySQL 3819).
    CheckViolation,
    /// The statement time limit interrupted a statement (MariaDB 1969, MySQL 3024).
    StatementTimeout,
    /// The connection to the server was lost or killed (2006, 2013, 1927, 1053, 4031).
    ConnectionLost,
    /// The statement was interrupted by `KILL QUERY` (1317). Only the statement was rolled
    /// back; lockstock rolls back the whole transaction and retries it. During COMMIT the
    /// outcome is unknown.
    Interrupted,
    /// Anything else.
    Other,
}

impl ServerErrorKind {
    /// Whether restarting the whole transaction can succeed: lock refusals and timeouts,
    /// deadlocks, snapshot conflicts and interrupted statements. A lost connection is not
    /// retried on the same connection.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Self::LockRefused
                | Self::LockWaitTimeout
                | Self::Deadlock
                | Self::RecordChanged
                | Self::Interrupted
        )
    }

    /// Whether a COMMIT that failed this way certainly applied nothing: the transaction was
    /// aborted as a deadlock victim, for a lock or snapshot conflict (as Galera reports a
    /// certification failure at COMMIT). An interrupted or lost COMMIT may have been applied.
    pub fn is_definite_abort(self) -> bool {
        matches!(
            self,
            Self::LockRefused | Self::LockWaitTimeout | Self::Deadlock | Self::RecordChanged
        )
    }

    /// The error number MariaDB uses for this kind, if there is one.
    pub fn mariadb_code(self) -> Option<u16> {
        self.rule().map(|r| r.mariadb_code).filter(|c| *c != 0)
    }

    /// The error number MySQL 8 uses for this kind, if there is one.
    pub fn mysql_code(self) -> Option<u16> {
        self.rule().map(|r| r.mysql_code).filter(|c| *c != 0)
    }

    fn rule(self) -> Option<&'static Classification> {
        CLASSIFICATION.iter().find(|r| r.kind == self)
    }
}

/// One line of the classification table.
#[derive(Debug)]
pub struct Classification {
    /// The kind a matching error gets.
    pub kind: ServerErrorKind,
    /// MariaDB's error number (0: MariaDB has none of its own).
    pub mariadb_code: u16,
    /// MySQL 8's error number (0: MySQL has none of its own).
    pub mysql_code: u16,
    /// Case-insensitive fragments of the English message; any one matching classifies the error.
    pub fragments: &'static [&'static str],
}

/// Every server error lockstock recognises, in match order (first match wins).
pub const CLASSIFICATION: &[Classification] = &[
    Classification {
        kind: ServerErrorKind::LockRefused,
        mariadb_code: 0,
        mysql_code: 3572,
        fragments: &["nowait is set", "could not be acquired immediately"],
    },
    Classification {
        kind: ServerErrorKind::LockWaitTimeout,
        mariadb_code: 1205,
        mysql_code: 1205,
        fragments: &["lock wait timeout exceeded"],
    },
    Classification {
        kind: ServerErrorKind::Deadlock,
        mariadb_code: 1213,
        mysql_code: 1213,
        fragments: &["deadlock found when trying to get lock"],
    },
    Classification {
        kind: ServerErrorKind::RecordChanged,
        mariadb_code: 1020,
        mysql_code: 1020,
        fragments: &["record has changed since last read"],
    },
    Classification {
        kind: ServerErrorKind::DuplicateKey,
        mariadb_code: 1062,
        mysql_code: 1062,
        fragments: &["duplicate entry"],
    },
    Classification {
        kind: ServerErrorKind::CheckViolation,
        mariadb_code: 4025,
        mysql_code: 3819,
        // MariaDB: "CONSTRAINT `c` failed for `db`.`t`"; MySQL: "Check constraint 'c' is violated."
        fragments: &["` failed for `", "check constraint '"],
    },
    Classification {
        kind: ServerErrorKind::StatementTimeout,
        mariadb_code: 1969,
        mysql_code: 3024,
        fragments: &[
            "max_statement_time exceeded",
            "maximum statement execution time exceeded",
        ],
    },
    // After StatementTimeout, whose texts start the same way.
    Classification {
        kind: ServerErrorKind::Interrupted,
        mariadb_code: 1317,
        mysql_code: 1317,
        fragments: &["query execution was interrupted"],
    },
    Classification {
        kind: ServerErrorKind::ConnectionLost,
        mariadb_code: 2013,
        mysql_code: 2013,
        fragments: &[
            "server has gone away",
            "lost connection to",
            "connection was killed",
            "server shutdown in progress",
            "can't connect to",
            "disconnected by the server",
            "connection refused",
            "broken pipe",
        ],
    },
];

/// Classifies a Diesel error by its kind and message text.
pub fn classify(error: &DieselError) -> ServerErrorKind {
    match error {
        DieselError::DatabaseError(kind, info) => match kind {
            DatabaseErrorKind::UniqueViolation => ServerErrorKind::DuplicateKey,
            DatabaseErrorKind::SerializationFailure => ServerErrorKind::Deadlock,
            DatabaseErrorKind::CheckViolation => ServerErrorKind::CheckViolation,
            DatabaseErrorKind::ClosedConnection => ServerErrorKind::ConnectionLost,
            _ => classify_message(info.message()),
        },
        DieselError::RollbackErrorOnCommit { commit_error, .. } => classify(commit_error),
        DieselError::BrokenTransactionManager => ServerErrorKind::ConnectionLost,
        _ => ServerErrorKind::Other,
    }
}

/// Classifies a server error message (English texts of MariaDB or MySQL 8).
pub fn classify_message(message: &str) -> ServerErrorKind {
    let message = message.to_ascii_lowercase();
    CLASSIFICATION
        .iter()
        .find(|rule| rule.fragments.iter().any(|f| message.contains(f)))
        .map_or(ServerErrorKind::Other, |rule| rule.kind)
}

/// A failure reported by the server or by Diesel, with its classification.
///
/// Cloning keeps the kind and the message; the Diesel error is rebuilt from them (Diesel's errors
/// are not `Clone`), which is how one batch failure reaches every caller in the batch.
#[derive(Debug)]
pub struct ServerError {
    kind: ServerErrorKind,
    source: DieselError,
}

impl ServerError {
    /// Classifies `source`.
    pub fn new(source: DieselError) -> Self {
        Self {
            kind: classify(&source),
            source,
        }
    }

    /// What the error means.
    pub fn kind(&self) -> ServerErrorKind {
        self.kind
    }

    /// The server's message text (or Diesel's description of a client-side failure).
    pub fn message(&self) -> String {
        match &self.source {
            DieselError::DatabaseError(_, info) => info.message().to_owned(),
            other => other.to_string(),
        }
    }

    /// The Diesel error this was classified from.
    pub fn diesel_error(&self) -> &DieselError {
        &self.source
    }

    /// Gives back the Diesel error.
    pub fn into_diesel_error(self) -> DieselError {
        self.source
    }
}

impl Clone for ServerError {
    fn clone(&self) -> Self {
        let source = match &self.source {
            DieselError::DatabaseError(kind, info) => {
                DieselError::DatabaseError(*kind, Box::new(info.message().to_owned()))
            }
            DieselError::NotFound => DieselError::NotFound,
            DieselError::BrokenTransactionManager => DieselError::BrokenTransactionManager,
            DieselError::AlreadyInTransaction => DieselError::AlreadyInTransaction,
            DieselError::NotInTransaction => DieselError::NotInTransaction,
            other => DieselError::QueryBuilderError(other.to_string().into()),
        };
        Self {
            kind: self.kind,
            source,
        }
    }
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message())
    }
}

impl std::error::Error for ServerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Why an amount was refused before anything reached the server.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AmountProblem {
    /// Zero or negative.
    NotPositive,
    /// More than four decimal places; DECIMAL(19,4) would round it silently.
    TooManyDecimals,
    /// Larger than DECIMAL(19,4) can hold.
    TooLarge,
}

impl fmt::Display for AmountProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NotPositive => "must be greater than zero",
            Self::TooManyDecimals => "has more than 4 decimal places",
            Self::TooLarge => "exceeds DECIMAL(19,4)",
        })
    }
}

/// Why an idempotency key was refused.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyProblem {
    /// The key is empty.
    Empty,
    /// The key is longer than 64 bytes.
    TooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// The key ends with a space. The key column's collation ignores trailing spaces, so
    /// `"k "` would be the same key as `"k"` and be answered with `"k"`'s entry.
    TrailingSpace,
}

impl fmt::Display for KeyProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => f.write_str("is empty"),
            Self::TooLong { len } => write!(f, "is {len} bytes long (at most 64)"),
            Self::TrailingSpace => f.write_str("ends with a space"),
        }
    }
}

/// Everything a lockstock call can fail with.
///
/// Domain refusals (`InsufficientBalance`, `SoldOut`, ...) and invalid input change nothing in
/// the database. [`Error::is_retryable`] says whether the same call may succeed later.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An amount was zero, negative, too precise or too large. Nothing was written.
    #[error("invalid amount {amount}: {problem}")]
    InvalidAmount {
        /// The amount given.
        amount: Decimal,
        /// What is wrong with it.
        problem: AmountProblem,
    },
    /// An idempotency key was empty or too long. Nothing was written.
    #[error("invalid idempotency key: {problem}")]
    InvalidIdempotencyKey {
        /// What is wrong with it.
        problem: KeyProblem,
    },
    /// A user, entry, coupon or campaign id was not positive. Nothing was written.
    #[error("invalid {what} id {id}: ids are positive")]
    InvalidId {
        /// Which kind of id.
        what: &'static str,
        /// The id given.
        id: i64,
    },
    /// Some other argument was refused (a name, a window, a quantity). Nothing was written.
    #[error("invalid {field}: {problem}")]
    InvalidInput {
        /// The argument.
        field: &'static str,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// A transfer named the same account on both sides.
    #[error("transfer from user {user_id} to itself")]
    SelfTransfer {
        /// The account.
        user_id: i64,
    },
    /// The account has never been charged.
    #[error("no account for user {user_id}")]
    AccountNotFound {
        /// The user.
        user_id: i64,
    },
    /// No journal entry has this id.
    #[error("no journal entry {entry_id}")]
    EntryNotFound {
        /// The entry id given.
        entry_id: i64,
    },
    /// Only deduct entries can be refunded.
    #[error("journal entry {entry_id} is a {kind}, not a deduct")]
    NotRefundable {
        /// The entry id given.
        entry_id: i64,
        /// What the entry is.
        kind: crate::ledger::EntryKind,
    },
    /// The refunds of a deduct would exceed the deducted amount.
    #[error("refund of {requested} exceeds deduct {entry_id}: {deducted} deducted, {refunded} already refunded")]
    RefundExceedsDeduct {
        /// The deduct entry.
        entry_id: i64,
        /// Its amount.
        deducted: Decimal,
        /// What has already been refunded.
        refunded: Decimal,
        /// The refund asked for.
        requested: Decimal,
    },
    /// Not enough money. Nothing was written.
    #[error(
        "insufficient balance for user {user_id}: {available} available, {requested} requested"
    )]
    InsufficientBalance {
        /// The account.
        user_id: i64,
        /// Its balance when checked under the row lock.
        available: Decimal,
        /// The amount asked for.
        requested: Decimal,
    },
    /// The balance would exceed what DECIMAL(19,4) can hold.
    #[error("balance of user {user_id} would exceed DECIMAL(19,4): {balance} + {requested}")]
    BalanceLimitExceeded {
        /// The account.
        user_id: i64,
        /// Its balance.
        balance: Decimal,
        /// The amount asked for.
        requested: Decimal,
    },
    /// The idempotency key was already used for a different request.
    #[error("idempotency key {key:?} of user {user_id} was used for a different request (entry {existing_entry_id})")]
    IdempotencyConflict {
        /// The account the key belongs to.
        user_id: i64,
        /// The key.
        key: String,
        /// The entry the key recorded first.
        existing_entry_id: i64,
    },
    /// No coupon template has this id.
    #[error("no coupon template {coupon_id}")]
    CouponNotFound {
        /// The id given.
        coupon_id: i64,
    },
    /// No campaign has this id.
    #[error("no coupon campaign {campaign_id}")]
    CampaignNotFound {
        /// The id given.
        campaign_id: i64,
    },
    /// The campaign has no stock left.
    #[error("campaign {campaign_id} is sold out")]
    SoldOut {
        /// The campaign.
        campaign_id: i64,
    },
    /// The user already holds a coupon of this template.
    #[error("user {user_id} already holds coupon {coupon_id} (user coupon {user_coupon_id})")]
    AlreadyIssued {
        /// The user.
        user_id: i64,
        /// The coupon template.
        coupon_id: i64,
        /// The coupon the user holds.
        user_coupon_id: i64,
    },
    /// The campaign's issue window has not opened yet.
    #[error("campaign {campaign_id} starts at {starts_at}")]
    NotStarted {
        /// The campaign.
        campaign_id: i64,
        /// When it opens (UTC).
        starts_at: NaiveDateTime,
    },
    /// The campaign's issue window has closed.
    #[error("campaign {campaign_id} ended at {ended_at}")]
    Ended {
        /// The campaign.
        campaign_id: i64,
        /// When it closed (UTC).
        ended_at: NaiveDateTime,
    },
    /// No issued coupon has this id.
    #[error("no issued coupon {user_coupon_id}")]
    UserCouponNotFound {
        /// The id given.
        user_coupon_id: i64,
    },
    /// The coupon was already redeemed.
    #[error("coupon {user_coupon_id} was already redeemed")]
    AlreadyRedeemed {
        /// The coupon.
        user_coupon_id: i64,
    },
    /// The coupon has not been redeemed, so there is nothing to restore.
    #[error("coupon {user_coupon_id} is not redeemed")]
    NotRedeemed {
        /// The coupon.
        user_coupon_id: i64,
    },
    /// The coupon is outside its validity window.
    #[error("coupon {user_coupon_id} is valid from {valid_from} until {valid_until}")]
    CouponNotValid {
        /// The coupon.
        user_coupon_id: i64,
        /// Start of validity (UTC).
        valid_from: NaiveDateTime,
        /// End of validity (UTC, exclusive).
        valid_until: NaiveDateTime,
    },
    /// [`BalanceLedger::audit`](crate::BalanceLedger::audit) found an account whose balance and
    /// journal disagree.
    #[error("audit of user {} failed: {}", .0.user_id, .0.problems.join("; "))]
    AuditFailed(Box<crate::ledger::AuditReport>),
    /// The coupon is redeemed, but by another order than the one given: a restore for an order
    /// that does not hold the coupon (a cancel repeated after the coupon was used again).
    /// Nothing was written.
    #[error("coupon {user_coupon_id} is not redeemed by order {order_ref:?}")]
    RedeemedByAnotherOrder {
        /// The coupon.
        user_coupon_id: i64,
        /// The order given.
        order_ref: String,
    },
    /// The restock key was already used for a different restock of the campaign (another
    /// quantity). Nothing was written.
    #[error("restock key {key:?} of campaign {campaign_id} was used for a restock of {recorded_additional}")]
    RestockConflict {
        /// The campaign.
        campaign_id: i64,
        /// The key.
        key: String,
        /// The quantity the key's restock added.
        recorded_additional: u32,
    },
    /// The row stayed locked by others: retries or the deadline ran out. Nothing was written;
    /// the same call (with the same idempotency key) may be retried.
    #[error("contended: gave up after {attempts} attempts in {elapsed:?}")]
    Contended {
        /// Transactions tried.
        attempts: u32,
        /// Time spent, backoff included.
        elapsed: Duration,
        /// The last refusal.
        #[source]
        last: ServerError,
    },
    /// The call's deadline passed before its next transaction was sent (while it waited to be
    /// combined into a batch, for a pooled connection, between the transactions of a call or
    /// the rounds of a batch). Nothing was committed by the transaction that was not sent;
    /// with the same idempotency key a retry is safe.
    #[error("deadline passed after {elapsed:?} before the request was sent")]
    Timeout {
        /// Time spent waiting.
        elapsed: Duration,
    },
    /// The change may or may not be applied: COMMIT failed in flight (a lost connection,
    /// `KILL QUERY`), or a request of a batch that committed could not be answered (its key
    /// could not be read back). Retry with the same idempotency key (or look the result up),
    /// on a new connection if the old one was lost.
    #[error("outcome unknown: the commit or its answer was lost")]
    OutcomeUnknown {
        /// The failure.
        #[source]
        source: ServerError,
    },
    /// The call was made inside a transaction the caller opened; lockstock must own the
    /// transaction to retry it.
    #[error("called inside an open transaction; lockstock runs its own transactions")]
    NestedTransaction,
    /// Rolling a failed transaction back failed too. lockstock marked the connection broken
    /// (Diesel's transaction manager reports it so, and an r2d2 pool discards it instead of
    /// handing it out again); the server rolls the transaction back when the connection closes.
    /// Nothing was committed. Drop the connection and retry on a new one.
    #[error("rollback failed; the connection is broken and must not be reused")]
    ConnectionBroken {
        /// Why the rollback failed.
        #[source]
        source: ServerError,
    },
    /// No connection could be checked out of the pool (before anything was sent).
    #[error("no pooled connection")]
    Pool(#[source] std::sync::Arc<diesel::r2d2::PoolError>),
    /// A failure inside lockstock itself (a bug: a panicking batch, a batch answering the wrong
    /// number of requests). Nothing was committed by the failing step.
    #[error("internal error: {reason}")]
    Internal {
        /// What went wrong.
        reason: std::sync::Arc<str>,
    },
    /// Any other server or Diesel failure. Nothing was committed.
    #[error("database error")]
    Server(#[source] ServerError),
    /// Running the migrations failed.
    #[error("migration failed: {0}")]
    Migration(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl Error {
    /// Whether the same call may succeed if repeated: contention, lock refusals and lost
    /// connections (on a new connection). With the same idempotency key a repeat never applies
    /// a change twice.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Contended { .. }
            | Self::OutcomeUnknown { .. }
            | Self::Timeout { .. }
            | Self::ConnectionBroken { .. }
            | Self::Pool(_) => true,
            Self::Server(e) => {
                e.kind().is_retryable() || e.kind() == ServerErrorKind::ConnectionLost
            }
            _ => false,
        }
    }

    /// The server error behind this error, if any.
    pub fn server_error(&self) -> Option<&ServerError> {
        match self {
            Self::Contended { last, .. } => Some(last),
            Self::OutcomeUnknown { source }
            | Self::ConnectionBroken { source }
            | Self::Server(source) => Some(source),
            _ => None,
        }
    }

    /// Whether the change may have been applied although the call failed.
    pub fn is_outcome_unknown(&self) -> bool {
        matches!(self, Self::OutcomeUnknown { .. })
    }

    /// The classification of the server error behind this error, if any.
    pub fn server_kind(&self) -> Option<ServerErrorKind> {
        self.server_error().map(ServerError::kind)
    }

    /// A copy of a whole-batch failure for each caller in the batch. Domain refusals are never
    /// whole-batch failures; anything without a faithful copy becomes [`Error::Server`] with the
    /// same text.
    pub(crate) fn replicate(&self) -> Error {
        match self {
            Self::Contended {
                attempts,
                elapsed,
                last,
            } => Self::Contended {
                attempts: *attempts,
                elapsed: *elapsed,
                last: last.clone(),
            },
            Self::OutcomeUnknown { source } => Self::OutcomeUnknown {
                source: source.clone(),
            },
            Self::Server(source) => Self::Server(source.clone()),
            Self::Timeout { elapsed } => Self::Timeout { elapsed: *elapsed },
            Self::NestedTransaction => Self::NestedTransaction,
            Self::ConnectionBroken { source } => Self::ConnectionBroken {
                source: source.clone(),
            },
            Self::Pool(e) => Self::Pool(e.clone()),
            Self::Internal { reason } => Self::Internal {
                reason: reason.clone(),
            },
            other => Self::Server(ServerError::new(DieselError::QueryBuilderError(
                other.to_string().into(),
            ))),
        }
    }

    /// An [`Error::Internal`].
    pub(crate) fn internal(reason: impl Into<std::sync::Arc<str>>) -> Error {
        Self::Internal {
            reason: reason.into(),
        }
    }

    /// A lock refusal that the transaction runner retries.
    pub(crate) fn is_transient(&self) -> bool {
        matches!(self, Self::Server(e) if e.kind().is_retryable())
    }
}

impl From<DieselError> for Error {
    fn from(error: DieselError) -> Self {
        Self::Server(ServerError::new(error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unknown(message: &str) -> DieselError {
        DieselError::DatabaseError(DatabaseErrorKind::Unknown, Box::new(message.to_owned()))
    }

    /// (kind, MariaDB 10.11 text, MySQL 8 text), as the servers print them.
    const TEXTS: &[(ServerErrorKind, &str, &str)] = &[
        (
            ServerErrorKind::LockWaitTimeout,
            "Lock wait timeout exceeded; try restarting transaction",
            "Lock wait timeout exceeded; try restarting transaction",
        ),
        (
            ServerErrorKind::LockRefused,
            // MariaDB has no separate NOWAIT error: it reports 1205 (previous row).
            "Statement aborted because lock(s) could not be acquired immediately and NOWAIT is set.",
            "Statement aborted because lock(s) could not be acquired immediately and NOWAIT is set.",
        ),
        (
            ServerErrorKind::Deadlock,
            "Deadlock found when trying to get lock; try restarting transaction",
            "Deadlock found when trying to get lock; try restarting transaction",
        ),
        (
            ServerErrorKind::RecordChanged,
            "Record has changed since last read in table 'user_balance'",
            "Record has changed since last read in table 'user_balance'",
        ),
        (
            ServerErrorKind::DuplicateKey,
            "Duplicate entry '7-k1' for key 'balance_history_idempotency'",
            "Duplicate entry '7-k1' for key 'balance_history.balance_history_idempotency'",
        ),
        (
            ServerErrorKind::CheckViolation,
            "CONSTRAINT `user_balance_non_negative` failed for `db`.`user_balance`",
            "Check constraint 'user_balance_non_negative' is violated.",
        ),
        (
            ServerErrorKind::StatementTimeout,
            "Query execution was interrupted (max_statement_time exceeded)",
            "Query execution was interrupted, maximum statement execution time exceeded",
        ),
        (
            ServerErrorKind::Interrupted,
            "Query execution was interrupted",
            "Query execution was interrupted",
        ),
        (
            ServerErrorKind::ConnectionLost,
            "Server has gone away",
            "MySQL server has gone away",
        ),
        (
            ServerErrorKind::ConnectionLost,
            "Lost connection to server during query",
            "Lost connection to MySQL server during query",
        ),
        (
            ServerErrorKind::ConnectionLost,
            "Connection was killed",
            "Lost connection to MySQL server at 'reading initial communication packet', system error: 0",
        ),
    ];

    #[test]
    fn classifies_mariadb_and_mysql_texts() {
        for (kind, mariadb, mysql) in TEXTS {
            assert_eq!(classify(&unknown(mariadb)), *kind, "MariaDB: {mariadb}");
            assert_eq!(classify(&unknown(mysql)), *kind, "MySQL: {mysql}");
        }
    }

    /// The forms a killed connection (KILL, server crash) takes through Diesel with MariaDB
    /// 10.11 and libmariadb, as seen by tests/faults.rs: the texts above, a COMMIT whose rollback
    /// failed too, and the broken transaction manager left behind.
    #[test]
    fn classifies_killed_connections_as_diesel_reports_them() {
        let commit = DieselError::RollbackErrorOnCommit {
            rollback_error: Box::new(unknown("Server has gone away")),
            commit_error: Box::new(unknown("Lost connection to server during query")),
        };
        assert_eq!(classify(&commit), ServerErrorKind::ConnectionLost);
        assert_eq!(
            classify(&DieselError::BrokenTransactionManager),
            ServerErrorKind::ConnectionLost
        );
    }

    #[test]
    fn classifies_diesel_kinds_without_reading_text() {
        let dup =
            DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, Box::new(String::new()));
        assert_eq!(classify(&dup), ServerErrorKind::DuplicateKey);
        let deadlock = DieselError::DatabaseError(
            DatabaseErrorKind::SerializationFailure,
            Box::new(String::new()),
        );
        assert_eq!(classify(&deadlock), ServerErrorKind::Deadlock);
        assert_eq!(classify(&DieselError::NotFound), ServerErrorKind::Other);
        assert_eq!(
            classify(&unknown("Table 'x' doesn't exist")),
            ServerErrorKind::Other
        );
    }

    #[test]
    fn codes_for_both_servers() {
        assert_eq!(ServerErrorKind::LockWaitTimeout.mariadb_code(), Some(1205));
        assert_eq!(ServerErrorKind::LockRefused.mysql_code(), Some(3572));
        assert_eq!(ServerErrorKind::LockRefused.mariadb_code(), None);
        assert_eq!(ServerErrorKind::CheckViolation.mariadb_code(), Some(4025));
        assert_eq!(ServerErrorKind::CheckViolation.mysql_code(), Some(3819));
        assert_eq!(ServerErrorKind::StatementTimeout.mariadb_code(), Some(1969));
        assert_eq!(ServerErrorKind::StatementTimeout.mysql_code(), Some(3024));
        assert_eq!(ServerErrorKind::Other.mysql_code(), None);
    }

    #[test]
    fn retryability() {
        for kind in [
            ServerErrorKind::LockRefused,
            ServerErrorKind::LockWaitTimeout,
            ServerErrorKind::Deadlock,
            ServerErrorKind::RecordChanged,
            ServerErrorKind::Interrupted,
        ] {
            assert!(kind.is_retryable(), "{kind:?}");
        }
        for kind in [
            ServerErrorKind::DuplicateKey,
            ServerErrorKind::CheckViolation,
            ServerErrorKind::StatementTimeout,
            ServerErrorKind::ConnectionLost,
            ServerErrorKind::Other,
        ] {
            assert!(!kind.is_retryable(), "{kind:?}");
        }
        let refused = Error::from(unknown(
            "Lock wait timeout exceeded; try restarting transaction",
        ));
        assert!(refused.is_transient() && refused.is_retryable());
        let lost = Error::from(unknown("Lost connection to server during query"));
        assert!(!lost.is_transient() && lost.is_retryable());
        let sold_out = Error::SoldOut { campaign_id: 1 };
        assert!(!sold_out.is_retryable() && sold_out.server_error().is_none());
    }

    #[test]
    fn source_is_chained() {
        use std::error::Error as _;
        let e = Error::from(unknown(
            "Deadlock found when trying to get lock; try restarting transaction",
        ));
        let server = e.source().and_then(|s| s.downcast_ref::<ServerError>());
        assert!(server.is_some_and(|s| s.kind() == ServerErrorKind::Deadlock));
        assert!(server.and_then(|s| s.source()).is_some());
    }
}
