//! A hot row handed from one in-process batch to the next at COMMIT.
//!
//! InnoDB releases a transaction's row locks when it commits in memory, before its redo log is
//! flushed and the COMMIT answered. A combiner's batch therefore hands its key's turn on just
//! before it sends COMMIT ([`Handoff::before_commit`]): the next batch of the key locks the hot
//! row while the one before it is still waiting for its flush, and the two flushes can share
//! one (group commit). The next batch's `FOR UPDATE NOWAIT` may reach the server before the
//! COMMIT did: that refusal is the in-process predecessor's, not contention, so the locking
//! read is sent again at once ([`locking_read`]) — only the statement was rolled back — for as
//! long as a predecessor of the key was committing when it was sent, within the budget a wait
//! for another process's batch has: a COMMIT that the server holds back (a backup's `BACKUP
//! STAGE BLOCK_COMMIT`, `FLUSH TABLES WITH READ LOCK`) keeps the row locked for as long, and
//! the refusal then goes to the runner like any other. A refusal with no
//! predecessor committing is another process's batch (or any other transaction) holding the
//! row: a transaction that holds nothing yet waits for it in the server for a few milliseconds
//! at most, one that holds rows polls it — unless the row is a leaf of lockstock's wait-for
//! graph and the caller chose to wait for it ([`Holding::LocksBeforeALeaf`]) — (see
//! [`locking_read`]); if the row stays taken, the refusal goes to the runner as always
//! (rollback, backoff, retry).
//!
//! All of this assumes that a refusal rolls back only the refused statement, as InnoDB does by
//! default. A server started with `innodb_rollback_on_timeout` rolls the whole transaction back
//! on a lock wait timeout — on MariaDB a NOWAIT refusal too, which is one there (MySQL 8's
//! 3572 rolls back the statement only): the read would be sent again outside any transaction,
//! and the batch's writes after it too, so the first refusal always goes to the runner, which
//! begins anew. The runner asks the server once, as it first begins; on MariaDB a batch also
//! asks after its locking read's first refusal whether its transaction is still open
//! (`@@in_transaction`: one round trip per refused read), since the runner may meet another
//! server than the one it asked, or a server restarted with the option.
//!
//! The handoff is installed for the calling thread by the combiner around a batch
//! ([`with_handoff`]); elsewhere nothing of this runs.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant};

use diesel::mysql::MysqlConnection;
use diesel::QueryResult;

use super::ServerFlavor;
use crate::error::{classify_kind, ServerErrorKind};
use crate::statements::LockingRead;

/// What a combiner's batch does around its COMMIT, and what its locking reads ask.
pub(crate) trait Handoff {
    /// Right before the COMMIT of any write is sent (Galera-guarded ones included): from then
    /// on the batch's work may be committed.
    fn commit_sent(&self);
    /// A COMMIT told to [`commit_sent`](Self::commit_sent) was refused for certain (a
    /// certification conflict, a server turned `read_only`): nothing of that transaction was
    /// committed.
    fn commit_refused(&self);
    /// Right before the COMMIT of a write (not a Galera-guarded one) is sent.
    fn before_commit(&self);
    /// Once that COMMIT answered or failed.
    fn after_commit(&self);
    /// Whether a batch of the same key before this one is still committing (it may still hold
    /// the hot row for the few microseconds until its COMMIT reaches the server).
    fn predecessor_committing(&self) -> bool;
    /// How long, from its first refusal, the locking read may wait for a row held by another
    /// process (see [`locking_read`]); below a millisecond: not at all.
    fn wait_budget(&self) -> Duration;
    /// The locking read met a refusal that was not the in-process predecessor's.
    fn refused(&self);
}

/// The first pause between two polls of a row held elsewhere (MySQL).
const POLL_FIRST: Duration = Duration::from_micros(50);
/// The longest pause between two polls.
const POLL_MAX: Duration = Duration::from_micros(150);

