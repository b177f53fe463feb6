//! Hand-built statements for the hot paths, so that each is a cached prepared statement.
//!
//! Diesel re-prepares every `UPDATE` (its changesets may vary) and every derived `Insertable`
//! whose fields may be defaulted, which costs a prepare round trip — on the hot paths, while the
//! row lock is held. These types carry a static query id, so Diesel prepares each once per
//! connection and only executes it afterwards. The SQL is constant; values are bound.
//! Multi-row INSERTs ([`InsertRows`]) are cached by their SQL text, one per row count up to
//! [`MAX_CACHED_ROWS`].

use chrono::NaiveDateTime;
use diesel::mysql::Mysql;
use diesel::query_builder::Query;
use diesel::query_builder::{AstPass, QueryFragment, QueryId};
use diesel::query_dsl::methods::{ExecuteDsl, LoadQuery};
use diesel::sql_types::{BigInt, Datetime, Integer, Numeric, Text};
use diesel::{MysqlConnection, QueryResult, RunQueryDsl};

use crate::txn::{bounded_waits, note_clean_failure, Deadline};
use rust_decimal::Decimal;

/// Defines a statement type with a static query id: a unit struct for constant SQL, or a struct
/// whose fields are bound in order, each after its SQL fragment.
macro_rules! statement {
    ($(#[$doc:meta])* $name:ident => $sql:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, QueryId)]
        pub(crate) struct $name;

        impl QueryFragment<Mysql> for $name {
            fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Mysql>) -> QueryResult<()> {
                out.push_sql($sql);
                Ok(())
            }
        }

        impl RunQueryDsl<MysqlConnection> for $name {}
    };
    ($(#[$doc:meta])* $name:ident { $($sql:literal $field:ident: $ty:ty as $sql_ty:ty),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, QueryId)]
        pub(crate) struct $name {
            $(pub(crate) $field: $ty,)+
        }

        impl QueryFragment<Mysql> for $name {
            fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Mysql>) -> QueryResult<()> {
                $(
                    out.push_sql($sql);
                    out.push_bind_param::<$sql_ty, _>(&self.$field)?;
                )+
                Ok(())
            }
        }

        impl RunQueryDsl<MysqlConnection> for $name {}
    };
}

statement! {
    /// `UPDATE user_balance SET balance = ?, held = ?, version = ? WHERE user_id = ?`
    SetBalance {
        "UPDATE `user_balance` SET `balance` = " balance: Decimal as Numeric,
        ", `held` = " held: Decimal as Numeric,
        ", `version` = " version: i64 as BigInt,
        " WHERE `user_id` = " user_id: i64 as BigInt,
    }
}

/// `HeldFunds`' SQL but its end: the server clock and the account's active holds that have
/// not expired on it, summed, through the `(user_id, state, expires_at)` index. One statement,
/// so both use one clock reading.
const HELD_FUNDS: &str = "SELECT UTC_TIMESTAMP(6), \
     CAST(COALESCE(SUM(`amount`), 0) AS DECIMAL(19,4)) FROM `balance_hold` \
     WHERE `state` = 'active' AND `expires_at` > UTC_TIMESTAMP(6) AND `user_id` = ";

/// `SELECT UTC_TIMESTAMP(6), COALESCE(SUM(amount), 0) FROM balance_hold WHERE state =
/// 'active' AND expires_at > UTC_TIMESTAMP(6) AND user_id = ?`: a plain read, for a snapshot
/// (`balance`, `audit`: no lock taken), for the server clock alone, and under the account's
/// lock in a write transaction (see `LockedRow::summed` in the ledger's rows).
#[derive(Debug, Clone, Copy, QueryId)]
pub(crate) struct HeldFunds {
    pub(crate) user_id: i64,
}

impl QueryFragment<Mysql> for HeldFunds {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Mysql>) -> QueryResult<()> {
        out.push_sql(HELD_FUNDS);
        out.push_bind_param::<BigInt, _>(&self.user_id)
    }
}

impl RunQueryDsl<MysqlConnection> for HeldFunds {}

impl Query for HeldFunds {
    type SqlType = (Datetime, Numeric);
}

