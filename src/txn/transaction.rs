//! One transaction, statement by statement: begin, body, COMMIT or ROLLBACK, session restored.

use diesel::connection::{
    AnsiTransactionManager, SimpleConnection, TransactionDepthChange, TransactionManager,
    TransactionManagerStatus, ValidTransactionManagerStatus,
};
use diesel::mysql::MysqlConnection;
use diesel::RunQueryDsl;

use super::*;
use crate::error::{Error, ServerError, ServerErrorKind};
use crate::statements::{
    Commit, ReleaseSavepoint, RestoreGalera, RestoreMariaDb, RestoreMySql, Rollback, Savepoint,
    StatementPrepares, StatementPreparesMySql,
};
std::thread_local! {
    /// What [`caches_statements`] found during the current call (the connection's address and
    /// the answer), so a call asks at most once per connection; cleared as each call starts
    /// ([`forget_cache_probe`]).
    static CACHE_PROBE: std::cell::Cell<Option<(usize, bool)>> = const { std::cell::Cell::new(None) };
    /// Set by lockstock's own statements that failed in a way that leaves no statement of the
    /// connection expecting a result (see [`note_clean_failure`]); cleared as each attempt's body
    /// starts.
    static CLEAN_FAILURE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Notes that the statement failing now left nothing behind in the connection's statement
/// cache: a primary-key locking read refused or timed out (its row is read before the server
/// begins its result), or a write (no result at all). A body failing any other way may have
/// failed inside a cached read's result — a read of the caller's own, say — which the client
/// library would then wait out on its next execution: the runner drops the connection's
/// prepared statements then ([`forget_prepared`]).
pub(crate) fn note_clean_failure() {
    CLEAN_FAILURE.with(|clean| clean.set(true));
}

/// Whether `error`, which ended an attempt's body, may have been a cached read's failure in the
/// middle of its result: a server error other than a refusal lockstock noted as clean or a
/// write's constraint. (Asked only where the ROLLBACK after it answered: a failure whose text
/// reads "lost connection" was then another's — a procedure's SIGNAL, a FEDERATED or Spider
/// table's remote — and counts like any other.)
fn may_leave_a_stale_statement(error: &Error) -> bool {
    let clean = CLEAN_FAILURE.with(|clean| clean.replace(false));
    match error {
        Error::Server(e) => {
            !clean
                && !matches!(
                    e.kind(),
                    ServerErrorKind::NodeNotReady
                        | ServerErrorKind::DuplicateKey
                        | ServerErrorKind::CheckViolation
                )
        }
        _ => false,
    }
}

/// Drops every prepared statement `conn` caches (each is closed; the next use prepares it
/// again). libmariadb leaves a cached SELECT that failed after the server began its result
/// expecting the rest of that result: executed again, it waits for packets the server never
/// sends (the server waits for a command) until the watchdog ends the call as an unresponsive
/// server. Diesel evicts no single statement and tells no cache size, so the cache is switched
/// off and on again — only where it is on, so that a caller who switched it off keeps it off:
/// as the policy says ([`StatementCache`]), or as the server tells ([`caches_statements`]).
/// `Some` when the server did not tell (the connection is marked broken then).
pub(crate) fn forget_prepared(
    conn: &mut MysqlConnection,
    cache: StatementCache,
    flavor: ServerFlavor,
) -> Option<Error> {
    use diesel::connection::{CacheSize, Connection};
    let on = match cache {
        StatementCache::Cached => true,
        StatementCache::Uncached => false,
        StatementCache::Ask => {
            let address = std::ptr::from_ref::<MysqlConnection>(conn) as usize;
            match CACHE_PROBE.with(std::cell::Cell::get) {
                Some((probed, on)) if probed == address => on,
                // A Galera abort reported late may land on the first read: asked again then.
                _ => match after_late_abort(conn, |conn| caches_statements(conn, flavor)) {
                    Ok(on) => {
                        CACHE_PROBE.with(|probe| probe.set(Some((address, on))));
                        on
                    }
                    // A server that does not tell: neither switch the caller's cache on nor
                    // leave a statement that may be stale (its next use would wait for the
                    // server until the watchdog): the connection is not used again.
                    Err(e) => {
                        mark_broken(conn);
                        return Some(Error::ConnectionBroken {
                            source: ServerError::new(e),
                        });
                    }
                },
            }
        }
    };
    if on {
        conn.set_prepared_statement_cache_size(CacheSize::Disabled);
        conn.set_prepared_statement_cache_size(CacheSize::Unbounded);
    }
    None
}

/// Clears what [`forget_prepared`] learned of a connection's cache: each call asks afresh.
pub(super) fn forget_cache_probe() {
    CACHE_PROBE.with(|probe| probe.set(None));
}

/// Whether `conn` caches prepared statements: the server's count of statements prepared for
/// this connection, read twice by the same statement — the second read is prepared again
/// (and counted) only where nothing is cached.
fn caches_statements(
    conn: &mut MysqlConnection,
    flavor: ServerFlavor,
) -> diesel::QueryResult<bool> {
    let prepares = |conn: &mut MysqlConnection| -> diesel::QueryResult<i64> {
        match flavor {
            ServerFlavor::MariaDb => StatementPrepares.get_result(conn),
            ServerFlavor::MySql => StatementPreparesMySql.get_result(conn),
        }
    };
    let first = prepares(conn)?;
    let second = prepares(conn)?;
    Ok(second == first)
}

/// lockstock must own the transaction to retry it: refuse a call made inside one that the
/// caller opened through Diesel (a raw `BEGIN` is caught by [`NESTED_CHECK`]). A connection
/// whose transaction manager is broken (also one lockstock marked after a failed ROLLBACK) is
/// refused as [`Error::ConnectionBroken`].
pub(super) fn ensure_no_open_transaction(conn: &mut MysqlConnection) -> Result<(), Error> {
    match AnsiTransactionManager::transaction_manager_status_mut(conn).transaction_depth() {
        Ok(None) => Ok(()),
        Ok(Some(_)) => Err(Error::NestedTransaction),
        Err(e) => Err(Error::ConnectionBroken {
            source: ServerError::new(e),
        }),
    }
}

/// How one transaction begins and ends.
#[derive(Debug, Clone, Copy)]
pub(super) struct Begin<'a> {
    /// The statements before `begin`; the first one refuses a nested call, atomically.
    pub(super) setup: &'a [String],
    /// `BEGIN` or the read-only snapshot's `START TRANSACTION`; `None` for a transaction
    /// that [`TxnRunner::prime`](super::TxnRunner::prime) opened already.
    pub(super) begin: Option<&'static str>,
    /// Restore the caller's session variables afterwards (they were saved by `setup`).
    pub(super) restore: Option<Restore>,
    /// A write on a Galera node: `SAVEPOINT` after `BEGIN`, released before COMMIT (see the
    /// module docs of `txn`).
    pub(super) savepoint: bool,
    /// A read-only snapshot: a failed COMMIT cannot have written anything.
    pub(super) read_only: bool,
    /// What the policy says of the connection's statement cache: a failed body's cached
    /// statements may be left mid-result, and are dropped where it is on
    /// ([`forget_prepared`]).
    pub(super) statement_cache: StatementCache,
    /// The server's flavour (how [`forget_prepared`] asks it about the cache).
    pub(super) flavor: ServerFlavor,
    /// The statement limit, in seconds, that the first setup statement takes as its one
    /// parameter (MariaDB, on a connection without the settings); `None`: no parameter.
    pub(super) statement_limit: Option<f64>,
}

