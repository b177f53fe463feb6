//! Batch transactions and request combining pass the same invariants as the single-request
//! paths under 64 concurrent callers: no over-issue, no duplicate holder, no negative balance,
//! keys applied once. Everything is checked from the database afterwards.

use std::collections::HashMap;
use std::sync::{Arc, Barrier, Mutex};
use std::thread;

use diesel::prelude::*;
use lockstock::combine::{CombiningIssuer, CombiningLedger};
use lockstock::schema::{balance_history, fcfs_coupon, user_coupon};
use lockstock::{AccountOp, BalanceLedger, CouponIssuer, Error, StockRowWait};
use rust_decimal::Decimal;

use lockstock_testkit::fixtures::{assert_refused, connect, fresh_database, open_campaign, pool};

use crate::review_runner::private_database;

fn issued_rows(conn: &mut MysqlConnection, campaign_id: i64) -> (i64, i32, i64) {
    let rows: i64 = user_coupon::table
        .filter(user_coupon::fcfs_coupon_id.eq(campaign_id))
        .count()
        .get_result(conn)
        .expect("count");
    let stock: i32 = fcfs_coupon::table
        .find(campaign_id)
        .select(fcfs_coupon::stock_quantity)
        .first(conn)
        .expect("stock");
    let duplicate_users: i64 = diesel::sql_query(
        "SELECT user_id FROM user_coupon GROUP BY user_id, coupon_id HAVING COUNT(*) > 1",
    )
    .execute(conn)
    .expect("duplicates") as i64;
    (rows, stock, duplicate_users)
}

#[test]
fn issue_many_decides_each_request_in_order() {
    let (_url, mut conn) = fresh_database("combine_issue_many");
    let issuer = CouponIssuer::new();
    let id = open_campaign(&mut conn, &issuer, 3).id;
    let held = issuer.issue(&mut conn, 5, id).expect("held before");
    // 7 twice, 5 already holds, -1 invalid; stock 2 left for 7, 8, 9, 10 in that order.
    // The answers are those of single issue calls made in this order.
    let results = issuer
        .issue_many(&mut conn, id, &[7, 7, 5, -1, 8, 9, 10, 8])
        .expect("batch");
    let first = results[0].as_ref().expect("7 issued");
    assert_eq!(first.user_id, 7);
    assert_refused(
        &results[1],
        |e| matches!(e, Error::AlreadyIssued { user_id: 7, user_coupon_id, .. } if *user_coupon_id == first.id),
    );
    assert_refused(
        &results[2],
        |e| matches!(e, Error::AlreadyIssued { user_id: 5, user_coupon_id, .. } if *user_coupon_id == held.id),
    );
    assert_refused(&results[3], |e| {
        matches!(e, Error::InvalidId { id: -1, .. })
    });
    assert_eq!(results[4].as_ref().expect("8 issued").user_id, 8);
    assert_refused(&results[5], |e| matches!(e, Error::SoldOut { .. }));
    assert_refused(&results[6], |e| matches!(e, Error::SoldOut { .. }));
    // 8 holds one now, but 9's refusal set the sold-out mark: single calls in this order
    // would answer 8 from the mark, and so does the batch.
    assert_refused(&results[7], |e| matches!(e, Error::SoldOut { .. }));
    let (rows, stock, duplicates) = issued_rows(&mut conn, id);
    assert_eq!((rows, stock, duplicates), (3, 0, 0));
    // Every returned id is the row the database holds for that user.
    let ids: HashMap<i64, i64> = user_coupon::table
        .filter(user_coupon::fcfs_coupon_id.eq(id))
        .select((user_coupon::user_id, user_coupon::id))
        .load::<(i64, i64)>(&mut conn)
        .expect("rows")
        .into_iter()
        .collect();
    assert_eq!(ids.get(&7), Some(&first.id));
    // The sold-out cache answers the next batch without a transaction.
    let again = issuer.issue_many(&mut conn, id, &[11]).expect("batch");
    assert!(matches!(again[0], Err(Error::SoldOut { .. })));
}

#[test]
fn apply_many_is_sequential_per_request() {
    let (_url, mut conn) = fresh_database("combine_apply_many");
    let ledger = BalanceLedger::new();
    let d = Decimal::new;
    let ops = vec![
        AccountOp::deduct(d(15, 0), "d1"), // no account yet: AccountNotFound, as the single call
        AccountOp::charge(d(10, 0), "c1"),
        AccountOp::deduct(d(15, 0), "d2"), // 10 < 15: refused, nothing written
        AccountOp::charge(d(10, 0), "c2"),
        AccountOp::deduct(d(15, 0), "d2"), // same key retried after the refusal: now applies
        AccountOp::deduct(d(15, 0), "d2"), // same key, same request: the same entry
        AccountOp::charge(d(5, 0), "c1"),  // same key, different request: conflict
        AccountOp::charge(d(0, 0), "bad"), // invalid amount: its own error only
        AccountOp::charge(d(1, 4), "fine"),
    ];
    let results = ledger.apply_many(&mut conn, 3, &ops).expect("batch");
    assert_refused(&results[0], |e| {
        matches!(e, Error::AccountNotFound { user_id: 3 })
    });
    assert_eq!(results[1].as_ref().expect("c1").balance_after, d(10, 0));
    assert_refused(&results[2], |e| {
        matches!(e, Error::InsufficientBalance { .. })
    });
    assert_eq!(results[3].as_ref().expect("c2").balance_after, d(20, 0));
    let d2 = results[4].as_ref().expect("d2");
    assert_eq!(d2.balance_after, d(5, 0));
    assert_eq!(results[5].as_ref().expect("d2 again").id, d2.id);
    let c1 = results[1].as_ref().expect("c1").id;
    assert_refused(
        &results[6],
        |e| matches!(e, Error::IdempotencyConflict { existing_entry_id, .. } if *existing_entry_id == c1),
    );
    assert_refused(&results[7], |e| matches!(e, Error::InvalidAmount { .. }));
    assert_eq!(
        results[8].as_ref().expect("fine").balance_after,
        d(50_001, 4)
    );
    // Replaying the whole batch changes nothing and answers the same.
    let replay = ledger.apply_many(&mut conn, 3, &ops).expect("replay");
    // d1 was never written: still refused. d2 was: its key now answers, whatever the balance.
    assert_refused(&replay[0], |e| {
        matches!(e, Error::InsufficientBalance { .. })
    });
    assert_eq!(replay[2].as_ref().expect("d2 exists").id, d2.id);
    assert_eq!(replay[4].as_ref().expect("d2").id, d2.id);
    assert_eq!(
        replay[8].as_ref().expect("fine").id,
        results[8].as_ref().expect("fine").id
    );
    let entries: i64 = balance_history::table
        .count()
        .get_result(&mut conn)
        .expect("count");
    assert_eq!(entries, 4);
    ledger.audit(&mut conn, 3).expect("audit");
}

#[test]
fn combining_issuer_never_over_issues_under_64_callers() {
    // Heavy: never beside a test that asserts time bounds.
    let _storm = lockstock_testkit::fixtures::storm();
    let (url, mut conn) = fresh_database("combine_issuer");
    let issuer = CouponIssuer::new();
    let id = open_campaign(&mut conn, &issuer, 500).id;
    let hot = Arc::new(CombiningIssuer::new(pool(&url, 8), issuer));
    let barrier = Arc::new(Barrier::new(64));
    let workers: Vec<_> = (0..64i64)
        .map(|t| {
            let (hot, barrier) = (hot.clone(), barrier.clone());
            thread::spawn(move || {
                barrier.wait();
                let mut outcomes: HashMap<&'static str, u32> = HashMap::new();
                // 2,000 distinct users, each asked twice by different threads.
                for i in 0..62i64 {
                    let user = 1 + (t * 31 + i) % 2_000;
                    let label = match hot.issue(user, id) {
                        Ok(_) => "issued",
                        Err(Error::SoldOut { .. }) => "sold_out",
                        Err(Error::AlreadyIssued { .. }) => "already_issued",
                        Err(e) => panic!("untyped answer for user {user}: {e:?}"),
                    };
                    *outcomes.entry(label).or_default() += 1;
                }
                outcomes
            })
        })
        .collect();
    let mut totals: HashMap<&'static str, u32> = HashMap::new();
    for worker in workers {
        for (label, n) in worker.join().expect("worker") {
            *totals.entry(label).or_default() += n;
        }
    }
    let (rows, stock, duplicates) = issued_rows(&mut conn, id);
    let stats = hot.stats();
    eprintln!("combining issuer: {totals:?} {stats:?}");
    assert_eq!(rows, 500);
    assert_eq!(stock, 0);
    assert_eq!(duplicates, 0);
    assert_eq!(totals.get("issued").copied().unwrap_or(0), 500);
    assert!(
        stats.largest_batch > 1,
        "no request was ever combined: {stats:?}"
    );
}

#[test]
fn combining_ledger_keeps_balances_exact_under_64_callers() {
    // Heavy: never beside a test that asserts time bounds.
    let _storm = lockstock_testkit::fixtures::storm();
    let (url, mut conn) = fresh_database("combine_ledger");
    let ledger = BalanceLedger::new();
    ledger
        .charge(&mut conn, 1, Decimal::new(1_000, 0), "seed")
        .expect("seed");
    let hot = Arc::new(CombiningLedger::new(pool(&url, 8), ledger.clone()));
    let barrier = Arc::new(Barrier::new(64));
    let workers: Vec<_> = (0..64)
        .map(|t| {
            let (hot, barrier) = (hot.clone(), barrier.clone());
            thread::spawn(move || {
                barrier.wait();
                let (mut ok, mut refused) = (0u32, 0u32);
                for i in 0..20 {
                    // Every thread also replays one shared key: it must apply exactly once.
                    let shared = hot.charge(1, Decimal::new(3, 0), "shared-bonus");
                    assert!(shared.is_ok(), "{shared:?}");
                    match hot.deduct(1, Decimal::new(7, 0), &format!("t{t}-{i}")) {
                        Ok(_) => ok += 1,
                        Err(Error::InsufficientBalance { .. }) => refused += 1,
                        Err(e) => panic!("untyped answer: {e:?}"),
                    }
                }
                (ok, refused)
            })
        })
        .collect();
    let (mut ok, mut refused) = (0, 0);
    for worker in workers {
        let (o, r) = worker.join().expect("worker");
        ok += o;
        refused += r;
    }
    let balance = lockstock_testkit::fixtures::stored_balance(&mut conn, 1);
    let deducts: i64 = balance_history::table
        .filter(balance_history::kind.eq("deduct"))
        .count()
        .get_result(&mut conn)
        .expect("deducts");
    let bonus: i64 = balance_history::table
        .filter(balance_history::idempotency_key.eq("shared-bonus"))
        .count()
        .get_result(&mut conn)
        .expect("bonus");
    eprintln!(
        "combining ledger: ok={ok} refused={refused} balance={balance} {:?}",
        hot.stats()
    );
    assert_eq!(bonus, 1);
    assert_eq!(i64::from(ok), deducts);
    assert!(balance >= Decimal::ZERO);
    assert_eq!(
        Decimal::new(1_003, 0) - Decimal::from(deducts) * Decimal::new(7, 0),
        balance
    );
    assert!(
        balance < Decimal::new(7, 0),
        "deducts stopped early with {balance} left"
    );
    ledger.audit(&mut conn, 1).expect("audit");
}