statement! {
    /// `UPDATE balance_hold SET state = ?, captured_amount = ?, ended_at = ?,
    /// ended_by_entry_id = ? WHERE id = ?`: a hold ends.
    SetHoldEnded {
        "UPDATE `balance_hold` SET `state` = " state: &'static str as Text,
        ", `captured_amount` = " captured: Decimal as Numeric,
        ", `ended_at` = " ended_at: NaiveDateTime as Datetime,
        ", `ended_by_entry_id` = " entry_id: i64 as BigInt,
        " WHERE `id` = " hold_id: i64 as BigInt,
    }
}

statement! {
    /// `UPDATE fcfs_coupon SET stock_quantity = ? WHERE id = ?`
    SetStock {
        "UPDATE `fcfs_coupon` SET `stock_quantity` = " stock: i32 as Integer,
        " WHERE `id` = " campaign_id: i64 as BigInt,
    }
}

statement! {
    /// `UPDATE balance_history SET refunded_amount = ? WHERE id = ?`
    SetRefunded {
        "UPDATE `balance_history` SET `refunded_amount` = " refunded: Decimal as Numeric,
        " WHERE `id` = " entry_id: i64 as BigInt,
    }
}

statement! {
    /// `COMMIT`, as a cached prepared statement: one round trip, where Diesel's transaction
    /// manager sends it as a multi-statement batch (three round trips: the batch toggles the
    /// multi-statement option on and off around it). `AND NO CHAIN NO RELEASE` whatever the
    /// caller's `completion_type`: CHAIN would leave the next transaction open on the caller's
    /// connection, RELEASE would close it.
    Commit => "COMMIT AND NO CHAIN NO RELEASE"
}

statement! {
    /// `ROLLBACK`, as a cached prepared statement (`AND NO CHAIN NO RELEASE`, as [`Commit`]).
    Rollback => "ROLLBACK AND NO CHAIN NO RELEASE"
}

statement! {
    /// How many statements the server has prepared for this connection (`Com_stmt_prepare`,
    /// counting this one when it is prepared for this run): MariaDB. Sent after the caller's
    /// session is restored, so it answers whatever that session caps: its row whatever the
    /// caller's `sql_select_limit` (an explicit `LIMIT` wins), its `max_join_size` (which
    /// refused it as "would examine more than MAX_JOIN_SIZE rows" and left a healthy
    /// connection `ConnectionBroken`) and its statement time limit (the watchdog bounds it).
    StatementPrepares => "SET STATEMENT sql_big_selects = 1, max_statement_time = 0 FOR \
        SELECT CAST(VARIABLE_VALUE AS SIGNED) FROM \
        information_schema.SESSION_STATUS WHERE VARIABLE_NAME = 'COM_STMT_PREPARE' LIMIT 1"
}

impl Query for StatementPrepares {
    type SqlType = BigInt;
}

statement! {
    /// Whether a Galera node's session is inside a transaction, as a number, without the
    /// causal wait a router's read session (`wsrep_sync_wait = 1`) puts before every SELECT.
    NodeInTransaction => "SET STATEMENT wsrep_sync_wait = 0 FOR \
        SELECT CAST(@@in_transaction AS SIGNED) LIMIT 1"
}

impl Query for NodeInTransaction {
    type SqlType = BigInt;
}

statement! {
    /// [`StatementPrepares`] on MySQL 8, which keeps session status in `performance_schema`
    /// (the cap lifted by an optimizer hint there).
    StatementPreparesMySql => "SELECT /*+ SET_VAR(sql_big_selects = 1) \
        SET_VAR(max_execution_time = 0) */ \
        CAST(VARIABLE_VALUE AS SIGNED) FROM performance_schema.session_status \
        WHERE VARIABLE_NAME = 'Com_stmt_prepare' LIMIT 1"
}

impl Query for StatementPreparesMySql {
    type SqlType = BigInt;
}

/// The assignments of every restoring SET that both servers share: each value the first SET
/// saved on both (`SAVE_SHARED` in the runner), or the session's current one where its
/// variable is NULL.
macro_rules! restore_shared {
    () => {
        "innodb_lock_wait_timeout = \
         COALESCE(@lockstock_lock_wait, @@session.innodb_lock_wait_timeout), \
         lock_wait_timeout = COALESCE(@lockstock_mdl_wait, @@session.lock_wait_timeout), \
         lc_messages = COALESCE(@lockstock_lc_messages, @@session.lc_messages), \
         time_zone = COALESCE(@lockstock_time_zone, @@session.time_zone), \
         sql_select_limit = COALESCE(@lockstock_select_limit, @@session.sql_select_limit), \
         unique_checks = COALESCE(@lockstock_unique_checks, @@session.unique_checks), \
         foreign_key_checks = COALESCE(@lockstock_fk_checks, @@session.foreign_key_checks), \
         character_set_client = COALESCE(@lockstock_cs_client, @@session.character_set_client), \
         character_set_results = IF(@lockstock_cs_results_null, NULL, \
         COALESCE(@lockstock_cs_results, @@session.character_set_results)), \
         collation_connection = COALESCE(@lockstock_collation, @@session.collation_connection), \
         sql_big_selects = COALESCE(@lockstock_big_selects, @@session.sql_big_selects)"
    };
}