std::thread_local! {
    /// The handoffs of the batches the calling thread runs, innermost last: a batch's
    /// `run_batch` may make combined calls that lead batches of their own on this thread.
    static HANDOFF: RefCell<Vec<Rc<dyn Handoff>>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with `handoff` installed for the calling thread (removed afterwards, also when `f`
/// panics).
pub(crate) fn with_handoff<T>(handoff: Rc<dyn Handoff>, f: impl FnOnce() -> T) -> T {
    struct Uninstall;
    impl Drop for Uninstall {
        fn drop(&mut self) {
            HANDOFF.with(|h| h.borrow_mut().pop());
        }
    }
    HANDOFF.with(|h| h.borrow_mut().push(handoff));
    let _uninstall = Uninstall;
    f()
}

/// The innermost batch's handoff: its turn, its hot-row reads.
fn installed() -> Option<Rc<dyn Handoff>> {
    HANDOFF.with(|h| h.borrow().last().cloned())
}

/// Tells the installed handoffs (if any) that the COMMIT of a write is about to be sent: every
/// batch the thread runs, the ones a nested batch runs inside too (their work may be committed
/// from then on).
pub(super) fn commit_sent() {
    // (`commit_sent` only notes it: nothing installs or removes a handoff meanwhile.)
    HANDOFF.with(|h| {
        for handoff in h.borrow().iter() {
            handoff.commit_sent();
        }
    });
}

/// Tells the installed handoffs (if any) that the COMMIT [`commit_sent`] told them of was
/// refused for certain: every batch the thread runs, as for `commit_sent`.
pub(super) fn commit_refused() {
    HANDOFF.with(|h| {
        for handoff in h.borrow().iter() {
            handoff.commit_refused();
        }
    });
}

/// Tells the installed handoff (if any) that a COMMIT is about to be sent.
pub(super) fn before_commit() {
    if let Some(handoff) = installed() {
        handoff.before_commit();
    }
}

/// Tells the installed handoff (if any) that the COMMIT answered or failed.
pub(super) fn after_commit() {
    if let Some(handoff) = installed() {
        handoff.after_commit();
    }
}

/// What the transaction holds when it sends its hot row's locking read: a transaction that
/// holds nothing may wait for the row — it cannot be part of a deadlock, where one that holds
/// rows (rows it inserted included) and waits could close a cycle with the row's holder. One
/// that holds rows waits only for a row no lockstock transaction waits while holding, and only
/// where the caller chose it ([`Holding::LocksBeforeALeaf`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Holding {
    /// The read is the transaction's first locking statement.
    Nothing,
    /// The transaction has locked or written rows before.
    Locks,
    /// The transaction has locked or written rows before, and the row it locks is a leaf of the
    /// wait-for graph of lockstock's transactions: none that holds it ever waits for a lock (a
    /// campaign's stock row, between whose lock and COMMIT only wait-free statements run:
    /// [`write_under_lock`](crate::statements::write_under_lock)). Waiting for it cannot close
    /// a deadlock among lockstock's transactions — every cycle needs the row's holder to wait
    /// — but another program's transaction that holds the row and then waits for one of this
    /// transaction's rows can close one. Only for a caller that chose it
    /// ([`StockRowWait::InServer`](crate::StockRowWait::InServer)).
    LocksBeforeALeaf,
}

/// How the hot row's locking read is sent ([`locking_read`] chooses; [`Lock::read`] builds it).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Lock {
    /// `... FOR UPDATE NOWAIT`.
    NoWait,
    /// `SET STATEMENT max_statement_time = <limit> FOR ... FOR UPDATE`: the read waits for its
    /// row in the server, for at most the limit.
    Wait(Wait),
}

impl Lock {
    /// `query`, a `... FOR UPDATE` of the hot row through its primary key, sent this way.
    pub(crate) fn read<Q>(self, query: Q) -> LockingRead<Q> {
        let (prefix, suffix) = match self {
            Lock::NoWait => ("", " NOWAIT"),
            Lock::Wait(wait) => (wait.limit, ""),
        };
        LockingRead {
            prefix,
            query,
            suffix,
        }
    }
}

