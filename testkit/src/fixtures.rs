//! Fixtures for integration tests against a real server: a fresh, migrated database per test
//! (on the shared throwaway sandbox, or on `DATABASE_URL`), coupon campaigns and funded
//! accounts, pools, and [`concurrently`] for races.
//!
//! Every fixture panics with a message naming what failed: it is meant for tests, where a
//! failed setup is a failed test.
//!
//! ```no_run
//! use lockstock::{BalanceLedger, CouponIssuer};
//! use lockstock_testkit::fixtures::{concurrently, fresh_database, open_campaign};
//!
//! let (url, mut conn) = fresh_database("doc_fixtures");
//! let issuer = CouponIssuer::new();
//! let campaign = open_campaign(&mut conn, &issuer, 3);
//! // 8 users race for 3 coupons, each on its own connection.
//! let answers = concurrently(8, &url, |thread, conn| {
//!     issuer.issue(conn, thread as i64 + 1, campaign.id).is_ok()
//! });
//! assert_eq!(answers.iter().filter(|ok| **ok).count(), 3);
//! ```
#![allow(clippy::expect_used)] // fixtures panic: a failed setup is a failed test

use std::sync::{Barrier, Mutex, MutexGuard, PoisonError};

use chrono::{DateTime, Duration, NaiveDateTime, Utc};
use diesel::connection::SimpleConnection;
use diesel::r2d2::{ConnectionManager, Pool};
use diesel::{Connection, MysqlConnection};
use lockstock::combine::MysqlPool;
use lockstock::{
    BalanceLedger, Campaign, Coupon, CouponIssuer, Discount, NewCampaign, NewCoupon,
    SessionSettings, TxnPolicy,
};
use rust_decimal::Decimal;

/// A fresh database named `name` with lockstock's migrations applied; returns its URL and a
/// connection to it. `name` must be unique among the tests that share a server (tests of one
/// binary run in parallel threads).
pub fn fresh_database(name: &str) -> (String, MysqlConnection) {
    let url = crate::sandbox::database_url(name).unwrap_or_else(|e| panic!("database {name}: {e}"));
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

/// An r2d2 pool of up to `size` connections to `url`, each with lockstock's session settings
/// for the default [`TxnPolicy`] (what `CombiningIssuer` / `CombiningLedger` expect).
pub fn pool(url: &str, size: u32) -> MysqlPool {
    Pool::builder()
        .max_size(size)
        .connection_customizer(Box::new(SessionSettings::new(TxnPolicy::default())))
        .build(ConnectionManager::<MysqlConnection>::new(url))
        .expect("build pool")
}

/// UTC now at the microsecond precision of `DATETIME(6)`.
pub fn now() -> NaiveDateTime {
    micros_to_time(Utc::now().timestamp_micros())
}

/// The UTC time `micros` microseconds after the Unix epoch.
pub fn micros_to_time(micros: i64) -> NaiveDateTime {
    DateTime::from_timestamp_micros(micros)
        .expect("representable time")
        .naive_utc()
}

/// A coupon template `name` worth a fixed 1,000, valid from `valid_from` (inclusive) to
/// `valid_until` (exclusive).
pub fn create_coupon(
    conn: &mut MysqlConnection,
    issuer: &CouponIssuer,
    name: &str,
    valid_from: NaiveDateTime,
    valid_until: NaiveDateTime,
) -> Coupon {
    issuer
        .create_coupon(
            conn,
            &NewCoupon {
                name,
                discount: Discount::Fixed(Decimal::new(1_000, 0)),
                valid_from,
                valid_until,
            },
        )
        .unwrap_or_else(|e| panic!("create coupon {name}: {e}"))
}

/// A campaign of `quantity` coupons of template `coupon_id`, issuing from `starts` (inclusive)
/// to `ends` (exclusive).
pub fn create_campaign(
    conn: &mut MysqlConnection,
    issuer: &CouponIssuer,
    coupon_id: i64,
    quantity: u32,
    starts: NaiveDateTime,
    ends: NaiveDateTime,
) -> Campaign {
    issuer
        .create_campaign(
            conn,
            &NewCampaign {
                coupon_id,
                quantity,
                issue_starts_at: starts,
                issue_ends_at: ends,
            },
        )
        .unwrap_or_else(|e| panic!("create campaign of coupon {coupon_id}: {e}"))
}

/// A coupon template `name` worth a fixed 1,000, valid from an hour ago for a week.
pub fn valid_coupon(conn: &mut MysqlConnection, issuer: &CouponIssuer, name: &str) -> Coupon {
    let t = now();
    create_coupon(
        conn,
        issuer,
        name,
        t - Duration::hours(1),
        t + Duration::days(7),
    )
}

/// A campaign of `quantity` coupons of template `coupon_id`, open from a minute ago for an
/// hour.
pub fn open_campaign_of(
    conn: &mut MysqlConnection,
    issuer: &CouponIssuer,
    coupon_id: i64,
    quantity: u32,
) -> Campaign {
    let t = now();
    let (starts, ends) = (t - Duration::minutes(1), t + Duration::hours(1));
    create_campaign(conn, issuer, coupon_id, quantity, starts, ends)
}

/// A template `name` ([`valid_coupon`]) and a campaign of `quantity` coupons of it
/// ([`open_campaign_of`]: open from a minute ago for an hour).
pub fn open_campaign_named(
    conn: &mut MysqlConnection,
    issuer: &CouponIssuer,
    name: &str,
    quantity: u32,
) -> (Coupon, Campaign) {
    let coupon = valid_coupon(conn, issuer, name);
    let campaign = open_campaign_of(conn, issuer, coupon.id, quantity);
    (coupon, campaign)
}

/// A coupon template ([`valid_coupon`]) and a campaign of `quantity` coupons of it, open from a
/// minute ago for an hour.
pub fn open_campaign(conn: &mut MysqlConnection, issuer: &CouponIssuer, quantity: u32) -> Campaign {
    open_campaign_named(conn, issuer, "test coupon", quantity).1
}

/// Charges `amount` to account `user` (idempotency key `fund-<user>`), creating the account.
pub fn funded_account(
    conn: &mut MysqlConnection,
    ledger: &BalanceLedger,
    user: i64,
    amount: Decimal,
) {
    ledger
        .charge(conn, user, amount, &format!("fund-{user}"))
        .unwrap_or_else(|e| panic!("fund account {user} with {amount}: {e}"));
}

/// Runs `work(thread, conn)` on `threads` threads, each with its own connection to `url`;
/// the threads connect first and then start together (a barrier), so they race. Returns
/// their results in thread order; a panic in a thread fails the caller.
pub fn concurrently<T, F>(threads: usize, url: &str, work: F) -> Vec<T>
where
    T: Send,
    F: Fn(usize, &mut MysqlConnection) -> T + Sync,
{
    let barrier = Barrier::new(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|thread| {
                let (barrier, work) = (&barrier, &work);
                s.spawn(move || {
                    let mut conn = connect(url);
                    barrier.wait();
                    work(thread, &mut conn)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    })
}

/// Runs the tests that hold the returned guard one at a time (within one test binary).
///
/// All integration tests of a crate share one binary and run in parallel on a few cores. Tests
/// that assert time bounds (deadlines) and tests that storm the server (kills, crashes, several
/// processes) take this guard, so none of them shares the machine with another; light tests still
/// run beside them.
pub fn exclusive() -> MutexGuard<'static, ()> {
    static EXCLUSIVE: Mutex<()> = Mutex::new(());
    EXCLUSIVE.lock().unwrap_or_else(PoisonError::into_inner)
}