/// Which session variables the setup saved, so which statement puts them back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Restore {
    MariaDb,
    MySql,
    /// MariaDB with `autocommit` (a guarded write on a Galera node).
    Galera,
}

/// One transaction: `begin` (nested check, saved session, settings, isolation and BEGIN in one
/// batch), the body, then COMMIT — or ROLLBACK on any error, and on a panic before it unwinds
/// further, so a pooled connection is never handed back with a transaction open. Afterwards the
/// caller's session variables are restored.
///
/// A ROLLBACK that fails marks the connection broken (Diesel's transaction manager then
/// reports it, and r2d2 discards it instead of handing it out again): a transaction that may
/// still be open must never be continued or committed by a later user of the connection.
///
/// The transaction is run here rather than through Diesel's transaction manager because the
/// manager sends COMMIT and ROLLBACK as multi-statement batches, three round trips each; here
/// they are cached prepared statements, one round trip each.
pub(super) fn run_transaction<T>(
    conn: &mut MysqlConnection,
    begin: Begin<'_>,
    body: &mut impl FnMut(&mut MysqlConnection) -> Result<T, Error>,
) -> Result<T, Error> {
    // A panic outside the body — the caller's Diesel instrumentation, which runs inside
    // lockstock's own statements (the setup SET, BEGIN, COMMIT, ROLLBACK, the restoring SET),
    // panicking there — leaves the session in a state nobody knows (a transaction open, or
    // lockstock's settings in place): the connection is marked broken, so that no pool hands
    // it out again, before the unwind goes on. The body's own panic is ended below (ROLLBACK,
    // the caller's settings put back) before it goes on, and needs no mark.
    let mut ended = false;
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run_transaction_marking(conn, begin, body, &mut ended)
    }));
    match outcome {
        Ok(answer) => answer,
        Err(panic) => {
            if !ended {
                mark_broken(conn);
            }
            std::panic::resume_unwind(panic)
        }
    }
}

