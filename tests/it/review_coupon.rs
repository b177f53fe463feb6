//! Regression tests for the coupon findings of the independent review (findings 3, 5, 6, 9 and
//! 10f; 10e is a unit test in `src/coupon.rs`). Each test failed on the code before its fix.
//! Invariants are read back from the database after every test: stock + issued rows = total, no
//! user holds two coupons of a template, every row's template is its campaign's, and statuses
//! agree with `used_at` / `order_ref`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, ThreadId};
use std::time::Duration as StdDuration;

use chrono::{Duration, NaiveDateTime};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use lockstock::combine::CombiningIssuer;
use lockstock::coupon::Clock;
use lockstock::schema::{fcfs_coupon, fcfs_coupon_restock, user_coupon};
use lockstock::{Campaign, CouponIssuer, CouponStatus, Error, IssuedCoupon, TxnPolicy};

use lockstock_testkit::fixtures::{
    assert_none_later_than, assert_refused, campaign_rows, concurrently, connect, create_campaign,
    fresh_database, hold_stock_row, killed_connection, micros_to_time, now, open_campaign_named,
    policy_with_deadline, pool_with, row_holder, stock_row, together, user_coupon_row,
    user_coupon_rows, valid_coupon, variant, while_checked_out, CallLog,
};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// The database-wide coupon invariants; panics with `context` on the first violation.
fn check_invariants(conn: &mut MysqlConnection, context: &str) {
    let campaigns = campaign_rows(conn);
    let rows = user_coupon_rows(conn);
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

/// A campaign `name` of one coupon that user 1 holds; `issuer` answered user 2 `SoldOut`
/// (and marked it sold out).
fn sold_out_campaign(conn: &mut MysqlConnection, issuer: &CouponIssuer, name: &str) -> Campaign {
    let (_coupon, campaign) = open_campaign_named(conn, issuer, name, 1);
    issuer.issue(conn, 1, campaign.id).expect("the one");
    assert_refused(&issuer.issue(conn, 2, campaign.id), |e| {
        matches!(e, Error::SoldOut { .. })
    });
    campaign
}

/// Asserts that `result` is `NotRedeemed` for user coupon `id`.
#[track_caller]
fn assert_not_redeemed(result: &Result<IssuedCoupon, Error>, id: i64) {
    assert_refused(
        result,
        |e| matches!(e, Error::NotRedeemed { user_coupon_id } if *user_coupon_id == id),
    );
}

/// Asserts that `result` is `RedeemedByAnotherOrder` for user coupon `id`, naming `order`.
#[track_caller]
fn assert_by_another_order(result: &Result<IssuedCoupon, Error>, id: i64, order: &str) {
    assert_refused(result, |e| {
        matches!(e, Error::RedeemedByAnotherOrder { user_coupon_id, order_ref }
            if (*user_coupon_id, order_ref.as_str()) == (id, order))
    });
}

// ---------------------------------------------------------------------------------------------
// Finding 3: "redeemed once" — restore is bound to the order it reverses, redeem is retryable
// ---------------------------------------------------------------------------------------------

/// A fresh database `name` with a campaign of two coupons, one of them issued to user 7.
fn coupon_of_user_7(name: &str) -> (MysqlConnection, CouponIssuer, IssuedCoupon) {
    let (_url, mut conn) = fresh_database(name);
    let issuer = CouponIssuer::new();
    let (_coupon, campaign) = open_campaign_named(&mut conn, &issuer, "held", 2);
    let held = issuer.issue(&mut conn, 7, campaign.id).expect("issue");
    (conn, issuer, held)
}

#[test]
fn finding_3_restore_is_bound_to_its_order() {
    let (mut conn, issuer, held) = coupon_of_user_7("review_3_restore");

    // Nothing to restore yet; a malformed order is refused before anything is read.
    assert_not_redeemed(&issuer.restore(&mut conn, held.id, "order-A"), held.id);
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
    let refused = issuer.restore(&mut conn, held.id, "order-B");
    assert_by_another_order(&refused, held.id, "order-B");
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
    assert_not_redeemed(&issuer.restore(&mut conn, held.id, "order-A"), held.id);
    let on_b = issuer
        .redeem(&mut conn, held.id, "order-B")
        .expect("redeem B");
    // A duplicate cancel of A after B used the coupon must not free B's coupon.
    let refused = issuer.restore(&mut conn, held.id, "order-A");
    assert_by_another_order(&refused, held.id, "order-A");
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
    let (mut conn, issuer, held) = coupon_of_user_7("review_3_redeem_retry");

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

// ---------------------------------------------------------------------------------------------
// Finding 5: a batch answers each request as the single calls would, in order
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Window {
    Open,
    Future,
    Past,
}

struct Scenario {
    name: &'static str,
    quantity: u32,
    /// Users holding a coupon of the campaign before the batch.
    holders: &'static [i64],
    /// Whether the issuers have seen the campaign sold out before the batch.
    marked: bool,
    window: Window,
    /// A campaign id to send instead of the real one.
    campaign: Option<i64>,
    users: &'static [i64],
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "a holder after the last coupon",
        quantity: 2,
        holders: &[5],
        marked: false,
        window: Window::Open,
        campaign: None,
        users: &[7, 5],
    },
    Scenario {
        name: "a holder at stock 0",
        quantity: 1,
        holders: &[5],
        marked: false,
        window: Window::Open,
        campaign: None,
        users: &[5, 9],
    },
    Scenario {
        name: "holders around a sold-out refusal",
        quantity: 1,
        holders: &[5],
        marked: false,
        window: Window::Open,
        campaign: None,
        users: &[5, 9, 5, 9],
    },
    Scenario {
        name: "repeated users",
        quantity: 2,
        holders: &[],
        marked: false,
        window: Window::Open,
        campaign: None,
        users: &[1, 1, 2, 2, 3, 3],
    },
    Scenario {
        name: "sold out mid-batch, holders and repeats after",
        quantity: 3,
        holders: &[5],
        marked: false,
        window: Window::Open,
        campaign: None,
        users: &[1, 5, 2, 3, 5, 1, 0, 4],
    },
    Scenario {
        name: "invalid user ids",
        quantity: 2,
        holders: &[],
        marked: false,
        window: Window::Open,
        campaign: None,
        users: &[0, 4, -7, 4, i64::MIN],
    },
    Scenario {
        name: "an invalid campaign id",
        quantity: 2,
        holders: &[],
        marked: false,
        window: Window::Open,
        campaign: Some(0),
        users: &[0, 3, -1, 3],
    },
    Scenario {
        name: "an unknown campaign",
        quantity: 2,
        holders: &[],
        marked: false,
        window: Window::Open,
        campaign: Some(987_654_321),
        users: &[1, -1, 1],
    },
    Scenario {
        name: "the sold-out mark set before the batch",
        quantity: 1,
        holders: &[5],
        marked: true,
        window: Window::Open,
        campaign: None,
        users: &[5, 0, 9],
    },
    Scenario {
        name: "not started",
        quantity: 2,
        holders: &[],
        marked: false,
        window: Window::Future,
        campaign: None,
        users: &[1, 0, 2],
    },
    Scenario {
        name: "ended",
        quantity: 2,
        holders: &[],
        marked: false,
        window: Window::Past,
        campaign: None,
        users: &[1, -2, 1],
    },
    Scenario {
        name: "an empty batch",
        quantity: 1,
        holders: &[],
        marked: false,
        window: Window::Open,
        campaign: None,
        users: &[],
    },
    Scenario {
        name: "plenty of stock",
        quantity: 10,
        holders: &[2],
        marked: false,
        window: Window::Open,
        campaign: None,
        users: &[1, 2, 3, 1, 4],
    },
];

/// An answer with ids replaced by what they name, after checking them against the database.
fn describe(conn: &mut MysqlConnection, result: &Result<IssuedCoupon, Error>) -> String {
    let owner = |conn: &mut MysqlConnection, id: i64| -> (i64, i64) {
        user_coupon::table
            .find(id)
            .select((user_coupon::user_id, user_coupon::coupon_id))
            .first(conn)
            .expect("the answered user coupon exists")
    };
    match result {
        Ok(c) => {
            assert_eq!(owner(conn, c.id), (c.user_id, c.coupon_id), "{c:?}");
            format!("issued to {}", c.user_id)
        }
        Err(Error::AlreadyIssued {
            user_id,
            coupon_id,
            user_coupon_id,
        }) => {
            assert_eq!(owner(conn, *user_coupon_id), (*user_id, *coupon_id));
            format!("already issued to {user_id}")
        }
        Err(Error::SoldOut { .. }) => "sold out".into(),
        Err(Error::CampaignNotFound { campaign_id }) => format!("no campaign {campaign_id}"),
        Err(Error::InvalidId { what, id }) => format!("invalid {what} id {id}"),
        Err(Error::NotStarted { .. }) => "not started".into(),
        Err(Error::Ended { .. }) => "ended".into(),
        Err(other) => format!("unexpected {other:?}"),
    }
}

fn scenario_campaign(
    setup: &CouponIssuer,
    conn: &mut MysqlConnection,
    scenario: &Scenario,
    side: &str,
) -> i64 {
    let t = now();
    let coupon = valid_coupon(conn, setup, &format!("{} ({side})", scenario.name));
    let (starts, ends) = match scenario.window {
        Window::Open => (t - Duration::minutes(1), t + Duration::hours(1)),
        Window::Future => (t + Duration::hours(1), t + Duration::hours(2)),
        Window::Past => (t - Duration::hours(2), t - Duration::hours(1)),
    };
    let campaign = create_campaign(conn, setup, coupon.id, scenario.quantity, starts, ends);
    for &user in scenario.holders {
        setup.issue(conn, user, campaign.id).expect("holder");
    }
    campaign.id
}

#[test]
fn finding_5_batch_answers_equal_single_answers() {
    let (_url, mut conn) = fresh_database("review_5_batches");
    let setup = CouponIssuer::new();
    // Issuers that keep their sold-out marks, and issuers whose marks last no time (TTL 0: a
    // mark never answers a call, also not the next one in a batch).
    let issuer = |ttl: Option<std::time::Duration>| match ttl {
        Some(ttl) => CouponIssuer::new().with_sold_out_ttl(ttl),
        None => CouponIssuer::new().with_sold_out_ttl(std::time::Duration::MAX),
    };
    for (scenario, ttl) in SCENARIOS.iter().flat_map(|scenario| {
        [
            (scenario, None),
            (scenario, Some(std::time::Duration::ZERO)),
        ]
    }) {
        let single_campaign = scenario_campaign(&setup, &mut conn, scenario, "single");
        let batch_campaign = scenario_campaign(&setup, &mut conn, scenario, "batch");
        let singles = issuer(ttl);
        let batches = issuer(ttl);
        if scenario.marked {
            // Reading the stock at 0 sets the issuer's sold-out mark.
            assert_eq!(singles.remaining(&mut conn, single_campaign).ok(), Some(0));
            assert_eq!(batches.remaining(&mut conn, batch_campaign).ok(), Some(0));
        }
        // Twice: the second round meets holders the first made, and the issuers' marks.
        for round in 0..2 {
            let single_answers: Vec<String> = scenario
                .users
                .iter()
                .map(|&user| {
                    let result = singles.issue(
                        &mut conn,
                        user,
                        scenario.campaign.unwrap_or(single_campaign),
                    );
                    describe(&mut conn, &result)
                })
                .collect();
            let batch_answers: Vec<String> = batches
                .issue_many(
                    &mut conn,
                    scenario.campaign.unwrap_or(batch_campaign),
                    scenario.users,
                )
                .expect("the batch transaction")
                .iter()
                .map(|result| describe(&mut conn, result))
                .collect();
            assert_eq!(
                batch_answers, single_answers,
                "{} (round {round}, TTL {ttl:?}): batch (left) and single calls (right) disagree \
                 for users {:?}",
                scenario.name, scenario.users
            );
            check_invariants(&mut conn, scenario.name);
        }
        // Afterwards both issuers answer a holder, a new user and an invalid id alike.
        for user in [5, 1, 100, 0] {
            let single = singles.issue(
                &mut conn,
                user,
                scenario.campaign.unwrap_or(single_campaign),
            );
            let single = describe(&mut conn, &single);
            let batched =
                batches.issue(&mut conn, user, scenario.campaign.unwrap_or(batch_campaign));
            let batched = describe(&mut conn, &batched);
            assert_eq!(
                batched, single,
                "{}: after the batch, user {user}: issuer of the batch (left) and of the single \
                 calls (right) disagree",
                scenario.name
            );
        }
        check_invariants(&mut conn, scenario.name);
    }
}

// ---------------------------------------------------------------------------------------------
// Finding 6: the sold-out mark never outlives a restock; restocks are idempotent by key
// ---------------------------------------------------------------------------------------------

#[test]
fn finding_6_a_read_that_sees_stock_clears_the_sold_out_mark() {
    let (_url, mut conn) = fresh_database("review_6_reads");
    let issuer = CouponIssuer::new();
    let elsewhere = CouponIssuer::new();
    let campaign = sold_out_campaign(&mut conn, &issuer, "read clears");

    // Restocked by another issuer (process); this one reads the stock through remaining().
    elsewhere
        .restock(&mut conn, campaign.id, 1, "restock-1")
        .expect("restock elsewhere");
    assert_eq!(issuer.remaining(&mut conn, campaign.id).ok(), Some(1));
    let after = issuer.issue(&mut conn, 2, campaign.id);
    assert!(
        after.is_ok(),
        "remaining() read 1 left, issue answered {after:?}"
    );

    // The same through campaign().
    assert_refused(&issuer.issue(&mut conn, 3, campaign.id), |e| {
        matches!(e, Error::SoldOut { .. })
    });
    elsewhere
        .restock(&mut conn, campaign.id, 1, "restock-2")
        .expect("restock elsewhere again");
    assert_eq!(
        issuer
            .campaign(&mut conn, campaign.id)
            .map(|c| c.stock_quantity)
            .ok(),
        Some(1)
    );
    let after = issuer.issue(&mut conn, 3, campaign.id);
    assert!(
        after.is_ok(),
        "campaign() read 1 left, issue answered {after:?}"
    );
    assert_eq!(stock_row(&mut conn, campaign.id), (3, 0));
    check_invariants(&mut conn, "finding 6 reads");
}

#[test]
fn finding_6_a_restock_clears_the_sold_out_mark_whatever_its_outcome() {
    let (url, mut conn) = fresh_database("review_6_outcome");
    let issuer = CouponIssuer::new();
    let campaign = sold_out_campaign(&mut conn, &issuer, "outcome");

    // The restock's connection dies: the call fails. Whether its COMMIT reached the server is
    // unknown to the caller (OutcomeUnknown); here a restock by someone else stands in for a
    // COMMIT that did apply. The mark must not keep answering SoldOut over the new stock.
    let mut doomed = killed_connection(&url, &mut conn);
    let failed = issuer.restock(&mut doomed, campaign.id, 1, "restock-1");
    assert!(failed.is_err(), "{failed:?}");
    drop(doomed);
    let applied = CouponIssuer::new()
        .restock(&mut conn, campaign.id, 1, "restock-1")
        .expect("the restock that applied");
    let after = issuer.issue(&mut conn, 2, campaign.id);
    assert!(
        after.is_ok(),
        "stock is 1, but the issuer answers {after:?} from its mark"
    );
    assert_eq!(stock_row(&mut conn, campaign.id), (2, 0));
    // The caller retries its restock: answered with the restock's result, not applied again.
    let retried = issuer
        .restock(&mut conn, campaign.id, 1, "restock-1")
        .expect("retried restock");
    assert_eq!(retried, applied);
    assert_eq!(stock_row(&mut conn, campaign.id), (2, 0));
    check_invariants(&mut conn, "finding 6 outcome");
}

/// Restocks in the database: (campaign, key, additional).
fn restock_rows(conn: &mut MysqlConnection) -> Vec<(i64, String, i32)> {
    fcfs_coupon_restock::table
        .select((
            fcfs_coupon_restock::fcfs_coupon_id,
            fcfs_coupon_restock::idempotency_key,
            fcfs_coupon_restock::additional,
        ))
        .order(fcfs_coupon_restock::id.asc())
        .load(conn)
        .expect("restocks")
}

#[test]
fn finding_6_restock_is_idempotent_by_key() {
    let (_url, mut conn) = fresh_database("review_6_restock_key");
    let issuer = CouponIssuer::new();
    let campaign = sold_out_campaign(&mut conn, &issuer, "restocked");
    let (_other_coupon, other) = open_campaign_named(&mut conn, &issuer, "other", 1);

    let first = issuer
        .restock(&mut conn, campaign.id, 2, "restock-1")
        .expect("restock");
    assert_eq!((first.total_quantity, first.stock_quantity), (3, 2));
    issuer
        .issue(&mut conn, 2, campaign.id)
        .expect("after restock");
    // A retry (after OutcomeUnknown) of the same restock: the restock's own result, once.
    for issuer in [&issuer, &CouponIssuer::new()] {
        let retried = issuer
            .restock(&mut conn, campaign.id, 2, "restock-1")
            .expect("retried restock");
        assert_eq!(retried, first);
    }
    assert_eq!(stock_row(&mut conn, campaign.id), (3, 1), "applied twice");
    // The key with another quantity: refused, nothing written.
    match issuer.restock(&mut conn, campaign.id, 5, "restock-1") {
        Err(Error::RestockConflict {
            campaign_id,
            key,
            recorded_additional,
        }) => assert_eq!(
            (campaign_id, key.as_str(), recorded_additional),
            (campaign.id, "restock-1", 2)
        ),
        other => panic!("expected RestockConflict, got {other:?}"),
    }
    // An existing key decides even where the request itself would be refused.
    assert_refused(
        &issuer.restock(&mut conn, campaign.id, i32::MAX as u32, "restock-1"),
        |e| matches!(e, Error::RestockConflict { .. }),
    );
    assert!(matches!(
        issuer.restock(&mut conn, campaign.id, i32::MAX as u32, "restock-2"),
        Err(Error::InvalidInput {
            field: "additional",
            ..
        })
    ));
    // Bad keys and quantities are refused before anything is sent.
    for (quantity, key) in [
        (1, String::new()),
        (1, "k".repeat(65)),
        (1, "restock-1 ".to_owned()),
        (0, "restock-3".to_owned()),
    ] {
        let refused = issuer.restock(&mut conn, campaign.id, quantity, &key);
        assert!(
            matches!(
                refused,
                Err(Error::InvalidIdempotencyKey { .. } | Error::InvalidInput { .. })
            ),
            "{key:?}: {refused:?}"
        );
    }
    // Keys are per campaign.
    let elsewhere = issuer
        .restock(&mut conn, other.id, 2, "restock-1")
        .expect("the key on another campaign");
    assert_eq!((elsewhere.total_quantity, elsewhere.stock_quantity), (3, 3));
    assert_eq!(stock_row(&mut conn, campaign.id), (3, 1));
    assert_eq!(
        restock_rows(&mut conn),
        vec![
            (campaign.id, "restock-1".to_owned(), 2),
            (other.id, "restock-1".to_owned(), 2)
        ]
    );
    check_invariants(&mut conn, "finding 6 key");
}

// ---------------------------------------------------------------------------------------------
// Finding 9: the window is checked at the time of the attempt that commits
// ---------------------------------------------------------------------------------------------

/// A clock the test moves by hand, recording which threads read it.
#[derive(Clone, Default)]
struct WatchedClock {
    micros: Arc<AtomicI64>,
    readers: Arc<Mutex<HashSet<ThreadId>>>,
}

impl WatchedClock {
    fn set(&self, time: NaiveDateTime) {
        self.micros
            .store(time.and_utc().timestamp_micros(), Ordering::SeqCst);
    }

    fn readers(&self) -> usize {
        self.readers.lock().expect("readers").len()
    }

    fn clock(&self) -> Clock {
        let this = self.clone();
        Arc::new(move || {
            this.readers
                .lock()
                .expect("readers")
                .insert(thread::current().id());
            micros_to_time(this.micros.load(Ordering::SeqCst))
        })
    }
}

#[test]
fn finding_9_window_uses_the_committing_attempts_time() {
    let _exclusive = lockstock_testkit::fixtures::exclusive();
    const SINGLES: i64 = 3;
    let (url, mut conn) = fresh_database("review_9_window");
    let setup = CouponIssuer::new();
    let t = now();
    let coupon = valid_coupon(&mut conn, &setup, "closing");
    let ends = t + Duration::minutes(30);
    let campaign = create_campaign(
        &mut conn,
        &setup,
        coupon.id,
        100,
        t - Duration::hours(1),
        ends,
    );
    let clock = WatchedClock::default();
    clock.set(ends - Duration::milliseconds(1));
    let issuer = Arc::new(CouponIssuer::new().with_clock(clock.clock()));
    let before = issuer.issue(&mut conn, 1, campaign.id).expect("in time");
    assert_eq!(before.issued_at, ends - Duration::milliseconds(1));

    // Another session holds the stock row, so every attempt is refused and retried.
    let mut holder = connect(&url);
    hold_stock_row(&mut holder, campaign.id);
    clock.readers.lock().expect("readers").clear();

    let singles: Vec<_> = (0..SINGLES)
        .map(|i| {
            let (url, issuer) = (url.clone(), issuer.clone());
            thread::spawn(move || {
                let mut conn = connect(&url);
                issuer.issue(&mut conn, 10 + i, campaign.id)
            })
        })
        .collect();
    let batch = {
        let (url, issuer) = (url.clone(), issuer.clone());
        thread::spawn(move || {
            let mut conn = connect(&url);
            issuer.issue_many(&mut conn, campaign.id, &[20, 21])
        })
    };
    // Every caller has read the clock (and found the window open) before it closes; the stock
    // row is released only after it closed, so no attempt can commit before the end.
    let waiting_since = std::time::Instant::now();
    while clock.readers() < SINGLES as usize + 1 {
        assert!(
            waiting_since.elapsed() < std::time::Duration::from_secs(30),
            "callers never read the clock"
        );
        thread::sleep(std::time::Duration::from_millis(1));
    }
    thread::sleep(std::time::Duration::from_millis(20));
    clock.set(ends);
    thread::sleep(std::time::Duration::from_millis(20));
    holder.batch_execute("ROLLBACK").expect("release");

    for (i, single) in singles.into_iter().enumerate() {
        match single.join().expect("single caller") {
            Err(Error::Ended { ended_at, .. }) => assert_eq!(ended_at, ends),
            other => panic!("caller {i}: committed after the end, got {other:?}"),
        }
    }
    for (i, result) in batch
        .join()
        .expect("batch caller")
        .expect("batch transaction")
        .into_iter()
        .enumerate()
    {
        match result {
            Err(Error::Ended { ended_at, .. }) => assert_eq!(ended_at, ends),
            other => panic!("batch request {i}: committed after the end, got {other:?}"),
        }
    }
    let late: i64 = user_coupon::table
        .filter(user_coupon::fcfs_coupon_id.eq(campaign.id))
        .filter(user_coupon::issued_at.ge(ends))
        .count()
        .get_result(&mut conn)
        .expect("count");
    assert_eq!(late, 0, "coupons issued at or after issue_ends_at");
    let rows: Vec<(i64, NaiveDateTime)> = user_coupon::table
        .filter(user_coupon::fcfs_coupon_id.eq(campaign.id))
        .select((user_coupon::user_id, user_coupon::issued_at))
        .load(&mut conn)
        .expect("rows");
    assert_eq!(rows, vec![(1, before.issued_at)]);
    assert_eq!(stock_row(&mut conn, campaign.id), (100, 99));
    check_invariants(&mut conn, "finding 9");
}

// ---------------------------------------------------------------------------------------------
// Finding 9: one deadline bounds every coupon call
// ---------------------------------------------------------------------------------------------

/// The finding 9 calls' deadline, and what they may take beyond it: scheduling on two loaded
/// cores (995 ms was seen against 600 + 400 ms with other work beside the test; 632 ms once
/// against 300 + 200 ms). Before the fix calls took up to about twice their deadline, so a
/// bound of 1.6 times it still tells the two apart.
const DEADLINE: StdDuration = StdDuration::from_millis(1_000);
const SLACK: StdDuration = StdDuration::from_millis(600);

fn short_policy() -> TxnPolicy {
    policy_with_deadline(DEADLINE)
}

/// Holds the campaign's stock row and the user coupons `held` for 250 ms at a time, asking for
/// them again 10 ms after each release (waiting, so it queues behind an issuer transaction that
/// got in), until stopped: calls on them are refused most of the time, and a call that got
/// through once is often refused again in its next transaction.
fn hot_rows_holder(
    url: &str,
    campaign_id: i64,
    held: Vec<i64>,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<()> {
    // READ COMMITTED: exactly these rows. Under REPEATABLE READ its scan of user_coupon also
    // takes next-key locks up to the end of the table, on which every issue's INSERT (it comes
    // before the NOWAIT lock of the stock row) would wait until the next release.
    let session = "SET SESSION innodb_lock_wait_timeout = 30, \
                   SESSION tx_isolation = 'READ-COMMITTED'";
    let pace = (StdDuration::from_millis(250), StdDuration::from_millis(10));
    row_holder(url, session, pace, stop, move |conn| {
        let _: Vec<i32> = fcfs_coupon::table
            .find(campaign_id)
            .select(fcfs_coupon::stock_quantity)
            .for_update()
            .load(conn)
            .expect("hold the stock row");
        let _: Vec<i64> = user_coupon::table
            .filter(user_coupon::id.eq_any(&held))
            .select(user_coupon::id)
            .for_update()
            .load(conn)
            .expect("hold the user coupons");
    })
}

/// Besides a deadline's answers, a coupon call of the deadline test may find the coupon issued
/// already (a holder in `issue_many`) or not redeemed (a repeated cancel).
fn refusal(e: &Error) -> bool {
    matches!(e, Error::AlreadyIssued { .. } | Error::NotRedeemed { .. })
}

/// A single call of [`finding_9_deadline_bounds_coupon_calls`].
#[derive(Clone, Copy)]
enum Op {
    Issue(i64),
    Redeem(i64),
    Restore(i64),
    Restock,
}

/// Every coupon call of one deadline returns within deadline + 600 ms, whatever it went
/// through: `issue_many` rounds (a holder in the batch forces a second round), combined issues
/// queueing for a batch and for the one pooled connection, single issues, redeems, restores by
/// their order and restocks by key (replayed keys included) — all on rows another connection
/// holds most of the time.
///
/// Before the fix (the coupon and combiner code of fcdb60f): calls took up to about twice the
/// deadline — an `issue_many` that met the holder in its first round ran the second round on a
/// fresh deadline (510 ms), a combined batch got a fresh deadline after its queueing (577 ms),
/// and its pool checkout waited for the busy connection with r2d2's 30 s limit (652 ms).
#[test]
fn finding_9_deadline_bounds_coupon_calls() {
    let _exclusive = lockstock_testkit::fixtures::exclusive();
    const QUANTITY: u32 = 1_000;
    let (url, mut admin) = fresh_database("review_9_deadline");
    let issuer = CouponIssuer::with_policy(short_policy());
    let (_coupon, campaign) = open_campaign_named(&mut admin, &issuer, "hot", QUANTITY);
    // Users 1..=12 hold coupons to redeem, users 13..=24 coupons redeemed on "order-{id}".
    let mut to_redeem = Vec::new();
    let mut to_restore = Vec::new();
    for user in 1..=24 {
        let held = issuer.issue(&mut admin, user, campaign.id).expect("issue");
        if user <= 12 {
            to_redeem.push(held.id);
        } else {
            issuer
                .redeem(&mut admin, held.id, &format!("order-{}", held.id))
                .expect("redeem");
            to_restore.push(held.id);
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let held = [to_redeem.clone(), to_restore.clone()].concat();
    let holder = hot_rows_holder(&url, campaign.id, held, stop.clone());
    let calls: CallLog<IssuedCoupon> = CallLog::new(refusal);
    let holder_user = 1;

    // issue_many: a fresh issuer per batch, and a holder in every batch, so a batch that gets
    // the stock row meets the duplicate and runs a second round.
    let campaign_id = campaign.id;
    concurrently(6, &url, |t, conn| {
        let t = t as i64;
        for i in 0..6i64 {
            let users = [
                holder_user,
                10_000 + t * 100 + 2 * i,
                10_001 + t * 100 + 2 * i,
            ];
            let fresh = CouponIssuer::with_policy(short_policy());
            let what = format!("issue_many {users:?}");
            calls.time(
                what.clone(),
                || fresh.issue_many(conn, campaign_id, &users),
                |results| {
                    results
                        .into_iter()
                        .filter_map(|result| match result {
                            Ok(coupon) => Some(coupon),
                            Err(Error::AlreadyIssued { user_id, .. }) if user_id == holder_user => {
                                None
                            }
                            // The batch failed as a whole after it found its holder: the
                            // others share the failure, answered per request.
                            Err(
                                Error::Contended { .. }
                                | Error::Timeout { .. }
                                | Error::ServerUnresponsive { .. }
                                | Error::OutcomeUnknown { .. },
                            ) => None,
                            Err(e) => panic!("{what}: unexpected request answer {e:?}"),
                        })
                        .collect()
                },
            );
        }
    });

    // Combined issues, one pooled connection between them; every fourth asker holds a coupon.
    let pool = pool_with(&url, 1, short_policy());
    let hot = CombiningIssuer::new(pool.clone(), issuer.clone());
    // The pool's one connection is busy for the first deadline's length: checkouts wait.
    while_checked_out(&pool, DEADLINE, || {
        together(9, |t| {
            let t = t as i64;
            for i in 0..8i64 {
                let user = match i % 4 {
                    3 => 1 + t,
                    _ => 20_000 + t * 100 + i,
                };
                calls.time(
                    format!("combined issue to {user}"),
                    || hot.issue(user, campaign_id),
                    |coupon| vec![coupon],
                );
            }
        })
    });

    // Single calls: issues, redeems (and a retry by the same order), restores by their order
    // (and a repeated cancel), restocks by key (each key replayed).
    concurrently(6, &url, |t, conn| {
        let redeem = [to_redeem[2 * t], to_redeem[2 * t + 1]];
        let restore = [to_restore[2 * t], to_restore[2 * t + 1]];
        let user = 30_000 + 10 * t as i64;
        let key = format!("restock-{t}");
        // Each coupon redeemed twice (the second a retry by the same order), each restored
        // twice (the second a repeated cancel), each restock key sent twice.
        let ops = [
            Op::Issue(user),
            Op::Redeem(redeem[0]),
            Op::Restore(restore[0]),
            Op::Restock,
            Op::Redeem(redeem[1]),
            Op::Issue(user + 1),
            Op::Restore(restore[1]),
            Op::Restock,
            Op::Redeem(redeem[0]),
            Op::Restore(restore[0]),
            Op::Redeem(redeem[1]),
            Op::Restore(restore[1]),
        ];
        for op in ops {
            match op {
                Op::Issue(user) => calls.time(
                    format!("issue to {user}"),
                    || issuer.issue(conn, user, campaign_id),
                    |coupon| vec![coupon],
                ),
                Op::Redeem(id) => calls.time(
                    format!("redeem {id}"),
                    || issuer.redeem(conn, id, &format!("redeem-{id}")),
                    |coupon| vec![coupon],
                ),
                Op::Restore(id) => calls.time(
                    format!("restore {id}"),
                    || issuer.restore(conn, id, &format!("order-{id}")),
                    |coupon| vec![coupon],
                ),
                Op::Restock => calls.time(
                    format!("restock {key}"),
                    || issuer.restock(conn, campaign_id, 1, &key),
                    |_| Vec::new(),
                ),
            }
        }
    });
    stop.store(true, Ordering::SeqCst);
    holder.join().expect("holder");

    let calls = calls.take();
    assert_none_later_than("finding_9 coupons", &calls, DEADLINE + SLACK);

    // The database: stock + issued = total, one coupon per user, every answered coupon stored
    // as answered, redeems and restores applied exactly where they answered Ok.
    check_invariants(&mut admin, "finding 9 deadline");
    let mut redeemed = HashSet::new();
    let mut restored = HashSet::new();
    for coupon in calls
        .iter()
        .filter_map(|call| call.answer.as_ref().ok())
        .flatten()
    {
        let stored: (i64, i64, i64) = user_coupon::table
            .find(coupon.id)
            .select((
                user_coupon::user_id,
                user_coupon::coupon_id,
                user_coupon::fcfs_coupon_id,
            ))
            .first(&mut admin)
            .unwrap_or_else(|e| panic!("answered coupon {coupon:?} is not stored: {e}"));
        assert_eq!(
            stored,
            (coupon.user_id, coupon.coupon_id, coupon.campaign_id),
            "{coupon:?}"
        );
        match (coupon.status, coupon.order_ref.as_deref()) {
            (CouponStatus::Used, Some(order)) => {
                assert_eq!(order, format!("redeem-{}", coupon.id));
                redeemed.insert(coupon.id);
            }
            (CouponStatus::Issued, None) if to_restore.contains(&coupon.id) => {
                restored.insert(coupon.id);
            }
            (CouponStatus::Issued, None) => {}
            other => panic!("answered coupon {coupon:?}: {other:?}"),
        }
    }
    let unknown = calls
        .iter()
        .any(|call| matches!(&call.answer, Err(e) if e.starts_with("OutcomeUnknown")));
    if !unknown {
        for id in &to_redeem {
            let expected = match redeemed.contains(id) {
                true => ("used".to_owned(), Some(format!("redeem-{id}"))),
                false => ("issued".to_owned(), None),
            };
            let (status, order, _) = user_coupon_row(&mut admin, *id);
            assert_eq!((status, order), expected, "coupon {id} to redeem");
        }
        for id in &to_restore {
            let expected = match restored.contains(id) {
                true => ("issued".to_owned(), None),
                false => ("used".to_owned(), Some(format!("order-{id}"))),
            };
            let (status, order, _) = user_coupon_row(&mut admin, *id);
            assert_eq!((status, order), expected, "coupon {id} to restore");
        }
    }
    // Each restock key applied at most once, and the total is the quantity plus the restocks.
    let restocks = restock_rows(&mut admin);
    assert!(restocks.len() <= 6, "{restocks:?}");
    assert!(restocks.iter().all(|(_, _, additional)| *additional == 1));
    let (total, _) = stock_row(&mut admin, campaign.id);
    assert_eq!(
        i64::from(total),
        i64::from(QUANTITY) + restocks.len() as i64
    );
    for call in &calls {
        if let (Some(key), Ok(_)) = (call.what.strip_prefix("restock "), &call.answer) {
            assert!(
                restocks.iter().any(|(_, k, _)| k == key),
                "restock {key} answered Ok but is not recorded"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Finding 10f: one issuer used on two databases never writes a wrong template id
// ---------------------------------------------------------------------------------------------

/// Templates 1 and 2 and campaigns 1 (template `first`) and 2 (the other) in a fresh database.
fn two_campaigns(
    issuer: &CouponIssuer,
    conn: &mut MysqlConnection,
    first: i64,
) -> (Campaign, Campaign) {
    let one = valid_coupon(conn, issuer, "one");
    let two = valid_coupon(conn, issuer, "two");
    assert_eq!((one.id, two.id), (1, 2));
    let t = now();
    let (starts, ends) = (t - Duration::hours(1), t + Duration::hours(1));
    let a = create_campaign(conn, issuer, first, 10, starts, ends);
    let b = create_campaign(conn, issuer, 3 - first, 10, starts, ends);
    assert_eq!((a.id, b.id), (1, 2));
    (a, b)
}

#[test]
fn finding_10f_one_issuer_on_two_databases_writes_each_campaigns_template() {
    let (_url_a, mut a) = fresh_database("review_10f_a");
    let (_url_b, mut b) = fresh_database("review_10f_b");
    let issuer = CouponIssuer::new();
    // Campaign 1 hands out template 1 in database a and template 2 in database b.
    let (a1, _a2) = two_campaigns(&issuer, &mut a, 1);
    let (b1, b2) = two_campaigns(&issuer, &mut b, 2);
    assert_eq!((a1.id, a1.coupon_id, b1.id, b1.coupon_id), (1, 1, 1, 2));

    let check = |c: &IssuedCoupon, template: i64| {
        assert_eq!(c.coupon_id, template, "{c:?}");
    };
    check(&issuer.issue(&mut a, 1, 1).expect("a: 1"), 1);
    check(&issuer.issue(&mut b, 2, 1).expect("b: 2"), 2);
    check(&issuer.issue(&mut a, 3, 1).expect("a: 3"), 1);
    // User 5 holds template 1 in database b (from campaign 2), not template 2.
    check(
        &issuer
            .issue(&mut b, 5, b2.id)
            .expect("b: 5 from campaign 2"),
        1,
    );
    check(&issuer.issue(&mut a, 4, 1).expect("a: 4"), 1);
    check(
        &issuer.issue(&mut b, 5, 1).expect("b: 5 from campaign 1"),
        2,
    );
    check(&issuer.issue(&mut a, 6, 1).expect("a: 6"), 1);
    for c in issuer.issue_many(&mut b, 1, &[6, 7]).expect("b: batch") {
        check(&c.expect("b: batch issue"), 2);
    }
    for c in issuer.issue_many(&mut a, 1, &[7, 8]).expect("a: batch") {
        check(&c.expect("a: batch issue"), 1);
    }
    check_invariants(&mut a, "database a");
    check_invariants(&mut b, "database b");
}

/// The same where the other database lacks what the cached facts name: campaign 1 hands out
/// template 2 in database a, and database b has only template 1 — or no campaign 1 at all. The
/// issue's INSERT, sent before the campaign row is read, fails its foreign key there; the facts
/// are read again and the issue answers as in a fresh issuer (template 1's coupon,
/// `CampaignNotFound`). Before the fix: an untyped `Server` error (1452), single and batch.
#[test]
fn one_issuer_on_two_databases_refreshes_facts_the_other_database_lacks() {
    let (_url_a, mut a) = fresh_database("review_fk_a");
    let (_url_b, mut b) = fresh_database("review_fk_b");
    let (_url_c, mut c) = fresh_database("review_fk_c");
    let issuer = CouponIssuer::new();
    let (_a1, a2) = two_campaigns(&issuer, &mut a, 1);
    assert_eq!((a2.id, a2.coupon_id), (2, 2));
    // Database b: one template, campaigns 1 and 2 of it.
    let only = valid_coupon(&mut b, &issuer, "only");
    let t = now();
    let b2 = (0..2)
        .map(|_| {
            let (starts, ends) = (t - Duration::hours(1), t + Duration::hours(1));
            create_campaign(&mut b, &issuer, only.id, 10, starts, ends)
        })
        .last()
        .expect("two campaigns");
    assert_eq!((b2.id, b2.coupon_id), (2, 1));
    // Facts of campaign 2 cached from database a: template 2.
    assert_eq!(issuer.issue(&mut a, 1, 2).expect("a: 1").coupon_id, 2);
    assert_eq!(issuer.issue(&mut b, 2, 2).expect("b: 2").coupon_id, 1);
    assert_eq!(issuer.issue(&mut a, 3, 2).expect("a: 3").coupon_id, 2);
    for issued in issuer.issue_many(&mut b, 2, &[4, 5]).expect("b: batch") {
        assert_eq!(issued.expect("b: batch issue").coupon_id, 1);
    }
    // Database c has no campaign 2 (nor any template).
    assert_eq!(issuer.issue(&mut a, 6, 2).expect("a: 6").coupon_id, 2);
    let missing = issuer.issue(&mut c, 7, 2);
    assert!(
        matches!(missing, Err(Error::CampaignNotFound { campaign_id: 2 })),
        "{missing:?}"
    );
    assert_eq!(issuer.issue(&mut a, 8, 2).expect("a: 8").coupon_id, 2);
    let batch = issuer.issue_many(&mut c, 2, &[9, 10]).expect("c: batch");
    assert!(
        batch
            .iter()
            .all(|r| matches!(r, Err(Error::CampaignNotFound { campaign_id: 2 }))),
        "{batch:?}"
    );
    check_invariants(&mut a, "database a");
    check_invariants(&mut b, "database b");
}

/// A batch that reads which of its users hold the coupon (a campaign where a batch met a
/// holder) never waits in that read: it locks one user's index range after another, so a wait
/// for a later user's row — another program's uncommitted coupon — would hold the earlier
/// users' gaps, and that program inserting one of them would close a deadlock the server breaks
/// by rolling someone back. The read is wait-free: refused at once, the batch is retried until
/// its deadline (`Contended` after several attempts, each refused). Before the fix the read
/// waited, one attempt, until the statement limit stopped it at the deadline.
#[test]
fn a_batchs_holders_read_never_waits() {
    let (url, mut conn) = fresh_database("review_holders_wait_free");
    let issuer = CouponIssuer::with_policy(policy_with_deadline(StdDuration::from_millis(300)));
    let (_coupon, campaign) = open_campaign_named(&mut conn, &issuer, "holders", 10);
    // User 5 holds the coupon; a batch meets it: from now on this campaign's batches read
    // their users' holders first.
    issuer.issue(&mut conn, 5, campaign.id).expect("user 5");
    let met = issuer
        .issue_many(&mut conn, campaign.id, &[5, 6])
        .expect("a batch that meets a holder");
    assert!(
        matches!(met[0], Err(Error::AlreadyIssued { .. })),
        "{met:?}"
    );
    // Another program inserted user 2's coupon and has not committed.
    let mut other = lockstock_testkit::fixtures::other_program(&url);
    diesel::insert_into(user_coupon::table)
        .values((
            user_coupon::user_id.eq(2),
            user_coupon::coupon_id.eq(campaign.coupon_id),
            user_coupon::fcfs_coupon_id.eq(campaign.id),
            user_coupon::issued_at.eq(chrono::Utc::now().naive_utc()),
        ))
        .execute(&mut other)
        .expect("the other program's row");
    let batch = issuer.issue_many(&mut conn, campaign.id, &[1, 2]);
    other.batch_execute("ROLLBACK").expect("rollback");
    match &batch {
        Err(Error::Contended { attempts, last, .. }) => {
            assert!(*attempts > 1, "one attempt that waited: {batch:?}");
            assert_eq!(
                last.kind(),
                lockstock::ServerErrorKind::LockWaitTimeout,
                "{batch:?}"
            );
        }
        other => panic!("expected Contended, got {other:?}"),
    }
    assert_eq!(stock_row(&mut conn, campaign.id).1, 8, "users 5 and 6 only");
}

/// A batch on a campaign whose batches read their users' holders first, refused in that read
/// until its attempts run out (another program's uncommitted coupon for one user), still
/// answers a user who holds the coupon `AlreadyIssued`, as that user's single `issue` does
/// (its INSERT is refused by the unique index at once, and its coupon is read lock-free): the
/// holders are looked up without locks before the failure is answered. Before the fix the whole
/// batch was `Err(Contended)`, which tells the holder's retry that nothing was applied.
#[test]
fn a_batch_refused_in_its_holders_read_still_answers_a_holder_already_issued() {
    let (url, mut conn) = fresh_database("review_holders_refused_holder");
    let mut retry = lockstock::RetryPolicy::default();
    retry.max_attempts = 3;
    retry.deadline = StdDuration::from_secs(10);
    let issuer = CouponIssuer::with_policy(TxnPolicy::default().with_retry(retry));
    let (_coupon, campaign) = open_campaign_named(&mut conn, &issuer, "holders", 10);
    issuer.issue(&mut conn, 5, campaign.id).expect("user 5");
    issuer
        .issue_many(&mut conn, campaign.id, &[5, 6])
        .expect("a batch that meets a holder");
    let mut other = lockstock_testkit::fixtures::other_program(&url);
    diesel::insert_into(user_coupon::table)
        .values((
            user_coupon::user_id.eq(2),
            user_coupon::coupon_id.eq(campaign.coupon_id),
            user_coupon::fcfs_coupon_id.eq(campaign.id),
            user_coupon::issued_at.eq(chrono::Utc::now().naive_utc()),
        ))
        .execute(&mut other)
        .expect("the other program's row");
    let singles: Vec<String> = [5, 2]
        .iter()
        .map(|&user| variant(&issuer.issue(&mut conn, user, campaign.id)))
        .collect();
    assert_eq!(singles, ["AlreadyIssued", "Contended"]);
    let batch = issuer.issue_many(&mut conn, campaign.id, &[5, 2]);
    other.batch_execute("ROLLBACK").expect("rollback");
    let batch = batch.expect("answered per request");
    assert_eq!(batch.iter().map(variant).collect::<Vec<_>>(), singles);
    assert_eq!(stock_row(&mut conn, campaign.id).1, 8, "users 5 and 6 only");
}

/// A batch whose transaction fails as a whole (here `Contended`: another program holds the
/// stock row) still answers an invalid user id `InvalidId`, as `issue` does before it sends
/// anything; a combined issue answers an invalid id, and a campaign its issuer has seen sold
/// out, before it queues or checks a connection out. Before the fix the batch answered
/// `Err(Contended)` as a whole, and the combined calls `Timeout` when no pooled connection came
/// free in time.
#[test]
fn a_failed_batch_refuses_invalid_users_as_its_single_calls_do() {
    let (url, mut conn) = fresh_database("review_coupon_batch_bad_input");
    let setup = CouponIssuer::new();
    let (_coupon, campaign) = open_campaign_named(&mut conn, &setup, "contended", 5);
    let (_coupon, gone) = open_campaign_named(&mut conn, &setup, "gone", 1);
    let mut retry = lockstock::RetryPolicy::default();
    retry.max_attempts = 1;
    let once = CouponIssuer::with_policy(TxnPolicy::default().with_retry(retry));
    let mut holder = connect(&url);
    hold_stock_row(&mut holder, campaign.id);
    let users = [-1, 5, 0];
    let singles: Vec<String> = users
        .iter()
        .map(|&user| variant(&once.issue(&mut conn, user, campaign.id)))
        .collect();
    assert_eq!(singles, ["InvalidId", "Contended", "InvalidId"]);
    let batch = once
        .issue_many(&mut conn, campaign.id, &users)
        .expect("answered per request");
    assert_eq!(batch.iter().map(variant).collect::<Vec<_>>(), singles);
    assert!(matches!(
        once.issue_many(&mut conn, campaign.id, &[5, 6]),
        Err(Error::Contended { .. })
    ));
    holder.batch_execute("ROLLBACK").expect("rollback");

    // Combined: answered before anything is queued or checked out.
    let policy = policy_with_deadline(StdDuration::from_millis(300));
    let one = pool_with(&url, 1, policy.clone());
    let combined = CombiningIssuer::new(one.clone(), CouponIssuer::with_policy(policy));
    combined
        .issuer()
        .issue(&mut conn, 1, gone.id)
        .expect("the last one");
    assert_refused(&combined.issuer().issue(&mut conn, 2, gone.id), |e| {
        matches!(e, Error::SoldOut { .. })
    });
    let answers = while_checked_out(&one, StdDuration::from_secs(1), || {
        [
            combined.issue(-4, campaign.id),
            combined.issue(4, -9),
            combined.issue(3, gone.id),
        ]
    });
    assert_eq!(
        answers.iter().map(variant).collect::<Vec<_>>(),
        ["InvalidId", "InvalidId", "SoldOut"]
    );
    assert_eq!(stock_row(&mut conn, campaign.id), (5, 5));
    assert_eq!(stock_row(&mut conn, gone.id), (1, 0));
    check_invariants(&mut conn, "bad input in failed batches");
}

/// A call whose statement waits for a lock another transaction holds — not the hot row, which
/// is never waited for — answers by its deadline on a healthy server, typed as contention, and
/// leaves its connection usable: each transaction limits its statements to the time its call
/// has left (`max_statement_time`), and metadata-lock waits to the policy's lock wait.
///
/// Before the fix the waits ran by the session's limits (a row lock 1 s, a metadata lock
/// without a limit but the 5 s statement limit): past a 300 ms deadline, the watchdog shut the
/// connection down at deadline + grace and the call answered `ServerUnresponsive` — on its own
/// connection and on a pooled one that carries the policy's settings alike.
#[test]
fn a_lock_wait_ends_by_the_deadline_and_keeps_the_connection() {
    let _exclusive = lockstock_testkit::fixtures::exclusive();
    const DEADLINE: StdDuration = StdDuration::from_millis(300);
    let (url, mut admin) = fresh_database("review_lock_wait_deadline");
    let issuer = CouponIssuer::with_policy(policy_with_deadline(DEADLINE));
    let (_coupon, campaign) = open_campaign_named(&mut admin, &issuer, "waits", 10);
    let pool = pool_with(&url, 1, issuer.policy().clone());
    let mut own = connect(&url);
    let mut pooled = pool.get().expect("pooled");
    // Warm: the runner knows the server, the facts are cached, the statements prepared.
    issuer.issue(&mut own, 1, campaign.id).expect("warm-up");
    issuer.issue(&mut pooled, 2, campaign.id).expect("warm-up");
    let sessions_before = [
        lockstock_testkit::fixtures::session_vars(&mut own),
        lockstock_testkit::fixtures::session_vars(&mut pooled),
    ];

    // Row locks: another transaction inserted user 7's (and 8's) coupon and has not committed.
    let mut holder = connect(&url);
    holder.batch_execute("BEGIN").expect("begin");
    for user in [7, 8] {
        diesel::insert_into(user_coupon::table)
            .values((
                user_coupon::user_id.eq(user),
                user_coupon::coupon_id.eq(campaign.coupon_id),
                user_coupon::fcfs_coupon_id.eq(campaign.id),
                user_coupon::issued_at.eq(chrono::Utc::now().naive_utc()),
            ))
            .execute(&mut holder)
            .expect("the other transaction's row");
    }
    // Metadata locks: another session holds the table.
    let mut table_holder = connect(&url);
    let mut waits = Vec::new();
    for (what, user) in [("own connection", 7), ("pooled connection", 8)] {
        let conn: &mut MysqlConnection = if user == 7 { &mut own } else { &mut pooled };
        let started = std::time::Instant::now();
        let answer = issuer.issue(conn, user, campaign.id);
        waits.push((what, "row lock", answer, started.elapsed()));
    }
    holder.batch_execute("ROLLBACK").expect("release the rows");
    table_holder
        .batch_execute("LOCK TABLES user_coupon WRITE")
        .expect("lock the table");
    for (what, user) in [("own connection", 9), ("pooled connection", 10)] {
        let conn: &mut MysqlConnection = if user == 9 { &mut own } else { &mut pooled };
        let started = std::time::Instant::now();
        let answer = issuer.issue(conn, user, campaign.id);
        waits.push((what, "table lock", answer, started.elapsed()));
    }
    table_holder
        .batch_execute("UNLOCK TABLES")
        .expect("unlock the table");
    for (what, lock, answer, took) in &waits {
        eprintln!("{lock} on the {what}: {answer:?} after {took:?}");
        assert!(
            matches!(answer, Err(Error::Contended { .. })),
            "{lock} on the {what}: {answer:?}"
        );
        assert!(
            *took <= DEADLINE + SLACK,
            "{lock} on the {what} answered after {took:?}"
        );
    }
    // Both connections still work, their sessions as they were, and nothing was issued to
    // the waiting users.
    for (conn, before) in [&mut own, &mut *pooled].into_iter().zip(&sessions_before) {
        assert_eq!(&lockstock_testkit::fixtures::session_vars(conn), before);
        let saved: i64 = diesel::select(diesel::dsl::sql::<diesel::sql_types::BigInt>(
            "COUNT(COALESCE(@lockstock_lock_wait, @lockstock_mdl_wait, \
             @lockstock_statement_time, @lockstock_isolation, @lockstock_read_only, \
             @lockstock_last_insert_id))",
        ))
        .get_result(conn)
        .expect("lockstock's user variables");
        assert_eq!(saved, 0, "lockstock's saved values left in the session");
        assert!(issuer.remaining(conn, campaign.id).is_ok());
    }
    issuer
        .issue(&mut own, 7, campaign.id)
        .expect("after the wait");
    issuer
        .issue(&mut pooled, 8, campaign.id)
        .expect("after the wait");
    let issued: Vec<i64> = user_coupon::table
        .filter(user_coupon::fcfs_coupon_id.eq(campaign.id))
        .select(user_coupon::user_id)
        .order(user_coupon::user_id)
        .load(&mut admin)
        .expect("issued users");
    assert_eq!(issued, vec![1, 2, 7, 8]);
}

/// A batch of users who all hold the coupon answers `AlreadyIssued` for each, as their single
/// calls do, whatever the caller's session left in `LAST_INSERT_ID()`: the batch's INSERT
/// writes no row, and the id it reads with the campaign row is the caller's. Before the fix a
/// value no row id can have (`LAST_INSERT_ID(18446744073709551615)`) failed the whole batch
/// with an untyped `Server` error.
#[test]
fn a_batch_of_holders_answers_as_single_calls_whatever_last_insert_id_holds() {
    let (_url, mut conn) = fresh_database("review_batch_last_insert_id");
    let issuer = CouponIssuer::new();
    let (_coupon, campaign) = open_campaign_named(&mut conn, &issuer, "holders", 10);
    for user in [1, 2] {
        issuer.issue(&mut conn, user, campaign.id).expect("issue");
    }
    for stale in ["18446744073709551615", "9223372036854775808", "5"] {
        diesel::sql_query(format!("DO LAST_INSERT_ID({stale})"))
            .execute(&mut conn)
            .expect("the caller's LAST_INSERT_ID");
        let answers = issuer
            .issue_many(&mut conn, campaign.id, &[1, 2])
            .expect("batch");
        for (user, answer) in [1, 2].iter().zip(&answers) {
            assert!(
                matches!(answer, Err(Error::AlreadyIssued { user_id, .. }) if user_id == user),
                "LAST_INSERT_ID({stale}), user {user}: {answer:?}"
            );
        }
    }
    assert_eq!(stock_row(&mut conn, campaign.id).1, 8);
    check_invariants(&mut conn, "holders batch");
}

/// Dates a `DATETIME(6)` column cannot hold are refused as input, naming the field, and
/// nothing is created. Before the fix a year past 9999 reached the server (stored as a zero
/// date: the window CHECK failed as an untyped `Server` error) and a negative year failed in
/// Diesel's encoding (`Server` too).
#[test]
fn dates_a_datetime_column_cannot_hold_are_refused_as_input() {
    use chrono::NaiveDate;
    use lockstock::{Discount, NewCampaign, NewCoupon};
    let (_url, mut conn) = fresh_database("review_datetime_range");
    let issuer = CouponIssuer::new();
    let template = valid_coupon(&mut conn, &issuer, "range");
    let t = now();
    let year = |y: i32| {
        NaiveDate::from_ymd_opt(y, 6, 1)
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .expect("a date")
    };
    let outside = [
        NaiveDateTime::MIN,
        year(-1),
        year(999),
        year(10_000),
        year(67_566),
        NaiveDateTime::MAX,
    ];
    let counts = |conn: &mut MysqlConnection| -> (i64, i64) {
        (
            lockstock::schema::coupon::table
                .count()
                .get_result(conn)
                .expect("coupons"),
            fcfs_coupon::table
                .count()
                .get_result(conn)
                .expect("campaigns"),
        )
    };
    let before = counts(&mut conn);
    for at in outside {
        for (field, from, until) in [("valid_from", at, t), ("valid_until", t, at)] {
            let answer = issuer.create_coupon(
                &mut conn,
                &NewCoupon {
                    name: "outside",
                    discount: Discount::Fixed(rust_decimal::Decimal::ONE),
                    valid_from: from,
                    valid_until: until,
                },
            );
            assert!(
                matches!(answer, Err(Error::InvalidInput { field: f, .. }) if f == field),
                "{field} {at}: {answer:?}"
            );
        }
        for (field, starts, ends) in [("issue_starts_at", at, t), ("issue_ends_at", t, at)] {
            let answer = issuer.create_campaign(
                &mut conn,
                &NewCampaign {
                    coupon_id: template.id,
                    quantity: 1,
                    issue_starts_at: starts,
                    issue_ends_at: ends,
                },
            );
            assert!(
                matches!(answer, Err(Error::InvalidInput { field: f, .. }) if f == field),
                "{field} {at}: {answer:?}"
            );
        }
    }
    assert_eq!(counts(&mut conn), before, "something was created");
    // The range's ends themselves are stored and read back as given.
    let first = NaiveDate::from_ymd_opt(1000, 1, 1)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .expect("first");
    let last = NaiveDate::from_ymd_opt(9999, 12, 31)
        .and_then(|d| d.and_hms_micro_opt(23, 59, 59, 999_999))
        .expect("last");
    let widest = issuer
        .create_coupon(
            &mut conn,
            &NewCoupon {
                name: "widest",
                discount: Discount::Fixed(rust_decimal::Decimal::ONE),
                valid_from: first,
                valid_until: last,
            },
        )
        .expect("the widest validity");
    assert_eq!((widest.valid_from, widest.valid_until), (first, last));
    let stored = issuer.coupon(&mut conn, widest.id).expect("read back");
    assert_eq!((stored.valid_from, stored.valid_until), (first, last));
}

/// A batch that fails as a whole (here: the stock row held by another program past its
/// deadline) still answers the users it found holding the coupon `AlreadyIssued`, as their
/// single issues answer them — the unique index refuses their INSERT before the stock row —
/// and only the others share the failure. Before, every user got the failure (`Contended`).
#[test]
fn a_failed_batch_answers_holders_as_their_single_issues_do() {
    let (url, mut conn) = fresh_database("review_failed_batch_holders");
    let setup = CouponIssuer::new();
    let campaign = open_campaign_named(&mut conn, &setup, "held", 10).1;
    let first = setup.issue(&mut conn, 1, campaign.id).expect("user 1");
    let second = setup.issue(&mut conn, 2, campaign.id).expect("user 2");
    let mut holder = connect(&url);
    hold_stock_row(&mut holder, campaign.id);
    let short = CouponIssuer::with_policy(policy_with_deadline(StdDuration::from_millis(300)));
    let batch = short.issue_many(&mut conn, campaign.id, &[1, 7, 2]);
    let single = short.issue(&mut conn, 1, campaign.id);
    holder.batch_execute("ROLLBACK").expect("release");
    assert!(
        matches!(single, Err(Error::AlreadyIssued { user_id: 1, .. })),
        "{single:?}"
    );
    match batch.as_deref() {
        Ok(
            [Err(Error::AlreadyIssued {
                user_id: 1,
                user_coupon_id: one,
                ..
            }), Err(Error::Contended { .. } | Error::Timeout { .. }), Err(Error::AlreadyIssued {
                user_id: 2,
                user_coupon_id: two,
                ..
            })],
        ) => assert_eq!((*one, *two), (first.id, second.id)),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        lockstock_testkit::fixtures::issued_rows(&mut conn, campaign.id),
        2,
        "nothing issued"
    );
}

/// A restock retried after it applied (say after `OutcomeUnknown`) whose key cannot be looked
/// up answers `OutcomeUnknown` — here the retry is refused for the total its first attempt
/// raised to 2^31 - 1, and another program holds the restock table with `LOCK TABLES ...
/// WRITE` past the call's deadline — never the lookup's own failure (`Timeout`,
/// `Contended`), which says that nothing was applied. Once the key can be read, the retry
/// answers the campaign as the restock left it.
#[test]
fn a_refused_restock_retry_whose_key_cannot_be_looked_up_may_be_applied() {
    let (url, mut conn) = fresh_database("review_restock_lookup");
    let issuer = CouponIssuer::new();
    let campaign = lockstock_testkit::fixtures::open_campaign(&mut conn, &issuer, 2_147_483_642);
    let first = issuer
        .restock(&mut conn, campaign.id, 5, "more")
        .expect("the first restock, applied");
    assert_eq!(first.total_quantity, i32::MAX);
    let mut locker = connect(&url);
    locker
        .batch_execute("LOCK TABLES fcfs_coupon_restock WRITE")
        .expect("another program locks the restocks");
    let short = CouponIssuer::with_policy(policy_with_deadline(StdDuration::from_millis(300)));
    let retried = short.restock(&mut conn, campaign.id, 5, "more");
    locker.batch_execute("UNLOCK TABLES").expect("unlock");
    assert!(
        matches!(retried, Err(Error::OutcomeUnknown { .. })),
        "{retried:?}"
    );
    let replayed = issuer
        .restock(&mut conn, campaign.id, 5, "more")
        .expect("the retry, answered from the record");
    assert_eq!(replayed.total_quantity, i32::MAX);
    // Applied once: one record of the key, the campaign as the first restock left it.
    let records: i64 = lockstock::schema::fcfs_coupon_restock::table
        .filter(lockstock::schema::fcfs_coupon_restock::idempotency_key.eq("more"))
        .count()
        .get_result(&mut conn)
        .expect("the restock records");
    assert_eq!(records, 1);
    assert_eq!(
        lockstock_testkit::fixtures::stock_row(&mut conn, campaign.id),
        (i32::MAX, i32::MAX)
    );
}

/// An issue retried after it applied (say after `OutcomeUnknown`) is refused by the unique
/// index, and the holder's coupon is looked up; where it cannot be (here another program holds
/// the campaign table with `LOCK TABLES ... WRITE` past the call's deadline) the answer is
/// `OutcomeUnknown` — the issue is applied — never the lookup's own failure (`Contended`,
/// `Timeout`), which says that nothing was applied. Once it can be read: `AlreadyIssued`.
#[test]
fn an_issue_retry_whose_holder_cannot_be_looked_up_may_be_applied() {
    let (url, mut conn) = fresh_database("review_issue_lookup");
    let short = CouponIssuer::with_policy(policy_with_deadline(StdDuration::from_millis(300)));
    let campaign = lockstock_testkit::fixtures::open_campaign(&mut conn, &short, 10);
    let first = short
        .issue(&mut conn, 1, campaign.id)
        .expect("the first issue, applied");
    let mut locker = connect(&url);
    locker
        .batch_execute("LOCK TABLES fcfs_coupon WRITE")
        .expect("another program locks the campaigns");
    let retried = short.issue(&mut conn, 1, campaign.id);
    locker.batch_execute("UNLOCK TABLES").expect("unlock");
    assert!(
        matches!(retried, Err(Error::OutcomeUnknown { .. })),
        "{retried:?}"
    );
    let again = short.issue(&mut conn, 1, campaign.id);
    assert!(
        matches!(again, Err(Error::AlreadyIssued { user_coupon_id, .. }) if user_coupon_id == first.id),
        "{again:?}"
    );
    // The retries took nothing: one coupon, one off the stock.
    assert_eq!(
        lockstock_testkit::fixtures::stock_row(&mut conn, campaign.id),
        (10, 9)
    );
    assert_eq!(
        lockstock_testkit::fixtures::issued_rows(&mut conn, campaign.id),
        1
    );
}

/// A batch retried after it applied to one of its users (say after `OutcomeUnknown`) is refused
/// by the unique index and reads the holders among its users; where that read fails (here a
/// server account that may write coupons but not read them) every user not found holding may
/// hold its coupon from that earlier call, so each is answered `OutcomeUnknown`, as the single
/// issue whose holder cannot be looked up is — never the read's failure as the batch's outer
/// `Err`, which says that no request was applied. Before the fix: `Err(Server)` ("SELECT
/// command denied").
#[test]
fn a_batch_whose_holders_cannot_be_read_after_a_clash_may_be_applied() {
    let database = "review_batch_blind";
    let (url, mut admin) = fresh_database(database);
    let issuer = CouponIssuer::new();
    let campaign = lockstock_testkit::fixtures::open_campaign(&mut admin, &issuer, 10);
    let first = issuer
        .issue(&mut admin, 1, campaign.id)
        .expect("the first issue, applied");
    let user = "lockstock_coupon_blind";
    let restricted = crate::review_ledger::restricted_url(
        &url,
        &mut admin,
        (database, user),
        &[
            ("SELECT, UPDATE", "fcfs_coupon"),
            ("SELECT", "coupon"),
            ("INSERT", "user_coupon"),
        ],
    );
    let mut blind = connect(restricted.url());
    let denied_unknown = crate::review_ledger::is_denied_outcome_unknown::<IssuedCoupon>;

    let single = CouponIssuer::new().issue(&mut blind, 1, campaign.id);
    assert!(denied_unknown(&single), "{single:?}");
    let results = match CouponIssuer::new().issue_many(&mut blind, campaign.id, &[1, 2, -3]) {
        Ok(results) => results,
        Err(e) => panic!("user 1 holds the coupon, but the call answered {e:?}"),
    };
    assert_eq!(results.len(), 3);
    assert!(denied_unknown(&results[0]), "{:?}", results[0]);
    assert!(denied_unknown(&results[1]), "{:?}", results[1]);
    assert!(
        matches!(results[2], Err(Error::InvalidId { id: -3, .. })),
        "{:?}",
        results[2]
    );

    // Every user id valid: before the fix the outer `Err`.
    let results = match CouponIssuer::new().issue_many(&mut blind, campaign.id, &[2, 1]) {
        Ok(results) => results,
        Err(e) => panic!("user 1 holds the coupon, but the call answered {e:?}"),
    };
    assert!(results.iter().all(denied_unknown), "{results:?}");

    // Nothing more was issued: user 1's first coupon only, the stock as it left it.
    let rows = user_coupon_rows(&mut admin);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].0, first.id);
    assert_eq!(stock_row(&mut admin, campaign.id), (10, 9));
    let again = issuer
        .issue_many(&mut admin, campaign.id, &[1])
        .expect("batch");
    assert!(
        matches!(again[0], Err(Error::AlreadyIssued { user_coupon_id, .. }) if user_coupon_id == first.id),
        "{:?}",
        again[0]
    );
    check_invariants(&mut admin, "after the blind batch");
}

/// A redeem (and a restore) never waits for a lock while it holds the coupon's row: its read of
/// the template's validity window, which SERIALIZABLE turns into a shared lock, is refused at
/// once where another transaction holds the template (the runner rolls back and retries), so
/// it cannot close a deadlock in which the server rolls back another program's transaction —
/// here one holding the template that then asks for the coupon's row. Before the fix the read
/// waited for the template with the coupon's row held (seen running for its whole time limit).
#[test]
fn a_redeem_never_waits_for_the_template_while_it_holds_the_coupon() {
    #[derive(QueryableByName)]
    struct Waiting {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        waiting: i64,
    }
    let database = "review_redeem_template";
    let (url, mut conn) = fresh_database(database);
    let issuer = CouponIssuer::with_policy(policy_with_deadline(StdDuration::from_millis(800)));
    let campaign = lockstock_testkit::fixtures::open_campaign(&mut conn, &issuer, 10);
    let held = issuer.issue(&mut conn, 7, campaign.id).expect("issue");
    let mut foreign = lockstock_testkit::fixtures::other_program(&url);
    diesel::sql_query("SELECT id FROM coupon WHERE id = ? FOR UPDATE")
        .bind::<diesel::sql_types::BigInt, _>(held.coupon_id)
        .execute(&mut foreign)
        .expect("another program holds the template");
    let mut redeemer = connect(&url);
    let redeemer_id = lockstock_testkit::fixtures::connection_id(&mut redeemer);
    let redeem = {
        let issuer = issuer.clone();
        let id = held.id;
        thread::spawn(move || issuer.redeem(&mut redeemer, id, "order-T"))
    };
    // Sampled while the redeem runs: its connection seen in a statement on the template for
    // over 200 ms is waiting for the template's lock (a refused read takes well under a
    // millisecond; one that waits, its whole time limit).
    let mut observer = connect(&url);
    let mut waits = 0;
    while !redeem.is_finished() {
        let now: Waiting = diesel::sql_query(
            "SELECT COUNT(*) AS waiting FROM information_schema.PROCESSLIST \
             WHERE ID = ? AND INFO LIKE '%`coupon`%' AND TIME_MS > 200",
        )
        .bind::<diesel::sql_types::BigInt, _>(redeemer_id)
        .get_result(&mut observer)
        .expect("processlist");
        waits += now.waiting;
        thread::sleep(StdDuration::from_millis(2));
    }
    let answer = redeem.join().expect("the redeem");
    // The other program, never a deadlock victim, takes the coupon's row and commits.
    lockstock_testkit::fixtures::assert_not_sacrificed(&mut foreign, StdDuration::ZERO, |c| {
        diesel::sql_query("SELECT id FROM user_coupon WHERE id = ? FOR UPDATE")
            .bind::<diesel::sql_types::BigInt, _>(held.id)
            .execute(c)
    });
    assert_eq!(
        waits, 0,
        "the redeem waited for the template while holding the coupon"
    );
    assert!(
        matches!(answer, Err(Error::Contended { .. })),
        "the template was held for the whole call: {answer:?}"
    );
    let (status, order_ref, _) = user_coupon_row(&mut conn, held.id);
    assert_eq!(
        (status.as_str(), order_ref),
        ("issued", None),
        "nothing applied"
    );
    let redeemed = issuer
        .redeem(&mut conn, held.id, "order-T")
        .expect("the redeem once the template is free");
    assert_eq!(redeemed.order_ref.as_deref(), Some("order-T"));
}

/// A batch that locked the stock row above zero clears the issuer's sold-out mark however it
/// ends, as a single issue that saw the stock does: here the mark is set (a single issue read
/// zero) and another issuer restocks while the batch is on its way to the row, and the batch
/// then fails after its lock read (its connection killed). Before, only a batch that committed
/// cleared the mark, and the issuer answered `SoldOut` from memory over the new stock.
#[test]
fn a_failed_batch_that_saw_stock_clears_the_sold_out_mark() {
    let (url, mut conn) = fresh_database("review_batch_saw_stock");
    let setup = CouponIssuer::new();
    let (_coupon, campaign) = open_campaign_named(&mut conn, &setup, "batch saw stock", 1);
    setup.issue(&mut conn, 1, campaign.id).expect("the one");

    // The batch's thread reports each of its clock reads and waits for a go.
    let (reads_tx, reads) = std::sync::mpsc::channel::<usize>();
    let (go, go_rx) = std::sync::mpsc::channel::<()>();
    let batch_thread: Arc<Mutex<Option<ThreadId>>> = Arc::default();
    let clock: Clock = {
        let (reads_tx, go_rx) = (Mutex::new(reads_tx), Mutex::new(go_rx));
        let (batch_thread, count) = (batch_thread.clone(), AtomicI64::new(0));
        Arc::new(move || {
            if *batch_thread.lock().expect("thread") == Some(thread::current().id()) {
                let n = count.fetch_add(1, Ordering::SeqCst) as usize + 1;
                reads_tx.lock().expect("reads").send(n).expect("test gone");
                go_rx.lock().expect("go").recv().expect("test gone");
            }
            now()
        })
    };
    let issuer = Arc::new(CouponIssuer::new().with_clock(clock));
    let mut batch_conn = connect(&url);
    let batch_id = lockstock_testkit::fixtures::connection_id(&mut batch_conn);
    let batch = {
        let (issuer, batch_thread) = (issuer.clone(), batch_thread.clone());
        thread::spawn(move || {
            *batch_thread.lock().expect("thread") = Some(thread::current().id());
            issuer.issue_many(&mut batch_conn, campaign.id, &[5, 6])
        })
    };
    let next_read = || {
        reads
            .recv_timeout(StdDuration::from_secs(30))
            .expect("the batch reads the clock")
    };
    // 1: the window check before the batch's transaction. The issuer marks the campaign sold
    // out (a single issue reads zero), then another issuer restocks it.
    assert_eq!(next_read(), 1);
    assert_refused(&issuer.issue(&mut conn, 2, campaign.id), |e| {
        matches!(e, Error::SoldOut { .. })
    });
    CouponIssuer::new()
        .restock(&mut conn, campaign.id, 10, "restock-1")
        .expect("restock elsewhere");
    go.send(()).expect("go");
    // 2: the attempt's time; 3: the window check with the stock row locked (10 left). The
    // batch's session is killed before its UPDATE.
    assert_eq!(next_read(), 2);
    go.send(()).expect("go");
    assert_eq!(next_read(), 3);
    conn.batch_execute(&format!("KILL CONNECTION {batch_id}"))
        .expect("kill the batch's session");
    go.send(()).expect("go");
    // A 4th read (a retry after the kill: what this test guards against) is not waited for.
    drop(go);
    let failed = batch.join().expect("batch thread");
    let failed_all = match &failed {
        Err(_) => true,
        Ok(results) => results.iter().all(Result::is_err),
    };
    assert!(failed_all, "the batch applied: {failed:?}");
    assert_eq!(stock_row(&mut conn, campaign.id), (11, 10));

    let after = issuer.issue(&mut conn, 7, campaign.id);
    assert!(
        after.is_ok(),
        "10 in stock, and the batch saw them; the issuer answers {after:?} from its mark"
    );
    check_invariants(&mut conn, "failed batch saw stock");
}

/// On a server switched to `read_only`, a user who holds the coupon gets `AlreadyIssued` from
/// the single issue and from every batch, and anyone else the refusal (1290). Before, the
/// answer for a holder depended on the path: a batch of a campaign that had seen repeat askers
/// read the holders first and answered `AlreadyIssued`, while the single issue (its INSERT
/// refused before the unique index) and any other batch answered the 1290. The calls run as a
/// user without `READ_ONLY ADMIN` (root writes through `read_only`), on a server of their own.
#[test]
fn a_holder_on_a_read_only_server_is_answered_alike_by_every_path() {
    let _load = lockstock_testkit::fixtures::storm();
    let sandbox = lockstock_testkit::Sandbox::start().expect("a private server");
    let (_, mut root, app_url) =
        super::review_runner::database_with_app_user(&sandbox, "review_coupon_read_only");
    let seen_repeats = CouponIssuer::new();
    let campaign = lockstock_testkit::fixtures::open_campaign(&mut root, &seen_repeats, 10);
    for holder in [1, 5] {
        seen_repeats
            .issue(&mut root, holder, campaign.id)
            .expect("a holder");
    }
    // A repeat asker: this issuer's batches of the campaign read the holders first.
    let answers = seen_repeats
        .issue_many(&mut root, campaign.id, &[1, 2])
        .expect("answered per request");
    assert!(
        matches!(answers[0], Err(Error::AlreadyIssued { .. })),
        "{answers:?}"
    );
    let before = stock_row(&mut root, campaign.id);
    let holders_before = user_coupon_rows(&mut root).len();

    root.batch_execute("SET GLOBAL read_only = 1")
        .expect("read-only");
    let mut app = connect(&app_url);
    let fresh = CouponIssuer::new();
    let single_holder = fresh.issue(&mut app, 1, campaign.id);
    let single_other = fresh.issue(&mut app, 3, campaign.id);
    let batch_seen = seen_repeats.issue_many(&mut app, campaign.id, &[1, 3]);
    let batch_fresh = CouponIssuer::new().issue_many(&mut app, campaign.id, &[1, 3]);
    let batch_holders = CouponIssuer::new().issue_many(&mut app, campaign.id, &[1, 5]);
    root.batch_execute("SET GLOBAL read_only = 0")
        .expect("writable again");

    let held = |answer: &Result<IssuedCoupon, Error>| matches!(answer, Err(Error::AlreadyIssued { user_id, .. }) if *user_id == 1 || *user_id == 5);
    let read_only = |answer: &Result<IssuedCoupon, Error>| matches!(answer, Err(e) if e.server_kind() == Some(lockstock::ServerErrorKind::ReadOnly));
    assert!(held(&single_holder), "the single issue: {single_holder:?}");
    assert!(
        read_only(&single_other),
        "the single issue: {single_other:?}"
    );
    for (what, batch) in [("repeat askers seen", batch_seen), ("fresh", batch_fresh)] {
        let answers = batch.expect("answered per request");
        assert!(held(&answers[0]), "{what}: {answers:?}");
        assert!(read_only(&answers[1]), "{what}: {answers:?}");
    }
    let answers = batch_holders.expect("answered per request");
    assert!(answers.iter().all(held), "holders only: {answers:?}");
    // Nothing was written.
    assert_eq!(stock_row(&mut root, campaign.id), before);
    assert_eq!(user_coupon_rows(&mut root).len(), holders_before);
    check_invariants(&mut root, "after a read-only server");
}

/// A batch of more users than one INSERT writes (1,000 each) sends no INSERT after the first
/// once its deadline has passed: it answers `Timeout` and issues nothing. A trigger makes the
/// first coupon of the first INSERT take 1 s and of the second 1.2 s, so the deadline (2 s)
/// passes while the second runs (the watchdog's grace is 2 s; steps ~0.7 s from the next
/// bound, as in the ledger's test). Before the fix the batch went on past its deadline — the
/// third INSERT, the stock row, the COMMIT — and issued all 2,500 coupons.
#[test]
fn a_batch_of_several_inserts_sends_none_past_its_deadline() {
    let (_url, mut conn) = fresh_database("review_coupon_pieces_deadline");
    let setup = CouponIssuer::new();
    let campaign = lockstock_testkit::fixtures::open_campaign(&mut conn, &setup, 3_000);
    conn.batch_execute(
        "CREATE TRIGGER slow_pieces BEFORE INSERT ON user_coupon FOR EACH ROW \
         IF NEW.user_id = 1 THEN SET @slept = SLEEP(1); \
         ELSEIF NEW.user_id = 1001 THEN SET @slept = SLEEP(1.2); END IF",
    )
    .expect("trigger");
    let users: Vec<i64> = (1..=2_500).collect();
    let mut policy = TxnPolicy::default().with_retry(lockstock_testkit::fixtures::retry_policy(
        1,
        StdDuration::from_secs(2),
    ));
    policy.unresponsive_grace = StdDuration::from_secs(2);
    let short = CouponIssuer::with_policy(policy);
    let answer = short.issue_many(&mut conn, campaign.id, &users);
    assert!(
        matches!(answer, Err(Error::Timeout { .. })),
        "answered {:?}",
        answer.as_ref().map(Vec::len)
    );
    conn.batch_execute("DROP TRIGGER slow_pieces")
        .expect("drop trigger");
    assert_eq!(stock_row(&mut conn, campaign.id), (3_000, 3_000));
    assert_eq!(
        lockstock_testkit::fixtures::issued_rows(&mut conn, campaign.id),
        0
    );
    check_invariants(&mut conn, "after a batch past its deadline");
}