/// The SET that puts back what lockstock's first SET saved on MariaDB (the user variables are
/// cleared by `clear_saved!`, which must come after it in the same statement). Each value
/// falls back to the session's current one where its variable is NULL — already put back and
/// cleared — so that sending it again (after a Galera abort reported late, on it) changes
/// nothing.
macro_rules! restore_mariadb {
    () => {
        concat!(
            "SET SESSION ",
            restore_shared!(),
            ", max_statement_time = \
             COALESCE(@lockstock_statement_time, @@session.max_statement_time), \
             tx_isolation = COALESCE(@lockstock_isolation, @@session.tx_isolation), \
             tx_read_only = COALESCE(@lockstock_read_only, @@session.tx_read_only), \
             insert_id = COALESCE(@lockstock_insert_id, @@session.insert_id), \
             check_constraint_checks = \
             COALESCE(@lockstock_check_constraints, @@session.check_constraint_checks)"
        )
    };
}

/// The end of every restoring SET: the caller's `LAST_INSERT_ID()` put back (lockstock's
/// INSERTs changed it; `LAST_INSERT_ID(expr)` sets it), then the `@lockstock_*` user variables
/// the saving SET wrote are set back to NULL — what the caller's session read for them before
/// lockstock's first call. The assignments come after the ones that read them (a SET assigns in
/// order).
macro_rules! clear_saved {
    () => {
        ", @lockstock_last_insert_id = \
         LAST_INSERT_ID(COALESCE(@lockstock_last_insert_id, LAST_INSERT_ID())), \
         @lockstock_last_insert_id = NULL, \
         @lockstock_lock_wait = NULL, @lockstock_mdl_wait = NULL, \
         @lockstock_statement_time = NULL, \
         @lockstock_lc_messages = NULL, @lockstock_time_zone = NULL, \
         @lockstock_select_limit = NULL, @lockstock_unique_checks = NULL, \
         @lockstock_fk_checks = NULL, @lockstock_cs_client = NULL, \
         @lockstock_cs_results = NULL, @lockstock_cs_results_null = NULL, \
         @lockstock_collation = NULL, @lockstock_big_selects = NULL"
    };
}

statement! {
    /// Restores the session variables lockstock's first SET saved (MariaDB).
    RestoreMariaDb => concat!(
        restore_mariadb!(),
        clear_saved!(),
        ", @lockstock_isolation = NULL, @lockstock_read_only = NULL, @lockstock_insert_id = NULL, \
         @lockstock_check_constraints = NULL"
    )
}

statement! {
    /// Restores the session variables lockstock's first SET saved for a guarded write on a
    /// MariaDB Galera node (with `autocommit`, `wsrep_dirty_reads` and
    /// `wsrep_trx_fragment_size`).
    RestoreGalera => concat!(
        restore_mariadb!(),
        ", autocommit = COALESCE(@lockstock_autocommit, @@session.autocommit), \
         wsrep_dirty_reads = COALESCE(@lockstock_dirty_reads, @@session.wsrep_dirty_reads), \
         wsrep_trx_fragment_size = \
         COALESCE(@lockstock_fragment_size, @@session.wsrep_trx_fragment_size)",
        clear_saved!(),
        ", @lockstock_isolation = NULL, @lockstock_read_only = NULL, \
         @lockstock_insert_id = NULL, @lockstock_check_constraints = NULL, \
         @lockstock_autocommit = NULL, \
         @lockstock_dirty_reads = NULL, @lockstock_fragment_size = NULL"
    )
}

statement! {
    /// The savepoint a guarded write on a Galera node sets right after `BEGIN`.
    Savepoint => "SAVEPOINT lockstock"
}

statement! {
    /// Released right before COMMIT: fails when the transaction was rolled back meanwhile.
    ReleaseSavepoint => "RELEASE SAVEPOINT lockstock"
}

