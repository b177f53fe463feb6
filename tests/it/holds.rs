//! Holds (reserve, capture, release, expire) against a real server. Every invariant is read back
//! from the database: the `balance_hold` rows, the journal's ending entries, the balances, and
//! `audit` (available = posted − active unexpired holds, every hold ended exactly once).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::Duration as StdDuration;

use chrono::{Duration, NaiveDateTime};
use diesel::prelude::*;

use lockstock::combine::CombiningLedger;
use lockstock::error::{AmountProblem, ExpiryProblem, KeyProblem};
use lockstock::schema::{balance_history, balance_hold, user_balance};
use lockstock::{AccountOp, BalanceLedger, Entry, EntryKind, Error, HoldState};
use rust_decimal::Decimal;

use lockstock_testkit::fixtures::{
    assert_not_sacrificed, audit_ok, concurrently, connect, fresh_database, funded_account,
    holds_locker, journal_size, lock_balance, now, other_program, pool, snapshot,
};
use lockstock_testkit::rng::{seed, Rng};

fn dec(units: i64) -> Decimal {
    Decimal::new(units, 0)
}

/// An expiry `seconds` ahead of the client clock.
fn in_secs(seconds: i64) -> NaiveDateTime {
    now() + Duration::seconds(seconds)
}

/// `op` on `user`'s account as its single call.
fn single_call(
    ledger: &BalanceLedger,
    conn: &mut MysqlConnection,
    user: i64,
    op: &AccountOp,
) -> Result<Entry, Error> {
    match op {
        AccountOp::Hold {
            amount,
            key,
            expires_at,
        } => ledger.hold(conn, user, *amount, key, *expires_at),
        AccountOp::Capture {
            hold_id,
            amount,
            key,
        } => ledger.capture(conn, *hold_id, *amount, key),
        AccountOp::Release { hold_id, key } => ledger.release(conn, *hold_id, key),
        AccountOp::Deduct { amount, key } => ledger.deduct(conn, user, *amount, key),
        AccountOp::Charge { amount, key } => ledger.charge(conn, user, *amount, key),
        other => panic!("unexpected op {other:?}"),
    }
}

/// One `balance_hold` row: (id, user, amount, captured, state, ended_by_entry_id).
type HoldRow = (i64, i64, Decimal, Decimal, String, Option<i64>);

/// A fresh database `name` with account 1 funded with 100 and a hold of 10 on it (key "h1",
/// an hour long): its URL, a connection, the ledger and the hold's entry.
fn account_with_a_hold(name: &str) -> (String, MysqlConnection, BalanceLedger, Entry) {
    let (url, mut conn) = fresh_database(name);
    let ledger = BalanceLedger::new();
    funded_account(&mut conn, &ledger, 1, dec(100));
    let hold = ledger
        .hold(&mut conn, 1, dec(10), "h1", in_secs(3_600))
        .expect("a hold");
    (url, conn, ledger, hold)
}

/// Another program holds `balance_hold` with `LOCK TABLES ... WRITE` for `time` (locked when
/// this returns); join the handle to wait for the unlock.
fn holds_locked_for(url: &str, time: StdDuration) -> thread::JoinHandle<()> {
    use diesel::connection::SimpleConnection;
    let mut locker = connect(url);
    locker
        .batch_execute("LOCK TABLES balance_hold WRITE")
        .expect("lock the holds");
    thread::spawn(move || {
        thread::sleep(time);
        locker
            .batch_execute("UNLOCK TABLES")
            .expect("release the holds");
    })
}

fn hold_rows(conn: &mut MysqlConnection) -> Vec<HoldRow> {
    balance_hold::table
        .select((
            balance_hold::id,
            balance_hold::user_id,
            balance_hold::amount,
            balance_hold::captured_amount,
            balance_hold::state,
            balance_hold::ended_by_entry_id,
        ))
        .order(balance_hold::id.asc())
        .load(conn)
        .expect("read balance_hold")
}

/// (entry id, kind, amount, ended_hold_id) of every journal entry that ends a hold.
fn ending_entries(conn: &mut MysqlConnection) -> Vec<(i64, String, Decimal, Option<i64>)> {
    balance_history::table
        .filter(balance_history::ended_hold_id.is_not_null())
        .select((
            balance_history::id,
            balance_history::kind,
            balance_history::amount,
            balance_history::ended_hold_id,
        ))
        .load(conn)
        .expect("read ending entries")
}

/// Checks from the database that every hold that is not active ended by exactly one journal
/// entry of its state's kind (the captured amount for a capture, the hold's otherwise), and an
/// active one by none. Returns the holds by state.
pub(crate) fn every_hold_ended_once(conn: &mut MysqlConnection) -> HashMap<String, usize> {
    let holds = hold_rows(conn);
    let ends = ending_entries(conn);
    let mut by_state = HashMap::new();
    for (id, _, amount, captured, state, ended_by) in &holds {
        *by_state.entry(state.clone()).or_insert(0) += 1;
        let mine: Vec<_> = ends.iter().filter(|e| e.3 == Some(*id)).collect();
        match state.as_str() {
            "active" => assert!(mine.is_empty() && ended_by.is_none(), "hold {id}: {mine:?}"),
            ended => {
                assert_eq!(mine.len(), 1, "hold {id} ({ended}) ended by {mine:?}");
                let (entry, kind, entry_amount, _) = mine[0];
                assert_eq!(Some(*entry), *ended_by, "hold {id}");
                let want = match ended {
                    "captured" => ("capture", *captured),
                    "released" => ("release", *amount),
                    "expired" => ("expire", *amount),
                    other => panic!("hold {id} in state {other}"),
                };
                assert_eq!((kind.as_str(), *entry_amount), want, "hold {id}");
            }
        }
    }
    assert_eq!(ends.len(), holds.iter().filter(|h| h.4 != "active").count());
    by_state
}

/// The stored (balance, held) of `user`.
fn stored(conn: &mut MysqlConnection, user: i64) -> (Decimal, Decimal) {
    user_balance::table
        .find(user)
        .select((user_balance::balance, user_balance::held))
        .first(conn)
        .expect("read account")
}

#[test]
fn hold_capture_release_lifecycle() {
    const USER: i64 = 1;
    let (_url, mut conn) = fresh_database("holds_lifecycle");
    let ledger = BalanceLedger::new();
    funded_account(&mut conn, &ledger, USER, dec(100));

    let hold = ledger
        .hold(&mut conn, USER, dec(30), "h1", in_secs(600))
        .expect("hold");
    assert_eq!((hold.kind, hold.amount), (EntryKind::Hold, dec(30)));
    assert_eq!(hold.balance_after, dec(100), "a hold posts nothing");
    let balance = ledger.balance(&mut conn, USER).expect("balance");
    assert_eq!(
        (balance.balance, balance.held, balance.available),
        (dec(100), dec(30), dec(70))
    );
    assert_eq!(stored(&mut conn, USER), (dec(100), dec(30)));
    let status = ledger.hold_status(&mut conn, hold.id).expect("status");
    assert_eq!((status.state, status.amount), (HoldState::Active, dec(30)));

    // The held points are not available to a deduct, a transfer or another hold.
    match ledger.deduct(&mut conn, USER, dec(71), "d1") {
        Err(Error::InsufficientBalance {
            available,
            requested,
            ..
        }) => assert_eq!((available, requested), (dec(70), dec(71))),
        other => panic!("expected InsufficientBalance, got {other:?}"),
    }
    assert!(matches!(
        ledger.transfer(&mut conn, USER, 2, dec(71), "t1"),
        Err(Error::InsufficientBalance { .. })
    ));
    assert!(matches!(
        ledger.hold(&mut conn, USER, dec(71), "h2", in_secs(600)),
        Err(Error::InsufficientBalance { .. })
    ));

    // A partial capture posts 20 and releases the other 10.
    let capture = ledger
        .capture(&mut conn, hold.id, dec(20), "c1")
        .expect("capture");
    assert_eq!(
        (capture.kind, capture.amount, capture.balance_after),
        (EntryKind::Capture, dec(20), dec(80))
    );
    assert_eq!(capture.related_entry_id, Some(hold.id));
    let balance = ledger.balance(&mut conn, USER).expect("balance");
    assert_eq!(
        (balance.balance, balance.held, balance.available),
        (dec(80), dec(0), dec(80))
    );
    match ledger.capture(&mut conn, hold.id, dec(5), "c2") {
        Err(Error::HoldNotActive { hold_id, state }) => {
            assert_eq!((hold_id, state), (hold.id, HoldState::Captured))
        }
        other => panic!("expected HoldNotActive, got {other:?}"),
    }
    assert!(matches!(
        ledger.release(&mut conn, hold.id, "r0"),
        Err(Error::HoldNotActive {
            state: HoldState::Captured,
            ..
        })
    ));

    // A cancelled order: the hold is released, nothing posted.
    let second = ledger
        .hold(&mut conn, USER, dec(50), "h3", in_secs(600))
        .expect("hold");
    assert_eq!(
        ledger.balance(&mut conn, USER).expect("balance").available,
        dec(30)
    );
    match ledger.capture(&mut conn, second.id, dec(51), "c3") {
        Err(Error::CaptureExceedsHold {
            hold_id,
            held,
            requested,
        }) => assert_eq!((hold_id, held, requested), (second.id, dec(50), dec(51))),
        other => panic!("expected CaptureExceedsHold, got {other:?}"),
    }
    let release = ledger.release(&mut conn, second.id, "r1").expect("release");
    assert_eq!(
        (release.kind, release.amount, release.balance_after),
        (EntryKind::Release, dec(50), dec(80))
    );
    assert!(matches!(
        ledger.release(&mut conn, second.id, "r2"),
        Err(Error::HoldNotActive {
            state: HoldState::Released,
            ..
        })
    ));
    let balance = ledger.balance(&mut conn, USER).expect("balance");
    assert_eq!(
        (
            balance.balance,
            balance.held,
            balance.available,
            balance.version
        ),
        (dec(80), dec(0), dec(80), 5)
    );

    // history shows every step, newest first.
    let kinds: Vec<EntryKind> = ledger
        .history(&mut conn, USER, None, 10)
        .expect("history")
        .entries
        .iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds,
        [
            EntryKind::Release,
            EntryKind::Hold,
            EntryKind::Capture,
            EntryKind::Hold,
            EntryKind::Charge
        ]
    );
    let by_state = every_hold_ended_once(&mut conn);
    assert_eq!(by_state.get("captured"), Some(&1));
    assert_eq!(by_state.get("released"), Some(&1));
    let report = ledger.audit(&mut conn, USER).expect("audit");
    assert_eq!(
        (report.balance, report.held, report.available, report.holds),
        (dec(80), dec(0), dec(80), 2)
    );
}

/// Calls `call` again (the same request, the same key) while it is refused for contention;
/// any other answer is returned. A retry never applies anything twice: the key decides.
fn until_decided<T>(mut call: impl FnMut() -> Result<T, Error>) -> Result<T, Error> {
    for _ in 0..200 {
        match call() {
            Err(Error::Contended { .. } | Error::OutcomeUnknown { .. }) => {
                thread::sleep(StdDuration::from_millis(2))
            }
            other => return other,
        }
    }
    panic!("still contended after 200 tries")
}

