//! [`run_migrations`](crate::run_migrations) with the caller's session kept.

use diesel::connection::SimpleConnection;
use diesel::mysql::MysqlConnection;
use diesel_migrations::MigrationHarness;

use super::policy::NO_SELECT_LIMIT;
use super::transaction::READABLE_ERRORS;
use super::{
    bounded, ensure_no_open_transaction, refused_as_nested, Deadline, ServerFlavor, TxnPolicy,
    NESTED_LOCALE, NOT_REPLICATED_LOCALE, REPLICATING,
};
use crate::error::Error;

/// Puts the caller's values back and clears the user variables (both servers).
const RESTORE: &str = "SET SESSION completion_type = @lockstock_completion_type, \
    lock_wait_timeout = @lockstock_migration_lock_wait, @lockstock_migration_lock_wait = NULL, \
    autocommit = @lockstock_autocommit, sql_mode = @lockstock_sql_mode, \
    sql_select_limit = @lockstock_select_limit, sql_big_selects = @lockstock_big_selects, \
    default_storage_engine = @lockstock_engine, lc_messages = @lockstock_migration_lc, \
    @lockstock_migration_lc = NULL, @lockstock_completion_type = NULL, @lockstock_autocommit = NULL, \
    @lockstock_sql_mode = NULL, @lockstock_select_limit = NULL, \
    @lockstock_big_selects = NULL, @lockstock_engine = NULL, \
    character_set_results = IF(@lockstock_results_null, NULL, @lockstock_results), \
    @lockstock_results = NULL, @lockstock_results_null = NULL, @lockstock_step = NULL";

/// The statement a migration prepares for each of its steps that may already be applied (see
/// the holds migration): deallocated here where the migration failed before it did.
const DEALLOCATE_STEP: &str = "DEALLOCATE PREPARE lockstock_step";

/// [`RESTORE`]'s part that only MariaDB has.
const RESTORE_MARIADB: &str = ", tx_read_only = @lockstock_read_only, \
    max_statement_time = @lockstock_statement_time, \
    check_constraint_checks = @lockstock_check_constraints, \
    @lockstock_read_only = NULL, @lockstock_statement_time = NULL, \
    @lockstock_check_constraints = NULL";

/// [`RESTORE`]'s part for a Galera node.
const RESTORE_GALERA: &str = ", wsrep_OSU_method = @lockstock_osu_method, \
    @lockstock_osu_method = NULL";

/// [`RESTORE`]'s part that only MySQL has.
const RESTORE_MYSQL: &str = ", transaction_read_only = @lockstock_read_only, \
    max_execution_time = @lockstock_statement_time, \
    @lockstock_read_only = NULL, @lockstock_statement_time = NULL";

/// The `sql_mode` the migrations run under (what they were written for: MariaDB's default
/// without `NO_AUTO_CREATE_USER`, which MySQL 8 no longer knows). A caller's mode could break
/// them: with EMPTY_STRING_IS_NULL the designated-writer row's `''` is NULL in a NOT NULL
/// column.
const MIGRATION_SQL_MODE: &str =
    "STRICT_TRANS_TABLES,ERROR_FOR_DIVISION_BY_ZERO,NO_ENGINE_SUBSTITUTION";

/// Applies the pending migrations, bounded by `deadline` if there is one.
pub(crate) fn run(conn: &mut MysqlConnection, deadline: Option<Deadline>) -> Result<(), Error> {
    // Inside another lockstock call's body: by its deadline at the latest.
    let deadline = match deadline {
        Some(deadline) => Some(super::enclosed(deadline)),
        None => super::enclosing(),
    };
    ensure_no_open_transaction(conn)?;
    match deadline {
        // Nothing is sent past the deadline.
        Some(deadline) if deadline.is_expired() => Err(Error::Timeout {
            elapsed: deadline.elapsed(),
        }),
        Some(deadline) => {
            let grace = TxnPolicy::default().unresponsive_grace;
            bounded(conn, deadline, grace, |conn, _| {
                migrate(conn, Some(deadline))
            })
        }
        None => migrate(conn, None),
    }
}

