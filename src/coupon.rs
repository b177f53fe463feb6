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
//! 2. `SELECT LAST_INSERT_ID()`, still outside the hot lock.
//! 3. `SELECT stock_quantity, coupon_id, issue_starts_at, issue_ends_at FROM fcfs_coupon WHERE
//!    id = ? FOR UPDATE NOWAIT` — the hot row, by primary key; an empty result is
//!    `CampaignNotFound`. The template and window read with it must equal the cached ones (else
//!    the cache is forgotten and the request runs again with fresh facts: no wrong `coupon_id`
//!    is ever committed); the window is checked once more at the time the lock is granted; zero
//!    stock is `SoldOut`. Any refusal rolls back, taking the inserted row with it.
//! 4. `UPDATE fcfs_coupon SET stock_quantity = ?` and `COMMIT`.
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

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use chrono::NaiveDateTime;
use diesel::mysql::MysqlConnection;
use diesel::prelude::*;
use rust_decimal::Decimal;

use crate::error::{Error, Result, ServerErrorKind};
use crate::schema::{coupon, fcfs_coupon, fcfs_coupon_restock, user_coupon};
use crate::statements::SetStock;
use crate::txn::{Deadline, InsertIds, TxnPolicy, TxnRunner};
use crate::util::{inserted_id, now, to_micros};
use crate::validate::{validate_amount, validate_id, validate_key};

/// Longest order reference, in bytes.
pub const MAX_ORDER_REF_BYTES: usize = 64;

/// What a coupon takes off an order.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discount {
    /// A fixed amount.
    Fixed(Decimal),
    /// A percentage (0 < percent <= 100), optionally capped at an amount.
    Percent {
        /// The percentage.
        percent: Decimal,
        /// The largest discount, if any.
        cap: Option<Decimal>,
    },
}

impl Discount {
    /// The discount on an order of `total`: never negative, never more than the total,
    /// percentages rounded down to 4 decimal places and capped. Never panics: a discount built
    /// by hand with values [`create_coupon`](CouponIssuer::create_coupon) would refuse is
    /// clamped (a percentage to 0..=100, an amount or cap to 0..=total).
    pub fn apply_to(&self, total: Decimal) -> Decimal {
        let total = total.max(Decimal::ZERO);
        let raw = match *self {
            Self::Fixed(amount) => amount,
            Self::Percent { percent, cap } => {
                let percent = percent.clamp(Decimal::ZERO, Decimal::ONE_HUNDRED);
                // total * percent overflows for totals near Decimal::MAX; dividing first cannot
                // (percent <= 100 keeps the product <= total), at the cost of digits that large
                // totals do not have anyway.
                let off = total
                    .checked_mul(percent)
                    .and_then(|product| product.checked_div(Decimal::ONE_HUNDRED))
                    .or_else(|| (total / Decimal::ONE_HUNDRED).checked_mul(percent))
                    .unwrap_or(total)
                    .round_dp_with_strategy(4, rust_decimal::RoundingStrategy::ToZero);
                cap.map_or(off, |cap| off.min(cap))
            }
        };
        raw.clamp(Decimal::ZERO, total)
    }

    fn validate(&self) -> Result<()> {
        match *self {
            Self::Fixed(amount) => validate_amount(amount),
            Self::Percent { percent, cap } => {
                if percent <= Decimal::ZERO
                    || percent > Decimal::ONE_HUNDRED
                    || percent.normalize().scale() > 4
                {
                    return Err(Error::InvalidInput {
                        field: "percent",
                        problem: "must be greater than 0 and at most 100, with at most 4 decimals",
                    });
                }
                cap.map_or(Ok(()), validate_amount)
            }
        }
    }

    fn columns(&self) -> (&'static str, Decimal, Option<Decimal>) {
        match *self {
            Self::Fixed(amount) => ("fixed", amount, None),
            Self::Percent { percent, cap } => ("percent", percent, cap),
        }
    }
}

/// A new coupon template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewCoupon<'a> {
    /// Display name (1 to 255 characters).
    pub name: &'a str,
    /// What it is worth.
    pub discount: Discount,
    /// Usable from (UTC, inclusive).
    pub valid_from: NaiveDateTime,
    /// Usable until (UTC, exclusive).
    pub valid_until: NaiveDateTime,
}

/// A coupon template.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Coupon {
    /// Its id.
    pub id: i64,
    /// Display name.
    pub name: String,
    /// What it is worth.
    pub discount: Discount,
    /// Usable from (UTC, inclusive).
    pub valid_from: NaiveDateTime,
    /// Usable until (UTC, exclusive).
    pub valid_until: NaiveDateTime,
}

/// A new first-come-first-served campaign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewCampaign {
    /// The coupon template it hands out.
    pub coupon_id: i64,
    /// How many coupons (1 to 2^31 - 1).
    pub quantity: u32,
    /// Issuing opens (UTC, inclusive).
    pub issue_starts_at: NaiveDateTime,
    /// Issuing closes (UTC, exclusive).
    pub issue_ends_at: NaiveDateTime,
}

/// A campaign and its stock.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = fcfs_coupon, check_for_backend(diesel::mysql::Mysql))]
pub struct Campaign {
    /// Its id.
    pub id: i64,
    /// The coupon template it hands out.
    pub coupon_id: i64,
    /// Coupons in all, restocks included.
    pub total_quantity: i32,
    /// Coupons left.
    pub stock_quantity: i32,
    /// Issuing opens (UTC, inclusive).
    pub issue_starts_at: NaiveDateTime,
    /// Issuing closes (UTC, exclusive).
    pub issue_ends_at: NaiveDateTime,
}

/// State of an issued coupon.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CouponStatus {
    /// Held, not used.
    Issued,
    /// Redeemed on an order.
    Used,
}

impl CouponStatus {
    fn as_str(self) -> &'static str {
        match self {
            Self::Issued => "issued",
            Self::Used => "used",
        }
    }
}

