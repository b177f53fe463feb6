//! The one transaction runner: isolation, session timeouts, bounded jittered retry and a deadline.
//!
//! Every balance or stock change in lockstock goes through [`TxnRunner::run`]. It
//! 1. refuses to run inside a transaction the caller opened (it could not retry it),
//! 2. saves the caller's session variables (and its `LAST_INSERT_ID()`, which lockstock's
//!    INSERTs change: put back with them) and sets its own in one atomic `SET` (or, on a
//!    connection that carries them already, only `SET TRANSACTION ISOLATION LEVEL ...`), then
//!    `BEGIN` — each a single cached prepared statement, never a multi-statement batch; on the
//!    caller's own session the result character set is saved and set to utf8mb4 in a `SET` of
//!    its own before (under a caller's `utf16`, `ucs2` or `utf32` the server's error texts
//!    reach Diesel empty, and Diesel takes an error without text for a success: the atomic
//!    `SET`'s refusals would go unseen),
//! 3. runs the body, then COMMIT (`AND NO CHAIN NO RELEASE`, as every ROLLBACK: a caller's
//!    `completion_type` must not open a transaction on its connection after lockstock's, nor
//!    close it; a write's transaction is READ WRITE, whatever the caller's `SET TRANSACTION`
//!    left for its next one; a cached prepared statement: one round trip; in a combiner's
//!    batch the key's turn is handed on just before it is sent, see the `combine` module); any
//!    error — or a panic — rolls the whole transaction back: MariaDB's lock wait timeout (also its
//!    NOWAIT refusal, 1205) rolls back only the statement, so the runner must not continue it,
//! 4. restarts the body from the start after a retryable refusal, sleeping a full-jitter
//!    exponential backoff, bounded by attempts and by a deadline for the whole call.
//!
//! # Statements that wait, and the deadline
//!
//! The hot rows are read with NOWAIT, but other statements may wait for a lock: a row another
//! transaction inserted or locked (a user's coupon, an idempotency key — and under SERIALIZABLE
//! every plain read takes shared locks), or a table's metadata lock (an `ALTER TABLE`, a `LOCK
//! TABLES`). The policy bounds row-lock waits by [`TxnPolicy::lock_wait_timeout`]
//! (`innodb_lock_wait_timeout`), metadata-lock waits by the same (`lock_wait_timeout`, which the
//! server leaves at a year) and every statement by [`TxnPolicy::statement_timeout`]. Where the
//! call has less time left than that when a transaction begins (MariaDB), the transaction's
//! statements are limited to the time left: the first SET takes `max_statement_time` as a
//! parameter (no extra statement), and on a connection that carries the settings (whose `SET
//! TRANSACTION` cannot carry it) the transaction is begun as on the caller's own connection —
//! settings saved, set and restored, two round trips more — and not opened ahead by a combiner.
//! A statement before the COMMIT stopped there answers [`Error::Contended`] (nothing applied)
//! once the deadline has passed; the connection stays usable. A COMMIT stopped there (it waited
//! that long, e.g. behind a backup's `BACKUP STAGE BLOCK_COMMIT` or `FLUSH TABLES WITH READ
//! LOCK`) answers [`Error::OutcomeUnknown`]: the server does not say whether it was stopped
//! before anything was applied. Each statement gets the time left when its
//! transaction began (at least 20 ms, so that a COMMIT sent at the last moment is not stopped
//! half-way by the limit alone), so several long waits in one transaction may still outlast the deadline (the
//! watchdog below then ends the call); so may a statement slow for another reason than a lock
//! on a connection that carries the settings, up to the statement limit. MySQL 8 (on paper)
//! keeps the policy's limits.
//!
//! The price: a call with less time left than the policy's lock wait (1 s by default — every
//! call of a policy whose deadline is that short) sends two statements more per transaction on
//! a pooled connection (the result character set's SET before the saving SET, which takes the
//! place of `SET TRANSACTION`, and the restoring SET after COMMIT), and a combiner's next batch
//! does not open its transaction ahead for it.
//!
//! # MariaDB Galera: a transaction rolled back without an error
//!
//! On a Galera node a transaction can be brute-force aborted by a replicated write that needs
//! one of its locks (writes on several nodes; a failover's in-flight write-sets). MariaDB 10.11
//! was seen to roll such a transaction back between two statements WITHOUT reporting it: the
//! next statement then ran outside any transaction, so under `autocommit = 1` the rest of the
//! body would commit statement by statement and the final COMMIT succeed — half a transaction
//! applied and answered as done. On a Galera node (a wsrep provider configured and loaded:
//! `@@wsrep_provider` and the `wsrep_provider_name` status — a server started with a provider
//! configured but `wsrep_on = OFF` loads none and is standalone) every writing transaction is
//! therefore guarded. Which servers are nodes: a connection that carries lockstock's session
//! settings was asked as they were applied; otherwise a runner takes every server for what the
//! last one it asked was, and corrects itself in the write's first SET, before anything
//! changes — a write taken for a standalone server's refuses on a node (`@@global.wsrep_on`
//! and `@@global.wsrep_provider`, on a server built with Galera; the runner then begins again,
//! guarded), and a node's refusal of a session that does not replicate
//! ([`Error::NotReplicated`]) asks the server again (a standalone server: begun again,
//! unguarded), as does a first SET that names wsrep variables and fails (a server built without
//! Galera, met after one built with it: begun again without them). A runner whose first server
//! was built without Galera has no such check, and takes a node it meets later for a
//! standalone server on connections without the settings. Guarded:
//! - the first SET refuses ([`Error::NotReplicated`]), before anything changes, on a session
//!   whose replication a caller turned off (`wsrep_on = 0`): its writes would stay on this
//!   node, and the cluster's copies of the rows would part;
//! - it also saves, pins and later restores `wsrep_dirty_reads = 0` (a node outside the
//!   Primary component would otherwise answer a write's reads from its frozen rows rather than
//!   refuse with 1047) and `wsrep_trx_fragment_size = 0` (under a caller's streaming
//!   replication a statement's duplicate key aborts the whole transaction with 1213, and a
//!   batch that meets a key taken answered `Contended` instead of per request);
//! - the first SET also saves the caller's `autocommit` and sets `autocommit = 0` (restored
//!   afterwards), so statements after a silent rollback open a new transaction instead of
//!   committing one by one — and the marked-connection shortcut is not used;
//! - `SAVEPOINT lockstock` right after `BEGIN`, `RELEASE SAVEPOINT lockstock` right before
//!   COMMIT: a rollback drops the savepoint, so the release fails, the runner rolls back what
//!   ran after the silent rollback and retries the whole transaction (a retryable
//!   [`ServerErrorKind::Deadlock`]).
//!
//! What remains is the one round trip between the release and COMMIT: a silent rollback in exactly
//! that gap would make the COMMIT commit nothing and answer success. Measured on a 2-node cluster
//! (MariaDB 10.11.19, Galera 26.4.23) with statements shaped like a guarded ledger batch: an abort
//! that reaches the transaction while it waits after the release is reported by the COMMIT (a
//! deadlock, retried); in 120 s of conflicting writes from both nodes the savepoint caught 589
//! silent rollbacks, none fell into the gap, and all 8,936 COMMITs answered success were applied
//! — while the other node's unguarded transactions (`autocommit = 1`, no savepoint) answered
//! success with half of them applied 53 times in 52,809. A silent rollback there would have to
//! race the release statement itself. It takes writes on several nodes to brute-force abort at
//! all; with one writer (see [`route`](crate::route)) none were seen.
//! A SET before it (one more round trip) refuses ([`Error::NotDesignatedWriter`]) a write on a node
//! other than the designated writer of the `designated_writer` row (once a router designated one),
//! unless [`TxnPolicy::designated_writer_only`] is off.
//!
//! # A server that never answers
//!
//! The deadline bounds what lockstock decides (retries, backoff, what it sends next), but a
//! statement already sent waits for the server's answer, and Diesel's `MysqlConnection` sets no
//! client read timeout (and keeps the `MYSQL*` handle that could set one private): a frozen or
//! partitioned server, or a Galera node that brute-force aborted the transaction and never
//! reports it, would block the calling thread in libmariadb's `poll` for ever.
//!
//! So every call runs under a process-wide watchdog (one thread, started on first use). The
//! runner arms it for the calling thread when the call starts, due at the deadline plus
//! [`TxnPolicy::unresponsive_grace`], and disarms it when the call returns — a mutex push and
//! removal, no round trip. If the call is still running when the entry comes due, the watchdog
//! finds the socket the thread is blocked on (from `/proc/self/task/<tid>/syscall`) and shuts
//! it down: the statement fails with a lost connection, the server rolls an open transaction
//! back when it notices, and the caller sees, by deadline + grace (plus scheduling):
//! - [`Error::ServerUnresponsive`] when COMMIT had not been sent (nothing committed), also for a
//!   read-only snapshot;
//! - [`Error::OutcomeUnknown`] when the COMMIT itself got no answer;
//! - the value, when the answer arrived just as the socket was shut down.
//!
//! The connection is then marked broken (an r2d2 pool discards it); nothing more is tried on it
//! beyond a ROLLBACK that fails at once, and the call is never retried on it. The statements
//! sent outside a transaction ([`apply_session_settings`], the validity ping of a combiner's
//! pool checkout) run under the watchdog as well. Not covered: a caller's own pool checkout
//! (r2d2 pings with `test_on_check_out`, on by default) and opening a new connection, which
//! Diesel bounds by nothing either.
//!
//! Linux only (x86_64 and aarch64). Elsewhere nothing is armed and a call waits as long as the
//! server does.

