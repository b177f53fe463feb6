//! `BalanceLedger` against a real server. Every invariant is checked by reading the database
//! afterwards (the journal, the balances, `audit`), not from in-process counters alone.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use diesel::prelude::*;
use lockstock::error::{AmountProblem, KeyProblem};
use lockstock::ledger::MAX_AMOUNT;
use lockstock::schema::{balance_history, user_balance};
use lockstock::{AccountOp, BalanceLedger, Entry, EntryKind, Error, ServerErrorKind, TxnPolicy};
use rust_decimal::Decimal;

use lockstock_testkit::fixtures::{
    assert_not_sacrificed, assert_refused, audit_ok, concurrently, connect, count_key, count_kind,
    fresh_database, funded_account, lock_balance, other_program, retry_policy, snapshot,
    stored_balance,
};
use lockstock_testkit::rng::{seed, Rng};

fn dec(units: i64, scale: u32) -> Decimal {
    Decimal::new(units, scale)
}

// ---------------------------------------------------------------------------------------------
// Database readers
// ---------------------------------------------------------------------------------------------

/// A fresh database `name`, a default ledger, and account `user` funded with `amount`.
fn ledger_with_account(
    name: &str,
    user: i64,
    amount: Decimal,
) -> (String, MysqlConnection, BalanceLedger) {
    let (url, mut conn) = fresh_database(name);
    let ledger = BalanceLedger::new();
    funded_account(&mut conn, &ledger, user, amount);
    (url, conn, ledger)
}

/// A `SUM` read with raw SQL.
#[derive(QueryableByName)]
struct Total {
    #[diesel(sql_type = diesel::sql_types::Numeric)]
    total: Decimal,
}

/// A `COUNT` read with raw SQL.
#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

/// Waits for every thread and returns their results in spawn order.
fn join_all<T>(handles: Vec<thread::JoinHandle<T>>) -> Vec<T> {
    handles
        .into_iter()
        .map(|h| h.join().expect("worker thread panicked"))
        .collect()
}

/// The errors a concurrent writer may legitimately see; any other error fails the test.
/// `Contended` must be a lock refusal that ran out of retries, never a deadlock.
fn check_contended(error: &Error) {
    let kind = error.server_kind();
    assert!(
        matches!(
            kind,
            Some(ServerErrorKind::LockRefused | ServerErrorKind::LockWaitTimeout)
        ),
        "Contended for an unexpected reason: {error:?}"
    );
}

/// How a concurrent writer's call was refused.
enum Refusal {
    Insufficient,
    Contended,
}