/// A coupon a user holds.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCoupon {
    /// Its id.
    pub id: i64,
    /// The holder.
    pub user_id: i64,
    /// The coupon template.
    pub coupon_id: i64,
    /// The campaign it came from.
    pub campaign_id: i64,
    /// Held or used.
    pub status: CouponStatus,
    /// When it was issued (UTC).
    pub issued_at: NaiveDateTime,
    /// When it was redeemed (UTC).
    pub used_at: Option<NaiveDateTime>,
    /// The order it was redeemed on.
    pub order_ref: Option<String>,
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = user_coupon, check_for_backend(diesel::mysql::Mysql))]
struct UserCouponRow {
    id: i64,
    user_id: i64,
    coupon_id: i64,
    fcfs_coupon_id: i64,
    status: String,
    issued_at: NaiveDateTime,
    used_at: Option<NaiveDateTime>,
    order_ref: Option<String>,
}

impl UserCouponRow {
    fn into_coupon(self) -> Result<IssuedCoupon> {
        let status = match self.status.as_str() {
            "issued" => CouponStatus::Issued,
            "used" => CouponStatus::Used,
            other => {
                return Err(Error::from(diesel::result::Error::DeserializationError(
                    format!("unknown coupon status {other:?}").into(),
                )))
            }
        };
        Ok(IssuedCoupon {
            id: self.id,
            user_id: self.user_id,
            coupon_id: self.coupon_id,
            campaign_id: self.fcfs_coupon_id,
            status,
            issued_at: self.issued_at,
            used_at: self.used_at,
            order_ref: self.order_ref,
        })
    }
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = coupon, check_for_backend(diesel::mysql::Mysql))]
struct CouponRow {
    id: i64,
    name: String,
    discount_kind: String,
    discount_value: Decimal,
    max_discount: Option<Decimal>,
    valid_from: NaiveDateTime,
    valid_until: NaiveDateTime,
}

impl CouponRow {
    fn into_coupon(self) -> Coupon {
        let discount = if self.discount_kind == "percent" {
            Discount::Percent {
                percent: self.discount_value,
                cap: self.max_discount,
            }
        } else {
            Discount::Fixed(self.discount_value)
        };
        Coupon {
            id: self.id,
            name: self.name,
            discount,
            valid_from: self.valid_from,
            valid_until: self.valid_until,
        }
    }
}

/// What never changes about a campaign, cached per issuer and checked against the campaign row
/// whenever the row is locked or read after a duplicate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CampaignFacts {
    coupon_id: i64,
    issue_starts_at: NaiveDateTime,
    issue_ends_at: NaiveDateTime,
}

impl CampaignFacts {
    const COLUMNS: (
        fcfs_coupon::coupon_id,
        fcfs_coupon::issue_starts_at,
        fcfs_coupon::issue_ends_at,
    ) = (
        fcfs_coupon::coupon_id,
        fcfs_coupon::issue_starts_at,
        fcfs_coupon::issue_ends_at,
    );

    fn from_row(
        (coupon_id, issue_starts_at, issue_ends_at): (i64, NaiveDateTime, NaiveDateTime),
    ) -> Self {
        Self {
            coupon_id,
            issue_starts_at,
            issue_ends_at,
        }
    }
}

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
/// sold-out marks may answer [`Error::SoldOut`] for the other database's campaigns.
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
    sold_out_ttl: Option<Duration>,
    /// Campaigns whose batches met users who already held the coupon.
    repeat_askers: Arc<Mutex<HashSet<i64>>>,
}