/// How long a migration that failed on what it creates being there already waits for another
/// process to record it (several processes that run the migrations as they start), at most.
const OTHERS_MIGRATING: std::time::Duration = std::time::Duration::from_secs(10);

/// The server's own bounds for the next migration's statements by `deadline`, as it starts:
/// the time left as `lock_wait_timeout` and, where `statement_limit` (MariaDB, not a Galera
/// node), as `max_statement_time` — so that a statement the watchdog gave up on does not go on
/// in the server (waiting for a table's metadata lock, say, and applying its migration later).
/// Both at most a year, the longest the server takes. Not `max_statement_time` on a Galera
/// node: the other nodes run a DDL replicated in total order whatever cut it short on this one,
/// and the cluster's schemas would differ.
///
/// `lock_wait_timeout` counts whole seconds. Under `max_statement_time` it is the time left
/// rounded up (the statement limit ends the wait in time); alone it is the time left rounded
/// *down* — rounded up it let the server wait up to a second past the deadline, beyond the
/// watchdog's grace, and apply the migration after the call had answered. Under a second left
/// that is 0: MariaDB then does not wait at all (a table another session holds fails the
/// migration at once); MySQL 8, whose least is 1, waits up to a second (not run here).
fn server_bounds(deadline: Deadline, statement_limit: bool) -> String {
    let longest = super::policy::LONGEST_LOCK_WAIT_SECONDS as f64;
    let left = deadline.remaining().as_secs_f64().min(longest);
    if statement_limit {
        let lock_wait = left.ceil().max(1.0) as u64;
        format!(
            "SET SESSION lock_wait_timeout = {lock_wait}, max_statement_time = {:.3}",
            left.max(0.02)
        )
    } else {
        format!("SET SESSION lock_wait_timeout = {}", left.floor() as u64)
    }
}

/// Runs every pending migration, each bounded in the server by the time left as it starts
/// ([`server_bounds`]), where there is a `deadline`. None starts once the deadline has passed
/// (the ones before it stay applied and recorded).
fn run_pending(
    conn: &mut MysqlConnection,
    deadline: Option<Deadline>,
    statement_limit: bool,
) -> diesel::migration::Result<()> {
    for migration in conn.pending_migrations(crate::MIGRATIONS)? {
        if let Some(deadline) = deadline {
            if deadline.is_expired() {
                return Err(format!(
                    "the deadline passed before migration {} started; it and the ones after it \
                     are pending (the ones before it are applied)",
                    migration.name()
                )
                .into());
            }
            conn.batch_execute(&server_bounds(deadline, statement_limit))?;
        }
        conn.run_migration(&*migration)?;
    }
    Ok(())
}