#[test]
fn replays_and_conflicts_for_hold_capture_and_release() {
    const USER: i64 = 3;
    let (_url, mut conn) = fresh_database("holds_idempotency");
    let ledger = BalanceLedger::new();
    funded_account(&mut conn, &ledger, USER, dec(100));
    let expires_at = in_secs(600);

    let hold = ledger
        .hold(&mut conn, USER, dec(40), "h", expires_at)
        .expect("hold");
    // The same request (amount written differently, expiry the same microsecond): the same entry.
    let again = ledger
        .hold(&mut conn, USER, Decimal::new(4000, 2), "h", expires_at)
        .expect("replay");
    assert_eq!(again, hold);
    // Another amount or another expiry under the key: a conflict naming the first entry.
    for (amount, at) in [
        (dec(41), expires_at),
        (dec(40), expires_at + Duration::seconds(1)),
    ] {
        match ledger.hold(&mut conn, USER, amount, "h", at) {
            Err(Error::IdempotencyConflict {
                existing_entry_id, ..
            }) => assert_eq!(existing_entry_id, hold.id),
            other => panic!("expected IdempotencyConflict, got {other:?}"),
        }
    }
    // The key of a charge is no hold's.
    assert!(matches!(
        ledger.hold(&mut conn, USER, dec(1), "fund-3", expires_at),
        Err(Error::IdempotencyConflict { .. })
    ));

    let capture = ledger
        .capture(&mut conn, hold.id, dec(25), "c")
        .expect("capture");
    // Replayed after the hold ended: the original capture, not HoldNotActive.
    assert_eq!(
        ledger
            .capture(&mut conn, hold.id, dec(25), "c")
            .expect("replay"),
        capture
    );
    match ledger.capture(&mut conn, hold.id, dec(24), "c") {
        Err(Error::IdempotencyConflict {
            existing_entry_id, ..
        }) => assert_eq!(existing_entry_id, capture.id),
        other => panic!("expected IdempotencyConflict, got {other:?}"),
    }
    // The capture's key used to release the same hold: a different request.
    assert!(matches!(
        ledger.release(&mut conn, hold.id, "c"),
        Err(Error::IdempotencyConflict { .. })
    ));

    let second = ledger
        .hold(&mut conn, USER, dec(30), "h2", expires_at)
        .expect("hold");
    let release = ledger.release(&mut conn, second.id, "r").expect("release");
    assert_eq!(
        ledger.release(&mut conn, second.id, "r").expect("replay"),
        release
    );
    // The release's key for a capture of the same hold, or a release of another hold.
    assert!(matches!(
        ledger.capture(&mut conn, second.id, dec(30), "r"),
        Err(Error::IdempotencyConflict { .. })
    ));
    assert!(matches!(
        ledger.release(&mut conn, hold.id, "r"),
        Err(Error::IdempotencyConflict { .. })
    ));

    let before = snapshot(&mut conn);
    // Replays change nothing.
    ledger
        .hold(&mut conn, USER, dec(40), "h", expires_at)
        .expect("replay");
    ledger
        .capture(&mut conn, hold.id, dec(25), "c")
        .expect("replay");
    ledger.release(&mut conn, second.id, "r").expect("replay");
    assert_eq!(snapshot(&mut conn), before);
    every_hold_ended_once(&mut conn);
    audit_ok(&ledger, &mut conn, USER);
}

#[test]
fn bad_hold_inputs_are_typed_and_change_nothing() {
    const USER: i64 = 4;
    let (_url, mut conn) = fresh_database("holds_bad_inputs");
    let ledger = BalanceLedger::new();
    funded_account(&mut conn, &ledger, USER, dec(100));
    let hold = ledger
        .hold(&mut conn, USER, dec(10), "h", in_secs(600))
        .expect("hold");
    let before = snapshot(&mut conn);
    let later = in_secs(600);
    let amount = |want: AmountProblem| move |e: &Error| matches!(e, Error::InvalidAmount { problem, .. } if *problem == want);
    let expiry = |want: ExpiryProblem| move |e: &Error| matches!(e, Error::InvalidExpiry { problem, .. } if *problem == want);
    let key = |want: KeyProblem| move |e: &Error| matches!(e, Error::InvalidIdempotencyKey { problem } if *problem == want);
    type Check = Box<dyn Fn(&Error) -> bool>;
    let cases: Vec<(&str, Result<Entry, Error>, Check)> = vec![
        (
            "hold zero",
            ledger.hold(&mut conn, USER, Decimal::ZERO, "x", later),
            Box::new(amount(AmountProblem::NotPositive)),
        ),
        (
            "hold 5 decimals",
            ledger.hold(&mut conn, USER, Decimal::new(1, 5), "x", later),
            Box::new(amount(AmountProblem::TooManyDecimals)),
        ),
        (
            "hold empty key",
            ledger.hold(&mut conn, USER, dec(1), "", later),
            Box::new(key(KeyProblem::Empty)),
        ),
        (
            "hold expiring in the past",
            ledger.hold(&mut conn, USER, dec(1), "x", now() - Duration::seconds(1)),
            Box::new(expiry(ExpiryProblem::NotInFuture)),
        ),
        (
            "hold for a year",
            ledger.hold(&mut conn, USER, dec(1), "x", now() + Duration::days(365)),
            Box::new(expiry(ExpiryProblem::TooFar)),
        ),
        (
            "hold on user 0",
            ledger.hold(&mut conn, 0, dec(1), "x", later),
            Box::new(|e: &Error| {
                matches!(
                    e,
                    Error::InvalidId {
                        what: "user",
                        id: 0
                    }
                )
            }),
        ),
        (
            "hold on no account",
            ledger.hold(&mut conn, 999, dec(1), "x", later),
            Box::new(|e: &Error| matches!(e, Error::AccountNotFound { user_id: 999 })),
        ),
        (
            "capture hold 0",
            ledger.capture(&mut conn, 0, dec(1), "x"),
            Box::new(|e: &Error| {
                matches!(
                    e,
                    Error::InvalidId {
                        what: "hold",
                        id: 0
                    }
                )
            }),
        ),
        (
            "capture negative",
            ledger.capture(&mut conn, hold.id, dec(-1), "x"),
            Box::new(amount(AmountProblem::NotPositive)),
        ),
        (
            "capture key with a trailing space",
            ledger.capture(&mut conn, hold.id, dec(1), "x "),
            Box::new(key(KeyProblem::TrailingSpace)),
        ),
        (
            "capture of no hold",
            ledger.capture(&mut conn, 424_242, dec(1), "x"),
            Box::new(|e: &Error| matches!(e, Error::HoldNotFound { hold_id: 424_242 })),
        ),
        (
            "capture of a charge entry",
            ledger.capture(&mut conn, hold.id - 1, dec(1), "x"),
            Box::new(|e: &Error| matches!(e, Error::HoldNotFound { .. })),
        ),
        (
            "capture above the hold",
            ledger.capture(&mut conn, hold.id, dec(11), "x"),
            Box::new(|e: &Error| matches!(e, Error::CaptureExceedsHold { .. })),
        ),
        (
            "release of no hold",
            ledger.release(&mut conn, 424_242, "x"),
            Box::new(|e: &Error| matches!(e, Error::HoldNotFound { hold_id: 424_242 })),
        ),
        (
            "release with a long key",
            ledger.release(&mut conn, hold.id, &"k".repeat(65)),
            Box::new(key(KeyProblem::TooLong { len: 65 })),
        ),
    ];
    for (name, result, check) in cases {
        match result {
            Err(e) => assert!(check(&e), "{name}: unexpected error {e:?}"),
            Ok(entry) => panic!("{name}: accepted as {entry:?}"),
        }
    }
    assert!(matches!(
        ledger.expire_holds(&mut conn, 0),
        Err(Error::InvalidInput { field: "limit", .. })
    ));
    assert!(matches!(
        ledger.hold_status(&mut conn, -1),
        Err(Error::InvalidId { what: "hold", .. })
    ));
    // A batch on an account that cannot exist refuses its captures and releases as it refuses
    // its charges: the account id, before anything is sent (not `HoldNotFound` after a read).
    for account in [0, -1, i64::MIN] {
        let ops = [
            AccountOp::capture(hold.id, dec(1), "c"),
            AccountOp::release(hold.id, "r"),
            AccountOp::charge(dec(1), "x"),
        ];
        let answers = ledger
            .apply_many(&mut conn, account, &ops)
            .expect("answered per request");
        assert_eq!(answers.len(), ops.len());
        for (op, answer) in ops.iter().zip(answers) {
            assert!(
                matches!(answer, Err(Error::InvalidId { what: "user", id }) if id == account),
                "{op:?} on account {account}: {answer:?}"
            );
        }
    }
    assert_eq!(
        snapshot(&mut conn),
        before,
        "a refused call wrote something"
    );
    audit_ok(&ledger, &mut conn, USER);
}

#[test]
fn an_expired_hold_stops_reserving_before_any_sweep() {
    const USER: i64 = 5;
    let (_url, mut conn) = fresh_database("holds_expiry");
    let ledger = BalanceLedger::new();
    funded_account(&mut conn, &ledger, USER, dec(100));
    let short = ledger
        .hold(
            &mut conn,
            USER,
            dec(60),
            "short",
            now() + Duration::milliseconds(2000),
        )
        .expect("hold");
    let long = ledger
        .hold(&mut conn, USER, dec(30), "long", in_secs(600))
        .expect("hold");
    assert_eq!(
        ledger.balance(&mut conn, USER).expect("balance").available,
        dec(10)
    );
    // Wait for the server clock to pass the expiry.
    while ledger.balance(&mut conn, USER).expect("balance").held != dec(30) {
        thread::sleep(StdDuration::from_millis(100));
    }
    let balance = ledger.balance(&mut conn, USER).expect("balance");
    assert_eq!((balance.balance, balance.available), (dec(100), dec(70)));
    // Nothing has marked it: it is still stored as active, yet it reserves nothing.
    let status = ledger.hold_status(&mut conn, short.id).expect("status");
    assert_eq!(status.state, HoldState::Active);
    assert_eq!(stored(&mut conn, USER), (dec(100), dec(90)));
    // Its points can be spent; it can be neither captured nor released.
    ledger
        .deduct(&mut conn, USER, dec(70), "spend")
        .expect("deduct the expired hold's points");
    for result in [
        ledger.capture(&mut conn, short.id, dec(1), "c"),
        ledger.release(&mut conn, short.id, "r"),
    ] {
        match result {
            Err(Error::HoldExpired {
                hold_id,
                expired_at,
            }) => assert_eq!((hold_id, expired_at), (short.id, status.expires_at)),
            other => panic!("expected HoldExpired, got {other:?}"),
        }
    }
    audit_ok(&ledger, &mut conn, USER);

    let swept = ledger.expire_holds(&mut conn, 10).expect("sweep");
    assert_eq!(swept.skipped_accounts, Vec::<i64>::new());
    assert_eq!(swept.expired.len(), 1);
    let entry = &swept.expired[0];
    assert_eq!(
        (
            entry.kind,
            entry.amount,
            entry.related_entry_id,
            entry.balance_after
        ),
        (EntryKind::Expire, dec(60), Some(short.id), dec(30))
    );
    assert_eq!(entry.idempotency_key, None);
    assert_eq!(
        ledger.expire_holds(&mut conn, 10).expect("sweep").expired,
        Vec::<Entry>::new(),
        "a hold expires once"
    );
    assert!(matches!(
        ledger.capture(&mut conn, short.id, dec(1), "c"),
        Err(Error::HoldExpired { .. })
    ));
    assert_eq!(stored(&mut conn, USER), (dec(30), dec(30)));
    ledger
        .capture(&mut conn, long.id, dec(30), "c-long")
        .expect("capture the live hold");
    let states = every_hold_ended_once(&mut conn);
    assert_eq!(
        (states.get("expired"), states.get("captured")),
        (Some(&1), Some(&1))
    );
    let report = ledger.audit(&mut conn, USER).expect("audit");
    assert_eq!((report.balance, report.available), (dec(0), dec(0)));
}

