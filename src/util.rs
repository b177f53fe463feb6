//! Small helpers shared by the ledger and the issuer: the clock at DATETIME(6) precision, the
//! ids of inserted rows and the locking read of one row by primary key.

use chrono::{NaiveDateTime, Utc};
use diesel::dsl::Limit;
use diesel::mysql::MysqlConnection;
use diesel::query_dsl::methods::{LimitDsl, LoadQuery};
use diesel::{OptionalExtension, RunQueryDsl};

use crate::error::{Error, Result, ServerErrorKind};
use crate::txn::InsertIds;

diesel::define_sql_function! {
    /// The id of the (first) row the last INSERT on this connection created.
    fn last_insert_id() -> diesel::sql_types::Unsigned<diesel::sql_types::BigInt>;
}

/// Current UTC time at the precision of DATETIME(6), so a returned value equals the stored one.
pub(crate) fn now() -> NaiveDateTime {
    to_micros(Utc::now().naive_utc())
}

/// `at` truncated to DATETIME(6)'s microseconds, so what is returned equals what is stored. A
/// leap second (chrono's nanosecond of 1,000,000,000 or more), which DATETIME cannot hold, is
/// the last microsecond of the second before it: the order of times is kept.
pub(crate) fn to_micros(at: NaiveDateTime) -> NaiveDateTime {
    use chrono::Timelike;
    let nanos = at.nanosecond().min(999_999_999);
    at.with_nanosecond(nanos - nanos % 1_000).unwrap_or(at)
}

/// The id of the first row the last INSERT on this connection created.
pub(crate) fn inserted_id(conn: &mut MysqlConnection) -> Result<i64> {
    row_id(diesel::select(last_insert_id()).get_result(conn)?)
}

/// Defines a BIGINT value the server computes (`$sql`) as an expression of its own: a statement
/// that selects it is a cached prepared statement (one round trip), where one with a SQL literal
/// would be prepared, run and closed each time (two).
macro_rules! server_value {
    ($(#[$doc:meta])* $vis:vis struct $name:ident => $sql:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, diesel::query_builder::QueryId)]
        $vis struct $name;

        impl diesel::Expression for $name {
            type SqlType = diesel::sql_types::BigInt;
        }

        impl diesel::query_builder::QueryFragment<diesel::mysql::Mysql> for $name {
            fn walk_ast<'b>(
                &'b self,
                mut out: diesel::query_builder::AstPass<'_, 'b, diesel::mysql::Mysql>,
            ) -> diesel::QueryResult<()> {
                out.push_sql($sql);
                Ok(())
            }
        }

        impl diesel::expression::ValidGrouping<()> for $name {
            type IsAggregate = diesel::expression::is_aggregate::Never;
        }

        impl<QS> diesel::SelectableExpression<QS> for $name {}

        impl<QS> diesel::AppearsOnTable<QS> for $name {}
    };
}

server_value! {
    /// The step between the ids of one INSERT's rows where the server numbers them consecutively
    /// (`innodb_autoinc_lock_mode` 0 or 1): the session's `auto_increment_increment` — a session
    /// may set its own, so it is read with the first id — and 0 where it does not (mode 2: a runner
    /// that met another server first must not take them for consecutive). An expression of its
    /// own, not a SQL literal: a statement with a literal is never cached.
    pub(crate) struct IdStep
        => "IF(@@innodb_autoinc_lock_mode <= 1, @@session.auto_increment_increment, 0)"
}

server_value! {
    /// `@@in_transaction` as a number (see [`in_transaction`]).
    struct InTransaction => "CAST(@@in_transaction AS SIGNED)"
}

/// The first id of the last INSERT on this connection and the session's step between ids, in
/// one round trip.
fn first_id_and_step(conn: &mut MysqlConnection) -> Result<(i64, i64)> {
    let (first, step): (u64, i64) = diesel::select((last_insert_id(), IdStep)).get_result(conn)?;
    Ok((row_id(first)?, step))
}