statement! {
    /// Restores the session variables lockstock's first SET saved (MySQL 8).
    RestoreMySql => concat!(
        "SET SESSION ",
        restore_shared!(),
        ", max_execution_time = \
         COALESCE(@lockstock_statement_time, @@session.max_execution_time)",
        clear_saved!()
    )
}

/// One constant statement built once per runner (session settings for a policy), prepared
/// once per connection: Diesel caches a statement without a static query id by its SQL text.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PreparedSql<'a>(pub(crate) &'a str);

impl QueryId for PreparedSql<'_> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl QueryFragment<Mysql> for PreparedSql<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Mysql>) -> QueryResult<()> {
        out.push_sql(self.0);
        Ok(())
    }
}

impl RunQueryDsl<MysqlConnection> for PreparedSql<'_> {}

/// [`PreparedSql`] whose one `?` is a bound `DOUBLE` (a transaction's statement limit): one
/// cached statement whatever the value.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PreparedSqlWith<'a>(pub(crate) &'a str, pub(crate) f64);

impl QueryId for PreparedSqlWith<'_> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl QueryFragment<Mysql> for PreparedSqlWith<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Mysql>) -> QueryResult<()> {
        let (before, after) = self.0.split_once('?').ok_or_else(|| {
            diesel::result::Error::QueryBuilderError("a statement without its parameter".into())
        })?;
        out.push_sql(before);
        out.push_bind_param::<diesel::sql_types::Double, f64>(&self.1)?;
        out.push_sql(after);
        Ok(())
    }
}

impl RunQueryDsl<MysqlConnection> for PreparedSqlWith<'_> {}

/// A hot row's locking read as the handoff's `Lock` sends it: `query` (a `... FOR
/// UPDATE` through the primary key) between a constant `prefix` and `suffix` — `... FOR UPDATE
/// NOWAIT`, or `SET STATEMENT max_statement_time = <s> FOR ... FOR UPDATE` (MariaDB), which
/// waits for the row in the server for at most the time limit, then fails with 1969 (only the
/// statement is rolled back). Each (query, form) is one cached prepared statement.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LockingRead<Q> {
    pub(crate) prefix: &'static str,
    pub(crate) query: Q,
    pub(crate) suffix: &'static str,
}

impl<Q: Query> Query for LockingRead<Q> {
    type SqlType = Q::SqlType;
}

impl<Q> QueryId for LockingRead<Q> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<Q: QueryFragment<Mysql>> QueryFragment<Mysql> for LockingRead<Q> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Mysql>) -> QueryResult<()> {
        out.push_sql(self.prefix);
        self.query.walk_ast(out.reborrow())?;
        out.push_sql(self.suffix);
        Ok(())
    }
}

impl<Q> RunQueryDsl<MysqlConnection> for LockingRead<Q> {}

/// A write that never waits for a row lock: `SET STATEMENT innodb_lock_wait_timeout = 0 FOR`
/// the write (MariaDB). Where it would wait (a gap another transaction has locked, another
/// transaction's uncommitted row under the same unique key) it is refused at once (1205, only
/// the statement rolled back), like a `NOWAIT` read, and the runner rolls back and retries. A
/// transaction that holds a hot row sends the writes that can meet other transactions' locks
/// this way: it never waits while it holds the row, so it never closes a deadlock — in which
/// the server could roll back another program's transaction as the victim. Cached by its SQL
/// text, as the write it wraps.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WaitFree<Q>(pub(crate) Q);

impl<Q> QueryId for WaitFree<Q> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<Q: QueryFragment<Mysql>> QueryFragment<Mysql> for WaitFree<Q> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Mysql>) -> QueryResult<()> {
        out.push_sql("SET STATEMENT innodb_lock_wait_timeout = 0 FOR ");
        self.0.walk_ast(out.reborrow())
    }
}

impl<Q: Query> Query for WaitFree<Q> {
    type SqlType = Q::SqlType;
}

impl<Q> RunQueryDsl<MysqlConnection> for WaitFree<Q> {}