/// 32 threads place holds far above the account's balance and capture (partly) or release
/// each one they got, while another connection samples the balance: the available and the
/// posted balance never go below zero, every hold ends exactly once, and the audit passes.
#[test]
fn thirty_two_threads_hold_capture_and_release_on_one_account() {
    // Heavy: never beside a test that asserts time bounds.
    let _storm = lockstock_testkit::fixtures::storm();
    const THREADS: usize = 32;
    const HOLDS_PER_THREAD: usize = 6;
    const USER: i64 = 7;
    let (url, mut conn) = fresh_database("holds_hot_account");
    let ledger = BalanceLedger::new();
    let initial = dec(1000);
    funded_account(&mut conn, &ledger, USER, initial);
    let seed = seed("thirty_two_threads_hold_capture_and_release_on_one_account");
    let stop = AtomicBool::new(false);
    let samples = AtomicUsize::new(0);
    let outcomes = thread::scope(|s| {
        let _stop_on_drop = crate::StopOnDrop(&stop);
        let sampler = s.spawn(|| {
            let mut conn = connect(&url);
            while !stop.load(Ordering::Relaxed) {
                let balance = ledger.balance(&mut conn, USER).expect("sample balance");
                assert!(balance.balance >= Decimal::ZERO, "{balance:?}");
                assert!(balance.available >= Decimal::ZERO, "{balance:?}");
                assert_eq!(balance.available, balance.balance - balance.held);
                let (posted, held) = stored(&mut conn, USER);
                assert!(posted >= Decimal::ZERO && held >= Decimal::ZERO);
                samples.fetch_add(1, Ordering::Relaxed);
            }
        });
        let outcomes = concurrently(THREADS, &url, |thread, conn| {
            let mut rng = Rng::new(seed ^ thread as u64);
            let mut tally = (0usize, 0usize, 0usize, Decimal::ZERO); // refused, captured, released, posted
            for i in 0..HOLDS_PER_THREAD {
                let amount = dec(20 + rng.below(100) as i64);
                let key = format!("h-{thread}-{i}");
                let placed = until_decided(|| ledger.hold(conn, USER, amount, &key, in_secs(600)));
                let hold = match placed {
                    Ok(hold) => hold,
                    Err(Error::InsufficientBalance { available, .. }) => {
                        assert!(available >= Decimal::ZERO && available < amount);
                        tally.0 += 1;
                        continue;
                    }
                    Err(e) => panic!("hold: {e:?}"),
                };
                thread::sleep(StdDuration::from_millis(rng.below(5)));
                if rng.chance(600) {
                    let part =
                        dec(1 + rng.below(amount.try_into().unwrap_or(1)) as i64).min(amount);
                    let key = format!("c-{thread}-{i}");
                    let entry = until_decided(|| ledger.capture(conn, hold.id, part, &key))
                        .unwrap_or_else(|e| panic!("capture: {e:?}"));
                    assert_eq!((entry.kind, entry.amount), (EntryKind::Capture, part));
                    tally.1 += 1;
                    tally.3 += part;
                } else {
                    let key = format!("r-{thread}-{i}");
                    until_decided(|| ledger.release(conn, hold.id, &key))
                        .unwrap_or_else(|e| panic!("release: {e:?}"));
                    tally.2 += 1;
                }
            }
            tally
        });
        stop.store(true, Ordering::Relaxed);
        sampler.join().expect("sampler");
        outcomes
    });
    assert!(
        samples.load(Ordering::Relaxed) > 0,
        "the sampler never read"
    );
    let refused: usize = outcomes.iter().map(|o| o.0).sum();
    let captured: usize = outcomes.iter().map(|o| o.1).sum();
    let released: usize = outcomes.iter().map(|o| o.2).sum();
    let posted: Decimal = outcomes.iter().map(|o| o.3).sum();
    println!(
        "{} holds placed ({captured} captured, {released} released), {refused} refused, {} samples",
        captured + released,
        samples.load(Ordering::Relaxed)
    );
    assert!(refused > 0, "the holds never exceeded the balance");
    let states = every_hold_ended_once(&mut conn);
    assert_eq!(states.get("active"), None);
    assert_eq!(states.get("captured").copied().unwrap_or(0), captured);
    assert_eq!(states.get("released").copied().unwrap_or(0), released);
    assert_eq!(stored(&mut conn, USER), (initial - posted, Decimal::ZERO));
    let report = ledger.audit(&mut conn, USER).expect("audit");
    assert_eq!(report.holds as usize, captured + released);
}

/// Holds that expire (on the server clock) while captures race them and two sweepers mark
/// them: each ends captured or expired, never both, and a capture is answered Ok exactly for
/// the holds that end captured.
///
/// The race must happen for the run to say anything: captures aimed before and after the
/// expiry land on both sides. On a loaded machine the threads may get going only after the
/// expiry (every hold expired, none captured); such a run is checked like any other, then run
/// again on a new account with the expiry further ahead (at most three runs).
#[test]
fn captures_racing_expiry_end_each_hold_once() {
    let (url, mut conn) = fresh_database("holds_expiry_race");
    let ledger = BalanceLedger::new();
    for (run, ahead_ms) in [2_500, 5_000, 10_000].into_iter().enumerate() {
        let user = 8 + run as i64;
        let captured = expiry_race(&url, &mut conn, &ledger, user, ahead_ms);
        if captured > 0 && captured < EXPIRY_RACE_HOLDS {
            return;
        }
        println!(
            "no race with the expiry {ahead_ms} ms ahead: {captured} of {EXPIRY_RACE_HOLDS} \
             captured"
        );
    }
    panic!("no race in three runs (captures never landed on both sides of the expiry)");
}

/// Holds placed by [`expiry_race`].
const EXPIRY_RACE_HOLDS: usize = 24;

/// One run of [`captures_racing_expiry_end_each_hold_once`] on account `user`, its holds
/// expiring `ahead_ms` after they are placed: checks every invariant, returns how many holds
/// were captured.
fn expiry_race(
    url: &str,
    conn: &mut MysqlConnection,
    ledger: &BalanceLedger,
    user: i64,
    ahead_ms: i64,
) -> usize {
    const HOLDS: usize = EXPIRY_RACE_HOLDS;
    const CAPTURERS: usize = 6;
    funded_account(conn, ledger, user, dec(10_000));
    // Far enough ahead for the threads to connect before the race starts; one batch (one
    // transaction) places every hold.
    let expires_at = now() + Duration::milliseconds(ahead_ms);
    let ops: Vec<AccountOp> = (0..HOLDS)
        .map(|i| AccountOp::hold(dec(10), format!("h{i}"), expires_at))
        .collect();
    let holds: Vec<i64> = ledger
        .apply_many(conn, user, &ops)
        .expect("holds")
        .into_iter()
        .map(|answer| answer.expect("hold").id)
        .collect();
    let seed = seed("captures_racing_expiry_end_each_hold_once");
    let done = AtomicBool::new(false);
    let (answers, swept) = thread::scope(|s| {
        let _stop_on_drop = crate::StopOnDrop(&done);
        let sweepers: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    let mut conn = connect(url);
                    let mut expired = Vec::new();
                    while !done.load(Ordering::Relaxed) {
                        let report = ledger.expire_holds(&mut conn, 5).expect("sweep");
                        expired.extend(report.expired.into_iter().map(|e| e.related_entry_id));
                        thread::sleep(StdDuration::from_millis(20));
                    }
                    expired
                })
            })
            .collect();
        let answers = concurrently(CAPTURERS, url, |thread, conn| {
            let mut rng = Rng::new(seed ^ thread as u64);
            let mut answers = Vec::new();
            for (i, hold) in holds
                .iter()
                .enumerate()
                .filter(|(i, _)| i % CAPTURERS == thread)
            {
                // Aim around the expiry: from 400 ms before it to 200 ms after it.
                let at = expires_at - Duration::milliseconds(400)
                    + Duration::milliseconds(rng.below(600) as i64);
                if let Ok(wait) = (at - now()).to_std() {
                    thread::sleep(wait);
                }
                let key = format!("c{i}");
                let answer = until_decided(|| ledger.capture(conn, *hold, dec(7), &key));
                match &answer {
                    Ok(_) | Err(Error::HoldExpired { .. }) => {}
                    Err(e) => panic!("capture of {hold}: {e:?}"),
                }
                answers.push((*hold, answer.is_ok()));
            }
            answers
        });
        // Past the expiry (the server's clock decides): sweep until nothing is active.
        let waiting = std::time::Instant::now();
        while ledger.balance(conn, user).expect("balance").held > Decimal::ZERO {
            assert!(
                waiting.elapsed() < StdDuration::from_secs(60),
                "holds still active a minute after their expiry"
            );
            thread::sleep(StdDuration::from_millis(50));
        }
        while !ledger
            .expire_holds(conn, 100)
            .expect("sweep")
            .expired
            .is_empty()
        {}
        done.store(true, Ordering::Relaxed);
        let swept: Vec<Option<i64>> = sweepers
            .into_iter()
            .flat_map(|h| h.join().expect("sweeper"))
            .collect();
        (answers.concat(), swept)
    });
    let states = every_hold_ended_once(conn);
    assert_eq!(states.get("active"), None);
    let rows: HashMap<i64, String> = hold_rows(conn).into_iter().map(|h| (h.0, h.4)).collect();
    for (hold, captured) in &answers {
        let want = if *captured { "captured" } else { "expired" };
        assert_eq!(rows[hold], want, "hold {hold}");
    }
    let mut swept_ids: Vec<i64> = swept.into_iter().flatten().collect();
    swept_ids.sort_unstable();
    let before = swept_ids.len();
    swept_ids.dedup();
    assert_eq!(before, swept_ids.len(), "two sweepers expired one hold");
    let captured = answers.iter().filter(|a| a.1).count();
    println!(
        "{captured} captured, {} expired ({} by the racing sweepers)",
        HOLDS - captured,
        swept_ids.len()
    );
    // Exactly the captured holds were posted.
    assert_eq!(
        stored(conn, user),
        (
            dec(10_000) - dec(7) * Decimal::from(captured),
            Decimal::ZERO
        )
    );
    audit_ok(ledger, conn, user);
    captured
}

/// Several sweepers at once over many accounts: every due hold is expired exactly once (the
/// unique ending entry and the reports agree), locked accounts are skipped, not waited for.
#[test]
fn concurrent_sweepers_expire_each_hold_once() {
    const ACCOUNTS: i64 = 4;
    const HOLDS: usize = 12;
    let (url, mut conn) = fresh_database("holds_sweepers");
    let ledger = BalanceLedger::new();
    for user in 1..=ACCOUNTS {
        funded_account(&mut conn, &ledger, user, dec(1000));
    }
    // One batch of holds per account (a transaction each), due 1.5 s after its batch starts
    // (the clock read for each batch: a loaded machine, slow to place the earlier accounts'
    // holds, still places every account's in time).
    for user in 1..=ACCOUNTS {
        let expires_at = now() + Duration::milliseconds(1500);
        let holds: Vec<AccountOp> = (0..HOLDS)
            .map(|i| AccountOp::hold(dec(5), format!("h{i}"), expires_at))
            .collect();
        for answer in ledger.apply_many(&mut conn, user, &holds).expect("holds") {
            answer.expect("hold");
        }
    }
    while (1..=ACCOUNTS)
        .any(|u| ledger.balance(&mut conn, u).expect("balance").held > Decimal::ZERO)
    {
        thread::sleep(StdDuration::from_millis(50));
    }
    let reports = concurrently(4, &url, |_, conn| {
        let mut expired = Vec::new();
        let mut skipped = 0;
        loop {
            let report = ledger.expire_holds(conn, 7).expect("sweep");
            skipped += report.skipped_accounts.len();
            if report.expired.is_empty() && report.skipped_accounts.is_empty() {
                return (expired, skipped);
            }
            expired.extend(report.expired);
        }
    });
    let mut ends: Vec<i64> = reports
        .iter()
        .flat_map(|r| r.0.iter().filter_map(|e| e.related_entry_id))
        .collect();
    ends.sort_unstable();
    let total = ends.len();
    ends.dedup();
    assert_eq!((total, ends.len()), (HOLDS * ACCOUNTS as usize, total));
    let states = every_hold_ended_once(&mut conn);
    assert_eq!(states.get("expired"), Some(&(HOLDS * ACCOUNTS as usize)));
    println!(
        "sweepers skipped {} locked accounts",
        reports.iter().map(|r| r.1).sum::<usize>()
    );
    for user in 1..=ACCOUNTS {
        let report = ledger.audit(&mut conn, user).expect("audit");
        assert_eq!((report.balance, report.available), (dec(1000), dec(1000)));
    }
}

/// A sweep whose first due holds all belong to an account that stays locked (a hot one, here
/// held by another program) still marks other accounts' due holds: it reads the due holds
/// again without the accounts it skipped. Before, every call read the same first `limit`
/// holds, skipped their account and marked nothing — as long as that account stayed locked,
/// no other account's holds were ever recorded as expired.
#[test]
fn a_locked_account_does_not_keep_other_accounts_holds_from_the_sweep() {
    sweep_past_locked_accounts("holds_sweep_starved", (1, 5), 5);
}

/// Many locked accounts whose holds expired first (here ten, with a `limit` of one: each read
/// meets one of them) do not starve the sweep either: it reads on, by its deadline, until it
/// finds a hold it can mark. Before (a bound of eight reads) the call answered nothing marked
/// and eight accounts skipped.
#[test]
fn many_locked_accounts_do_not_keep_another_accounts_hold_from_the_sweep() {
    sweep_past_locked_accounts("holds_sweep_starved_many", (10, 1), 1);
}

