//! Holds (reserve, capture, release, expire) against a real server. Every invariant is read back
//! from the database: the `balance_hold` rows, the journal's ending entries, the balances, and
//! `audit` (available = posted − active unexpired holds, every hold ended exactly once).

use std::collections::HashMap;

use chrono::{Duration, NaiveDateTime};
use diesel::prelude::*;

use lockstock::schema::{balance_history, balance_hold, user_balance};
use lockstock::{BalanceLedger, EntryKind, Error, HoldState};
use rust_decimal::Decimal;

use lockstock_testkit::fixtures::{fresh_database, funded_account, now};

fn dec(units: i64) -> Decimal {
    Decimal::new(units, 0)
}

/// An expiry `seconds` ahead of the client clock.
fn in_secs(seconds: i64) -> NaiveDateTime {
    now() + Duration::seconds(seconds)
}

/// One `balance_hold` row: (id, user, amount, captured, state, ended_by_entry_id).
type HoldRow = (i64, i64, Decimal, Decimal, String, Option<i64>);

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
fn every_hold_ended_once(conn: &mut MysqlConnection) -> HashMap<String, usize> {
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
