//! Regression tests for the coupon findings of the independent review (findings 3, 5, 6, 9 and
//! 10f; 10e is a unit test in `src/coupon.rs`). Each test failed on the code before its fix.
//! Invariants are read back from the database after every test: stock + issued rows = total, no
//! user holds two coupons of a template, every row's template is its campaign's, and statuses
//! agree with `used_at` / `order_ref`.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, ThreadId};

use chrono::{DateTime, Duration, NaiveDateTime, Utc};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Unsigned};
use lockstock::coupon::Clock;
use lockstock::schema::{fcfs_coupon, user_coupon};
use lockstock::{
    Campaign, Coupon, CouponIssuer, CouponStatus, Discount, Error, IssuedCoupon, NewCampaign,
    NewCoupon,
};
use rust_decimal::Decimal;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// UTC now at the microsecond precision of DATETIME(6).
fn now() -> NaiveDateTime {
    micros_to_time(Utc::now().timestamp_micros())
}

fn micros_to_time(micros: i64) -> NaiveDateTime {
    DateTime::from_timestamp_micros(micros)
        .expect("representable time")
        .naive_utc()
}

fn make_coupon(issuer: &CouponIssuer, conn: &mut MysqlConnection, name: &str) -> Coupon {
    let t = now();
    issuer
        .create_coupon(
            conn,
            &NewCoupon {
                name,
                discount: Discount::Fixed(Decimal::new(1_000, 0)),
                valid_from: t - Duration::hours(1),
                valid_until: t + Duration::days(7),
            },
        )
        .expect("create coupon")
}

fn make_campaign(
    issuer: &CouponIssuer,
    conn: &mut MysqlConnection,
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
        .expect("create campaign")
}

/// A template valid from an hour ago for a week and a campaign open from a minute ago for an hour.
fn open_campaign(
    issuer: &CouponIssuer,
    conn: &mut MysqlConnection,
    name: &str,
    quantity: u32,
) -> (Coupon, Campaign) {
    let t = now();
    let coupon = make_coupon(issuer, conn, name);
    let campaign = make_campaign(
        issuer,
        conn,
        coupon.id,
        quantity,
        t - Duration::minutes(1),
        t + Duration::hours(1),
    );
    (coupon, campaign)
}

/// (total_quantity, stock_quantity) of a campaign.
fn stock_row(conn: &mut MysqlConnection, campaign_id: i64) -> (i32, i32) {
    fcfs_coupon::table
        .find(campaign_id)
        .select((fcfs_coupon::total_quantity, fcfs_coupon::stock_quantity))
        .first(conn)
        .expect("read fcfs_coupon")
}

/// (status, order_ref, used_at) of a user coupon.
fn user_coupon_row(
    conn: &mut MysqlConnection,
    id: i64,
) -> (String, Option<String>, Option<NaiveDateTime>) {
    user_coupon::table
        .find(id)
        .select((
            user_coupon::status,
            user_coupon::order_ref,
            user_coupon::used_at,
        ))
        .first(conn)
        .expect("read user_coupon")
}

/// The database-wide coupon invariants; panics with `context` on the first violation.
fn check_invariants(conn: &mut MysqlConnection, context: &str) {
    let campaigns: Vec<(i64, i64, i32, i32)> = fcfs_coupon::table
        .select((
            fcfs_coupon::id,
            fcfs_coupon::coupon_id,
            fcfs_coupon::total_quantity,
            fcfs_coupon::stock_quantity,
        ))
        .load(conn)
        .expect("campaigns");
    type Row = (
        i64,
        i64,
        i64,
        i64,
        String,
        Option<NaiveDateTime>,
        Option<String>,
    );
    let rows: Vec<Row> = user_coupon::table
        .select((
            user_coupon::id,
            user_coupon::user_id,
            user_coupon::coupon_id,
            user_coupon::fcfs_coupon_id,
            user_coupon::status,
            user_coupon::used_at,
            user_coupon::order_ref,
        ))
        .load(conn)
        .expect("user coupons");
    let template: HashMap<i64, i64> = campaigns.iter().map(|c| (c.0, c.1)).collect();
    for (id, coupon_id, total, stock) in &campaigns {
        let issued = rows.iter().filter(|r| r.3 == *id).count() as i64;
        assert!(*stock >= 0, "{context}: campaign {id} stock {stock} < 0");
        assert_eq!(
            i64::from(*stock) + issued,
            i64::from(*total),
            "{context}: campaign {id} (template {coupon_id}): stock + issued != total"
        );
    }
    let mut holders = HashSet::new();
    for (id, user, coupon, campaign, status, used_at, order_ref) in &rows {
        assert!(
            holders.insert((*user, *coupon)),
            "{context}: user {user} holds two coupons of template {coupon}"
        );
        assert_eq!(
            template.get(campaign),
            Some(coupon),
            "{context}: user coupon {id} has template {coupon}, its campaign {campaign} another"
        );
        match status.as_str() {
            "issued" => assert!(
                used_at.is_none() && order_ref.is_none(),
                "{context}: held coupon {id} has used_at or order_ref"
            ),
            "used" => assert!(
                used_at.is_some() && order_ref.is_some(),
                "{context}: used coupon {id} lacks used_at or order_ref"
            ),
            other => panic!("{context}: coupon {id} has status {other:?}"),
        }
    }
}