/// `locked.0` accounts with `locked.1` holds each that expire first, all held by other
/// programs, and one free account with a hold that expires after them: one `expire_holds` of
/// `limit` marks the free account's hold, skips every locked account, and the audit of the
/// free account holds.
fn sweep_past_locked_accounts(name: &str, (accounts, holds): (i64, usize), limit: u32) {
    let (url, mut conn) = fresh_database(name);
    let ledger = BalanceLedger::new();
    let free = accounts + 1;
    for user in 1..=free {
        funded_account(&mut conn, &ledger, user, dec(100));
    }
    // Each account's holds due 800 ms after its batch starts (the clock read for each batch:
    // a loaded machine, slow to place the earlier ones, still places every hold in time), the
    // free account's 200 ms after the last of them.
    let mut last = now();
    for user in 1..=accounts {
        last = now() + Duration::milliseconds(800);
        let ops: Vec<AccountOp> = (0..holds)
            .map(|i| AccountOp::hold(dec(1), format!("h{i}"), last))
            .collect();
        for answer in ledger.apply_many(&mut conn, user, &ops).expect("holds") {
            answer.expect("a locked account's hold");
        }
    }
    let later = ledger
        .hold(
            &mut conn,
            free,
            dec(1),
            "later",
            last.max(now()) + Duration::milliseconds(200),
        )
        .expect("the free account's hold");
    while ledger.balance(&mut conn, free).expect("balance").held > Decimal::ZERO {
        thread::sleep(StdDuration::from_millis(20));
    }
    let mut others: Vec<MysqlConnection> = (1..=accounts)
        .map(|user| {
            let mut other = other_program(&url);
            lock_balance(&mut other, user).expect("held by another program");
            other
        })
        .collect();
    let report = ledger.expire_holds(&mut conn, limit).expect("sweep");
    for other in &mut others {
        diesel::connection::SimpleConnection::batch_execute(other, "ROLLBACK").expect("release");
    }
    let ends: Vec<Option<i64>> = report.expired.iter().map(|e| e.related_entry_id).collect();
    assert_eq!(ends, vec![Some(later.id)], "{report:?}");
    assert_eq!(
        report.skipped_accounts,
        (1..=accounts).collect::<Vec<_>>(),
        "{report:?}"
    );
    assert_eq!(
        ledger
            .hold_status(&mut conn, later.id)
            .expect("status")
            .state,
        HoldState::Expired
    );
    audit_ok(&ledger, &mut conn, free);
}

/// A sweep whose first read found only a locked account's due hold (skipped), and whose next
/// read of the due holds failed (here the connection killed just before it): nothing was
/// marked, so the failure is the answer — as an account transaction's failure before any
/// commit is. Before the fix it answered `Ok` with nothing expired and the account skipped,
/// as if no other hold were due (and a router never saw the node failure).
#[test]
fn a_sweep_whose_later_read_fails_before_marking_anything_answers_the_failure() {
    let (url, mut conn) = fresh_database("holds_sweep_later_read_fails");
    let ledger = BalanceLedger::new();
    funded_account(&mut conn, &ledger, 1, dec(100));
    ledger
        .hold(
            &mut conn,
            1,
            dec(1),
            "due",
            now() + Duration::milliseconds(500),
        )
        .expect("the hold");
    let since = std::time::Instant::now();
    while ledger.balance(&mut conn, 1).expect("balance").held > Decimal::ZERO {
        assert!(
            since.elapsed() < StdDuration::from_secs(20),
            "the hold never expired on the server clock"
        );
        thread::sleep(StdDuration::from_millis(20));
    }
    let mut other = other_program(&url);
    lock_balance(&mut other, 1).expect("held by another program");
    // The sweep's connection killed as its second read of due holds starts.
    let mut due_reads = 0;
    crate::kill_at_statement(&mut conn, &url, move |sql| {
        if sql.contains("FROM `balance_hold`") && sql.contains("<= UTC_TIMESTAMP(6)") {
            due_reads += 1;
        }
        due_reads == 2
    });
    let report = ledger.expire_holds(&mut conn, 10);
    diesel::connection::SimpleConnection::batch_execute(&mut other, "ROLLBACK").expect("release");
    assert!(
        matches!(&report, Err(e) if e.is_retryable() && !e.is_outcome_unknown()),
        "{report:?}"
    );
    let mut check = connect(&url);
    let holds = hold_rows(&mut check);
    assert!(
        holds.iter().all(|hold| hold.4 == "active"),
        "nothing was marked: {holds:?}"
    );
}

/// Holds and captures through `CombiningLedger` from many threads on one account: each answer
/// is the single call's, and the account stays exact.
#[test]
fn combining_ledger_holds_and_captures() {
    const THREADS: usize = 16;
    const USER: i64 = 9;
    let (url, mut conn) = fresh_database("holds_combining");
    let ledger = BalanceLedger::new();
    funded_account(&mut conn, &ledger, USER, dec(500));
    let hot = CombiningLedger::new(pool(&url, 4), BalanceLedger::new());
    let results = lockstock_testkit::fixtures::together(THREADS, |thread| {
        let (key, expires_at) = (format!("h{thread}"), in_secs(600));
        let hold = until_decided(|| hot.hold(USER, dec(40), &key, expires_at));
        let Ok(hold) = hold else {
            assert!(
                matches!(hold, Err(Error::InsufficientBalance { .. })),
                "{hold:?}"
            );
            return None;
        };
        assert_eq!(
            until_decided(|| hot.hold(USER, dec(40), &key, expires_at))
                .expect("replay")
                .id,
            hold.id,
            "a replayed hold is the original"
        );
        let ending = if thread % 2 == 0 {
            until_decided(|| hot.capture(hold.id, dec(25), &format!("c{thread}")))
        } else {
            until_decided(|| hot.release(hold.id, &format!("r{thread}")))
        };
        let ending = ending.expect("end the hold");
        assert_eq!(ending.related_entry_id, Some(hold.id));
        Some(ending.kind)
    });
    let placed = results.iter().flatten().count();
    assert_eq!(placed, 12, "500 holds 12 holds of 40 at most at once");
    assert!(matches!(
        hot.capture(424_242, dec(1), "x"),
        Err(Error::HoldNotFound { hold_id: 424_242 })
    ));
    assert!(matches!(
        hot.capture(0, dec(1), "x"),
        Err(Error::InvalidId { what: "hold", .. })
    ));
    every_hold_ended_once(&mut conn);
    let captures = results
        .iter()
        .filter(|r| **r == Some(EntryKind::Capture))
        .count();
    let report = ledger.audit(&mut conn, USER).expect("audit");
    assert_eq!(report.balance, dec(500) - dec(25) * Decimal::from(captures));
}

/// A batch of holds, captures and releases answers each request as the single calls made one
/// after another (the same ops on a second account).
#[test]
fn batch_holds_answer_as_single_calls() {
    let (_url, mut conn) = fresh_database("holds_batch");
    let ledger = BalanceLedger::new();
    let (single, batched) = (11i64, 12i64);
    let later = in_secs(600);
    let mut placed = HashMap::new();
    for user in [single, batched] {
        funded_account(&mut conn, &ledger, user, dec(100));
        let a = ledger
            .hold(&mut conn, user, dec(30), "a", later)
            .expect("a");
        let b = ledger
            .hold(&mut conn, user, dec(20), "b", later)
            .expect("b");
        placed.insert(user, (a.id, b.id));
    }
    let other = placed[&single].0; // a hold of another account for the batch
    let ops = |user: i64| {
        let (a, b) = placed[&user];
        vec![
            AccountOp::hold(dec(40), "c", later),
            AccountOp::hold(dec(11), "d", later), // 100 - 30 - 20 - 40 = 10 available
            AccountOp::capture(a, dec(31), "x1"), // above the hold
            AccountOp::capture(a, dec(30), "x2"),
            AccountOp::capture(a, dec(1), "x3"), // captured already
            AccountOp::release(b, "y1"),
            AccountOp::release(b, "y1"), // the same request: the same entry
            AccountOp::release(a, "y1"), // another request under the key
            AccountOp::hold(dec(11), "d", later), // the key was refused: free again
            AccountOp::deduct(dec(30), "z"),
            AccountOp::capture(0, dec(1), "bad"),
            AccountOp::hold(dec(1), "e", now() - Duration::seconds(1)),
            AccountOp::capture(if user == batched { other } else { 424_242 }, dec(1), "w"),
        ]
    };
    let singles: Vec<Result<Entry, Error>> = ops(single)
        .iter()
        .map(|op| single_call(&ledger, &mut conn, single, op))
        .collect();
    let batch = ledger
        .apply_many(&mut conn, batched, &ops(batched))
        .expect("batch");
    // Compare with the hold ids and entry ids mapped to the account's journal positions.
    let position = |conn: &mut MysqlConnection, user: i64| -> HashMap<i64, usize> {
        let ids: Vec<i64> = balance_history::table
            .filter(balance_history::user_id.eq(user))
            .order(balance_history::id.asc())
            .select(balance_history::id)
            .load(conn)
            .expect("ids");
        ids.into_iter().enumerate().map(|(i, id)| (id, i)).collect()
    };
    let (ps, pb) = (position(&mut conn, single), position(&mut conn, batched));
    let view = |p: &HashMap<i64, usize>, r: &Result<Entry, Error>| match r {
        Ok(e) => format!(
            "{} {} {} {:?} {:?}",
            e.kind,
            e.amount,
            e.balance_after,
            e.idempotency_key,
            e.related_entry_id.map(|id| p.get(&id).copied())
        ),
        Err(Error::IdempotencyConflict {
            key,
            existing_entry_id,
            ..
        }) => format!("conflict {key} {:?}", p.get(existing_entry_id)),
        Err(Error::HoldNotActive { hold_id, state }) => {
            format!("not active {:?} {state}", p.get(hold_id))
        }
        Err(Error::CaptureExceedsHold {
            hold_id,
            held,
            requested,
        }) => format!("exceeds {:?} {held} {requested}", p.get(hold_id)),
        Err(Error::HoldNotFound { .. }) => "hold not found".to_owned(),
        Err(e) => format!("{:?}", std::mem::discriminant(e)),
    };
    assert_eq!(singles.len(), batch.len());
    for (i, (s, b)) in singles.iter().zip(&batch).enumerate() {
        assert_eq!(
            view(&pb, b),
            view(&ps, s),
            "request {i}: batch (left), single (right)"
        );
    }
    assert!(matches!(
        batch[10],
        Err(Error::InvalidId { what: "hold", .. })
    ));
    assert!(matches!(
        batch[11],
        Err(Error::InvalidExpiry {
            problem: ExpiryProblem::NotInFuture,
            ..
        })
    ));
    let balance = |user| {
        let b = ledger.balance(&mut connect(&_url), user).expect("balance");
        (b.balance, b.held, b.available, b.version)
    };
    assert_eq!(balance(batched), balance(single));
    every_hold_ended_once(&mut conn);
    audit_ok(&ledger, &mut conn, single);
    audit_ok(&ledger, &mut conn, batched);
}

/// Two neighbouring accounts: B's index entries follow A's.
const A: i64 = 10;
const B: i64 = 11;

/// Accounts [`A`] and [`B`] funded with 1,000 each in a fresh database `name`: its URL, a
/// connection, the ledger that set them up, and a ledger that retries refusals for up to 20 s.
fn neighbours(
    name: &str,
) -> (
    String,
    MysqlConnection,
    BalanceLedger,
    std::sync::Arc<BalanceLedger>,
) {
    let (url, mut conn) = fresh_database(name);
    let setup = BalanceLedger::new();
    funded_account(&mut conn, &setup, A, dec(1_000));
    funded_account(&mut conn, &setup, B, dec(1_000));
    let patient = std::sync::Arc::new(BalanceLedger::with_policy(
        lockstock::TxnPolicy::default().with_retry(lockstock_testkit::fixtures::retry_policy(
            100_000,
            StdDuration::from_secs(20),
        )),
    ));
    (url, conn, setup, patient)
}

/// An account's unexpired holds are summed, with the account locked, by a range read that
/// under SERIALIZABLE also locks the record after the range — another account's hold. That
/// read never waits: another program's transaction that locked that account's holds and then
/// asks for this account would otherwise close a deadlock, and InnoDB rolled it back (it held
/// fewer locks) as the victim before the fix. Now the read is refused at once, the deduct
/// retries, the other program gets the account, and the deduct then applies.
#[test]
fn the_holds_read_under_an_account_lock_never_waits() {
    let (url, mut conn, setup, ledger) = neighbours("holds_read_never_waits");
    // Many holds on A (the deduct's read locks them all: the heavier transaction), one on B.
    for i in 0..20 {
        setup
            .hold(&mut conn, A, dec(1), &format!("a-hold-{i}"), in_secs(3_600))
            .expect("hold on A");
    }
    setup
        .hold(&mut conn, B, dec(1), "b-hold", in_secs(3_600))
        .expect("hold on B");

    // Another program: B's holds, locked through the index the read of A's holds ends on.
    let mut foreign = other_program(&url);
    let b_holds: Vec<i64> = balance_hold::table
        .filter(balance_hold::user_id.eq(B))
        .filter(balance_hold::state.eq("active"))
        .select(balance_hold::id)
        .for_update()
        .load(&mut foreign)
        .expect("lock B's holds");
    assert_eq!(b_holds.len(), 1);
    let deduct = {
        let (url, ledger) = (url.clone(), ledger.clone());
        thread::spawn(move || ledger.deduct(&mut connect(&url), A, dec(5), "d"))
    };
    assert_not_sacrificed(&mut foreign, StdDuration::from_millis(300), |c| {
        lock_balance(c, A)
    });
    let entry = deduct.join().expect("deduct").expect("the deduct");
    assert_eq!(entry.balance_after, dec(995));
    audit_ok(&setup, &mut conn, A);
    audit_ok(&setup, &mut conn, B);
}