fn migrate(conn: &mut MysqlConnection, deadline: Option<Deadline>) -> Result<(), Error> {
    // One atomic SET saves and sets what Diesel's harness depends on; on MariaDB it fails
    // (an unknown locale, nothing set) inside a transaction the caller opened with a raw
    // `BEGIN`, which `autocommit = 1` and the DDL would commit. (MySQL has no
    // `@@in_transaction`.)
    // Also what Diesel's harness reads and writes with: every applied version read (a
    // caller's `sql_select_limit` made it run an applied migration again: "Table ...
    // already exists"; `max_join_size` refused the read), no time limit but the deadline's,
    // read-write whatever the caller set for its transactions, and its own table InnoDB; and
    // English messages whatever the caller's `lc_messages` (`created_already` reads them).
    // On a Galera node the DDL must replicate too: the caller's session must replicate (or
    // the refusal, an unknown locale, answers `NotReplicated`) and run DDL cluster-wide
    // (`wsrep_OSU_method = TOI`: under a caller's RSU each CREATE TABLE stayed on this node,
    // while Diesel's row of applied versions replicated).
    let (flavor_saves, flavor_sets, restore_flavor, statement_limit) = match ServerFlavor::ask(
        conn,
    )? {
        ServerFlavor::MariaDb => {
            let galera = super::session::galera_node(conn)?.1;
            let (replicated, osu_save, osu_set, osu_restore) = if galera {
                (
                    format!(
                        "IF({REPLICATING}, _utf8mb4'en_US', _utf8mb4'{NOT_REPLICATED_LOCALE}')"
                    ),
                    "@lockstock_osu_method = @@session.wsrep_OSU_method, ",
                    ", wsrep_OSU_method = _utf8mb4'TOI'",
                    RESTORE_GALERA,
                )
            } else {
                ("_utf8mb4'en_US'".to_owned(), "", "", "")
            };
            (
                format!(
                    "@lockstock_read_only = @@session.tx_read_only, \
                     @lockstock_statement_time = @@session.max_statement_time, \
                     @lockstock_check_constraints = @@session.check_constraint_checks, {osu_save}\
                     SESSION lc_messages = \
                     IF(@@in_transaction, _utf8mb4'{NESTED_LOCALE}', {replicated}), "
                ),
                format!("tx_read_only = 0, max_statement_time = 0, check_constraint_checks = 1{osu_set}"),
                format!("{RESTORE_MARIADB}{osu_restore}"),
                !galera,
            )
        }
        ServerFlavor::MySql => (
            "@lockstock_read_only = @@session.transaction_read_only, \
             @lockstock_statement_time = @@session.max_execution_time, "
                .to_owned(),
            "transaction_read_only = 0, max_execution_time = 0, lc_messages = _utf8mb4'en_US'"
                .to_owned(),
            RESTORE_MYSQL.to_owned(),
            false,
        ),
    };
    let setup = format!(
        "SET @lockstock_completion_type = @@session.completion_type, \
         @lockstock_migration_lock_wait = @@session.lock_wait_timeout, \
         @lockstock_autocommit = @@session.autocommit, \
         @lockstock_sql_mode = @@session.sql_mode, \
         @lockstock_select_limit = @@session.sql_select_limit, \
         @lockstock_big_selects = @@session.sql_big_selects, \
         @lockstock_engine = @@session.default_storage_engine, \
         @lockstock_migration_lc = @@session.lc_messages, \
         @lockstock_results = @lockstock_given_results, \
         @lockstock_results_null = @lockstock_given_results_null, \
         @lockstock_given_results = NULL, @lockstock_given_results_null = NULL, {flavor_saves}\
         SESSION completion_type = _utf8mb4'NO_CHAIN', autocommit = 1, character_set_results = utf8mb4, \
         sql_mode = _utf8mb4'{MIGRATION_SQL_MODE}', sql_select_limit = {NO_SELECT_LIMIT}, \
         sql_big_selects = 1, default_storage_engine = InnoDB, {flavor_sets}"
    );
    // A panic on the way (the caller's Diesel instrumentation, run inside the migrations'
    // statements — from the setting SET on) leaves the session with the migrations' settings:
    // marked broken before the unwind goes on, so that no pool hands it out again.
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // The caller's result character set first, as the runner does: the setup's refusals
        // must be readable (under utf16 results they read as successes, and the DDL would
        // commit the caller's open transaction). The setup saves it.
        conn.batch_execute(READABLE_ERRORS)?;
        if let Err(e) = conn.batch_execute(&setup) {
            let error = Error::from(e);
            // The caller's result character set back (as the runner puts it back, sent again
            // after a late abort); where it cannot be, the session was ended: that is the answer
            // (a caller's open transaction is gone with it), not the setup's refusal.
            if let Some(broken) = super::transaction::undo_readable_errors(conn) {
                if error.server_kind() != Some(crate::ServerErrorKind::ConnectionLost) {
                    return Err(broken);
                }
            }
            return Err(if error.server_error().is_some_and(refused_as_nested) {
                Error::NestedTransaction
            } else if error
                .server_error()
                .is_some_and(|e| e.message().contains(NOT_REPLICATED_LOCALE))
            {
                Error::NotReplicated
            } else {
                error
            });
        }
        let migrated =
            run_pending(conn, deadline, statement_limit).map_err(|e| Error::Migration(e.into()));
        // Whether a migration failed here (also one another process then turns out to have
        // applied: its step was left prepared all the same).
        let failed_here = migrated.is_err();
        // Another process running the migrations at the same time applied this one first: once
        // it has recorded every migration, there is nothing left to do.
        let migrated = match migrated {
            Err(failure)
                if created_already(&failure.to_string()) && recorded_by_another(conn, deadline) =>
            {
                Ok(())
            }
            migrated => migrated,
        };
        // A migration that failed between preparing a step and deallocating it leaves it
        // prepared on the caller's session (the server answers "unknown" where none is).
        if failed_here {
            let _ = conn.batch_execute(DEALLOCATE_STEP);
        }
        // Where the caller's values cannot be put back, the session is ended (as the runner
        // ends one it could not restore after a COMMIT): the answer stays the migrations'.
        if conn
            .batch_execute(&format!("{RESTORE}{restore_flavor}"))
            .is_err()
        {
            super::transaction::close_broken(conn);
        }
        migrated
    }));
    outcome.unwrap_or_else(|panic| {
        super::transaction::mark_broken(conn);
        std::panic::resume_unwind(panic)
    })
}