/// [`run_transaction`]; `ended`: set once a panic of the body has been ended cleanly (its
/// transaction rolled back, the session restored) and goes on.
fn run_transaction_marking<T>(
    conn: &mut MysqlConnection,
    begin: Begin<'_>,
    body: &mut impl FnMut(&mut MysqlConnection) -> Result<T, Error>,
    ended: &mut bool,
) -> Result<T, Error> {
    open_transaction(conn, begin)?;
    CLEAN_FAILURE.with(|clean| clean.set(false));
    // While the body runs, Diesel's transaction manager counts the transaction as open: a
    // `conn.transaction(..)` in the body nests as a savepoint (at depth 0 Diesel sends `BEGIN`,
    // which commits the body's work so far: a retry would apply it twice), and a lockstock call
    // on the same connection is refused as nested.
    let entered = enter_diesel_count(conn);
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let value = match body(conn) {
            Ok(value) => value,
            // Read before Diesel's count is reset below: a body that ended the runner's
            // transaction through Diesel's manager and then failed may have committed.
            Err(error) => return Err(failed_after_ending(conn, entered, error)),
        };
        // Before the savepoint is released: the failure then ends like any other.
        if let Some(misuse) = diesel_left_behind(conn, entered) {
            return Err(misuse);
        }
        if begin.savepoint {
            release_savepoint(conn)?;
        }
        Ok::<T, Error>(value)
    }));
    // This transaction's first SET was answered: a refusal noted since was a nested call's
    // (in the body, on another connection), not this call's to read as its own.
    super::note_setup_refused(false);
    // lockstock's COMMIT or ROLLBACK ends whatever Diesel counts: it starts from none again
    // (a ROLLBACK that fails marks the connection broken, see `end_failed`). A deadlock inside
    // a Diesel transaction nested in the body ends the whole transaction in the server, and
    // Diesel may answer its failed ROLLBACK TO SAVEPOINT (1305) instead: that is not retried,
    // since statements the body sent after the server's rollback ran outside any transaction.
    *AnsiTransactionManager::transaction_manager_status_mut(conn) =
        TransactionManagerStatus::Valid(ValidTransactionManagerStatus::default());
    match outcome {
        Ok(Ok(value)) => match commit(conn, begin) {
            Ok(_) => {
                // Committed: whatever happens now, the answer is the value.
                if let Some(restore) = begin.restore {
                    let _ = put_back(conn, |conn| restore_session(conn, restore));
                }
                Ok(value)
            }
            Err(e) => {
                let broken = end_failed(conn, begin);
                let error = commit_failure(e, begin.read_only);
                // A COMMIT refused for certain (nothing committed) whose ROLLBACK failed too:
                // the connection is closed now, and no retry may run on it — its answer is the
                // broken connection with the ROLLBACK's cause (a node outside the Primary
                // component, say), not a retry's "broken transaction manager" or `Contended`.
                // An unknown outcome stays unknown.
                let error = match broken {
                    Some(broken) if !error.is_outcome_unknown() => broken,
                    _ => error,
                };
                // Nothing committed: a combiner's batch may still give its later callers back.
                if !begin.read_only && !error.is_outcome_unknown() {
                    super::handoff::commit_refused();
                }
                trace_event!(outcome_unknown = error.is_outcome_unknown(), error = %error, "commit failed");
                Err(error)
            }
        },
        Ok(Err(error)) => {
            // On a guarded Galera write, a body that failed may have failed BECAUSE the server
            // rolled the transaction back without a word (a brute-force abort): its later
            // statements ran in a new transaction and missed its rows (a foreign key to a row
            // it had inserted, an account it had created). The savepoint tells: gone, this is a
            // deadlock victim's answer, retried (a lost connection or a deadlock says so
            // already).
            // A body's `OutcomeUnknown` (its work may be committed: through Diesel's manager,
            // say, which also ended the savepoint) stays its answer: never a retryable deadlock,
            // and never a failure of the ROLLBACK after it, which would say nothing was.
            let unknown = error.is_outcome_unknown();
            let error = if begin.savepoint
                && !unknown
                && !matches!(
                    error.server_kind(),
                    Some(ServerErrorKind::ConnectionLost | ServerErrorKind::Deadlock)
                ) {
                match release_savepoint(conn) {
                    Err(gone) if gone.server_kind() == Some(ServerErrorKind::Deadlock) => gone,
                    _ => error,
                }
            } else {
                error
            };
            let stale = may_leave_a_stale_statement(&error);
            match end_failed(conn, begin) {
                // A lost connection: the server rolled back already; the body's error says so.
                Some(_)
                    if unknown || error.server_kind() == Some(ServerErrorKind::ConnectionLost) =>
                {
                    Err(error)
                }
                Some(broken) => Err(broken),
                None => {
                    if stale {
                        if let Some(broken) =
                            forget_prepared(conn, begin.statement_cache, begin.flavor)
                        {
                            return Err(if unknown { error } else { broken });
                        }
                    }
                    Err(error)
                }
            }
        }
        Err(panic) => {
            // The body may have panicked on an error of its own statement (an `expect`), one
            // cut off in the middle of its result: its cached statements are dropped as after
            // any failure that may leave one, so the caller's connection never runs it again
            // from the cache (it would wait for the rest of the old result).
            if end_failed(conn, begin).is_none() {
                let _ = forget_prepared(conn, begin.statement_cache, begin.flavor);
            }
            *ended = true;
            std::panic::resume_unwind(panic)
        }
    }
}