/// Ending a hold (its release here) never waits for another transaction's lock while it holds
/// the account: the hold's UPDATE rewrites the hold's index entries (its state is in two
/// secondary indexes), and another program's index-only read of the account's holds locks
/// those entries. Before the fix the UPDATE waited there, holding the account's row; the other
/// program then asked for that account, closing a deadlock, and InnoDB rolled the other
/// program back (lockstock's transaction had written more). Now the UPDATE is refused at once,
/// the release rolls back and retries, and the other program commits.
#[test]
fn ending_a_hold_under_an_account_lock_never_waits() {
    let (url, mut conn, setup, ledger) = neighbours("holds_end_never_waits");
    let hold = setup
        .hold(&mut conn, B, dec(1), "b-hold", in_secs(3_600))
        .expect("hold on B");

    // Another program reads B's active holds' ids — a shared-locking read (its SERIALIZABLE)
    // answered from the index alone: it locks the hold's index entry, not its row, so the
    // release locks the account and the hold (NOWAIT) and reaches the hold's UPDATE, which
    // rewrites that entry. (The index forced: on a table this small the optimizer would scan
    // the whole table.)
    #[derive(QueryableByName)]
    struct Id {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        #[allow(dead_code)]
        id: i64,
    }
    let mut foreign = other_program(&url);
    let b_holds: Vec<Id> = diesel::sql_query(
        "SELECT id FROM balance_hold FORCE INDEX (balance_hold_active) \
         WHERE user_id = ? AND state = 'active' LOCK IN SHARE MODE",
    )
    .bind::<diesel::sql_types::BigInt, _>(B)
    .load(&mut foreign)
    .expect("read B's holds");
    assert_eq!(b_holds.len(), 1);
    let release = {
        let (url, ledger) = (url.clone(), ledger.clone());
        thread::spawn(move || ledger.release(&mut connect(&url), hold.id, "r"))
    };
    assert_not_sacrificed(&mut foreign, StdDuration::from_millis(300), |c| {
        lock_balance(c, B)
    });
    let entry = release.join().expect("release").expect("the release");
    assert_eq!(entry.kind, EntryKind::Release);
    let state: String = balance_hold::table
        .find(hold.id)
        .select(balance_hold::state)
        .first(&mut conn)
        .expect("the hold");
    assert_eq!(state, "released");
    audit_ok(&setup, &mut conn, A);
    audit_ok(&setup, &mut conn, B);
}

/// A read that failed after the server had begun its result is never executed again from the
/// statement cache. The deduct's read of the account's holds is refused (another program holds
/// the next account's holds, which the range read locks under SERIALIZABLE), again and again
/// until the deadline: the deduct answers `Contended`, and its connection serves the next call.
/// Before the fix the retry re-ran the cached statement, which waited for the rest of a result
/// the server never sends: the call hung until the watchdog shut the connection down at
/// deadline + grace, answered `ServerUnresponsive` for a server that answered, and the
/// connection was lost (`ConnectionBroken` on the next call).
#[test]
fn a_refused_holds_read_is_retried_without_hanging() {
    use diesel::connection::SimpleConnection;
    let (url, mut conn) = fresh_database("holds_read_retried");
    let setup = BalanceLedger::new();
    for user in [10, 11] {
        funded_account(&mut conn, &setup, user, dec(1_000));
        setup
            .hold(
                &mut conn,
                user,
                dec(1),
                &format!("hold-{user}"),
                in_secs(3_600),
            )
            .expect("hold");
    }
    let ledger = BalanceLedger::with_policy(lockstock_testkit::fixtures::policy_with_deadline(
        StdDuration::from_secs(2),
    ));
    let mut foreign = holds_locker(&url, 11);
    let mut caller = connect(&url);
    match ledger.deduct(&mut caller, 10, dec(1), "d1") {
        Err(Error::Contended { attempts, .. }) => assert!(attempts > 1, "{attempts}"),
        other => panic!("{other:?}"),
    }
    foreign.batch_execute("ROLLBACK").expect("release");
    let entry = ledger
        .deduct(&mut caller, 10, dec(1), "d2")
        .expect("the same connection, next call");
    assert_eq!(entry.balance_after, dec(999));
    audit_ok(&setup, &mut conn, 10);
}

/// `user`'s account funded with 100 and a hold of 10 under key `h` placed to expire in
/// `millis` (longer if it could not be placed in time); returns once its expiry has passed,
/// with the hold's entry and expiry.
fn an_expired_hold(
    conn: &mut MysqlConnection,
    ledger: &BalanceLedger,
    user: i64,
    millis: i64,
) -> (Entry, chrono::NaiveDateTime) {
    funded_account(conn, ledger, user, dec(100));
    // Setup, not what is tested: a placement that a loaded machine made late (refused, nothing
    // written) is made again with a longer lead.
    let mut lead = millis;
    let (hold, expires_at) = loop {
        let expires_at = now() + Duration::milliseconds(lead);
        match ledger.hold(conn, user, dec(10), "h", expires_at) {
            Err(Error::InvalidExpiry { .. }) if lead < 60_000 => lead *= 2,
            placed => break (placed.expect("hold"), expires_at),
        }
    };
    while now() <= expires_at {
        thread::sleep(StdDuration::from_millis(20));
    }
    (hold, expires_at)
}

/// Runs a request on account `user` as a single call (`single`) and as a batch of `op` with a
/// 300 ms deadline while another program holds the journal with `LOCK TABLES ... WRITE` past
/// it, and checks that both answer `OutcomeUnknown`: the request is refused, and its key,
/// which an earlier call may have recorded, cannot be looked up.
pub(crate) fn unknown_while_the_journal_is_locked(
    url: &str,
    conn: &mut MysqlConnection,
    user: i64,
    op: &AccountOp,
    single: impl FnOnce(&BalanceLedger, &mut MysqlConnection) -> Result<Entry, Error>,
) {
    use diesel::connection::SimpleConnection;
    let mut locker = lockstock_testkit::fixtures::connect(url);
    locker
        .batch_execute("LOCK TABLES balance_history WRITE")
        .expect("another program locks the journal");
    let short = BalanceLedger::with_policy(lockstock_testkit::fixtures::policy_with_deadline(
        StdDuration::from_millis(300),
    ));
    let single = single(&short, conn);
    let batch = short.apply_many(conn, user, std::slice::from_ref(op));
    locker.batch_execute("UNLOCK TABLES").expect("unlock");
    assert!(
        matches!(single, Err(Error::OutcomeUnknown { .. })),
        "{single:?}"
    );
    assert!(
        matches!(batch.as_deref(), Ok([Err(Error::OutcomeUnknown { .. })])),
        "{batch:?}"
    );
}

/// A hold retried after its expiry passed, when its key cannot be looked up (here: another
/// program holds the journal with `LOCK TABLES ... WRITE` past the call's deadline), answers
/// `OutcomeUnknown` — never `InvalidExpiry`, which would tell the retry that its hold was
/// never placed although it stands in the journal. Single call and batch alike.
#[test]
fn a_retried_expired_hold_whose_key_cannot_be_looked_up_is_not_refused_as_input() {
    const USER: i64 = 5;
    let (url, mut conn) = fresh_database("holds_retry_unknown");
    let ledger = BalanceLedger::new();
    let (_, expires_at) = an_expired_hold(&mut conn, &ledger, USER, 300);
    // Before: InvalidExpiry (NotInFuture), as if the hold had never been placed; then the
    // lookup's own failure (Contended, Timeout), which says nothing was applied either.
    unknown_while_the_journal_is_locked(
        &url,
        &mut conn,
        USER,
        &AccountOp::hold(dec(10), "h", expires_at),
        |ledger, conn| ledger.hold(conn, USER, dec(10), "h", expires_at),
    );
    // Once it can be looked up, the retry answers the recorded entry.
    let retried = ledger
        .hold(&mut conn, USER, dec(10), "h", expires_at)
        .expect("the retry, answered from the journal");
    assert_eq!(retried.amount, dec(10));
}

/// A hold retried after its expiry passed (say after `OutcomeUnknown`) answers the entry it
/// recorded, as every retry does — in a single call, a batch and a combined call alike; the
/// same key with another request is a conflict; a hold whose expiry passed under a key nobody
/// used is refused (`InvalidExpiry`) and writes nothing. Inside a batch the key is looked at in
/// the single calls' order: a key the batch writes after the expired hold was free when it came.
/// Before the fix every such retry answered `InvalidExpiry` (documented as "nothing changed")
/// while the hold it placed stood in the journal.
#[test]
fn a_hold_retried_after_its_expiry_passed_answers_its_entry() {
    const USER: i64 = 4;
    let (url, mut conn) = fresh_database("holds_retry_after_expiry");
    let ledger = BalanceLedger::new();
    let (hold, expires_at) = an_expired_hold(&mut conn, &ledger, USER, 800);
    let journal = |conn: &mut MysqlConnection| -> i64 {
        balance_history::table
            .filter(balance_history::user_id.eq(USER))
            .count()
            .get_result(conn)
            .expect("journal size")
    };
    let size = journal(&mut conn);

    // The same request: the recorded entry, by every path.
    let combining = CombiningLedger::new(pool(&url, 2), ledger.clone());
    assert_eq!(
        ledger
            .hold(&mut conn, USER, dec(10), "h", expires_at)
            .expect("single retry"),
        hold
    );
    let same = AccountOp::Hold {
        amount: dec(10),
        key: "h".into(),
        expires_at,
    };
    let answers = ledger
        .apply_many(&mut conn, USER, std::slice::from_ref(&same))
        .expect("batch");
    match &answers[..] {
        [Ok(entry)] => assert_eq!(*entry, hold),
        other => panic!("batch retry: {other:?}"),
    }
    assert_eq!(
        combining
            .hold(USER, dec(10), "h", expires_at)
            .expect("combined retry"),
        hold
    );

    // Each case as single calls on one account and as one batch on a twin account: the same
    // answers, and both journals grow alike.
    let ops = vec![
        // Another request under the recorded key.
        AccountOp::Hold {
            amount: dec(11),
            key: "h".into(),
            expires_at,
        },
        // A key nobody used: refused.
        AccountOp::Hold {
            amount: dec(1),
            key: "fresh".into(),
            expires_at,
        },
        // A key the batch writes later: free when the expired hold came.
        AccountOp::Hold {
            amount: dec(1),
            key: "later".into(),
            expires_at,
        },
        AccountOp::Charge {
            amount: dec(1),
            key: "later".into(),
        },
        // A key the batch wrote before: the single call finds it.
        AccountOp::Hold {
            amount: dec(1),
            key: "later".into(),
            expires_at,
        },
    ];
    let singles: Vec<Result<Entry, Error>> = ops
        .iter()
        .map(|op| single_call(&ledger, &mut conn, USER, op))
        .collect();
    let kinds = |answers: &[Result<Entry, Error>]| -> Vec<String> {
        answers
            .iter()
            .map(|answer| match answer {
                Ok(entry) => format!("ok {:?} {}", entry.kind, entry.amount),
                Err(Error::IdempotencyConflict { key, .. }) => format!("conflict {key}"),
                Err(Error::InvalidExpiry { problem, .. }) => format!("expiry {problem:?}"),
                Err(other) => format!("{other:?}"),
            })
            .collect()
    };
    assert_eq!(
        kinds(&singles),
        [
            "conflict h",
            "expiry NotInFuture",
            "expiry NotInFuture",
            "ok Charge 1.0000",
            "conflict later",
        ]
    );
    assert!(matches!(
        &singles[0],
        Err(Error::IdempotencyConflict { existing_entry_id, .. }) if *existing_entry_id == hold.id
    ));
    assert_eq!(journal(&mut conn), size + 1, "only the charge was written");

    const TWIN: i64 = 5;
    funded_account(&mut conn, &ledger, TWIN, dec(100));
    let twin_hold = ledger
        .hold(&mut conn, TWIN, dec(10), "h", in_secs(600))
        .expect("the twin's hold");
    // The twin's "h" is a hold of another expiry: "h" conflicts there too.
    let batch = ledger.apply_many(&mut conn, TWIN, &ops).expect("batch");
    assert_eq!(kinds(&batch), kinds(&singles));
    assert!(matches!(
        &batch[0],
        Err(Error::IdempotencyConflict { existing_entry_id, .. }) if *existing_entry_id == twin_hold.id
    ));
    let twin_journal: i64 = balance_history::table
        .filter(balance_history::user_id.eq(TWIN))
        .count()
        .get_result(&mut conn)
        .expect("twin journal");
    assert_eq!(
        twin_journal, 3,
        "the funding charge, the hold and the batch's charge"
    );
    audit_ok(&ledger, &mut conn, USER);
    audit_ok(&ledger, &mut conn, TWIN);
}

