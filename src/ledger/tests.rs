//! Unit tests of the ledger's batch path against a real server (the testkit's sandbox).

use std::cell::Cell;

use diesel::connection::SimpleConnection;
use diesel::MysqlConnection;
use rust_decimal::Decimal;

use super::{AccountOp, BalanceLedger};

std::thread_local! {
    /// The next attempt on this thread that finds its account missing kills its own
    /// connection before the runner ends it.
    static KILL_AFTER_MISSING: Cell<bool> = const { Cell::new(false) };
}

/// The pause point in `batch_round` right after an attempt found its account missing.
pub(super) fn after_account_missing(conn: &mut MysqlConnection) {
    if KILL_AFTER_MISSING.with(|kill| kill.replace(false)) {
        // The server ends the session: the runner's ROLLBACK meets a lost connection.
        let _ = conn.batch_execute("KILL CONNECTION_ID()");
    }
}

#[test]
fn a_batch_whose_connection_breaks_after_finding_no_account_answers_the_failure() {
    let (_, mut conn) = crate::util::test_database("unit_ledger_missing_broken");
    let ledger = BalanceLedger::new();
    let deduct = |key: &str| AccountOp::Deduct {
        amount: Decimal::ONE,
        key: key.to_owned(),
    };
    KILL_AFTER_MISSING.with(|kill| kill.set(true));
    let answer = ledger.apply_many(&mut conn, 4242, &[deduct("a"), deduct("b")]);
    // Nothing was committed, and the connection failed: the batch's failure (a Router runs
    // it again), as each single deduct answers it. Before: the failed ROLLBACK was taken for
    // the missing account's marker, and the key lookups on the broken connection answered
    // every request OutcomeUnknown.
    assert!(
        matches!(&answer, Err(e) if e.is_node_failure()),
        "{answer:?}"
    );
}