/// COMMIT; a write's tells a combiner's handoff (see [`handoff`](super::handoff)) before it
/// is sent and once it answered — not a Galera-guarded one, whose turn is handed on after it.
fn commit(conn: &mut MysqlConnection, begin: Begin<'_>) -> diesel::QueryResult<usize> {
    if begin.read_only {
        return Commit.execute(conn);
    }
    super::handoff::commit_sent();
    #[cfg(test)]
    if let Some(refusal) = super::tests::refused_commit(false) {
        return Err(refusal);
    }
    if begin.savepoint {
        return Commit.execute(conn);
    }
    super::handoff::before_commit();
    #[cfg(test)]
    if let Some(refusal) = super::tests::refused_commit(true) {
        super::handoff::after_commit();
        return Err(refusal);
    }
    let committed = Commit.execute(conn);
    super::handoff::after_commit();
    committed
}

/// The setup statements, `BEGIN` and the savepoint of `begin`: on success a transaction is
/// open; on failure none is, and the caller's session is as it was (or the connection is
/// marked broken and the error says so).
pub(super) fn open_transaction(conn: &mut MysqlConnection, begin: Begin<'_>) -> Result<(), Error> {
    if begin.restore.is_some() {
        // The caller's own session: its result character set first (see `READABLE_ERRORS`).
        if let Err(e) = PreparedSql(READABLE_ERRORS).execute(conn) {
            super::note_setup_refused(true);
            return Err(Error::from(e));
        }
    }
    for (at, sql) in begin.setup.iter().enumerate() {
        // A SET is atomic: when it fails, nothing of it was applied.
        let sent = match begin.statement_limit {
            Some(limit) if at == 0 => PreparedSqlWith(sql, limit).execute(conn),
            _ => PreparedSql(sql).execute(conn),
        };
        if let Err(e) = sent {
            super::note_setup_refused(true);
            let error = ServerError::new(e);
            let message = error.message().to_ascii_lowercase();
            let refusal = if refused_as_nested(&error) {
                Error::NestedTransaction
            } else if message.contains(NOT_DESIGNATED_LOCALE) {
                Error::NotDesignatedWriter
            } else if message.contains(NOT_REPLICATED_LOCALE) {
                Error::NotReplicated
            } else {
                Error::Server(error.clone())
            };
            // On MariaDB the first SET saves the caller's values and sets ours: after it (a
            // read may also have opened a transaction) roll back and put the caller's back. On
            // MySQL the saving SET comes last, after `SET TRANSACTION ISOLATION LEVEL`, whose
            // level would stay pending for the caller's next transaction: a ROLLBACK ends it
            // (nothing of the caller's is open: that SET refuses inside a transaction).
            let saved = at > 0 && matches!(begin.restore, Some(Restore::MariaDb | Restore::Galera));
            let pending_level = at > 0 && begin.restore == Some(Restore::MySql);
            let ended = if saved {
                end_failed(conn, begin)
            } else {
                let level = if pending_level {
                    end_unused(conn)
                } else {
                    None
                };
                // Nothing saved yet: the caller's result character set put back (unless the
                // connection is broken already).
                level.or_else(|| begin.restore.and_then(|_| undo_readable_errors(conn)))
            };
            if let Some(broken) = ended {
                if error.kind() != ServerErrorKind::ConnectionLost {
                    return Err(broken);
                }
            }
            return Err(refusal);
        }
    }
    if let Some(sql) = begin.begin {
        if let Err(e) = PreparedSql(sql).execute(conn) {
            let error = ServerError::new(e);
            // The settings are in place: put the caller's back.
            return Err(match end_failed(conn, begin) {
                Some(broken) if error.kind() != ServerErrorKind::ConnectionLost => broken,
                _ => Error::Server(error),
            });
        }
    }
    if begin.savepoint {
        if let Err(e) = Savepoint.execute(conn) {
            return Err(match end_failed(conn, begin) {
                Some(broken) => broken,
                None => Error::from(e),
            });
        }
    }
    Ok(())
}

