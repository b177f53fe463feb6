//! [`CouponIssuer`]: first-come-first-served coupons that are never over-issued.
//!
//! # How a coupon is issued
//! One SERIALIZABLE transaction per request, in this deliberate order (each attempt of it, when
//! a refusal makes the runner retry, reads the clock again: the window is checked at the time of
//! the attempt that commits, and `issued_at` is that attempt's time):
//! 1. `INSERT INTO user_coupon ...` — the UNIQUE(user_id, coupon_id) index decides "already
//!    issued?". This runs *before* the stock row is locked, so duplicate requests never touch the
//!    hot row and the duplicate check costs no time under its lock. There is no "does the user
//!    have one?" SELECT: under SERIALIZABLE it would take shared gap locks that block or deadlock
//!    other users' inserts.
//! 2. `SELECT id, coupon_id, total_quantity, stock_quantity, issue_starts_at, issue_ends_at,
//!    LAST_INSERT_ID() FROM fcfs_coupon WHERE id = ? FOR UPDATE NOWAIT` — the hot row, by
//!    primary key, and in the same read the new coupon's id (restocks lock it with the same
//!    read, without the id; a batch whose stock runs out inside it locks first); an empty
//!    result is
//!    `CampaignNotFound`. The template and window read with it must equal the cached ones (else
//!    the cache is forgotten and the request runs again with fresh facts: no wrong `coupon_id`
//!    is ever committed); the window is checked once more at the time the lock is granted; zero
//!    stock is `SoldOut`. Any refusal rolls back, taking the inserted row with it.
//! 3. `UPDATE fcfs_coupon SET stock_quantity = ?` and `COMMIT`.
//!
//! So the stock row is locked for one UPDATE and the COMMIT. The CHECK (stock_quantity >= 0)
//! constraint is the last line of defence against over-issue. A duplicate (step 1) is answered
//! `AlreadyIssued` after a snapshot read of the held coupon and the campaign row (again checked
//! against the cached facts). All transactions and reads of one call share one deadline.
//!
//! # What the issuer remembers
//! The issue window and the coupon template of a campaign never change, so the issuer caches
//! them per campaign id and checks the window without a round trip — one issuer serves one
//! database. Once it sees a campaign sold out (a request refused for zero stock, or
//! [`CouponIssuer::campaign`] / [`CouponIssuer::remaining`] reading zero) it answers
//! [`Error::SoldOut`] from memory. Any read that sees the stock above zero clears that mark
//! (those two, the first read of a campaign's facts, the locked stock row of an issue or batch),
//! and so does [`CouponIssuer::restock`], before it runs and again after, whatever its outcome.
//!
//! # How a restock is made
//! One transaction: the campaign row `FOR UPDATE NOWAIT`, the new total checked, `INSERT INTO
//! fcfs_coupon_restock` — its UNIQUE(fcfs_coupon_id, idempotency_key) refuses a key used before
//! — then `UPDATE fcfs_coupon` and `COMMIT`. A refused key (or a refused total while the key
//! exists) is looked up in a snapshot: the same request gets the recorded result, a different
//! one [`Error::RestockConflict`].
//!
//! # Modules
//! * `types`: the public types, their rows, the cached campaign facts, input checks;
//! * `rows`: every statement, shared by the single and the batch issue (the stock-row lock,
//!   the user_coupon INSERT of one or N rows with their ids, the stock UPDATE, the holder
//!   lookup of one or N users) and by redeem/restore/restock;
//! * `issue`: [`CouponIssuer::issue`]; `batch`: [`CouponIssuer::issue_many`];
//! * `cache`: the campaign facts and sold-out marks; `redeem`: redeem, restore, restock;
//! * `catalog`: templates, campaigns and the coupons a user holds.

mod batch;
mod cache;
mod catalog;
mod issue;
mod redeem;
mod rows;
#[cfg(test)]
mod tests;
mod types;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::NaiveDateTime;

