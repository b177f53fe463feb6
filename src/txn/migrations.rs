//! [`run_migrations`](crate::run_migrations) with the caller's session kept.

use diesel::connection::SimpleConnection;
use diesel::mysql::MysqlConnection;
use diesel_migrations::MigrationHarness;

use super::{
    bounded, ensure_no_open_transaction, refused_as_nested, Deadline, ServerFlavor, TxnPolicy,
    NESTED_LOCALE,
};
use crate::error::Error;

/// Puts the caller's values back and clears the user variables.
const RESTORE: &str = "SET SESSION completion_type = @lockstock_completion_type, \
    autocommit = @lockstock_autocommit, sql_mode = @lockstock_sql_mode, \
    @lockstock_completion_type = NULL, @lockstock_autocommit = NULL, \
    @lockstock_sql_mode = NULL";

/// The `sql_mode` the migrations run under (what they were written for: MariaDB's default
/// without `NO_AUTO_CREATE_USER`, which MySQL 8 no longer knows). A caller's mode could break
/// them: with EMPTY_STRING_IS_NULL the designated-writer row's `''` is NULL in a NOT NULL
/// column.
const MIGRATION_SQL_MODE: &str =
    "STRICT_TRANS_TABLES,ERROR_FOR_DIVISION_BY_ZERO,NO_ENGINE_SUBSTITUTION";

/// Applies the pending migrations, bounded by `deadline` if there is one.
pub(crate) fn run(conn: &mut MysqlConnection, deadline: Option<Deadline>) -> Result<(), Error> {
    ensure_no_open_transaction(conn)?;
    match deadline {
        // Nothing is sent past the deadline.
        Some(deadline) if deadline.is_expired() => Err(Error::Timeout {
            elapsed: deadline.elapsed(),
        }),
        Some(deadline) => {
            let grace = TxnPolicy::default().unresponsive_grace;
            bounded(conn, deadline, grace, |conn, _| migrate(conn))
        }
        None => migrate(conn),
    }
}

fn migrate(conn: &mut MysqlConnection) -> Result<(), Error> {
    // One atomic SET saves and sets what Diesel's harness depends on; on MariaDB it fails
    // (an unknown locale, nothing set) inside a transaction the caller opened with a raw
    // `BEGIN`, which `autocommit = 1` and the DDL would commit. (MySQL has no
    // `@@in_transaction`.)
    let nested_check = match ServerFlavor::ask(conn)? {
        ServerFlavor::MariaDb => format!(
            "SESSION lc_messages = \
             IF(@@in_transaction, '{NESTED_LOCALE}', @@session.lc_messages), "
        ),
        ServerFlavor::MySql => String::new(),
    };
    let setup = format!(
        "SET @lockstock_completion_type = @@session.completion_type, \
         @lockstock_autocommit = @@session.autocommit, \
         @lockstock_sql_mode = @@session.sql_mode, {nested_check}\
         SESSION completion_type = 'NO_CHAIN', autocommit = 1, \
         sql_mode = '{MIGRATION_SQL_MODE}'"
    );
    if let Err(e) = conn.batch_execute(&setup) {
        let error = Error::from(e);
        return Err(if error.server_error().is_some_and(refused_as_nested) {
            Error::NestedTransaction
        } else {
            error
        });
    }
    let migrated = conn
        .run_pending_migrations(crate::MIGRATIONS)
        .map(|_| ())
        .map_err(|e| Error::Migration(e.into()));
    // Where the caller's values cannot be put back, the session is ended (as the runner
    // ends one it could not restore after a COMMIT): the answer stays the migrations'.
    if conn.batch_execute(RESTORE).is_err() {
        super::transaction::close_broken(conn);
    }
    migrated
}