/// The statement before the first SET on a caller's own session: its `character_set_results`
/// saved and set to utf8mb4, so that the first SET's refusals (a transaction the caller opened
/// with a raw `BEGIN`, a Galera session that does not replicate) can be read. A caller's
/// `ucs2`, `utf16` or `utf32` (whose every character takes two or four bytes) makes the server
/// send error texts that Diesel reads as empty — and an error whose text is empty as a
/// statement that succeeded: lockstock's `START TRANSACTION` would then commit the caller's
/// open transaction. The first SET saves the values kept here for the restoring SET
/// (`SAVE_SHARED`) and clears them; where nothing saved them, [`UNDO_READABLE_ERRORS`] puts
/// the character set back. A SET reads no table: it opens no transaction (also under
/// `autocommit = 0`), and a Galera node outside the Primary component takes it.
pub(super) const READABLE_ERRORS: &str = "SET @lockstock_given_results = \
     @@session.character_set_results, \
     @lockstock_given_results_null = @@session.character_set_results IS NULL, \
     SESSION character_set_results = utf8mb4";

/// Puts back the result character set [`READABLE_ERRORS`] kept, where nothing after it saved it.
/// Sent again after a late abort, it changes nothing: the saved value is cleared, and a
/// cleared one keeps the session's current value.
pub(super) const UNDO_READABLE_ERRORS: &str = "SET SESSION character_set_results = \
     IF(@lockstock_given_results_null, NULL, \
     COALESCE(@lockstock_given_results, @@session.character_set_results)), \
     @lockstock_given_results = NULL, @lockstock_given_results_null = NULL";

/// Sends [`UNDO_READABLE_ERRORS`]: `None` when it worked; otherwise the connection is marked
/// broken (its session would keep utf8mb4 results and lockstock's user variables) and the error
/// says why.
pub(super) fn undo_readable_errors(conn: &mut MysqlConnection) -> Option<Error> {
    put_back(conn, |conn| {
        PreparedSql(UNDO_READABLE_ERRORS).execute(conn).map(|_| ())
    })
}

/// Sends a SET that puts the caller's session back (again after a late abort): `None` when it
/// worked; otherwise the session is ended and the connection marked broken (it would keep
/// lockstock's settings), and the error says why.
fn put_back(
    conn: &mut MysqlConnection,
    statement: impl FnMut(&mut MysqlConnection) -> Result<(), diesel::result::Error>,
) -> Option<Error> {
    let error = after_late_abort(conn, statement).err()?;
    close_broken(conn);
    Some(Error::ConnectionBroken {
        source: ServerError::new(error),
    })
}