/// A leap second (chrono's nanosecond of 1,000,000,000 or more, which DATETIME cannot hold) is
/// stored as the last microsecond of the second before it, by a single call and a batch alike,
/// and the hold works as any other.
#[test]
fn a_leap_second_expiry_is_the_last_microsecond_of_its_second() {
    use chrono::Timelike;
    const USER: i64 = 6;
    let (_url, mut conn) = fresh_database("holds_leap_second");
    let ledger = BalanceLedger::new();
    funded_account(&mut conn, &ledger, USER, dec(100));
    // hh:mm:59 + 1.5 s, one to two minutes ahead.
    let base = (now() + Duration::minutes(2))
        .with_second(59)
        .and_then(|t| t.with_nanosecond(0))
        .expect("second 59");
    let leap = base.with_nanosecond(1_500_000_000).expect("a leap second");
    let last = base
        .with_nanosecond(999_999_000)
        .expect("its last microsecond");
    let single = ledger
        .hold(&mut conn, USER, dec(1), "leap", leap)
        .expect("a hold until a leap second");
    let batch = ledger
        .apply_many(
            &mut conn,
            USER,
            &[AccountOp::hold(dec(2), "leap-batch", leap)],
        )
        .expect("batch");
    let batched = match &batch[..] {
        [Ok(entry)] => entry.clone(),
        other => panic!("{other:?}"),
    };
    for id in [single.id, batched.id] {
        let hold = ledger.hold_status(&mut conn, id).expect("status");
        assert_eq!(hold.expires_at, last);
        assert_eq!(hold.state, HoldState::Active);
    }
    // The same request again: the same entry.
    assert_eq!(
        ledger
            .hold(&mut conn, USER, dec(1), "leap", leap)
            .expect("replay"),
        single
    );
    assert_eq!(stored(&mut conn, USER), (dec(100), dec(3)));
    audit_ok(&ledger, &mut conn, USER);
}

/// A hold whose expiry has passed is looked up by its key (a retry of a hold placed in time
/// answers its entry), but where the key cannot be looked up the call still answers the input's
/// refusal, as it answers every other bad input: it wrote nothing and never could have. Before
/// the fix, inside a caller's open transaction it answered `NestedTransaction` (the lookup's
/// refusal) where a zero amount answered `InvalidAmount`.
#[test]
fn an_expired_hold_is_refused_for_its_input_where_its_key_cannot_be_looked_up() {
    use diesel::connection::SimpleConnection;
    const USER: i64 = 6;
    let (_url, mut conn) = fresh_database("holds_expired_unlooked");
    let ledger = BalanceLedger::new();
    funded_account(&mut conn, &ledger, USER, dec(100));
    let past = now() - Duration::seconds(5);
    conn.batch_execute("BEGIN")
        .expect("the caller's transaction");
    match ledger.hold(&mut conn, USER, dec(0), "zero", now() + Duration::hours(1)) {
        Err(Error::InvalidAmount { .. }) => {}
        other => panic!("zero amount in a caller's transaction: {other:?}"),
    }
    match ledger.hold(&mut conn, USER, dec(1), "late", past) {
        Err(Error::InvalidExpiry {
            problem: ExpiryProblem::NotInFuture,
            expires_at,
        }) => assert_eq!(expires_at, past),
        other => panic!("expired hold in a caller's transaction: {other:?}"),
    }
    conn.batch_execute("ROLLBACK").expect("rollback");
    assert_eq!(journal_size(&mut conn, USER), 1, "only the funding charge");
    audit_ok(&ledger, &mut conn, USER);
}

/// A sweep whose transaction on one account fails after another account's expirations
/// committed answers what it committed, with the failed account and the ones after it left
/// for a later call — never an `Err` for expirations that are in the journal. Before the fix it
/// answered the failure (here a trigger's, on account 2's expire entry) as the whole call's.
#[test]
fn a_sweep_that_fails_after_committing_answers_what_it_committed() {
    use diesel::connection::SimpleConnection;
    let (_url, mut conn) = fresh_database("holds_sweep_partial");
    let ledger = BalanceLedger::new();
    for user in 1..=3 {
        funded_account(&mut conn, &ledger, user, dec(100));
    }
    let expires_at = now() + Duration::milliseconds(1500);
    let mut holds = Vec::new();
    for user in 1..=3 {
        holds.push(
            ledger
                .hold(&mut conn, user, dec(10), "h", expires_at)
                .expect("hold"),
        );
    }
    while now() <= expires_at {
        thread::sleep(StdDuration::from_millis(50));
    }
    conn.batch_execute(
        "CREATE TRIGGER fail_expiry_of_2 BEFORE INSERT ON balance_history FOR EACH ROW \
         BEGIN IF NEW.user_id = 2 AND NEW.kind = 'expire' THEN \
         SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'injected expiry failure'; END IF; END",
    )
    .expect("trigger");
    let first = ledger
        .expire_holds(&mut conn, 10)
        .expect("the committed part");
    assert_eq!(
        first.expired.iter().map(|e| e.user_id).collect::<Vec<_>>(),
        [1]
    );
    assert_eq!(first.skipped_accounts, [2, 3]);
    conn.batch_execute("DROP TRIGGER fail_expiry_of_2")
        .expect("drop trigger");
    let second = ledger.expire_holds(&mut conn, 10).expect("the rest");
    assert_eq!(
        second.expired.iter().map(|e| e.user_id).collect::<Vec<_>>(),
        [2, 3]
    );
    assert!(second.skipped_accounts.is_empty());
    for user in 1..=3 {
        audit_ok(&ledger, &mut conn, user);
    }
}

/// A hold whose expiry has passed on the server clock — the clock every later check of the
/// hold reads — is refused (`InvalidExpiry`, nothing written) by the single call and in a
/// batch alike, though the caller's clock still has it ahead. Here the server clock runs an
/// hour ahead (`SET timestamp`, as a skewed server would). Before the fix the single hold was
/// journaled and raised `held` while reserving nothing (a deduct of everything then went
/// through), and the batch reserved it (the deduct after it refused): the batch answered
/// differently from its single calls.
#[test]
fn a_hold_expired_on_the_server_clock_is_refused_alone_and_in_a_batch() {
    use diesel::connection::SimpleConnection;
    let (_url, mut conn) = fresh_database("holds_server_clock");
    let ledger = BalanceLedger::new();
    for user in [1, 2] {
        funded_account(&mut conn, &ledger, user, dec(100));
    }
    conn.batch_execute("SET timestamp = UNIX_TIMESTAMP() + 3600")
        .expect("the server clock an hour ahead");
    let expires_at = in_secs(600);
    let singles = [
        ledger
            .hold(&mut conn, 1, dec(100), "h", expires_at)
            .map(|_| ()),
        ledger.deduct(&mut conn, 1, dec(100), "d").map(|_| ()),
    ];
    let batch: Vec<_> = ledger
        .apply_many(
            &mut conn,
            2,
            &[
                AccountOp::hold(dec(100), "h", expires_at),
                AccountOp::deduct(dec(100), "d"),
            ],
        )
        .expect("batch")
        .into_iter()
        .map(|answer| answer.map(|_| ()))
        .collect();
    conn.batch_execute("SET timestamp = DEFAULT")
        .expect("the server clock back");
    for answers in [&singles[..], &batch[..]] {
        assert!(
            matches!(
                answers,
                [
                    Err(Error::InvalidExpiry {
                        problem: ExpiryProblem::NotInFuture,
                        ..
                    }),
                    Ok(())
                ]
            ),
            "{answers:?}"
        );
    }
    for user in [1, 2] {
        assert_eq!(stored(&mut conn, user), (dec(0), dec(0)));
        assert_eq!(
            journal_size(&mut conn, user),
            2,
            "the funding charge and the deduct"
        );
        audit_ok(&ledger, &mut conn, user);
    }
}

/// A hold retried on a clock behind the one that placed it: to the retrying clock its expiry is
/// further ahead than a hold may last (`TooFar`), yet the key was recorded, so the retry answers
/// the recorded entry — as single call, in a batch and combined — as a retry after the expiry
/// passed does. A new key with that expiry is still refused for it. Before: `InvalidExpiry
/// { TooFar }` for the retry, without a look at the key (a caller would place the hold again
/// under a new key, reserving the funds twice). The original is placed here by lockstock and
/// then given the expiry a clock two hours ahead would have sent (its row and request hash), as
/// another host's writer would have written it.
#[test]
fn a_hold_retried_on_a_clock_behind_its_writers_answers_the_recorded_entry() {
    const USER: i64 = 41;
    let (url, mut conn) = fresh_database("holds_retry_behind");
    let ledger = BalanceLedger::new();
    ledger
        .charge(&mut conn, USER, dec(100), "seed")
        .expect("seed");
    let placed = ledger
        .hold(
            &mut conn,
            USER,
            dec(50),
            "h1",
            now() + Duration::days(90) - Duration::hours(1),
        )
        .expect("the hold");
    // At the stored precision (microseconds), as `now()` is.
    let ahead = now() + Duration::days(90) + Duration::hours(1);
    let hash = lockstock::ledger::request_hash(
        EntryKind::Hold,
        USER,
        dec(50),
        Some(ahead.and_utc().timestamp_micros()),
    );
    diesel::update(balance_history::table.find(placed.id))
        .set(balance_history::request_hash.eq(&hash))
        .execute(&mut conn)
        .expect("the writer's hash");
    diesel::update(balance_hold::table.find(placed.id))
        .set(balance_hold::expires_at.eq(ahead))
        .execute(&mut conn)
        .expect("the writer's expiry");

    let retried = ledger.hold(&mut conn, USER, dec(50), "h1", ahead);
    assert_eq!(
        retried.map(|e| e.id).ok(),
        Some(placed.id),
        "the single retry"
    );
    let batch = ledger
        .apply_many(&mut conn, USER, &[AccountOp::hold(dec(50), "h1", ahead)])
        .expect("the batch");
    assert_eq!(batch.len(), 1);
    assert_eq!(
        batch[0].as_ref().map(|e| e.id).ok(),
        Some(placed.id),
        "in a batch"
    );
    let combined = CombiningLedger::new(pool(&url, 2), BalanceLedger::new());
    assert_eq!(
        combined.hold(USER, dec(50), "h1", ahead).map(|e| e.id).ok(),
        Some(placed.id),
        "combined"
    );
    // Another request under the key: the conflict, as for any retry.
    assert!(
        matches!(
            ledger.hold(&mut conn, USER, dec(51), "h1", ahead),
            Err(Error::IdempotencyConflict { existing_entry_id, .. }) if existing_entry_id == placed.id
        ),
        "another amount under the key"
    );
    // A key never recorded: refused for its expiry, nothing written.
    let fresh = ledger.hold(&mut conn, USER, dec(10), "h2", ahead);
    assert!(
        matches!(
            fresh,
            Err(Error::InvalidExpiry {
                problem: ExpiryProblem::TooFar,
                ..
            })
        ),
        "{fresh:?}"
    );
    assert_eq!(journal_size(&mut conn, USER), 2, "seed and the one hold");
    audit_ok(&ledger, &mut conn, USER);
}

/// A batch judges a hold's expiry on the caller's clock once, before it sends anything, as the
/// single call does: a hold just past the longest a hold may last when the batch starts is
/// refused (its key looked up), even when the batch reaches it only once the bound has moved
/// past it (here a capture's read of its hold waits 800 ms behind another program's lock).
/// Before: the batch judged it again after that read, placed it — and a batch that then failed
/// answered it from the first judgement, as refused.
#[test]
fn a_batch_judges_a_holds_expiry_once_before_it_sends_anything() {
    let (url, mut conn, ledger, captured) = account_with_a_hold("holds_expiry_judged_once");
    let unlock = holds_locked_for(&url, StdDuration::from_millis(800));
    let too_far = now() + lockstock::ledger::MAX_HOLD_DURATION + Duration::milliseconds(400);
    let answers = ledger
        .apply_many(
            &mut conn,
            1,
            &[
                AccountOp::capture(captured.id, dec(10), "c1"),
                AccountOp::hold(dec(5), "h2", too_far),
            ],
        )
        .expect("answered per request");
    unlock.join().expect("unlocked");
    assert!(answers[0].is_ok(), "{answers:?}");
    assert!(
        matches!(
            answers[1],
            Err(Error::InvalidExpiry {
                problem: ExpiryProblem::TooFar,
                ..
            })
        ),
        "{answers:?}"
    );
    let placed: i64 = balance_history::table
        .filter(balance_history::idempotency_key.eq("h2"))
        .count()
        .get_result(&mut conn)
        .expect("count");
    assert_eq!(placed, 0, "the refused hold was written");
}