/// Checks an error a concurrent writer of `amount` from account `user` got: a typed refusal
/// for lack of funds that names the request, or a lock refusal ([`check_contended`]). Any other
/// error fails the test, naming `who`.
fn refusal(error: Error, user: i64, amount: Decimal, who: &str) -> Refusal {
    match error {
        Error::InsufficientBalance {
            user_id,
            available,
            requested,
        } => {
            assert_eq!((user_id, requested), (user, amount));
            assert!(available < requested && available >= Decimal::ZERO);
            Refusal::Insufficient
        }
        e @ Error::Contended { .. } => {
            check_contended(&e);
            Refusal::Contended
        }
        other => panic!("{who}: unexpected error {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// 1. One hot account, demand far above the balance
// ---------------------------------------------------------------------------------------------

#[test]
fn concurrent_deducts_never_overdraw_one_account() {
    // Heavy: never beside a test that asserts time bounds.
    let _storm = lockstock_testkit::fixtures::storm();
    const THREADS: usize = 32;
    const PER_THREAD: usize = 20;
    const USER: i64 = 1;
    let started = Instant::now();
    let (url, mut conn) = fresh_database("ledger_hot_deducts");
    let ledger = Arc::new(BalanceLedger::new());
    let initial = dec(1000, 0);
    let amount = dec(7, 0);
    ledger
        .charge(&mut conn, USER, initial, "seed")
        .expect("seed charge");

    let results: Vec<_> = concurrently(THREADS, &url, |t, conn| {
        let (mut ok, mut insufficient, mut contended) = (0u64, 0u64, 0u64);
        for i in 0..PER_THREAD {
            match ledger.deduct(conn, USER, amount, &format!("d-{t}-{i}")) {
                Ok(entry) => {
                    assert_eq!(entry.kind, EntryKind::Deduct);
                    assert!(entry.balance_after >= Decimal::ZERO, "{entry:?}");
                    ok += 1;
                }
                Err(e) => match refusal(e, USER, amount, &format!("thread {t}")) {
                    Refusal::Insufficient => insufficient += 1,
                    Refusal::Contended => contended += 1,
                },
            }
        }
        (ok, insufficient, contended)
    });
    let ok: u64 = results.iter().map(|r| r.0).sum();
    let insufficient: u64 = results.iter().map(|r| r.1).sum();
    let contended: u64 = results.iter().map(|r| r.2).sum();

    let final_balance = stored_balance(&mut conn, USER);
    let deducts = count_kind(&mut conn, USER, EntryKind::Deduct);
    let negative_after: i64 = balance_history::table
        .filter(balance_history::user_id.eq(USER))
        .filter(balance_history::balance_after.lt(Decimal::ZERO))
        .count()
        .get_result(&mut conn)
        .expect("entries below zero");
    eprintln!(
        "hot deducts: {} calls, ok {ok}, insufficient {insufficient}, contended {contended}, \
         journal deducts {deducts}, final balance {final_balance}, {:?}",
        THREADS * PER_THREAD,
        started.elapsed()
    );
    assert_eq!(ok + insufficient + contended, (THREADS * PER_THREAD) as u64);
    assert!(final_balance >= Decimal::ZERO, "{final_balance}");
    assert_eq!(negative_after, 0);
    assert_eq!(Decimal::from(deducts) * amount, initial - final_balance);
    assert_eq!(ok, deducts as u64, "successes seen by callers vs journal");
    // Only deducts happen, so once a refusal saw less than 7 the balance stays below 7.
    if insufficient > 0 {
        assert!(final_balance < amount, "{final_balance}");
    }
    // Demand (4480) far exceeds 1000: the account must have been drained.
    assert!(insufficient > 0, "no deduct was refused");
    audit_ok(&ledger, &mut conn, USER);

    // The schema itself refuses a negative balance, whatever the code does.
    let raw = diesel::update(user_balance::table.find(USER))
        .set(user_balance::balance.eq(dec(-1, 0)))
        .execute(&mut conn)
        .map_err(Error::from);
    match raw {
        Err(e) => assert_eq!(
            e.server_kind(),
            Some(ServerErrorKind::CheckViolation),
            "{e:?}"
        ),
        Ok(n) => panic!("a negative balance was stored ({n} rows)"),
    }
    assert_eq!(stored_balance(&mut conn, USER), final_balance);
}

// ---------------------------------------------------------------------------------------------
// 2 + 6. The bank: random transfers both ways, a snapshot reader, conservation
// ---------------------------------------------------------------------------------------------

#[test]
fn bank_transfers_conserve_money_under_a_snapshot_reader() {
    // Heavy: never beside a test that asserts time bounds.
    let _storm = lockstock_testkit::fixtures::storm();
    const ACCOUNTS: i64 = 8;
    const WRITERS: usize = 16;
    const OPS_PER_WRITER: usize = 320; // 16 × 320 = 5,120 ≥ 5,000
    let started = Instant::now();
    let seed = seed("bank_transfers_conserve_money_under_a_snapshot_reader");
    let (url, mut conn) = fresh_database("ledger_bank");
    let ledger = Arc::new(BalanceLedger::new());
    let opening = dec(500, 0);
    for user in 1..=ACCOUNTS {
        ledger
            .charge(&mut conn, user, opening, "opening")
            .expect("opening charge");
    }
    let start_total = opening * Decimal::from(ACCOUNTS);

    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (url, ledger, done) = (url.clone(), ledger.clone(), done.clone());
        thread::spawn(move || {
            let mut conn = connect(&url);
            let mut sums = 0u64;
            loop {
                // Read the flag first, so at least one full snapshot follows the last write.
                let last = done.load(Ordering::Acquire);
                let (per_account, total) = ledger
                    .runner()
                    .read(&mut conn, |c| {
                        let mut sum = Decimal::ZERO;
                        let mut min = Decimal::MAX;
                        // Eight separate reads inside one snapshot, then the server's own SUM.
                        for user in 1..=ACCOUNTS {
                            let b: Decimal = user_balance::table
                                .find(user)
                                .select(user_balance::balance)
                                .first(c)?;
                            min = min.min(b);
                            sum += b;
                        }
                        let total: Total =
                            diesel::sql_query("SELECT SUM(balance) AS total FROM user_balance")
                                .get_result(c)?;
                        Ok(((sum, min), total.total))
                    })
                    .expect("snapshot read");
                assert_eq!(per_account.0, start_total, "snapshot sum of 8 reads");
                assert_eq!(total, start_total, "snapshot SUM()");
                assert!(per_account.1 >= Decimal::ZERO, "negative balance seen");
                sums += 1;
                if last {
                    return sums;
                }
            }
        })
    };

    let barrier = Arc::new(crate::Gate::new(WRITERS));
    // The snapshot reader stops also when a writer fails.
    let _stop_reader = crate::StopOnDrop(&done);
    let writers: Vec<_> = (0..WRITERS)
        .map(|t| {
            let (url, ledger, barrier) = (url.clone(), ledger.clone(), barrier.clone());
            let mut rng = Rng::new(seed ^ (t as u64 + 1).wrapping_mul(0x9E37_79B9));
            thread::spawn(move || {
                let _party = barrier.party();
                let mut conn = connect(&url);
                barrier.wait();
                let (mut ok, mut refused, mut contended) = (0u64, 0u64, 0u64);
                for i in 0..OPS_PER_WRITER {
                    let from = 1 + rng.below(ACCOUNTS as u64) as i64;
                    let to = 1 + (from + rng.below(ACCOUNTS as u64 - 1) as i64) % ACCOUNTS;
                    assert_ne!(from, to);
                    let amount = dec(100 + rng.below(4901) as i64, 2); // 1.00 ..= 50.00
                    let key = format!("w{t}-{i}");
                    // A contended call wrote nothing: retry it under the same key (a few times).
                    for _ in 0..10 {
                        match ledger.transfer(&mut conn, from, to, amount, &key) {
                            Ok(tr) => {
                                assert_eq!(tr.credit.related_entry_id, Some(tr.debit.id));
                                assert!(tr.debit.balance_after >= Decimal::ZERO);
                                ok += 1;
                            }
                            Err(e) => match refusal(e, from, amount, &format!("writer {t}")) {
                                Refusal::Insufficient => refused += 1,
                                Refusal::Contended => {
                                    contended += 1;
                                    continue;
                                }
                            },
                        }
                        break;
                    }
                }
                (ok, refused, contended)
            })
        })
        .collect();
    let results = join_all(writers);
    done.store(true, Ordering::Release);
    let sums = reader.join().expect("reader thread panicked");

    let ok: u64 = results.iter().map(|r| r.0).sum();
    let refused: u64 = results.iter().map(|r| r.1).sum();
    let contended: u64 = results.iter().map(|r| r.2).sum();
    let ops = ok + refused;
    eprintln!(
        "bank (seed {seed}): ops {ops} (ok {ok}, refused {refused}), contended calls \
         {contended} (retried under the same key), reader sums {sums}, {:?}",
        started.elapsed()
    );
    assert!(ops >= 5_000, "{ops} successful + refused transfers");
    assert!(sums >= 1);

    // The journal agrees with what the callers saw.
    let outs: i64 = balance_history::table
        .filter(balance_history::kind.eq(EntryKind::TransferOut.as_str()))
        .count()
        .get_result(&mut conn)
        .expect("count transfer_out");
    let ins: i64 = balance_history::table
        .filter(balance_history::kind.eq(EntryKind::TransferIn.as_str()))
        .count()
        .get_result(&mut conn)
        .expect("count transfer_in");
    assert_eq!((outs as u64, ins as u64), (ok, ok));
    // Every received transfer links to a sending entry of the same amount, the other way round.
    let unlinked: i64 = diesel::sql_query(
        "SELECT COUNT(*) AS n FROM balance_history i LEFT JOIN balance_history o \
           ON o.id = i.related_entry_id AND o.kind = 'transfer_out' AND o.amount = i.amount \
          AND o.user_id = i.counterparty_user_id AND o.counterparty_user_id = i.user_id \
         WHERE i.kind = 'transfer_in' AND o.id IS NULL",
    )
    .get_result::<Count>(&mut conn)
    .expect("unlinked transfers")
    .n;
    assert_eq!(unlinked, 0);

    let snap = snapshot(&mut conn);
    assert_eq!(snap.balances.len(), ACCOUNTS as usize);
    let mut end_total = Decimal::ZERO;
    for (user, balance, ..) in &snap.balances {
        assert!(*balance >= Decimal::ZERO, "user {user}: {balance}");
        end_total += balance;
        audit_ok(&ledger, &mut conn, *user);
    }
    assert_eq!(end_total, start_total);
}

#[test]
fn opposite_transfers_do_not_deadlock_and_link_both_sides() {
    const THREADS: usize = 12;
    const PER_THREAD: usize = 40;
    let started = Instant::now();
    let (url, mut conn) = fresh_database("ledger_opposite");
    let ledger = Arc::new(BalanceLedger::new());
    let (a, b) = (11i64, 12i64);
    ledger
        .charge(&mut conn, a, dec(300, 0), "open")
        .expect("open a");
    ledger
        .charge(&mut conn, b, dec(300, 0), "open")
        .expect("open b");

    let results: Vec<_> = concurrently(THREADS, &url, |t, conn| {
        // Half the threads send a → b, the other half b → a.
        let (from, to) = if t % 2 == 0 { (a, b) } else { (b, a) };
        let (mut ok, mut refused, mut contended) = (0u64, 0u64, 0u64);
        for i in 0..PER_THREAD {
            let amount = dec(1 + (i as i64 * 7 + t as i64) % 25, 0);
            match ledger.transfer(conn, from, to, amount, &format!("o{t}-{i}")) {
                Ok(_) => ok += 1,
                Err(Error::InsufficientBalance { .. }) => refused += 1,
                Err(e @ Error::Contended { .. }) => {
                    check_contended(&e);
                    contended += 1;
                }
                Err(other) => panic!("thread {t}: unexpected error {other:?}"),
            }
        }
        (ok, refused, contended)
    });
    let ok: u64 = results.iter().map(|r| r.0).sum();
    let refused: u64 = results.iter().map(|r| r.1).sum();
    let contended: u64 = results.iter().map(|r| r.2).sum();
    let total = stored_balance(&mut conn, a) + stored_balance(&mut conn, b);
    eprintln!(
        "opposite transfers: ok {ok}, refused {refused}, contended {contended}, {:?}",
        started.elapsed()
    );
    assert_eq!(total, dec(600, 0));
    assert_eq!(
        count_kind(&mut conn, a, EntryKind::TransferOut)
            + count_kind(&mut conn, b, EntryKind::TransferOut),
        ok as i64
    );
    audit_ok(&ledger, &mut conn, a);
    audit_ok(&ledger, &mut conn, b);

    // Linking and replay of one transfer (refill first: the race may have drained `a`).
    ledger
        .charge(&mut conn, a, dec(10, 0), "refill")
        .expect("refill");
    let first = ledger
        .transfer(&mut conn, a, b, dec(125, 2), "linked")
        .expect("transfer");
    assert_eq!(first.debit.kind, EntryKind::TransferOut);
    assert_eq!(first.credit.kind, EntryKind::TransferIn);
    assert_eq!(first.credit.related_entry_id, Some(first.debit.id));
    assert_eq!(first.debit.counterparty_user_id, Some(b));
    assert_eq!(first.credit.counterparty_user_id, Some(a));
    assert_eq!(first.debit.idempotency_key.as_deref(), Some("linked"));
    assert_eq!(first.credit.idempotency_key, None);
    let stored: (Option<i64>, i64) = balance_history::table
        .find(first.credit.id)
        .select((balance_history::related_entry_id, balance_history::user_id))
        .first(&mut conn)
        .expect("stored credit");
    assert_eq!(stored, (Some(first.debit.id), b));
    let before = snapshot(&mut conn);
    let again = ledger
        .transfer(&mut conn, a, b, dec(125, 2), "linked")
        .expect("replayed transfer");
    assert_eq!(again.debit.id, first.debit.id);
    assert_eq!(again.credit.id, first.credit.id);
    assert_eq!(again.credit.related_entry_id, Some(first.debit.id));
    assert_eq!(snapshot(&mut conn), before, "a replay must write nothing");
    // The same key for another receiver or amount is a conflict.
    assert!(matches!(
        ledger.transfer(&mut conn, a, b, dec(126, 2), "linked"),
        Err(Error::IdempotencyConflict { existing_entry_id, .. }) if existing_entry_id == first.debit.id
    ));
    assert_eq!(snapshot(&mut conn), before);
}

// ---------------------------------------------------------------------------------------------
// 3. Idempotency under a race
// ---------------------------------------------------------------------------------------------

/// 16 threads charge `user` under one key at once; returns the entry ids they got.
fn race_one_charge(url: &str, ledger: &Arc<BalanceLedger>, user: i64, key: &str) -> Vec<i64> {
    const THREADS: usize = 16;
    let handles: Vec<_> = concurrently(THREADS, url, |_, conn| {
        ledger.charge(conn, user, dec(4250, 2), key)
    });
    handles
        .into_iter()
        .map(|r| match r {
            Ok(entry) => {
                assert_eq!(entry.amount, dec(4250, 2));
                entry.id
            }
            Err(e) => panic!("a racing charge with the same key failed: {e:?}"),
        })
        .collect()
}

#[test]
fn same_key_charge_race_applies_once() {
    let (url, mut conn) = fresh_database("ledger_same_key");
    // Every racer must end with Ok: give the losers of the lock race a generous budget, so a
    // slow shared machine cannot turn the test into a Contended lottery.
    let retry = retry_policy(1_000, Duration::from_secs(15));
    let ledger = Arc::new(BalanceLedger::with_policy(
        TxnPolicy::default().with_retry(retry),
    ));

    for (user, existing) in [(21i64, true), (22i64, false)] {
        // 21 exists already; 22 is created by the racing first charges themselves.
        if existing {
            ledger
                .charge(&mut conn, user, dec(10, 0), "open")
                .expect("open");
        }
        let before = if existing { dec(10, 0) } else { Decimal::ZERO };
        let ids = race_one_charge(&url, &ledger, user, "pay-1");
        let first = ids[0];
        assert!(ids.iter().all(|id| *id == first), "user {user}: {ids:?}");
        assert_eq!(count_key(&mut conn, user, "pay-1"), 1, "user {user}");
        assert_eq!(
            count_kind(&mut conn, user, EntryKind::Charge),
            1 + i64::from(existing)
        );
        assert_eq!(stored_balance(&mut conn, user), before + dec(4250, 2));
        audit_ok(&ledger, &mut conn, user);

        let snap = snapshot(&mut conn);
        // Another amount under the same key.
        let other_amount = ledger.charge(&mut conn, user, dec(4251, 2), "pay-1");
        assert_refused(&other_amount, |e| {
            matches!(e, Error::IdempotencyConflict { user_id, key, existing_entry_id }
                if (*user_id, key.as_str(), *existing_entry_id) == (user, "pay-1", first))
        });
        match ledger.deduct(&mut conn, user, dec(4250, 2), "pay-1") {
            Err(Error::IdempotencyConflict {
                existing_entry_id, ..
            }) => assert_eq!(existing_entry_id, first),
            other => panic!("deduct under a charge's key: {other:?}"),
        }
        // Equal amounts written differently are the same request.
        let replay = ledger
            .charge(&mut conn, user, dec(425_000, 4), "pay-1")
            .expect("replay");
        assert_eq!(replay.id, first);
        assert_eq!(
            snapshot(&mut conn),
            snap,
            "conflicts and replays write nothing"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Refunds
// ---------------------------------------------------------------------------------------------

#[test]
fn concurrent_refunds_never_exceed_the_deduct() {
    const THREADS: usize = 16;
    const USER: i64 = 31;
    let (url, mut conn) = fresh_database("ledger_refunds");
    let ledger = BalanceLedger::new();
    let charge = ledger
        .charge(&mut conn, USER, dec(500, 0), "top-up")
        .expect("charge");
    let deduct = ledger
        .deduct(&mut conn, USER, dec(100, 0), "order")
        .expect("deduct");

    let handles: Vec<_> = concurrently(THREADS, &url, |t, conn| {
        ledger.refund(conn, deduct.id, dec(15, 0), &format!("refund-{t}"))
    });
    let (mut ok, mut exceeded, mut contended) = (0u64, 0u64, 0u64);
    // A refund refused for contention runs again (its key, one after another) until decided:
    // in the end every one of the 16 is decided, so that 6 fit and 10 exceed — whatever the
    // race left undecided.
    let decided: Vec<_> = handles
        .into_iter()
        .enumerate()
        .map(|(t, result)| {
            let mut result = result;
            for _ in 0..200 {
                match result {
                    Err(e @ Error::Contended { .. }) => {
                        check_contended(&e);
                        contended += 1;
                        result =
                            ledger.refund(&mut conn, deduct.id, dec(15, 0), &format!("refund-{t}"));
                    }
                    decided => return decided,
                }
            }
            panic!("refund {t} still contended after 200 tries")
        })
        .collect();
    for result in decided {
        match result {
            Ok(entry) => {
                assert_eq!(entry.kind, EntryKind::Refund);
                assert_eq!(entry.related_entry_id, Some(deduct.id));
                ok += 1;
            }
            Err(Error::RefundExceedsDeduct {
                entry_id,
                deducted,
                refunded,
                requested,
            }) => {
                assert_eq!(
                    (entry_id, deducted, requested),
                    (deduct.id, dec(100, 0), dec(15, 0))
                );
                assert!(refunded + requested > deducted, "{refunded}");
                exceeded += 1;
            }
            Err(other) => panic!("unexpected refund error {other:?}"),
        }
    }
    eprintln!("refunds: ok {ok}, exceeded {exceeded}, contended {contended} (run again)");
    assert_eq!(
        (ok, exceeded),
        (6, 10),
        "6 refunds of 15 fit into 100, 10 do not"
    );
    let refunded: Decimal = balance_history::table
        .find(deduct.id)
        .select(balance_history::refunded_amount)
        .first(&mut conn)
        .expect("refunded_amount");
    let refund_rows: Vec<Decimal> = balance_history::table
        .filter(balance_history::related_entry_id.eq(deduct.id))
        .filter(balance_history::kind.eq(EntryKind::Refund.as_str()))
        .select(balance_history::amount)
        .load(&mut conn)
        .expect("refund rows");
    assert_eq!(refund_rows.len() as u64, ok);
    assert_eq!(refunded, refund_rows.iter().sum::<Decimal>());
    assert_eq!(refunded, Decimal::from(ok) * dec(15, 0));
    assert_eq!(
        stored_balance(&mut conn, USER),
        dec(400, 0) + Decimal::from(ok) * dec(15, 0)
    );
    audit_ok(&ledger, &mut conn, USER);

    // Replay of a successful refund key: the same entry, even when the deduct is exhausted.
    let done: (i64, Option<String>) = balance_history::table
        .filter(balance_history::related_entry_id.eq(deduct.id))
        .select((balance_history::id, balance_history::idempotency_key))
        .first(&mut conn)
        .expect("a refund");
    let key = done.1.expect("refund key");
    let snap = snapshot(&mut conn);
    let again = ledger
        .refund(&mut conn, deduct.id, dec(15, 0), &key)
        .expect("replay refund");
    assert_eq!(again.id, done.0);
    assert!(matches!(
        ledger.refund(&mut conn, deduct.id, dec(5, 0), &key),
        Err(Error::IdempotencyConflict { existing_entry_id, .. }) if existing_entry_id == done.0
    ));
    // Not a deduct / no such entry.
    match ledger.refund(&mut conn, charge.id, dec(1, 0), "refund-charge") {
        Err(Error::NotRefundable { entry_id, kind }) => {
            assert_eq!((entry_id, kind), (charge.id, EntryKind::Charge))
        }
        other => panic!("refund of a charge: {other:?}"),
    }
    match ledger.refund(&mut conn, again.id, dec(1, 0), "refund-refund") {
        Err(Error::NotRefundable { kind, .. }) => assert_eq!(kind, EntryKind::Refund),
        other => panic!("refund of a refund: {other:?}"),
    }
    // A key the account used for another request wins over the refusal.
    match ledger.refund(&mut conn, charge.id, dec(1, 0), &key) {
        Err(Error::IdempotencyConflict {
            existing_entry_id, ..
        }) => assert_eq!(existing_entry_id, done.0),
        other => panic!("refund of a charge under a used key: {other:?}"),
    }
    let unknown = deduct.id + 10_000;
    match ledger.refund(&mut conn, unknown, dec(1, 0), "refund-ghost") {
        Err(Error::EntryNotFound { entry_id }) => assert_eq!(entry_id, unknown),
        other => panic!("refund of an unknown entry: {other:?}"),
    }
    assert_eq!(snapshot(&mut conn), snap);

    // A sequential replay while the deduct still has room: same entry, applied once.
    let d2 = ledger
        .deduct(&mut conn, USER, dec(10, 0), "order-2")
        .expect("deduct 2");
    let r1 = ledger
        .refund(&mut conn, d2.id, dec(4, 0), "r2")
        .expect("refund");
    let r2 = ledger
        .refund(&mut conn, d2.id, dec(4, 0), "r2")
        .expect("refund replay");
    assert_eq!(r1.id, r2.id);
    let refunded: Decimal = balance_history::table
        .find(d2.id)
        .select(balance_history::refunded_amount)
        .first(&mut conn)
        .expect("refunded");
    assert_eq!(refunded, dec(4, 0));
    audit_ok(&ledger, &mut conn, USER);
}

// ---------------------------------------------------------------------------------------------
// 5. Bad inputs: exact typed error, database unchanged
// ---------------------------------------------------------------------------------------------

type Call = Box<dyn Fn(&BalanceLedger, &mut MysqlConnection) -> Result<(), Error>>;
type Expect = Box<dyn Fn(&Error) -> bool>;

#[test]
fn bad_inputs_are_typed_and_change_nothing() {
    let (_url, mut conn) = fresh_database("ledger_bad_inputs");
    let ledger = BalanceLedger::new();
    let (rich, full, ghost, ghost2) = (1i64, 3i64, 999i64, 998i64);
    ledger
        .charge(&mut conn, rich, dec(100, 0), "open")
        .expect("open");
    ledger
        .charge(&mut conn, full, MAX_AMOUNT, "open")
        .expect("charge to the maximum");
    let charge_id = ledger
        .history(&mut conn, rich, None, 1)
        .expect("history")
        .entries[0]
        .id;
    let deduct = ledger
        .deduct(&mut conn, rich, dec(10, 0), "order")
        .expect("deduct");
    let long_key = "k".repeat(65);
    let multibyte_key = "é".repeat(33); // 66 bytes, 33 characters

    fn c<F>(f: F) -> Call
    where
        F: Fn(&BalanceLedger, &mut MysqlConnection) -> Result<(), Error> + 'static,
    {
        Box::new(f)
    }
    fn e<F: Fn(&Error) -> bool + 'static>(f: F) -> Expect {
        Box::new(f)
    }
    let amount_problem = |want: AmountProblem| {
        e(move |err| matches!(err, Error::InvalidAmount { problem, .. } if *problem == want))
    };
    let key_problem = |want: KeyProblem| {
        e(move |err| matches!(err, Error::InvalidIdempotencyKey { problem } if *problem == want))
    };
    let invalid_user = |want: i64| {
        e(move |err| matches!(err, Error::InvalidId { what: "user", id } if *id == want))
    };
    let tiny = dec(1, 4);
    let cases: Vec<(&str, Call, Expect)> = vec![
        (
            "charge zero",
            c(|l, c| l.charge(c, 1, Decimal::ZERO, "z").map(drop)),
            amount_problem(AmountProblem::NotPositive),
        ),
        (
            "deduct negative",
            c(|l, c| l.deduct(c, 1, dec(-5, 0), "n").map(drop)),
            amount_problem(AmountProblem::NotPositive),
        ),
        (
            "charge of a new account with zero",
            c(move |l, c| l.charge(c, ghost, Decimal::ZERO, "z").map(drop)),
            amount_problem(AmountProblem::NotPositive),
        ),
        (
            "charge 5 decimals",
            c(|l, c| l.charge(c, 1, dec(100_001, 5), "p").map(drop)),
            amount_problem(AmountProblem::TooManyDecimals),
        ),
        (
            "transfer 5 decimals",
            c(|l, c| l.transfer(c, 1, 2, dec(1, 5), "p").map(drop)),
            amount_problem(AmountProblem::TooManyDecimals),
        ),
        (
            "charge above DECIMAL(19,4)",
            c(move |l, c| l.charge(c, 1, MAX_AMOUNT + tiny, "big").map(drop)),
            amount_problem(AmountProblem::TooLarge),
        ),
        (
            "deduct 1e20",
            c(|l, c| {
                l.deduct(c, 1, Decimal::from(10u128.pow(20)), "big")
                    .map(drop)
            }),
            amount_problem(AmountProblem::TooLarge),
        ),
        (
            "empty key",
            c(|l, c| l.charge(c, 1, dec(1, 0), "").map(drop)),
            key_problem(KeyProblem::Empty),
        ),
        (
            "65-byte key",
            c(move |l, c| l.deduct(c, 1, dec(1, 0), &long_key).map(drop)),
            key_problem(KeyProblem::TooLong { len: 65 }),
        ),
        (
            "66-byte key of 33 characters",
            c(move |l, c| l.charge(c, 1, dec(1, 0), &multibyte_key).map(drop)),
            key_problem(KeyProblem::TooLong { len: 66 }),
        ),
        (
            "refund with an empty key",
            c(move |l, c| l.refund(c, deduct.id, dec(1, 0), "").map(drop)),
            e(|err| matches!(err, Error::InvalidIdempotencyKey { .. })),
        ),
        (
            "charge user 0",
            c(|l, c| l.charge(c, 0, dec(1, 0), "u").map(drop)),
            invalid_user(0),
        ),
        (
            "deduct user -5",
            c(|l, c| l.deduct(c, -5, dec(1, 0), "u").map(drop)),
            invalid_user(-5),
        ),
        (
            "transfer to user 0",
            c(|l, c| l.transfer(c, 1, 0, dec(1, 0), "u").map(drop)),
            invalid_user(0),
        ),
        (
            "balance of user 0",
            c(|l, c| l.balance(c, 0).map(drop)),
            invalid_user(0),
        ),
        (
            "history of user -1",
            c(|l, c| l.history(c, -1, None, 10).map(drop)),
            invalid_user(-1),
        ),
        (
            "refund entry 0",
            c(|l, c| l.refund(c, 0, dec(1, 0), "r").map(drop)),
            e(|err| matches!(err, Error::InvalidId { id: 0, .. })),
        ),
        (
            "self transfer",
            c(|l, c| l.transfer(c, 1, 1, dec(1, 0), "self").map(drop)),
            e(|err| matches!(err, Error::SelfTransfer { user_id: 1 })),
        ),
        (
            "deduct from an unknown account",
            c(move |l, c| l.deduct(c, ghost, dec(1, 0), "g").map(drop)),
            e(move |err| matches!(err, Error::AccountNotFound { user_id } if *user_id == ghost)),
        ),
        (
            "transfer from an unknown account",
            c(move |l, c| l.transfer(c, ghost, rich, dec(1, 0), "g").map(drop)),
            e(move |err| matches!(err, Error::AccountNotFound { user_id } if *user_id == ghost)),
        ),
        (
            "transfer between two unknown accounts",
            c(move |l, c| l.transfer(c, ghost, ghost2, dec(1, 0), "g").map(drop)),
            e(move |err| matches!(err, Error::AccountNotFound { user_id } if *user_id == ghost)),
        ),
        (
            "balance of an unknown account",
            c(move |l, c| l.balance(c, ghost).map(drop)),
            e(move |err| matches!(err, Error::AccountNotFound { user_id } if *user_id == ghost)),
        ),
        (
            "audit of an unknown account",
            c(move |l, c| l.audit(c, ghost).map(drop)),
            e(move |err| matches!(err, Error::AccountNotFound { user_id } if *user_id == ghost)),
        ),
        (
            "history limit 0",
            c(|l, c| l.history(c, 1, None, 0).map(drop)),
            e(|err| matches!(err, Error::InvalidInput { field: "limit", .. })),
        ),
        (
            "history limit 1001",
            c(|l, c| l.history(c, 1, None, 1001).map(drop)),
            e(|err| matches!(err, Error::InvalidInput { field: "limit", .. })),
        ),
        (
            "charge beyond the maximum balance",
            c(move |l, c| l.charge(c, full, tiny, "more").map(drop)),
            e(move |err| {
                matches!(err, Error::BalanceLimitExceeded { user_id, balance, requested }
                    if *user_id == full && *balance == MAX_AMOUNT && *requested == tiny)
            }),
        ),
        (
            "transfer into a full account",
            c(move |l, c| l.transfer(c, rich, full, dec(1, 0), "fill").map(drop)),
            e(
                move |err| matches!(err, Error::BalanceLimitExceeded { user_id, .. } if *user_id == full),
            ),
        ),
        (
            "deduct more than the balance",
            c(|l, c| l.deduct(c, 1, dec(9001, 2), "too-much").map(drop)),
            e(|err| {
                matches!(err, Error::InsufficientBalance { user_id: 1, available, requested }
                    if *available == dec(90, 0) && *requested == dec(9001, 2))
            }),
        ),
        (
            "transfer more than the balance to a new account",
            c(move |l, c| l.transfer(c, rich, ghost, dec(91, 0), "too-much").map(drop)),
            e(|err| matches!(err, Error::InsufficientBalance { user_id: 1, .. })),
        ),
        (
            "refund of an unknown entry",
            c(|l, c| l.refund(c, 123_456, dec(1, 0), "r").map(drop)),
            e(|err| matches!(err, Error::EntryNotFound { entry_id: 123_456 })),
        ),
        (
            "refund of a charge",
            c(move |l, c| l.refund(c, charge_id, dec(1, 0), "r").map(drop)),
            e(move |err| {
                matches!(err, Error::NotRefundable { entry_id, kind: EntryKind::Charge }
                    if *entry_id == charge_id)
            }),
        ),
        (
            "refund above the deduct",
            c(move |l, c| l.refund(c, deduct.id, dec(1001, 2), "r").map(drop)),
            e(move |err| {
                matches!(err, Error::RefundExceedsDeduct { entry_id, refunded, .. }
                    if *entry_id == deduct.id && refunded.is_zero())
            }),
        ),
        (
            "deduct under a charge's key",
            c(|l, c| l.deduct(c, 1, dec(1, 0), "open").map(drop)),
            e(move |err| {
                matches!(err, Error::IdempotencyConflict { user_id: 1, key, existing_entry_id }
                    if key == "open" && *existing_entry_id == charge_id)
            }),
        ),
        (
            "transfer under a used key to a new account",
            c(move |l, c| l.transfer(c, rich, ghost, dec(1, 0), "open").map(drop)),
            e(move |err| {
                matches!(err, Error::IdempotencyConflict { user_id: 1, existing_entry_id, .. }
                    if *existing_entry_id == charge_id)
            }),
        ),
    ];

    for (name, call, expected) in &cases {
        let before = snapshot(&mut conn);
        match call(&ledger, &mut conn) {
            Ok(()) => panic!("{name}: succeeded"),
            Err(err) => assert!(expected(&err), "{name}: wrong error {err:?}"),
        }
        assert_eq!(snapshot(&mut conn), before, "{name}: the database changed");
    }
    audit_ok(&ledger, &mut conn, rich);
    audit_ok(&ledger, &mut conn, full);
    eprintln!("bad inputs: {} cases", cases.len());
}

// ---------------------------------------------------------------------------------------------
// 7. History
// ---------------------------------------------------------------------------------------------

#[test]
fn history_pages_newest_first_without_gaps() {
    const USER: i64 = 41;
    let (_url, mut conn) = fresh_database("ledger_history");
    let ledger = BalanceLedger::new();
    let mut written: Vec<Entry> = Vec::new();
    for i in 0..25i64 {
        let entry = if i % 3 == 2 {
            ledger.deduct(&mut conn, USER, dec(i, 1), &format!("h{i}"))
        } else {
            ledger.charge(&mut conn, USER, dec(10 + i, 0), &format!("h{i}"))
        }
        .expect("write");
        written.push(entry);
    }
    // Another account's entries must not show up.
    ledger
        .charge(&mut conn, USER + 1, dec(1, 0), "other")
        .expect("other");

    let mut pages = Vec::new();
    let mut cursor = None;
    loop {
        let page = ledger
            .history(&mut conn, USER, cursor, 10)
            .expect("history page");
        pages.push(page.entries.clone());
        match page.next_cursor {
            Some(next) => {
                assert_eq!(Some(next), page.entries.last().map(|e| e.id));
                cursor = Some(next);
            }
            None => break,
        }
        assert!(pages.len() <= 3, "too many pages");
    }
    let sizes: Vec<usize> = pages.iter().map(Vec::len).collect();
    assert_eq!(sizes, vec![10, 10, 5]);
    let all: Vec<Entry> = pages.into_iter().flatten().collect();
    let mut expected = written.clone();
    expected.reverse();
    assert_eq!(
        all.iter().map(|e| e.id).collect::<Vec<_>>(),
        expected.iter().map(|e| e.id).collect::<Vec<_>>(),
        "newest first, no duplicates, no gaps"
    );
    assert_eq!(all.iter().map(|e| e.id).collect::<HashSet<_>>().len(), 25);
    // balance_after is the running sum, and every returned entry equals what the call returned.
    for (newer, older) in all.iter().zip(all.iter().skip(1)) {
        let delta = if newer.kind.is_credit() {
            newer.amount
        } else {
            -newer.amount
        };
        assert_eq!(
            newer.balance_after,
            older.balance_after + delta,
            "{newer:?}"
        );
    }
    assert_eq!(all, expected);
    assert_eq!(all[0].balance_after, stored_balance(&mut conn, USER));
    assert_eq!(all[24].balance_after, all[24].amount);
    let balance = ledger.balance(&mut conn, USER).expect("balance");
    assert_eq!(balance.balance, all[0].balance_after);
    assert_eq!(balance.version, 25);
    // Printed alike, with or without holds: the column's four places (not `0` beside
    // `0.0000`).
    assert_eq!(
        (balance.held.to_string(), balance.available.scale()),
        ("0.0000".to_string(), balance.balance.scale())
    );

    match ledger.balance(&mut conn, 4242) {
        Err(Error::AccountNotFound { user_id: 4242 }) => {}
        other => panic!("balance of an unknown account: {other:?}"),
    }
    // History of an account without entries is an empty last page.
    let empty = ledger.history(&mut conn, 4242, None, 10).expect("empty");
    assert!(empty.entries.is_empty() && empty.next_cursor.is_none());
    // A page that ends with the oldest entry is the last: no cursor to an empty page (before
    // the fix, pages of 5 over 25 entries gave a sixth, empty one).
    let mut sizes = Vec::new();
    let mut cursor = None;
    loop {
        let page = ledger.history(&mut conn, USER, cursor, 5).expect("page");
        sizes.push(page.entries.len());
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
        assert!(sizes.len() <= 5, "too many pages: {sizes:?}");
    }
    assert_eq!(sizes, vec![5; 5]);
    // A cursor that is no entry id is refused, as every id is (before: an empty page).
    for cursor in [0, -5] {
        assert!(
            matches!(
                ledger.history(&mut conn, USER, Some(cursor), 10),
                Err(Error::InvalidId { .. })
            ),
            "cursor {cursor}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 8. A refusal writes nothing and the key stays usable
// ---------------------------------------------------------------------------------------------

#[test]
fn refused_call_writes_nothing_and_key_can_be_retried() {
    const USER: i64 = 51;
    let (_url, mut conn, ledger) = ledger_with_account("ledger_retry_key", USER, dec(20, 0));
    let before = snapshot(&mut conn);
    let refused = ledger.deduct(&mut conn, USER, dec(50, 0), "K");
    assert_refused(&refused, |e| {
        matches!(e, Error::InsufficientBalance { user_id, available, requested }
            if (*user_id, *available, *requested) == (USER, dec(20, 0), dec(50, 0)))
    });
    assert_eq!(snapshot(&mut conn), before, "a refusal wrote something");
    assert_eq!(count_key(&mut conn, USER, "K"), 0);

    ledger
        .charge(&mut conn, USER, dec(40, 0), "c2")
        .expect("charge");
    let entry = ledger
        .deduct(&mut conn, USER, dec(50, 0), "K")
        .expect("the same deduct under K now succeeds");
    assert_eq!(entry.balance_after, dec(10, 0));
    assert_eq!(count_key(&mut conn, USER, "K"), 1);
    assert_eq!(stored_balance(&mut conn, USER), dec(10, 0));
    // Replayed once the balance is insufficient again: still the original entry.
    let replay = ledger
        .deduct(&mut conn, USER, dec(50, 0), "K")
        .expect("replay");
    assert_eq!(replay.id, entry.id);
    assert_eq!(stored_balance(&mut conn, USER), dec(10, 0));
    audit_ok(&ledger, &mut conn, USER);
}

// ---------------------------------------------------------------------------------------------
// 9. audit detects tampering
// ---------------------------------------------------------------------------------------------

#[test]
fn audit_detects_a_tampered_balance() {
    const USER: i64 = 61;
    let (_url, mut conn, ledger) = ledger_with_account("ledger_audit_tamper", USER, dec(100, 0));
    ledger
        .deduct(&mut conn, USER, dec(30, 0), "d")
        .expect("deduct");
    let report = ledger.audit(&mut conn, USER).expect("clean audit");
    assert_eq!(
        (report.balance, report.journal_sum, report.entries),
        (dec(70, 0), dec(70, 0), 2)
    );

    diesel::update(user_balance::table.find(USER))
        .set(user_balance::balance.eq(dec(1_000_070, 0)))
        .execute(&mut conn)
        .expect("tamper");
    match ledger.audit(&mut conn, USER) {
        Err(Error::AuditFailed(report)) => {
            assert_eq!(report.user_id, USER);
            assert_eq!(report.balance, dec(1_000_070, 0));
            assert_eq!(report.journal_sum, dec(70, 0));
            assert!(!report.is_consistent());
            assert!(
                report
                    .problems
                    .iter()
                    .any(|p| p.contains("1000070") && p.contains("70")),
                "{:?}",
                report.problems
            );
        }
        other => panic!("expected AuditFailed, got {other:?}"),
    }

    // A tampered journal entry (balance_after) is found as well.
    diesel::update(user_balance::table.find(USER))
        .set(user_balance::balance.eq(dec(70, 0)))
        .execute(&mut conn)
        .expect("restore");
    audit_ok(&ledger, &mut conn, USER);
    let last = ledger
        .history(&mut conn, USER, None, 1)
        .expect("history")
        .entries[0]
        .id;
    diesel::update(balance_history::table.find(last))
        .set(balance_history::balance_after.eq(dec(71, 0)))
        .execute(&mut conn)
        .expect("tamper entry");
    match ledger.audit(&mut conn, USER) {
        Err(Error::AuditFailed(report)) => assert!(
            report
                .problems
                .iter()
                .any(|p| p.contains(&format!("entry {last}"))),
            "{:?}",
            report.problems
        ),
        other => panic!("expected AuditFailed, got {other:?}"),
    }
}

/// A batch with more requests than one statement can carry — 70,000 journal rows bind 700,000
/// values, and one prepared statement binds at most 65,535 — answers as its single calls would:
/// every request applied once, in order, with its running balance, the repeated key answered
/// with its first entry, and the replay of the whole batch answered from the journal (its
/// 70,000 keys looked up) with nothing written. Before the INSERTs were split, the batch
/// answered an untyped server error ("Prepared statement contains too many placeholders")
/// from 6,554 rows on.
#[test]
fn a_batch_larger_than_one_statement_answers_as_its_single_calls() {
    const N: usize = 70_000;
    // Loads the server for a few seconds: alone, so that no timing or fault test runs beside it.
    let _exclusive = lockstock_testkit::fixtures::exclusive();
    let (_url, mut conn) = fresh_database("ledger_huge_batch");
    let ledger = BalanceLedger::with_policy(lockstock_testkit::fixtures::policy_with_deadline(
        Duration::from_secs(120),
    ));
    // Charge 2, deduct 1, ...: never short; then op 0 once more (same key, same request).
    let mut ops: Vec<AccountOp> = (0..N)
        .map(|i| {
            let key = format!("big-{i}");
            if i % 2 == 0 {
                AccountOp::charge(dec(2, 0), key)
            } else {
                AccountOp::deduct(dec(1, 0), key)
            }
        })
        .collect();
    ops.push(AccountOp::charge(dec(2, 0), "big-0"));

    let answers: Vec<Entry> = ledger
        .apply_many(&mut conn, 1, &ops)
        .expect("the batch")
        .into_iter()
        .enumerate()
        .map(|(i, answer)| answer.unwrap_or_else(|e| panic!("request {i}: {e:?}")))
        .collect();
    let mut balance = Decimal::ZERO;
    for (i, entry) in answers.iter().take(N).enumerate() {
        balance += if i % 2 == 0 { dec(2, 0) } else { dec(-1, 0) };
        assert_eq!(entry.balance_after, balance, "request {i}");
        assert_eq!(
            entry.idempotency_key.as_deref(),
            Some(format!("big-{i}").as_str())
        );
    }
    assert_eq!(
        answers[N], answers[0],
        "the repeated key answers its first entry"
    );
    let ids: HashSet<i64> = answers.iter().map(|e| e.id).collect();
    assert_eq!(ids.len(), N, "one entry per request");

    // What the journal holds is what was answered.
    let stored: Vec<(i64, Decimal, Option<String>)> = balance_history::table
        .filter(balance_history::user_id.eq(1_i64))
        .order(balance_history::id.asc())
        .select((
            balance_history::id,
            balance_history::balance_after,
            balance_history::idempotency_key,
        ))
        .load(&mut conn)
        .expect("journal");
    let mut answered: Vec<(i64, Decimal, Option<String>)> = answers[..N]
        .iter()
        .map(|e| (e.id, e.balance_after, e.idempotency_key.clone()))
        .collect();
    answered.sort_by_key(|a| a.0);
    assert_eq!(stored, answered);
    assert_eq!(stored_balance(&mut conn, 1), balance);
    audit_ok(&ledger, &mut conn, 1);

    // The replay: every request answered from the journal, nothing written.
    let replayed: Vec<Entry> = ledger
        .apply_many(&mut conn, 1, &ops)
        .expect("the replay")
        .into_iter()
        .map(|answer| answer.expect("replayed"))
        .collect();
    assert_eq!(replayed, answers);
    assert_eq!(stored_balance(&mut conn, 1), balance);
    assert_eq!(
        balance_history::table
            .filter(balance_history::user_id.eq(1_i64))
            .count()
            .get_result::<i64>(&mut conn)
            .expect("journal size"),
        i64::try_from(N).expect("N")
    );
}

/// A write that holds an account never waits for another transaction's lock, so it never
/// closes a deadlock that the server would break by rolling back someone else's transaction.
///
/// Another program's transaction under SERIALIZABLE reads whether the account's journal has a
/// key (locking the gap that key would go into), and then asks for the account row. Meanwhile a
/// batch holds the account and writes its journal rows, the last of them under that key. Before
/// the fix the batch's INSERT waited for the gap lock while holding the account: a deadlock, and
/// InnoDB rolled back the other program's transaction (nothing written: the lighter one) as its
/// victim. Now the INSERT is refused at once, the batch rolls back and retries, the other
/// program gets the account and commits, and the batch then applies every request.
#[test]
fn a_write_holding_the_account_never_waits_for_another_transactions_lock() {
    const USER: i64 = 7;
    let (url, mut conn, setup) =
        ledger_with_account("ledger_no_wait_under_lock", USER, dec(1_000, 0));
    // Keys around the contested one, so that the other program's read locks a narrow gap and the
    // batch writes rows (it has rows to lose) before it reaches it.
    setup.charge(&mut conn, USER, dec(1, 0), "m1").expect("m1");
    setup.charge(&mut conn, USER, dec(1, 0), "m3").expect("m3");
    let ledger = Arc::new(BalanceLedger::with_policy(
        TxnPolicy::default().with_retry(retry_policy(100_000, Duration::from_secs(20))),
    ));
    let mut ops: Vec<AccountOp> = (1..30)
        .map(|i| AccountOp::Deduct {
            amount: dec(1, 0),
            key: format!("a{i:02}"),
        })
        .collect();
    ops.push(AccountOp::Deduct {
        amount: dec(1, 0),
        key: "m2".into(),
    });

    let mut foreign = other_program(&url);
    let used: i64 = balance_history::table
        .filter(balance_history::user_id.eq(USER))
        .filter(balance_history::idempotency_key.eq("m2"))
        .count()
        .get_result(&mut foreign)
        .expect("the other program's read");
    assert_eq!(used, 0);
    // The other program asks for the account once the batch's journal INSERT has met the gap
    // lock: refused (now), or waiting for it while the batch holds the account (before the
    // fix: the deadlock, certain).
    let mut batch_conn = connect(&url);
    let batch_id = lockstock_testkit::fixtures::connection_id(&mut batch_conn);
    let watched = crate::watch_first(&mut batch_conn, |sql| {
        sql.contains("INSERT INTO `balance_history`")
    });
    let batch = {
        let (ledger, ops) = (ledger.clone(), ops.clone());
        thread::spawn(move || ledger.apply_many(&mut batch_conn, USER, &ops))
    };
    crate::until_answered_or_waiting(&mut conn, batch_id, &watched);
    assert_not_sacrificed(&mut foreign, Duration::ZERO, |c| lock_balance(c, USER));

    let answers = batch.join().expect("batch").expect("the batch");
    for (op, answer) in ops.iter().zip(&answers) {
        assert!(answer.is_ok(), "{op:?}: {answer:?}");
    }
    assert_eq!(stored_balance(&mut conn, USER), dec(1_002 - 30, 0));
    assert_eq!(count_key(&mut conn, USER, "m2"), 1);
    audit_ok(&setup, &mut conn, USER);
}

/// A snapshot read cut off after the server had begun its result (here by the statement time
/// limit) is never executed again from the statement cache: the same call on the same
/// connection is cut off the same way (`StatementTimeout`), and the connection then serves a
/// call with more time. Before the fix the second call re-ran the cached statement, which
/// waited for the rest of the first result: it hung until the watchdog shut the connection
/// down at deadline + grace, answered `ServerUnresponsive` for a server that answered, and the
/// connection was lost.
#[test]
fn a_read_cut_off_mid_result_is_not_run_again_from_the_cache() {
    const USER: i64 = 9;
    const ENTRIES: i64 = 40_000;
    // Loads the server for a few seconds: alone.
    let _exclusive = lockstock_testkit::fixtures::exclusive();
    let (_url, mut conn, setup) = ledger_with_account("ledger_cut_off_read", USER, dec(1_000, 0));
    let ops: Vec<AccountOp> = (0..ENTRIES)
        .map(|i| AccountOp::Charge {
            amount: dec(1, 0),
            key: format!("c{i}"),
        })
        .collect();
    BalanceLedger::with_policy(
        TxnPolicy::default().with_retry(retry_policy(10, Duration::from_secs(120))),
    )
    .apply_many(&mut conn, USER, &ops)
    .expect("the journal");
    let mut hasty_policy = TxnPolicy::default();
    hasty_policy.statement_timeout = Duration::from_millis(1);
    let hasty = BalanceLedger::with_policy(
        hasty_policy
            .clone()
            .with_retry(retry_policy(1, Duration::from_secs(2))),
    );
    for round in 0..2 {
        let started = Instant::now();
        match hasty.audit(&mut conn, USER) {
            Err(e) if e.server_kind() == Some(ServerErrorKind::StatementTimeout) => {}
            other => panic!("round {round} after {:?}: {other:?}", started.elapsed()),
        }
    }
    let report = setup
        .audit(&mut conn, USER)
        .expect("the same connection, with time");
    assert_eq!(report.entries, ENTRIES as u64 + 1);

    // The same after a body that panics on its read cut off mid-result (an `expect` on the
    // error): the runner rolls back, drops the cached statements and lets the panic go on; the
    // caller who catches it and keeps the connection runs the same read again and is cut off
    // the same way. Before the fix the panic path kept the cache: the second read waited for
    // the rest of the first result until the watchdog cut it (`ServerUnresponsive` at deadline
    // + grace, the connection lost).
    let journal = |c: &mut MysqlConnection| {
        balance_history::table
            .filter(balance_history::user_id.eq(USER))
            .select((balance_history::id, balance_history::balance_after))
            .load::<(i64, Decimal)>(c)
    };
    let hasty_runner =
        lockstock::TxnRunner::new(hasty_policy.with_retry(retry_policy(1, Duration::from_secs(2))));
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        hasty_runner.run(&mut conn, |c| {
            Ok(journal(c).expect("a read cut off by its time limit").len())
        })
    }));
    assert!(
        panicked.is_err(),
        "the body's read was not cut off: {panicked:?}"
    );
    let started = Instant::now();
    match hasty_runner.run(&mut conn, |c| Ok(journal(c)?.len())) {
        Err(e) if e.server_kind() == Some(ServerErrorKind::StatementTimeout) => {}
        other => panic!("after the panic, {:?}: {other:?}", started.elapsed()),
    }
    let report = setup
        .audit(&mut conn, USER)
        .expect("the same connection, with time, after the panic");
    assert_eq!(report.entries, ENTRIES as u64 + 1);
}

/// The audit finds journal records changed behind the ledger's back even when every sum still
/// agrees: a deduct relabelled as a sent transfer (which a refund would then refuse), a hold's
/// expiry moved (freeing or prolonging its reservation), an idempotency key removed (a retry of
/// that deduct would apply twice), and a sent transfer whose receiving entry is gone. Each is
/// done to its own account; the untouched twin passes. Before the fix the audit passed all four.
#[test]
fn audit_detects_records_changed_behind_its_back() {
    use lockstock::schema::balance_hold;
    let (_url, mut conn) = fresh_database("ledger_audit_records");
    let ledger = BalanceLedger::new();
    let tampered =
        |conn: &mut MysqlConnection, user: i64, what: &str| match ledger.audit(conn, user) {
            Err(Error::AuditFailed(report)) => {
                assert!(!report.problems.is_empty(), "{what}");
                eprintln!("{what}: {:?}", report.problems);
            }
            other => panic!("{what}: expected AuditFailed, got {other:?}"),
        };
    // Five accounts with the same history: a charge, a deduct, a hold, a transfer to the last.
    let users = [71_i64, 72, 73, 74, 75];
    let receiver = 79;
    funded_account(&mut conn, &ledger, receiver, dec(1, 0));
    let mut deducts = Vec::new();
    let mut holds = Vec::new();
    let mut sent = Vec::new();
    for user in users {
        funded_account(&mut conn, &ledger, user, dec(100, 0));
        deducts.push(
            ledger
                .deduct(&mut conn, user, dec(10, 0), &format!("d{user}"))
                .expect("deduct")
                .id,
        );
        holds.push(
            ledger
                .hold(
                    &mut conn,
                    user,
                    dec(20, 0),
                    &format!("h{user}"),
                    chrono::Utc::now().naive_utc() + chrono::Duration::hours(1),
                )
                .expect("hold")
                .id,
        );
        sent.push(
            ledger
                .transfer(&mut conn, user, receiver, dec(5, 0), &format!("t{user}"))
                .expect("transfer"),
        );
    }
    for user in users {
        audit_ok(&ledger, &mut conn, user);
    }

    diesel::update(balance_history::table.find(deducts[0]))
        .set(balance_history::kind.eq("transfer_out"))
        .execute(&mut conn)
        .expect("relabel");
    tampered(
        &mut conn,
        users[0],
        "a deduct relabelled as a sent transfer",
    );

    diesel::update(balance_hold::table.find(holds[1]))
        .set(
            balance_hold::expires_at
                .eq(chrono::Utc::now().naive_utc() + chrono::Duration::days(30)),
        )
        .execute(&mut conn)
        .expect("move the expiry");
    tampered(&mut conn, users[1], "a hold's expiry moved");

    diesel::update(balance_history::table.find(deducts[2]))
        .set(balance_history::idempotency_key.eq(None::<String>))
        .execute(&mut conn)
        .expect("drop the key");
    tampered(&mut conn, users[2], "a deduct's key removed");

    // The receiving entry of user 74's transfer, moved onto user 73's (two receiving entries
    // for one sent, none for the other).
    let received = sent[3].credit.id;
    diesel::update(balance_history::table.find(received))
        .set(balance_history::related_entry_id.eq(sent[2].debit.id))
        .execute(&mut conn)
        .expect("unlink");
    tampered(
        &mut conn,
        users[3],
        "a sent transfer without its receiving entry",
    );

    // The untouched account passes.
    audit_ok(&ledger, &mut conn, users[4]);
}

/// A first charge (or a batch with one, or a transfer to a new receiver) that fails leaves no
/// account behind: the account is created in the call's own transaction. Here another
/// program's SERIALIZABLE read of the journal key keeps the call's journal INSERT from going
/// in until the deadline (`Contended`, nothing applied). Before the fix the account was created
/// first in a transaction of its own and stayed: `balance` then answered a zero balance for an
/// account that no successful call had made, and a deduct `InsufficientBalance` instead of
/// `AccountNotFound`.
#[test]
fn a_failed_first_charge_leaves_no_account() {
    let (url, mut conn) = fresh_database("ledger_failed_first_charge");
    let ledger = BalanceLedger::with_policy(lockstock_testkit::fixtures::policy_with_deadline(
        Duration::from_millis(500),
    ));
    let (sender, new_user, batch_user, receiver) = (1_i64, 2_i64, 3_i64, 4_i64);
    funded_account(&mut conn, &ledger, sender, dec(100, 0));
    let accounts = |conn: &mut MysqlConnection| -> Vec<i64> {
        user_balance::table
            .select(user_balance::user_id)
            .order(user_balance::user_id.asc())
            .load(conn)
            .expect("accounts")
    };
    // Another program reads (under SERIALIZABLE) whether each call's key is in the journal.
    let mut foreign = other_program(&url);
    for (user, key) in [(new_user, "k"), (batch_user, "b"), (sender, "t")] {
        let used: i64 = balance_history::table
            .filter(balance_history::user_id.eq(user))
            .filter(balance_history::idempotency_key.eq(key))
            .count()
            .get_result(&mut foreign)
            .expect("the other program's read");
        assert_eq!(used, 0);
    }
    let refused = |what: &str, answer: Result<(), Error>| {
        assert!(
            matches!(answer, Err(Error::Contended { .. } | Error::Timeout { .. })),
            "{what}: {answer:?}"
        );
    };
    refused(
        "a first charge",
        ledger
            .charge(&mut conn, new_user, dec(10, 0), "k")
            .map(|_| ()),
    );
    refused(
        "a batch with a first charge",
        ledger
            .apply_many(&mut conn, batch_user, &[AccountOp::charge(dec(10, 0), "b")])
            .map(|_| ()),
    );
    refused(
        "a transfer to a new receiver",
        ledger
            .transfer(&mut conn, sender, receiver, dec(10, 0), "t")
            .map(|_| ()),
    );
    diesel::connection::SimpleConnection::batch_execute(&mut foreign, "ROLLBACK").expect("release");
    assert_eq!(accounts(&mut conn), [sender], "no account was left behind");
    for user in [new_user, batch_user, receiver] {
        assert!(
            matches!(
                ledger.balance(&mut conn, user),
                Err(Error::AccountNotFound { .. })
            ),
            "user {user}"
        );
        assert!(matches!(
            ledger.deduct(&mut conn, user, dec(1, 0), "d"),
            Err(Error::AccountNotFound { .. })
        ));
    }
    // The same calls succeed now, once each.
    ledger
        .charge(&mut conn, new_user, dec(10, 0), "k")
        .expect("the first charge");
    ledger
        .apply_many(&mut conn, batch_user, &[AccountOp::charge(dec(10, 0), "b")])
        .expect("the batch")[0]
        .as_ref()
        .expect("its charge");
    ledger
        .transfer(&mut conn, sender, receiver, dec(10, 0), "t")
        .expect("the transfer");
    assert_eq!(
        accounts(&mut conn),
        [sender, new_user, batch_user, receiver]
    );
    for user in [sender, new_user, batch_user, receiver] {
        audit_ok(&ledger, &mut conn, user);
    }
}

/// First charges of many new accounts at once — their ids in one gap of the index, as new ids
/// are — all succeed, each creating its account once. The attempt that creates an account
/// writes it before any lock read of its key; the attempt before it (which finds the account
/// missing) still takes the gap's lock for a moment, so creators are refused now and then and
/// retried — never more than the retries can absorb here.
#[test]
fn racing_first_charges_of_new_accounts_all_succeed() {
    // Heavy: never beside a test that asserts time bounds.
    let _storm = lockstock_testkit::fixtures::storm();
    const THREADS: i64 = 16;
    const EACH: i64 = 25;
    let (url, mut conn) = fresh_database("ledger_racing_sign_ups");
    let ledger = BalanceLedger::new();
    funded_account(&mut conn, &ledger, 1, dec(1, 0));
    funded_account(&mut conn, &ledger, 1_000_000, dec(1, 0));
    let threads = usize::try_from(THREADS).expect("threads");
    let answers: Vec<Result<(), String>> = concurrently(threads, &url, |thread, conn| {
        let thread = i64::try_from(thread).expect("thread");
        (0..EACH)
            .map(|n| {
                // Interleaved ids: every thread's next account falls between the others'.
                let user = 2 + n * THREADS + thread;
                ledger
                    .charge(conn, user, dec(5, 0), "sign-up")
                    .map(|_| ())
                    .map_err(|e| format!("user {user}: {e:?}"))
            })
            .collect::<Vec<_>>()
    })
    .into_iter()
    .flatten()
    .collect();
    let failed: Vec<&String> = answers.iter().filter_map(|a| a.as_ref().err()).collect();
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
    let accounts: i64 = user_balance::table
        .count()
        .get_result(&mut conn)
        .expect("accounts");
    assert_eq!(accounts, 2 + THREADS * EACH);
    for user in [2, 2 + THREADS * EACH - 1] {
        assert_eq!(stored_balance(&mut conn, user), dec(5, 0));
        audit_ok(&ledger, &mut conn, user);
    }
}

/// A batch on an account that did not exist when it began answers a deduct after a charge as
/// the single calls would once that charge was committed meanwhile by another call under the
/// same key: the charge is answered from the journal, and its entry shows the account exists,
/// so the deduct after it is decided against the balance. Before the fix the batch still took
/// the account for missing (as when it first locked it) and answered the deduct
/// `AccountNotFound` — an answer no order of single calls gives after that charge.
#[test]
fn a_batch_sees_an_account_a_replayed_charge_created() {
    use diesel::connection::{Connection, InstrumentationEvent};
    const USER: i64 = 42;
    let (url, mut conn) = fresh_database("ledger_batch_replayed_creation");
    let ledger = BalanceLedger::new();
    let mut batch_conn = connect(&url);
    // Just before the batch writes the missing account, another call makes the same charge
    // (the caller's retry, say) and commits it with the account.
    let (other_url, other_ledger) = (url.clone(), ledger.clone());
    // The other call's entry, once it was made (the interleaving happened).
    let other_entry = std::sync::Arc::new(std::sync::Mutex::new(None));
    let made = other_entry.clone();
    batch_conn.set_instrumentation(move |event: InstrumentationEvent<'_>| {
        if let InstrumentationEvent::StartQuery { query, .. } = event {
            let mut made = made
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if made.is_none()
                && query
                    .to_string()
                    .contains("INSERT IGNORE INTO `user_balance`")
            {
                let entry = other_ledger
                    .charge(&mut connect(&other_url), USER, dec(10, 0), "k2")
                    .expect("the other call's charge");
                *made = Some(entry.id);
            }
        }
    });
    let ops = [
        AccountOp::charge(dec(10, 0), "k2"),
        AccountOp::deduct(dec(5, 0), "k3"),
    ];
    let answers = ledger
        .apply_many(&mut batch_conn, USER, &ops)
        .expect("the batch");
    let other = *other_entry
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let other = other.expect("the other call's charge was made before the batch wrote the account");
    match &answers[..] {
        [Ok(charge), Ok(deduct)] => {
            assert_eq!(charge.kind, EntryKind::Charge);
            assert_eq!(charge.id, other, "the charge answered from the journal");
            assert_eq!(deduct.balance_after, dec(5, 0));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(stored_balance(&mut conn, USER), dec(5, 0));
    assert_eq!(count_key(&mut conn, USER, "k2"), 1);
    audit_ok(&ledger, &mut conn, USER);
}

/// A batch numbers its journal rows from `LAST_INSERT_ID()` by the step of the session it runs
/// on: a caller's session may set its own `auto_increment_increment`. Before the fix the
/// runner kept the step of the first session it met, so a batch on a session stepping by 3
/// answered ids of other rows (and its hold rows pointed at them).
#[test]
fn a_batch_answers_its_rows_ids_on_a_session_with_its_own_id_step() {
    use diesel::connection::SimpleConnection;
    let (url, mut conn) = fresh_database("ledger_id_step");
    let ledger = BalanceLedger::new();
    let two = |key: &str| {
        [
            AccountOp::charge(dec(5, 0), format!("{key}-1")),
            AccountOp::charge(dec(6, 0), format!("{key}-2")),
        ]
    };
    // The runner first meets a session numbering 1, 2, 3, ...
    for result in ledger
        .apply_many(&mut conn, 1, &two("plain"))
        .expect("batch")
    {
        result.expect("charge");
    }
    let mut stepped = connect(&url);
    stepped
        .batch_execute("SET SESSION auto_increment_increment = 3")
        .expect("the caller's own step");
    let expires_at = chrono::Utc::now().naive_utc() + chrono::Duration::hours(1);
    let mut ops = two("stepped").to_vec();
    ops.push(AccountOp::hold(dec(2, 0), "stepped-hold", expires_at));
    ops.push(AccountOp::deduct(dec(1, 0), "stepped-3"));
    let answers = ledger.apply_many(&mut stepped, 2, &ops).expect("batch");
    for (op, answer) in ops.iter().zip(answers) {
        let entry = answer.expect("applied");
        let stored: (i64, Option<String>) = balance_history::table
            .find(entry.id)
            .select((balance_history::user_id, balance_history::idempotency_key))
            .first(&mut conn)
            .expect("the answered entry is stored");
        assert_eq!(stored, (2, entry.idempotency_key.clone()), "{op:?}");
    }
    audit_ok(&ledger, &mut conn, 1);
    audit_ok(&ledger, &mut conn, 2);
}

/// Amounts are answered as the `DECIMAL(19,4)` columns store them, whatever scale the caller
/// wrote them with: an entry reads the same written, replayed, batched or read back (`10`,
/// `10.0`, `10.00000` are all `10.0000`), and so do the balances computed from it. Before, a
/// fresh entry carried the caller's `10` and its replay the stored `10.0000` (equal by value,
/// different as text and in serde).
#[test]
fn answers_carry_the_stored_scale_written_replayed_or_batched() {
    let (_url, mut conn) = fresh_database("ledger_stored_scale");
    let ledger = BalanceLedger::new();
    let text = |entry: &Entry| {
        format!(
            "{} {} {}",
            entry.amount, entry.balance_after, entry.refunded_amount
        )
    };
    let charged = ledger
        .charge(&mut conn, 1, dec(100, 0), "c")
        .expect("charge");
    assert_eq!(text(&charged), "100.0000 100.0000 0.0000");
    let deducted = ledger
        .deduct(&mut conn, 1, dec(1_000_000, 5), "d")
        .expect("deduct 10.00000");
    assert_eq!(text(&deducted), "10.0000 90.0000 0.0000");
    let replayed = ledger
        .deduct(&mut conn, 1, dec(10, 0), "d")
        .expect("the same deduct, replayed");
    assert_eq!(text(&replayed), text(&deducted));
    let refund = ledger
        .refund(&mut conn, deducted.id, dec(5, 1), "r")
        .expect("refund 0.5");
    assert_eq!(text(&refund), "0.5000 90.5000 0.0000");
    let batch = ledger
        .apply_many(
            &mut conn,
            1,
            &[
                AccountOp::deduct(dec(1, 0), "b"),
                AccountOp::deduct(dec(10, 1), "b"),
                AccountOp::charge(dec(200, 2), "b2"),
            ],
        )
        .expect("batch");
    let texts: Vec<String> = batch
        .iter()
        .map(|answer| answer.as_ref().map(text).expect("applied"))
        .collect();
    assert_eq!(
        texts,
        [
            "1.0000 89.5000 0.0000",
            "1.0000 89.5000 0.0000",
            "2.0000 91.5000 0.0000"
        ]
    );
    match ledger.deduct(&mut conn, 1, dec(100, 0), "too much") {
        Err(Error::InsufficientBalance {
            available,
            requested,
            ..
        }) => assert_eq!(
            (available.to_string(), requested.to_string()),
            ("91.5000".to_owned(), "100.0000".to_owned())
        ),
        other => panic!("expected InsufficientBalance, got {other:?}"),
    }
    let transfer = ledger
        .transfer(&mut conn, 1, 2, dec(15, 1), "t")
        .expect("transfer 1.5");
    assert_eq!(text(&transfer.debit), "1.5000 90.0000 0.0000");
    assert_eq!(text(&transfer.credit), "1.5000 1.5000 0.0000");
    ledger.audit(&mut conn, 1).expect("audit");
}

/// A sent transfer credited twice in the RECEIVER's journal (a second receiving entry linked to
/// the same sending entry, with the balance raised to match) is found by the receiver's own
/// audit, not only by the sender's.
#[test]
fn audit_of_the_receiver_detects_a_transfer_credited_twice() {
    use diesel::connection::SimpleConnection;
    let (_url, mut conn) = fresh_database("ledger_audit_double_credit");
    let ledger = BalanceLedger::new();
    let (sender, receiver) = (81_i64, 82_i64);
    funded_account(&mut conn, &ledger, sender, dec(100, 0));
    funded_account(&mut conn, &ledger, receiver, dec(1, 0));
    let sent = ledger
        .transfer(&mut conn, sender, receiver, dec(10, 0), "t1")
        .expect("transfer");
    audit_ok(&ledger, &mut conn, sender);
    audit_ok(&ledger, &mut conn, receiver);
    // The copy: the same link, hash and counterparty, the running sum and balance kept right.
    conn.batch_execute(&format!(
        "INSERT INTO balance_history (user_id, kind, amount, balance_after, idempotency_key, \
         request_hash, related_entry_id, counterparty_user_id) \
         SELECT user_id, kind, amount, balance_after + amount, idempotency_key, request_hash, \
         related_entry_id, counterparty_user_id FROM balance_history WHERE id = {}; \
         UPDATE user_balance SET balance = balance + 10, version = version + 1 \
         WHERE user_id = {receiver}",
        sent.credit.id
    ))
    .expect("credit the transfer twice");
    // Before: the receiver's audit found nothing wrong.
    match ledger.audit(&mut conn, receiver) {
        Err(Error::AuditFailed(report)) => assert!(
            report
                .problems
                .iter()
                .any(|p| p.contains("received transfer")),
            "{:?}",
            report.problems
        ),
        other => panic!("expected AuditFailed, got {other:?}"),
    }
    assert!(matches!(
        ledger.audit(&mut conn, sender),
        Err(Error::AuditFailed(_))
    ));
}

/// An account row whose `version` was edited to the largest BIGINT (by hand, a restore, another
/// program) cannot count one more journal entry: a change to it answers a typed error and
/// changes nothing — single call and batch alike. Before, adding to the version overflowed: a
/// panic in a debug build, and in a release build a wrapped negative version committed.
#[test]
fn an_account_whose_version_cannot_count_more_entries_changes_nothing() {
    let user = 91;
    let (_url, mut conn, ledger) = ledger_with_account("ledger_version_full", user, dec(100, 0));
    diesel::update(user_balance::table.find(user))
        .set(user_balance::version.eq(i64::MAX))
        .execute(&mut conn)
        .expect("the version at its largest");
    let before = snapshot(&mut conn);
    let single = ledger.charge(&mut conn, user, dec(1, 0), "one more");
    assert!(matches!(single, Err(Error::Internal { .. })), "{single:?}");
    let deduct = |key: &str| AccountOp::Deduct {
        amount: dec(1, 0),
        key: key.to_owned(),
    };
    // The batch's transaction fails as a whole (as for a lost connection): nothing of it.
    let batch = ledger.apply_many(&mut conn, user, &[deduct("a"), deduct("b")]);
    assert!(matches!(batch, Err(Error::Internal { .. })), "{batch:?}");
    assert_eq!(snapshot(&mut conn), before, "nothing changed");
}

/// An entry of a kind, or a hold in a state, that lockstock never writes (rows edited with
/// the CHECK constraints off) is reported by the audit as an inconsistency of the account
/// (`AuditFailed`), as every other tampering is. Before, the audit failed to read them: a
/// `Server` error (a deserialization error) and no report — a job that retries server errors
/// never flagged the account.
#[test]
fn audit_reports_entries_and_holds_it_does_not_know() {
    use diesel::connection::SimpleConnection;
    use lockstock::schema::balance_hold;
    let (_url, mut conn) = fresh_database("ledger_audit_unknown");
    let ledger = BalanceLedger::new();
    let (relabelled, restated) = (81_i64, 82_i64);
    let mut deducts = Vec::new();
    for user in [relabelled, restated] {
        funded_account(&mut conn, &ledger, user, dec(100, 0));
        deducts.push(
            ledger
                .deduct(&mut conn, user, dec(10, 0), "d")
                .expect("deduct")
                .id,
        );
        ledger
            .hold(
                &mut conn,
                user,
                dec(20, 0),
                "h",
                chrono::Utc::now().naive_utc() + chrono::Duration::hours(1),
            )
            .expect("hold");
        audit_ok(&ledger, &mut conn, user);
    }
    conn.batch_execute("SET SESSION check_constraint_checks = 0")
        .expect("checks off");
    let first_deduct = deducts[0];
    diesel::update(balance_history::table.find(first_deduct))
        .set(balance_history::kind.eq("bogus"))
        .execute(&mut conn)
        .expect("relabel");
    diesel::update(balance_hold::table.filter(balance_hold::user_id.eq(restated)))
        .set(balance_hold::state.eq("void"))
        .execute(&mut conn)
        .expect("restate");
    conn.batch_execute("SET SESSION check_constraint_checks = 1")
        .expect("checks on");
    for (user, what) in [
        (
            relabelled,
            format!("entry {first_deduct} is of an unknown kind"),
        ),
        (restated, "is in an unknown state".to_owned()),
    ] {
        match ledger.audit(&mut conn, user) {
            Err(Error::AuditFailed(report)) => assert!(
                report.problems.iter().any(|p| p.contains(&what)),
                "{what}: {:?}",
                report.problems
            ),
            other => panic!("{what}: expected AuditFailed, got {other:?}"),
        }
    }
}