/// The sold-out marks of an issuer.
#[derive(Debug, Default)]
struct SoldOutMarks {
    /// Campaigns seen sold out, and when.
    marked: HashMap<i64, Instant>,
    /// Per campaign, how often its stock was seen (or put) above zero. A zero read before the
    /// latest such sighting is stale and must not be marked after it.
    sightings: HashMap<i64, u64>,
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

/// Caches hold plain data, so a panic elsewhere cannot leave them half-updated.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How often one call re-reads campaign facts that disagree with the database (each time the
/// issuer was used on another database in between) before it gives up.
const FACT_REFRESHES: u32 = 3;

fn stale_facts(campaign_id: i64) -> Error {
    Error::internal(format!(
        "the cached facts of campaign {campaign_id} kept disagreeing with its row"
    ))
}

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
            sold_out_ttl: None,
            repeat_askers: Arc::default(),
        }
    }

    /// The same issuer reading time from `clock` (UTC) instead of the system clock.
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The same issuer forgetting a sold-out campaign `ttl` after it saw it sold out. Without a
    /// TTL (the default) the mark stays until this issuer restocks the campaign or reads its
    /// stock above zero ([`campaign`](Self::campaign), [`remaining`](Self::remaining)); with
    /// several issuers or processes, a restock made elsewhere is then seen within `ttl`.
    pub fn with_sold_out_ttl(mut self, ttl: Duration) -> Self {
        self.sold_out_ttl = Some(ttl);
        self
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

    /// Creates a coupon template.
    pub fn create_coupon(&self, conn: &mut MysqlConnection, new: &NewCoupon<'_>) -> Result<Coupon> {
        let name_chars = new.name.chars().count();
        if new.name.trim().is_empty() || name_chars > 255 {
            return Err(Error::InvalidInput {
                field: "name",
                problem: "must be 1 to 255 characters and not blank",
            });
        }
        new.discount.validate()?;
        if new.valid_from >= new.valid_until {
            return Err(Error::InvalidInput {
                field: "valid_until",
                problem: "must be after valid_from",
            });
        }
        let (kind, value, cap) = new.discount.columns();
        let deadline = self.runner.deadline();
        let id = self.runner.run_by(conn, deadline, |conn| {
            diesel::insert_into(coupon::table)
                .values((
                    coupon::name.eq(new.name),
                    coupon::discount_kind.eq(kind),
                    coupon::discount_value.eq(value),
                    coupon::max_discount.eq(cap),
                    coupon::valid_from.eq(new.valid_from),
                    coupon::valid_until.eq(new.valid_until),
                ))
                .execute(conn)?;
            inserted_id(conn)
        })?;
        Ok(Coupon {
            id,
            name: new.name.to_owned(),
            discount: new.discount,
            valid_from: to_micros(new.valid_from),
            valid_until: to_micros(new.valid_until),
        })
    }

    /// The coupon template `coupon_id`.
    pub fn coupon(&self, conn: &mut MysqlConnection, coupon_id: i64) -> Result<Coupon> {
        validate_id("coupon", coupon_id)?;
        self.coupon_by(conn, coupon_id, self.runner.deadline())
    }

    fn coupon_by(
        &self,
        conn: &mut MysqlConnection,
        coupon_id: i64,
        deadline: Deadline,
    ) -> Result<Coupon> {
        self.runner
            .read_by(conn, deadline, |conn| {
                Ok(coupon::table
                    .find(coupon_id)
                    .select(CouponRow::as_select())
                    .first(conn)
                    .optional()?)
            })?
            .map(CouponRow::into_coupon)
            .ok_or(Error::CouponNotFound { coupon_id })
    }

    /// Creates a campaign of `quantity` coupons of a template.
    pub fn create_campaign(
        &self,
        conn: &mut MysqlConnection,
        new: &NewCampaign,
    ) -> Result<Campaign> {
        validate_id("coupon", new.coupon_id)?;
        let quantity = positive_quantity(new.quantity)?;
        if new.issue_starts_at >= new.issue_ends_at {
            return Err(Error::InvalidInput {
                field: "issue_ends_at",
                problem: "must be after issue_starts_at",
            });
        }
        let deadline = self.runner.deadline();
        let template = self.coupon_by(conn, new.coupon_id, deadline)?;
        if new.issue_starts_at >= template.valid_until {
            return Err(Error::InvalidInput {
                field: "issue_starts_at",
                problem: "must be before the coupon's valid_until",
            });
        }
        let id = self.runner.run_by(conn, deadline, |conn| {
            diesel::insert_into(fcfs_coupon::table)
                .values((
                    fcfs_coupon::coupon_id.eq(new.coupon_id),
                    fcfs_coupon::total_quantity.eq(quantity),
                    fcfs_coupon::stock_quantity.eq(quantity),
                    fcfs_coupon::issue_starts_at.eq(new.issue_starts_at),
                    fcfs_coupon::issue_ends_at.eq(new.issue_ends_at),
                ))
                .execute(conn)?;
            inserted_id(conn)
        })?;
        Ok(Campaign {
            id,
            coupon_id: new.coupon_id,
            total_quantity: quantity,
            stock_quantity: quantity,
            issue_starts_at: to_micros(new.issue_starts_at),
            issue_ends_at: to_micros(new.issue_ends_at),
        })
    }

    /// The campaign `campaign_id` with its current stock. Seeing the stock at zero sets this
    /// issuer's sold-out mark of the campaign, seeing it above zero clears the mark.
    pub fn campaign(&self, conn: &mut MysqlConnection, campaign_id: i64) -> Result<Campaign> {
        validate_id("campaign", campaign_id)?;
        let deadline = self.runner.deadline();
        let seen = self.sightings(campaign_id);
        let campaign = self.read_campaign(conn, campaign_id, deadline)?;
        self.cache_facts(&campaign);
        if campaign.stock_quantity > 0 {
            self.saw_stock(campaign_id);
        } else {
            self.mark_sold_out(campaign_id, seen);
        }
        Ok(campaign)
    }

    /// Coupons left in a campaign (read as [`campaign`](Self::campaign) reads it).
    pub fn remaining(&self, conn: &mut MysqlConnection, campaign_id: i64) -> Result<u32> {
        let campaign = self.campaign(conn, campaign_id)?;
        Ok(u32::try_from(campaign.stock_quantity).unwrap_or(0))
    }

    /// Issues one coupon of `campaign_id` to `user_id`: [`Error::SoldOut`], [`Error::AlreadyIssued`],
    /// [`Error::NotStarted`], [`Error::Ended`], [`Error::CampaignNotFound`] or
    /// [`Error::Contended`] otherwise.
    ///
    /// The window is checked at the time of the attempt that commits (a refused and retried
    /// attempt reads the clock again), and `issued_at` is that attempt's time.
    ///
    /// Once this issuer has seen the campaign sold out it answers [`Error::SoldOut`] from memory,
    /// also to a user who already holds the coupon ([`user_coupons`](Self::user_coupons)
    /// tells); while it has not, a holder gets [`Error::AlreadyIssued`] even at zero stock.
    pub fn issue(
        &self,
        conn: &mut MysqlConnection,
        user_id: i64,
        campaign_id: i64,
    ) -> Result<IssuedCoupon> {
        self.issue_by(conn, user_id, campaign_id, self.runner.deadline())
    }

    /// [`issue`](Self::issue), bounded by the caller's `deadline` (a combiner passes the
    /// deadline its caller started with).
    pub(crate) fn issue_by(
        &self,
        conn: &mut MysqlConnection,
        user_id: i64,
        campaign_id: i64,
        deadline: Deadline,
    ) -> Result<IssuedCoupon> {
        validate_id("user", user_id)?;
        validate_id("campaign", campaign_id)?;
        if self.known_sold_out(campaign_id) {
            return Err(Error::SoldOut { campaign_id });
        }
        let mut refreshes = 0;
        loop {
            let facts = self.facts_by(conn, campaign_id, deadline)?;
            // A closed window is refused without a round trip.
            check_window(campaign_id, &facts, self.now())?;
            // Read before the stock is: a zero read after a newer sighting is not marked.
            let seen = self.sightings(campaign_id);
            let mut stale = false;
            let mut stock_seen = false;
            let result = self.runner.run_by(conn, deadline, |conn| {
                // This attempt's time: the window is checked at it, and it is the issue time.
                let at = self.now();
                check_window(campaign_id, &facts, at)?;
                diesel::insert_into(user_coupon::table)
                    .values((
                        user_coupon::user_id.eq(user_id),
                        user_coupon::coupon_id.eq(facts.coupon_id),
                        user_coupon::fcfs_coupon_id.eq(campaign_id),
                        user_coupon::status.eq(CouponStatus::Issued.as_str()),
                        user_coupon::issued_at.eq(at),
                    ))
                    .execute(conn)?;
                let id = inserted_id(conn)?;
                // The hot row: locked from here to COMMIT for one UPDATE.
                let (stock, current) = lock_stock(conn, campaign_id)?
                    .ok_or(Error::CampaignNotFound { campaign_id })?;
                if current != facts {
                    stale = true;
                    return Err(stale_facts(campaign_id));
                }
                // Once the row is ours this attempt commits (or fails) at once: the window must
                // still be open now.
                check_window(campaign_id, &current, self.now())?;
                if stock <= 0 {
                    return Err(Error::SoldOut { campaign_id });
                }
                stock_seen = true;
                SetStock {
                    campaign_id,
                    stock: stock - 1,
                }
                .execute(conn)?;
                Ok(IssuedCoupon {
                    id,
                    user_id,
                    coupon_id: facts.coupon_id,
                    campaign_id,
                    status: CouponStatus::Issued,
                    issued_at: at,
                    used_at: None,
                    order_ref: None,
                })
            });
            if stale && refreshes < FACT_REFRESHES {
                self.forget_facts(campaign_id);
                refreshes += 1;
                continue;
            }
            return match result {
                Err(Error::SoldOut { .. }) => {
                    self.mark_sold_out(campaign_id, seen);
                    Err(Error::SoldOut { campaign_id })
                }
                Err(e) if e.server_kind() == Some(ServerErrorKind::DuplicateKey) => {
                    match self.already_issued(conn, user_id, campaign_id, &facts, deadline) {
                        Ok(Some(refusal)) => Err(refusal),
                        // The template is not the cached one: another database.
                        Ok(None) if refreshes < FACT_REFRESHES => {
                            self.forget_facts(campaign_id);
                            refreshes += 1;
                            continue;
                        }
                        Ok(None) => Err(stale_facts(campaign_id)),
                        // A connection lost during the lookup is reported as such (retryable; a
                        // retry answers AlreadyIssued), not as an untyped duplicate-key error.
                        Err(lookup) if lookup.is_retryable() => Err(lookup),
                        Err(_) => Err(e),
                    }
                }
                other => {
                    if stock_seen {
                        self.saw_stock(campaign_id);
                    }
                    other
                }
            };
        }
    }

    /// Adds `additional` coupons to a campaign's stock and total, once per idempotency `key`
    /// (1 to 64 bytes, per campaign), and clears this issuer's sold-out mark of the campaign.
    ///
    /// Safe to retry: the same `key` with the same `additional` returns the campaign as that
    /// restock left it, without adding again; with a different `additional` it is refused with
    /// [`Error::RestockConflict`]. The sold-out mark is cleared before the restock runs and again
    /// after it, whatever its outcome — a restock that committed although the call failed
    /// ([`Error::OutcomeUnknown`]) leaves no mark behind.
    pub fn restock(
        &self,
        conn: &mut MysqlConnection,
        campaign_id: i64,
        additional: u32,
        key: &str,
    ) -> Result<Campaign> {
        validate_id("campaign", campaign_id)?;
        let additional = positive_quantity(additional)?;
        validate_key(key)?;
        let deadline = self.runner.deadline();
        self.saw_stock(campaign_id);
        let result = self.restock_by(conn, campaign_id, additional, key, deadline);
        // Also after: an issue that read zero before the restock committed must not mark it.
        self.saw_stock(campaign_id);
        result
    }

    fn restock_by(
        &self,
        conn: &mut MysqlConnection,
        campaign_id: i64,
        additional: i32,
        key: &str,
        deadline: Deadline,
    ) -> Result<Campaign> {
        let applied = self.runner.run_by(conn, deadline, |conn| {
            let mut campaign: Campaign = fcfs_coupon::table
                .find(campaign_id)
                .select(Campaign::as_select())
                .for_update()
                .no_wait()
                .first(conn)
                .optional()?
                .ok_or(Error::CampaignNotFound { campaign_id })?;
            let (Some(total), Some(stock)) = (
                campaign.total_quantity.checked_add(additional),
                campaign.stock_quantity.checked_add(additional),
            ) else {
                return Err(Error::InvalidInput {
                    field: "additional",
                    problem: "would take the campaign's total past 2^31 - 1",
                });
            };
            // UNIQUE(fcfs_coupon_id, idempotency_key) refuses a key used before.
            diesel::insert_into(fcfs_coupon_restock::table)
                .values((
                    fcfs_coupon_restock::fcfs_coupon_id.eq(campaign_id),
                    fcfs_coupon_restock::idempotency_key.eq(key),
                    fcfs_coupon_restock::additional.eq(additional),
                    fcfs_coupon_restock::total_after.eq(total),
                    fcfs_coupon_restock::stock_after.eq(stock),
                ))
                .execute(conn)?;
            diesel::update(fcfs_coupon::table.find(campaign_id))
                .set((
                    fcfs_coupon::total_quantity.eq(total),
                    fcfs_coupon::stock_quantity.eq(stock),
                ))
                .execute(conn)?;
            campaign.total_quantity = total;
            campaign.stock_quantity = stock;
            Ok(campaign)
        });
        match applied {
            // A key used before decides the answer, whatever the stock is now.
            Err(e)
                if matches!(
                    e,
                    Error::InvalidInput {
                        field: "additional",
                        ..
                    }
                ) || e.server_kind() == Some(ServerErrorKind::DuplicateKey) =>
            {
                match self.recorded_restock(conn, campaign_id, additional, key, deadline)? {
                    Some(campaign) => Ok(campaign),
                    None => Err(e),
                }
            }
            other => other,
        }
    }

    /// The campaign as the restock recorded under `key` left it; a different restock under the
    /// key is an [`Error::RestockConflict`].
    fn recorded_restock(
        &self,
        conn: &mut MysqlConnection,
        campaign_id: i64,
        additional: i32,
        key: &str,
        deadline: Deadline,
    ) -> Result<Option<Campaign>> {
        let recorded = self.runner.read_by(conn, deadline, |conn| {
            let restock: Option<(i32, i32, i32)> = fcfs_coupon_restock::table
                .filter(fcfs_coupon_restock::fcfs_coupon_id.eq(campaign_id))
                .filter(fcfs_coupon_restock::idempotency_key.eq(key))
                .select((
                    fcfs_coupon_restock::additional,
                    fcfs_coupon_restock::total_after,
                    fcfs_coupon_restock::stock_after,
                ))
                .first(conn)
                .optional()?;
            let Some(restock) = restock else {
                return Ok(None);
            };
            let campaign: Campaign = fcfs_coupon::table
                .find(campaign_id)
                .select(Campaign::as_select())
                .first(conn)?;
            Ok(Some((restock, campaign)))
        })?;
        let Some(((recorded, total, stock), mut campaign)) = recorded else {
            return Ok(None);
        };
        if recorded != additional {
            return Err(Error::RestockConflict {
                campaign_id,
                key: key.to_owned(),
                recorded_additional: u32::try_from(recorded).unwrap_or(0),
            });
        }
        campaign.total_quantity = total;
        campaign.stock_quantity = stock;
        Ok(Some(campaign))
    }

    /// Marks a held coupon used on order `order_ref` (1 to 64 bytes). Exactly one of concurrent
    /// redeems wins; the others get [`Error::AlreadyRedeemed`].
    ///
    /// Safe to retry (after [`Error::OutcomeUnknown`], say): a coupon already redeemed by the
    /// same `order_ref` is returned as it is, unchanged, whatever the time now.
    pub fn redeem(
        &self,
        conn: &mut MysqlConnection,
        user_coupon_id: i64,
        order_ref: &str,
    ) -> Result<IssuedCoupon> {
        validate_id("user coupon", user_coupon_id)?;
        validate_order_ref(order_ref)?;
        let deadline = self.runner.deadline();
        self.runner.run_by(conn, deadline, |conn| {
            let at = self.now();
            let mut held = lock_user_coupon(conn, user_coupon_id)?;
            if held.status == CouponStatus::Used {
                return if held.order_ref.as_deref() == Some(order_ref) {
                    Ok(held)
                } else {
                    Err(Error::AlreadyRedeemed { user_coupon_id })
                };
            }
            check_validity(conn, &held, at)?;
            diesel::update(user_coupon::table.find(user_coupon_id))
                .set((
                    user_coupon::status.eq(CouponStatus::Used.as_str()),
                    user_coupon::used_at.eq(Some(at)),
                    user_coupon::order_ref.eq(Some(order_ref)),
                ))
                .execute(conn)?;
            held.status = CouponStatus::Used;
            held.used_at = Some(at);
            held.order_ref = Some(order_ref.to_owned());
            Ok(held)
        })
    }

    /// Gives a coupon redeemed on order `order_ref` back to its holder (the order was
    /// cancelled), if the coupon is still within its validity window; otherwise
    /// [`Error::CouponNotValid`].
    ///
    /// Only the order that holds the coupon can give it back: a coupon redeemed by another order
    /// is refused with [`Error::RedeemedByAnotherOrder`], one not redeemed with
    /// [`Error::NotRedeemed`]. So a repeated cancel — or a retry after [`Error::OutcomeUnknown`]
    /// whose first attempt did restore the coupon — never frees a later order's redemption: it
    /// answers `NotRedeemed` (or `RedeemedByAnotherOrder` once another order used the coupon),
    /// both meaning "this order does not hold the coupon (any more)", with nothing written.
    pub fn restore(
        &self,
        conn: &mut MysqlConnection,
        user_coupon_id: i64,
        order_ref: &str,
    ) -> Result<IssuedCoupon> {
        validate_id("user coupon", user_coupon_id)?;
        validate_order_ref(order_ref)?;
        let deadline = self.runner.deadline();
        self.runner.run_by(conn, deadline, |conn| {
            let at = self.now();
            let mut held = lock_user_coupon(conn, user_coupon_id)?;
            if held.status != CouponStatus::Used {
                return Err(Error::NotRedeemed { user_coupon_id });
            }
            if held.order_ref.as_deref() != Some(order_ref) {
                return Err(Error::RedeemedByAnotherOrder {
                    user_coupon_id,
                    order_ref: order_ref.to_owned(),
                });
            }
            check_validity(conn, &held, at)?;
            diesel::update(user_coupon::table.find(user_coupon_id))
                .set((
                    user_coupon::status.eq(CouponStatus::Issued.as_str()),
                    user_coupon::used_at.eq(None::<NaiveDateTime>),
                    user_coupon::order_ref.eq(None::<String>),
                ))
                .execute(conn)?;
            held.status = CouponStatus::Issued;
            held.used_at = None;
            held.order_ref = None;
            Ok(held)
        })
    }

    /// The coupons `user_id` holds, oldest first.
    pub fn user_coupons(
        &self,
        conn: &mut MysqlConnection,
        user_id: i64,
    ) -> Result<Vec<IssuedCoupon>> {
        validate_id("user", user_id)?;
        let deadline = self.runner.deadline();
        let rows: Vec<UserCouponRow> = self.runner.read_by(conn, deadline, |conn| {
            Ok(user_coupon::table
                .filter(user_coupon::user_id.eq(user_id))
                .order(user_coupon::id.asc())
                .select(UserCouponRow::as_select())
                .load(conn)?)
        })?;
        rows.into_iter().map(UserCouponRow::into_coupon).collect()
    }

    fn read_campaign(
        &self,
        conn: &mut MysqlConnection,
        campaign_id: i64,
        deadline: Deadline,
    ) -> Result<Campaign> {
        self.runner
            .read_by(conn, deadline, |conn| {
                Ok(fcfs_coupon::table
                    .find(campaign_id)
                    .select(Campaign::as_select())
                    .first(conn)
                    .optional()?)
            })?
            .ok_or(Error::CampaignNotFound { campaign_id })
    }

    /// The campaign's facts, from the cache or read (a read that sees stock clears the mark).
    fn facts_by(
        &self,
        conn: &mut MysqlConnection,
        campaign_id: i64,
        deadline: Deadline,
    ) -> Result<CampaignFacts> {
        if let Some(facts) = lock(&self.facts).get(&campaign_id) {
            return Ok(*facts);
        }
        let campaign = self.read_campaign(conn, campaign_id, deadline)?;
        if campaign.stock_quantity > 0 {
            self.saw_stock(campaign_id);
        }
        Ok(self.cache_facts(&campaign))
    }

    fn cache_facts(&self, campaign: &Campaign) -> CampaignFacts {
        let facts = CampaignFacts {
            coupon_id: campaign.coupon_id,
            issue_starts_at: campaign.issue_starts_at,
            issue_ends_at: campaign.issue_ends_at,
        };
        lock(&self.facts).insert(campaign.id, facts);
        facts
    }

    fn forget_facts(&self, campaign_id: i64) {
        lock(&self.facts).remove(&campaign_id);
    }

    /// How often this issuer has seen the campaign's stock above zero; read before reading a
    /// stock that may be zero, and passed to [`mark_sold_out`](Self::mark_sold_out).
    fn sightings(&self, campaign_id: i64) -> u64 {
        lock(&self.sold_out)
            .sightings
            .get(&campaign_id)
            .copied()
            .unwrap_or(0)
    }

    /// The campaign's stock was seen (or put) above zero: clears its sold-out mark, and keeps
    /// zeros read before from setting it again.
    fn saw_stock(&self, campaign_id: i64) {
        let mut marks = lock(&self.sold_out);
        marks.marked.remove(&campaign_id);
        let sightings = marks.sightings.entry(campaign_id).or_default();
        *sightings = sightings.wrapping_add(1);
    }

    /// Marks a campaign sold out, unless its stock was seen above zero since `seen` (the count
    /// of [`sightings`](Self::sightings) read before the zero was): that zero may be stale.
    fn mark_sold_out(&self, campaign_id: i64, seen: u64) {
        let mut marks = lock(&self.sold_out);
        if marks.sightings.get(&campaign_id).copied().unwrap_or(0) == seen {
            marks.marked.insert(campaign_id, Instant::now());
        }
    }

    /// Whether this issuer saw the campaign sold out (within the TTL, if one is set).
    fn known_sold_out(&self, campaign_id: i64) -> bool {
        let mut marks = lock(&self.sold_out);
        match (marks.marked.get(&campaign_id), self.sold_out_ttl) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(seen), Some(ttl)) if seen.elapsed() < ttl => true,
            (Some(_), Some(_)) => {
                marks.marked.remove(&campaign_id);
                false
            }
        }
    }

    /// After a duplicate-key refusal: the coupon `user_id` holds, read in one snapshot with the
    /// campaign row. `None` if the row does not match the cached `facts` (the issuer was used
    /// on another database; see [`CouponIssuer`]).
    fn already_issued(
        &self,
        conn: &mut MysqlConnection,
        user_id: i64,
        campaign_id: i64,
        facts: &CampaignFacts,
        deadline: Deadline,
    ) -> Result<Option<Error>> {
        let coupon_id = facts.coupon_id;
        let held: Option<i64> = self.runner.read_by(conn, deadline, |conn| {
            let current = fcfs_coupon::table
                .find(campaign_id)
                .select(CampaignFacts::COLUMNS)
                .first::<(i64, NaiveDateTime, NaiveDateTime)>(conn)
                .optional()?
                .map(CampaignFacts::from_row);
            if current.as_ref() != Some(facts) {
                return Ok(None);
            }
            Ok(user_coupon::table
                .filter(user_coupon::user_id.eq(user_id))
                .filter(user_coupon::coupon_id.eq(coupon_id))
                .select(user_coupon::id)
                .first(conn)
                .optional()?)
        })?;
        Ok(held.map(|user_coupon_id| Error::AlreadyIssued {
            user_id,
            coupon_id,
            user_coupon_id,
        }))
    }
}