use crate::error::Error;
use crate::txn::{Holding, TxnPolicy, TxnRunner};
use crate::util::{now, to_micros};
use cache::{lock, SoldOutMarks};
use types::CampaignFacts;
pub use types::{
    Campaign, Coupon, CouponStatus, Discount, IssuedCoupon, NewCampaign, NewCoupon,
    MAX_ORDER_REF_BYTES,
};

/// The issuer's clock: UTC now. Replaceable for tests of window boundaries.
pub type Clock = Arc<dyn Fn() -> NaiveDateTime + Send + Sync>;

/// Issues first-come-first-served coupons, redeems and restores them.
///
/// Holds a [`TxnPolicy`], a clock and two caches (campaign facts, sold-out campaigns), no
/// connection; share one issuer between threads.
///
/// **One issuer serves one database**: its caches are keyed by campaign id only. Used on
/// another database with the same campaign ids, it never writes a wrong template (the cached
/// facts are checked against the locked campaign row and re-read on a mismatch), but its
/// sold-out marks may answer [`Error::SoldOut`], and a window it cached closed (refused
/// without a round trip, so that requests before a sale opens or after it ends cost the
/// server nothing) [`Error::NotStarted`] or [`Error::Ended`], for the other database's
/// campaigns of the same id. Use one issuer per database.
///
/// One coupon per user **per template**: a unique index on (user, template) decides "already
/// issued", so a user holding a template's coupon from one campaign is answered
/// [`Error::AlreadyIssued`] (with that coupon) by every other campaign of the template.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use chrono::{Duration, Utc};
/// use diesel::{Connection, MysqlConnection};
/// use lockstock::coupon::{CouponIssuer, Discount, NewCampaign, NewCoupon};
/// use lockstock::Error;
/// use rust_decimal::Decimal;
///
/// let url = lockstock_testkit::sandbox::database_url("doc_coupon")?;
/// let mut conn = MysqlConnection::establish(&url)?;
/// # use diesel::connection::SimpleConnection;
/// # conn.batch_execute("DROP DATABASE doc_coupon; CREATE DATABASE doc_coupon; USE doc_coupon")?; // a fresh run each time
/// lockstock::run_migrations(&mut conn)?;
/// let issuer = CouponIssuer::new();
///
/// let now = Utc::now().naive_utc();
/// let coupon = issuer.create_coupon(&mut conn, &NewCoupon {
///     name: "Black Friday 5,000 off",
///     discount: Discount::Fixed(Decimal::new(5_000, 0)),
///     valid_from: now - Duration::hours(1),
///     valid_until: now + Duration::days(7),
/// })?;
/// let campaign = issuer.create_campaign(&mut conn, &NewCampaign {
///     coupon_id: coupon.id,
///     quantity: 1,
///     issue_starts_at: now - Duration::minutes(1),
///     issue_ends_at: now + Duration::hours(1),
/// })?;
///
/// let mine = issuer.issue(&mut conn, 7, campaign.id)?;
/// assert!(matches!(issuer.issue(&mut conn, 7, campaign.id), Err(Error::AlreadyIssued { .. })));
/// assert!(matches!(issuer.issue(&mut conn, 8, campaign.id), Err(Error::SoldOut { .. })));
///
/// issuer.redeem(&mut conn, mine.id, "order-1001")?;
/// assert!(matches!(issuer.redeem(&mut conn, mine.id, "order-1002"), Err(Error::AlreadyRedeemed { .. })));
/// // A retry by the order that holds the coupon is answered with the coupon, unchanged.
/// assert_eq!(issuer.redeem(&mut conn, mine.id, "order-1001")?.order_ref.as_deref(), Some("order-1001"));
/// issuer.restore(&mut conn, mine.id, "order-1001")?; // order 1001 was cancelled
/// issuer.redeem(&mut conn, mine.id, "order-1003")?;
/// // A repeated cancel of order 1001 does not free the coupon order 1003 holds.
/// assert!(matches!(
///     issuer.restore(&mut conn, mine.id, "order-1001"),
///     Err(Error::RedeemedByAnotherOrder { .. })
/// ));
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct CouponIssuer {
    runner: TxnRunner,
    clock: Clock,
    facts: Arc<Mutex<HashMap<i64, CampaignFacts>>>,
    sold_out: Arc<Mutex<SoldOutMarks>>,
    /// How long a sold-out mark answers ([`with_sold_out_ttl`](Self::with_sold_out_ttl)).
    sold_out_ttl: Duration,
    /// Campaigns whose batches met users who already held the coupon.
    repeat_askers: Arc<Mutex<HashSet<i64>>>,
    /// How a combined batch waits for a stock row another process holds
    /// ([`with_stock_row_wait`](Self::with_stock_row_wait)).
    stock_row_wait: StockRowWait,
}