/// `LAST_INSERT_ID()`'s unsigned value as a row id.
pub(crate) fn row_id(id: u64) -> Result<i64> {
    i64::try_from(id)
        .map_err(|e| Error::from(diesel::result::Error::DeserializationError(e.into())))
}

/// The ids of the `count` rows one INSERT just wrote, in the order they were given — the one
/// place that knows how the server numbers them. One row: `LAST_INSERT_ID()` in every mode
/// (`order` may be `None`). Several rows numbered consecutively (`innodb_autoinc_lock_mode` 0
/// or 1): `LAST_INSERT_ID()` and the step. Otherwise (mode 2, MySQL 8's default) one INSERT's
/// ids need not be consecutive: `lookup` reads them back through a unique index, in order.
/// `first`: `LAST_INSERT_ID()` and the session's step (see [`IdStep`]) where they were read
/// already (in a later statement's round trip).
pub(crate) fn inserted_ids(
    conn: &mut MysqlConnection,
    order: Option<InsertIds>,
    count: usize,
    first: Option<(i64, i64)>,
    lookup: impl FnOnce(&mut MysqlConnection) -> Result<Vec<i64>>,
) -> Result<Vec<i64>> {
    match (count, order) {
        (0, _) => Ok(Vec::new()),
        (1, _) => Ok(vec![match first {
            Some((first, _)) => first,
            None => inserted_id(conn)?,
        }]),
        (_, Some(InsertIds::Consecutive)) => {
            let (first, step) = match first {
                Some(read) => read,
                None => first_id_and_step(conn)?,
            };
            // Not numbered consecutively after all (see [`IdStep`]): read back.
            if step < 1 {
                return read_back(conn, count, lookup);
            }
            (0..count)
                .map(|i| {
                    i64::try_from(i)
                        .ok()
                        .and_then(|i| step.checked_mul(i))
                        .and_then(|offset| first.checked_add(offset))
                        .ok_or_else(|| Error::internal("an inserted row's id past 2^63 - 1"))
                })
                .collect()
        }
        (_, Some(InsertIds::Unordered)) => read_back(conn, count, lookup),
        (_, None) => Err(Error::internal("several rows inserted without an id order")),
    }
}

/// The ids of the `count` rows one INSERT just wrote, read back by `lookup` (through a unique
/// index, in order).
fn read_back(
    conn: &mut MysqlConnection,
    count: usize,
    lookup: impl FnOnce(&mut MysqlConnection) -> Result<Vec<i64>>,
) -> Result<Vec<i64>> {
    let ids = lookup(conn)?;
    if ids.len() == count {
        Ok(ids)
    } else {
        Err(short_read_back(conn, ids.len(), count))
    }
}

/// The answer when the read-back of the `inserted` rows one INSERT just wrote found only
/// `found` of them. InnoDB always shows a transaction its own rows, but on a MariaDB Galera
/// cluster with writes on several nodes a brute-force abort (a replicated write that needs a
/// lock this transaction holds) can roll the transaction back between the INSERT and the
/// read-back WITHOUT reporting it: the read-back then runs outside any transaction
/// (`@@in_transaction` = 0) and finds none of the rows. All of the attempt was rolled back (an
/// INSERT run after the abort would have been autocommitted, and found), so this is a deadlock
/// victim's answer: [`ServerErrorKind::Deadlock`](crate::ServerErrorKind::Deadlock), which the
/// runner retries. Anything else — some rows found, a transaction still open, or no way to ask
/// (MySQL has no `@@in_transaction`) — is an internal error.
fn short_read_back(conn: &mut MysqlConnection, found: usize, inserted: usize) -> Error {
    match in_transaction(conn) {
        Ok(0) if found == 0 => silently_aborted(inserted),
        // A guarded write on a Galera node runs with `autocommit = 0`, so the read-back itself
        // opened a new transaction: the savepoint the runner set after BEGIN tells.
        Ok(_)
            if found == 0
                && crate::txn::release_savepoint(conn)
                    .is_err_and(|e| e.server_kind() == Some(crate::ServerErrorKind::Deadlock)) =>
        {
            silently_aborted(inserted)
        }
        Ok(open) => Error::internal(format!(
            "the read-back of a {inserted}-row INSERT found {found} rows (in a transaction: {open})"
        )),
        Err(e) => {
            let error = crate::error::ServerError::new(e);
            if error.kind().is_definite_abort() {
                // The abort, reported late on the next statement: a deadlock victim's answer.
                Error::Server(error)
            } else {
                Error::internal(format!(
                    "the read-back of a {inserted}-row INSERT found {found} rows, \
                     and @@in_transaction failed: {error}"
                ))
            }
        }
    }
}

