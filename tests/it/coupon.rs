//! First-come-first-served coupons against a real server: no over-issue and one coupon per user
//! under 64 racing threads, issue windows at their exact boundaries, the sold-out cache and
//! restock, concurrent redeems, restore and validity, and typed refusals that write nothing.
//! Every invariant is read back from the database.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Instant;

use chrono::{Duration, NaiveDate, NaiveDateTime};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::BigInt;
use lockstock::coupon::{Clock, MAX_ORDER_REF_BYTES};
use lockstock::schema::{coupon, fcfs_coupon, user_coupon};
use lockstock::{
    Campaign, Coupon, CouponIssuer, CouponStatus, Discount, Error, IssuedCoupon, NewCampaign,
    NewCoupon,
};
use rust_decimal::Decimal;

use lockstock_testkit::fixtures::{
    assert_not_sacrificed, assert_refused, concurrently, connect, create_campaign, create_coupon,
    fresh_database, issued_rows, killed_connection, micros_to_time, now, open_campaign,
    open_campaign_named, other_program, statement_prepares, stock_row, user_coupon_row,
};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A clock the test moves by hand.
#[derive(Clone)]
struct ManualClock(Arc<AtomicI64>);

impl ManualClock {
    fn at(time: NaiveDateTime) -> Self {
        Self(Arc::new(AtomicI64::new(time.and_utc().timestamp_micros())))
    }

    fn set(&self, time: NaiveDateTime) {
        self.0
            .store(time.and_utc().timestamp_micros(), Ordering::SeqCst);
    }

    fn clock(&self) -> Clock {
        let micros = self.0.clone();
        Arc::new(move || micros_to_time(micros.load(Ordering::SeqCst)))
    }
}

/// `n` nanoseconds.
fn nanos(n: i64) -> Duration {
    Duration::nanoseconds(n)
}

fn time(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32, micro: u32) -> NaiveDateTime {
    NaiveDate::from_ymd_opt(y, mo, d)
        .and_then(|date| date.and_hms_micro_opt(h, mi, s, micro))
        .expect("valid date")
}

fn us(n: i64) -> Duration {
    Duration::microseconds(n)
}

#[derive(QueryableByName, Debug)]
struct UserId {
    #[diesel(sql_type = BigInt)]
    user_id: i64,
}

/// Users holding more than one coupon of a template.
fn duplicate_holders(conn: &mut MysqlConnection, coupon_id: i64) -> Vec<i64> {
    diesel::sql_query(
        "SELECT user_id FROM user_coupon WHERE coupon_id = ? \
         GROUP BY user_id HAVING COUNT(*) > 1",
    )
    .bind::<BigInt, _>(coupon_id)
    .load::<UserId>(conn)
    .expect("group user_coupon")
    .into_iter()
    .map(|u| u.user_id)
    .collect()
}

/// (coupon rows, campaign rows, user_coupon rows).
fn table_counts(conn: &mut MysqlConnection) -> (i64, i64, i64) {
    (
        coupon::table
            .count()
            .get_result(conn)
            .expect("count coupon"),
        fcfs_coupon::table
            .count()
            .get_result(conn)
            .expect("count fcfs_coupon"),
        user_coupon::table
            .count()
            .get_result(conn)
            .expect("count user_coupon"),
    )
}