/// Ends a transaction that [`TxnRunner::prime`](super::TxnRunner::prime) opened and nothing
/// used (nothing was sent in it): ROLLBACK. `None` when it worked; otherwise the connection is
/// marked broken and the error says why.
pub(super) fn end_unused(conn: &mut MysqlConnection) -> Option<Error> {
    let plain = Begin {
        setup: &[],
        begin: None,
        restore: None,
        savepoint: false,
        read_only: false,
        statement_cache: StatementCache::Uncached,
        flavor: ServerFlavor::MariaDb,
        statement_limit: None,
    };
    end_failed(conn, plain)
}

/// Ends a transaction that failed: ROLLBACK, then the caller's session restored. `None` when
/// both worked; otherwise the connection is marked broken and the error says why.
fn end_failed(conn: &mut MysqlConnection, begin: Begin<'_>) -> Option<Error> {
    if let Err(e) = after_late_abort(conn, |conn| Rollback.execute(conn).map(|_| ())) {
        // Release the locks now if the server still answers (the prepared form may be what
        // failed), but never trust this connection again. A statement left in the middle of
        // its result (a Galera abort reported while its rows came) keeps the client out of
        // step with the server — every statement after it fails in the client, the ROLLBACK
        // and the KILL too, and the transaction would hold its locks as long as the caller
        // keeps the connection: closing the cached statements first reads what is left of it.
        diesel::connection::Connection::set_prepared_statement_cache_size(
            conn,
            diesel::connection::CacheSize::Disabled,
        );
        let _ = conn.batch_execute("ROLLBACK AND NO CHAIN NO RELEASE");
        close_broken(conn);
        return Some(Error::ConnectionBroken {
            source: ServerError::new(e),
        });
    }
    let restore = begin.restore?;
    put_back(conn, |conn| restore_session(conn, restore))
}

/// Runs `statement`, and once more if it failed with a definite abort or was interrupted: on a
/// Galera node a brute-force abort can be reported late, on the next statement — also on the
/// ROLLBACK or the restoring SET after a failed body (the transaction is gone then: that is
/// what the abort did); a `KILL QUERY` meant for the transaction's last statement can land on
/// the ROLLBACK or the restoring SET after it (only that statement is stopped). Both are safe
/// to send twice, so the statement is sent again instead of breaking the connection (or, after
/// a COMMIT, leaving lockstock's settings on the caller's session); only a second failure
/// counts.
fn after_late_abort<T>(
    conn: &mut MysqlConnection,
    mut statement: impl FnMut(&mut MysqlConnection) -> Result<T, diesel::result::Error>,
) -> Result<T, diesel::result::Error> {
    match statement(conn) {
        Err(e) if crate::error::classify_kind(&e).is_retryable() => statement(conn),
        done => done,
    }
}

/// Puts back the session variables the first SET saved.
fn restore_session(
    conn: &mut MysqlConnection,
    restore: Restore,
) -> Result<(), diesel::result::Error> {
    match restore {
        Restore::MariaDb => RestoreMariaDb.execute(conn),
        Restore::MySql => RestoreMySql.execute(conn),
        Restore::Galera => RestoreGalera.execute(conn),
    }
    .map(|_| ())
}

/// `RELEASE SAVEPOINT lockstock` before the COMMIT of a guarded write. The savepoint is gone
/// only when the transaction was rolled back after it was set — on a Galera node, by a
/// brute-force abort the server did not report: what ran since is in a new transaction
/// (`autocommit = 0`) that the caller's error path rolls back, and the whole transaction is
/// retried as a deadlock victim's.
pub(crate) fn release_savepoint(conn: &mut MysqlConnection) -> Result<(), Error> {
    match ReleaseSavepoint.execute(conn) {
        Ok(_) => Ok(()),
        Err(e) => {
            let error = ServerError::new(e);
            if error
                .message()
                .to_ascii_lowercase()
                .contains("does not exist")
            {
                Err(silently_rolled_back("its savepoint is gone"))
            } else {
                Err(Error::Server(error))
            }
        }
    }
}