/// Three combiners on one hot campaign and one hot account, each with its own pool — as three
/// application processes: their leaders refuse each other with NOWAIT and linger; every answer
/// is the one the database holds, and nothing is over-issued, lost or applied twice.
#[test]
fn several_combiners_on_one_key_keep_the_invariants_and_answer_truly() {
    let _exclusive = lockstock_testkit::fixtures::exclusive();
    let (url, mut conn) = fresh_database("combine_several");
    let issuer = CouponIssuer::new();
    let campaign = open_campaign(&mut conn, &issuer, 150).id;
    BalanceLedger::new()
        .charge(&mut conn, 1, Decimal::new(500, 0), "seed")
        .expect("seed");
    let issuers: Vec<_> = (0..3)
        .map(|_| Arc::new(CombiningIssuer::new(pool(&url, 2), CouponIssuer::new())))
        .collect();
    let ledgers: Vec<_> = (0..3)
        .map(|_| Arc::new(CombiningLedger::new(pool(&url, 2), BalanceLedger::new())))
        .collect();
    let barrier = Arc::new(Barrier::new(24));
    let workers: Vec<_> = (0..24i64)
        .map(|t| {
            let hot = issuers[(t % 3) as usize].clone();
            let ledger = ledgers[(t % 3) as usize].clone();
            let barrier = barrier.clone();
            thread::spawn(move || {
                barrier.wait();
                let (mut coupons, mut entries, mut refused) = (Vec::new(), Vec::new(), 0u32);
                for i in 0..10i64 {
                    // 120 users, each asked twice, by threads of different combiners.
                    let user = 1 + (t * 10 + i) % 120;
                    match hot.issue(user, campaign) {
                        Ok(coupon) => coupons.push((user, coupon.id)),
                        Err(Error::AlreadyIssued { .. }) | Err(Error::SoldOut { .. }) => {}
                        Err(e) => panic!("untyped answer for user {user}: {e:?}"),
                    }
                    match ledger.deduct(1, Decimal::new(3, 0), &format!("p{t}-{i}")) {
                        Ok(entry) => entries.push((format!("p{t}-{i}"), entry.id)),
                        Err(Error::InsufficientBalance { .. }) => refused += 1,
                        Err(e) => panic!("untyped answer: {e:?}"),
                    }
                }
                (coupons, entries, refused)
            })
        })
        .collect();
    let (mut coupons, mut entries) = (Vec::new(), Vec::new());
    for worker in workers {
        let (c, e, _) = worker.join().expect("worker");
        coupons.extend(c);
        entries.extend(e);
    }
    // Coupons: 120 users for 150 coupons: every user got exactly one, the one answered.
    let (rows, stock, duplicates) = issued_rows(&mut conn, campaign);
    assert_eq!((rows, stock, duplicates), (120, 30, 0));
    let held: HashMap<i64, i64> = user_coupon::table
        .filter(user_coupon::fcfs_coupon_id.eq(campaign))
        .select((user_coupon::user_id, user_coupon::id))
        .load::<(i64, i64)>(&mut conn)
        .expect("rows")
        .into_iter()
        .collect();
    assert_eq!(coupons.len(), 120, "each user issued once");
    for (user, id) in &coupons {
        assert_eq!(
            held.get(user),
            Some(id),
            "user {user} was answered another coupon"
        );
    }
    // Ledger: every deduct answered Ok is the journal row of its key; the balance adds up.
    let journal: HashMap<String, i64> = balance_history::table
        .filter(balance_history::kind.eq("deduct"))
        .select((balance_history::idempotency_key, balance_history::id))
        .load::<(Option<String>, i64)>(&mut conn)
        .expect("journal")
        .into_iter()
        .filter_map(|(key, id)| key.map(|key| (key, id)))
        .collect();
    assert_eq!(journal.len(), entries.len());
    for (key, id) in &entries {
        assert_eq!(
            journal.get(key),
            Some(id),
            "deduct {key} answered another entry"
        );
    }
    let balance = lockstock_testkit::fixtures::stored_balance(&mut conn, 1);
    assert_eq!(
        balance,
        Decimal::new(500, 0) - Decimal::from(entries.len() as i64) * Decimal::new(3, 0)
    );
    assert!(balance >= Decimal::ZERO);
    BalanceLedger::new().audit(&mut conn, 1).expect("audit");
}

/// `@@in_transaction` and `@@tx_isolation` of every connection of `pool`, all checked out at
/// once (so each one is seen).
fn pooled_sessions(pool: &lockstock::combine::MysqlPool) -> Vec<(i64, String)> {
    let size = pool.max_size() as usize;
    let mut held = Vec::with_capacity(size);
    for _ in 0..size {
        held.push(pool.get().expect("checkout"));
    }
    held.iter_mut()
        .map(|conn| {
            diesel::select((
                diesel::dsl::sql::<diesel::sql_types::BigInt>("@@in_transaction"),
                diesel::dsl::sql::<diesel::sql_types::Text>("@@tx_isolation"),
            ))
            .get_result::<(i64, String)>(&mut **conn)
            .expect("session state")
        })
        .collect()
}

/// A combiner's leader opens its transaction before its turn (while the batch before it runs);
/// when its batch then sends nothing — every request refused before a round trip — the open
/// transaction must be ended before the connection goes back to the pool, or the next user of
/// the pooled connection would run inside it.
#[test]
fn combining_hands_connections_back_without_an_open_transaction() {
    let (url, mut conn) = fresh_database("combine_unused_primed");
    let ledger = BalanceLedger::new();
    lockstock_testkit::fixtures::funded_account(&mut conn, &ledger, 7, Decimal::new(100, 0));
    let one = pool(&url, 1);
    let hot = CombiningLedger::new(one.clone(), BalanceLedger::new());
    // Refused before anything is sent: the primed transaction is never used.
    assert_refused(&hot.deduct(7, Decimal::new(-5, 0), "negative"), |e| {
        matches!(e, Error::InvalidAmount { .. })
    });
    assert_eq!(
        pooled_sessions(&one),
        vec![(0, "REPEATABLE-READ".to_string())]
    );
    // A deduct uses it, and leaves nothing open either.
    hot.deduct(7, Decimal::new(5, 0), "used").expect("deduct");
    assert_eq!(
        pooled_sessions(&one),
        vec![(0, "REPEATABLE-READ".to_string())]
    );

    // Under load, with a sell-out in the middle (batches answered from the sold-out mark
    // after their leader prepared), then idle: every pooled connection is clean.
    let issuer = CouponIssuer::new();
    let id = open_campaign(&mut conn, &issuer, 60).id;
    let three = pool(&url, 3);
    let hot = Arc::new(CombiningIssuer::new(three.clone(), issuer));
    let barrier = Arc::new(Barrier::new(16));
    let workers: Vec<_> = (0..16i64)
        .map(|t| {
            let (hot, barrier) = (hot.clone(), barrier.clone());
            thread::spawn(move || {
                barrier.wait();
                (0..12i64)
                    .filter(|i| hot.issue(1 + t * 12 + i, id).is_ok())
                    .count()
            })
        })
        .collect();
    let issued: usize = workers.into_iter().map(|w| w.join().expect("worker")).sum();
    assert_eq!(issued, 60);
    assert_eq!(issued_rows(&mut conn, id), (60, 0, 0));
    for (open, isolation) in pooled_sessions(&three) {
        assert_eq!(
            open, 0,
            "a pooled connection was handed back inside a transaction"
        );
        assert_eq!(isolation, "REPEATABLE-READ");
    }
}

/// When a holder of a hot row commits.
enum Release {
    /// This long after the start.
    After(std::time::Duration),
    /// When told (or after 10 s, so that a failing test still ends).
    When(std::sync::mpsc::Receiver<()>),
}

impl Release {
    fn wait(self) {
        match self {
            Self::After(hold) => thread::sleep(hold),
            Self::When(told) => {
                let _ = told.recv_timeout(std::time::Duration::from_secs(10));
            }
        }
    }
}

/// Holds the campaign row of `campaign` on a connection of its own (`BEGIN`, `FOR UPDATE`) and
/// commits as `release` says once `start` is released; returns when it has committed.
fn hold_campaign_row(
    url: &str,
    campaign: i64,
    start: Arc<crate::Gate>,
    release: Release,
) -> thread::JoinHandle<()> {
    let mut holder = lockstock_testkit::fixtures::connect(url);
    thread::spawn(move || {
        use diesel::connection::SimpleConnection;
        // A holder that fails before the row is locked lets the test go on (and fail), not
        // wait at the gate for ever.
        let _party = start.party();
        holder.batch_execute("BEGIN").expect("begin");
        let _: i32 = fcfs_coupon::table
            .find(campaign)
            .select(fcfs_coupon::stock_quantity)
            .for_update()
            .first(&mut holder)
            .expect("lock the campaign row");
        start.wait();
        release.wait();
        holder.batch_execute("COMMIT").expect("commit");
    })
}

/// A combined batch whose hot row another transaction holds for a moment polls it with NOWAIT
/// (only the statement is refused) instead of failing its transaction: with a policy that
/// never retries a transaction, a 2 ms hold is waited out — and a hold longer than the poll
/// budget is still refused (`Contended`, nothing applied), never waited for in the server.
#[test]
fn a_combined_batch_polls_a_row_held_for_a_moment_and_gives_up_on_a_long_hold() {
    // A 2 ms hold must end within the 8 ms poll budget: not beside the tests that load the
    // machine.
    let _alone = lockstock_testkit::fixtures::exclusive();
    let (url, mut conn) = fresh_database("combine_polls");
    let setup = CouponIssuer::new();
    let campaign = open_campaign(&mut conn, &setup, 10).id;
    let policy = lockstock::TxnPolicy::default().with_retry(lockstock::RetryPolicy::no_retry());
    let hot = CombiningIssuer::new(pool(&url, 2), CouponIssuer::with_policy(policy));
    // Facts cached, connections warm: the next issue goes straight to its statements.
    hot.issue(1, campaign).expect("a first coupon");

    // User `user` asks while another transaction holds the campaign row; `release`: when the
    // holder commits.
    let issue_while_held = |user: i64, release: Release| {
        let start = Arc::new(crate::Gate::new(2));
        let holder = hold_campaign_row(&url, campaign, start.clone(), release);
        start.wait();
        let answer = hot.issue(user, campaign);
        (answer, holder)
    };
    // The poll budget is 8 ms: on a loaded machine the holder's COMMIT may come later than
    // that now and then (the batch is then refused, nothing applied); one of ten tries, each
    // for a new user, must be waited out.
    let mut polled = Vec::new();
    for attempt in 0..10 {
        let (answer, holder) = issue_while_held(
            20 + attempt,
            Release::After(std::time::Duration::from_millis(2)),
        );
        holder.join().expect("holder");
        let waited = answer.is_ok();
        polled.push(answer);
        if waited {
            break;
        }
    }
    assert!(
        polled.iter().any(Result::is_ok),
        "every 2 ms hold failed the batch: {polled:?}"
    );
    assert!(
        polled
            .iter()
            .all(|p| matches!(p, Ok(_) | Err(Error::Contended { .. }))),
        "{polled:?}"
    );
    let waited_out = polled.iter().filter(|p| p.is_ok()).count() as i64;
    // Held until the answer came: the batch cannot have got the row.
    let (tell, told) = std::sync::mpsc::channel();
    let (refused, holder) = issue_while_held(3, Release::When(told));
    let _ = tell.send(());
    holder.join().expect("holder");
    assert!(
        matches!(refused, Err(Error::Contended { .. })),
        "a hold until the answer: {refused:?}"
    );
    let (rows, stock, duplicates) = issued_rows(&mut conn, campaign);
    assert_eq!(
        (rows, stock, duplicates),
        (1 + waited_out, 9 - waited_out as i32, 0),
        "user 1 and the users whose hold was waited out only"
    );
}