/// Runs `write`, a statement sent while the transaction holds a hot row (the account, the
/// stock row) that can meet other transactions' locks — an INSERT: a gap another transaction
/// read under SERIALIZABLE, a row it inserted under the same unique key — so that it never
/// waits while the row is held: on MariaDB [`WaitFree`], refused at once where it would wait
/// (the runner rolls back and retries). A transaction that waited here could close a deadlock
/// with the other lock's holder, and the server could roll back someone else's transaction as
/// its victim. MySQL has no per-statement bound (and no lock wait below one second): there the
/// write may wait for up to `innodb_lock_wait_timeout`.
pub(crate) fn write_under_lock<W>(conn: &mut MysqlConnection, write: W) -> QueryResult<usize>
where
    W: QueryFragment<Mysql> + QueryId,
{
    let written = if bounded_waits() {
        ExecuteDsl::<MysqlConnection, Mysql>::execute(WaitFree(write), conn)
    } else {
        ExecuteDsl::<MysqlConnection, Mysql>::execute(write, conn)
    };
    if written.is_err() {
        // A write has no result to be left waiting for.
        note_clean_failure();
    }
    written
}

/// [`write_under_lock`] for a locking range read: `read`, sent while the transaction holds a
/// hot row, whose range can reach rows other transactions lock (under SERIALIZABLE a range
/// read locks the record after it, which may be another account's), answers its one row or is
/// refused at once where it would wait (MariaDB). Such a refusal comes after the server began
/// the result, so it is not noted clean: the runner then drops the connection's cached
/// statements (see [`forget_prepared`](crate::txn)) before the retry.
pub(crate) fn read_under_lock<Q, U>(conn: &mut MysqlConnection, read: Q) -> QueryResult<U>
where
    Q: Query + QueryFragment<Mysql> + QueryId + LoadQuery<'static, MysqlConnection, U>,
    WaitFree<Q>: LoadQuery<'static, MysqlConnection, U>,
{
    if bounded_waits() {
        WaitFree(read).get_result(conn)
    } else {
        read.get_result(conn)
    }
}

/// The most rows a multi-row INSERT may have and still be a cached prepared statement: one is
/// cached per row count (and table) up to this, so a connection holds at most this many per
/// table; a larger INSERT is prepared, run and closed each time (one round trip more).
pub(crate) const MAX_CACHED_ROWS: usize = 64;

/// The most parameters one prepared statement may bind on MySQL and MariaDB (the protocol
/// counts them in 16 bits; the server refuses more with "Prepared statement contains too many
/// placeholders").
pub(crate) const MAX_PLACEHOLDERS: usize = 65_535;

/// The most rows one multi-row INSERT writes. A batch with more rows is written with several
/// INSERTs in the same transaction ([`insert_chunks`]), so a batch of any size answers as its
/// single calls would, and no statement comes near [`MAX_PLACEHOLDERS`] or the server's
/// `max_allowed_packet`.
pub(crate) const MAX_INSERT_ROWS: usize = 1_000;

/// The most values one `IN (...)` list binds: a longer list is read with several statements.
pub(crate) const MAX_LIST_VALUES: usize = 10_000;

/// What `read` returns for `values`, read with one statement per [`MAX_LIST_VALUES`] of them
/// (an `IN (...)` list each), in order; with a `deadline`, [`Error::Timeout`](crate::Error::Timeout)
/// where it passes before a list after the first (see [`in_pieces`]).
pub(crate) fn read_in_lists<V, T, E>(
    values: &[V],
    deadline: Option<Deadline>,
    mut read: impl FnMut(&[V]) -> Result<Vec<T>, E>,
) -> Result<Vec<T>, crate::Error>
where
    crate::Error: From<E>,
{
    let mut all = Vec::new();
    for some in in_pieces(values.chunks(MAX_LIST_VALUES), deadline) {
        all.extend(read(some?)?);
    }
    Ok(all)
}

/// The `pieces` of a statement split in several (an INSERT per [`MAX_INSERT_ROWS`] rows, a
/// read per [`MAX_LIST_VALUES`] values), each but the first only while `deadline` has not
/// passed: after it, [`Error::Timeout`](crate::Error::Timeout) in its place, so a large batch
/// stops there (its transaction rolled back, nothing of it applied) instead of sending the
/// rest of its statements past its deadline. `None`: no deadline to keep here (a call of one
/// row, one piece).
pub(crate) fn in_pieces<'a, T: 'a>(
    pieces: impl Iterator<Item = &'a [T]>,
    deadline: Option<Deadline>,
) -> impl Iterator<Item = Result<&'a [T], crate::Error>> {
    pieces.enumerate().map(move |(at, piece)| match deadline {
        Some(deadline) if at > 0 => deadline.before_next_statement().map(|()| piece),
        _ => Ok(piece),
    })
}

