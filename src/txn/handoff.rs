//! A hot row handed from one in-process batch to the next at COMMIT.
//!
//! InnoDB releases a transaction's row locks when it commits in memory, before its redo log is
//! flushed and the COMMIT answered. A combiner's batch therefore hands its key's turn on just
//! before it sends COMMIT ([`Handoff::before_commit`]): the next batch of the key locks the hot
//! row while the one before it is still waiting for its flush, and the two flushes can share
//! one (group commit). The next batch's `FOR UPDATE NOWAIT` may reach the server before the
//! COMMIT did: that refusal is the in-process predecessor's, not contention, so the locking
//! read is sent again at once ([`locking_read`]) — only the statement was rolled back — for as
//! long as a predecessor of the key was committing when it was sent. A refusal with no
//! predecessor committing is a real one and goes to the runner as always (rollback, backoff,
//! retry).
//!
//! The handoff is installed for the calling thread by the combiner around a batch
//! ([`with_handoff`]); elsewhere nothing of this runs.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use diesel::mysql::MysqlConnection;
use diesel::QueryResult;

use crate::error::{classify_kind, ServerErrorKind};

/// What a combiner's batch does around its COMMIT, and what its locking reads ask.
pub(crate) trait Handoff {
    /// Right before the COMMIT of a write (not a Galera-guarded one) is sent.
    fn before_commit(&self);
    /// Once that COMMIT answered or failed.
    fn after_commit(&self);
    /// Whether a batch of the same key before this one is still committing (it may still hold
    /// the hot row for the few microseconds until its COMMIT reaches the server).
    fn predecessor_committing(&self) -> bool;
    /// How long, from its first refusal, the locking read may poll a row held by another
    /// process (see [`locking_read`]); zero: not at all.
    fn poll_budget(&self) -> Duration;
    /// The locking read met a refusal that was not the in-process predecessor's.
    fn refused(&self);
}

/// The first pause between two polls of a row held elsewhere.
const POLL_FIRST: Duration = Duration::from_micros(50);
/// The longest pause between two polls.
const POLL_MAX: Duration = Duration::from_micros(150);

std::thread_local! {
    static HANDOFF: RefCell<Option<Rc<dyn Handoff>>> = const { RefCell::new(None) };
}

/// Runs `f` with `handoff` installed for the calling thread (removed afterwards, also when `f`
/// panics).
pub(crate) fn with_handoff<T>(handoff: Rc<dyn Handoff>, f: impl FnOnce() -> T) -> T {
    struct Uninstall(Option<Rc<dyn Handoff>>);
    impl Drop for Uninstall {
        fn drop(&mut self) {
            let previous = self.0.take();
            HANDOFF.with(|h| *h.borrow_mut() = previous);
        }
    }
    let previous = HANDOFF.with(|h| h.borrow_mut().replace(handoff));
    let _uninstall = Uninstall(previous);
    f()
}

fn installed() -> Option<Rc<dyn Handoff>> {
    HANDOFF.with(|h| h.borrow().clone())
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

/// Runs the hot row's locking read `read` (a `FOR UPDATE NOWAIT`). Outside a combiner's batch,
/// once. In a batch, a refusal is answered by sending the statement again — only it was rolled
/// back, the transaction goes on:
/// - at once, while the refusal can be the in-process predecessor's COMMIT not having reached
///   the server yet (see the module docs);
/// - otherwise (another process's batch, or any other transaction, holds the row) after a
///   pause that starts at 50 µs and doubles up to 150 µs, for at most the handoff's
///   [`poll_budget`](Handoff::poll_budget) — a batch holds the row for well under a
///   millisecond, and a whole-transaction retry (ROLLBACK, backoff, the transaction again)
///   would leave the row idle for longer than that. Once the budget is spent the refusal goes
///   to the runner, which rolls back and retries as always.
///
/// Any other answer — the row, another error — is returned as it is.
pub(crate) fn locking_read<T>(
    conn: &mut MysqlConnection,
    mut read: impl FnMut(&mut MysqlConnection) -> QueryResult<T>,
) -> QueryResult<T> {
    let Some(handoff) = installed() else {
        return read(conn);
    };
    let mut first_refusal: Option<(Instant, Duration)> = None;
    let mut pause = POLL_FIRST;
    loop {
        let predecessor = handoff.predecessor_committing();
        match read(conn) {
            Err(e) if is_refusal(&e) => {
                if predecessor {
                    std::thread::yield_now();
                    continue;
                }
                handoff.refused();
                let (since, budget) =
                    *first_refusal.get_or_insert_with(|| (Instant::now(), handoff.poll_budget()));
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

fn is_refusal(error: &diesel::result::Error) -> bool {
    matches!(
        classify_kind(error),
        ServerErrorKind::LockRefused | ServerErrorKind::LockWaitTimeout
    )
}