/// A batch runs by the earliest deadline of its callers; when it gives up by that deadline
/// (the hot row held elsewhere all along), a caller that joined it later still has time, and
/// its single call would still be retrying: its request runs again in the next batch instead
/// of being answered with the batch's `Contended`.
#[test]
fn a_caller_with_time_left_is_not_answered_by_an_earlier_callers_deadline() {
    let _alone = lockstock_testkit::fixtures::exclusive();
    let (url, mut conn) = fresh_database("combine_requeue");
    let setup = CouponIssuer::new();
    let campaign = open_campaign(&mut conn, &setup, 10).id;
    // Many attempts: every batch gives up by its deadline, never by its attempts.
    let mut retry = lockstock::RetryPolicy::default();
    retry.max_attempts = 100_000;
    retry.deadline = std::time::Duration::from_secs(2);
    let policy = lockstock::TxnPolicy::default().with_retry(retry);
    let hot = Arc::new(CombiningIssuer::new(
        pool(&url, 4),
        CouponIssuer::with_policy(policy),
    ));
    hot.issue(1, campaign).expect("a first coupon");

    // The row is held until users 2 and 3 have their answers. User 2 asks first (its batch
    // gives up at 2 s), user 3 at 300 ms (it leads the next batch, which gives up at 2.3 s:
    // 300 ms after user 2's batch gives the turn back, even on a loaded machine), user 4 at
    // 1 s: queued behind user 3's leadership, it is in that batch and has until 3 s — the row
    // is released as user 3 is answered.
    let start = Arc::new(crate::Gate::new(2));
    let (release, released) = std::sync::mpsc::channel();
    let holder = hold_campaign_row(&url, campaign, start.clone(), Release::When(released));
    start.wait();
    let asks: Vec<_> = [(2, 0), (3, 300), (4, 700)]
        .into_iter()
        .map(|(user, after)| {
            thread::sleep(std::time::Duration::from_millis(after));
            let hot = hot.clone();
            thread::spawn(move || hot.issue(user, campaign))
        })
        .collect();
    let mut asks = asks.into_iter();
    let mut answers = Vec::new();
    for ask in asks.by_ref().take(2) {
        answers.push(ask.join().expect("caller"));
    }
    let _ = release.send(());
    answers.extend(asks.map(|ask| ask.join().expect("caller")));
    holder.join().expect("holder");
    assert!(
        matches!(answers[0], Err(Error::Contended { .. })),
        "{answers:?}"
    );
    assert!(
        matches!(answers[1], Err(Error::Contended { .. })),
        "{answers:?}"
    );
    // Before: user 4 got user 3's batch's Contended with 700 ms of its deadline left.
    let issued = answers[2].as_ref().expect("user 4, after the row was free");
    assert_eq!(issued.user_id, 4);
    let (rows, stock, duplicates) = issued_rows(&mut conn, campaign);
    assert_eq!((rows, stock, duplicates), (2, 8, 0), "users 1 and 4 only");
}

/// How many locking reads of `table` on the database `database` that can wait (`FOR UPDATE`
/// without NOWAIT) are seen now running for over 2 ms in the server's process list: a point
/// lookup that long is waiting for its row lock. NOWAIT reads never wait, but on a loaded
/// machine one may take over 2 ms to run: they are not counted.
fn lock_waits_now(observer: &mut MysqlConnection, database: &str, table: &str) -> usize {
    #[derive(QueryableByName)]
    struct Waiting {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        waiting: i64,
    }
    let statement = format!("%FROM `{table}`%FOR UPDATE%");
    let now: Waiting = diesel::sql_query(
        "SELECT COUNT(*) AS waiting FROM information_schema.PROCESSLIST \
         WHERE DB = ? AND INFO LIKE ? AND INFO NOT LIKE '%NOWAIT%' AND TIME_MS > 2",
    )
    .bind::<diesel::sql_types::Text, _>(database)
    .bind::<diesel::sql_types::Text, _>(&statement)
    .get_result(observer)
    .expect("lock waits");
    usize::try_from(now.waiting).unwrap_or(0)
}

/// [`lock_waits_now`], summed over samples taken until `running` is finished.
fn lock_waits_seen<T>(
    observer: &mut MysqlConnection,
    database: &str,
    table: &str,
    running: &thread::JoinHandle<T>,
) -> usize {
    let mut seen = 0;
    while !running.is_finished() {
        seen += lock_waits_now(observer, database, table);
    }
    seen
}

/// A combined ledger batch whose account another transaction holds waits for the row IN THE
/// SERVER — its account lock is its transaction's first lock, so the wait cannot close a
/// deadlock — and gets it when the holder commits; each wait is bounded by the batch's wait
/// budget, not by `innodb_lock_wait_timeout`: with a policy that never retries a transaction,
/// a hold that lasts until the answer is answered `Contended` with nothing applied. A combined coupon batch, which
/// holds the coupons it inserted when it reaches the campaign row, is never seen waiting for it
/// (it polls). Before, ledger batches polled the row too and were never seen waiting.
#[test]
fn a_combined_ledger_batch_waits_for_its_account_in_the_server_a_coupon_batch_never() {
    use diesel::connection::SimpleConnection;
    let (url, mut conn) = fresh_database("combine_waits");
    BalanceLedger::new()
        .charge(&mut conn, 1, Decimal::new(100, 0), "seed")
        .expect("seed");
    let once = lockstock::TxnPolicy::default().with_retry(lockstock::RetryPolicy::no_retry());
    let retrying = Arc::new(CombiningLedger::new(pool(&url, 2), BalanceLedger::new()));
    let single_try = Arc::new(CombiningLedger::new(
        pool(&url, 2),
        BalanceLedger::with_policy(once),
    ));
    // Connections warm: the next deducts go straight to their statements.
    retrying.deduct(1, Decimal::ONE, "warm").expect("warm");
    single_try
        .deduct(1, Decimal::ONE, "warm too")
        .expect("warm");
    let mut observer = lockstock_testkit::fixtures::connect(&url);

    // The account held while a deduct with key `key` runs through `hot`: released once the
    // deduct was seen waiting for it in the server (`seen_waiting`; or after 5 s), or else
    // once the deduct has answered. The answer and how often it was seen waiting.
    let mut deduct_while_held = |hot: &Arc<CombiningLedger>, key: &'static str, seen_waiting| {
        let mut holder = lockstock_testkit::fixtures::connect(&url);
        holder.batch_execute("BEGIN").expect("begin");
        let _: Decimal =
            lockstock_testkit::fixtures::lock_balance(&mut holder, 1).expect("hold the account");
        let deduct = {
            let hot = hot.clone();
            thread::spawn(move || hot.deduct(1, Decimal::ONE, key))
        };
        let started = std::time::Instant::now();
        let mut seen = 0;
        while !deduct.is_finished()
            && !(seen_waiting && (seen > 0 || started.elapsed().as_secs() >= 5))
        {
            seen += lock_waits_now(&mut observer, "combine_waits", "user_balance");
        }
        holder.batch_execute("COMMIT").expect("commit");
        (deduct.join().expect("deduct"), seen)
    };
    let (waited, seen) = deduct_while_held(&retrying, "held", true);
    assert!(seen > 0, "the batch was never seen waiting for the account");
    assert!(waited.is_ok(), "the deduct failed: {waited:?}");
    // Held until the answer: each wait is bounded by the budget, and nothing retries.
    let (refused, _) = deduct_while_held(&single_try, "long", false);
    assert!(
        matches!(refused, Err(Error::Contended { .. })),
        "a hold until the answer, without retries: {refused:?}"
    );
    assert_eq!(
        lockstock_testkit::fixtures::stored_balance(&mut conn, 1),
        Decimal::new(97, 0),
        "the warm-ups and the held deduct only"
    );
    BalanceLedger::new().audit(&mut conn, 1).expect("audit");

    // A coupon batch holds its new coupons when it locks the campaign row: it never waits.
    let issuer = CouponIssuer::new();
    let campaign = open_campaign(&mut conn, &issuer, 10).id;
    let coupons = Arc::new(CombiningIssuer::new(pool(&url, 2), CouponIssuer::new()));
    coupons.issue(1, campaign).expect("a first coupon");
    let start = Arc::new(crate::Gate::new(2));
    let hold = Release::After(std::time::Duration::from_millis(150));
    let holder = hold_campaign_row(&url, campaign, start.clone(), hold);
    start.wait();
    let issue = {
        let coupons = coupons.clone();
        thread::spawn(move || coupons.issue(2, campaign))
    };
    let seen = lock_waits_seen(&mut observer, "combine_waits", "fcfs_coupon", &issue);
    holder.join().expect("holder");
    let issued = issue.join().expect("issue");
    assert_eq!(seen, 0, "a coupon batch waited for the campaign row");
    assert!(issued.is_ok(), "the issue failed: {issued:?}");
    assert_eq!(issued_rows(&mut conn, campaign), (2, 8, 0), "users 1 and 2");
}