/// `user`'s account funded with `holds` points, all of them held: `holds` holds of one point
/// each, expiring at `expires`, placed by one batch.
fn holding_all(
    conn: &mut MysqlConnection,
    ledger: &BalanceLedger,
    user: i64,
    holds: usize,
    expires: NaiveDateTime,
) -> Vec<Entry> {
    ledger
        .charge(conn, user, dec(holds as i64), "fund")
        .expect("fund");
    let ops: Vec<AccountOp> = (0..holds)
        .map(|i| AccountOp::hold(Decimal::ONE, format!("hold-{i}"), expires))
        .collect();
    ledger
        .apply_many(conn, user, &ops)
        .expect("one batch")
        .into_iter()
        .map(|placed| placed.expect("a hold"))
        .collect()
}

/// A ledger whose calls have `deadline`, its runner past its one-time questions to the
/// server (a read of `user`'s balance), so that the calls measured spend their time on the
/// work.
fn hurried(conn: &mut MysqlConnection, user: i64, deadline: StdDuration) -> BalanceLedger {
    let hurried =
        BalanceLedger::with_policy(lockstock_testkit::fixtures::policy_with_deadline(deadline));
    hurried.balance(conn, user).expect("a read");
    hurried
}

/// A sweep of many due holds of one account honours its deadline: it takes no further hold once
/// the deadline has passed, commits the ones it marked and reports the account skipped; a later
/// call finishes the rest. Before, one transaction locked and marked all of the account's due
/// holds (four statements each) whatever the deadline — a call of a 20 ms deadline marked all
/// of them, far past it, and one whose grace ran out first was cut every time and never swept
/// the account.
#[test]
fn a_sweep_of_many_holds_stops_at_its_deadline() {
    let _alone = lockstock_testkit::fixtures::exclusive();
    const USER: i64 = 1;
    const HOLDS: usize = 500;
    let (mut conn, ledger) = (
        fresh_database("holds_sweep_deadline").1,
        BalanceLedger::new(),
    );
    let expires = in_secs(2);
    holding_all(&mut conn, &ledger, USER, HOLDS, expires);
    while now() <= expires + Duration::milliseconds(100) {
        thread::sleep(StdDuration::from_millis(50));
    }

    let deadline = StdDuration::from_millis(20);
    let hurried = hurried(&mut conn, USER, deadline);
    let before = lockstock_testkit::fixtures::questions(&mut conn);
    let first = hurried
        .expire_holds(&mut conn, 1_000)
        .expect("a partial sweep");
    // What it sent, not how long it took (a loaded machine's scheduling): before, four
    // statements per due hold, 2,000 here.
    let sent = lockstock_testkit::fixtures::questions(&mut conn) - before;
    assert!(
        sent < 2 * HOLDS as i64,
        "a 20 ms sweep sent {sent} statements"
    );
    assert!(
        first.expired.len() < HOLDS,
        "{} expired",
        first.expired.len()
    );
    assert_eq!(first.skipped_accounts, vec![USER]);
    audit_ok(&ledger, &mut conn, USER);

    // A later call picks the rest up.
    let rest = ledger.expire_holds(&mut conn, 1_000).expect("the rest");
    assert_eq!(first.expired.len() + rest.expired.len(), HOLDS);
    assert!(rest.skipped_accounts.is_empty(), "{rest:?}");
    let balance = ledger.balance(&mut conn, USER).expect("balance");
    assert_eq!(
        (balance.balance, balance.available),
        (dec(HOLDS as i64), dec(HOLDS as i64))
    );
    audit_ok(&ledger, &mut conn, USER);
}

/// A batch that ends many holds sends a statement per hold (its lock, its end): it stops once
/// its deadline has passed and is rolled back whole (`Timeout`, nothing applied), instead of
/// sending the rest past the deadline and committing late — or being cut by the watchdog at
/// the deadline plus the grace as a server that does not answer.
#[test]
fn a_batch_ending_many_holds_stops_at_its_deadline() {
    let _alone = lockstock_testkit::fixtures::exclusive();
    const USER: i64 = 1;
    const HOLDS: usize = 1_000;
    let (mut conn, ledger) = (
        fresh_database("holds_batch_deadline").1,
        BalanceLedger::new(),
    );
    let holds = holding_all(&mut conn, &ledger, USER, HOLDS, in_secs(600));
    let journal = journal_size(&mut conn, USER);

    let deadline = StdDuration::from_millis(20);
    let hurried = hurried(&mut conn, USER, deadline);
    let captures: Vec<AccountOp> = holds
        .iter()
        .map(|hold| AccountOp::capture(hold.id, Decimal::ONE, format!("capture-{}", hold.id)))
        .collect();
    let before = lockstock_testkit::fixtures::questions(&mut conn);
    let answer = hurried.apply_many(&mut conn, USER, &captures);
    let sent = lockstock_testkit::fixtures::questions(&mut conn) - before;
    assert!(
        matches!(answer, Err(Error::Timeout { .. } | Error::Contended { .. })),
        "{:?}",
        answer.map(|answers| answers.len())
    );
    // Before: a statement per hold read before the transaction began, far past the deadline
    // (a thousand reads, about 160 ms here), then `Timeout`. What it sent, not how long it
    // took (a loaded machine's scheduling).
    assert!(
        sent < HOLDS as i64 / 2,
        "a 20 ms batch sent {sent} statements"
    );
    // Nothing applied: every hold still active, the journal as it was.
    assert_eq!(journal_size(&mut conn, USER), journal);
    let balance = ledger.balance(&mut conn, USER).expect("balance");
    assert_eq!(
        (balance.balance, balance.available),
        (dec(HOLDS as i64), Decimal::ZERO)
    );
    audit_ok(&ledger, &mut conn, USER);
}

/// A retry of a hold whose expiry has passed answers through `CombiningLedger` as its single
/// call: with no time left for its key's lookup, `OutcomeUnknown` (the retried hold may stand),
/// never `Timeout`, which says nothing was applied; with time, its recorded entry, also while
/// another program holds the account's row (the lookup needs no lock). Before the fix the
/// combined call was queued for the account and answered `Timeout` when its deadline passed
/// in the queue.
#[test]
fn a_combined_retry_of_an_expired_hold_answers_as_its_single_call() {
    use lockstock_testkit::fixtures::{policy_with_deadline, variant};
    const USER: i64 = 41;
    let (url, mut conn) = fresh_database("holds_combined_expired_retry");
    let ledger = BalanceLedger::new();
    let (hold, expires_at) = an_expired_hold(&mut conn, &ledger, USER, 800);
    let no_time = policy_with_deadline(StdDuration::ZERO);
    let single =
        BalanceLedger::with_policy(no_time.clone()).hold(&mut conn, USER, dec(10), "h", expires_at);
    assert_eq!(variant(&single), "OutcomeUnknown", "{single:?}");
    let hurried = CombiningLedger::new(pool(&url, 2), BalanceLedger::with_policy(no_time));
    let combined = hurried.hold(USER, dec(10), "h", expires_at);
    assert_eq!(variant(&combined), "OutcomeUnknown", "{combined:?}");
    let mut other = connect(&url);
    diesel::connection::SimpleConnection::batch_execute(&mut other, "BEGIN").expect("begin");
    lock_balance(&mut other, USER).expect("hold the account's row");
    let patient = CombiningLedger::new(
        pool(&url, 2),
        BalanceLedger::with_policy(policy_with_deadline(StdDuration::from_secs(2))),
    );
    let recorded = patient.hold(USER, dec(10), "h", expires_at);
    diesel::connection::SimpleConnection::batch_execute(&mut other, "ROLLBACK").expect("rollback");
    assert_eq!(recorded.expect("the recorded entry"), hold);
    audit_ok(&ledger, &mut conn, USER);
}

/// A batch looks up the keys of its holds whose expiry has passed before it sends anything
/// else — also before the read of the holds its captures and releases name (the read that
/// splits a batch at a hold it places) — as each single call looks its key up first. Here that
/// read waits behind another program's lock past the batch's deadline: the expired hold is
/// still answered `InvalidExpiry`, as its single call answers it under the same lock. Before,
/// the read went first and used up the deadline, and the expired hold was answered
/// `OutcomeUnknown`.
#[test]
fn a_batch_looks_up_its_expired_holds_before_the_read_that_splits_it() {
    let (url, mut conn, _, placed) = account_with_a_hold("holds_expired_before_split");
    let short = BalanceLedger::with_policy(lockstock_testkit::fixtures::policy_with_deadline(
        StdDuration::from_secs(1),
    ));
    let unlock = holds_locked_for(&url, StdDuration::from_millis(2_500));
    let expired = in_secs(-5);
    let single = short.hold(&mut conn, 1, dec(5), "late-single", expired);
    let answers = short
        .apply_many(
            &mut conn,
            1,
            &[
                AccountOp::hold(dec(5), "h2", in_secs(3_600)),
                AccountOp::hold(dec(5), "late", expired),
                AccountOp::release(placed.id, "r"),
            ],
        )
        .expect("answered per request");
    unlock.join().expect("unlocked");
    assert!(not_in_future(&single), "the single call: {single:?}");
    assert!(not_in_future(&answers[1]), "{answers:?}");
}

/// A batch split at a hold it places answers a later hold whose expiry has passed as its
/// single call, made after the requests before it, answers it: where an earlier part wrote the
/// hold's key, by that entry (a conflict here). Before, the key lookup made before the batch
/// sent anything — before the earlier part wrote the key — answered it (`InvalidExpiry`,
/// "never placed"), while the same batch unsplit answered the conflict.
#[test]
fn a_split_batch_answers_an_expired_hold_by_the_key_an_earlier_part_wrote() {
    let ops = [
        AccountOp::hold(dec(10), "h2", in_secs(3_600)),
        AccountOp::deduct(dec(5), "k"),
        // Names no hold there is before the batch: the batch splits here.
        AccountOp::capture(1 << 60, dec(1), "c"),
        AccountOp::hold(dec(1), "k", in_secs(-60)),
        // The same key once more, as a request of its own part.
        AccountOp::hold(dec(1), "h2", in_secs(-60)),
    ];
    let (_, mut conn, ledger, _) = account_with_a_hold("holds_split_expired_key");
    let answers = ledger
        .apply_many(&mut conn, 1, &ops)
        .expect("answered per request");
    let (_, mut singles_conn, _, _) = account_with_a_hold("holds_split_expired_key_singles");
    let singles: Vec<Result<Entry, Error>> = ops
        .iter()
        .map(|op| single_call(&ledger, &mut singles_conn, 1, op))
        .collect();
    let deduct = answers[1].as_ref().expect("the deduct").id;
    assert!(
        matches!(answers[2], Err(Error::HoldNotFound { .. })),
        "{answers:?}"
    );
    assert!(
        matches!(&answers[3], Err(Error::IdempotencyConflict { existing_entry_id, .. })
            if *existing_entry_id == deduct),
        "{answers:?}"
    );
    let placed = answers[0].as_ref().expect("the hold placed").id;
    assert!(
        matches!(&answers[4], Err(Error::IdempotencyConflict { existing_entry_id, .. })
            if *existing_entry_id == placed),
        "{answers:?}"
    );
    // The single calls answer the same (entry ids agree: the two databases were made alike).
    let seen = |answers: &[Result<Entry, Error>]| -> Vec<String> {
        answers
            .iter()
            .map(|answer| match answer {
                Ok(e) => format!("{} {:?} {} {}", e.id, e.kind, e.amount, e.balance_after),
                Err(e) => format!("{e:?}"),
            })
            .collect()
    };
    assert_eq!(seen(&answers), seen(&singles));
    audit_ok(&ledger, &mut conn, 1);
}