fn validate_order_ref(order_ref: &str) -> Result<()> {
    if order_ref.is_empty() || order_ref.len() > MAX_ORDER_REF_BYTES {
        return Err(Error::InvalidInput {
            field: "order_ref",
            problem: "must be 1 to 64 bytes",
        });
    }
    Ok(())
}

fn positive_quantity(quantity: u32) -> Result<i32> {
    i32::try_from(quantity)
        .ok()
        .filter(|q| *q > 0)
        .ok_or(Error::InvalidInput {
            field: "quantity",
            problem: "must be between 1 and 2^31 - 1",
        })
}

fn check_window(campaign_id: i64, facts: &CampaignFacts, at: NaiveDateTime) -> Result<()> {
    if at < facts.issue_starts_at {
        Err(Error::NotStarted {
            campaign_id,
            starts_at: facts.issue_starts_at,
        })
    } else if at >= facts.issue_ends_at {
        Err(Error::Ended {
            campaign_id,
            ended_at: facts.issue_ends_at,
        })
    } else {
        Ok(())
    }
}

fn lock_user_coupon(conn: &mut MysqlConnection, user_coupon_id: i64) -> Result<IssuedCoupon> {
    user_coupon::table
        .find(user_coupon_id)
        .select(UserCouponRow::as_select())
        .for_update()
        .no_wait()
        .first::<UserCouponRow>(conn)
        .optional()?
        .ok_or(Error::UserCouponNotFound { user_coupon_id })?
        .into_coupon()
}