/// The typed answer for a transaction the server rolled back without reporting it, found out
/// because its own `inserted` rows were gone: a retryable [`ServerErrorKind::Deadlock`](
/// crate::ServerErrorKind::Deadlock) that says what happened.
pub(crate) fn silently_aborted(inserted: usize) -> Error {
    crate::txn::silently_rolled_back(&format!(
        "the {inserted} rows it had just inserted are gone and no transaction is open"
    ))
}

/// The one row `locking_read` finds — a primary-key lookup its caller built with
/// `.for_update().no_wait()`, so `SELECT ... WHERE <key> = ? LIMIT 1 FOR UPDATE NOWAIT`: one
/// record lock, refused at once if another transaction holds it — or the typed not-found error
/// `missing` where there is no such row. The statement keeps its static query id, so it stays a
/// cached prepared statement.
pub(crate) fn locked_row<Q, R>(
    conn: &mut MysqlConnection,
    locking_read: Q,
    missing: Error,
) -> Result<R>
where
    Q: LimitDsl + RunQueryDsl<MysqlConnection>,
    Limit<Q>: for<'query> LoadQuery<'query, MysqlConnection, R>,
{
    match locking_read.first(conn).optional() {
        Ok(row) => row.ok_or(missing),
        Err(e) => {
            let error = Error::from(e);
            // A primary-key read refused for its lock fails before the server begins its
            // result; one stopped otherwise (its time limit, `KILL QUERY`, a lost connection)
            // may have begun it: the runner then drops the cached statements before a retry.
            if matches!(
                error.server_kind(),
                Some(ServerErrorKind::LockRefused | ServerErrorKind::LockWaitTimeout)
            ) {
                crate::txn::note_clean_failure();
            }
            Err(error)
        }
    }
}

/// MariaDB's `@@in_transaction` on `conn`: 1 while a transaction is open, 0 otherwise (MySQL
/// has no such variable: an error).
/// A cached prepared statement (`server_value!`): a combiner's batch asks it after a refused
/// locking read.
pub(crate) fn in_transaction(conn: &mut MysqlConnection) -> diesel::QueryResult<i64> {
    diesel::select(InTransaction).get_result(conn)
}

/// A migrated throwaway database `name` for a unit test: its URL and a connection to it.
#[cfg(test)]
pub(crate) fn test_database(name: &str) -> (String, MysqlConnection) {
    use diesel::Connection;
    let Ok(url) = lockstock_testkit::database_url(name) else {
        panic!("a throwaway database");
    };
    let Ok(mut conn) = MysqlConnection::establish(&url) else {
        panic!("connect");
    };
    assert!(crate::run_migrations(&mut conn).is_ok());
    (url, conn)
}

#[cfg(test)]
mod tests {
    use super::silently_aborted;
    use crate::ServerErrorKind;

    /// A transaction the server rolled back without reporting it is a typed, retryable
    /// deadlock (nothing of it applied), never an unclassified "Record not found".
    #[test]
    fn a_silently_aborted_transaction_is_a_retryable_deadlock() {
        let error = silently_aborted(2);
        assert_eq!(error.server_kind(), Some(ServerErrorKind::Deadlock));
        assert!(
            matches!(error.server_error(), Some(server)
                if server.kind().is_retryable()
                    && server.kind().is_definite_abort()
                    && server.message().contains("brute-force abort")),
            "{error:?}"
        );
        assert!(!error.is_outcome_unknown());
    }
}
