//! Hand-built statements for the hot paths, so that each is a cached prepared statement.
//!
//! Diesel re-prepares every `UPDATE` (its changesets may vary) and every derived `Insertable`
//! whose fields may be defaulted, which costs a prepare round trip — on the hot paths, while the
//! row lock is held. These types carry a static query id, so Diesel prepares each once per
//! connection and only executes it afterwards. The SQL is constant; values are bound.

use diesel::mysql::Mysql;
use diesel::query_builder::{AstPass, QueryFragment, QueryId};
use diesel::sql_types::{BigInt, Integer, Numeric};
use diesel::{MysqlConnection, QueryResult, RunQueryDsl};
use rust_decimal::Decimal;

/// `UPDATE user_balance SET balance = ?, version = ? WHERE user_id = ?`
#[derive(Debug, Clone, Copy, QueryId)]
pub(crate) struct SetBalance {
    pub(crate) user_id: i64,
    pub(crate) balance: Decimal,
    pub(crate) version: i64,
}

impl QueryFragment<Mysql> for SetBalance {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Mysql>) -> QueryResult<()> {
        out.push_sql("UPDATE `user_balance` SET `balance` = ");
        out.push_bind_param::<Numeric, _>(&self.balance)?;
        out.push_sql(", `version` = ");
        out.push_bind_param::<BigInt, _>(&self.version)?;
        out.push_sql(" WHERE `user_id` = ");
        out.push_bind_param::<BigInt, _>(&self.user_id)?;
        Ok(())
    }
}

impl RunQueryDsl<MysqlConnection> for SetBalance {}

/// `UPDATE fcfs_coupon SET stock_quantity = ? WHERE id = ?`
#[derive(Debug, Clone, Copy, QueryId)]
pub(crate) struct SetStock {
    pub(crate) campaign_id: i64,
    pub(crate) stock: i32,
}

impl QueryFragment<Mysql> for SetStock {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Mysql>) -> QueryResult<()> {
        out.push_sql("UPDATE `fcfs_coupon` SET `stock_quantity` = ");
        out.push_bind_param::<Integer, _>(&self.stock)?;
        out.push_sql(" WHERE `id` = ");
        out.push_bind_param::<BigInt, _>(&self.campaign_id)?;
        Ok(())
    }
}

impl RunQueryDsl<MysqlConnection> for SetStock {}

/// `UPDATE balance_history SET refunded_amount = ? WHERE id = ?`
#[derive(Debug, Clone, Copy, QueryId)]
pub(crate) struct SetRefunded {
    pub(crate) entry_id: i64,
    pub(crate) refunded: Decimal,
}

impl QueryFragment<Mysql> for SetRefunded {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Mysql>) -> QueryResult<()> {
        out.push_sql("UPDATE `balance_history` SET `refunded_amount` = ");
        out.push_bind_param::<Numeric, _>(&self.refunded)?;
        out.push_sql(" WHERE `id` = ");
        out.push_bind_param::<BigInt, _>(&self.entry_id)?;
        Ok(())
    }
}

impl RunQueryDsl<MysqlConnection> for SetRefunded {}

/// `COMMIT`, as a cached prepared statement: one round trip, where Diesel's transaction manager
/// sends it as a multi-statement batch (three round trips: the batch toggles the
/// multi-statement option on and off around it).
#[derive(Debug, Clone, Copy, QueryId)]
pub(crate) struct Commit;

impl QueryFragment<Mysql> for Commit {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Mysql>) -> QueryResult<()> {
        out.push_sql("COMMIT");
        Ok(())
    }
}

impl RunQueryDsl<MysqlConnection> for Commit {}

/// `ROLLBACK`, as a cached prepared statement.
#[derive(Debug, Clone, Copy, QueryId)]
pub(crate) struct Rollback;

impl QueryFragment<Mysql> for Rollback {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Mysql>) -> QueryResult<()> {
        out.push_sql("ROLLBACK");
        Ok(())
    }
}

impl RunQueryDsl<MysqlConnection> for Rollback {}

/// Restores the session variables lockstock's begin batch saved (MariaDB).
#[derive(Debug, Clone, Copy, QueryId)]
pub(crate) struct RestoreMariaDb;

impl QueryFragment<Mysql> for RestoreMariaDb {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Mysql>) -> QueryResult<()> {
        out.push_sql(
            "SET SESSION innodb_lock_wait_timeout = @lockstock_lock_wait, \
             max_statement_time = @lockstock_statement_time, \
             lc_messages = @lockstock_lc_messages, time_zone = @lockstock_time_zone, \
             tx_isolation = @lockstock_isolation",
        );
        Ok(())
    }
}

impl RunQueryDsl<MysqlConnection> for RestoreMariaDb {}

/// Restores the session variables lockstock's begin batch saved (MySQL 8).
#[derive(Debug, Clone, Copy, QueryId)]
pub(crate) struct RestoreMySql;

impl QueryFragment<Mysql> for RestoreMySql {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Mysql>) -> QueryResult<()> {
        out.push_sql(
            "SET SESSION innodb_lock_wait_timeout = @lockstock_lock_wait, \
             max_execution_time = @lockstock_statement_time, \
             lc_messages = @lockstock_lc_messages, time_zone = @lockstock_time_zone",
        );
        Ok(())
    }
}

impl RunQueryDsl<MysqlConnection> for RestoreMySql {}

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