fn outcome_name(result: &Result<IssuedCoupon, Error>) -> String {
    match result {
        Ok(_) => "issued".into(),
        Err(Error::SoldOut { .. }) => "sold_out".into(),
        Err(Error::Contended { .. }) => "contended".into(),
        Err(Error::AlreadyIssued { .. }) => "already_issued".into(),
        Err(other) => format!("other: {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// 1. 64 threads, 2,000 users, 500 coupons
// ---------------------------------------------------------------------------------------------

#[test]
fn flash_sale_never_over_issues_and_never_duplicates() {
    // Heavy: never beside a test that asserts time bounds.
    let _storm = lockstock_testkit::fixtures::storm();
    const STOCK: u32 = 500;
    const USERS: i64 = 2_000;
    const THREADS: i64 = 64;

    let (url, mut conn) = fresh_database("coupon_flash_sale");
    let issuer = Arc::new(CouponIssuer::new());
    let (coupon, campaign) = open_campaign_named(&mut conn, &issuer, "flash 500", STOCK);
    let started = Instant::now();
    let workers: Vec<_> = concurrently(THREADS as usize, &url, |t, conn| {
        (1 + t as i64..=USERS)
            .step_by(THREADS as usize)
            .map(|user| (user, issuer.issue(conn, user, campaign.id)))
            .collect::<Vec<_>>()
    });
    let results: Vec<(i64, Result<IssuedCoupon, Error>)> = workers.into_iter().flatten().collect();
    let elapsed = started.elapsed();

    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for (_, result) in &results {
        *counts.entry(outcome_name(result)).or_default() += 1;
    }
    eprintln!(
        "flash sale: {} requests in {elapsed:?}: {counts:?}",
        results.len()
    );
    assert_eq!(results.len(), USERS as usize);
    let unexpected: Vec<_> = results
        .iter()
        .filter(|(_, r)| {
            !matches!(
                r,
                Ok(_) | Err(Error::SoldOut { .. } | Error::Contended { .. })
            )
        })
        .collect();
    assert!(unexpected.is_empty(), "unexpected answers: {unexpected:?}");

    let winners: Vec<&IssuedCoupon> = results
        .iter()
        .filter_map(|(user, r)| {
            r.as_ref().ok().inspect(|c| {
                assert_eq!(c.user_id, *user);
                assert_eq!(c.campaign_id, campaign.id);
                assert_eq!(c.coupon_id, coupon.id);
                assert_eq!(c.status, CouponStatus::Issued);
            })
        })
        .collect();

    // From the database.
    let rows = issued_rows(&mut conn, campaign.id);
    let (total, stock) = stock_row(&mut conn, campaign.id);
    assert_eq!(rows, i64::from(STOCK), "user_coupon rows for the campaign");
    assert_eq!((total, stock), (STOCK as i32, 0));
    assert_eq!(i64::from(stock) + rows, i64::from(total));
    assert_eq!(winners.len() as i64, rows, "successes seen == rows stored");
    assert_eq!(duplicate_holders(&mut conn, coupon.id), Vec::<i64>::new());
    // The rows are exactly the winners' coupons.
    let mut stored: Vec<(i64, i64)> = user_coupon::table
        .filter(user_coupon::fcfs_coupon_id.eq(campaign.id))
        .select((user_coupon::id, user_coupon::user_id))
        .order(user_coupon::id.asc())
        .load(&mut conn)
        .expect("load user_coupon");
    let mut seen: Vec<(i64, i64)> = winners.iter().map(|c| (c.id, c.user_id)).collect();
    seen.sort_unstable();
    stored.sort_unstable();
    assert_eq!(seen, stored);
    assert_eq!(
        issuer.remaining(&mut conn, campaign.id).expect("remaining"),
        0
    );
}

// ---------------------------------------------------------------------------------------------
// 2. One user, 16 threads
// ---------------------------------------------------------------------------------------------

#[test]
fn one_user_from_sixteen_threads_gets_one_coupon() {
    const THREADS: usize = 16;
    const USER: i64 = 4242;

    let (url, mut conn) = fresh_database("coupon_one_user");
    let issuer = CouponIssuer::new();
    let (coupon, campaign) = open_campaign_named(&mut conn, &issuer, "one per user", 5);
    let results: Vec<_> = concurrently(THREADS, &url, |_, conn| {
        issuer.issue(conn, USER, campaign.id)
    });
    let winners: Vec<&IssuedCoupon> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    let winner = winners[0];
    let (mut already, mut contended) = (0, 0);
    for result in &results {
        match result {
            Ok(_) => {}
            Err(Error::AlreadyIssued {
                user_id,
                coupon_id,
                user_coupon_id,
            }) => {
                assert_eq!(
                    (*user_id, *coupon_id, *user_coupon_id),
                    (USER, coupon.id, winner.id)
                );
                already += 1;
            }
            Err(Error::Contended { .. }) => contended += 1,
            Err(other) => panic!("unexpected answer {other:?}"),
        }
    }
    eprintln!("one user: 1 issued, {already} already_issued, {contended} contended");

    let held: Vec<(i64, i64)> = user_coupon::table
        .filter(user_coupon::user_id.eq(USER))
        .select((user_coupon::id, user_coupon::fcfs_coupon_id))
        .load(&mut conn)
        .expect("load user_coupon");
    assert_eq!(held, vec![(winner.id, campaign.id)]);
    assert_eq!(stock_row(&mut conn, campaign.id), (5, 4));
    // And later, sequentially: the typed answer with the holder's coupon.
    match issuer.issue(&mut conn, USER, campaign.id) {
        Err(Error::AlreadyIssued { user_coupon_id, .. }) => assert_eq!(user_coupon_id, winner.id),
        other => panic!("expected AlreadyIssued, got {other:?}"),
    }
    assert_eq!(stock_row(&mut conn, campaign.id), (5, 4));
}

// ---------------------------------------------------------------------------------------------
// 3. Windows at their boundaries, unknown campaigns, invalid ids, refused creations
// ---------------------------------------------------------------------------------------------

#[test]
fn issue_window_boundaries_are_exact() {
    let (_url, mut conn) = fresh_database("coupon_window");
    let starts = time(2030, 1, 1, 10, 0, 0, 123_456);
    let ends = time(2030, 1, 1, 12, 0, 0, 654_321);
    let setup = CouponIssuer::new();
    let coupon = create_coupon(
        &mut conn,
        &setup,
        "window",
        time(2029, 12, 1, 0, 0, 0, 0),
        time(2030, 2, 1, 0, 0, 0, 0),
    );
    let campaign = create_campaign(&mut conn, &setup, coupon.id, 10, starts, ends);
    let clock = ManualClock::at(starts - us(1));
    let issuer = CouponIssuer::new().with_clock(clock.clock());

    // At starts_at - 1us: not started.
    assert_refused(&issuer.issue(&mut conn, 1, campaign.id), |e| {
        matches!(e, Error::NotStarted { campaign_id, starts_at }
            if (*campaign_id, *starts_at) == (campaign.id, starts))
    });
    assert_eq!(issued_rows(&mut conn, campaign.id), 0);

    clock.set(starts);
    let first = issuer
        .issue(&mut conn, 1, campaign.id)
        .expect("issued exactly at starts_at");
    assert_eq!(first.issued_at, starts);

    clock.set(ends - us(1));
    let last = issuer
        .issue(&mut conn, 2, campaign.id)
        .expect("issued at ends_at - 1us");
    assert_eq!(last.issued_at, ends - us(1));

    clock.set(ends);
    // At ends_at: ended.
    assert_refused(&issuer.issue(&mut conn, 3, campaign.id), |e| {
        matches!(e, Error::Ended { campaign_id, ended_at }
            if (*campaign_id, *ended_at) == (campaign.id, ends))
    });

    // The database agrees: two rows, with the clock's timestamps, stock 8.
    let rows: Vec<(i64, NaiveDateTime)> = user_coupon::table
        .filter(user_coupon::fcfs_coupon_id.eq(campaign.id))
        .select((user_coupon::user_id, user_coupon::issued_at))
        .order(user_coupon::id.asc())
        .load(&mut conn)
        .expect("load user_coupon");
    assert_eq!(rows, vec![(1, starts), (2, ends - us(1))]);
    assert_eq!(stock_row(&mut conn, campaign.id), (10, 8));

    // The campaign as stored has exactly the window given.
    let stored = issuer.campaign(&mut conn, campaign.id).expect("campaign");
    assert_eq!(
        (stored.issue_starts_at, stored.issue_ends_at),
        (starts, ends)
    );
}

#[test]
fn unknown_campaigns_and_invalid_ids_are_typed() {
    let (_url, mut conn) = fresh_database("coupon_invalid_ids");
    let issuer = CouponIssuer::new();
    let (_coupon, campaign) = open_campaign_named(&mut conn, &issuer, "ids", 3);
    let before = table_counts(&mut conn);

    match issuer.issue(&mut conn, 1, campaign.id + 1_000) {
        Err(Error::CampaignNotFound { campaign_id }) => {
            assert_eq!(campaign_id, campaign.id + 1_000)
        }
        other => panic!("expected CampaignNotFound, got {other:?}"),
    }
    assert_refused(&issuer.remaining(&mut conn, 999_999), |e| {
        matches!(e, Error::CampaignNotFound { .. })
    });
    assert_refused(&issuer.restock(&mut conn, 999_999, 5, "restock-1"), |e| {
        matches!(e, Error::CampaignNotFound { .. })
    });

    for bad in [0, -1, i64::MIN] {
        assert!(
            matches!(
                issuer.issue(&mut conn, bad, campaign.id),
                Err(Error::InvalidId { what: "user", id }) if id == bad
            ),
            "user id {bad}"
        );
        assert!(
            matches!(
                issuer.issue(&mut conn, 1, bad),
                Err(Error::InvalidId { what: "campaign", id }) if id == bad
            ),
            "campaign id {bad}"
        );
        assert_refused(&issuer.redeem(&mut conn, bad, "order-1"), |e| {
            matches!(e, Error::InvalidId { .. })
        });
        assert_refused(&issuer.restore(&mut conn, bad, "order-1"), |e| {
            matches!(e, Error::InvalidId { .. })
        });
        assert_refused(&issuer.user_coupons(&mut conn, bad), |e| {
            matches!(e, Error::InvalidId { .. })
        });
        assert_refused(&issuer.remaining(&mut conn, bad), |e| {
            matches!(e, Error::InvalidId { .. })
        });
        assert_refused(&issuer.restock(&mut conn, bad, 1, "restock-1"), |e| {
            matches!(e, Error::InvalidId { .. })
        });
        assert_refused(&issuer.coupon(&mut conn, bad), |e| {
            matches!(e, Error::InvalidId { .. })
        });
    }
    assert_eq!(table_counts(&mut conn), before, "refusals wrote nothing");
    assert_eq!(stock_row(&mut conn, campaign.id), (3, 3));
}

#[test]
fn refused_creations_write_nothing() {
    let (_url, mut conn) = fresh_database("coupon_refused_creations");
    let issuer = CouponIssuer::new();
    let t = now();
    let coupon = create_coupon(
        &mut conn,
        &issuer,
        "template",
        t - Duration::hours(1),
        t + Duration::days(1),
    );
    let before = table_counts(&mut conn);
    let campaign = |coupon_id, quantity, starts, ends| NewCampaign {
        coupon_id,
        quantity,
        issue_starts_at: starts,
        issue_ends_at: ends,
    };
    let hour = Duration::hours(1);

    let refusals: Vec<(&str, NewCampaign)> = vec![
        ("quantity 0", campaign(coupon.id, 0, t, t + hour)),
        ("quantity > i32", campaign(coupon.id, u32::MAX, t, t + hour)),
        ("reversed window", campaign(coupon.id, 5, t + hour, t)),
        ("empty window", campaign(coupon.id, 5, t, t)),
        // Stored at microseconds: a window inside one microsecond is empty (the CHECK answered
        // an untyped server error before).
        (
            "window shorter than a microsecond",
            campaign(coupon.id, 5, t + nanos(100), t + nanos(900)),
        ),
        (
            "opens after the coupon expires",
            campaign(coupon.id, 5, t + Duration::days(2), t + Duration::days(3)),
        ),
    ];
    for (case, new) in &refusals {
        match issuer.create_campaign(&mut conn, new) {
            Err(Error::InvalidInput { .. }) => {}
            other => panic!("{case}: expected InvalidInput, got {other:?}"),
        }
    }
    match issuer.create_campaign(&mut conn, &campaign(coupon.id + 77, 5, t, t + hour)) {
        Err(Error::CouponNotFound { coupon_id }) => assert_eq!(coupon_id, coupon.id + 77),
        other => panic!("unknown coupon: expected CouponNotFound, got {other:?}"),
    }
    match issuer.create_campaign(&mut conn, &campaign(0, 5, t, t + hour)) {
        Err(Error::InvalidId { what: "coupon", .. }) => {}
        other => panic!("coupon id 0: expected InvalidId, got {other:?}"),
    }

    // Refused templates.
    let template = |name, discount, from, until| NewCoupon {
        name,
        discount,
        valid_from: from,
        valid_until: until,
    };
    let fixed = Discount::Fixed(Decimal::new(5, 0));
    let bad_templates = [
        ("blank name", template("  ", fixed, t, t + hour)),
        ("reversed validity", template("x", fixed, t + hour, t)),
        ("empty validity", template("x", fixed, t, t)),
        (
            "validity shorter than a microsecond",
            template("x", fixed, t + nanos(100), t + nanos(900)),
        ),
        (
            "percent over 100",
            template(
                "x",
                Discount::Percent {
                    percent: Decimal::new(101, 0),
                    cap: None,
                },
                t,
                t + hour,
            ),
        ),
    ];
    for (case, new) in &bad_templates {
        match issuer.create_coupon(&mut conn, new) {
            Err(Error::InvalidInput { .. }) => {}
            other => panic!("{case}: expected InvalidInput, got {other:?}"),
        }
    }
    assert!(matches!(
        issuer.create_coupon(
            &mut conn,
            &template("x", Discount::Fixed(Decimal::ZERO), t, t + hour)
        ),
        Err(Error::InvalidAmount { .. })
    ));
    assert_eq!(table_counts(&mut conn), before, "refusals wrote nothing");
}

/// A template is answered as it is stored and read back: its discount at the four places of
/// its `DECIMAL(19,4)` columns, whatever scale the caller wrote it with.
#[test]
fn a_created_template_answers_its_discount_as_stored() {
    let (_url, mut conn) = fresh_database("coupon_stored_scale");
    let issuer = CouponIssuer::new();
    let t = chrono::Utc::now().naive_utc();
    for discount in [
        Discount::Fixed(Decimal::new(5_000, 0)),
        Discount::Percent {
            percent: Decimal::new(125, 1),
            cap: Some(Decimal::new(30_000, 0)),
        },
    ] {
        let created = issuer
            .create_coupon(
                &mut conn,
                &NewCoupon {
                    name: "scaled",
                    discount,
                    valid_from: t,
                    valid_until: t + Duration::hours(1),
                },
            )
            .expect("create");
        let read = issuer.coupon(&mut conn, created.id).expect("read back");
        assert_eq!(
            format!("{:?}", created.discount),
            format!("{:?}", read.discount)
        );
        assert_eq!(
            created.discount, discount,
            "equal by value to what was given"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Zero stock, the sold-out cache, restock
// ---------------------------------------------------------------------------------------------

#[test]
fn sold_out_is_cached_until_restock() {
    let (url, mut conn) = fresh_database("coupon_sold_out");
    // Marks that last (the default forgets them after a second: a slow machine would take
    // the dead-connection checks below for round trips).
    let issuer = CouponIssuer::new().with_sold_out_ttl(std::time::Duration::MAX);
    let (coupon, campaign) = open_campaign_named(&mut conn, &issuer, "only one", 1);

    let first = issuer.issue(&mut conn, 1, campaign.id).expect("the one");
    match issuer.issue(&mut conn, 2, campaign.id) {
        Err(Error::SoldOut { campaign_id }) => assert_eq!(campaign_id, campaign.id),
        other => panic!("expected SoldOut, got {other:?}"),
    }
    assert_eq!(issued_rows(&mut conn, campaign.id), 1);
    assert_eq!(stock_row(&mut conn, campaign.id), (1, 0));

    // No round trip: on a connection whose session is gone, the answer is still SoldOut...
    let mut doomed = killed_connection(&url, &mut conn);
    for user in [3, 4, 1] {
        match issuer.issue(&mut doomed, user, campaign.id) {
            Err(Error::SoldOut { campaign_id }) => assert_eq!(campaign_id, campaign.id),
            other => panic!("user {user} on a dead connection: expected SoldOut, got {other:?}"),
        }
    }
    // ...while anything that does need the server fails on it, and so does an issuer without
    // the cache.
    let cold = issuer.remaining(&mut doomed, campaign.id);
    assert!(
        matches!(cold, Err(Error::Server(_))),
        "remaining on a dead connection: {cold:?}"
    );
    // The call before found the connection lost and marked it broken: the next one is
    // refused without a round trip.
    let uncached = CouponIssuer::new().issue(&mut doomed, 3, campaign.id);
    assert!(
        matches!(uncached, Err(Error::ConnectionBroken { .. })),
        "a fresh issuer on a dead connection: {uncached:?}"
    );
    drop(doomed);

    // An issuer that merely read the stock as 0 also answers from memory afterwards.
    let reader = CouponIssuer::new().with_sold_out_ttl(std::time::Duration::MAX);
    assert_eq!(
        reader.remaining(&mut conn, campaign.id).expect("remaining"),
        0
    );
    let mut doomed = killed_connection(&url, &mut conn);
    assert_refused(&reader.issue(&mut doomed, 5, campaign.id), |e| {
        matches!(e, Error::SoldOut { .. })
    });
    drop(doomed);

    // Restock 0 is refused (naming the parameter) and changes nothing; the cache stays.
    match issuer.restock(&mut conn, campaign.id, 0, "restock-0") {
        Err(Error::InvalidInput {
            field: "additional",
            ..
        }) => {}
        other => panic!("restock 0: expected InvalidInput, got {other:?}"),
    }
    assert_eq!(stock_row(&mut conn, campaign.id), (1, 0));
    assert_refused(&issuer.issue(&mut conn, 3, campaign.id), |e| {
        matches!(e, Error::SoldOut { .. })
    });

    // Restock clears the cache: the next issue succeeds and the stock reflects it.
    let restocked = issuer
        .restock(&mut conn, campaign.id, 2, "restock-1")
        .expect("restock");
    assert_eq!((restocked.total_quantity, restocked.stock_quantity), (3, 2));
    assert_eq!(stock_row(&mut conn, campaign.id), (3, 2));
    let second = issuer
        .issue(&mut conn, 3, campaign.id)
        .expect("after restock");
    assert_eq!(
        issuer.remaining(&mut conn, campaign.id).expect("remaining"),
        1
    );
    assert_eq!(stock_row(&mut conn, campaign.id), (3, 1));
    match issuer.issue(&mut conn, 1, campaign.id) {
        Err(Error::AlreadyIssued { user_coupon_id, .. }) => assert_eq!(user_coupon_id, first.id),
        other => panic!("holder after restock: expected AlreadyIssued, got {other:?}"),
    }
    let third = issuer.issue(&mut conn, 4, campaign.id).expect("last one");
    assert_refused(&issuer.issue(&mut conn, 5, campaign.id), |e| {
        matches!(e, Error::SoldOut { .. })
    });
    assert_eq!(stock_row(&mut conn, campaign.id), (3, 0));
    assert_eq!(issued_rows(&mut conn, campaign.id), 3);
    assert!(duplicate_holders(&mut conn, coupon.id).is_empty());
    assert!(first.id < second.id && second.id < third.id);
}

// ---------------------------------------------------------------------------------------------
// 5. Redeem and restore
// ---------------------------------------------------------------------------------------------

#[test]
fn concurrent_redeems_exactly_one_wins() {
    const THREADS: usize = 8;
    let (url, mut conn) = fresh_database("coupon_redeem_race");
    let issuer = Arc::new(CouponIssuer::new());
    let (_coupon, campaign) = open_campaign_named(&mut conn, &issuer, "redeem once", 10);
    let held = issuer.issue(&mut conn, 7, campaign.id).expect("issue");

    let results: Vec<_> = concurrently(THREADS, &url, |i, conn| {
        let order = format!("order-{i}");
        (order.clone(), issuer.redeem(conn, held.id, &order))
    });
    let winners: Vec<_> = results
        .iter()
        .filter_map(|(order, r)| r.as_ref().ok().map(|c| (order, c)))
        .collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    let (winning_order, used) = winners[0];
    assert_eq!(used.status, CouponStatus::Used);
    assert_eq!(used.order_ref.as_deref(), Some(winning_order.as_str()));
    let (mut already, mut contended) = (0, 0);
    for (_, result) in &results {
        match result {
            Ok(_) => {}
            Err(Error::AlreadyRedeemed { user_coupon_id }) => {
                assert_eq!(*user_coupon_id, held.id);
                already += 1;
            }
            Err(Error::Contended { .. }) => contended += 1,
            Err(other) => panic!("unexpected answer {other:?}"),
        }
    }
    eprintln!("redeem race: 1 ok, {already} already_redeemed, {contended} contended");
    let (status, order_ref, used_at) = user_coupon_row(&mut conn, held.id);
    assert_eq!(status, "used");
    assert_eq!(order_ref.as_ref(), Some(winning_order));
    assert!(used_at.is_some());

    // Restore, then redeem again on another order.
    let restored = issuer
        .restore(&mut conn, held.id, winning_order)
        .expect("restore");
    assert_eq!(restored.status, CouponStatus::Issued);
    assert_eq!(
        user_coupon_row(&mut conn, held.id),
        ("issued".into(), None, None)
    );
    match issuer.restore(&mut conn, held.id, winning_order) {
        Err(Error::NotRedeemed { user_coupon_id }) => assert_eq!(user_coupon_id, held.id),
        other => panic!("restore of a held coupon: expected NotRedeemed, got {other:?}"),
    }
    let again = issuer
        .redeem(&mut conn, held.id, "order-again")
        .expect("redeem after restore");
    assert_eq!(again.order_ref.as_deref(), Some("order-again"));
    let (status, order_ref, _) = user_coupon_row(&mut conn, held.id);
    assert_eq!(
        (status.as_str(), order_ref.as_deref()),
        ("used", Some("order-again"))
    );
    match issuer.redeem(&mut conn, held.id, "order-third") {
        Err(Error::AlreadyRedeemed { user_coupon_id }) => assert_eq!(user_coupon_id, held.id),
        other => panic!("expected AlreadyRedeemed, got {other:?}"),
    }
}

#[test]
fn redeem_and_restore_respect_validity_and_input() {
    let (_url, mut conn) = fresh_database("coupon_validity");
    let setup = CouponIssuer::new();
    let t = time(2031, 3, 1, 9, 0, 0, 0);
    let valid_from = time(2031, 3, 10, 0, 0, 0, 500);
    let valid_until = time(2031, 3, 20, 0, 0, 0, 250_000);
    let coupon = create_coupon(&mut conn, &setup, "later", valid_from, valid_until);
    let campaign = create_campaign(
        &mut conn,
        &setup,
        coupon.id,
        5,
        t - Duration::hours(1),
        t + Duration::hours(1),
    );
    let clock = ManualClock::at(t);
    let issuer = CouponIssuer::new().with_clock(clock.clock());
    let held = issuer.issue(&mut conn, 11, campaign.id).expect("issue");

    // Not yet valid: refused, nothing written.
    clock.set(valid_from - us(1));
    match issuer.redeem(&mut conn, held.id, "early") {
        Err(Error::CouponNotValid {
            user_coupon_id,
            valid_from: from,
            valid_until: until,
        }) => assert_eq!(
            (user_coupon_id, from, until),
            (held.id, valid_from, valid_until)
        ),
        other => panic!("redeem before valid_from: expected CouponNotValid, got {other:?}"),
    }
    assert_eq!(
        user_coupon_row(&mut conn, held.id),
        ("issued".into(), None, None)
    );

    // Valid from valid_from (inclusive).
    clock.set(valid_from);
    let used = issuer
        .redeem(&mut conn, held.id, "on-time")
        .expect("redeem at valid_from");
    assert_eq!(used.used_at, Some(valid_from));
    assert_eq!(
        user_coupon_row(&mut conn, held.id),
        ("used".into(), Some("on-time".into()), Some(valid_from))
    );

    // Expired (valid_until is exclusive): restore refused, the coupon stays used.
    clock.set(valid_until);
    assert_refused(&issuer.restore(&mut conn, held.id, "on-time"), |e| {
        matches!(e, Error::CouponNotValid { .. })
    });
    assert_eq!(
        user_coupon_row(&mut conn, held.id),
        ("used".into(), Some("on-time".into()), Some(valid_from))
    );
    // One microsecond earlier it is still valid: restore, then redeem is refused once expired.
    clock.set(valid_until - us(1));
    issuer
        .restore(&mut conn, held.id, "on-time")
        .expect("restore before valid_until");
    clock.set(valid_until + Duration::days(1));
    assert_refused(&issuer.redeem(&mut conn, held.id, "late"), |e| {
        matches!(e, Error::CouponNotValid { .. })
    });
    assert_eq!(
        user_coupon_row(&mut conn, held.id),
        ("issued".into(), None, None)
    );
    clock.set(valid_until - us(1));
    issuer
        .redeem(&mut conn, held.id, "just-in-time")
        .expect("redeem at valid_until - 1us");

    // Unknown user coupons.
    match issuer.redeem(&mut conn, held.id + 1_000, "x") {
        Err(Error::UserCouponNotFound { user_coupon_id }) => {
            assert_eq!(user_coupon_id, held.id + 1_000)
        }
        other => panic!("expected UserCouponNotFound, got {other:?}"),
    }
    assert_refused(&issuer.restore(&mut conn, held.id + 1_000, "x"), |e| {
        matches!(e, Error::UserCouponNotFound { .. })
    });

    // order_ref: 1 to 64 bytes (bytes, not characters), not ending with a space (the column
    // compares with PAD SPACE: a shop's SQL would take "o-1 " for "o-1").
    clock.set(t);
    let second = issuer.issue(&mut conn, 12, campaign.id).expect("issue");
    clock.set(valid_from);
    for bad in [
        String::new(),
        "x".repeat(MAX_ORDER_REF_BYTES + 1),
        "é".repeat(33),
        "o-1 ".to_owned(),
    ] {
        match issuer.redeem(&mut conn, second.id, &bad) {
            Err(Error::InvalidInput {
                field: "order_ref", ..
            }) => {}
            other => panic!(
                "order_ref of {} bytes: expected InvalidInput, got {other:?}",
                bad.len()
            ),
        }
    }
    assert_eq!(
        user_coupon_row(&mut conn, second.id),
        ("issued".into(), None, None)
    );
    let longest = "é".repeat(32);
    issuer
        .redeem(&mut conn, second.id, &longest)
        .expect("64-byte order_ref");
    assert_eq!(user_coupon_row(&mut conn, second.id).1, Some(longest));
}

// ---------------------------------------------------------------------------------------------
// 6. Listing and remaining
// ---------------------------------------------------------------------------------------------

#[test]
fn user_coupons_and_remaining_match_the_database() {
    let (_url, mut conn) = fresh_database("coupon_listing");
    let issuer = CouponIssuer::new();
    let (coupon_a, campaign_a) = open_campaign_named(&mut conn, &issuer, "A", 3);
    let (coupon_b, campaign_b) = open_campaign_named(&mut conn, &issuer, "B", 2);
    assert!(issuer.user_coupons(&mut conn, 1).expect("list").is_empty());

    let a1 = issuer.issue(&mut conn, 1, campaign_a.id).expect("a1");
    let a2 = issuer.issue(&mut conn, 2, campaign_a.id).expect("a2");
    let b1 = issuer.issue(&mut conn, 1, campaign_b.id).expect("b1");
    issuer
        .redeem(&mut conn, b1.id, "order-b1")
        .expect("redeem b1");

    let listed = issuer.user_coupons(&mut conn, 1).expect("list user 1");
    assert_eq!(
        listed
            .iter()
            .map(|c| (c.id, c.coupon_id, c.campaign_id, c.status))
            .collect::<Vec<_>>(),
        vec![
            (a1.id, coupon_a.id, campaign_a.id, CouponStatus::Issued),
            (b1.id, coupon_b.id, campaign_b.id, CouponStatus::Used),
        ]
    );
    assert_eq!(listed[0], a1);
    assert_eq!(listed[1].order_ref.as_deref(), Some("order-b1"));
    assert!(listed.iter().all(|c| c.user_id == 1));
    assert_eq!(
        issuer.user_coupons(&mut conn, 2).expect("list user 2"),
        vec![a2]
    );

    for campaign in [&campaign_a, &campaign_b] {
        let (total, stock) = stock_row(&mut conn, campaign.id);
        let remaining = issuer.remaining(&mut conn, campaign.id).expect("remaining");
        assert_eq!(i64::from(remaining), i64::from(stock));
        assert_eq!(
            i64::from(stock) + issued_rows(&mut conn, campaign.id),
            i64::from(total)
        );
        let read = issuer.campaign(&mut conn, campaign.id).expect("campaign");
        assert_eq!((read.total_quantity, read.stock_quantity), (total, stock));
    }
    assert_eq!(issuer.remaining(&mut conn, campaign_a.id).expect("a"), 1);
    assert_eq!(issuer.remaining(&mut conn, campaign_b.id).expect("b"), 1);
}

// ---------------------------------------------------------------------------------------------
// Restock racing with readers that see the stock at 0
// ---------------------------------------------------------------------------------------------

/// Readers that saw the stock at 0 just before a restock committed must not leave the issuer
/// answering SoldOut from memory after the restock returned.
#[test]
fn restock_is_not_undone_by_a_stale_sold_out_read() {
    // Heavy: never beside a test that asserts time bounds.
    let _storm = lockstock_testkit::fixtures::storm();
    const ROUNDS: i64 = 100;
    const READERS: usize = 3;
    let (url, mut conn) = fresh_database("coupon_restock_race");
    let issuer = Arc::new(CouponIssuer::new());
    let (_coupon, campaign) = open_campaign_named(&mut conn, &issuer, "restocked", 1);
    let mut doomed = killed_connection(&url, &mut conn);
    for round in 0..ROUNDS {
        issuer
            .issue(&mut conn, round + 1, campaign.id)
            .expect("the one coupon of the round");
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let readers: Vec<_> = (0..READERS)
            .map(|_| {
                let (url, issuer, done) = (url.clone(), issuer.clone(), done.clone());
                thread::spawn(move || {
                    let mut conn = connect(&url);
                    while !done.load(Ordering::SeqCst) {
                        issuer.remaining(&mut conn, campaign.id).expect("remaining");
                    }
                })
            })
            .collect();
        thread::sleep(std::time::Duration::from_millis(2));
        issuer
            .restock(&mut conn, campaign.id, 1, &format!("round-{round}"))
            .expect("restock");
        thread::sleep(std::time::Duration::from_millis(2));
        done.store(true, Ordering::SeqCst);
        for reader in readers {
            reader.join().expect("reader");
        }
        assert_eq!(stock_row(&mut conn, campaign.id).1, 1);
        // On a dead connection a cached SoldOut answers, an uncached campaign fails to connect.
        if let Err(Error::SoldOut { .. }) = issuer.issue(&mut doomed, 1_000_000, campaign.id) {
            panic!(
                "round {round}: stock is 1 after restock, but the issuer answers SoldOut from \
                 its cache"
            );
        }
    }
}

/// With several issuers (processes), a restock made by one reaches the others' sold-out caches
/// once their TTL has passed — the default issuer's too (one second); with `Duration::MAX` they
/// keep answering from memory. Before the fix the default issuer kept its mark for ever: in a
/// process that had seen the campaign sold out, every call answered `SoldOut` after another
/// process's restock, while the stock lasted.
#[test]
fn sold_out_ttl_lets_other_issuers_see_a_restock() {
    // "Within the TTL" is a time bound: not beside the tests that load the machine.
    let _alone = lockstock_testkit::fixtures::exclusive();
    let (_url, mut conn) = fresh_database("coupon_sold_out_ttl");
    let admin = CouponIssuer::new();
    let (_coupon, campaign) = open_campaign_named(&mut conn, &admin, "ttl", 1);
    let forever = CouponIssuer::new().with_sold_out_ttl(std::time::Duration::MAX);
    let brief = CouponIssuer::new();
    assert_eq!(
        lockstock::coupon::DEFAULT_SOLD_OUT_TTL,
        std::time::Duration::from_secs(1)
    );
    forever.issue(&mut conn, 1, campaign.id).expect("the one");
    for issuer in [&forever, &brief] {
        assert_refused(&issuer.issue(&mut conn, 2, campaign.id), |e| {
            matches!(e, Error::SoldOut { .. })
        });
    }
    admin
        .restock(&mut conn, campaign.id, 2, "restock-1")
        .expect("restock elsewhere");
    // Within the TTL both still answer from memory.
    assert_refused(&brief.issue(&mut conn, 2, campaign.id), |e| {
        matches!(e, Error::SoldOut { .. })
    });
    thread::sleep(std::time::Duration::from_millis(1050));
    brief
        .issue(&mut conn, 2, campaign.id)
        .expect("seen after the TTL");
    assert_refused(&forever.issue(&mut conn, 3, campaign.id), |e| {
        matches!(e, Error::SoldOut { .. })
    });
    assert_eq!(issued_rows(&mut conn, campaign.id), 2);
    assert_eq!(stock_row(&mut conn, campaign.id), (3, 1));
}

/// A batch's multi-row INSERT is a cached prepared statement: a second batch of the same size
/// on the connection prepares nothing (before the fix Diesel prepared every multi-row INSERT
/// again — a round trip while the campaign row is locked). Every answer is still the rows the
/// database holds.
#[test]
fn a_batch_of_a_size_seen_before_prepares_nothing() {
    let (_url, mut conn) = fresh_database("coupon_batch_prepares");
    let issuer = CouponIssuer::new();
    let (_coupon, campaign) = open_campaign_named(&mut conn, &issuer, "prepares", 100);
    let reading = statement_prepares(&mut conn);
    let read_cost = statement_prepares(&mut conn) - reading;
    let mut issued = Vec::new();
    for users in [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]] {
        let before = statement_prepares(&mut conn);
        let results = issuer
            .issue_many(&mut conn, campaign.id, &users)
            .expect("batch");
        let prepared = statement_prepares(&mut conn) - before - read_cost;
        issued.extend(results.into_iter().map(|r| r.expect("issued")));
        if users[0] == 6 {
            assert_eq!(prepared, 0, "the second batch of five prepared statements");
        }
    }
    let stored: BTreeMap<i64, i64> = user_coupon::table
        .filter(user_coupon::fcfs_coupon_id.eq(campaign.id))
        .select((user_coupon::user_id, user_coupon::id))
        .load::<(i64, i64)>(&mut conn)
        .expect("rows")
        .into_iter()
        .collect();
    let answered: BTreeMap<i64, i64> = issued.iter().map(|c| (c.user_id, c.id)).collect();
    assert_eq!(answered, stored);
    assert_eq!(stock_row(&mut conn, campaign.id), (100, 90));
}

/// A batch with more users than one statement can carry — 70,000 coupons bind 350,000 values,
/// and one prepared statement binds at most 65,535 — answers as its single issues would: every
/// user issued once, the repeat answered `AlreadyIssued` with the same coupon (the 70,000 users
/// looked up), and where the stock runs out inside the batch the first users issued and the
/// rest `SoldOut`. Before the statements were split, each of these answered an untyped server
/// error ("Prepared statement contains too many placeholders").
#[test]
fn a_batch_larger_than_one_statement_answers_as_its_single_calls() {
    const N: i64 = 70_000;
    // Loads the server for a few seconds: alone, so that no timing or fault test runs beside it.
    let _exclusive = lockstock_testkit::fixtures::exclusive();
    let (_url, mut conn) = fresh_database("coupon_huge_batch");
    let issuer = CouponIssuer::with_policy(lockstock_testkit::fixtures::policy_with_deadline(
        std::time::Duration::from_secs(120),
    ));
    let users: Vec<i64> = (1..=N).collect();

    // Stock for everyone: all issued (the INSERTs written before the stock row is locked).
    let (_, plenty) = open_campaign_named(&mut conn, &issuer, "plenty", 100_000);
    let issued: Vec<IssuedCoupon> = issuer
        .issue_many(&mut conn, plenty.id, &users)
        .expect("the batch")
        .into_iter()
        .map(|answer| answer.expect("issued"))
        .collect();
    assert!(issued.iter().zip(&users).all(|(c, u)| c.user_id == *u));
    let ids: BTreeMap<i64, i64> = issued.iter().map(|c| (c.user_id, c.id)).collect();
    assert_eq!(
        ids.values().collect::<std::collections::HashSet<_>>().len(),
        users.len()
    );
    assert_eq!(issued_rows(&mut conn, plenty.id), N);
    assert_eq!(stock_row(&mut conn, plenty.id), (100_000, 30_000));
    let stored: BTreeMap<i64, i64> = user_coupon::table
        .filter(user_coupon::fcfs_coupon_id.eq(plenty.id))
        .select((user_coupon::user_id, user_coupon::id))
        .load::<(i64, i64)>(&mut conn)
        .expect("coupons")
        .into_iter()
        .collect();
    assert_eq!(stored, ids, "what is stored is what was answered");

    // The repeat: every user holds it already.
    for answer in issuer
        .issue_many(&mut conn, plenty.id, &users)
        .expect("the repeat")
    {
        match answer {
            Err(Error::AlreadyIssued {
                user_id,
                user_coupon_id,
                ..
            }) => assert_eq!(ids.get(&user_id), Some(&user_coupon_id)),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(stock_row(&mut conn, plenty.id), (100_000, 30_000));

    // The stock runs out inside the batch: the stock row locked first, then the winners written.
    let (_, scarce) = open_campaign_named(&mut conn, &issuer, "scarce", 50_000);
    let answers = issuer
        .issue_many(&mut conn, scarce.id, &users)
        .expect("the batch");
    for (user, answer) in users.iter().zip(&answers) {
        match answer {
            Ok(coupon) if *user <= 50_000 => assert_eq!(coupon.user_id, *user),
            Err(Error::SoldOut { campaign_id }) if *user > 50_000 => {
                assert_eq!(*campaign_id, scarce.id)
            }
            other => panic!("user {user}: {other:?}"),
        }
    }
    assert_eq!(issued_rows(&mut conn, scarce.id), 50_000);
    assert_eq!(stock_row(&mut conn, scarce.id), (50_000, 0));
}

/// A clock that, once armed, stops every caller until the test lets it go: the test acts at a
/// chosen point of a running transaction (the issuer reads its clock inside it).
#[derive(Clone, Default)]
struct SteppedClock(Arc<(std::sync::Mutex<Stopped>, std::sync::Condvar)>);

#[derive(Default)]
struct Stopped {
    armed: bool,
    caller: bool,
}

impl SteppedClock {
    fn clock(&self) -> Clock {
        let this = self.clone();
        Arc::new(move || {
            let (state, changed) = &*this.0;
            let mut stopped = state.lock().expect("clock");
            if stopped.armed {
                stopped.caller = true;
                changed.notify_all();
                while stopped.caller {
                    stopped = changed.wait(stopped).expect("clock");
                }
            }
            now()
        })
    }

    /// Waits for a stopped caller (true) or for `done` (false).
    fn stopped(&self, done: &dyn Fn() -> bool) -> bool {
        let (state, changed) = &*self.0;
        let mut stopped = state.lock().expect("clock");
        let since = Instant::now();
        loop {
            if stopped.caller {
                return true;
            }
            if done() {
                return false;
            }
            assert!(
                since.elapsed() < std::time::Duration::from_secs(60),
                "nobody read the clock"
            );
            stopped = changed
                .wait_timeout(stopped, std::time::Duration::from_millis(5))
                .expect("clock")
                .0;
        }
    }

    /// Lets the stopped caller go; `armed`: whether later callers stop too.
    fn go(&self, armed: bool) {
        let (state, changed) = &*self.0;
        let mut stopped = state.lock().expect("clock");
        stopped.armed = armed;
        stopped.caller = false;
        changed.notify_all();
    }
}

/// Whether a `FOR UPDATE NOWAIT` read by `probe` (READ COMMITTED: no gap locks; rolled back at
/// once) is refused: another session holds the row, or an uncommitted insert of it.
fn taken(
    probe: &mut MysqlConnection,
    read: impl FnOnce(&mut MysqlConnection) -> QueryResult<usize>,
) -> bool {
    probe.batch_execute("BEGIN").expect("begin");
    let answer = read(probe);
    probe.batch_execute("ROLLBACK").expect("rollback");
    match answer {
        Ok(_) => false,
        Err(e) if e.to_string().contains("Lock wait timeout") => true,
        Err(e) => panic!("probe: {e}"),
    }
}

/// An issue that holds the stock row never waits for another transaction's lock, so it never
/// closes a deadlock that the server would break by rolling back someone else's transaction.
///
/// A batch whose stock runs out inside it reads which users hold a coupon, locks the stock row
/// and then writes its winners. Here, while it holds the stock row (stopped in its clock),
/// another program runs the design note's issue under SERIALIZABLE: it reads whether one of the
/// winners holds a coupon (locking the gap that coupon would go into), then asks for the stock
/// row, inserts the coupon and takes one from the stock. Before the fix the batch's INSERT
/// waited for that gap lock while holding the stock row: a deadlock, and InnoDB rolled back the
/// other program's transaction (nothing written yet: the lighter one) as its victim. Now the
/// INSERT is refused at once, the batch rolls back and retries, the other program commits, and
/// the batch answers that user `AlreadyIssued` with the other program's coupon.
#[test]
fn a_batch_holding_the_stock_row_never_waits_for_another_transactions_coupon() {
    const STOCK: u32 = 40;
    const CONTESTED: i64 = 1_000;
    let (url, mut admin) = fresh_database("coupon_no_wait_under_lock");
    let setup = CouponIssuer::new();
    let (coupon, campaign) = open_campaign_named(&mut admin, &setup, "contested", STOCK);
    // 39 winners written before the contested one (the batch's INSERT has rows to lose), then
    // more users than the stock: the batch's first attempt finds the stock short and locks first.
    let mut users: Vec<i64> = (1..i64::from(STOCK)).collect();
    users.push(CONTESTED);
    users.extend(2_001..=2_041);
    let clock = SteppedClock::default();
    let issuer = Arc::new(
        CouponIssuer::with_policy(lockstock_testkit::fixtures::policy_with_deadline(
            std::time::Duration::from_secs(20),
        ))
        .with_clock(clock.clock()),
    );
    clock.go(true);
    let batch = {
        let (url, issuer, users) = (url.clone(), issuer.clone(), users.clone());
        thread::spawn(move || issuer.issue_many(&mut connect(&url), campaign.id, &users))
    };
    let mut probe = connect(&url);
    probe
        .batch_execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
        .expect("read committed");
    let campaign_id = campaign.id;
    // Step through the batch's clock reads until it holds the stock row and has written none of
    // its coupons: the stock was found short, and the winners are written next.
    loop {
        assert!(
            clock.stopped(&|| batch.is_finished()),
            "the batch ended without locking the stock row first"
        );
        let stock_held = taken(&mut probe, |c| {
            fcfs_coupon::table
                .find(campaign_id)
                .select(fcfs_coupon::stock_quantity)
                .for_update()
                .no_wait()
                .load::<i32>(c)
                .map(|rows| rows.len())
        });
        let contested_written = taken(&mut probe, |c| {
            user_coupon::table
                .filter(user_coupon::user_id.eq(CONTESTED))
                .filter(user_coupon::coupon_id.eq(coupon.id))
                .select(user_coupon::id)
                .for_update()
                .no_wait()
                .load::<i64>(c)
                .map(|rows| rows.len())
        });
        if stock_held && !contested_written {
            break;
        }
        clock.go(true);
    }
    // Another program's transaction, the design note's issue under SERIALIZABLE (the batch
    // read which users hold a coupon before it locked the stock row, so this read does not
    // wait): does the contested user hold one? ...
    let mut foreign = other_program(&url);
    let held: i64 = user_coupon::table
        .filter(user_coupon::user_id.eq(CONTESTED))
        .filter(user_coupon::coupon_id.eq(coupon.id))
        .count()
        .get_result(&mut foreign)
        .expect("the other program's read");
    assert_eq!(held, 0);
    // ... then, while the batch writes its winners, the stock row, the coupon, the stock.
    clock.go(false);
    assert_not_sacrificed(&mut foreign, std::time::Duration::from_millis(300), |c| {
        let stock: i32 = fcfs_coupon::table
            .find(campaign_id)
            .select(fcfs_coupon::stock_quantity)
            .for_update()
            .first(c)?;
        diesel::insert_into(user_coupon::table)
            .values((
                user_coupon::user_id.eq(CONTESTED),
                user_coupon::coupon_id.eq(coupon.id),
                user_coupon::fcfs_coupon_id.eq(campaign_id),
            ))
            .execute(c)?;
        diesel::update(fcfs_coupon::table.find(campaign_id))
            .set(fcfs_coupon::stock_quantity.eq(stock - 1))
            .execute(c)
    });
    let foreign_id: i64 = user_coupon::table
        .filter(user_coupon::user_id.eq(CONTESTED))
        .filter(user_coupon::coupon_id.eq(coupon.id))
        .select(user_coupon::id)
        .first(&mut admin)
        .expect("its coupon");

    let answers = batch.join().expect("batch").expect("the batch");
    for (user, answer) in users.iter().zip(&answers) {
        match answer {
            Ok(issued) if *user < i64::from(STOCK) => assert_eq!(issued.user_id, *user),
            Err(Error::AlreadyIssued { user_coupon_id, .. }) if *user == CONTESTED => {
                assert_eq!(*user_coupon_id, foreign_id)
            }
            Err(Error::SoldOut { .. }) if *user > 2_000 => {}
            other => panic!("user {user}: {other:?}"),
        }
    }
    assert_eq!(stock_row(&mut admin, campaign_id), (STOCK as i32, 0));
    assert_eq!(issued_rows(&mut admin, campaign_id), i64::from(STOCK));
    assert!(duplicate_holders(&mut admin, coupon.id).is_empty());
}

/// An issue never waits for another transaction's lock while it holds locks of its own (the
/// coupons a batch's INSERT wrote before the one that waits), so it never closes a deadlock in
/// which the server could roll back another program's transaction.
///
/// Another program's transaction under SERIALIZABLE reads whether user 3 holds a coupon
/// (locking the gap that coupon would go into). A batch for users 1 and 3 writes user 1's
/// coupon and reaches user 3's gap; then the other program writes a coupon for user 1. Before
/// the fix the batch's INSERT waited for the gap lock while it held user 1's new coupon, which
/// the other program's INSERT waited for: a deadlock, and InnoDB rolled back the other
/// program's transaction (nothing written: the lighter one). Now the batch's INSERT is refused
/// at once, the batch rolls back and retries, the other program commits, and the batch answers
/// user 1 `AlreadyIssued` with the other program's coupon and issues user 3's.
#[test]
fn a_batch_holding_its_coupons_never_waits_for_another_transactions_lock() {
    let (url, mut admin) = fresh_database("coupon_no_wait_holding_coupons");
    let issuer = Arc::new(CouponIssuer::with_policy(
        lockstock_testkit::fixtures::policy_with_deadline(std::time::Duration::from_secs(20)),
    ));
    let (coupon, campaign) = open_campaign_named(&mut admin, &issuer, "contested", 10);
    // User 2's coupon splits the unique index: users 1 and 3 go into different gaps.
    issuer.issue(&mut admin, 2, campaign.id).expect("user 2");
    let mut foreign = reading_the_gap_of(&url, coupon.id, 3);
    // The other program writes user 1's coupon once the batch's INSERT has met the gap lock:
    // refused (now), or waiting for it while the batch holds user 1's new coupon (before the
    // fix: the deadlock, certain).
    let mut batch_conn = connect(&url);
    let batch_id = lockstock_testkit::fixtures::connection_id(&mut batch_conn);
    let watched = crate::watch_first(&mut batch_conn, |sql| {
        sql.contains("INSERT INTO `user_coupon`")
    });
    let batch = {
        let issuer = issuer.clone();
        thread::spawn(move || issuer.issue_many(&mut batch_conn, campaign.id, &[1, 3]))
    };
    crate::until_answered_or_waiting(&mut admin, batch_id, &watched);
    assert_not_sacrificed(&mut foreign, std::time::Duration::ZERO, |c| {
        coupon_of(c, 1, (coupon.id, campaign.id))
    });
    let foreign_id: i64 = user_coupon::table
        .filter(user_coupon::user_id.eq(1))
        .filter(user_coupon::coupon_id.eq(coupon.id))
        .select(user_coupon::id)
        .first(&mut admin)
        .expect("its coupon");

    let answers = batch.join().expect("batch").expect("the batch");
    match &answers[..] {
        [Err(Error::AlreadyIssued { user_coupon_id, .. }), Ok(issued)] => {
            assert_eq!(*user_coupon_id, foreign_id);
            assert_eq!(issued.user_id, 3);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(stock_row(&mut admin, campaign.id), (10, 8));
    assert_eq!(issued_rows(&mut admin, campaign.id), 3);
    assert!(duplicate_holders(&mut admin, coupon.id).is_empty());
}

/// Another program's SERIALIZABLE transaction that read whether `user` holds the coupon
/// template `coupon_id` (none): it holds the gap that coupon would go into.
fn reading_the_gap_of(url: &str, coupon_id: i64, user: i64) -> MysqlConnection {
    let mut foreign = other_program(url);
    let held: i64 = user_coupon::table
        .filter(user_coupon::user_id.eq(user))
        .filter(user_coupon::coupon_id.eq(coupon_id))
        .count()
        .get_result(&mut foreign)
        .expect("the other program's read");
    assert_eq!(held, 0);
    foreign
}

/// Inserts `user`'s coupon of (template, campaign) on `conn`, as another program would.
fn coupon_of(
    conn: &mut MysqlConnection,
    user: i64,
    (coupon_id, campaign_id): (i64, i64),
) -> QueryResult<usize> {
    diesel::insert_into(user_coupon::table)
        .values((
            user_coupon::user_id.eq(user),
            user_coupon::coupon_id.eq(coupon_id),
            user_coupon::fcfs_coupon_id.eq(campaign_id),
        ))
        .execute(conn)
}

/// The same for a batch too large for one INSERT whose last chunk is one user: that chunk's
/// INSERT never waits either, since the batch holds the rows of the chunks before it.
///
/// Users 2 and 4 hold coupons, so user 3's coupon would go into the gap between them, which
/// another program's SERIALIZABLE read locks; the batch of 1,001 users writes users 1 and
/// 5..=1003 in its first INSERT and user 3 alone in its second. Before the fix that one-row
/// INSERT waited for the gap lock while the batch held user 1's row; the other program then
/// asked for user 1's row: a deadlock, and InnoDB rolled the other program back as its victim.
#[test]
fn a_large_batchs_last_one_user_chunk_never_waits_while_holding_its_first_chunk() {
    let (url, mut admin) = fresh_database("coupon_no_wait_last_chunk");
    let issuer = Arc::new(CouponIssuer::with_policy(
        lockstock_testkit::fixtures::policy_with_deadline(std::time::Duration::from_secs(20)),
    ));
    let (coupon, campaign) = open_campaign_named(&mut admin, &issuer, "contested", 2_000);
    for user in [2, 4] {
        issuer
            .issue(&mut admin, user, campaign.id)
            .expect("a holder");
    }
    let mut foreign = reading_the_gap_of(&url, coupon.id, 3);
    let users: Vec<i64> = std::iter::once(1).chain(5..=1003).chain([3]).collect();
    assert_eq!(users.len(), 1_001);
    let batch = {
        let (url, issuer, users) = (url.clone(), issuer.clone(), users.clone());
        thread::spawn(move || issuer.issue_many(&mut connect(&url), campaign.id, &users))
    };
    assert_not_sacrificed(&mut foreign, std::time::Duration::from_millis(500), |c| {
        coupon_of(c, 1, (coupon.id, campaign.id))
    });
    let answers = batch.join().expect("batch").expect("the batch");
    assert_eq!(answers.len(), users.len());
    assert!(
        matches!(&answers[0], Err(Error::AlreadyIssued { user_id: 1, .. })),
        "{:?}",
        answers[0]
    );
    assert!(answers[1..].iter().all(Result::is_ok), "the others issued");
    assert_eq!(stock_row(&mut admin, campaign.id), (2_000, 2_000 - 1_002));
    assert_eq!(issued_rows(&mut admin, campaign.id), 1_003);
    assert!(duplicate_holders(&mut admin, coupon.id).is_empty());
}

/// A restock, which holds the stock row when it records its key, never waits for another
/// transaction's lock there either.
///
/// Another program's transaction under SERIALIZABLE reads whether the campaign has a restock
/// under the key `r2` (locking the gap that key would go into), and then asks for the stock row.
/// Meanwhile lockstock's restock under `r2` holds the stock row and records its key. Before the
/// fix that INSERT waited for the gap lock while holding the stock row: a deadlock, and InnoDB
/// rolled back the other program's transaction (nothing written: the lighter one) as its
/// victim. Now the INSERT is refused at once, the restock rolls back and retries, the other
/// program gets the stock row and commits, and the restock then applies once.
#[test]
fn a_restock_holding_the_stock_row_never_waits_for_another_transactions_lock() {
    use lockstock::schema::fcfs_coupon_restock;
    let (url, mut admin) = fresh_database("coupon_restock_no_wait");
    let issuer = Arc::new(CouponIssuer::with_policy(
        lockstock_testkit::fixtures::policy_with_deadline(std::time::Duration::from_secs(20)),
    ));
    let (_coupon, campaign) = open_campaign_named(&mut admin, &issuer, "restocked", 10);
    // Keys on both sides of the contested one: the other program's read locks a narrow gap.
    for key in ["r1", "r3"] {
        issuer
            .restock(&mut admin, campaign.id, 1, key)
            .expect("restock");
    }
    let mut foreign = other_program(&url);
    let used: i64 = fcfs_coupon_restock::table
        .filter(fcfs_coupon_restock::fcfs_coupon_id.eq(campaign.id))
        .filter(fcfs_coupon_restock::idempotency_key.eq("r2"))
        .count()
        .get_result(&mut foreign)
        .expect("the other program's read");
    assert_eq!(used, 0);
    let restock = {
        let (url, issuer) = (url.clone(), issuer.clone());
        thread::spawn(move || issuer.restock(&mut connect(&url), campaign.id, 5, "r2"))
    };
    let seen = assert_not_sacrificed(&mut foreign, std::time::Duration::from_millis(300), |c| {
        fcfs_coupon::table
            .find(campaign.id)
            .select(fcfs_coupon::stock_quantity)
            .for_update()
            .first::<i32>(c)
    });
    // The restock had not committed when the other program got the row.
    assert_eq!(seen, 12);

    let restocked = restock.join().expect("restock").expect("the restock");
    assert_eq!(
        (restocked.total_quantity, restocked.stock_quantity),
        (17, 17)
    );
    assert_eq!(stock_row(&mut admin, campaign.id), (17, 17));
    // Once: the same key again answers as the restock left the campaign.
    let again = issuer
        .restock(&mut admin, campaign.id, 5, "r2")
        .expect("the same restock again");
    assert_eq!((again.total_quantity, again.stock_quantity), (17, 17));
    assert_eq!(stock_row(&mut admin, campaign.id), (17, 17));
}

/// An issuer at `isolation` whose clock the test steps, and a campaign `name` of `stock`
/// coupons whose batches read their users' holders first (user 1 was asked again, in a batch
/// with user 2): two coupons issued.
fn holders_read_first(
    admin: &mut MysqlConnection,
    isolation: lockstock::Isolation,
    name: &str,
    stock: u32,
) -> (SteppedClock, Arc<CouponIssuer>, Coupon, Campaign) {
    let clock = SteppedClock::default();
    let issuer = Arc::new(
        CouponIssuer::with_policy(
            lockstock_testkit::fixtures::policy_with_deadline(std::time::Duration::from_secs(20))
                .with_isolation(isolation),
        )
        .with_clock(clock.clock()),
    );
    let (coupon, campaign) = open_campaign_named(admin, &issuer, name, stock);
    issuer.issue(admin, 1, campaign.id).expect("user 1");
    let answers = issuer
        .issue_many(admin, campaign.id, &[1, 2])
        .expect("a batch with a holder");
    assert!(matches!(answers[0], Err(Error::AlreadyIssued { .. })));
    assert!(answers[1].is_ok());
    (clock, issuer, coupon, campaign)
}

/// Under READ COMMITTED or REPEATABLE READ a batch's read of which users hold a coupon is a
/// snapshot that locks nothing: another transaction may issue one of the batch's users a coupon
/// between that read and the batch's INSERT. The batch then runs again (reading the holders
/// afresh) and answers that user `AlreadyIssued`, as the single calls made in that order would.
/// Before the fix the duplicate key failed the whole batch with an untyped server error.
#[test]
fn a_coupon_issued_after_the_holders_read_is_already_issued_at_every_isolation() {
    use lockstock::Isolation;
    let (url, mut admin) = fresh_database("coupon_holders_snapshot");
    for (round, isolation) in [Isolation::RepeatableRead, Isolation::ReadCommitted]
        .into_iter()
        .enumerate()
    {
        let (clock, issuer, coupon, campaign) =
            holders_read_first(&mut admin, isolation, &format!("snapshot {round}"), 10);

        clock.go(true);
        let batch = {
            let (url, issuer) = (url.clone(), issuer.clone());
            thread::spawn(move || issuer.issue_many(&mut connect(&url), campaign.id, &[3, 4]))
        };
        // The window check before the transaction; then the issue time, read after the holders
        // and before the INSERT.
        assert!(clock.stopped(&|| batch.is_finished()), "{isolation:?}");
        clock.go(true);
        assert!(clock.stopped(&|| batch.is_finished()), "{isolation:?}");
        let other = CouponIssuer::new()
            .issue(&mut connect(&url), 3, campaign.id)
            .expect("user 3, by another caller");
        clock.go(false);
        let answers = batch.join().expect("batch").expect("the batch");
        match &answers[..] {
            [Err(Error::AlreadyIssued { user_coupon_id, .. }), Ok(issued)] => {
                assert_eq!(*user_coupon_id, other.id, "{isolation:?}");
                assert_eq!(issued.user_id, 4, "{isolation:?}");
            }
            other => panic!("{isolation:?}: {other:?}"),
        }
        assert_eq!(stock_row(&mut admin, campaign.id), (10, 6), "{isolation:?}");
        assert_eq!(issued_rows(&mut admin, campaign.id), 4, "{isolation:?}");
        assert!(duplicate_holders(&mut admin, coupon.id).is_empty());
    }
}

/// Below SERIALIZABLE, a batch attempt that locks the stock row first (after one that found
/// the stock running out in the batch) writes only its winners' coupons, so a user who was
/// issued a coupon by another call after the attempt began meets no unique index: it reads the
/// holders once it holds the stock row, and answers that user `AlreadyIssued` — as the single
/// calls made in that order would — not `SoldOut`. Before the fix the holders were read before
/// the lock (a snapshot that locks nothing), and the batch answered `[SoldOut, SoldOut]`.
#[test]
fn a_coupon_issued_before_a_lock_first_attempts_lock_is_already_issued_at_every_isolation() {
    use lockstock::Isolation;
    let (url, mut admin) = fresh_database("coupon_holders_lock_first");
    for (round, isolation) in [Isolation::RepeatableRead, Isolation::ReadCommitted]
        .into_iter()
        .enumerate()
    {
        // One coupon left.
        let (clock, issuer, coupon, campaign) =
            holders_read_first(&mut admin, isolation, &format!("lock first {round}"), 3);
        assert_eq!(stock_row(&mut admin, campaign.id), (3, 1));

        clock.go(true);
        let batch = {
            let (url, issuer) = (url.clone(), issuer.clone());
            thread::spawn(move || issuer.issue_many(&mut connect(&url), campaign.id, &[3, 4]))
        };
        // The clock's reads: the window check; the first attempt's issue time (it inserts both
        // users' coupons, finds one coupon left and runs again with the stock read first);
        // the window checked under the stock lock; the window check again; the second
        // attempt's issue time — where the other call takes the last coupon for user 3.
        for read in 0..5 {
            assert!(
                clock.stopped(&|| batch.is_finished()),
                "{isolation:?}: read {read}"
            );
            if read < 4 {
                clock.go(true);
            }
        }
        let other = CouponIssuer::new()
            .issue(&mut connect(&url), 3, campaign.id)
            .expect("user 3, by another caller");
        clock.go(false);
        let answers = batch.join().expect("batch").expect("the batch");
        match &answers[..] {
            [Err(Error::AlreadyIssued { user_coupon_id, .. }), Err(Error::SoldOut { .. })] => {
                assert_eq!(*user_coupon_id, other.id, "{isolation:?}");
            }
            other => panic!("{isolation:?}: {other:?}"),
        }
        assert_eq!(stock_row(&mut admin, campaign.id), (3, 0), "{isolation:?}");
        assert_eq!(issued_rows(&mut admin, campaign.id), 3, "{isolation:?}");
        assert!(duplicate_holders(&mut admin, coupon.id).is_empty());
    }
}

/// A batch numbers its coupons from `LAST_INSERT_ID()` by the step of the session it runs on
/// (a caller's session may set its own `auto_increment_increment`); before the fix the runner
/// kept the step of the first session it met and answered other rows' ids.
#[test]
fn a_batch_answers_its_coupons_ids_on_a_session_with_its_own_id_step() {
    use diesel::connection::SimpleConnection;
    let (url, mut conn) = fresh_database("coupon_id_step");
    let issuer = CouponIssuer::new();
    let campaign = open_campaign(&mut conn, &issuer, 10);
    for result in issuer
        .issue_many(&mut conn, campaign.id, &[1, 2])
        .expect("batch")
    {
        result.expect("issued");
    }
    let mut stepped = connect(&url);
    stepped
        .batch_execute("SET SESSION auto_increment_increment = 3")
        .expect("the caller's own step");
    let users = [3, 4, 5];
    let answers = issuer
        .issue_many(&mut stepped, campaign.id, &users)
        .expect("batch");
    for (user, answer) in users.iter().zip(answers) {
        let coupon = answer.expect("issued");
        let stored: i64 = user_coupon::table
            .find(coupon.id)
            .select(user_coupon::user_id)
            .first(&mut conn)
            .expect("the answered coupon is stored");
        assert_eq!((coupon.user_id, stored), (*user, *user));
    }
}

/// One user per template: users racing for two campaigns of ONE template — through single
/// calls and batches on campaign A, single calls and a combiner on campaign B, at every
/// isolation level — hold at most one coupon of the template each. Every `Ok` is the user's one
/// row, every `AlreadyIssued` names that row, a user whose answers are all refusals holds
/// nothing, and each campaign's stock fell by exactly the coupons it issued.
#[test]
fn users_racing_for_two_campaigns_of_one_template_hold_one_coupon_each() {
    use lockstock::combine::CombiningIssuer;
    use lockstock::Isolation;
    use std::collections::HashMap;
    const USERS: i64 = 24;
    const THREADS: usize = 8;
    let (url, mut admin) = fresh_database("coupon_two_campaigns_one_template");
    for (round, isolation) in [
        Isolation::Serializable,
        Isolation::RepeatableRead,
        Isolation::ReadCommitted,
    ]
    .into_iter()
    .enumerate()
    {
        let issuer = Arc::new(CouponIssuer::with_policy(
            lockstock_testkit::fixtures::policy_with_deadline(std::time::Duration::from_secs(20))
                .with_isolation(isolation),
        ));
        let template = lockstock_testkit::fixtures::valid_coupon(
            &mut admin,
            &issuer,
            &format!("two campaigns {round}"),
        );
        let a =
            lockstock_testkit::fixtures::open_campaign_of(&mut admin, &issuer, template.id, 100);
        let b =
            lockstock_testkit::fixtures::open_campaign_of(&mut admin, &issuer, template.id, 100);
        let combining = CombiningIssuer::new(
            lockstock_testkit::fixtures::pool(&url, 4),
            CouponIssuer::with_policy(
                lockstock_testkit::fixtures::policy_with_deadline(std::time::Duration::from_secs(
                    20,
                ))
                .with_isolation(isolation),
            ),
        );
        let base = 1_000 * (round as i64 + 1);
        let users: Vec<i64> = (base..base + USERS).collect();
        // Each thread asks for every user, from its own offset, by its own path.
        let answers: Vec<Vec<(i64, Result<IssuedCoupon, Error>)>> =
            concurrently(THREADS, &url, |thread, conn| {
                let mut mine = Vec::new();
                let order = (0..users.len()).map(|i| users[(i + thread * 5) % users.len()]);
                match thread % 4 {
                    0 => mine.extend(order.map(|u| (u, issuer.issue(conn, u, a.id)))),
                    1 => mine.extend(order.map(|u| (u, issuer.issue(conn, u, b.id)))),
                    2 => {
                        let order: Vec<i64> = order.collect();
                        for chunk in order.chunks(3) {
                            let batch = issuer
                                .issue_many(conn, a.id, chunk)
                                .unwrap_or_else(|e| panic!("{isolation:?}: a batch: {e:?}"));
                            mine.extend(chunk.iter().copied().zip(batch));
                        }
                    }
                    _ => mine.extend(order.map(|u| (u, combining.issue(u, b.id)))),
                }
                mine
            });
        let rows: Vec<(i64, i64, i64)> = user_coupon::table
            .filter(user_coupon::coupon_id.eq(template.id))
            .select((
                user_coupon::id,
                user_coupon::user_id,
                user_coupon::fcfs_coupon_id,
            ))
            .load(&mut admin)
            .expect("the template's coupons");
        let mut held: HashMap<i64, (i64, i64)> = HashMap::new();
        for (id, user, campaign) in &rows {
            assert!(
                held.insert(*user, (*id, *campaign)).is_none(),
                "{isolation:?}: user {user} holds two coupons of the template: {rows:?}"
            );
        }
        let mut ok: HashMap<i64, u32> = HashMap::new();
        for (user, answer) in answers.iter().flatten() {
            match answer {
                Ok(coupon) => {
                    *ok.entry(*user).or_default() += 1;
                    assert_eq!(
                        held.get(user),
                        Some(&(coupon.id, coupon.campaign_id)),
                        "{isolation:?}: user {user}'s Ok is its row"
                    );
                }
                Err(Error::AlreadyIssued {
                    user_id,
                    coupon_id,
                    user_coupon_id,
                }) => {
                    assert_eq!(
                        (*user_id, *coupon_id),
                        (*user, template.id),
                        "{isolation:?}"
                    );
                    assert_eq!(
                        held.get(user).map(|h| h.0),
                        Some(*user_coupon_id),
                        "{isolation:?}: user {user}'s AlreadyIssued names its row"
                    );
                }
                Err(e) if e.is_outcome_unknown() => {
                    panic!("{isolation:?}: user {user}: no fault here, yet {e:?}")
                }
                // Contended, Timeout: nothing applied (checked by the counts below).
                Err(_) => {}
            }
        }
        for user in &users {
            let oks = ok.get(user).copied().unwrap_or(0);
            assert_eq!(
                u32::from(held.contains_key(user)),
                oks,
                "{isolation:?}: user {user}: {oks} Ok answers, holding {:?}",
                held.get(user)
            );
        }
        for campaign in [&a, &b] {
            let issued = rows.iter().filter(|r| r.2 == campaign.id).count();
            let (total, stock) = stock_row(&mut admin, campaign.id);
            assert_eq!(
                i64::from(total - stock),
                i64::try_from(issued).expect("count"),
                "{isolation:?}: campaign {}",
                campaign.id
            );
        }
        let issued_all = ok.values().sum::<u32>();
        eprintln!("{isolation:?}: {issued_all} of {USERS} users issued a coupon");
    }
}