/// A combined coupon batch of an issuer with `StockRowWait::InServer` waits for the stock row
/// in the server while another transaction holds it (seen waiting) and gets it as the holder
/// commits; one of a default issuer is never seen waiting (it polls, see above). And the trade
/// the docs name, as a negative control: another program's transaction that holds the stock
/// row and then inserts a coupon of a user the batch is issuing to closes a deadlock with a
/// waiting batch, which the server resolves (`Innodb_deadlocks` rises; either side may be
/// rolled back, and the user ends with one coupon) — the same program never meets one with a
/// polling batch. Before `StockRowWait` no coupon batch ever waited in the server.
#[test]
fn a_coupon_batch_waits_for_the_stock_row_in_the_server_only_where_its_issuer_chose_it() {
    use diesel::connection::SimpleConnection;
    let _alone = lockstock_testkit::fixtures::exclusive();
    // A private server: its deadlock count is this test's alone.
    let sandbox = lockstock_testkit::Sandbox::start().expect("a private server");
    let db = "combine_stock_waits";
    let (url, mut conn) = private_database(&sandbox, db);
    let setup = CouponIssuer::new();
    let (coupon, campaign) =
        lockstock_testkit::fixtures::open_campaign_named(&mut conn, &setup, "waits", 100);
    let campaign = campaign.id;
    // Retried at once for 5 s: a batch refused the stock row holds its coupon nearly all the
    // time, so that the program below sees it written (`INNODB_TRX` is a snapshot refreshed
    // at most every 100 ms).
    let mut retry = lockstock::RetryPolicy::default();
    retry.max_attempts = 100_000;
    retry.base_backoff = std::time::Duration::from_micros(100);
    retry.max_backoff = std::time::Duration::from_micros(200);
    retry.deadline = std::time::Duration::from_secs(5);
    let policy = lockstock::TxnPolicy::default().with_retry(retry);
    let issuer = |wait| {
        let issuer = CouponIssuer::with_policy(policy.clone()).with_stock_row_wait(wait);
        Arc::new(CombiningIssuer::new(pool(&url, 2), issuer))
    };
    let (polling, waiting) = (
        issuer(StockRowWait::default()),
        issuer(StockRowWait::InServer),
    );
    // Facts cached, connections warm.
    polling.issue(1, campaign).expect("warm");
    waiting.issue(2, campaign).expect("warm");
    let mut observer = connect(&url);

    // Held for 150 ms: the waiting issuer's batch is seen waiting, the polling one's never.
    let mut next_user = 10;
    for (hot, waits) in [(&polling, false), (&waiting, true)] {
        let start = Arc::new(crate::Gate::new(2));
        let hold = Release::After(std::time::Duration::from_millis(150));
        let holder = hold_campaign_row(&url, campaign, start.clone(), hold);
        start.wait();
        let issue = {
            let (hot, user) = (hot.clone(), next_user);
            thread::spawn(move || hot.issue(user, campaign))
        };
        let seen = lock_waits_seen(&mut observer, db, "fcfs_coupon", &issue);
        holder.join().expect("holder");
        let issued = issue.join().expect("issue");
        assert_eq!(
            seen > 0,
            waits,
            "seen waiting {seen} times, should wait: {waits}"
        );
        assert!(issued.is_ok(), "the issue failed: {issued:?}");
        next_user += 1;
    }

    // Another program: locks the stock row, then — once the batch has written its coupon —
    // issues a coupon to the same user and takes it from the stock. With the waiting issuer a
    // deadlock (a few tries: the batch must not be between two attempts as the INSERT comes);
    // with the polling one never.
    let mut program = connect(&url);
    let mut program_for = |hot: &Arc<CombiningIssuer>, user: i64| {
        program.batch_execute("BEGIN").expect("begin");
        let _: i32 = fcfs_coupon::table
            .find(campaign)
            .select(fcfs_coupon::stock_quantity)
            .for_update()
            .first(&mut program)
            .expect("lock the stock row");
        let issue = {
            let hot = hot.clone();
            thread::spawn(move || hot.issue(user, campaign))
        };
        // The batch has written the user's coupon (its row is locked): refused to a NOWAIT
        // read of it, in a statement of its own (it locks nothing after it).
        while !issue.is_finished() && !coupon_row_locked(&mut observer, user, coupon.id) {}
        if issue.is_finished() {
            let answer = issue.join().expect("issue");
            panic!("user {user}: the batch was never seen holding its coupon: {answer:?}");
        }
        let inserted = diesel::sql_query(
            "INSERT INTO user_coupon (user_id, coupon_id, fcfs_coupon_id, status, issued_at) \
             VALUES (?, ?, ?, 'issued', UTC_TIMESTAMP(6))",
        )
        .bind::<diesel::sql_types::BigInt, _>(user)
        .bind::<diesel::sql_types::BigInt, _>(coupon.id)
        .bind::<diesel::sql_types::BigInt, _>(campaign)
        .execute(&mut program)
        .and_then(|_| {
            diesel::sql_query(
                "UPDATE fcfs_coupon SET stock_quantity = stock_quantity - 1 WHERE id = ?",
            )
            .bind::<diesel::sql_types::BigInt, _>(campaign)
            .execute(&mut program)
        });
        match inserted {
            Ok(_) => program.batch_execute("COMMIT").expect("commit"),
            // The program's transaction was the deadlock's victim (rolled back whole).
            Err(_) => program.batch_execute("ROLLBACK").expect("rollback"),
        }
        let answer = issue.join().expect("issue");
        assert!(
            matches!(answer, Ok(_) | Err(Error::AlreadyIssued { .. })),
            "user {user}: {answer:?}"
        );
    };
    let before = server_deadlocks(&mut conn);
    for _ in 0..5 {
        program_for(&polling, next_user);
        next_user += 1;
    }
    assert_eq!(
        server_deadlocks(&mut conn),
        before,
        "a polling batch deadlocked"
    );
    let mut tries = 0;
    while server_deadlocks(&mut conn) == before && tries < 10 {
        program_for(&waiting, next_user);
        next_user += 1;
        tries += 1;
    }
    assert!(
        server_deadlocks(&mut conn) > before,
        "a waiting batch never deadlocked with the program in {tries} tries"
    );
    // Every user once, the stock what was issued.
    let (rows, stock, duplicates) = issued_rows(&mut conn, campaign);
    assert_eq!(duplicates, 0, "a user twice");
    assert_eq!(i64::from(stock), 100 - rows, "the stock and the coupons");
    assert_eq!(rows, next_user - 10 + 2, "one coupon per user");
}

/// Whether another transaction holds user `user`'s coupon row of template `coupon_id` (a
/// `FOR UPDATE NOWAIT` read of it, its own transaction on `observer`, is refused).
fn coupon_row_locked(observer: &mut MysqlConnection, user: i64, coupon_id: i64) -> bool {
    diesel::sql_query(
        "SELECT id FROM user_coupon WHERE user_id = ? AND coupon_id = ? FOR UPDATE NOWAIT",
    )
    .bind::<diesel::sql_types::BigInt, _>(user)
    .bind::<diesel::sql_types::BigInt, _>(coupon_id)
    .execute(observer)
    .is_err()
}