/// A batch split at a hold it places, whose first part wrote nothing and spent the batch's
/// deadline (its INSERT held up past it by a trigger, and stopped by the statement limit),
/// answers a later part's expired hold by the key lookup made before it sent anything — as its
/// single call answers it (`InvalidExpiry`) — not by a lookup made again once the deadline was
/// spent. (The first version of the fix for the split batch looked the key up again whatever
/// the earlier part met, and answered `OutcomeUnknown` here.)
#[test]
fn a_split_batch_whose_earlier_part_wrote_nothing_keeps_its_expired_holds_first_answer() {
    use diesel::connection::SimpleConnection;
    let (_, mut conn, _, _) = account_with_a_hold("holds_split_expired_nothing_written");
    let short = BalanceLedger::with_policy(lockstock_testkit::fixtures::policy_with_deadline(
        StdDuration::from_millis(300),
    ));
    conn.batch_execute(
        "CREATE TRIGGER slow_k BEFORE INSERT ON balance_history FOR EACH ROW \
         IF NEW.idempotency_key = 'k' THEN SET @slept = SLEEP(1); END IF",
    )
    .expect("trigger");
    let ops = split_with_an_expired_hold_of_key_k();
    let answers = short
        .apply_many(&mut conn, 1, &ops)
        .expect("answered per request");
    let single = short.hold(&mut conn, 1, dec(1), "k", in_secs(-60));
    conn.batch_execute("DROP TRIGGER slow_k")
        .expect("drop trigger");
    assert!(
        answers[1].as_ref().is_err_and(|e| !e.is_outcome_unknown()),
        "the first part wrote nothing: {answers:?}"
    );
    assert!(not_in_future(&single), "the single call: {single:?}");
    assert!(not_in_future(&answers[3]), "{answers:?}");
}

/// A batch split at a hold it places, whose first part found a key written by another call
/// after the batch's first lookup (the other call committed while the batch waited for the
/// account), answers a later part's expired hold of that key as its single call, made after
/// them, answers it: by the entry written (a conflict here), not by the lookup made before the
/// other call committed (`InvalidExpiry`, "never placed": no serial order gives both answers).
/// (A second version of the split-batch fix kept the first lookup there.)
#[test]
fn a_split_batch_answers_an_expired_hold_by_a_key_another_call_wrote_meanwhile() {
    use diesel::connection::SimpleConnection;
    let (url, mut conn, ledger, _) = account_with_a_hold("holds_split_key_written_meanwhile");
    let mut other = connect(&url);
    other.batch_execute("BEGIN").expect("begin");
    lock_balance(&mut other, 1).expect("the account locked");
    other
        .batch_execute(
            "INSERT INTO balance_history \
             (user_id, kind, amount, balance_after, idempotency_key, request_hash) \
             VALUES (1, 'charge', 1, 101, 'k', '0000000000000000'); \
             UPDATE user_balance SET balance = balance + 1, version = version + 1 \
             WHERE user_id = 1",
        )
        .expect("another call's entry of key k");
    let commits = thread::spawn(move || {
        thread::sleep(StdDuration::from_millis(200));
        other.batch_execute("COMMIT").expect("commit");
    });
    let ops = split_with_an_expired_hold_of_key_k();
    let answers = ledger
        .apply_many(&mut conn, 1, &ops)
        .expect("answered per request");
    commits.join().expect("committed");
    let single = ledger.hold(&mut conn, 1, dec(1), "k", in_secs(-60));
    let conflict = |answer: &Result<Entry, Error>| match answer {
        Err(Error::IdempotencyConflict {
            existing_entry_id, ..
        }) => Some(*existing_entry_id),
        _ => None,
    };
    let written = conflict(&answers[1]);
    assert!(written.is_some(), "the deduct met the key: {answers:?}");
    assert_eq!(conflict(&single), written, "the single call: {single:?}");
    assert_eq!(conflict(&answers[3]), written, "{answers:?}");
}

/// Whether `answer` is the refusal of a hold whose expiry has passed.
fn not_in_future(answer: &Result<Entry, Error>) -> bool {
    matches!(
        answer,
        Err(Error::InvalidExpiry {
            problem: ExpiryProblem::NotInFuture,
            ..
        })
    )
}

/// A batch split at an unknown hold's capture after a hold it places: part 1 places a hold and
/// deducts under key "k", part 2 holds again under "k" with an expiry already passed.
fn split_with_an_expired_hold_of_key_k() -> [AccountOp; 4] {
    [
        AccountOp::hold(dec(10), "h2", in_secs(3_600)),
        AccountOp::deduct(dec(5), "k"),
        // Names no hold there is before the batch: the batch splits here.
        AccountOp::capture(1 << 60, dec(1), "c"),
        AccountOp::hold(dec(1), "k", in_secs(-60)),
    ]
}

/// A sweep that meets more locked accounts than one statement can leave out of its next read
/// of the due holds answers what it did. Here 66,000 accounts each have an expired hold and
/// another program holds every account row: before the fix the sweep read the due holds again
/// and again, each time without all the accounts skipped so far, until that list passed the
/// 65,535 values one statement binds and the read failed ("too many placeholders"), so the
/// call answered a server error for a sweep that had run its course. It now stops re-reading
/// once the list is as long as a lockstock `IN` list may be, answers `Ok` with every account
/// it tried in `skipped_accounts`, and a later call, with the rows free, expires the holds.
#[test]
fn a_sweep_past_more_locked_accounts_than_a_statement_binds_answers_what_it_did() {
    use diesel::connection::SimpleConnection;
    const ACCOUNTS: i64 = 66_000;
    let (url, mut conn) = fresh_database("holds_sweep_many_locked");
    // Setup by hand (66,000 holds through the API would take minutes): each account funded
    // with 100 and holding 10 under a hold that expired a minute after it was placed.
    conn.batch_execute(&format!(
        "INSERT INTO user_balance (user_id, balance, held, version) \
           SELECT seq, 100, 10, 1 FROM seq_1_to_{ACCOUNTS}; \
         INSERT INTO balance_history \
           (user_id, kind, amount, balance_after, idempotency_key, request_hash, created_at) \
           SELECT seq, 'hold', 10, 100, 'h', '0123456789abcdef', \
                  UTC_TIMESTAMP(6) - INTERVAL 1 HOUR FROM seq_1_to_{ACCOUNTS}; \
         INSERT INTO balance_hold (id, user_id, amount, state, expires_at, created_at) \
           SELECT id, user_id, 10, 'active', created_at + INTERVAL 1 MINUTE, created_at \
           FROM balance_history"
    ))
    .expect("accounts with expired holds");
    let mut other = other_program(&url);
    other
        .batch_execute("START TRANSACTION; UPDATE user_balance SET version = version + 1")
        .expect("another program holds every account row");
    let ledger = BalanceLedger::with_policy(lockstock_testkit::fixtures::policy_with_deadline(
        StdDuration::from_secs(300),
    ));
    let report = ledger.expire_holds(&mut conn, 1000);
    other.batch_execute("ROLLBACK").expect("release");
    let report = report.expect("the sweep answers what it did");
    assert!(report.expired.is_empty(), "{:?}", report.expired.len());
    let skipped = &report.skipped_accounts;
    assert!(!skipped.is_empty());
    let mut distinct = skipped.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), skipped.len(), "an account reported twice");
    assert!(skipped.iter().all(|user| (1..=ACCOUNTS).contains(user)));
    let active: i64 = balance_hold::table
        .filter(balance_hold::state.eq("active"))
        .count()
        .get_result(&mut conn)
        .expect("count");
    assert_eq!(
        active, ACCOUNTS,
        "a hold ended by a sweep that expired none"
    );
    // With the rows free, the next sweep expires holds again.
    let next = ledger.expire_holds(&mut conn, 100).expect("the next sweep");
    assert_eq!(next.expired.len(), 100, "{next:?}");
    assert!(next.skipped_accounts.is_empty(), "{next:?}");
}

/// A capture or release refused by its hold in a way that shows the same request was never
/// applied (the hold expired, was ended otherwise, or holds less than the capture) keeps its
/// refusal where the key's lookup after it fails — single calls and a batch alike — instead of
/// answering `OutcomeUnknown`, which says the request may be applied. A refusal by a hold
/// ended as the request ends it (a release of a released hold) may be an earlier call's work
/// under the key: that one still answers `OutcomeUnknown` (the negative control).
#[test]
fn a_refusal_by_a_hold_that_shows_nothing_applied_stands_where_its_key_lookup_fails() {
    let (url, mut admin) = fresh_database("holds_refusal_lookup_lost");
    let ledger = BalanceLedger::new();
    funded_account(&mut admin, &ledger, 1, dec(100));
    let short = ledger
        .hold(
            &mut admin,
            1,
            dec(10),
            "short",
            now() + Duration::seconds(2),
        )
        .expect("short hold");
    let long = ledger
        .hold(&mut admin, 1, dec(10), "long", in_secs(3_600))
        .expect("long hold");
    let released = ledger
        .hold(&mut admin, 1, dec(10), "released", in_secs(3_600))
        .expect("hold to release");
    ledger
        .release(&mut admin, released.id, "release-1")
        .expect("release");
    // Past the short hold's expiry on both clocks (one machine): a lower bound, not an order.
    thread::sleep(StdDuration::from_millis(2_500));
    let entries = journal_size(&mut admin, 1);
    // A connection killed as it sends its second lock-free snapshot: the first reads the hold,
    // the second is the key's lookup after the refusal.
    let armed = || crate::killed_at_snapshot(&url, 2);
    let expired = ledger.capture(&mut armed(), short.id, dec(5), "c-expired");
    assert!(
        matches!(expired, Err(Error::HoldExpired { hold_id, .. }) if hold_id == short.id),
        "{expired:?}"
    );
    let expired = ledger.release(&mut armed(), short.id, "r-expired");
    assert!(
        matches!(expired, Err(Error::HoldExpired { hold_id, .. }) if hold_id == short.id),
        "{expired:?}"
    );
    let too_much = ledger.capture(&mut armed(), long.id, dec(11), "c-too-much");
    assert!(
        matches!(too_much, Err(Error::CaptureExceedsHold { hold_id, .. }) if hold_id == long.id),
        "{too_much:?}"
    );
    let ended_otherwise = ledger.capture(&mut armed(), released.id, dec(5), "c-released");
    assert!(
        matches!(
            ended_otherwise,
            Err(Error::HoldNotActive {
                state: HoldState::Released,
                ..
            })
        ),
        "{ended_otherwise:?}"
    );
    let batch = ledger
        .apply_many(
            &mut armed(),
            1,
            &[
                AccountOp::capture(long.id, dec(11), "b-too-much"),
                AccountOp::release(short.id, "b-expired"),
                AccountOp::capture(released.id, dec(1), "b-released"),
            ],
        )
        .expect("the batch answers per request");
    assert!(
        matches!(batch[0], Err(Error::CaptureExceedsHold { .. })),
        "{batch:?}"
    );
    assert!(
        matches!(batch[1], Err(Error::HoldExpired { .. })),
        "{batch:?}"
    );
    assert!(
        matches!(
            batch[2],
            Err(Error::HoldNotActive {
                state: HoldState::Released,
                ..
            })
        ),
        "{batch:?}"
    );
    // The negative control: a released hold released again under another key may be that
    // key's earlier release — unknown where the key cannot be looked up.
    let again = ledger.release(&mut armed(), released.id, "release-2");
    assert!(
        matches!(&again, Err(e) if e.is_outcome_unknown()),
        "{again:?}"
    );
    let again = ledger
        .apply_many(
            &mut armed(),
            1,
            &[AccountOp::release(released.id, "b-release-2")],
        )
        .expect("the batch answers per request");
    assert!(
        matches!(&again[0], Err(e) if e.is_outcome_unknown()),
        "{again:?}"
    );
    assert_eq!(journal_size(&mut admin, 1), entries, "nothing was written");
    audit_ok(&ledger, &mut admin, 1);
}

/// An `expire` entry answers its `balance_after` at the column's four places, as the journal
/// holds it, also where the balance is zero: a hold left to expire after the whole balance was
/// spent (an expired hold reserves nothing). Before the fix `expire_holds` answered `0` where
/// `history` reads `0.0000` (equal values, different text).
#[test]
fn an_expire_entry_answers_its_balance_at_the_stored_scale() {
    let (_url, mut conn) = fresh_database("holds_expire_scale");
    let ledger = BalanceLedger::new();
    funded_account(&mut conn, &ledger, 1, dec(100));
    ledger
        .hold(&mut conn, 1, dec(40), "h", now() + Duration::seconds(1))
        .expect("hold");
    // Past its expiry on both clocks (one machine): a lower bound, not an order.
    thread::sleep(StdDuration::from_millis(1_500));
    ledger
        .deduct(&mut conn, 1, dec(100), "all")
        .expect("the whole balance: the expired hold reserves nothing");
    let swept = ledger.expire_holds(&mut conn, 10).expect("expire");
    let answered = swept.expired.first().expect("one expired hold");
    let stored = ledger
        .history(&mut conn, 1, None, 1)
        .expect("history")
        .entries
        .remove(0);
    assert_eq!(answered, &stored);
    assert_eq!(
        answered.balance_after.to_string(),
        stored.balance_after.to_string(),
        "answered {answered:?}, the journal holds {stored:?}"
    );
    assert_eq!(stored.balance_after.to_string(), "0.0000");
    audit_ok(&ledger, &mut conn, 1);
}