mod handoff;
mod policy;
mod session;
#[cfg(test)]
pub(crate) mod tests;
mod transaction;
mod watchdog;

pub(crate) use handoff::{bounded_waits, locking_read, with_handoff, Handoff, Holding};
pub use policy::{Attempts, Deadline, Isolation, RetryPolicy, StatementCache, TxnPolicy};
pub use session::{apply_session_settings, ServerFlavor, SessionSettings};
use session::{carries_settings, set_primed, take_primed};
pub(crate) use session::{statements_sent, statements_served};
use transaction::{
    end_unused, ensure_no_open_transaction, forget_cache_probe, open_transaction, run_transaction,
    Begin, Restore,
};
pub(crate) use transaction::{
    mark_broken, note_clean_failure, release_savepoint, silently_rolled_back,
};
pub use watchdog::watchdog_available;
use watchdog::{Cut, Guard};

pub(crate) mod migrations;

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use diesel::mysql::MysqlConnection;
use diesel::RunQueryDsl;

use crate::error::{Error, ServerError, ServerErrorKind};
use crate::statements::{PreparedSql, PreparedSqlWith};

/// Runs transactions under a [`TxnPolicy`]. Domain types hold one; it holds no connection.
/// [`TxnRunner::default`] is [`TxnRunner::new`] with the default policy.
#[derive(Debug)]
pub struct TxnRunner {
    policy: TxnPolicy,
    /// What the first server this runner met is: its flavour, whether it rolls whole
    /// transactions back on a lock wait timeout, whether it is built with Galera.
    server: OnceLock<ServerFacts>,
    /// What the server of a connection without lockstock's mark is taken for: a [`ServerKind`]
    /// as a number ([`UNKNOWN`] before the first) — what the runner last found; a connection's
    /// own first SET tells when that is wrong (see [`RunnerSql::new`]).
    kind: AtomicU8,
    /// The statements for each [`ServerKind`], built when first needed (boxed: a runner is part
    /// of every issuer and ledger).
    sql: [OnceLock<Box<RunnerSql>>; 3],
    insert_ids: OnceLock<InsertIds>,
}

/// What a runner learns of the first server it meets (see [`TxnRunner`]).
#[derive(Debug, Clone, Copy)]
struct ServerFacts {
    flavor: ServerFlavor,
    whole_rollback: bool,
}

/// How a runner writes on a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ServerKind {
    /// A standalone server without wsrep variables (built without Galera; MySQL): plain.
    Plain = 0,
    /// A standalone MariaDB built with Galera: its writes' first SET checks that it is not a
    /// node after all (see [`RunnerSql::new`]).
    Tripwired = 1,
    /// A Galera node: writes guarded.
    Galera = 2,
}

impl ServerKind {
    /// The kind of a server by what [`session::galera_node`] answers: (built with Galera, a
    /// node).
    pub(super) fn of(flavor: ServerFlavor, (built, node): (bool, bool)) -> Self {
        match (flavor, built, node) {
            (ServerFlavor::MySql, ..) | (_, false, _) => Self::Plain,
            (_, true, false) => Self::Tripwired,
            (_, true, true) => Self::Galera,
        }
    }

    fn from_number(number: u8) -> Option<Self> {
        [Self::Plain, Self::Tripwired, Self::Galera]
            .into_iter()
            .find(|kind| *kind as u8 == number)
    }
}

/// [`TxnRunner::kind`]: not asked yet.
const UNKNOWN: u8 = u8::MAX;

/// The value that makes the first SET of an unguarded write refuse, atomically and before
/// anything changes, on a server that is a Galera node after all (a runner that met a
/// standalone server first): the runner then begins again, guarded.
pub(crate) const GALERA_NODE_LOCALE: &str = "lockstock_galera_node";

/// The statements a runner sends, built once for a standalone server and once for a Galera node:
/// a runner talks to one server flavour (the first it met's). Each is a
/// single statement sent as a cached prepared statement — never a multi-statement batch, whose
/// remaining results a `KILL QUERY` can leave the client waiting for forever.
#[derive(Debug)]
struct RunnerSql {
    flavor: ServerFlavor,
    /// A MariaDB Galera node: writes are guarded against a silent brute-force rollback (see
    /// the module docs).
    galera: bool,
    /// The server rolls a whole transaction back on a lock wait timeout, on MariaDB a NOWAIT
    /// refusal included (`innodb_rollback_on_timeout`, off by default): a refused statement may not be
    /// sent again in the same transaction (see [`handoff`]).
    whole_rollback: bool,
    /// The policy's `SET SESSION` statement (what [`apply_session_settings`] marks).
    session: String,
    /// Write / read: the statements before BEGIN on a connection without the settings.
    own: [Vec<String>; 2],
    /// Write / read: the statements before BEGIN on a connection that carries them.
    marked: [Vec<String>; 2],
}

