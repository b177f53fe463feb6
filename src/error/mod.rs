//! Typed errors: the one [`Error`] enum every call answers with, and [`ServerError`], a server
//! or Diesel failure with its classification ([`ServerErrorKind`], see the `kind` module).
//!
//! Every error is cheaply and faithfully `Clone` (a server error shares Diesel's error through
//! an `Arc`), which is how one batch failure reaches every caller of the batch.

mod kind;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use chrono::NaiveDateTime;
use diesel::result::Error as DieselError;
use rust_decimal::Decimal;

use crate::records::{AuditReport, EntryKind, HoldState};
pub(crate) use kind::classify as classify_kind;
pub use kind::ServerErrorKind;

/// Result type of every fallible lockstock call.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A failure reported by the server or by Diesel, with its classification.
///
/// Cloning is cheap and faithful: the Diesel error is shared, not rebuilt.
#[derive(Clone)]
pub struct ServerError {
    kind: ServerErrorKind,
    /// MariaDB's number for the error's text, if it has one.
    code: Option<u16>,
    source: Arc<DieselError>,
    /// On the source of an [`Error::OutcomeUnknown`] made by
    /// [`Error::unknown_after_refusal_by_deadline`]: the failure the deadline caused, and what
    /// finishes the answer (private; not part of what the error says).
    refused_then_cut: Option<Arc<CutShort>>,
}

/// A request that a call did not apply, refused or unanswered, whose key's lookup (an earlier
/// call may have recorded the key) the call's deadline cut short — or, without a lookup, that a
/// batch could not tell because of a node failure or its deadline.
#[derive(Debug)]
pub(crate) struct CutShort {
    /// The failure that cut the lookup short.
    pub(crate) failure: Error,
    /// For a ledger request refused by a batch that committed: the lookup that answers it as
    /// its single call, which would still be looking, answers it.
    pub(crate) lookup: Option<crate::ledger::KeyLookup>,
}

impl fmt::Debug for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerError")
            .field("kind", &self.kind)
            .field("source", &self.source)
            .finish()
    }
}

impl ServerError {
    /// Classifies `source`.
    pub fn new(source: DieselError) -> Self {
        let (kind, code) = kind::classify_with_code(&source);
        Self {
            kind,
            code,
            source: Arc::new(source),
            refused_then_cut: None,
        }
    }

    /// What the error means.
    pub fn kind(&self) -> ServerErrorKind {
        self.kind
    }

    /// The server's error number for MariaDB, told by the error's message text (Diesel keeps
    /// no number): a lost connection's 2013 ("Lost connection to server"), 2006 ("Server has
    /// gone away"), 1927 ("Connection was killed") or 1053 ("Server shutdown in progress");
    /// a foreign key's 1451 or 1452; and so on. `None` for [`ServerErrorKind::Other`], for a
    /// text MariaDB has no number of its own for (MySQL 8's NOWAIT refusal, say), and for a
    /// failure that is not the server's (a connection lockstock or Diesel found broken).
    /// [`ServerErrorKind::mariadb_code`] and [`ServerErrorKind::mysql_code`] give a kind's
    /// usual numbers.
    pub fn code(&self) -> Option<u16> {
        self.code
    }

    /// The server's message text (or Diesel's description of a client-side failure).
    pub fn message(&self) -> String {
        match &*self.source {
            DieselError::DatabaseError(_, info) => info.message().to_owned(),
            other => other.to_string(),
        }
    }

    /// The Diesel error this was classified from.
    pub fn diesel_error(&self) -> &DieselError {
        &self.source
    }

    /// The Diesel error, shared with every clone of this error.
    pub fn into_diesel_error(self) -> Arc<DieselError> {
        self.source
    }
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message())
    }
}

impl std::error::Error for ServerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
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