/// A bounded server-side wait for a row: one of a few constant time limits, so that each
/// locking read and limit is one cached prepared statement.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Wait {
    limit: &'static str,
}

/// The time limits a locking read may wait for its row, longest first.
const WAITS: [(Duration, &str); 3] = [
    (
        Duration::from_millis(8),
        "SET STATEMENT max_statement_time = 0.008 FOR ",
    ),
    (
        Duration::from_millis(3),
        "SET STATEMENT max_statement_time = 0.003 FOR ",
    ),
    (
        Duration::from_millis(1),
        "SET STATEMENT max_statement_time = 0.001 FOR ",
    ),
];

impl Wait {
    /// The longest wait within `budget`; `None` below a millisecond.
    fn within(budget: Duration) -> Option<Self> {
        WAITS
            .iter()
            .find(|(limit, _)| *limit <= budget)
            .map(|(_, limit)| Self { limit })
    }
}

std::thread_local! {
    /// Whether the server of the calling thread's current transaction bounds one statement's
    /// time (MariaDB's `SET STATEMENT max_statement_time = ... FOR`), set as the runner begins.
    static BOUNDED_WAITS: Cell<bool> = const { Cell::new(false) };
    /// Whether a refused locking read may be sent again in the same transaction: only the
    /// statement was rolled back. Not on a server with `innodb_rollback_on_timeout`, which
    /// rolls the whole transaction back — a read sent again would run outside it, and so
    /// would the batch's writes after it.
    static RETRY_IN_PLACE: Cell<bool> = const { Cell::new(false) };
}

/// Notes, as a transaction begins on `flavor`, whether its locking reads can wait in the server
/// for a bounded time, and whether a refusal leaves the transaction open (`whole_rollback`:
/// the server rolls it back whole).
pub(super) fn note_server(flavor: ServerFlavor, whole_rollback: bool) {
    BOUNDED_WAITS.with(|w| w.set(flavor == ServerFlavor::MariaDb));
    RETRY_IN_PLACE.with(|r| r.set(!whole_rollback));
}

/// Whether the server of the calling thread's current transaction bounds one statement's lock
/// wait (MariaDB's `SET STATEMENT ... FOR`; see [`WaitFree`](crate::statements::WaitFree)).
pub(crate) fn bounded_waits() -> bool {
    BOUNDED_WAITS.with(Cell::get)
}

/// Runs the hot row's locking read `read` (built with [`Lock::read`]), first as `FOR UPDATE
/// NOWAIT` ([`Lock::NoWait`]).
/// Outside a combiner's batch, once. In a batch, a refusal is answered — only the statement was
/// rolled back, the transaction goes on:
/// - while the refusal can be the in-process predecessor's COMMIT not having reached the server
///   yet (see the module docs), by sending the NOWAIT read again at once — until the handoff's
///   [`wait_budget`](Handoff::wait_budget) from the first refusal is spent (a COMMIT the server
///   holds back keeps the row locked meanwhile);
/// - otherwise (another process's batch, or any other transaction, holds the row), if the
///   transaction holds nothing yet ([`Holding::Nothing`]: a ledger batch) — or waits only for
///   a row no lockstock transaction waits while holding, as its caller chose
///   ([`Holding::LocksBeforeALeaf`]: a coupon batch of an issuer with
///   [`StockRowWait::InServer`](crate::StockRowWait::InServer)) — and the server is
///   MariaDB, by waiting for the row IN THE SERVER, once, for at most the handoff's
///   [`wait_budget`](Handoff::wait_budget) — what is left of it where the read was sent again
///   for the predecessor first — rounded down to 8, 3 or 1 ms ([`Lock::Wait`]; under a
///   millisecond, not at all): the
///   server hands the row over the moment its holder commits, where polling found it free only
///   at its next try and loaded the server with refusals meanwhile. A batch holds the row for
///   well under a millisecond, and a whole-transaction retry (ROLLBACK, backoff, the
///   transaction again) would leave the row idle for longer than that. The batch's leader is
///   the only waiter its process sends for the key, so at most one waiter per process queues
///   on the row, and the wait is bounded by the statement time limit, not by
///   `innodb_lock_wait_timeout`. A transaction that waits holding no lock can never close a
///   deadlock cycle: NOWAIT's promise. One that waits holding its coupons for a stock row can
///   close none with lockstock's transactions (the row's holders never wait), only with
///   another program's that locks the stock row and then a coupon row or gap it holds — the
///   trade its caller chose. A transaction that holds rows already and did not choose so (a
///   coupon batch has inserted its coupons; [`Holding::Locks`]), and any on MySQL, which has
///   no such bound, polls the NOWAIT read instead (a pause from 50 µs doubling to 150 µs)
///   within the same budget.
///
/// When the wait (or the polling) ends without the row, the first refusal goes to the runner,
/// which rolls back and retries as always. Any other answer — the row, another error — is
/// returned as it is.
pub(crate) fn locking_read<T>(
    conn: &mut MysqlConnection,
    holding: Holding,
    read: impl FnMut(&mut MysqlConnection, Lock) -> QueryResult<T>,
) -> QueryResult<T> {
    let answer = lock_or_wait(conn, holding, read);
    if let Err(e) = &answer {
        if is_refusal(e) || is_time_limit(e) {
            // A primary-key read: refused before the server began its result.
            super::note_clean_failure();
        }
    }
    answer
}