/// The hot row, `FOR UPDATE NOWAIT` through the primary key: its stock, and in the same read (no
/// extra round trip) the facts the cached ones are checked against.
fn lock_stock(
    conn: &mut MysqlConnection,
    campaign_id: i64,
) -> Result<Option<(i32, CampaignFacts)>> {
    let row: Option<(i32, (i64, NaiveDateTime, NaiveDateTime))> = fcfs_coupon::table
        .find(campaign_id)
        .select((fcfs_coupon::stock_quantity, CampaignFacts::COLUMNS))
        .for_update()
        .no_wait()
        .first(conn)
        .optional()?;
    Ok(row.map(|(stock, facts)| (stock, CampaignFacts::from_row(facts))))
}

fn check_validity(
    conn: &mut MysqlConnection,
    held: &IssuedCoupon,
    at: NaiveDateTime,
) -> Result<()> {
    let (valid_from, valid_until): (NaiveDateTime, NaiveDateTime) = coupon::table
        .find(held.coupon_id)
        .select((coupon::valid_from, coupon::valid_until))
        .first(conn)?;
    if at < valid_from || at >= valid_until {
        return Err(Error::CouponNotValid {
            user_coupon_id: held.id,
            valid_from,
            valid_until,
        });
    }
    Ok(())
}

