//! Small helpers shared by the ledger and the issuer: the clock at DATETIME(6) precision, the
//! ids of inserted rows and the locking read of one row by primary key.

use chrono::{NaiveDateTime, Utc};
use diesel::dsl::Limit;
use diesel::mysql::MysqlConnection;
use diesel::query_dsl::methods::{LimitDsl, LoadQuery};
use diesel::{OptionalExtension, RunQueryDsl};

use crate::error::{Error, Result};
use crate::txn::InsertIds;

diesel::define_sql_function! {
    /// The id of the row the last INSERT on this connection created.
    fn last_insert_id() -> diesel::sql_types::Unsigned<diesel::sql_types::BigInt>;
}

/// Current UTC time at the precision of DATETIME(6), so a returned value equals the stored one.
pub(crate) fn now() -> NaiveDateTime {
    to_micros(Utc::now().naive_utc())
}

/// `at` truncated to DATETIME(6)'s microseconds, so what is returned equals what is stored.
pub(crate) fn to_micros(at: NaiveDateTime) -> NaiveDateTime {
    use chrono::Timelike;
    let nanos = at.nanosecond();
    at.with_nanosecond(nanos - nanos % 1_000).unwrap_or(at)
}

/// The id of the first row the last INSERT on this connection created.
pub(crate) fn inserted_id(conn: &mut MysqlConnection) -> Result<i64> {
    let id: u64 = diesel::select(last_insert_id()).get_result(conn)?;
    i64::try_from(id)
        .map_err(|e| Error::from(diesel::result::Error::DeserializationError(e.into())))
}

/// The ids of the `count` rows one INSERT just wrote, in the order they were given — the one
/// place that knows how the server numbers them. One row: `LAST_INSERT_ID()` in every mode
/// (`order` may be `None`). Several rows numbered consecutively (`innodb_autoinc_lock_mode` 0
/// or 1): `LAST_INSERT_ID()` and the step. Otherwise (mode 2, MySQL 8's default) one INSERT's
/// ids need not be consecutive: `lookup` reads them back through a unique index, in order.
pub(crate) fn inserted_ids(
    conn: &mut MysqlConnection,
    order: Option<InsertIds>,
    count: usize,
    lookup: impl FnOnce(&mut MysqlConnection) -> Result<Vec<i64>>,
) -> Result<Vec<i64>> {
    match (count, order) {
        (0, _) => Ok(Vec::new()),
        (1, _) => Ok(vec![inserted_id(conn)?]),
        (_, Some(InsertIds::Consecutive { step })) => {
            let first = inserted_id(conn)?;
            Ok((0..count)
                .map(|i| first + step * i64::try_from(i).unwrap_or(i64::MAX))
                .collect())
        }
        (_, Some(InsertIds::Unordered)) => {
            let ids = lookup(conn)?;
            if ids.len() == count {
                Ok(ids)
            } else {
                Err(Error::from(diesel::result::Error::NotFound))
            }
        }
        (_, None) => Err(Error::internal("several rows inserted without an id order")),
    }
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
    locking_read.first(conn).optional()?.ok_or(missing)
}