impl fmt::Debug for CouponIssuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CouponIssuer")
            .field("runner", &self.runner)
            .field("sold_out", &lock(&self.sold_out).marked)
            .finish_non_exhaustive()
    }
}

impl Default for CouponIssuer {
    fn default() -> Self {
        Self::with_policy(TxnPolicy::default())
    }
}

/// How often one call re-reads campaign facts that disagree with the database (each time the
/// issuer was used on another database in between) before it gives up.
pub(crate) const FACT_REFRESHES: u32 = 3;

/// Whether a coupon INSERT failed a foreign key: it names a template this database does not
/// have — the cached facts came from another database (one issuer on two). (A missing campaign
/// is found by the stock lock: no row.)
pub(crate) fn names_missing_row(error: &Error) -> bool {
    error.server_kind() == Some(crate::error::ServerErrorKind::ForeignKeyViolation)
}

pub(crate) fn stale_facts(campaign_id: i64) -> Error {
    Error::internal(format!(
        "the cached facts of campaign {campaign_id} kept disagreeing with its row"
    ))
}

/// Whether `error` is the marker error `marker` an attempt returned (an [`Error::Internal`]
/// with the same reason), not a failure of the runner after it: where the attempt's ROLLBACK
/// failed (the watchdog cut it, the connection was lost) the runner's answer is that failure,
/// and it is the call's answer — a flag the attempt set must not send the call round again.
pub(crate) fn is_marker(error: &Error, marker: &Error) -> bool {
    matches!((error, marker), (Error::Internal { reason }, Error::Internal { reason: expected })
        if reason == expected)
}

/// How a combined coupon batch waits for a campaign's stock row that another transaction — in
/// practice another process's batch — holds when the batch reaches it
/// ([`CouponIssuer::with_stock_row_wait`]). Either way the wait is bounded by the batch's wait
/// budget (8 ms, or a quarter of the time the batch has left), after which the batch's
/// transaction is rolled back and retried as after any refusal; outside a combiner's batch a
/// refusal always goes to the runner at once, and on MySQL (which cannot bound one statement's
/// lock wait) a batch always polls.
///
/// A coupon batch writes its coupons before it locks the stock row, so it holds their rows
/// (and, under SERIALIZABLE, the gaps its holders read locked) while it waits. No lockstock
/// transaction that holds a stock row ever waits for a lock, so such a wait can never close a
/// deadlock among lockstock's transactions, whatever runs beside it. Another program's
/// transaction can close one: one that locks the stock row and then writes (or, under
/// SERIALIZABLE, reads) a coupon row of a user the waiting batch is issuing to — the order of
/// the original design note's snippet. InnoDB then rolls one of the two back at once (error
/// 1213); where it chooses the other program's transaction, that program sees the deadlock.
///
/// ```
/// use lockstock::combine::{CombiningIssuer, MysqlPool};
/// use lockstock::{CouponIssuer, StockRowWait};
///
/// // Every process of the shop issues through its own combiner, and nothing else writes the
/// // campaigns' coupons: its batches wait for a stock row another process holds in the server.
/// fn hot_issuer(pool: MysqlPool) -> CombiningIssuer {
///     let issuer = CouponIssuer::new().with_stock_row_wait(StockRowWait::InServer);
///     CombiningIssuer::new(pool, issuer)
/// }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum StockRowWait {
    /// Poll the row with `FOR UPDATE NOWAIT`, 50 to 150 µs apart: the batch never waits for a
    /// lock while it holds rows, so it never takes part in a deadlock, with any program. The
    /// default.
    #[default]
    Poll,
    /// Wait for the row in the server (MariaDB: `SET STATEMENT max_statement_time = ... FOR
    /// SELECT ... FOR UPDATE`), which hands it over the moment its holder commits: faster
    /// between processes (on the 2-core machine of the README, 4 processes × 16 clients on one
    /// hot coupon reached 0.69–0.94 of one process with 64 clients in six runs, against
    /// 0.62–0.70 polling), for a deployment where only lockstock locks the campaigns' stock rows
    /// (see above).
    InServer,
}