impl CouponIssuer {
    /// Issues one coupon of `campaign_id` to each of `user_ids` in one transaction, first come
    /// first served in the given order.
    ///
    /// Each request gets exactly the answer the single [`issue`](Self::issue) calls, made one
    /// after another in the given order by this issuer, would have got: an invalid user id
    /// [`Error::InvalidId`]; a holder — from before or earlier in the batch —
    /// [`Error::AlreadyIssued`]; when the stock runs out the first request refused gets
    /// [`Error::SoldOut`], and since that sets this issuer's sold-out mark, every later request
    /// in the batch is answered `SoldOut` too, holders included — as `issue` answers from the
    /// mark. All requests of a batch are decided at the time the stock row is locked.
    ///
    /// Inside the transaction: one lock-free-for-the-hot-row read of which users already hold
    /// the coupon (only for campaigns where that is needed, see below), then the stock row
    /// `FOR UPDATE NOWAIT` (with the facts the cached ones are checked against), one multi-row
    /// INSERT, one id lookup, one UPDATE, COMMIT — the hot row is held for four statements
    /// whatever the batch size. The holders are read on campaigns where a batch has met one
    /// (a duplicate, nothing written, makes the batch run again with the read), and when a
    /// request would be refused `SoldOut` without knowing whether it holds the coupon (the
    /// batch runs again with the read: a holder is answered `AlreadyIssued`).
    ///
    /// The outer `Err` is a failure of the whole transaction: then no request was applied (or,
    /// for [`Error::OutcomeUnknown`], all or none were).
    pub fn issue_many(
        &self,
        conn: &mut MysqlConnection,
        campaign_id: i64,
        user_ids: &[i64],
    ) -> Result<Vec<Result<IssuedCoupon>>> {
        self.issue_many_by(conn, campaign_id, user_ids, self.runner.deadline())
    }