/// Why a hold's expiry was refused before anything reached the server.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpiryProblem {
    /// Not after the current time — the caller's clock, checked before anything is written
    /// (a key recorded before still answers its entry: a retry), or the server's, checked
    /// under the account's lock: the hold would never reserve anything.
    NotInFuture,
    /// Further ahead than [`MAX_HOLD_DURATION`](crate::ledger::MAX_HOLD_DURATION) on the
    /// caller's clock (a key recorded before — by a clock ahead of it — still answers its
    /// entry).
    TooFar,
}

impl fmt::Display for ExpiryProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NotInFuture => "is not in the future",
            Self::TooFar => "is further ahead than the longest hold allowed",
        })
    }
}

/// Everything a lockstock call can fail with.
///
/// Domain refusals (`InsufficientBalance`, `SoldOut`, ...) and invalid input change nothing in
/// the database. [`Error::is_retryable`] says whether the same call may succeed later.
#[non_exhaustive]
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// An amount was zero, negative, too precise or too large. Nothing was written.
    #[error("invalid amount {amount}: {problem}")]
    InvalidAmount {
        /// The amount given.
        amount: Decimal,
        /// What is wrong with it.
        problem: AmountProblem,
    },
    /// An idempotency key was empty, longer than 64 bytes or ended with a space
    /// ([`KeyProblem`]). Nothing was written.
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
        kind: EntryKind,
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
    /// A hold's expiry was in the past or too far ahead. Nothing was written.
    #[error("invalid hold expiry {expires_at}: {problem}")]
    InvalidExpiry {
        /// The expiry given (UTC).
        expires_at: NaiveDateTime,
        /// What is wrong with it.
        problem: ExpiryProblem,
    },
    /// No hold has this id (in a batch: no hold of the batch's account has it). Nothing was
    /// written.
    #[error("no hold {hold_id}")]
    HoldNotFound {
        /// The hold id given.
        hold_id: i64,
    },
    /// The hold was already captured or released, so it cannot be captured or released (again).
    /// Nothing was written. An expired hold answers [`Error::HoldExpired`] instead.
    #[error("hold {hold_id} is {state}, not active")]
    HoldNotActive {
        /// The hold.
        hold_id: i64,
        /// How it ended.
        state: HoldState,
    },
    /// The hold's expiry has passed on the server clock (whether or not
    /// [`BalanceLedger::expire_holds`](crate::BalanceLedger::expire_holds) has marked it yet):
    /// it no longer reserves anything and can be neither captured nor released. Nothing was
    /// written.
    #[error("hold {hold_id} expired at {expired_at}")]
    HoldExpired {
        /// The hold.
        hold_id: i64,
        /// Its expiry (UTC).
        expired_at: NaiveDateTime,
    },
    /// A capture asked for more than the hold reserves. Nothing was written.
    #[error("capture of {requested} exceeds hold {hold_id} of {held}")]
    CaptureExceedsHold {
        /// The hold.
        hold_id: i64,
        /// Its amount.
        held: Decimal,
        /// The capture asked for.
        requested: Decimal,
    },
    /// Not enough money. Nothing was written.
    #[error(
        "insufficient balance for user {user_id}: {available} available, {requested} requested"
    )]
    InsufficientBalance {
        /// The account.
        user_id: i64,
        /// Its available balance (posted balance minus active, unexpired holds) when checked
        /// under the row lock.
        available: Decimal,
        /// The amount asked for.
        requested: Decimal,
    },
    /// The balance — or, for a hold, the amount the account holds — would exceed what
    /// DECIMAL(19,4) can hold.
    #[error("balance of user {user_id} would exceed DECIMAL(19,4): {balance} + {requested}")]
    BalanceLimitExceeded {
        /// The account.
        user_id: i64,
        /// Its balance; for a hold, the amount it holds already (its `held`, which counts
        /// expired holds not yet swept).
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
    AuditFailed(Box<AuditReport>),
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
    #[error("contended: gave up after {attempts} refused attempts in {elapsed:?}")]
    Contended {
        /// Transactions refused (lock refusals and other retryable aborts) — and, where the
        /// deadline cut the last one through the server's statement limit (`last` a
        /// [`ServerErrorKind::StatementTimeout`]), that one; an attempt the deadline cut between
        /// a batch's statements is not counted.
        attempts: u32,
        /// Time spent, backoff included.
        elapsed: Duration,
        /// The last refusal.
        #[source]
        last: ServerError,
    },
    /// The call's deadline passed before its next transaction was sent (while it waited to be
    /// combined into a batch, for a pooled connection, between the transactions of a call or
    /// the rounds of a batch), or before the next of the statements a transaction sends one
    /// per row (a batch that ends many holds): that transaction was rolled back. Nothing was
    /// committed by the transaction that was not sent or not finished; with the same
    /// idempotency key a retry is safe.
    #[error("deadline passed after {elapsed:?}; the pending transaction was not committed")]
    Timeout {
        /// Time since the call started.
        elapsed: Duration,
    },
    /// The server did not answer within the call's deadline plus the policy's
    /// [`unresponsive_grace`](crate::TxnPolicy::unresponsive_grace) (a frozen or partitioned
    /// server, a Galera node that aborted the transaction and never answered). lockstock shut
    /// the connection's socket down and marked the connection broken (an r2d2 pool discards
    /// it); COMMIT had not been sent, so the server rolls the transaction back and nothing was
    /// committed. Retry (with the same idempotency key) on another connection — on a cluster,
    /// on another node. A COMMIT that got no answer is [`Error::OutcomeUnknown`] instead.
    /// Also the answer of a call whose earlier step (a key's lookup, a batch's read of holds)
    /// was cut so after its work was done, where the deadline left nothing for the next step.
    ///
    /// Linux only: see [the txn module](crate::txn#a-server-that-never-answers) on how the
    /// socket is found (elsewhere such a call waits as long as the server does).
    #[error("the server did not answer within the deadline ({elapsed:?}); the connection was shut down, nothing was committed")]
    ServerUnresponsive {
        /// Time since the call started.
        elapsed: Duration,
    },
    /// The change may or may not be applied: COMMIT failed in flight (a lost connection,
    /// `KILL QUERY`), a request of a batch that committed could not be answered (its key could
    /// not be read back), or a request refused now (or by its key's unique index) whose key —
    /// which an earlier call may have recorded, say one that answered this error — could not
    /// be looked up (not where the refusal itself shows that the request was never applied:
    /// [`Error::AccountNotFound`], a capture or release refused by a hold that expired or
    /// ended otherwise than it ends it, or by the hold's amount, and a refund refused as more
    /// than its deduct has left where less has been refunded than it asks for, keep their
    /// refusal). Retry with the same idempotency key (or look the result up), on a new
    /// connection if the old one was lost.
    #[error("outcome unknown: the change may or may not be applied")]
    OutcomeUnknown {
        /// The failure.
        #[source]
        source: ServerError,
    },
    /// A write was sent to a MariaDB Galera node other than the designated writer (the
    /// `designated_writer` row that [`Router`](crate::route::Router) keeps names another node),
    /// and [`TxnPolicy::designated_writer_only`](crate::TxnPolicy::designated_writer_only) is on.
    /// Writes on several Galera nodes can lose updates (see the `route` module); lockstock
    /// refused before `BEGIN`: nothing was applied, and the caller's session is as it was (on
    /// a caller's own connection the check comes after lockstock's saving SET, which is put
    /// back). Retry on the designated writer —
    /// through a [`Router`](crate::route::Router), which follows the row.
    #[error("this Galera node is not the designated writer; nothing was applied")]
    NotDesignatedWriter,
    /// A write on a MariaDB Galera node through a session whose replication is off
    /// (`SET SESSION wsrep_on = 0`, or the node's `wsrep_on` turned off globally): its changes
    /// would stay on this node, and the other nodes' copies of the rows would part from it.
    /// lockstock refused in its first statement, before anything changed: nothing was applied,
    /// and the session is as it was. Retry on a connection with `wsrep_on = 1` (another pooled
    /// connection, another node): a [`Router`](crate::route::Router) discards the connection,
    /// has the node's probe check the node's `wsrep_on`, and runs the call again.
    #[error("replication is off on this Galera session (wsrep_on = 0); nothing was applied")]
    NotReplicated,
    /// The call was made inside a transaction the caller opened; lockstock must own the
    /// transaction to retry it.
    #[error("called inside an open transaction; lockstock runs its own transactions")]
    NestedTransaction,
    /// Rolling a failed transaction back failed too. lockstock marked the connection broken
    /// (Diesel's transaction manager reports it so, and an r2d2 pool discards it instead of
    /// handing it out again) and ended its session where the server still took
    /// `KILL CONNECTION` (so that a raw statement sent on it fails); the server rolls the
    /// transaction back when the session ends. Nothing was committed. Drop the connection and
    /// retry on a new one.
    ///
    /// Also the answer, without a round trip, of a call on a connection lockstock marked broken
    /// before: one an earlier call found lost (killed, a restarted server) or that the
    /// watchdog shut down — unless the call is answered without looking at the connection at
    /// all: bad input, or a coupon issue answered from the issuer's memory (a sold-out mark, a
    /// closed window), which is as true on any connection.
    ///
    /// A MariaDB Galera node outside the Primary component refuses `BEGIN` and `ROLLBACK`
    /// alike: a call on it answers this error with a
    /// [`ServerErrorKind::NodeNotReady`] source (nothing was applied); retry on a connection
    /// to another node.
    #[error("the connection is broken (a rollback failed, or it was found lost or cut off before) and must not be reused")]
    ConnectionBroken {
        /// Why: the failed rollback's error, or the failure that marked the connection broken.
        #[source]
        source: ServerError,
    },
    /// No connection could be checked out of the pool (before anything was sent).
    #[error("no pooled connection")]
    Pool(#[source] Arc<diesel::r2d2::PoolError>),
    /// A failure inside lockstock itself (a bug: a panicking batch, a batch answering the wrong
    /// number of requests). Nothing was committed by the failing step.
    #[error("internal error: {reason}")]
    Internal {
        /// What went wrong.
        reason: Arc<str>,
    },
    /// Any other server or Diesel failure. Nothing was committed. Displayed with the server's
    /// kind and message (as `source()` also gives them).
    #[error("database error: {0}")]
    Server(#[source] ServerError),
    /// Running the migrations failed.
    #[error("migration failed: {0}")]
    Migration(#[source] Arc<dyn std::error::Error + Send + Sync>),
}

impl Error {
    /// A failure that applied nothing and blames the node or the connection, not the request:
    /// a [`Router`](crate::Router) runs the call again on the writer after it.
    pub(crate) fn is_node_failure(&self) -> bool {
        match self {
            Error::ServerUnresponsive { .. }
            | Error::ConnectionBroken { .. }
            | Error::NotDesignatedWriter
            | Error::NotReplicated
            | Error::Pool(_) => true,
            // `read_only` refuses a write before anything is applied (also at COMMIT).
            Error::Server(source) => matches!(
                source.kind(),
                ServerErrorKind::ConnectionLost
                    | ServerErrorKind::NodeNotReady
                    | ServerErrorKind::ReadOnly
            ),
            _ => false,
        }
    }

    /// Whether this refusal of a request of `kind` shows that no call of the same request
    /// can have been applied, so that it stands where the key's lookup fails — never an
    /// unknown outcome:
    /// - [`Error::AccountNotFound`]: no earlier call can have recorded a key of an account
    ///   that did not exist (the journal's entries need their account);
    /// - a capture or release refused by its hold: a hold ends once, and the same request
    ///   applied before would have ended it as this request ends it — so [`Error::HoldExpired`]
    ///   (active past its expiry, or ended by it), [`Error::CaptureExceedsHold`] (a hold's
    ///   amount never changes, and its state is judged first) and [`Error::HoldNotActive`]
    ///   for a hold ended otherwise (a capture of a released hold, say). A hold ended as this
    ///   request ends it may have been ended by an earlier call under its key: that refusal
    ///   needs the lookup;
    /// - a refund refused as more than its deduct has left ([`Error::RefundExceedsDeduct`])
    ///   where less has been refunded than it asks for: what a deduct has had refunded only
    ///   grows, so the same refund applied before would be in it. Where as much or more has
    ///   been refunded, that may be this refund's earlier call: the lookup decides.
    ///
    /// (Another request recorded under the key would make the lookup's answer
    /// [`Error::IdempotencyConflict`]: nothing of this request applied either.)
    pub(crate) fn refusal_proves_unapplied(&self, kind: EntryKind) -> bool {
        match self {
            Error::AccountNotFound { .. }
            | Error::HoldExpired { .. }
            | Error::CaptureExceedsHold { .. } => true,
            Error::HoldNotActive { state, .. } => kind.ends_hold_as() != Some(*state),
            Error::RefundExceedsDeduct {
                refunded,
                requested,
                ..
            } => refunded < requested,
            _ => false,
        }
    }

    /// The answer to a request whose key could not be looked up (`failure`) where the key may
    /// have been recorded by an earlier call under it — a retry after [`Error::OutcomeUnknown`],
    /// say, refused for what its first attempt spent, or refused by the key's unique index: the
    /// request may be applied, so [`Error::OutcomeUnknown`], never the failure itself, which
    /// would tell the retry that nothing was applied. (A conflict found under the key is an
    /// answer, not a failure.)
    ///
    /// Behind it, the server's error where the lookup met one; else the lookup's failure in
    /// words that say what failed ("the transaction was not committed" of a `Timeout` is the
    /// lookup's, not the request's, which may be applied).
    pub(crate) fn unknown_after_refusal(failure: Error) -> Error {
        match failure {
            Error::IdempotencyConflict { .. }
            | Error::RestockConflict { .. }
            | Error::OutcomeUnknown { .. } => failure,
            failure => Error::unknown_with(&failure, || {
                format!(
                    "looking up the request's idempotency key (an earlier call under it may \
                     have applied it) failed: {failure}"
                )
            }),
        }
    }

    /// [`unknown_after_refusal`](Self::unknown_after_refusal) for a request that THIS call
    /// did not apply (it was refused, or its batch failed before committing) and whose key's
    /// lookup `failure` may be the deadline's doing ([`Error::Timeout`], [`Error::Contended`],
    /// [`Error::ServerUnresponsive`]): the same answer, marked so that a combiner whose batch
    /// ran by an earlier caller's deadline can finish the request by its own caller's — by
    /// `lookup` (a request refused by a batch that committed), or else by running it again
    /// (see [`refused_then_cut`](Self::refused_then_cut)).
    pub(crate) fn unknown_after_refusal_by_deadline(
        failure: Error,
        lookup: Option<crate::ledger::KeyLookup>,
    ) -> Error {
        // Without a lookup (a batch that failed before committing): also a node failure, which
        // a router answers by running the call again.
        let cut = matches!(
            failure,
            Error::Timeout { .. } | Error::Contended { .. } | Error::ServerUnresponsive { .. }
        ) || (lookup.is_none() && failure.is_node_failure());
        match Error::unknown_after_refusal(failure.clone()) {
            Error::OutcomeUnknown { mut source } if cut => {
                source.refused_then_cut = Some(Arc::new(CutShort { failure, lookup }));
                Error::OutcomeUnknown { source }
            }
            answer => answer,
        }
    }

    /// For an answer of [`unknown_after_refusal_by_deadline`](Self::unknown_after_refusal_by_deadline)
    /// whose failure the deadline may have caused: that failure and the lookup that finishes
    /// it. Nothing was applied by the call that answered it; with more time its single call
    /// would have gone on looking. (Also for a batch's answer whose failure was a node
    /// failure: see [`node_failure_behind`](Self::node_failure_behind).)
    pub(crate) fn refused_then_cut(&self) -> Option<&CutShort> {
        match self {
            Error::OutcomeUnknown { source } => source.refused_then_cut.as_deref(),
            _ => None,
        }
    }

    /// The node failure that a [`Router`](crate::Router) runs a combined request again after:
    /// this error, if it is one ([`is_node_failure`](Self::is_node_failure)), or the node
    /// failure behind a batch's [`Error::OutcomeUnknown`] for a request it did not apply and
    /// could not tell whether an earlier call applied (a holder among its users, a key in the
    /// journal, not known which: [`unknown_after_refusal_by_deadline`](Self::unknown_after_refusal_by_deadline)
    /// without a lookup). The request's single call would not have met that lookup: through a
    /// router it met the node failure, and ran again.
    pub(crate) fn node_failure_behind(&self) -> Option<&Error> {
        if self.is_node_failure() {
            return Some(self);
        }
        self.refused_then_cut()
            .filter(|cut| cut.lookup.is_none())
            .map(|cut| &cut.failure)
            .filter(|failure| failure.is_node_failure())
    }

    /// Whether a unique index refused a write (a key taken, a coupon held).
    pub(crate) fn is_duplicate(&self) -> bool {
        self.server_kind() == Some(ServerErrorKind::DuplicateKey)
    }

    /// Whether this failure tells its caller that nothing was applied (the call gave up or
    /// failed before anything was committed), as opposed to an answer about the request (a
    /// refusal, a conflict, an unknown outcome).
    pub(crate) fn says_nothing_applied(&self) -> bool {
        matches!(
            self,
            Error::Contended { .. }
                | Error::Timeout { .. }
                | Error::ServerUnresponsive { .. }
                | Error::ConnectionBroken { .. }
                | Error::NotDesignatedWriter
                | Error::NotReplicated
                | Error::NestedTransaction
                | Error::Pool(_)
                | Error::Internal { .. }
                | Error::Server(_)
        )
    }

    /// [`Error::OutcomeUnknown`] for a failure after a COMMIT may have been sent: the server's
    /// error where there is one, else the failure's text.
    pub(crate) fn outcome_unknown(failure: &Error) -> Error {
        Error::unknown_with(failure, || failure.to_string())
    }

    /// [`Error::OutcomeUnknown`] with the server's error behind `failure` where there is one,
    /// else `text`.
    fn unknown_with(failure: &Error, text: impl FnOnce() -> String) -> Error {
        let source = failure.server_error().cloned().unwrap_or_else(|| {
            ServerError::new(diesel::result::Error::QueryBuilderError(text().into()))
        });
        Error::OutcomeUnknown { source }
    }

    /// Whether the same call may succeed if repeated: contention ([`Error::Contended`], lock
    /// refusals, deadlocks), a deadline that ran out ([`Error::Timeout`],
    /// [`Error::ServerUnresponsive`]), an unknown outcome ([`Error::OutcomeUnknown`]: the
    /// repeat with the same key answers what was recorded), lost or broken connections
    /// ([`Error::ConnectionBroken`], [`Error::Pool`]: on a new connection), a Galera node
    /// outside the Primary component ([`ServerErrorKind::NodeNotReady`]: on a connection to
    /// another node), a node that is not the designated writer
    /// ([`Error::NotDesignatedWriter`]) and a session with replication off
    /// ([`Error::NotReplicated`]: on another connection). With the same idempotency key a
    /// repeat never applies a change twice.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Contended { .. }
            | Self::OutcomeUnknown { .. }
            | Self::Timeout { .. }
            | Self::ServerUnresponsive { .. }
            | Self::NotDesignatedWriter
            | Self::NotReplicated
            | Self::ConnectionBroken { .. }
            | Self::Pool(_) => true,
            Self::Server(e) => {
                e.kind().is_retryable()
                    || matches!(
                        e.kind(),
                        ServerErrorKind::ConnectionLost | ServerErrorKind::NodeNotReady
                    )
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

    /// An [`Error::Internal`].
    pub(crate) fn internal(reason: impl Into<std::sync::Arc<str>>) -> Error {
        Self::Internal {
            reason: reason.into(),
        }
    }
}

impl From<DieselError> for Error {
    fn from(error: DieselError) -> Self {
        Self::Server(ServerError::new(error))
    }
}