fn lock_or_wait<T>(
    conn: &mut MysqlConnection,
    holding: Holding,
    mut read: impl FnMut(&mut MysqlConnection, Lock) -> QueryResult<T>,
) -> QueryResult<T> {
    let Some(handoff) = installed() else {
        return read(conn, Lock::NoWait);
    };
    if !RETRY_IN_PLACE.with(Cell::get) {
        // A refusal ended the whole transaction: it goes to the runner, which begins anew.
        return read(conn, Lock::NoWait);
    }
    let mut first_refusal: Option<(Instant, Duration)> = None;
    // Whether the read was sent again for the in-process predecessor: that time is spent of
    // the budget (not the few microseconds between a first refusal and the server wait).
    let mut resent = false;
    let mut pause = POLL_FIRST;
    loop {
        let predecessor = handoff.predecessor_committing();
        match read(conn, Lock::NoWait) {
            Err(e) if is_refusal(&e) => {
                // The first refusal on MariaDB: is the transaction still open? A server that
                // rolls whole transactions back on a refusal (`innodb_rollback_on_timeout`)
                // may be one this runner has not asked (another server than the one it met
                // first, or restarted with the option): then the refusal goes to the runner.
                if first_refusal.is_none() && bounded_waits() && !still_in_transaction(conn) {
                    return Err(e);
                }
                let (since, budget) =
                    *first_refusal.get_or_insert_with(|| (Instant::now(), handoff.wait_budget()));
                if predecessor {
                    // A COMMIT the server holds back (a backup's BLOCK_COMMIT, FLUSH TABLES
                    // WITH READ LOCK) keeps the row locked: within the budget only.
                    if since.elapsed() >= budget {
                        return Err(e);
                    }
                    resent = true;
                    std::thread::yield_now();
                    continue;
                }
                handoff.refused();
                if holding != Holding::Locks && bounded_waits() {
                    // What is left of the budget after re-sending for a predecessor's
                    // COMMIT (before another process took the row); else all of it.
                    let left = if resent {
                        budget.saturating_sub(since.elapsed())
                    } else {
                        budget
                    };
                    let Some(wait) = Wait::within(left) else {
                        return Err(e);
                    };
                    return match read(conn, Lock::Wait(wait)) {
                        Err(waited) if is_refusal(&waited) || is_time_limit(&waited) => Err(e),
                        answer => answer,
                    };
                }
                if since.elapsed() + pause > budget {
                    return Err(e);
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(POLL_MAX);
            }
            answer => return answer,
        }
    }
}

/// Whether the transaction on `conn` is still open (MariaDB's `@@in_transaction`); `false`
/// also when the question fails.
fn still_in_transaction(conn: &mut MysqlConnection) -> bool {
    crate::util::in_transaction(conn).is_ok_and(|open| open != 0)
}

fn is_time_limit(error: &diesel::result::Error) -> bool {
    classify_kind(error) == ServerErrorKind::StatementTimeout
}

fn is_refusal(error: &diesel::result::Error) -> bool {
    matches!(
        classify_kind(error),
        ServerErrorKind::LockRefused | ServerErrorKind::LockWaitTimeout
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use diesel::connection::SimpleConnection;

    /// A locking read refused by another process at once (no predecessor committing) waits
    /// in the server for the whole budget, 8 ms. (The first version of the fix below took the
    /// microseconds since the first refusal off the budget too, and waited 3 ms.)
    #[test]
    fn the_server_wait_takes_the_whole_budget_after_a_first_refusal() {
        assert_eq!(
            wait_after_refusals("unit_handoff_whole_wait", Duration::ZERO),
            Some("SET STATEMENT max_statement_time = 0.008 FOR ")
        );
    }

    /// The limit of the server wait of a read (in a transaction on database `database`)
    /// refused while the predecessor commits for `committing`, then by another process (`None`: no server wait, the refusal answered).
    fn wait_after_refusals(database: &str, committing: Duration) -> Option<&'static str> {
        let (_, mut conn) = crate::util::test_database(database);
        assert!(conn.batch_execute("BEGIN").is_ok(), "a transaction");
        note_server(ServerFlavor::MariaDb, false);
        let handoff = Rc::new(Predecessor {
            committing,
            asked: Cell::new(0),
            until: Cell::new(None),
        });
        let mut waited = None;
        let answer = with_handoff(handoff, || {
            lock_or_wait(&mut conn, Holding::Nothing, |_, lock| match lock {
                Lock::NoWait => Err(diesel::result::Error::DatabaseError(
                    diesel::result::DatabaseErrorKind::Unknown,
                    Box::new("Lock wait timeout exceeded; try restarting transaction".to_owned()),
                )),
                Lock::Wait(wait) => {
                    waited = Some(wait.limit);
                    Ok(())
                }
            })
        });
        assert_eq!(answer.is_ok(), waited.is_some(), "{answer:?}");
        waited
    }

    /// A batch's handoff whose in-process predecessor is committing for `committing` from
    /// the read's first refusal (its clock starts at the second question, the first one after
    /// the refusal: the first comes before the read, and the refusal is followed by a round
    /// trip of its own).
    struct Predecessor {
        committing: Duration,
        asked: Cell<u32>,
        until: Cell<Option<Instant>>,
    }

    impl Handoff for Predecessor {
        fn commit_sent(&self) {}
        fn commit_refused(&self) {}
        fn before_commit(&self) {}
        fn after_commit(&self) {}
        fn predecessor_committing(&self) -> bool {
            let asked = self.asked.get() + 1;
            self.asked.set(asked);
            if asked == 1 {
                return !self.committing.is_zero();
            }
            let until = *self
                .until
                .get()
                .get_or_insert_with(|| Instant::now() + self.committing);
            self.until.set(Some(until));
            Instant::now() < until
        }
        fn wait_budget(&self) -> Duration {
            Duration::from_millis(8)
        }
        fn refused(&self) {}
    }

    /// A locking read refused while the predecessor commits, and then by another process,
    /// waits in the server only for what is left of the budget since the first refusal: about
    /// 6 ms of 8 spent re-sending leave a 1 ms wait (or none, on a machine so slow that less
    /// than a millisecond was left). Before, the whole 8 ms budget was waited again.
    #[test]
    fn the_server_wait_takes_what_is_left_of_the_budget() {
        let waited = wait_after_refusals("unit_handoff_wait_left", Duration::from_millis(6));
        assert!(
            matches!(
                waited,
                None | Some("SET STATEMENT max_statement_time = 0.001 FOR ")
            ),
            "{waited:?}"
        );
    }
}