    /// [`issue_many`](Self::issue_many), bounded by the caller's `deadline`.
    pub(crate) fn issue_many_by(
        &self,
        conn: &mut MysqlConnection,
        campaign_id: i64,
        user_ids: &[i64],
        deadline: Deadline,
    ) -> Result<Vec<Result<IssuedCoupon>>> {
        // A refusal of the whole campaign: `issue` checks the user id before anything else.
        let everyone = |refusal: &dyn Fn() -> Error| -> Vec<Result<IssuedCoupon>> {
            user_ids
                .iter()
                .map(|&user_id| validate_id("user", user_id).and_then(|()| Err(refusal())))
                .collect()
        };
        if user_ids.iter().all(|&user_id| user_id <= 0) {
            return Ok(user_ids
                .iter()
                .map(|&id| Err(Error::InvalidId { what: "user", id }))
                .collect());
        }
        if let Err(Error::InvalidId { what, id }) = validate_id("campaign", campaign_id) {
            return Ok(everyone(&|| Error::InvalidId { what, id }));
        }
        if self.known_sold_out(campaign_id) {
            return Ok(everyone(&|| Error::SoldOut { campaign_id }));
        }
        let closed = |refusal: Error| match refusal {
            Error::NotStarted { starts_at, .. } => Ok(everyone(&|| Error::NotStarted {
                campaign_id,
                starts_at,
            })),
            Error::Ended { ended_at, .. } => Ok(everyone(&|| Error::Ended {
                campaign_id,
                ended_at,
            })),
            Error::CampaignNotFound { .. } => {
                Ok(everyone(&|| Error::CampaignNotFound { campaign_id }))
            }
            other => Err(other),
        };
        let mut read_holders = lock(&self.repeat_askers).contains(&campaign_id);
        let mut refreshes = 0;
        let ((decisions, ids, stock, at, seen), coupon_id) = loop {
            let facts = match self.facts_by(conn, campaign_id, deadline) {
                Ok(facts) => facts,
                Err(refusal) => return closed(refusal),
            };
            // A closed window is refused without a round trip.
            if let Err(refusal) = check_window(campaign_id, &facts, self.now()) {
                return closed(refusal);
            }
            let coupon_id = facts.coupon_id;
            // Read before the stock is: a zero read after a newer sighting is not marked.
            let seen = self.sightings(campaign_id);
            let (mut stale, mut unknown_holders) = (false, false);
            let attempt = self.runner.run_by(conn, deadline, |conn| {
                let insert_ids = self.runner.insert_ids(conn)?;
                let valid: Vec<i64> = user_ids.iter().copied().filter(|u| *u > 0).collect();
                let holders: HashMap<i64, i64> = if read_holders {
                    user_coupon::table
                        .filter(user_coupon::coupon_id.eq(coupon_id))
                        .filter(user_coupon::user_id.eq_any(&valid))
                        .select((user_coupon::user_id, user_coupon::id))
                        .load::<(i64, i64)>(conn)?
                        .into_iter()
                        .collect()
                } else {
                    HashMap::new()
                };
                let (stock, current) = lock_stock(conn, campaign_id)?
                    .ok_or(Error::CampaignNotFound { campaign_id })?;
                if current != facts {
                    stale = true;
                    return Err(stale_facts(campaign_id));
                }
                // Every request is decided now, with the hot row held: the batch's time.
                let at = self.now();
                check_window(campaign_id, &current, at)?;
                let (decisions, winners) = decide(user_ids, &holders, stock);
                if !read_holders && decisions.contains(&BatchDecision::SoldOut) {
                    // The refused user may hold the coupon (then: AlreadyIssued).
                    unknown_holders = true;
                    return Err(Error::internal("holders needed"));
                }
                let mut ids: HashMap<i64, i64> = HashMap::new();
                if !winners.is_empty() {
                    let rows: Vec<_> = winners
                        .iter()
                        .map(|user_id| {
                            (
                                user_coupon::user_id.eq(*user_id),
                                user_coupon::coupon_id.eq(coupon_id),
                                user_coupon::fcfs_coupon_id.eq(campaign_id),
                                user_coupon::status.eq(CouponStatus::Issued.as_str()),
                                user_coupon::issued_at.eq(at),
                            )
                        })
                        .collect();
                    diesel::insert_into(user_coupon::table)
                        .values(&rows)
                        .execute(conn)?;
                    ids = match insert_ids {
                        InsertIds::Consecutive { step } => {
                            let first = inserted_id(conn)?;
                            winners
                                .iter()
                                .zip(0i64..)
                                .map(|(user_id, i)| (*user_id, first + step * i))
                                .collect()
                        }
                        // Under innodb_autoinc_lock_mode = 2 one INSERT's ids need not be
                        // consecutive: read them back through the unique (user_id, coupon_id) index.
                        InsertIds::Unordered => user_coupon::table
                            .filter(user_coupon::coupon_id.eq(coupon_id))
                            .filter(user_coupon::user_id.eq_any(&winners))
                            .select((user_coupon::user_id, user_coupon::id))
                            .load::<(i64, i64)>(conn)?
                            .into_iter()
                            .collect(),
                    };
                    let left = stock.max(0) - i32::try_from(winners.len()).unwrap_or(i32::MAX);
                    SetStock {
                        campaign_id,
                        stock: left,
                    }
                    .execute(conn)?;
                }
                Ok((decisions, ids, stock, at, seen))
            });
            match attempt {
                Err(_) if stale && refreshes < FACT_REFRESHES => {
                    self.forget_facts(campaign_id);
                    refreshes += 1;
                }
                Err(_) if unknown_holders => read_holders = true,
                Err(e)
                    if !read_holders && e.server_kind() == Some(ServerErrorKind::DuplicateKey) =>
                {
                    lock(&self.repeat_askers).insert(campaign_id);
                    read_holders = true;
                }
                Err(refusal) => return closed(refusal),
                Ok(decided) => break (decided, coupon_id),
            }
        };

        if decisions.contains(&BatchDecision::SoldOut) {
            self.mark_sold_out(campaign_id, seen);
        } else if stock > 0 {
            self.saw_stock(campaign_id);
        }
        let issued = |user_id: i64| {
            ids.get(&user_id).map(|&id| IssuedCoupon {
                id,
                user_id,
                coupon_id,
                campaign_id,
                status: CouponStatus::Issued,
                issued_at: at,
                used_at: None,
                order_ref: None,
            })
        };
        let missing = || Error::internal("a request the batch issued has no id");
        Ok(user_ids
            .iter()
            .zip(decisions)
            .map(|(&user_id, decision)| match decision {
                BatchDecision::Invalid => Err(Error::InvalidId {
                    what: "user",
                    id: user_id,
                }),
                BatchDecision::Issue => issued(user_id).ok_or_else(missing),
                BatchDecision::Held(user_coupon_id) => Err(Error::AlreadyIssued {
                    user_id,
                    coupon_id,
                    user_coupon_id,
                }),
                BatchDecision::Repeated => match ids.get(&user_id) {
                    Some(&user_coupon_id) => Err(Error::AlreadyIssued {
                        user_id,
                        coupon_id,
                        user_coupon_id,
                    }),
                    None => Err(missing()),
                },
                BatchDecision::SoldOut | BatchDecision::Marked => {
                    Err(Error::SoldOut { campaign_id })
                }
            })
            .collect())
    }
}