/// Waits (at most 10 s) until a COMMIT on database `db` is seen held back by the server
/// (`BACKUP STAGE BLOCK_COMMIT`), and returns how many are.
fn commits_held_back(observer: &mut MysqlConnection, db: &str) -> i64 {
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let start = std::time::Instant::now();
    loop {
        let held = diesel::sql_query(
            "SELECT COUNT(*) AS n FROM information_schema.PROCESSLIST \
             WHERE DB = ? AND INFO LIKE 'COMMIT%' AND STATE LIKE 'Waiting for backup lock%'",
        )
        .bind::<diesel::sql_types::Text, _>(db)
        .get_result::<Count>(observer)
        .expect("processlist")
        .n;
        if held > 0 || start.elapsed() > std::time::Duration::from_secs(10) {
            return held;
        }
        thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// A batch whose COMMIT the server holds back keeps the hot row locked after it handed the
/// key's turn on (a backup's `BACKUP STAGE BLOCK_COMMIT`, or `FLUSH TABLES WITH READ LOCK`).
/// The key's next batch is refused by that row like by any other holder once its wait budget
/// is spent — it does not send its NOWAIT read again for as long as the COMMIT is held back
/// (before the fix: until the held batch's watchdog ended it, seconds later). With a
/// no-retry policy the next caller is answered `Contended` at once, nothing applied; the held
/// batch commits when the backup ends. For the account (which may wait in the server) and the
/// coupon (which polls).
#[test]
fn a_batch_behind_a_commit_the_server_holds_back_is_refused_within_its_wait_budget() {
    use diesel::connection::SimpleConnection;
    use lockstock_testkit::fixtures::{connect, issued_rows as coupon_rows, stored_balance};
    let _alone = lockstock_testkit::fixtures::exclusive();
    let sandbox = lockstock_testkit::Sandbox::start().expect("a private server");
    let db = "combine_held_commit";
    let (url, mut conn) = private_database(&sandbox, db);
    let once = lockstock::TxnPolicy::default().with_retry(lockstock::RetryPolicy::no_retry());
    BalanceLedger::new()
        .charge(&mut conn, 1, Decimal::new(100, 0), "seed")
        .expect("seed");
    let issuer = CouponIssuer::new();
    let campaign = open_campaign(&mut conn, &issuer, 10).id;
    let ledger = Arc::new(CombiningLedger::new(
        pool(&url, 3),
        BalanceLedger::with_policy(once.clone()),
    ));
    let coupons = Arc::new(CombiningIssuer::new(
        pool(&url, 3),
        CouponIssuer::with_policy(once),
    ));
    ledger.deduct(1, Decimal::ONE, "warm").expect("warm");
    coupons.issue(1, campaign).expect("warm");
    let mut observer = connect(&url);
    let mut backup = connect(&url);
    // With commits held back: `held` on a thread until its COMMIT is seen held back, then
    // `next` here, which must be refused (nothing waits for the held COMMIT) within a second.
    let mut behind_a_held_commit =
        |what: &str,
         held: Box<dyn FnOnce() -> Result<String, Error> + Send>,
         next: &dyn Fn() -> Result<String, Error>| {
            backup
                .batch_execute("BACKUP STAGE START; BACKUP STAGE BLOCK_COMMIT")
                .expect("block commits");
            let held = thread::spawn(held);
            let seen = commits_held_back(&mut observer, db);
            let started = std::time::Instant::now();
            let answer = next();
            let took = started.elapsed();
            backup.batch_execute("BACKUP STAGE END").expect("unblock");
            let held = held.join().expect("the held call");
            assert_eq!(seen, 1, "{what}: the first COMMIT is held back");
            assert!(
                matches!(answer, Err(Error::Contended { .. })),
                "{what}: the next call answered {answer:?} after {took:?}"
            );
            assert!(
                took < std::time::Duration::from_secs(1),
                "{what}: the next call took {took:?}"
            );
            assert!(held.is_ok(), "{what}: the held call answered {held:?}");
        };

    let (first, second) = (ledger.clone(), ledger.clone());
    behind_a_held_commit(
        "account",
        Box::new(move || {
            first
                .deduct(1, Decimal::ONE, "held")
                .map(|e| e.id.to_string())
        }),
        &move || {
            second
                .deduct(1, Decimal::ONE, "next")
                .map(|e| e.id.to_string())
        },
    );
    assert_eq!(
        stored_balance(&mut conn, 1),
        Decimal::new(98, 0),
        "the warm-up and the held deduct only"
    );
    BalanceLedger::new().audit(&mut conn, 1).expect("audit");

    let (first, second) = (coupons.clone(), coupons.clone());
    behind_a_held_commit(
        "coupon",
        Box::new(move || first.issue(2, campaign).map(|c| format!("{c:?}"))),
        &move || second.issue(3, campaign).map(|c| format!("{c:?}")),
    );
    assert_eq!(coupon_rows(&mut conn, campaign), 2, "users 1 and 2");
}

/// lockstock transactions never deadlock one another: none waits for a lock while it holds the
/// stock row, and none waits while it holds other rows but for a stock row (coupon INSERTs that
/// hold rows or gaps are wait-free; the stock row is locked with NOWAIT, polled, or — for an
/// issuer with `StockRowWait::InServer` — waited for in the server: its holders never wait).
/// Two combiners (as two processes) race for the same users of campaigns whose stock runs out,
/// round after round, on a private server, first polling the stock row and then waiting for it
/// in the server (the stock running out makes batches lock the stock row first and insert
/// their winners under it, the order that could close a cycle with a waiting batch if the
/// INSERTs waited); it resolves no deadlock at all, every answer is a success,
/// `AlreadyIssued` or `SoldOut`, and every campaign's coupons are its successes (no user twice,
/// the stock never below zero). Before the coupon INSERTs were wait-free the server resolved 8
/// to 12 deadlocks in 30 rounds (three runs), between coupon INSERTs waiting for each other's
/// rows and gaps.
#[test]
fn racing_combiners_at_a_sell_out_never_deadlock() {
    use diesel::connection::SimpleConnection;
    const ROUNDS: usize = 30;
    const THREADS: usize = 5;
    const USERS_PER_THREAD: i64 = 8;
    const STOCK: u32 = 20;
    let _storm = lockstock_testkit::fixtures::storm();
    // A private server: its deadlock count is this test's alone.
    let sandbox = lockstock_testkit::Sandbox::start().expect("a private server");
    let (url, mut conn) = private_database(&sandbox, "racing_combiners");
    let issuer = CouponIssuer::new();
    for wait in [StockRowWait::Poll, StockRowWait::InServer] {
        let combiners: Vec<Arc<CombiningIssuer>> = (0..2)
            .map(|_| {
                let waiting = CouponIssuer::new().with_stock_row_wait(wait);
                Arc::new(CombiningIssuer::new(pool(&url, 4), waiting))
            })
            .collect();
        for round in 0..ROUNDS {
            let campaign = open_campaign(&mut conn, &issuer, STOCK).id;
            let start = Arc::new(Barrier::new(2 * THREADS));
            let threads: Vec<_> = combiners
                .iter()
                .flat_map(|combiner| (0..THREADS).map(move |t| (combiner.clone(), t)))
                .map(|(combiner, t)| {
                    let start = start.clone();
                    thread::spawn(move || {
                        start.wait();
                        let first = i64::try_from(t).expect("t") * USERS_PER_THREAD + 1;
                        (first..first + USERS_PER_THREAD)
                            .map(|user| (user, combiner.issue(user, campaign)))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            let mut issued = HashMap::new();
            for thread in threads {
                for (user, answer) in thread.join().expect("a client") {
                    match answer {
                        Ok(coupon) => {
                            assert_eq!(coupon.user_id, user);
                            assert!(
                                issued.insert(user, coupon.id).is_none(),
                                "{wait:?}, round {round}: user {user} twice"
                            );
                        }
                        Err(Error::AlreadyIssued { .. } | Error::SoldOut { .. }) => {}
                        Err(e) => panic!("{wait:?}, round {round}, user {user}: {e:?}"),
                    }
                }
            }
            let rows = lockstock_testkit::fixtures::issued_rows(&mut conn, campaign);
            assert_eq!(
                rows,
                i64::try_from(issued.len()).expect("len"),
                "{wait:?}, round {round}"
            );
            let (_, stock) = lockstock_testkit::fixtures::stock_row(&mut conn, campaign);
            assert_eq!(
                i64::from(stock),
                i64::from(STOCK) - rows,
                "{wait:?}, round {round}"
            );
        }
        assert_eq!(
            server_deadlocks(&mut conn),
            0,
            "{wait:?}: deadlocks the server resolved"
        );
    }
    conn.batch_execute("SELECT 1")
        .expect("the server still answers");
}

/// How many deadlocks the server of `conn` has resolved since it started (`Innodb_deadlocks`).
fn server_deadlocks(conn: &mut MysqlConnection) -> u64 {
    #[derive(QueryableByName)]
    struct Status {
        #[diesel(sql_type = diesel::sql_types::Text)]
        value: String,
    }
    diesel::sql_query(
        "SELECT VARIABLE_VALUE AS value FROM information_schema.GLOBAL_STATUS \
         WHERE VARIABLE_NAME = 'INNODB_DEADLOCKS'",
    )
    .get_result::<Status>(conn)
    .expect("Innodb_deadlocks")
    .value
    .parse()
    .expect("a count")
}

/// A batch that fails to answer its callers after its COMMIT was sent — a `run_batch` that
/// commits and then returns the wrong number of results, or panics — answers
/// `OutcomeUnknown`, never `Internal` (whose promise is that nothing was committed): its work
/// is in the database. Before the fix every caller got `Internal`.
#[test]
fn a_batch_that_fails_to_answer_after_its_commit_answers_outcome_unknown() {
    use diesel::connection::SimpleConnection;
    use lockstock::combine::Combiner;
    use lockstock::{Deadline, TxnRunner};
    let (url, mut admin) = fresh_database("combine_commit_then_fail");
    admin
        .batch_execute("CREATE TABLE applied (id INT PRIMARY KEY)")
        .expect("table");
    let conn = Mutex::new(connect(&url));
    let runner = TxnRunner::default();
    let commit = |requests: &[i32], deadline: Deadline| {
        let mut conn = conn.lock().expect("connection");
        runner.run_by(&mut conn, deadline, |c| {
            for id in requests {
                diesel::sql_query("INSERT INTO applied VALUES (?)")
                    .bind::<diesel::sql_types::Integer, _>(*id)
                    .execute(c)?;
            }
            Ok(())
        })
    };
    let combiner = Combiner::<u8, i32, ()>::new(4);
    let deadline = || Deadline::after(std::time::Duration::from_secs(5));
    // Committed, then the wrong number of answers.
    let short = combiner.submit(0, 1, deadline(), |_, requests, deadline| {
        commit(&requests, deadline)?;
        Ok(Vec::new())
    });
    assert!(
        matches!(short, Err(Error::OutcomeUnknown { .. })),
        "{short:?}"
    );
    // Committed through a combined call that led its own batch on the batch's thread, then
    // the wrong number of answers: `OutcomeUnknown` too (before, `Internal` — that batch's
    // COMMIT was told only to its own batch).
    let issuer = CouponIssuer::new();
    let campaign = open_campaign(&mut admin, &issuer, 5);
    let hot = CombiningIssuer::new(pool(&url, 1), issuer);
    let nested = combiner.submit(0, 2, deadline(), |_, _, _| {
        hot.issue(7, campaign.id)?;
        Ok(Vec::new())
    });
    assert!(
        matches!(nested, Err(Error::OutcomeUnknown { .. })),
        "{nested:?}"
    );
    assert_eq!(
        lockstock_testkit::fixtures::issued_rows(&mut admin, campaign.id),
        1,
        "the coupon is issued"
    );
    // Committed, then a panic in a batch that carries another caller: the leader's own call
    // panics, and the caller combined with it is answered `OutcomeUnknown` (its own closure
    // never runs). A first batch holds the turn until both have queued behind it.
    let (release, held) = std::sync::mpsc::channel::<()>();
    let held = Mutex::new(held);
    let entered = Barrier::new(2);
    let follower_ran = std::sync::atomic::AtomicBool::new(false);
    let queued = |n: usize| {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while combiner.stats().queued < n {
            assert!(
                std::time::Instant::now() < until,
                "{n} callers never queued"
            );
            thread::sleep(std::time::Duration::from_millis(1));
        }
    };
    let (first, leader, follower) = thread::scope(|s| {
        // Dropped as the closure ends, also by a panic (a caller that never queued): the first
        // batch is released then, and the scope does not wait for it for ever.
        let release = release;
        let first = s.spawn(|| {
            combiner.submit(1, 2, deadline(), |_, requests, deadline| {
                entered.wait();
                held.lock().expect("held").recv().expect("released");
                commit(&requests, deadline)?;
                Ok(vec![Ok(()); requests.len()])
            })
        });
        entered.wait();
        let leader = s.spawn(|| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                combiner.submit(1, 3, deadline(), |_, requests, deadline| {
                    commit(&requests, deadline)?;
                    panic!("after the commit");
                })
            }))
        });
        queued(1);
        let follower = s.spawn(|| {
            combiner.submit(1, 4, deadline(), |_, requests, deadline| {
                follower_ran.store(true, std::sync::atomic::Ordering::SeqCst);
                commit(&requests, deadline)?;
                Ok(vec![Ok(()); requests.len()])
            })
        });
        queued(2);
        release.send(()).expect("release the first batch");
        (
            first.join().expect("first thread"),
            leader.join().expect("leader thread"),
            follower.join().expect("follower thread"),
        )
    });
    assert!(matches!(first, Ok(())), "{first:?}");
    assert!(leader.is_err(), "the leader's call panicked");
    assert!(
        matches!(follower, Err(Error::OutcomeUnknown { .. })),
        "the caller combined with the panicking leader: {follower:?}"
    );
    assert!(
        !follower_ran.load(std::sync::atomic::Ordering::SeqCst),
        "the follower was in the panicking batch, not a batch of its own"
    );
    let applied: Vec<i32> = diesel::sql_query("SELECT id FROM applied ORDER BY id")
        .load::<Applied>(&mut admin)
        .expect("applied")
        .into_iter()
        .map(|row| row.id)
        .collect();
    assert_eq!(
        applied,
        vec![1, 2, 3, 4],
        "the panicking batch committed both"
    );
}

#[derive(QueryableByName)]
struct Applied {
    #[diesel(sql_type = diesel::sql_types::Integer)]
    id: i32,
}

/// On a server that rolls a whole transaction back when a lock wait times out, a NOWAIT
/// refusal included (`innodb_rollback_on_timeout`, a startup option), a combined batch never
/// sends its refused locking read again in the same transaction: the read would run outside
/// any transaction, and the batch's writes after it too (the coupons inserted before the lock
/// gone, the stock decremented for them; journal entries written without the account's lock).
/// The refusal goes to the runner, which begins anew — also for a runner that met another
/// server (without the option) first. Two combiners (like two processes) on one campaign and
/// one account refuse each other often; afterwards every answer matches the database. Before
/// the fix: answered coupons without a row and stock lost.
#[test]
fn combined_batches_on_a_server_that_rolls_back_whole_transactions_keep_their_answers() {
    let _alone = lockstock_testkit::fixtures::exclusive();
    let sandbox = lockstock_testkit::Sandbox::start_with(&["--innodb-rollback-on-timeout=1"])
        .expect("a private server");
    let url = sandbox
        .create_database("combine_whole_rollback")
        .expect("database");
    let mut conn = connect(&url);
    lockstock::run_migrations(&mut conn).expect("migrate");
    let whole: i64 = diesel::select(diesel::dsl::sql::<diesel::sql_types::BigInt>(
        "CAST(@@innodb_rollback_on_timeout AS SIGNED)",
    ))
    .get_result(&mut conn)
    .expect("the option");
    assert_eq!(whole, 1);
    let issuer = CouponIssuer::new();
    const STOCK: i32 = 1_000_000;
    let campaign = open_campaign(&mut conn, &issuer, STOCK as u32).id;
    BalanceLedger::new()
        .charge(&mut conn, 1, Decimal::from(1_000_000), "seed")
        .expect("seed");
    // The runners of the second combiner of each kind met the shared server first (without
    // the option): what they asked there must not make them send a refused read again here.
    let (_elsewhere_url, mut elsewhere) = fresh_database("combine_whole_rollback_elsewhere");
    let met_elsewhere = CouponIssuer::new();
    let ledger_elsewhere = BalanceLedger::new();
    let _ = met_elsewhere.issue(&mut elsewhere, 1, 1);
    let _ = ledger_elsewhere.charge(&mut elsewhere, 1, Decimal::ONE, "elsewhere");
    let issuers = [CouponIssuer::new(), met_elsewhere]
        .map(|source| Arc::new(CombiningIssuer::new(pool(&url, 3), source)));
    let ledgers = [BalanceLedger::new(), ledger_elsewhere]
        .map(|source| Arc::new(CombiningLedger::new(pool(&url, 3), source)));
    let until = std::time::Instant::now() + std::time::Duration::from_millis(2_500);
    let issued = Arc::new(Mutex::new(Vec::new()));
    let deducted = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..16_i64)
        .map(|t| {
            let (issuer, ledger) = (
                issuers[(t % 2) as usize].clone(),
                ledgers[(t % 2) as usize].clone(),
            );
            let (issued, deducted) = (issued.clone(), deducted.clone());
            thread::spawn(move || {
                let mut n = 0_i64;
                while std::time::Instant::now() < until {
                    n += 1;
                    if t < 8 {
                        let user = t * 1_000_000 + n;
                        if let Ok(coupon) = issuer.issue(user, campaign) {
                            issued.lock().expect("issued").push((user, coupon.id));
                        }
                    } else if let Ok(entry) = ledger.deduct(1, Decimal::ONE, &format!("d{t}-{n}")) {
                        deducted.lock().expect("deducted").push(entry.id);
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().expect("worker");
    }
    let issued = issued.lock().expect("issued").clone();
    let deducted = deducted.lock().expect("deducted").clone();
    assert!(!issued.is_empty() && !deducted.is_empty());
    // Every coupon answered exists, for its user; the stock fell by exactly the rows.
    let rows: HashMap<i64, i64> = user_coupon::table
        .filter(user_coupon::fcfs_coupon_id.eq(campaign))
        .select((user_coupon::id, user_coupon::user_id))
        .load::<(i64, i64)>(&mut conn)
        .expect("rows")
        .into_iter()
        .collect();
    let missing = issued
        .iter()
        .filter(|(user, id)| rows.get(id) != Some(user))
        .count();
    assert_eq!(missing, 0, "of {} coupons answered", issued.len());
    let (count, stock, duplicates) = issued_rows(&mut conn, campaign);
    assert_eq!(count, issued.len() as i64, "rows = coupons answered");
    assert_eq!(
        i64::from(stock) + count,
        i64::from(STOCK),
        "stock + rows = total"
    );
    assert_eq!(duplicates, 0);
    // Every deduct answered is in the journal; the balance and journal agree.
    let entries: i64 = balance_history::table
        .filter(balance_history::user_id.eq(1))
        .filter(balance_history::id.eq_any(&deducted))
        .count()
        .get_result(&mut conn)
        .expect("entries");
    assert_eq!(entries, deducted.len() as i64);
    let balance = BalanceLedger::new().balance(&mut conn, 1).expect("balance");
    assert_eq!(
        balance.balance,
        Decimal::from(1_000_000 - deducted.len() as i64)
    );
    lockstock_testkit::fixtures::audit_ok(&BalanceLedger::new(), &mut conn, 1);
    eprintln!(
        "whole-rollback server: {} coupons, {} deducts answered and found",
        issued.len(),
        deducted.len()
    );
}

/// A combined batch whose connection is lost (killed while the batch retries on a row another
/// program holds) does not leave a leader of another key waiting for the pool's only
/// connection until its deadline: the lost connection is discarded and the pool opens one in its
/// place at once. (r2d2 wakes no waiter when it discards a connection and, with `min_idle = 0`,
/// opens none: the other leader answered `Timeout` with a slot free.)
#[test]
fn a_lost_connection_does_not_leave_another_leader_waiting_for_the_pool() {
    use diesel::connection::SimpleConnection;
    use diesel::r2d2::{ConnectionManager, Pool};
    use lockstock::SessionSettings;
    let (url, mut admin) = fresh_database("combine_lost_waiter");
    let ledger = BalanceLedger::new();
    for user in [1, 2] {
        ledger
            .charge(&mut admin, user, Decimal::new(10, 0), "seed")
            .expect("seed");
    }
    let policy =
        lockstock_testkit::fixtures::policy_with_deadline(std::time::Duration::from_secs(3));
    let pool = Pool::builder()
        .max_size(1)
        .min_idle(Some(0))
        .connection_customizer(Box::new(SessionSettings::new(policy.clone())))
        .build(ConnectionManager::<MysqlConnection>::new(&url))
        .expect("pool");
    let combined = Arc::new(CombiningLedger::new(
        pool,
        BalanceLedger::with_policy(policy),
    ));
    // Another program holds account 1: its batch retries, holding the pool's connection.
    let mut other = lockstock_testkit::fixtures::other_program(&url);
    lockstock_testkit::fixtures::lock_balance(&mut other, 1).expect("hold account 1");
    let mut ids = connect(&url);
    let own: Vec<i64> = [&mut admin, &mut other, &mut ids]
        .into_iter()
        .map(lockstock_testkit::fixtures::connection_id)
        .collect();
    let first = {
        let combined = combined.clone();
        thread::spawn(move || combined.deduct(1, Decimal::new(1, 0), "first"))
    };
    // The pool's connection: the one session on this database that is not the test's.
    let looking = std::time::Instant::now();
    let pooled = loop {
        assert!(
            looking.elapsed() < std::time::Duration::from_secs(20),
            "the pool's connection never showed"
        );
        let rows: Vec<Pid> = diesel::sql_query(
            "SELECT CAST(ID AS SIGNED) AS id FROM information_schema.PROCESSLIST \
             WHERE DB = DATABASE()",
        )
        .load(&mut ids)
        .expect("sessions");
        if let Some(row) = rows.iter().find(|row| !own.contains(&row.id)) {
            break row.id;
        }
        thread::sleep(std::time::Duration::from_millis(10));
    };
    let second = {
        let combined = combined.clone();
        thread::spawn(move || combined.deduct(2, Decimal::new(1, 0), "second"))
    };
    thread::sleep(std::time::Duration::from_millis(200));
    ids.batch_execute(&format!("KILL CONNECTION {pooled}"))
        .expect("kill the batch's connection");
    let first = first.join().expect("first");
    assert!(first.is_err(), "the killed batch: {first:?}");
    let second = second.join().expect("second");
    assert!(second.is_ok(), "the other leader: {second:?}");
    other.batch_execute("ROLLBACK").expect("release account 1");
    assert_eq!(
        lockstock_testkit::fixtures::stored_balance(&mut admin, 2),
        Decimal::new(9, 0)
    );
}

#[derive(QueryableByName)]
struct Pid {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    id: i64,
}

#[test]
fn a_first_charge_keeps_its_keys_turn_until_its_call_ends() {
    use diesel::connection::SimpleConnection;
    let _alone = lockstock_testkit::fixtures::exclusive();
    let (url, mut conn) = fresh_database("combine_missing_account");
    let mut retry = lockstock::RetryPolicy::default();
    retry.max_attempts = 100_000;
    retry.deadline = std::time::Duration::from_secs(10);
    let policy = lockstock::TxnPolicy::default().with_retry(retry);
    let hot = Arc::new(CombiningLedger::new(
        pool(&url, 4),
        BalanceLedger::with_policy(policy),
    ));
    const USER: i64 = 42;
    // Another program's transaction locks the gap where the account would go: a first
    // charge finds no account (a locking read of a missing row takes a gap lock, which gap
    // locks do not refuse), and its INSERT of the account is refused until that ends.
    let mut other = connect(&url);
    other.batch_execute("BEGIN").expect("begin");
    let none: Vec<i64> = lockstock::schema::user_balance::table
        .filter(lockstock::schema::user_balance::user_id.eq(USER))
        .select(lockstock::schema::user_balance::user_id)
        .for_update()
        .load(&mut other)
        .expect("gap lock");
    assert!(none.is_empty());
    let first = {
        let hot = hot.clone();
        thread::spawn(move || hot.charge(USER, Decimal::from(10), "first"))
    };
    // The first call's batch runs (it is counted as it is formed): it finds the account
    // missing and creates it, refused until the other program ends, attempt after attempt.
    let formed = std::time::Instant::now();
    while hot.stats().batches == 0 {
        assert!(
            formed.elapsed() < std::time::Duration::from_secs(5),
            "the first call's batch never formed"
        );
        thread::sleep(std::time::Duration::from_millis(1));
    }
    let second = {
        let hot = hot.clone();
        thread::spawn(move || hot.charge(USER, Decimal::from(5), "second"))
    };
    // The second caller leads the key's next batch: it waits for the turn as long as the first
    // call runs. Before: the first call's attempt that found no account ended with an empty
    // COMMIT, which handed the turn on, and the second batch ran beside it at once.
    let queued = std::time::Instant::now();
    while hot.stats().queued == 0 && queued.elapsed() < std::time::Duration::from_secs(5) {
        thread::sleep(std::time::Duration::from_millis(1));
    }
    let watched = std::time::Instant::now();
    while watched.elapsed() < std::time::Duration::from_millis(700) {
        assert_eq!(
            hot.stats().queued,
            1,
            "the second caller took the turn while the first call still ran"
        );
        assert!(!first.is_finished(), "the first call ended early");
        thread::sleep(std::time::Duration::from_millis(5));
    }
    other.batch_execute("ROLLBACK").expect("rollback");
    let first = first.join().expect("first caller").expect("first charge");
    let second = second
        .join()
        .expect("second caller")
        .expect("second charge");
    assert!(first.id < second.id, "{first:?} {second:?}");
    let ledger = BalanceLedger::new();
    let balance = ledger.balance(&mut conn, USER).expect("balance");
    assert_eq!(balance.balance, Decimal::from(15));
    let rows = lockstock_testkit::fixtures::journal_size(&mut conn, USER);
    assert_eq!(rows, 2);
    lockstock_testkit::fixtures::audit_ok(&ledger, &mut conn, USER);
}

/// A committed combined ledger batch looks the keys of its refused requests up after its
/// COMMIT; where that lookup fails by the batch's deadline (its earliest caller's), a caller
/// with time left is not answered by it: its single call would still be looking its key up.
/// The caller finishes that lookup by its own deadline.
#[test]
fn a_lookup_cut_by_an_earlier_callers_deadline_does_not_answer_a_later_caller() {
    use diesel::connection::SimpleConnection;
    use std::time::Duration;
    let _alone = lockstock_testkit::fixtures::exclusive();
    let (url, mut conn) = fresh_database("combine_lookup_deadline");
    let hot = two_second_combiner(&url);
    const USER: i64 = 7;
    BalanceLedger::new()
        .charge(&mut conn, USER, Decimal::from(10), "funds")
        .expect("funds");

    // Another program holds the account row for 1 s (the first caller's batch waits for it,
    // holding the key's turn, so the next two callers meet in one batch) and the journal for
    // 2.6 s (LOCK TABLES: every read of it waits), past the batch's deadline (the second
    // caller's, 2.3 s) but not the third caller's (2.9 s). (About 300 ms between each step and
    // the next, as in `a_retry_refused_in_a_batch_gets_its_recorded_entry_by_its_own_deadline`:
    // with the second caller's deadline 100 ms after the first's, a loaded machine can hand
    // the key's turn on too late for it, and it answers `Timeout` from the queue.)
    let (mut journal, mut account) = hold_journal_and_account(&url, USER);
    let start = std::time::Instant::now();
    let asks: Vec<_> = [("first", 0), ("second", 300), ("third", 900)]
        .into_iter()
        .map(|(key, after)| {
            thread::sleep(Duration::from_millis(after).saturating_sub(start.elapsed()));
            let hot = hot.clone();
            // Each refused for the balance: its key is looked up after the commit.
            thread::spawn(move || hot.deduct(USER, Decimal::from(100), key))
        })
        .collect();
    thread::sleep(Duration::from_millis(1_000).saturating_sub(start.elapsed()));
    account
        .batch_execute("ROLLBACK")
        .expect("release the account");
    thread::sleep(Duration::from_millis(2_600).saturating_sub(start.elapsed()));
    journal
        .batch_execute("UNLOCK TABLES")
        .expect("release the journal");
    let answers: Vec<_> = asks
        .into_iter()
        .map(|ask| ask.join().expect("caller"))
        .collect();
    // The first two could not look their keys up by their deadlines.
    assert!(
        matches!(answers[0], Err(Error::OutcomeUnknown { .. })),
        "{answers:?}"
    );
    assert!(
        matches!(answers[1], Err(Error::OutcomeUnknown { .. })),
        "{answers:?}"
    );
    // Before: the third got the second's OutcomeUnknown with 600 ms of its deadline left.
    assert!(
        matches!(answers[2], Err(Error::InsufficientBalance { .. })),
        "{answers:?}"
    );
    let balance = BalanceLedger::new()
        .balance(&mut conn, USER)
        .expect("balance");
    assert_eq!(balance.balance, Decimal::from(10));
    let rows = lockstock_testkit::fixtures::journal_size(&mut conn, USER);
    assert_eq!(rows, 1, "the funding charge only");
}

/// A retry under a key that an earlier call applied (its caller never heard), refused now in a
/// combined batch that commits, whose key's lookup that batch's deadline (an earlier
/// caller's) cut short: the lookup is finished by the retry's own deadline, as its single call
/// would finish it, and answers the recorded entry — not `OutcomeUnknown`, and never a failure
/// that says nothing was applied.
#[test]
fn a_retry_refused_in_a_batch_gets_its_recorded_entry_by_its_own_deadline() {
    use diesel::connection::SimpleConnection;
    use std::time::Duration;
    let _alone = lockstock_testkit::fixtures::exclusive();
    let (url, mut conn) = fresh_database("combine_lookup_entry");
    let hot = two_second_combiner(&url);
    const USER: i64 = 8;
    let setup = BalanceLedger::new();
    setup
        .charge(&mut conn, USER, Decimal::from(100), "funds")
        .expect("funds");
    // The deduct under key "K" was applied; its caller never heard (its answer was lost).
    let applied = setup
        .deduct(&mut conn, USER, Decimal::from(100), "K")
        .expect("the first deduct under K");

    // As in `a_lookup_cut_by_an_earlier_callers_deadline_does_not_answer_a_later_caller`: the
    // account held for 1 s, the journal for 2.6 s; "x" holds the key's turn until its own
    // lookup gives up (2.0 s), then "w" (deadline 2.3 s) and the retry of "K" (2.9 s) meet in
    // one batch, both refused for the balance. (About 300 ms between each step and the next:
    // with "w" at 2.1 s, a loaded CI machine once handed the turn on too late for it, and "w"
    // answered `Timeout` from the queue.)
    let (mut journal, mut account) = hold_journal_and_account(&url, USER);
    let start = std::time::Instant::now();
    let at = |millis: u64| Duration::from_millis(millis).saturating_sub(start.elapsed());
    let asks: Vec<_> = [("x", 0), ("w", 300), ("K", 900)]
        .into_iter()
        .map(|(key, after)| {
            thread::sleep(at(after));
            let hot = hot.clone();
            thread::spawn(move || hot.deduct(USER, Decimal::from(100), key))
        })
        .collect();
    thread::sleep(at(1_000));
    account
        .batch_execute("ROLLBACK")
        .expect("release the account");
    thread::sleep(at(2_600));
    journal
        .batch_execute("UNLOCK TABLES")
        .expect("release the journal");
    let answers: Vec<_> = asks
        .into_iter()
        .map(|ask| ask.join().expect("caller"))
        .collect();
    assert!(
        matches!(answers[1], Err(Error::OutcomeUnknown { .. })),
        "{answers:?}"
    );
    // Before: OutcomeUnknown, with 600 ms of its deadline left.
    assert!(
        matches!(&answers[2], Ok(entry) if entry.id == applied.id),
        "{answers:?}"
    );
    let balance = BalanceLedger::new()
        .balance(&mut conn, USER)
        .expect("balance");
    assert_eq!(balance.balance, Decimal::ZERO);
    let rows = lockstock_testkit::fixtures::journal_size(&mut conn, USER);
    assert_eq!(rows, 2, "the funding charge and the first deduct");
}

/// A combined hold's expiry is judged once, on the caller's clock when it submits, as its
/// single call judges it before sending anything — not again when its batch runs after a wait:
/// an expiry just past `MAX_HOLD_DURATION` at submission is refused `TooFar` (nothing placed)
/// however long the request then waits for another program's lock. Before the fix the batch
/// judged it again at its own time, found it within the limit, and placed the hold.
#[test]
fn a_combined_holds_expiry_is_judged_when_it_is_submitted() {
    use diesel::connection::SimpleConnection;
    let (url, mut admin) = fresh_database("combine_hold_judged");
    let ledger = BalanceLedger::new();
    ledger
        .charge(&mut admin, 1, Decimal::new(10, 0), "seed")
        .expect("seed");
    let policy =
        lockstock_testkit::fixtures::policy_with_deadline(std::time::Duration::from_secs(3));
    let combined = Arc::new(CombiningLedger::new(
        pool(&url, 2),
        BalanceLedger::with_policy(policy),
    ));
    // Another program holds the account: the first caller's batch keeps being refused.
    let mut other = lockstock_testkit::fixtures::other_program(&url);
    lockstock_testkit::fixtures::lock_balance(&mut other, 1).expect("hold account 1");
    let first = {
        let combined = combined.clone();
        thread::spawn(move || combined.deduct(1, Decimal::new(1, 0), "first"))
    };
    let since = std::time::Instant::now();
    while combined.stats().queued > 0 || since.elapsed() < std::time::Duration::from_millis(50) {
        assert!(
            since.elapsed() < std::time::Duration::from_secs(5),
            "never taken"
        );
        thread::sleep(std::time::Duration::from_millis(5));
    }
    // Just past the longest hold now (the hold thread judges it well within 400 ms, even on
    // a loaded machine); within it 400 ms later, long before the batch runs (at 1 s).
    let expires_at = lockstock_testkit::fixtures::now()
        + lockstock::ledger::MAX_HOLD_DURATION
        + chrono::Duration::milliseconds(400);
    let hold = {
        let combined = combined.clone();
        thread::spawn(move || combined.hold(1, Decimal::new(1, 0), "too-far", expires_at))
    };
    thread::sleep(std::time::Duration::from_millis(1_000));
    other.batch_execute("ROLLBACK").expect("release account 1");
    first.join().expect("first").expect("the deduct");
    let hold = hold.join().expect("hold");
    assert!(
        matches!(
            hold,
            Err(Error::InvalidExpiry {
                problem: lockstock::error::ExpiryProblem::TooFar,
                ..
            })
        ),
        "{hold:?}"
    );
    let holds: i64 = lockstock::schema::balance_hold::table
        .count()
        .get_result(&mut admin)
        .expect("holds");
    assert_eq!(holds, 0, "the refused hold was placed");
    assert_eq!(
        lockstock_testkit::fixtures::stored_balance(&mut admin, 1),
        Decimal::new(9, 0)
    );
}

/// Another program's sessions: one holding the journal (`LOCK TABLES ... WRITE`: every read of
/// it waits), one holding `user`'s account row (`FOR UPDATE` in an open transaction).
fn hold_journal_and_account(url: &str, user: i64) -> (MysqlConnection, MysqlConnection) {
    use diesel::connection::SimpleConnection;
    let mut journal = connect(url);
    journal
        .batch_execute("LOCK TABLES balance_history WRITE")
        .expect("lock the journal");
    let mut account = connect(url);
    account.batch_execute("BEGIN").expect("begin");
    let _: Decimal = lockstock::schema::user_balance::table
        .find(user)
        .select(lockstock::schema::user_balance::balance)
        .for_update()
        .first(&mut account)
        .expect("lock the account");
    (journal, account)
}

/// A combining ledger over a pool of 4 whose calls have 2 s and all the attempts they want.
fn two_second_combiner(url: &str) -> Arc<CombiningLedger> {
    let mut retry = lockstock::RetryPolicy::default();
    retry.max_attempts = 100_000;
    retry.deadline = std::time::Duration::from_secs(2);
    let policy = lockstock::TxnPolicy::default().with_retry(retry);
    Arc::new(CombiningLedger::new(
        pool(url, 4),
        BalanceLedger::with_policy(policy),
    ))
}

/// A combiner opens its next batch's transaction ahead of time and leaves it idle while the
/// batch before it runs — here for more than a second, retrying against a row another program
/// holds. A server's `idle_transaction_timeout` must not end that session meanwhile: both
/// callers succeed once the row is free. Before, the pool's connections kept the server's
/// limit (1 s here), the next batch's session was killed while it waited for its turn, and its
/// caller got a lost connection from a healthy server.
#[test]
fn a_transaction_opened_ahead_outlives_the_servers_idle_transaction_timeout() {
    use diesel::connection::SimpleConnection;
    let _alone = lockstock_testkit::fixtures::exclusive();
    let sandbox = lockstock_testkit::Sandbox::start_with(&["--idle-transaction-timeout=1"])
        .expect("a private server");
    let url = sandbox
        .create_database("combine_idle_timeout")
        .expect("database");
    let mut conn = connect(&url);
    lockstock::run_migrations(&mut conn).expect("migrate");
    let ledger = BalanceLedger::new();
    ledger
        .charge(&mut conn, 7, Decimal::from(100), "fund")
        .expect("fund");
    let combining = Arc::new(CombiningLedger::new(pool(&url, 4), BalanceLedger::new()));
    // Another program holds the account's row (its own session has no idle limit).
    let mut other = connect(&url);
    other
        .batch_execute(
            "SET SESSION idle_transaction_timeout = 0; BEGIN; \
             SELECT * FROM user_balance WHERE user_id = 7 FOR UPDATE",
        )
        .expect("the row held");
    let deduct = |key: &'static str| {
        let combining = Arc::clone(&combining);
        thread::spawn(move || combining.deduct(7, Decimal::ONE, key))
    };
    let first = deduct("a");
    thread::sleep(std::time::Duration::from_millis(200));
    // Its batch opens its transaction ahead and waits for the first one's turn.
    let second = deduct("b");
    // Its session, idle since, outlives the server's 1 s limit; the first caller's attempts
    // (64, about 2 s) do not run out.
    thread::sleep(std::time::Duration::from_millis(1_300));
    other.batch_execute("ROLLBACK").expect("the row free");
    let first = first.join().expect("first caller");
    let second = second.join().expect("second caller");
    assert!(first.is_ok(), "the first caller: {first:?}");
    assert!(second.is_ok(), "the second caller: {second:?}");
    assert_eq!(
        ledger.balance(&mut conn, 7).expect("balance").balance,
        Decimal::from(98)
    );
}

/// A pooled connection that the application left inside a transaction of its own (a raw
/// `START TRANSACTION` on the pool it shares with the combiner, holding account 2's row) is
/// discarded by the first combined call that checks it out, and that call runs on another
/// connection; the server rolls the foreign transaction back as the discarded connection
/// closes, so account 2 is free again. With and without lockstock's session settings on the
/// pool (a primed transaction is tried first with them). So is the pooled connection a capture
/// reads its hold's owner on, and the one an expired hold's retry looks its key up on. Before:
/// every combined call on that connection answered `NestedTransaction` — though none was made
/// inside a transaction — and the pool handed the connection out again, its locks held; the
/// retried hold answered its expiry's refusal instead of the recorded entry.
#[test]
fn a_pooled_connection_left_inside_a_foreign_transaction_is_discarded() {
    use diesel::connection::SimpleConnection;
    use diesel::r2d2::{ConnectionManager, Pool};
    use lockstock::{SessionSettings, TxnPolicy};
    for settings in [true, false] {
        let name = if settings {
            "combine_foreign_txn_set"
        } else {
            "combine_foreign_txn"
        };
        let (url, mut admin) = fresh_database(name);
        let ledger = BalanceLedger::new();
        for user in [1, 2] {
            ledger
                .charge(&mut admin, user, Decimal::new(10, 0), "seed")
                .expect("seed");
        }
        let mut builder = Pool::builder().max_size(1);
        if settings {
            builder =
                builder.connection_customizer(Box::new(SessionSettings::new(TxnPolicy::default())));
        }
        let pool = builder
            .build(ConnectionManager::<MysqlConnection>::new(&url))
            .expect("pool");
        // The application's own use of the pool leaves a transaction open, holding account 2.
        let leak = || {
            let mut leaked = pool.get().expect("the application's checkout");
            leaked
                .batch_execute(
                    "START TRANSACTION; \
                     SELECT balance FROM user_balance WHERE user_id = 2 FOR UPDATE",
                )
                .expect("a transaction left open");
        };
        leak();
        let combined = CombiningLedger::new(pool.clone(), BalanceLedger::new());
        let first = combined.deduct(1, Decimal::new(1, 0), "first");
        assert!(first.is_ok(), "settings {settings}: {first:?}");
        let freed = combined.deduct(2, Decimal::new(1, 0), "freed");
        assert!(freed.is_ok(), "settings {settings}: {freed:?}");
        // A capture, whose hold's owner is read on a pooled connection before it is combined.
        let held = ledger
            .hold(&mut admin, 1, Decimal::new(2, 0), "held", later(3_600_000))
            .expect("a hold");
        leak();
        let captured = combined.capture(held.id, Decimal::new(1, 0), "captured");
        assert!(captured.is_ok(), "settings {settings}: {captured:?}");
        // A hold retried after its expiry passed, placed before: answered its recorded entry,
        // which is looked up on a pooled connection.
        // (1 s ahead: at 300 ms, a stall of the loaded machine before the hold left its expiry
        // in the past.)
        let expires_at = later(1_000);
        let placed = ledger
            .hold(&mut admin, 1, Decimal::new(1, 0), "late", expires_at)
            .expect("a hold placed in time");
        thread::sleep(std::time::Duration::from_millis(1_100));
        leak();
        let retried = combined.hold(1, Decimal::new(1, 0), "late", expires_at);
        assert!(
            matches!(&retried, Ok(entry) if entry.id == placed.id),
            "settings {settings}: {retried:?}"
        );
        leak();
        let after = combined.deduct(2, Decimal::new(1, 0), "after");
        assert!(after.is_ok(), "settings {settings}: {after:?}");
        for (user, balance) in [(1, 8), (2, 8)] {
            assert_eq!(
                lockstock_testkit::fixtures::stored_balance(&mut admin, user),
                Decimal::new(balance, 0),
                "settings {settings}: user {user}"
            );
        }
    }
}

/// `millis` from now, on the server's clock as lockstock reads it (UTC).
fn later(millis: i64) -> chrono::NaiveDateTime {
    chrono::Utc::now().naive_utc() + chrono::Duration::milliseconds(millis)
}

/// The generic `Combiner` runs one batch of a key at a time, whatever its `run_batch` does —
/// also one that commits two transactions through lockstock's runner. Before the fix the
/// key's turn passed on at the batch's first COMMIT (as it does for the combining types,
/// whose batches commit once): the next leader's batch ran beside the rest of this one.
#[test]
fn a_generic_batch_that_commits_twice_holds_its_key_until_it_returns() {
    use diesel::connection::SimpleConnection;
    use lockstock::combine::Combiner;
    use lockstock::{Deadline, TxnRunner};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};
    let (url, mut admin) = fresh_database("combine_generic_two_commits");
    admin
        .batch_execute("CREATE TABLE counted (id INT PRIMARY KEY, n INT NOT NULL); INSERT INTO counted VALUES (1, 0)")
        .expect("table");
    let runner = TxnRunner::default();
    let combiner = Combiner::<u8, u8, ()>::new(4);
    let deadline = || Deadline::after(Duration::from_secs(10));
    let first_committed = AtomicBool::new(false);
    let overlapped = AtomicBool::new(false);
    let count = |conn: &mut MysqlConnection, deadline: Deadline| {
        runner.run_by(conn, deadline, |c| {
            c.batch_execute("UPDATE counted SET n = n + 1 WHERE id = 1")?;
            Ok(())
        })
    };
    // Whether the first batch is inside its `run_batch`, and whether the second one started
    // while it was.
    let first_running = AtomicBool::new(false);
    let second_started = AtomicBool::new(false);
    thread::scope(|s| {
        let first = s.spawn(|| {
            let conn = Mutex::new(connect(&url));
            combiner.submit(1, 1, deadline(), |_, requests, deadline| {
                first_running.store(true, Ordering::SeqCst);
                count(&mut conn.lock().expect("conn"), deadline)?;
                first_committed.store(true, Ordering::SeqCst);
                // Another batch of the key, if it may start now, gets a second to do so.
                let until = Instant::now() + Duration::from_secs(1);
                while Instant::now() < until && !second_started.load(Ordering::SeqCst) {
                    thread::sleep(Duration::from_millis(5));
                }
                count(&mut conn.lock().expect("conn"), deadline)?;
                first_running.store(false, Ordering::SeqCst);
                Ok(vec![Ok(()); requests.len()])
            })
        });
        let second = s.spawn(|| {
            let conn = Mutex::new(connect(&url));
            let waiting = Instant::now();
            while !first_committed.load(Ordering::SeqCst) {
                assert!(
                    waiting.elapsed() < Duration::from_secs(20),
                    "the first batch never committed"
                );
                thread::sleep(Duration::from_millis(1));
            }
            combiner.submit(1, 2, deadline(), |_, requests, deadline| {
                overlapped.store(first_running.load(Ordering::SeqCst), Ordering::SeqCst);
                second_started.store(true, Ordering::SeqCst);
                count(&mut conn.lock().expect("conn"), deadline)?;
                Ok(vec![Ok(()); requests.len()])
            })
        });
        assert!(matches!(first.join().expect("first"), Ok(())));
        assert!(matches!(second.join().expect("second"), Ok(())));
    });
    assert!(
        !overlapped.load(Ordering::SeqCst),
        "a second batch of the key ran before the first returned"
    );
    let n: i64 =
        diesel::dsl::sql::<diesel::sql_types::BigInt>("SELECT CAST(n AS SIGNED) FROM counted")
            .get_result(&mut admin)
            .expect("the count");
    assert_eq!(n, 3);
}

/// A generic combiner's call inside another lockstock call's body runs by the enclosing call's
/// deadline when its own is later: its wait in the queue for the key's turn (which no watchdog
/// cuts) ends by then, `Timeout`. Before, it waited by its own 10 s deadline while another
/// batch of the key held the turn for 4 s, far past the enclosing call's 300 ms.
#[test]
fn a_combined_call_inside_a_body_waits_no_longer_than_the_enclosing_deadline() {
    use lockstock::combine::Combiner;
    use lockstock::{Deadline, TxnPolicy, TxnRunner};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};
    let (_url, mut conn) = fresh_database("combine_enclosed_wait");
    let combiner = Combiner::<u8, u8, ()>::new(4);
    let mut policy = TxnPolicy::default();
    policy.retry.deadline = Duration::from_millis(300);
    let outer = TxnRunner::new(policy);
    let holding = AtomicBool::new(false);
    thread::scope(|s| {
        let holder = s.spawn(|| {
            combiner.submit(
                1,
                1,
                Deadline::after(Duration::from_secs(10)),
                |_, requests, _| {
                    holding.store(true, Ordering::SeqCst);
                    thread::sleep(Duration::from_secs(4));
                    Ok(vec![Ok(()); requests.len()])
                },
            )
        });
        let waiting = Instant::now();
        while !holding.load(Ordering::SeqCst) {
            assert!(
                waiting.elapsed() < Duration::from_secs(20),
                "the holding batch never ran"
            );
            thread::sleep(Duration::from_millis(1));
        }
        let started = Instant::now();
        let answer = outer.run(&mut conn, |_| {
            combiner.submit(
                1,
                2,
                Deadline::after(Duration::from_secs(10)),
                |_, requests, _| Ok(vec![Ok(()); requests.len()]),
            )
        });
        let took = started.elapsed();
        assert!(matches!(answer, Err(Error::Timeout { .. })), "{answer:?}");
        assert!(took < Duration::from_secs(2), "answered after {took:?}");
        assert!(matches!(holder.join().expect("holder"), Ok(())));
    });
}

/// Payments into ONE hot receiving account (every order credits the same shop), as the README's
/// "A hot receiving account" describes them: each order deducts its buyer with a single call and
/// then credits the shop through a `CombiningLedger`, both under the order's key. A payment cut
/// between its two steps (here every fourth order of the first pass stops after its deduct, as a
/// crashed process would) is finished by running the order again with the same key: the deduct
/// answers its entry (not applied twice), the credit applies once. Checked from the database:
/// the shop holds exactly what the buyers paid, every paid order is credited once with its
/// amount, and every account's journal passes the audit.
#[test]
fn payments_into_one_hot_account_settle_once_by_deduct_then_combined_credit() {
    const SHOP: i64 = 1_000;
    const BUYERS: i64 = 16;
    const ORDERS: i64 = 12;
    let _storm = lockstock_testkit::fixtures::storm();
    let (url, mut conn) = fresh_database("combine_hot_receiver");
    let ledger = BalanceLedger::new();
    for buyer in 1..=BUYERS {
        ledger
            .charge(&mut conn, buyer, Decimal::new(100, 0), "seed")
            .expect("seed");
    }
    let shop = Arc::new(CombiningLedger::new(pool(&url, 4), ledger.clone()));
    // Eleven orders of 3 to 12 (79 in all, leaving 21 of 100), then one of 30: refused.
    let amount = |order: i64| Decimal::from(if order == ORDERS { 30 } else { 3 + order % 10 });
    // One order: the buyer's deduct, then (unless `cut`) the shop's combined credit. `Ok(None)`:
    // refused for the buyer's balance, nothing to credit.
    let pay = {
        let (ledger, shop) = (ledger.clone(), shop.clone());
        move |conn: &mut MysqlConnection, buyer: i64, order: i64, cut: bool| {
            let key = format!("order-{buyer}-{order}");
            let debit = match ledger.deduct(conn, buyer, amount(order), &key) {
                Ok(entry) => entry,
                Err(Error::InsufficientBalance { .. }) => return None,
                Err(e) => panic!("untyped deduct answer for {key}: {e:?}"),
            };
            let credit = (!cut).then(|| {
                shop.charge(SHOP, debit.amount, &key)
                    .unwrap_or_else(|e| panic!("credit of {key}: {e:?}"))
            });
            Some((debit, credit))
        }
    };
    let barrier = Arc::new(Barrier::new(usize::try_from(BUYERS).expect("buyers")));
    let first: Vec<_> = (1..=BUYERS)
        .map(|buyer| {
            let (pay, barrier, url) = (pay.clone(), barrier.clone(), url.clone());
            thread::spawn(move || {
                let mut conn = connect(&url);
                barrier.wait();
                (1..=ORDERS)
                    .map(|order| pay(&mut conn, buyer, order, order % 4 == 1))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let first: Vec<Vec<_>> = first
        .into_iter()
        .map(|worker| worker.join().expect("buyer"))
        .collect();
    let credits_of = |conn: &mut MysqlConnection| -> i64 {
        balance_history::table
            .filter(balance_history::user_id.eq(SHOP))
            .count()
            .get_result(conn)
            .expect("shop entries")
    };
    // The cut orders are paid and not credited: the gap a recovery must close.
    let cut = first
        .iter()
        .flatten()
        .filter(|paid| matches!(paid, Some((_, None))))
        .count();
    assert_eq!(cut, usize::try_from(BUYERS * 3).expect("cut"));
    assert_eq!(
        credits_of(&mut conn),
        BUYERS * (ORDERS - 1) - BUYERS * 3,
        "first pass: every order but the 30 one and the cut ones credited"
    );
    // Recovery: every order run again with its key, as a job that does not know which of them
    // finished would run them.
    for (buyer, paid) in (1..=BUYERS).zip(&first) {
        for (order, before) in (1..=ORDERS).zip(paid) {
            let again = pay(&mut conn, buyer, order, false);
            match (before, again) {
                (None, None) => {}
                (Some((debit, credit)), Some((debit_again, Some(credit_again)))) => {
                    assert_eq!(
                        debit.id, debit_again.id,
                        "order-{buyer}-{order} deducted twice"
                    );
                    if let Some(credit) = credit {
                        assert_eq!(
                            credit.id, credit_again.id,
                            "order-{buyer}-{order} credited twice"
                        );
                    }
                    assert_eq!(credit_again.amount, debit.amount);
                }
                (before, again) => panic!("order-{buyer}-{order}: {before:?} then {again:?}"),
            }
        }
    }
    // From the database: every buyer's deduct has the shop's credit of its key and amount, and
    // nothing else was credited.
    let debits: Vec<(Option<String>, Decimal)> = balance_history::table
        .filter(balance_history::kind.eq("deduct"))
        .select((balance_history::idempotency_key, balance_history::amount))
        .order(balance_history::idempotency_key.asc())
        .load(&mut conn)
        .expect("debits");
    let credits: Vec<(Option<String>, Decimal)> = balance_history::table
        .filter(balance_history::user_id.eq(SHOP))
        .select((balance_history::idempotency_key, balance_history::amount))
        .order(balance_history::idempotency_key.asc())
        .load(&mut conn)
        .expect("credits");
    assert_eq!(
        debits.len(),
        usize::try_from(BUYERS * (ORDERS - 1)).expect("paid")
    );
    assert_eq!(debits, credits);
    let paid: Decimal = debits.iter().map(|(_, amount)| *amount).sum();
    assert_eq!(paid, Decimal::from(79 * BUYERS));
    assert_eq!(
        lockstock_testkit::fixtures::stored_balance(&mut conn, SHOP),
        paid
    );
    for buyer in 1..=BUYERS {
        assert_eq!(
            lockstock_testkit::fixtures::stored_balance(&mut conn, buyer),
            Decimal::new(21, 0)
        );
        ledger.audit(&mut conn, buyer).expect("buyer audit");
    }
    ledger.audit(&mut conn, SHOP).expect("shop audit");
    eprintln!(
        "hot receiver: {} orders paid, {paid} credited, {:?}",
        debits.len(),
        shop.stats()
    );
}