/// What the first SET saves on both servers before it sets lockstock's values: the caller's
/// `LAST_INSERT_ID()` and every session variable lockstock sets but the statement time limit
/// (named differently) — put back by `restore_shared!` and cleared by `clear_saved!` (see
/// `crate::statements`). The caller's result character set is the one
/// [`READABLE_ERRORS`](transaction::READABLE_ERRORS) kept before it (and cleared here: read
/// before, in the same statement).
const SAVE_SHARED: &str = "@lockstock_last_insert_id = LAST_INSERT_ID(), \
     @lockstock_lock_wait = @@session.innodb_lock_wait_timeout, \
     @lockstock_mdl_wait = @@session.lock_wait_timeout, \
     @lockstock_lc_messages = @@session.lc_messages, \
     @lockstock_time_zone = @@session.time_zone, \
     @lockstock_select_limit = @@session.sql_select_limit, \
     @lockstock_unique_checks = @@session.unique_checks, \
     @lockstock_fk_checks = @@session.foreign_key_checks, \
     @lockstock_cs_client = @@session.character_set_client, \
     @lockstock_cs_results = @lockstock_given_results, \
     @lockstock_cs_results_null = @lockstock_given_results_null, \
     @lockstock_collation = @@session.collation_connection, \
     @lockstock_big_selects = @@session.sql_big_selects, \
     @lockstock_given_results = NULL, @lockstock_given_results_null = NULL";

/// The value that makes the first SET refuse, atomically and before anything changes, to run
/// inside a transaction the caller opened with a raw `BEGIN` (lockstock's `BEGIN` would
/// silently commit it): `lc_messages` accepts only known locales.
const NESTED_LOCALE: &str = "lockstock_nested_transaction";

/// The value that makes the first SET of a write on a Galera node refuse, atomically and
/// before anything changes, on a session whose replication is off (`wsrep_on = 0`, which takes
/// SUPER to set): its changes would stay on this node.
pub(crate) const NOT_REPLICATED_LOCALE: &str = "lockstock_not_replicated";

/// Whether the session's writes replicate: its own `wsrep_on` and the node's (`SET GLOBAL
/// wsrep_on = 0` stops replication for the sessions already open too, while their own flag
/// stays 1) — or the server has no provider (a runner that met a Galera node first may run on
/// a standalone server later: nothing to replicate there).
pub(crate) const REPLICATING: &str = "((@@session.wsrep_on AND @@global.wsrep_on) \
     OR @@global.wsrep_provider = _utf8mb4'none')";

/// `SET TRANSACTION` inside an open transaction fails with 1568 on MariaDB and MySQL alike.
const NESTED_1568: &str = "transaction characteristics can't be changed";

/// Whether a failed setup statement refused because a transaction was open: lockstock's own
/// check ([`NESTED_LOCALE`]) or MySQL's `SET TRANSACTION` inside one (1568).
fn refused_as_nested(error: &ServerError) -> bool {
    let message = error.message().to_ascii_lowercase();
    message.contains(NESTED_LOCALE) || message.contains(NESTED_1568)
}

/// The value that makes the first SET of a write on a Galera node refuse, atomically, when the
/// node is not the designated writer (the `designated_writer` row names another node).
pub(super) const NOT_DESIGNATED_LOCALE: &str = "lockstock_not_designated_writer";

/// `START TRANSACTION` of a write and of a read-only snapshot. A write's access mode is set
/// READ WRITE before it (the first SET's `tx_read_only = 0`, or `SET TRANSACTION ..., READ
/// WRITE`): a caller's `SET TRANSACTION READ ONLY` for its next transaction would otherwise make
/// it refuse its writes. Not `BEGIN`: under a caller's `sql_mode = ORACLE` MariaDB parses a
/// lone `BEGIN` as the start of a block ("You have an error in your SQL syntax"), and every
/// write failed.
const BEGIN_WRITE: &str = "START TRANSACTION";
const BEGIN_READ: &str = "START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY";

impl RunnerSql {
    /// `tripwire`: a standalone server's writes check in their first SET that the server is not
    /// a Galera node after all (on a server built with Galera: the check reads its wsrep
    /// variables), refusing with [`GALERA_NODE_LOCALE`] where it is.
    fn new(
        policy: &TxnPolicy,
        flavor: ServerFlavor,
        galera: bool,
        whole_rollback: bool,
        tripwire: bool,
    ) -> Self {
        let session = policy.session_sql(flavor);
        // Our own connections' first SET takes the statement limit as a parameter (MariaDB).
        let settings = match flavor {
            ServerFlavor::MariaDb => policy.settings_bound(),
            ServerFlavor::MySql => policy.settings(flavor),
        };
        let levels = [policy.isolation, Isolation::RepeatableRead];
        // Writes (`kind` 0) also READ WRITE, whatever the caller set for its next transaction.
        let set_transaction = |level: Isolation, kind: usize| {
            let access = if kind == 0 { ", READ WRITE" } else { "" };
            format!("SET TRANSACTION ISOLATION LEVEL {}{access}", level.sql())
        };
        // Writes on a Galera node: (by policy) the designated writer checked, then autocommit
        // saved and turned off in the atomic SET.
        let guard_write = |kind: usize| galera && kind == 0;
        let own = [0, 1].map(|kind| match flavor {
            // One atomic SET: the nested check, the caller's values saved, ours set.
            ServerFlavor::MariaDb => {
                let guarded = guard_write(kind);
                let (save_autocommit, autocommit, replicated) = if guarded {
                    (
                        "@lockstock_autocommit = @@session.autocommit, \
                         @lockstock_dirty_reads = @@session.wsrep_dirty_reads, \
                         @lockstock_fragment_size = @@session.wsrep_trx_fragment_size, ",
                        // Dirty reads would let a node outside the Primary component answer
                        // from its frozen rows; streaming replication turns a statement's
                        // duplicate key into a whole-transaction abort (1213).
                        ", autocommit = 0, wsrep_dirty_reads = 0, wsrep_trx_fragment_size = 0",
                        format!("IF({REPLICATING}, _utf8mb4'en_US', _utf8mb4'{NOT_REPLICATED_LOCALE}')"),
                    )
                } else if tripwire && kind == 0 {
                    (
                        "",
                        "",
                        format!(
                            "IF(@@global.wsrep_on AND @@global.wsrep_provider <> _utf8mb4'none', \
                             _utf8mb4'{GALERA_NODE_LOCALE}', _utf8mb4'en_US')"
                        ),
                    )
                } else {
                    ("", "", "_utf8mb4'en_US'".to_owned())
                };
                // First the atomic SET: the check that no transaction is open, the caller's
                // values saved, ours set. Nothing before it may read a table: under a caller's
                // `autocommit = 0` the read would open a transaction of its own.
                let mut setup = vec![format!(
                    "SET {SAVE_SHARED}, \
                     @lockstock_statement_time = @@session.max_statement_time, \
                     @lockstock_isolation = @@session.tx_isolation, \
                     @lockstock_read_only = @@session.tx_read_only, \
                     @lockstock_insert_id = @@session.insert_id, \
                     @lockstock_check_constraints = @@session.check_constraint_checks, {save_autocommit}\
                     SESSION lc_messages = IF(@@in_transaction, _utf8mb4'{NESTED_LOCALE}', {replicated}), \
                     {settings}, tx_isolation = _utf8mb4'{}', tx_read_only = 0{autocommit}",
                    levels[kind].variable_value()
                )];
                if guarded && policy.designated_writer_only {
                    // Its own statement: a SET that reads a table AND turns autocommit off
                    // leaves MariaDB 10.11 in a state where the next transaction's ROLLBACK
                    // does not roll back (seen on Galera; see the galera tests). Its read opens
                    // a transaction (autocommit is off now) that BEGIN ends; when it refuses,
                    // the runner rolls back and restores the caller's session.
                    // No '' literal: the caller's sql_mode may read it as NULL
                    // (EMPTY_STRING_IS_NULL), and `NOT IN (NULL, ...)` is never true. Names
                    // compared byte for byte, trailing spaces included (`utf8mb4_bin` pads:
                    // 'db1' would equal 'db1 ', which the routers take for another node).
                    setup.push(format!(
                        "SET SESSION lc_messages = IF((SELECT CHAR_LENGTH(node_name) > 0 \
                         AND node_name <> CONVERT(@@wsrep_node_name USING utf8mb4) \
                         COLLATE utf8mb4_nopad_bin FROM designated_writer WHERE id = 1), \
                         _utf8mb4'{NOT_DESIGNATED_LOCALE}', @@session.lc_messages)"
                    ));
                }
                setup
            }
            // MySQL has no @@in_transaction: SET TRANSACTION checks first.
            ServerFlavor::MySql => vec![
                set_transaction(levels[kind], kind),
                format!(
                    "SET {SAVE_SHARED}, \
                     @lockstock_statement_time = @@session.max_execution_time, \
                     SESSION lc_messages = _utf8mb4'en_US', {settings}"
                ),
            ],
        });
        let marked = [0, 1].map(|kind| vec![set_transaction(levels[kind], kind)]);
        Self {
            flavor,
            galera,
            whole_rollback,
            session,
            own,
            marked,
        }
    }
}