/// How many rows of `R` one INSERT writes at most: [`MAX_INSERT_ROWS`], fewer for a row type
/// so wide that they would bind more than [`MAX_PLACEHOLDERS`].
pub(crate) const fn rows_per_insert<R: InsertRow>() -> usize {
    let fit = MAX_PLACEHOLDERS / R::COLUMNS;
    if fit < MAX_INSERT_ROWS {
        fit
    } else {
        MAX_INSERT_ROWS
    }
}

/// `rows` in the pieces one INSERT each writes ([`rows_per_insert`]), in order; with a
/// `deadline`, [`Error::Timeout`](crate::Error::Timeout) in place of a piece after the first
/// once it has passed ([`in_pieces`]).
pub(crate) fn insert_chunks<R: InsertRow>(
    rows: &[R],
    deadline: Option<Deadline>,
) -> impl Iterator<Item = Result<&[R], crate::Error>> {
    in_pieces(rows.chunks(rows_per_insert::<R>()), deadline)
}

/// A row type [`InsertRows`] writes: the INSERT's head, and the row's values bound in the
/// order of its columns.
pub(crate) trait InsertRow {
    /// ``INSERT INTO `table` (`a`, `b`) VALUES ``.
    const INSERT: &'static str;

    /// How many values one row binds (its columns).
    const COLUMNS: usize;

    /// Binds this row's values, comma-separated, in the order of [`INSERT`](Self::INSERT)'s
    /// columns.
    fn walk_values<'b>(&'b self, out: &mut AstPass<'_, 'b, Mysql>) -> QueryResult<()>;
}

/// Implements [`InsertRow`] for a row type: the table, then each field with its SQL type and
/// column, in order.
macro_rules! insert_row {
    ($ty:ty => $table:literal {
        $first:ident: $first_sql:ty => $first_col:literal
        $(, $field:ident: $sql:ty => $col:literal)* $(,)?
    }) => {
        impl $crate::statements::InsertRow for $ty {
            const INSERT: &'static str = concat!(
                "INSERT INTO `", $table, "` (`", $first_col, "`", $(", `", $col, "`",)* ") VALUES "
            );

            const COLUMNS: usize = 1 $(+ { let _ = $col; 1 })*;

            fn walk_values<'b>(
                &'b self,
                out: &mut diesel::query_builder::AstPass<'_, 'b, diesel::mysql::Mysql>,
            ) -> diesel::QueryResult<()> {
                out.push_bind_param::<$first_sql, _>(&self.$first)?;
                $(
                    out.push_sql(", ");
                    out.push_bind_param::<$sql, _>(&self.$field)?;
                )*
                Ok(())
            }
        }
    };
}
pub(crate) use insert_row;

/// ONE `INSERT` of `rows` (at least one), as a cached prepared statement. Diesel's own batch
/// insert (`insert_into(..).values(vec)`) is never cached — its SQL varies with the row count —
/// which costs a prepare round trip per batch, while the hot row is locked. The SQL of `n` rows
/// of one table is always the same, so this one is cached by its text (no static query id)
/// while it has at most [`MAX_CACHED_ROWS`] rows: a connection caches at most that many per
/// row type.
#[derive(Debug, Clone, Copy)]
pub(crate) struct InsertRows<'a, R>(pub(crate) &'a [R]);

impl<R> QueryId for InsertRows<'_, R> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<R: InsertRow> QueryFragment<Mysql> for InsertRows<'_, R> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Mysql>) -> QueryResult<()> {
        if self.0.len() > MAX_CACHED_ROWS {
            out.unsafe_to_cache_prepared();
        }
        if self.0.is_empty() {
            return Err(diesel::result::Error::QueryBuilderError(
                "an INSERT of no rows".into(),
            ));
        }
        if self.0.len() > rows_per_insert::<R>() {
            // Callers split larger batches with `insert_chunks`; never sent to the server.
            return Err(diesel::result::Error::QueryBuilderError(
                format!(
                    "an INSERT of {} rows (at most {})",
                    self.0.len(),
                    rows_per_insert::<R>()
                )
                .into(),
            ));
        }
        out.push_sql(R::INSERT);
        for (i, row) in self.0.iter().enumerate() {
            out.push_sql(if i == 0 { "(" } else { ", (" });
            row.walk_values(&mut out)?;
            out.push_sql(")");
        }
        Ok(())
    }
}

impl<R> RunQueryDsl<MysqlConnection> for InsertRows<'_, R> {}