/// Whether a migration failed on what it creates being there already (a table, a column, an
/// index, the row that records it).
fn created_already(failure: &str) -> bool {
    let failure = failure.to_ascii_lowercase();
    failure.contains("already exists") || failure.contains("duplicate")
}

/// Whether every migration is recorded by now, or within [`OTHERS_MIGRATING`] (and before
/// `deadline`): another process applied them.
fn recorded_by_another(conn: &mut MysqlConnection, deadline: Option<Deadline>) -> bool {
    let mut wait = OTHERS_MIGRATING;
    if let Some(deadline) = deadline {
        wait = wait.min(deadline.remaining());
    }
    let until = std::time::Instant::now() + wait;
    loop {
        match conn.has_pending_migration(crate::MIGRATIONS) {
            Ok(false) => return true,
            Ok(true) if std::time::Instant::now() < until => {
                // Not past `until` (so not past the deadline) before asking again.
                let left = until.saturating_duration_since(std::time::Instant::now());
                std::thread::sleep(left.min(std::time::Duration::from_millis(50)));
            }
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::server_bounds;
    use crate::Deadline;
    use diesel::connection::SimpleConnection;
    use std::time::{Duration, Instant};

    /// Without a statement limit (a Galera node) the lock wait is the time left rounded down:
    /// a migration waiting for a table another session holds gives up by the deadline in the
    /// server, never after it. With 0.7 s left the wait is 0 — MariaDB fails the DDL at once —
    /// and with 1.6 s left it is one second. Before, both were rounded up (1 s and 2 s): the
    /// server went on waiting past the deadline and the watchdog's grace, and could apply the
    /// migration after the call answered.
    #[test]
    fn without_a_statement_limit_the_lock_wait_ends_by_the_deadline() {
        let bound = |left: Duration| server_bounds(Deadline::after(left), false);
        assert_eq!(
            bound(Duration::from_millis(1600)),
            "SET SESSION lock_wait_timeout = 1"
        );
        let (url, mut conn) = crate::util::test_database("unit_migration_lock_wait");
        let Ok(mut holder) = <diesel::MysqlConnection as diesel::Connection>::establish(&url)
        else {
            panic!("a second connection");
        };
        assert!(conn
            .batch_execute("CREATE TABLE side (id INT PRIMARY KEY) ENGINE=InnoDB")
            .is_ok());
        assert!(holder.batch_execute("LOCK TABLES side READ").is_ok());
        let left = Duration::from_millis(700);
        let deadline = Deadline::after(left);
        let started = Instant::now();
        assert!(conn.batch_execute(&server_bounds(deadline, false)).is_ok());
        let altered = conn.batch_execute("ALTER TABLE side ADD COLUMN v INT");
        let took = started.elapsed();
        assert!(altered.is_err(), "the table is held");
        assert!(took < left, "gave up after {took:?}, past the deadline");
        assert!(holder.batch_execute("UNLOCK TABLES").is_ok());
    }
}