/// The retryable answer for a transaction the server rolled back without reporting it (a
/// Galera brute-force abort), found out by `evidence`: a
/// [`ServerErrorKind::Deadlock`](crate::ServerErrorKind::Deadlock) that says what happened.
pub(crate) fn silently_rolled_back(evidence: &str) -> Error {
    Error::from(diesel::result::Error::DatabaseError(
        diesel::result::DatabaseErrorKind::SerializationFailure,
        Box::new(format!(
            "the transaction was rolled back by the server without an error (a Galera \
             brute-force abort): {evidence}"
        )),
    ))
}

/// Ends the session of a connection lockstock could not leave as it found it (a ROLLBACK or
/// the restoring SET failed): `KILL CONNECTION CONNECTION_ID()` where the server still takes
/// it — the server then rolls back what is left of the transaction and drops lockstock's
/// settings with the session, and a statement the caller sends on the connection anyway
/// (Diesel's `batch_execute` and `execute` do not look at the mark) fails instead of running
/// inside a half-done transaction or under lockstock's settings — and marks it broken.
pub(crate) fn close_broken(conn: &mut MysqlConnection) {
    let _ = conn.batch_execute("KILL CONNECTION CONNECTION_ID()");
    mark_broken(conn);
}

/// Marks the connection broken for Diesel and r2d2: `Connection::transaction` refuses it, an
/// r2d2 pool drops it when it is returned, and lockstock answers [`Error::ConnectionBroken`].
pub(crate) fn mark_broken(conn: &mut MysqlConnection) {
    let address = connection_address(conn);
    let status = AnsiTransactionManager::transaction_manager_status_mut(conn);
    // Diesel's count at the mark, for `failed_after_ending`: lockstock's own mark (a statement
    // of its own cut off inside a body, say) is not the body ending the runner's transaction.
    if let Ok(depth) = status.transaction_depth() {
        let depth = depth.map_or(0, std::num::NonZeroU32::get);
        MARKED_AT.with(|marked| marked.set(Some((address, depth))));
    }
    status.set_in_error();
}

/// `conn`'s address: which connection a [`MARKED_AT`] record is about.
fn connection_address(conn: &MysqlConnection) -> usize {
    std::ptr::from_ref(conn) as usize
}

thread_local! {
    /// The connection the calling thread last marked broken ([`mark_broken`]) while Diesel's
    /// manager counted it valid, and the depth it counted then. Cleared as the runner's
    /// transaction begins on a connection.
    static MARKED_AT: std::cell::Cell<Option<(usize, u32)>> = const { std::cell::Cell::new(None) };
}

/// Whether lockstock itself marked `conn` broken on this thread while Diesel counted
/// `depth` transactions open on it.
fn marked_by_lockstock_at(conn: &MysqlConnection, depth: u32) -> bool {
    MARKED_AT.with(std::cell::Cell::get) == Some((connection_address(conn), depth))
}

/// What a failed COMMIT means. A definite abort (a deadlock or certification conflict
/// reported at COMMIT) is retried like any refusal; a `read_only` refusal and a COMMIT whose
/// prepare was refused are answered as failures that applied nothing. Anything else — the
/// connection lost, the statement interrupted — may have been applied:
/// [`Error::OutcomeUnknown`], except for a read-only snapshot, which cannot have written
/// anything.
fn commit_failure(error: diesel::result::Error, read_only: bool) -> Error {
    let error = ServerError::new(error);
    // A server switched to `read_only` refuses the COMMIT of a writing transaction before
    // applying anything (1290), as a definite abort does (but it is not retried). A COMMIT whose
    // prepare was refused (1461, `max_prepared_stmt_count` reached: with Diesel's statement
    // cache off every COMMIT is prepared) never ran.
    if read_only
        || error.kind().is_definite_abort()
        || error.kind() == ServerErrorKind::ReadOnly
        || prepare_refused(&error)
    {
        Error::Server(error)
    } else {
        Error::OutcomeUnknown { source: error }
    }
}

/// Whether the server refused to prepare the statement (1461, "Can't create more than
/// max_prepared_stmt_count statements"): it was never executed. (Under another `lc_messages`
/// the text differs, and a COMMIT so refused stays an unknown outcome.)
fn prepare_refused(error: &ServerError) -> bool {
    error
        .message()
        .to_ascii_lowercase()
        .starts_with("can't create more than max_prepared_stmt_count statements")
}