/// Runs `f` — statements on `conn` — with the
/// [watchdog](crate::txn#a-server-that-never-answers) armed for the calling thread, due `grace` after `deadline`. Every statement lockstock sends runs
/// under it: the runner's transactions, and what is sent outside one
/// ([`apply_session_settings`]).
///
/// When the watchdog shut the connection's socket down, the connection is marked broken (an
/// r2d2 pool discards it) and the answer is [`Error::ServerUnresponsive`] — or
/// [`Error::OutcomeUnknown`] where COMMIT was in flight, and the value where `f` succeeded
/// (the socket was shut down after its last answer arrived).
pub(crate) fn bounded<T>(
    conn: &mut MysqlConnection,
    deadline: Deadline,
    grace: Duration,
    f: impl FnOnce(&mut MysqlConnection, &Guard) -> Result<T, Error>,
) -> Result<T, Error> {
    bounded_telling(conn, deadline, grace, f).0
}

/// [`bounded`], and whether the watchdog shut the connection down (a call cut off at its
/// deadline, whatever it answers: also [`Error::OutcomeUnknown`] for a COMMIT cut off).
pub(crate) fn bounded_telling<T>(
    conn: &mut MysqlConnection,
    deadline: Deadline,
    grace: Duration,
    f: impl FnOnce(&mut MysqlConnection, &Guard) -> Result<T, Error>,
) -> (Result<T, Error>, bool) {
    let (result, cut) = watched_cut(deadline, grace, |guard| f(conn, guard));
    // Cut itself, or a call nested in it on this connection (which marked it broken then: a
    // router's closure whose lockstock call was cut by its own deadline) — not a nested call
    // cut on another connection, whose failure is the body's to answer.
    let fired = cut.own || (cut.nested && transaction::is_marked_broken(conn));
    if !fired {
        return (result, false);
    }
    mark_broken(conn);
    transaction::note_cut(conn, deadline);
    trace_event!(ok = result.is_ok(), "the watchdog shut the connection down");
    let result = match result {
        Ok(value) => Ok(value),
        Err(error @ Error::OutcomeUnknown { .. }) => Err(error),
        Err(_) => Err(Error::ServerUnresponsive {
            elapsed: deadline.elapsed(),
        }),
    };
    (result, true)
}

/// Runs `f` with the watchdog armed for the calling thread, due `grace` after `deadline`;
/// its value and whether the watchdog shut a socket down meanwhile (then mark the connection
/// involved broken: see [`bounded`]). A pool checkout runs under it directly: r2d2 pings a
/// connection before handing it out, and the ping of a silent server never returns either.
pub(crate) fn watched<T>(
    deadline: Deadline,
    grace: Duration,
    f: impl FnOnce(&Guard) -> T,
) -> (T, bool) {
    let (value, cut) = watched_cut(deadline, grace, f);
    (value, cut.own || cut.nested)
}

/// [`watched`], telling a cut of this call from one of a call nested in it.
fn watched_cut<T>(deadline: Deadline, grace: Duration, f: impl FnOnce(&Guard) -> T) -> (T, Cut) {
    let guard = Guard::arm(deadline.past(grace));
    let value = f(&guard);
    (value, guard.disarm())
}

/// Runs `f` with `deadline` as the deadline every lockstock call it makes on this thread runs
/// by at the latest ([`TxnRunner::deadline`] takes the earlier one), restoring the enclosing
/// one afterwards — also when `f` panics.
pub(crate) fn within_deadline<T>(deadline: Deadline, f: impl FnOnce() -> T) -> T {
    struct Restore(Option<Deadline>);
    impl Drop for Restore {
        fn drop(&mut self) {
            ENCLOSING.with(|enclosing| enclosing.set(self.0));
        }
    }
    let outer = ENCLOSING.with(|enclosing| enclosing.replace(Some(enclosed(deadline))));
    let _restore = Restore(outer);
    f()
}

/// `deadline`, or the deadline of the call the calling thread is inside ([`within_deadline`])
/// if that is earlier: every entry point that takes a deadline runs by this.
pub(crate) fn enclosed(deadline: Deadline) -> Deadline {
    enclosing().map_or(deadline, |outer| deadline.min(outer))
}

/// The deadline of the call the calling thread is inside, if any ([`within_deadline`]).
pub(crate) fn enclosing() -> Option<Deadline> {
    ENCLOSING.with(std::cell::Cell::get)
}