/// How long an issuer's sold-out mark answers by default
/// ([`CouponIssuer::with_sold_out_ttl`]): a restock made elsewhere is seen within it.
pub const DEFAULT_SOLD_OUT_TTL: Duration = Duration::from_secs(1);

impl CouponIssuer {
    /// An issuer with the default policy (SERIALIZABLE, NOWAIT locks, bounded retries).
    pub fn new() -> Self {
        Self::default()
    }

    /// An issuer with `policy`.
    pub fn with_policy(policy: TxnPolicy) -> Self {
        Self {
            runner: TxnRunner::new(policy),
            clock: Arc::new(now),
            facts: Arc::default(),
            sold_out: Arc::default(),
            sold_out_ttl: DEFAULT_SOLD_OUT_TTL,
            repeat_askers: Arc::default(),
            stock_row_wait: StockRowWait::default(),
        }
    }

    /// The same issuer reading time from `clock` (UTC) instead of the system clock.
    #[must_use]
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The same issuer forgetting a sold-out campaign `ttl` after it saw it sold out (after the
    /// attempt that read the zero stock began, however long the call took after it): until
    /// then its calls for the campaign answer [`Error::SoldOut`] without a round trip; the
    /// first call after it reads the stock again. A restock by this issuer, or a read of the
    /// stock above zero ([`campaign`](Self::campaign), [`remaining`](Self::remaining)), clears
    /// the mark at once; a restock made elsewhere (another issuer, another process, SQL) is
    /// seen within `ttl`. The default is [`DEFAULT_SOLD_OUT_TTL`] (one second: a sold-out
    /// campaign costs each issuer one round trip a second). `Duration::MAX` keeps a mark for
    /// the issuer's life — only where no one else ever restocks: until this issuer restocks,
    /// another's restock is never seen, and its calls answer `SoldOut` while stock is left.
    ///
    /// A batch ([`issue_many`](Self::issue_many), a combined batch) is decided at one moment:
    /// a mark its sell-out sets answers its later requests if `ttl` is above zero, as it would
    /// answer single calls made within `ttl`; a TTL of zero never answers from a mark.
    #[must_use]
    pub fn with_sold_out_ttl(mut self, ttl: Duration) -> Self {
        self.sold_out_ttl = ttl;
        self
    }

    /// The same issuer with its combined batches waiting for a stock row another process holds
    /// as `wait` says (the default: [`StockRowWait::Poll`]). Every answer is the same either
    /// way; see [`StockRowWait`] for what each costs.
    #[must_use]
    pub fn with_stock_row_wait(mut self, wait: StockRowWait) -> Self {
        self.stock_row_wait = wait;
        self
    }

    /// How this issuer's transactions hold rows when they lock a campaign's stock row (what
    /// they may wait for: [`with_stock_row_wait`](Self::with_stock_row_wait)).
    pub(crate) fn stock_holding(&self) -> Holding {
        match self.stock_row_wait {
            StockRowWait::Poll => Holding::Locks,
            StockRowWait::InServer => Holding::LocksBeforeALeaf,
        }
    }

    /// The clock's time, at the microsecond precision of DATETIME(6) (what is returned is what
    /// is stored).
    fn now(&self) -> NaiveDateTime {
        to_micros((self.clock)())
    }

    /// The policy.
    pub fn policy(&self) -> &TxnPolicy {
        self.runner.policy()
    }

    /// The transaction runner (for batch and combining layers built on the issuer).
    pub fn runner(&self) -> &TxnRunner {
        &self.runner
    }
}