/// What the batch transaction decided for one issue request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BatchDecision {
    Invalid,
    Issue,
    /// Already held before the batch: the held coupon's id.
    Held(i64),
    /// Issued earlier in the batch.
    Repeated,
    /// Refused by the stock: sets the sold-out mark.
    SoldOut,
    /// After a `SoldOut` in the batch: `issue` would answer from the mark.
    Marked,
}

/// The single calls' answers, in order, for a locked `stock` and the known `holders`; and the
/// users to issue to.
fn decide(
    user_ids: &[i64],
    holders: &HashMap<i64, i64>,
    stock: i32,
) -> (Vec<BatchDecision>, Vec<i64>) {
    let mut left = stock.max(0);
    let mut winners: Vec<i64> = Vec::new();
    let mut issued: HashSet<i64> = HashSet::new();
    let mut marked = false;
    let decisions = user_ids
        .iter()
        .map(|&user_id| {
            if user_id <= 0 {
                BatchDecision::Invalid
            } else if marked {
                BatchDecision::Marked
            } else if let Some(&existing) = holders.get(&user_id) {
                BatchDecision::Held(existing)
            } else if issued.contains(&user_id) {
                BatchDecision::Repeated
            } else if left > 0 {
                left -= 1;
                issued.insert(user_id);
                winners.push(user_id);
                BatchDecision::Issue
            } else {
                marked = true;
                BatchDecision::SoldOut
            }
        })
        .collect();
    (decisions, winners)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discounts() {
        let d = Decimal::new;
        assert_eq!(Discount::Fixed(d(5, 0)).apply_to(d(3, 0)), d(3, 0));
        assert_eq!(Discount::Fixed(d(5, 0)).apply_to(d(30, 0)), d(5, 0));
        let pct = Discount::Percent {
            percent: d(15, 0),
            cap: Some(d(10, 0)),
        };
        assert_eq!(pct.apply_to(d(40, 0)), d(6, 0));
        assert_eq!(pct.apply_to(d(100, 0)), d(10, 0));
        let odd = Discount::Percent {
            percent: d(333, 1),
            cap: None,
        };
        assert_eq!(odd.apply_to(d(1, 0)), d(3330, 4));
        assert!(Discount::Percent {
            percent: d(101, 0),
            cap: None
        }
        .validate()
        .is_err());
        assert!(Discount::Fixed(d(0, 0)).validate().is_err());
    }

    /// Finding 10e: `apply_to` never panics, whatever the discount and total, and the discount
    /// stays between zero and the total.
    #[test]
    fn finding_10e_apply_to_never_panics() {
        let extremes = [
            Decimal::MAX,
            Decimal::MIN,
            Decimal::ZERO,
            Decimal::ONE,
            Decimal::NEGATIVE_ONE,
            Decimal::ONE_HUNDRED,
            Decimal::new(1, 28),
            Decimal::new(-1, 28),
            Decimal::new(999_999_999, 4),
            Decimal::MAX / Decimal::ONE_HUNDRED,
            Decimal::new(333_333, 4),
        ];
        let mut discounts = Vec::new();
        for &value in &extremes {
            discounts.push(Discount::Fixed(value));
            discounts.push(Discount::Percent {
                percent: value,
                cap: None,
            });
            for &cap in &extremes {
                discounts.push(Discount::Percent {
                    percent: value,
                    cap: Some(cap),
                });
            }
        }
        for discount in &discounts {
            for &total in &extremes {
                let off = discount.apply_to(total);
                assert!(
                    off >= Decimal::ZERO && off <= total.max(Decimal::ZERO),
                    "{discount:?} on {total}: {off}"
                );
            }
        }
        let full = Discount::Percent {
            percent: Decimal::ONE_HUNDRED,
            cap: None,
        };
        assert_eq!(full.apply_to(Decimal::MAX), Decimal::MAX);
        let half = Discount::Percent {
            percent: Decimal::new(50, 0),
            cap: None,
        };
        let off = half.apply_to(Decimal::MAX);
        assert!(
            off > Decimal::MAX / Decimal::new(3, 0) && off < Decimal::MAX,
            "{off}"
        );
    }

    #[test]
    fn quantity_bounds() {
        assert!(positive_quantity(0).is_err());
        assert!(positive_quantity(u32::MAX).is_err());
        assert_eq!(positive_quantity(500).ok(), Some(500));
    }
}