std::thread_local! {
    /// The deadline of the call the calling thread is inside ([`within_deadline`]).
    static ENCLOSING: std::cell::Cell<Option<Deadline>> = const { std::cell::Cell::new(None) };
    /// Refusals the runner retried on this thread (see [`refusals_on_this_thread`]).
    static REFUSED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    /// The first SET of the calling thread's last transaction refused (see
    /// [`note_setup_refused`]): its error is the server's answer to lockstock's own statement,
    /// not the body's.
    static SETUP_REFUSED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Notes that a transaction's first SET refused (`true`), or that a transaction begins
/// (`false`).
pub(super) fn note_setup_refused(refused: bool) {
    SETUP_REFUSED.with(|cell| cell.set(refused));
}

/// Whether `failure` is the runner's failure to end a transaction after its body failed: the
/// connection lost or broken (a ROLLBACK that failed), or cut by the watchdog.
fn ended_badly(failure: &Error) -> bool {
    matches!(
        failure,
        Error::ConnectionBroken { .. } | Error::ServerUnresponsive { .. }
    ) || failure.server_kind() == Some(ServerErrorKind::ConnectionLost)
}

thread_local! {
    /// Set while the calling thread runs calls on a connection lockstock checked out of a pool
    /// itself ([`on_source_connection`]).
    static ON_SOURCE_CONNECTION: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` marked as running on a connection lockstock checked out itself (a combiner's): a
/// transaction found open on it is none of the caller's, so a call answers
/// [`Error::NestedTransaction`] for it where on a caller's own connection it would answer a
/// refusal of the request first ([`on_source_connection_now`]).
pub(crate) fn on_source_connection<T>(f: impl FnOnce() -> T) -> T {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            ON_SOURCE_CONNECTION.with(|on| on.set(self.0));
        }
    }
    let _reset = Reset(ON_SOURCE_CONNECTION.with(|on| on.replace(true)));
    f()
}

/// Whether the calling thread runs calls on a connection lockstock checked out itself.
pub(crate) fn on_source_connection_now() -> bool {
    ON_SOURCE_CONNECTION.with(std::cell::Cell::get)
}

/// How many refusals the runner has retried on the calling thread so far: a combiner's leader
/// reads it around a batch (which runs on its thread) to learn whether the hot row was refused.
pub(crate) fn refusals_on_this_thread() -> u64 {
    REFUSED.with(std::cell::Cell::get)
}

/// How the server numbers the rows of one multi-row INSERT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InsertIds {
    /// `LAST_INSERT_ID() + i * step` (`innodb_autoinc_lock_mode` 0 or 1, MariaDB's default),
    /// `step` being the session's `auto_increment_increment` — read with `LAST_INSERT_ID()`
    /// each time, since a session may set its own.
    Consecutive,
    /// Interleaved (`innodb_autoinc_lock_mode = 2`, MySQL 8's default): read the ids back.
    Unordered,
}

impl Clone for TxnRunner {
    fn clone(&self) -> Self {
        Self::new(self.policy.clone())
    }
}

impl Default for TxnRunner {
    /// [`TxnRunner::new`] with [`TxnPolicy::default`]: it asks the first server it meets what
    /// it is (a derived default would take every server for a standalone one and never guard a
    /// write on a Galera node).
    fn default() -> Self {
        Self::new(TxnPolicy::default())
    }
}

impl TxnRunner {
    /// A runner for `policy`.
    pub fn new(policy: TxnPolicy) -> Self {
        Self {
            policy,
            server: OnceLock::new(),
            kind: AtomicU8::new(UNKNOWN),
            sql: [OnceLock::new(), OnceLock::new(), OnceLock::new()],
            insert_ids: OnceLock::new(),
        }
    }

    /// The policy.
    pub fn policy(&self) -> &TxnPolicy {
        &self.policy
    }

    /// A deadline for a call starting now: the policy's [`RetryPolicy::deadline`] from now — or
    /// the deadline of the call this one runs inside, if that is earlier: a [`Router`] runs
    /// its closure, and every lockstock call runs its body, within its deadline, so a lockstock
    /// call in it (on another connection; on the same one it is refused) is bounded by the
    /// enclosing call's, not by its own policy's or its own deadline parameter's. Its
    /// watchdog cutting it at its own earlier deadline leaves the enclosing call alone.
    ///
    /// [`Router`]: crate::route::Router
    pub fn deadline(&self) -> Deadline {
        enclosed(Deadline::after(self.policy.retry.deadline))
    }

    /// Runs `body` in a transaction, retrying refusals. `body` must be safe to re-run from the
    /// start: it sees a rolled-back database each time. A Diesel transaction the body opens
    /// (`conn.transaction(..)`) nests in the runner's as a savepoint (Diesel's transaction
    /// manager counts the runner's transaction while the body runs), and a lockstock call on the
    /// same connection inside the body is refused as [`Error::NestedTransaction`]; a body that
    /// answers `Ok` with a Diesel transaction of its own still open is not committed
    /// ([`Error::Internal`]: the body's bug, not retried), and one that ended the runner's
    /// transaction through Diesel's manager is answered [`Error::OutcomeUnknown`] — whether it
    /// then answers `Ok` or fails (its work may be committed: not retried). (The runner tells by
    /// Diesel's count of open transactions: a body that ends the runner's transaction and then
    /// begins one of its own at the same depth through the manager is not told apart; don't.)
    /// A deadlock
    /// inside such a nested transaction ends the whole transaction in the server; Diesel may
    /// answer its failed `ROLLBACK TO SAVEPOINT` ("SAVEPOINT ... does not exist") instead,
    /// which is not retried: statements the body sent after the server's rollback ran outside
    /// any transaction. A body must never end the runner's transaction with raw SQL (`COMMIT`
    /// through `batch_execute`, or a statement that commits implicitly: DDL, `LOCK TABLES`,
    /// `SET autocommit = 1`): the runner cannot see it, and on a Galera node, where a write
    /// runs inside a savepoint, the savepoint it finds gone reads as the node's brute-force
    /// abort — the body runs again, its first part committed already.
    ///
    /// A read in `body` that returns rows through a range (not by primary key) may fail after
    /// the server has begun its result — refused or timed out on a lock, cut off by the
    /// statement time limit. Diesel caches the statement (every query whose SQL does not vary,
    /// `IN` lists excepted), and the client library would then wait, on its next execution, for
    /// the rest of a result the server never sends. So after an attempt that failed any way but
    /// a refusal of lockstock's own primary-key reads, a write's constraint or a lost
    /// connection, the runner drops the connection's cached prepared statements (Diesel evicts
    /// none singly: the cache is switched off and on — only where it is on, which the runner
    /// asks the server unless the policy tells, [`TxnPolicy::statement_cache`]); the retry
    /// prepares them again.
    /// lockstock's own range reads rely on the same.
    ///
    /// Where the caller's session cannot be put back after the transaction (the restoring SET
    /// fails), the connection is marked broken and its session ended (`KILL CONNECTION
    /// CONNECTION_ID()`), also after a COMMIT: the call still answers its value, and the
    /// connection's next statement fails instead of running under lockstock's settings.
    ///
    /// # Errors
    /// What `body` fails with, once it is not retried any more; [`Error::Contended`] when
    /// refusals outlast the attempts or the deadline; [`Error::Timeout`] when the deadline passed
    /// before a transaction was sent; [`Error::OutcomeUnknown`] when COMMIT failed in flight;
    /// [`Error::NestedTransaction`] inside a caller's transaction; [`Error::ConnectionBroken`]
    /// when a ROLLBACK failed; [`Error::ServerUnresponsive`] when the server did not answer by
    /// the deadline plus [`TxnPolicy::unresponsive_grace`] (see the
    /// [module docs](crate::txn#a-server-that-never-answers); COMMIT in flight then answers
    /// `OutcomeUnknown`); on a Galera node [`Error::NotDesignatedWriter`] and
    /// [`Error::NotReplicated`] (see the module docs); [`Error::Server`] for any other server
    /// failure.
    pub fn run<T>(
        &self,
        conn: &mut MysqlConnection,
        body: impl FnMut(&mut MysqlConnection) -> Result<T, Error>,
    ) -> Result<T, Error> {
        self.retried(conn, self.deadline(), false, body).0
    }

    /// Like [`run`](Self::run), bounded by `deadline` (a call that runs several transactions
    /// shares one deadline between them). A deadline already passed sends nothing and answers
    /// [`Error::Timeout`].
    ///
    /// # Errors
    /// As [`run`](Self::run).
    pub fn run_by<T>(
        &self,
        conn: &mut MysqlConnection,
        deadline: Deadline,
        body: impl FnMut(&mut MysqlConnection) -> Result<T, Error>,
    ) -> Result<T, Error> {
        self.retried(conn, deadline, false, body).0
    }

    /// [`run_by`](Self::run_by) for a body whose refusals `keep` selects may hide an earlier
    /// call's work (a key's unique index, a balance an earlier call spent): the caller looks the
    /// request up after such a refusal. Where the runner could not end the refused attempt — its
    /// ROLLBACK failed and the connection is broken, or the watchdog cut it — the answer is
    /// still the refusal, not that failure (which would say that nothing was applied): the
    /// caller's lookup then fails on the broken connection and answers
    /// [`Error::OutcomeUnknown`], as for a lookup that fails.
    pub(crate) fn run_by_keeping<T>(
        &self,
        conn: &mut MysqlConnection,
        deadline: Deadline,
        keep: impl Fn(&Error) -> bool,
        mut body: impl FnMut(&mut MysqlConnection) -> Result<T, Error>,
    ) -> Result<T, Error> {
        // The refusal, and the thread's count of retried refusals when it came: a refusal the
        // runner took for a retryable abort (on Galera, a silently rolled-back transaction's)
        // and retried is not the answer, whatever the attempts after it met.
        let mut refused: Option<(Error, u64)> = None;
        let answer = self.run_by(conn, deadline, |conn| {
            refused = None;
            let result = body(conn);
            if let Err(refusal) = &result {
                if keep(refusal) {
                    refused = Some((refusal.clone(), refusals_on_this_thread()));
                }
            }
            result
        });
        match (answer, refused) {
            (Err(failure), Some((refusal, retried)))
                if ended_badly(&failure) && refusals_on_this_thread() == retried =>
            {
                Err(refusal)
            }
            (answer, _) => answer,
        }
    }

    /// Like [`run`](Self::run), also returning how many transactions were started and refused.
    pub fn run_counted<T>(
        &self,
        conn: &mut MysqlConnection,
        body: impl FnMut(&mut MysqlConnection) -> Result<T, Error>,
    ) -> (Result<T, Error>, Attempts) {
        self.retried(conn, self.deadline(), false, body)
    }

    /// The retry loop of writes and reads alike, under the watchdog (see [`bounded`]): a call
    /// whose socket it shut down is never retried.
    fn retried<T>(
        &self,
        conn: &mut MysqlConnection,
        deadline: Deadline,
        read_only: bool,
        mut body: impl FnMut(&mut MysqlConnection) -> Result<T, Error>,
    ) -> (Result<T, Error>, Attempts) {
        let mut attempts = Attempts::default();
        let grace = self.policy.unresponsive_grace;
        // Inside a call that bounds every lockstock call it makes (a router's closure, another
        // call's body): by that deadline at the latest, also where the caller passed a later
        // one of its own.
        let deadline = enclosed(deadline);
        forget_cache_probe();
        // Every lockstock call the body makes (on another connection: on this one it is
        // refused) runs by this call's deadline at the latest, as in a router's closure — not
        // by a later one of its own, which this call's watchdog would cut on a healthy server.
        let result = within_deadline(deadline, || {
            bounded(conn, deadline, grace, |conn, guard| {
                self.retry_loop(conn, deadline, read_only, &mut body, guard, &mut attempts)
            })
        });
        // A connection lost (killed, timed out by the server, a node restarted) never comes
        // back: libmariadb does not reconnect. Marked broken, an r2d2 pool discards it — also
        // one that does not test on checkout (the router's), which would otherwise hand the
        // dead connection out again and again. Only once a round trip confirms it: an error is
        // classified by its text, and a body's own error (a procedure's SIGNAL, another
        // connection's failure passed on) may read like a lost connection on a live one.
        if let Err(error) = &result {
            if error
                .server_error()
                .is_some_and(|e| e.kind() == ServerErrorKind::ConnectionLost)
            {
                let alive = bounded(conn, deadline, grace, |conn, _| {
                    diesel::connection::SimpleConnection::batch_execute(conn, "DO 1")
                        .map_err(Error::from)
                });
                if alive.is_err() {
                    mark_broken(conn);
                }
            }
        }
        (result, attempts)
    }

    fn retry_loop<T>(
        &self,
        conn: &mut MysqlConnection,
        deadline: Deadline,
        read_only: bool,
        body: &mut impl FnMut(&mut MysqlConnection) -> Result<T, Error>,
        guard: &Guard,
        attempts: &mut Attempts,
    ) -> Result<T, Error> {
        let retry = &self.policy.retry;
        #[cfg(feature = "tracing")]
        let _span =
            tracing::debug_span!("lockstock.txn", isolation = ?self.policy.isolation).entered();
        // The last refusal, once there was one: a deadline that passes after it gives up as
        // `Contended` with it, not as `Timeout` (which means nothing was ever sent).
        let mut last: Option<ServerError> = None;
        loop {
            if deadline.is_expired() {
                let error = match last {
                    Some(last) => Error::Contended {
                        attempts: attempts.started,
                        elapsed: deadline.elapsed(),
                        last,
                    },
                    // An earlier step of the same call (a charge's key lookup, a batch's read
                    // of holds) whose work was done when the watchdog cut its connection (the
                    // server froze as the caller's session was put back): the call was cut at
                    // its deadline plus grace, as `ServerUnresponsive` says — `Timeout` would
                    // say the connection is fine, and a router would count no node failure. A
                    // combiner gives its later callers back on either.
                    None if transaction::cut_by_watchdog(conn, deadline) => {
                        Error::ServerUnresponsive {
                            elapsed: deadline.elapsed(),
                        }
                    }
                    None => Error::Timeout {
                        elapsed: deadline.elapsed(),
                    },
                };
                return Err(error);
            }
            attempts.started += 1;
            let error = match self.once(conn, read_only, deadline, body) {
                Ok(value) => return Ok(value),
                // A statement stopped by its limit once the deadline had passed (the limit
                // is at most the time left, see `begin`): the deadline ran out while it
                // waited; nothing was applied.
                Err(Error::Server(error))
                    if error.kind() == ServerErrorKind::StatementTimeout
                        && deadline.is_expired()
                        && !guard.fired() =>
                {
                    attempts.refused += 1;
                    return Err(Error::Contended {
                        attempts: attempts.started,
                        elapsed: deadline.elapsed(),
                        last: error,
                    });
                }
                // Never retried on a connection the watchdog shut down.
                Err(Error::Server(error)) if error.kind().is_retryable() && !guard.fired() => error,
                // The deadline passed inside a later attempt (a large batch's check between
                // its pieces, say): after a refusal it gives up as at the top of the loop, as
                // `Contended` with it and the attempts refused (the one the deadline cut is
                // not counted: a combiner charges them to the requests it gives back) —
                // `Timeout` says nothing was sent.
                Err(Error::Timeout { elapsed }) => {
                    return Err(match last {
                        Some(last) => Error::Contended {
                            attempts: attempts.refused,
                            elapsed,
                            last,
                        },
                        None => Error::Timeout { elapsed },
                    });
                }
                Err(error) => return Err(error),
            };
            attempts.refused += 1;
            REFUSED.with(|refused| refused.set(refused.get() + 1));
            let elapsed = deadline.elapsed();
            let pause = retry.backoff(attempts.started - 1);
            trace_event!(
                attempt = attempts.started,
                kind = ?error.kind(),
                backoff_us = pause.as_micros() as u64,
                "lock refused; retrying"
            );
            if attempts.started >= retry.max_attempts.max(1) || pause >= deadline.remaining() {
                trace_event!(
                    attempts = attempts.started,
                    elapsed_us = elapsed.as_micros() as u64,
                    "giving up: contended"
                );
                let contended = Error::Contended {
                    attempts: attempts.started,
                    elapsed,
                    last: error,
                };
                return Err(contended);
            }
            last = Some(error);
            std::thread::sleep(pause);
        }
    }

    fn once<T>(
        &self,
        conn: &mut MysqlConnection,
        read_only: bool,
        deadline: Deadline,
        body: &mut impl FnMut(&mut MysqlConnection) -> Result<T, Error>,
    ) -> Result<T, Error> {
        ensure_no_open_transaction(conn)?;
        if let Some(isolation) = take_primed(conn) {
            if !read_only && isolation == self.policy.isolation {
                let begin = self.begin(conn, read_only, deadline.remaining())?;
                if begin.restore.is_none() && !begin.savepoint {
                    // Opened by `prime` exactly as `begin` would open it now.
                    let open = Begin {
                        setup: &[],
                        begin: None,
                        ..begin
                    };
                    return run_transaction(conn, open, body);
                }
            }
            // Not this transaction's kind: end it, then begin as always.
            if let Some(broken) = end_unused(conn) {
                return Err(broken);
            }
        }
        let begin = self.begin(conn, read_only, deadline.remaining())?;
        note_setup_refused(false);
        match run_transaction(conn, begin, body) {
            // Nothing was applied (the first SET refused); once more, now knowing the server,
            // with the time left now (the first attempt and the question took some of it) —
            // unless none is left: the deadline passed before the transaction was sent again.
            Err(error) if !read_only => match self.mistook_the_server(conn, &error) {
                Some(_) if deadline.is_expired() => Err(Error::Timeout {
                    elapsed: deadline.elapsed(),
                }),
                Some(kind) => {
                    let begin = self.begin_on(conn, read_only, deadline.remaining(), Some(kind))?;
                    run_transaction(conn, begin, body)
                }
                None => Err(error),
            },
            answer => answer,
        }
    }

    /// Opens, ahead of time, the transaction that the next write through this runner on `conn`
    /// runs in: `SET TRANSACTION ISOLATION LEVEL ...` and `BEGIN`, so a combiner's next batch
    /// sends them while the batch before it still holds the hot row. Only on a connection that
    /// carries this runner's session settings (see [`apply_session_settings`]) and is not a
    /// Galera node (guarded writes need their own SET): elsewhere nothing is sent and the
    /// answer is `Ok(false)`.
    ///
    /// The next [`run`](Self::run) / [`run_by`](Self::run_by) on `conn` uses the open
    /// transaction for its first attempt; anything else through a runner ends it first
    /// (ROLLBACK), and so does [`unprime`](Self::unprime). It holds no lock and no snapshot:
    /// nothing is read in it before the write's body runs. Bounded by `deadline` like a call.
    ///
    /// # Errors
    /// As [`run`](Self::run) before anything is applied: nothing is left open then.
    pub(crate) fn prime(
        &self,
        conn: &mut MysqlConnection,
        deadline: Deadline,
    ) -> Result<bool, Error> {
        if deadline.is_expired() {
            return Err(Error::Timeout {
                elapsed: deadline.elapsed(),
            });
        }
        let primed = bounded(conn, deadline, self.policy.unresponsive_grace, |conn, _| {
            ensure_no_open_transaction(conn)?;
            // A leftover is ended, never reused: this runner's kind of transaction is begun.
            if take_primed(conn).is_some() {
                if let Some(broken) = end_unused(conn) {
                    return Err(broken);
                }
            }
            let begin = self.begin(conn, false, deadline.remaining())?;
            if begin.restore.is_some() || begin.savepoint {
                return Ok(false);
            }
            open_transaction(conn, begin)?;
            Ok(set_primed(conn, self.policy.isolation))
        });
        if primed
            .as_ref()
            .is_err_and(|e| e.server_kind() == Some(ServerErrorKind::ConnectionLost))
        {
            // A session gone (killed while idle, a server restarted): a pool that does not
            // test its connections on checkout would hand it out again.
            mark_broken(conn);
        }
        primed
    }

    /// Gives up the transaction [`prime`](Self::prime) opened on `conn`, if nothing used it,
    /// without sending anything (past a deadline): the connection is marked broken, so a pool
    /// discards it and the server rolls the transaction back when it closes.
    pub(crate) fn abandon_primed(&self, conn: &mut MysqlConnection) {
        if take_primed(conn).is_some() {
            mark_broken(conn);
        }
    }

    /// Ends the transaction [`prime`](Self::prime) opened on `conn` if nothing used it
    /// (ROLLBACK, bounded by `deadline`); a connection where that fails is marked broken.
    pub(crate) fn unprime(&self, conn: &mut MysqlConnection, deadline: Deadline) {
        if take_primed(conn).is_none() {
            return;
        }
        let ended = bounded(conn, deadline, self.policy.unresponsive_grace, |conn, _| {
            end_unused(conn).map_or(Ok(()), Err)
        });
        if ended.is_err() {
            mark_broken(conn);
        }
    }

    /// Whether a transaction begun with `left` of its call's deadline must limit its
    /// statements to `left` rather than by the policy's settings alone: on MariaDB, where a
    /// statement could otherwise wait for a lock past the deadline.
    fn limited_by_deadline(&self, flavor: ServerFlavor, left: Duration) -> bool {
        flavor == ServerFlavor::MariaDb && left < self.policy.longest_lock_wait()
    }

    /// What the first server this runner met is (asked on `conn` the first time).
    fn facts(&self, conn: &mut MysqlConnection) -> Result<ServerFacts, Error> {
        if let Some(facts) = self.server.get() {
            return Ok(*facts);
        }
        let flavor = ServerFlavor::ask(conn)?;
        let kind = match flavor {
            ServerFlavor::MariaDb => ServerKind::of(flavor, session::galera_node(conn)?),
            ServerFlavor::MySql => ServerKind::Plain,
        };
        let whole_rollback = session::rollback_on_timeout(conn)?;
        let facts = ServerFacts {
            flavor,
            whole_rollback,
        };
        // The first answer stands for the hint too (another thread may have set it since).
        let _ = self
            .kind
            .compare_exchange(UNKNOWN, kind as u8, Ordering::SeqCst, Ordering::SeqCst);
        Ok(*self.server.get_or_init(|| facts))
    }

    /// The statements for `conn`'s server — `known`: what it was found to be just now; else as
    /// the connection's mark recorded it (see [`apply_session_settings`]), else as this runner
    /// last found.
    fn sql_for(
        &self,
        conn: &mut MysqlConnection,
        known: Option<ServerKind>,
    ) -> Result<&RunnerSql, Error> {
        let facts = self.facts(conn)?;
        let kind = known
            .or_else(|| session::marked_kind(conn))
            .or_else(|| ServerKind::from_number(self.kind.load(Ordering::SeqCst)))
            .unwrap_or(ServerKind::Plain);
        Ok(self.sql[kind as usize].get_or_init(|| {
            Box::new(RunnerSql::new(
                &self.policy,
                facts.flavor,
                kind == ServerKind::Galera,
                facts.whole_rollback,
                kind == ServerKind::Tripwired && facts.flavor == ServerFlavor::MariaDb,
            ))
        }))
    }

    /// After `error` from a transaction's first SET on `conn`: whether this runner took the
    /// server for what it is not — a standalone server's SET found a Galera node
    /// ([`GALERA_NODE_LOCALE`]); a Galera node's refused a session whose server turns out to be
    /// standalone ([`Error::NotReplicated`] on a server that is not a node); or a SET that
    /// names wsrep variables failed on a server built without them (asked, not read from the
    /// error's text, which is in the caller's language) — so that beginning again, now
    /// knowing, is right: then what the server is. Nothing was applied.
    fn mistook_the_server(&self, conn: &mut MysqlConnection, error: &Error) -> Option<ServerKind> {
        // Only the first SET's refusal tells (a body's error may quote anything).
        if session::marked_kind(conn).is_some() || !SETUP_REFUSED.with(std::cell::Cell::get) {
            return None;
        }
        let found = match error {
            Error::Server(e) => {
                let message = e.message().to_ascii_lowercase();
                if message.contains(GALERA_NODE_LOCALE) {
                    Some(ServerKind::Galera)
                } else if message.contains("wsrep") {
                    // Not a node for certain only if the server has no wsrep variables at all.
                    session::galera_node(conn)
                        .ok()
                        .filter(|(built, _)| !built)
                        .map(|_| ServerKind::Plain)
                } else {
                    None
                }
            }
            Error::NotReplicated => session::galera_node(conn)
                .ok()
                .filter(|(_, node)| !node)
                .map(|answer| ServerKind::of(ServerFlavor::MariaDb, answer)),
            _ => None,
        }?;
        // A server built without Galera is taken for plain on this connection only: the hint
        // keeps the check for nodes that later connections may reach.
        if found != ServerKind::Plain {
            self.kind.store(found as u8, Ordering::SeqCst);
        }
        Some(found)
    }

    /// How to begin on this connection, `left` before the call's deadline: with the session
    /// settings saved, set and later restored — the statement limit at most `left` (MariaDB)
    /// — or, on a connection that carries this policy's settings already and while a lock
    /// wait under them ends before the deadline, without any.
    fn begin<'a>(
        &'a self,
        conn: &mut MysqlConnection,
        read_only: bool,
        left: Duration,
    ) -> Result<Begin<'a>, Error> {
        self.begin_on(conn, read_only, left, None)
    }

    /// [`begin`](Self::begin) on a server found to be of a `known` kind, or taken for what the
    /// connection's mark or this runner says.
    fn begin_on<'a>(
        &'a self,
        conn: &mut MysqlConnection,
        read_only: bool,
        left: Duration,
        known: Option<ServerKind>,
    ) -> Result<Begin<'a>, Error> {
        let sql = self.sql_for(conn, known)?;
        handoff::note_server(sql.flavor, sql.whole_rollback);
        let guarded = sql.galera && !read_only;
        // A guarded write needs its own SET (autocommit): no marked-connection shortcut; nor
        // a transaction whose statements must end sooner than the settings let them.
        let marked = !guarded
            && !self.limited_by_deadline(sql.flavor, left)
            && carries_settings(conn, &sql.session);
        let kind = usize::from(read_only);
        Ok(Begin {
            setup: if marked {
                &sql.marked[kind]
            } else {
                &sql.own[kind]
            },
            begin: Some(if read_only { BEGIN_READ } else { BEGIN_WRITE }),
            restore: (!marked).then_some(match (sql.flavor, guarded) {
                (ServerFlavor::MySql, _) => Restore::MySql,
                (ServerFlavor::MariaDb, false) => Restore::MariaDb,
                (ServerFlavor::MariaDb, true) => Restore::Galera,
            }),
            savepoint: guarded,
            read_only,
            statement_cache: self.policy.statement_cache,
            flavor: sql.flavor,
            statement_limit: (!marked && sql.flavor == ServerFlavor::MariaDb)
                .then(|| self.policy.statement_limit(left)),
        })
    }

    /// How this server numbers multi-row INSERTs (asked once per runner: the lock mode is a
    /// server setting, fixed at its start).
    pub(crate) fn insert_ids(&self, conn: &mut MysqlConnection) -> Result<InsertIds, Error> {
        if let Some(ids) = self.insert_ids.get() {
            return Ok(*ids);
        }
        let mode: i64 = diesel::select(diesel::dsl::sql::<diesel::sql_types::BigInt>(
            "@@innodb_autoinc_lock_mode",
        ))
        .get_result(conn)?;
        let ids = if mode <= 1 {
            InsertIds::Consecutive
        } else {
            InsertIds::Unordered
        };
        Ok(*self.insert_ids.get_or_init(|| ids))
    }

    /// Runs `body` in a read-only consistent snapshot (REPEATABLE READ, no locks taken), so
    /// reads never block or deadlock with writers and see one committed state. An interrupted
    /// or refused snapshot is retried like a write.
    ///
    /// # Errors
    /// What `body` fails with; [`Error::Contended`], [`Error::Timeout`],
    /// [`Error::NestedTransaction`], [`Error::ConnectionBroken`], [`Error::ServerUnresponsive`]
    /// and [`Error::Server`] as for [`run`](Self::run) (a read never answers
    /// [`Error::OutcomeUnknown`] — unless its body ends the snapshot through Diesel's
    /// transaction manager, after which its statements run in autocommit and may have written,
    /// as for [`run`](Self::run)).
    pub fn read<T>(
        &self,
        conn: &mut MysqlConnection,
        body: impl FnMut(&mut MysqlConnection) -> Result<T, Error>,
    ) -> Result<T, Error> {
        self.read_by(conn, self.deadline(), body)
    }

    /// Like [`read`](Self::read), bounded by `deadline`; refused with [`Error::Timeout`]
    /// (nothing sent) once it has passed.
    ///
    /// # Errors
    /// As [`read`](Self::read).
    pub fn read_by<T>(
        &self,
        conn: &mut MysqlConnection,
        deadline: Deadline,
        body: impl FnMut(&mut MysqlConnection) -> Result<T, Error>,
    ) -> Result<T, Error> {
        self.retried(conn, deadline, true, body).0
    }
}