/// A connection whose server session has been killed: any round trip on it fails.
fn killed_connection(url: &str, killer: &mut MysqlConnection) -> MysqlConnection {
    let mut doomed = common::connect(url);
    let id: u64 = diesel::select(diesel::dsl::sql::<Unsigned<BigInt>>("CONNECTION_ID()"))
        .get_result(&mut doomed)
        .expect("connection id");
    killer
        .batch_execute(&format!("KILL CONNECTION {id}"))
        .expect("kill session");
    assert!(
        doomed.batch_execute("SELECT 1").is_err(),
        "the killed session still answers"
    );
    doomed
}

// ---------------------------------------------------------------------------------------------
// Finding 3: "redeemed once" — restore is bound to the order it reverses, redeem is retryable
// ---------------------------------------------------------------------------------------------

#[test]
fn finding_3_restore_is_bound_to_its_order() {
    let (_url, mut conn) = common::fresh_database("review_3_restore");
    let issuer = CouponIssuer::new();
    let (_coupon, campaign) = open_campaign(&issuer, &mut conn, "bound", 2);
    let held = issuer.issue(&mut conn, 7, campaign.id).expect("issue");

    // Nothing to restore yet; a malformed order is refused before anything is read.
    match issuer.restore(&mut conn, held.id, "order-A") {
        Err(Error::NotRedeemed { user_coupon_id }) => assert_eq!(user_coupon_id, held.id),
        other => panic!("expected NotRedeemed, got {other:?}"),
    }
    for bad in [String::new(), "o".repeat(65)] {
        assert!(matches!(
            issuer.restore(&mut conn, held.id, &bad),
            Err(Error::InvalidInput {
                field: "order_ref",
                ..
            })
        ));
    }

    issuer
        .redeem(&mut conn, held.id, "order-A")
        .expect("redeem A");
    // Another order cannot give back A's coupon.
    match issuer.restore(&mut conn, held.id, "order-B") {
        Err(Error::RedeemedByAnotherOrder {
            user_coupon_id,
            order_ref,
        }) => assert_eq!((user_coupon_id, order_ref.as_str()), (held.id, "order-B")),
        other => panic!("expected RedeemedByAnotherOrder, got {other:?}"),
    }
    assert_eq!(
        user_coupon_row(&mut conn, held.id).1.as_deref(),
        Some("order-A")
    );
    let restored = issuer
        .restore(&mut conn, held.id, "order-A")
        .expect("order A cancelled");
    assert_eq!(restored.status, CouponStatus::Issued);
    assert_eq!(
        user_coupon_row(&mut conn, held.id),
        ("issued".into(), None, None)
    );
    // The cancel of A repeated (or retried after OutcomeUnknown): nothing left to restore.
    match issuer.restore(&mut conn, held.id, "order-A") {
        Err(Error::NotRedeemed { user_coupon_id }) => assert_eq!(user_coupon_id, held.id),
        other => panic!("restore of A again: expected NotRedeemed, got {other:?}"),
    }
    let on_b = issuer
        .redeem(&mut conn, held.id, "order-B")
        .expect("redeem B");
    // A duplicate cancel of A after B used the coupon must not free B's coupon.
    match issuer.restore(&mut conn, held.id, "order-A") {
        Err(Error::RedeemedByAnotherOrder {
            user_coupon_id,
            order_ref,
        }) => assert_eq!((user_coupon_id, order_ref.as_str()), (held.id, "order-A")),
        other => panic!("a second restore of order A after B: {other:?}"),
    }
    let stored = user_coupon_row(&mut conn, held.id);
    assert_eq!(
        (stored.0.as_str(), stored.1.as_deref(), stored.2),
        ("used", Some("order-B"), on_b.used_at)
    );
    let other = issuer.redeem(&mut conn, held.id, "order-C");
    assert!(
        matches!(other, Err(Error::AlreadyRedeemed { .. })),
        "one coupon used on B and C: {other:?}"
    );
    assert_eq!(user_coupon_row(&mut conn, held.id), stored);
    check_invariants(&mut conn, "finding 3");
}

#[test]
fn finding_3_redeem_retry_by_the_same_order_succeeds() {
    let (_url, mut conn) = common::fresh_database("review_3_redeem_retry");
    let issuer = CouponIssuer::new();
    let (_coupon, campaign) = open_campaign(&issuer, &mut conn, "retried", 2);
    let held = issuer.issue(&mut conn, 7, campaign.id).expect("issue");

    let used = issuer
        .redeem(&mut conn, held.id, "order-A")
        .expect("redeem A");
    let stored = user_coupon_row(&mut conn, held.id);
    // The retry (say after OutcomeUnknown) by the order that holds the coupon: success, unchanged.
    let retried = issuer.redeem(&mut conn, held.id, "order-A");
    assert_eq!(retried.as_ref().ok(), Some(&used), "{retried:?}");
    assert_eq!(user_coupon_row(&mut conn, held.id), stored);
    // Another order is still refused.
    match issuer.redeem(&mut conn, held.id, "order-B") {
        Err(Error::AlreadyRedeemed { user_coupon_id }) => assert_eq!(user_coupon_id, held.id),
        other => panic!("expected AlreadyRedeemed, got {other:?}"),
    }
    assert_eq!(user_coupon_row(&mut conn, held.id), stored);
    check_invariants(&mut conn, "finding 3 retry");
}