/// Records that the watchdog shut `conn` down in the call of `deadline` on this thread (see
/// [`cut_by_watchdog`]).
pub(super) fn note_cut(conn: &MysqlConnection, deadline: Deadline) {
    let address = connection_address(conn);
    CUT.with(|cut| cut.set(Some((address, deadline))));
}

/// Whether `conn` is marked broken and the last connection the watchdog shut down on this
/// thread, in an earlier step of the call of `deadline` (every step of a call shares its one
/// deadline): its session ended there, not by a failure the server answered. A later call on
/// the same connection (another deadline) was not cut: it sent nothing.
pub(super) fn cut_by_watchdog(conn: &mut MysqlConnection, deadline: Deadline) -> bool {
    CUT.with(std::cell::Cell::get) == Some((connection_address(conn), deadline))
        && is_marked_broken(conn)
}

thread_local! {
    /// The connection the watchdog last shut down in a call on the calling thread (its
    /// address; [`cut_by_watchdog`] also asks that it is still marked broken: a connection
    /// made later at the same address is not), and that call's deadline.
    static CUT: std::cell::Cell<Option<(usize, Deadline)>> = const { std::cell::Cell::new(None) };
}

/// Whether `conn` is marked broken ([`mark_broken`], or Diesel's own verdict).
pub(crate) fn is_marked_broken(conn: &mut MysqlConnection) -> bool {
    matches!(
        AnsiTransactionManager::transaction_manager_status_mut(conn),
        TransactionManagerStatus::InError
    )
}

/// Makes Diesel's transaction manager count the runner's transaction on `conn` (see
/// [`run_transaction`]); whether it does.
fn enter_diesel_count(conn: &mut MysqlConnection) -> bool {
    // Only this connection's record: a body's runner on another connection must not lose the
    // enclosing one's.
    let address = connection_address(conn);
    MARKED_AT.with(|marked| {
        if marked.get().is_some_and(|(at, _)| at == address) {
            marked.set(None);
        }
    });
    match AnsiTransactionManager::transaction_manager_status_mut(conn) {
        TransactionManagerStatus::Valid(valid) => valid
            .change_transaction_depth(TransactionDepthChange::IncreaseDepth)
            .is_ok(),
        TransactionManagerStatus::InError => false,
    }
}

/// The answer to a body that failed with `error`: `error` — unless the body ended the
/// runner's transaction through Diesel's manager first (its COMMIT, or its ROLLBACK after which
/// its statements ran on their own), so that its work may be committed whatever it failed on
/// afterwards: then [`Error::OutcomeUnknown`], never retried, never an answer that says nothing
/// was applied. A Diesel transaction of the body's own that it left open ends with lockstock's
/// ROLLBACK: the body's error stays the answer.
fn failed_after_ending(conn: &mut MysqlConnection, entered: bool, error: Error) -> Error {
    if error.is_outcome_unknown() {
        return error;
    }
    // Marked broken by lockstock itself while the runner's transaction alone was counted (a
    // statement of lockstock's own in the body cut off by the watchdog: `ServerFlavor::detect`,
    // say): not the body ending the transaction — its answer stands (no COMMIT was sent).
    if is_marked_broken(conn) && marked_by_lockstock_at(conn, u32::from(entered)) {
        return error;
    }
    match diesel_left_behind(conn, entered) {
        Some(ended) if ended.is_outcome_unknown() => Error::outcome_unknown(&error),
        _ => error,
    }
}

/// What a body that answered `Ok` left of Diesel's count of the runner's transaction, if not
/// the runner's transaction alone: a Diesel transaction of its own still open — never
/// committed, [`Error::Internal`] (the body's bug: not retried, not the node's) — or none at
/// all: the body ended the runner's transaction through Diesel's manager (its COMMIT or
/// ROLLBACK), so the outcome is unknown.
fn diesel_left_behind(conn: &mut MysqlConnection, entered: bool) -> Option<Error> {
    let depth = AnsiTransactionManager::transaction_manager_status_mut(conn).transaction_depth();
    match depth {
        Ok(Some(depth)) if entered && depth.get() == 1 => None,
        Ok(None) if !entered => None,
        Ok(Some(_)) => Some(Error::internal(
            "the body left a Diesel transaction of its own open: nothing was committed",
        )),
        Ok(None) | Err(_) => Some(Error::outcome_unknown(&Error::internal(
            "the body ended the runner's transaction through Diesel's transaction manager",
        ))),
    }
}
