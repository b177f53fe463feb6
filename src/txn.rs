//! The one transaction runner: isolation, session timeouts, bounded jittered retry and a deadline.
//!
//! Every balance or stock change in lockstock goes through [`TxnRunner::run`]. It
//! 1. refuses to run inside a transaction the caller opened (it could not retry it),
//! 2. sends the session settings, `SET TRANSACTION ISOLATION LEVEL ...` and `BEGIN` in one
//!    multi-statement batch (`MysqlConnection` has no isolation builder, and `SET TRANSACTION`
//!    applies to the next transaction only),
//! 3. runs the body, then COMMIT (a cached prepared statement: one round trip); any error — or
//!    a panic — rolls the whole transaction back: MariaDB's lock wait timeout (also its NOWAIT
//!    refusal, 1205) rolls back only the statement, so the runner must not continue it,
//! 4. restarts the body from the start after a retryable refusal, sleeping a full-jitter
//!    exponential backoff, bounded by attempts and by a deadline for the whole call.

use std::cell::Cell;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use diesel::connection::{
    AnsiTransactionManager, Connection, Instrumentation, InstrumentationEvent, SimpleConnection,
    TransactionManager,
};

use crate::statements::{Commit, PreparedSql, RestoreMariaDb, RestoreMySql, Rollback};
use diesel::mysql::MysqlConnection;
use diesel::r2d2::CustomizeConnection;
use diesel::sql_types::Text;
use diesel::RunQueryDsl;

use crate::error::{Error, ServerError, ServerErrorKind};

/// Transaction isolation level of the writing transactions.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// The default. Plain reads take shared locks; lockstock reads hot rows only through
    /// `FOR UPDATE NOWAIT` on unique indexes, so no range is locked.
    Serializable,
    /// InnoDB's default.
    RepeatableRead,
    /// Fewer gap locks; correctness still rests on the row locks lockstock takes.
    ReadCommitted,
}

impl Isolation {
    /// The value of MariaDB's `tx_isolation` variable.
    fn variable_value(self) -> &'static str {
        match self {
            Self::Serializable => "SERIALIZABLE",
            Self::RepeatableRead => "REPEATABLE-READ",
            Self::ReadCommitted => "READ-COMMITTED",
        }
    }

    fn sql(self) -> &'static str {
        match self {
            Self::Serializable => "SERIALIZABLE",
            Self::RepeatableRead => "REPEATABLE READ",
            Self::ReadCommitted => "READ COMMITTED",
        }
    }
}

/// How often and how long a refused transaction is retried.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Transactions tried at most, the first included (at least 1).
    pub max_attempts: u32,
    /// Backoff ceiling before the first retry; doubled for every further retry.
    pub base_backoff: Duration,
    /// Largest backoff ceiling.
    pub max_backoff: Duration,
    /// Time budget of the whole call, retries and backoff included.
    pub deadline: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 64,
            base_backoff: Duration::from_micros(500),
            max_backoff: Duration::from_millis(50),
            deadline: Duration::from_secs(3),
        }
    }
}

impl RetryPolicy {
    /// A policy that tries once and reports a refusal as [`Error::Contended`] at once.
    pub fn no_retry() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// The backoff ceiling before retry number `retry` (0 for the first retry):
    /// `min(max_backoff, base_backoff * 2^retry)`.
    pub fn backoff_ceiling(&self, retry: u32) -> Duration {
        let factor = 1u32.checked_shl(retry.min(31)).unwrap_or(u32::MAX);
        self.base_backoff
            .checked_mul(factor)
            .unwrap_or(self.max_backoff)
            .min(self.max_backoff)
    }

    /// A full-jitter backoff: uniform in `[0, backoff_ceiling(retry)]`.
    pub fn backoff(&self, retry: u32) -> Duration {
        self.backoff_ceiling(retry).mul_f64(jitter_fraction())
    }
}

/// Policy of every transaction a domain type runs: isolation, timeouts and retries.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnPolicy {
    /// Isolation of the writing transactions (default SERIALIZABLE).
    pub isolation: Isolation,
    /// Retry and deadline.
    pub retry: RetryPolicy,
    /// `innodb_lock_wait_timeout` for statements that wait for locks (whole seconds, at least 1).
    /// `NOWAIT` reads never wait.
    pub lock_wait_timeout: Duration,
    /// Statement time limit (`max_statement_time` on MariaDB, `max_execution_time` on MySQL).
    pub statement_timeout: Duration,
}

impl Default for TxnPolicy {
    fn default() -> Self {
        Self {
            isolation: Isolation::Serializable,
            retry: RetryPolicy::default(),
            lock_wait_timeout: Duration::from_secs(1),
            statement_timeout: Duration::from_secs(5),
        }
    }
}

impl TxnPolicy {
    /// The same policy with another isolation level.
    pub fn with_isolation(mut self, isolation: Isolation) -> Self {
        self.isolation = isolation;
        self
    }

    /// The same policy with another retry policy.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The `SET SESSION` statement for this policy on a server of `flavor`.
    fn session_sql(&self, flavor: ServerFlavor) -> String {
        format!(
            "SET SESSION {}, lc_messages = 'en_US'",
            self.settings(flavor)
        )
    }

    /// The session assignments of this policy but `lc_messages`.
    ///
    /// Timeouts are rounded up, never down: a statement limit under a millisecond becomes one
    /// millisecond (0 would mean "no limit"), a lock wait under a second becomes one second.
    fn settings(&self, flavor: ServerFlavor) -> String {
        let lock_wait = self.lock_wait_timeout.as_secs_f64().ceil().max(1.0) as u64;
        let millis = self
            .statement_timeout
            .as_nanos()
            .div_ceil(1_000_000)
            .clamp(1, u128::from(u32::MAX));
        let limit = match flavor {
            ServerFlavor::MariaDb => format!(
                "max_statement_time = {}.{:03}",
                millis / 1000,
                millis % 1000
            ),
            ServerFlavor::MySql => format!("max_execution_time = {millis}"),
        };
        format!("innodb_lock_wait_timeout = {lock_wait}, {limit}, time_zone = '+00:00'")
    }
}

/// Which server a connection talks to; their variable names differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerFlavor {
    /// MariaDB (tested: 10.11).
    MariaDb,
    /// MySQL 8 (not tested here; its error texts and variables are handled).
    MySql,
}

impl ServerFlavor {
    /// Asks the server.
    pub fn detect(conn: &mut MysqlConnection) -> Result<Self, Error> {
        let version: String =
            diesel::select(diesel::dsl::sql::<Text>("VERSION()")).get_result(conn)?;
        Ok(if version.to_ascii_lowercase().contains("mariadb") {
            Self::MariaDb
        } else {
            Self::MySql
        })
    }
}

/// Applies a policy's session settings to a connection for good, and marks the connection as
/// carrying them: lockstock calls with the same policy on it then send no session settings and
/// restore nothing (see [`TxnRunner`]). The mark lives in the connection's Diesel
/// instrumentation slot; it wraps Diesel's default instrumentation, which it keeps calling, and
/// setting another instrumentation removes it (lockstock then sends and restores the settings
/// on every call, which is correct, only slower).
pub fn apply_session_settings(conn: &mut MysqlConnection, policy: &TxnPolicy) -> Result<(), Error> {
    let flavor = ServerFlavor::detect(conn)?;
    let session = policy.session_sql(flavor);
    conn.batch_execute(&session)?;
    conn.set_instrumentation(SessionMark {
        session,
        inner: diesel::connection::get_default_instrumentation(),
    });
    Ok(())
}

/// The mark [`apply_session_settings`] leaves on a connection: which settings it carries.
struct SessionMark {
    session: String,
    inner: Option<Box<dyn Instrumentation>>,
}

impl Instrumentation for SessionMark {
    fn on_connection_event(&mut self, event: InstrumentationEvent<'_>) {
        if let Some(inner) = self.inner.as_mut() {
            inner.on_connection_event(event);
        }
    }
}

/// Whether `conn` carries the session settings `session` already.
fn carries_settings(conn: &mut MysqlConnection, session: &str) -> bool {
    conn.instrumentation()
        .downcast_ref::<SessionMark>()
        .is_some_and(|mark| mark.session == session)
}

/// An r2d2 connection customizer that applies a [`TxnPolicy`]'s session settings (timeouts,
/// English messages, UTC) to every connection the pool opens, once. Calls through a runner with
/// the same policy then send no session settings at all (see [`apply_session_settings`]).
#[derive(Debug, Clone, Default)]
pub struct SessionSettings {
    policy: TxnPolicy,
}

impl SessionSettings {
    /// Settings taken from `policy`.
    pub fn new(policy: TxnPolicy) -> Self {
        Self { policy }
    }
}

impl CustomizeConnection<MysqlConnection, diesel::r2d2::Error> for SessionSettings {
    fn on_acquire(&self, conn: &mut MysqlConnection) -> Result<(), diesel::r2d2::Error> {
        apply_session_settings(conn, &self.policy).map_err(|e| {
            let text = e.to_string();
            // The error was made here and is not shared: its Diesel error comes back whole.
            let source = match e {
                Error::Server(s) => std::sync::Arc::try_unwrap(s.into_diesel_error()).ok(),
                _ => None,
            };
            diesel::r2d2::Error::QueryError(
                source.unwrap_or_else(|| diesel::result::Error::QueryBuilderError(text.into())),
            )
        })
    }
}

/// The moment by which one call must return, fixed when the call starts and shared by
/// everything it does: queueing in a combiner, pool checkout, every transaction round, every
/// retry and every backoff.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    started: Instant,
    at: Instant,
}

impl Deadline {
    /// A deadline `budget` from now.
    pub fn after(budget: Duration) -> Self {
        let started = Instant::now();
        Self {
            started,
            at: started
                .checked_add(budget)
                .unwrap_or(started + Duration::from_secs(86_400 * 365)),
        }
    }

    /// When the call started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Time since the call started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Time left (zero once passed).
    pub fn remaining(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    /// Whether the deadline has passed.
    pub fn is_expired(&self) -> bool {
        Instant::now() >= self.at
    }

    /// The earlier of two deadlines (a combined batch runs by its earliest caller's).
    pub fn min(self, other: Self) -> Self {
        if other.at < self.at {
            other
        } else {
            self
        }
    }
}

/// Counts of one call, for reports and tracing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Attempts {
    /// Transactions started.
    pub started: u32,
    /// Lock refusals and other retryable failures among them.
    pub refused: u32,
}

/// Runs transactions under a [`TxnPolicy`]. Domain types hold one; it holds no connection.
#[derive(Debug, Default)]
pub struct TxnRunner {
    policy: TxnPolicy,
    sql: OnceLock<RunnerSql>,
    insert_ids: OnceLock<InsertIds>,
}

/// The statements a runner sends, built once: a runner talks to one server flavour. Each is a
/// single statement sent as a cached prepared statement — never a multi-statement batch, whose
/// remaining results a `KILL QUERY` can leave the client waiting for forever.
#[derive(Debug)]
struct RunnerSql {
    flavor: ServerFlavor,
    /// The policy's `SET SESSION` statement (what [`apply_session_settings`] marks).
    session: String,
    /// Write / read: the statements before BEGIN on a connection without the settings.
    own: [Vec<String>; 2],
    /// Write / read: the statements before BEGIN on a connection that carries them.
    marked: [Vec<String>; 2],
}

/// The value that makes the first SET refuse, atomically and before anything changes, to run
/// inside a transaction the caller opened with a raw `BEGIN` (lockstock's `BEGIN` would
/// silently commit it): `lc_messages` accepts only known locales.
const NESTED_LOCALE: &str = "lockstock_nested_transaction";

/// `SET TRANSACTION` inside an open transaction fails with 1568 on MariaDB and MySQL alike.
const NESTED_1568: &str = "transaction characteristics can't be changed";

/// `START TRANSACTION` of a write and of a read-only snapshot.
const BEGIN_WRITE: &str = "BEGIN";
const BEGIN_READ: &str = "START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY";

impl RunnerSql {
    fn new(policy: &TxnPolicy, flavor: ServerFlavor) -> Self {
        let session = policy.session_sql(flavor);
        let settings = policy.settings(flavor);
        let levels = [policy.isolation, Isolation::RepeatableRead];
        let set_transaction =
            |level: Isolation| format!("SET TRANSACTION ISOLATION LEVEL {}", level.sql());
        let own = levels.map(|level| match flavor {
            // One atomic SET: the nested check, the caller's values saved, ours set.
            ServerFlavor::MariaDb => vec![format!(
                "SET @lockstock_lock_wait = @@session.innodb_lock_wait_timeout, \
                 @lockstock_statement_time = @@session.max_statement_time, \
                 @lockstock_lc_messages = @@session.lc_messages, \
                 @lockstock_time_zone = @@session.time_zone, \
                 @lockstock_isolation = @@session.tx_isolation, \
                 SESSION lc_messages = IF(@@in_transaction, '{NESTED_LOCALE}', 'en_US'), \
                 {settings}, tx_isolation = '{}'",
                level.variable_value()
            )],
            // MySQL has no @@in_transaction: SET TRANSACTION checks first.
            ServerFlavor::MySql => vec![
                set_transaction(level),
                format!(
                    "SET @lockstock_lock_wait = @@session.innodb_lock_wait_timeout, \
                     @lockstock_statement_time = @@session.max_execution_time, \
                     @lockstock_lc_messages = @@session.lc_messages, \
                     @lockstock_time_zone = @@session.time_zone, \
                     SESSION lc_messages = 'en_US', {settings}"
                ),
            ],
        });
        let marked = levels.map(|level| vec![set_transaction(level)]);
        Self {
            flavor,
            session,
            own,
            marked,
        }
    }
}

/// How the server numbers the rows of one multi-row INSERT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InsertIds {
    /// `LAST_INSERT_ID() + i * step` (`innodb_autoinc_lock_mode` 0 or 1, MariaDB's default).
    Consecutive {
        /// `auto_increment_increment`.
        step: i64,
    },
    /// Interleaved (`innodb_autoinc_lock_mode = 2`, MySQL 8's default): read the ids back.
    Unordered,
}

impl Clone for TxnRunner {
    fn clone(&self) -> Self {
        Self::new(self.policy.clone())
    }
}

impl TxnRunner {
    /// A runner for `policy`.
    pub fn new(policy: TxnPolicy) -> Self {
        Self {
            policy,
            sql: OnceLock::new(),
            insert_ids: OnceLock::new(),
        }
    }

    /// The policy.
    pub fn policy(&self) -> &TxnPolicy {
        &self.policy
    }

    /// A deadline for a call starting now: the policy's [`RetryPolicy::deadline`] from now.
    pub fn deadline(&self) -> Deadline {
        Deadline::after(self.policy.retry.deadline)
    }

    /// Runs `body` in a transaction, retrying refusals. `body` must be safe to re-run from the
    /// start: it sees a rolled-back database each time.
    pub fn run<T>(
        &self,
        conn: &mut MysqlConnection,
        body: impl FnMut(&mut MysqlConnection) -> Result<T, Error>,
    ) -> Result<T, Error> {
        self.run_counted_by(conn, self.deadline(), body).0
    }

    /// Like [`run`](Self::run), bounded by `deadline` (a call that runs several transactions
    /// shares one deadline between them). A deadline already passed sends nothing and answers
    /// [`Error::Timeout`].
    pub fn run_by<T>(
        &self,
        conn: &mut MysqlConnection,
        deadline: Deadline,
        body: impl FnMut(&mut MysqlConnection) -> Result<T, Error>,
    ) -> Result<T, Error> {
        self.run_counted_by(conn, deadline, body).0
    }

    /// Like [`run`](Self::run), also returning how many transactions were started and refused.
    pub fn run_counted<T>(
        &self,
        conn: &mut MysqlConnection,
        body: impl FnMut(&mut MysqlConnection) -> Result<T, Error>,
    ) -> (Result<T, Error>, Attempts) {
        self.run_counted_by(conn, self.deadline(), body)
    }

    /// Like [`run_by`](Self::run_by), also returning how many transactions were started and
    /// refused.
    pub fn run_counted_by<T>(
        &self,
        conn: &mut MysqlConnection,
        deadline: Deadline,
        body: impl FnMut(&mut MysqlConnection) -> Result<T, Error>,
    ) -> (Result<T, Error>, Attempts) {
        self.retried(conn, deadline, false, body)
    }

    /// The retry loop of writes and reads alike.
    fn retried<T>(
        &self,
        conn: &mut MysqlConnection,
        deadline: Deadline,
        read_only: bool,
        mut body: impl FnMut(&mut MysqlConnection) -> Result<T, Error>,
    ) -> (Result<T, Error>, Attempts) {
        let retry = &self.policy.retry;
        let mut attempts = Attempts::default();
        #[cfg(feature = "tracing")]
        let _span =
            tracing::debug_span!("lockstock.txn", isolation = ?self.policy.isolation).entered();
        loop {
            if deadline.is_expired() {
                return (
                    Err(Error::Timeout {
                        elapsed: deadline.elapsed(),
                    }),
                    attempts,
                );
            }
            attempts.started += 1;
            let error = match self.once(conn, read_only, &mut body) {
                Ok(value) => return (Ok(value), attempts),
                Err(error) if error.is_transient() => error,
                Err(error) => return (Err(error), attempts),
            };
            attempts.refused += 1;
            let elapsed = deadline.elapsed();
            let pause = retry.backoff(attempts.started - 1);
            trace_event!(
                attempt = attempts.started,
                kind = ?error.server_kind(),
                backoff_us = pause.as_micros() as u64,
                "lock refused; retrying"
            );
            if attempts.started >= retry.max_attempts.max(1) || pause >= deadline.remaining() {
                let last = match error {
                    Error::Server(last) => last,
                    other => return (Err(other), attempts),
                };
                trace_event!(
                    attempts = attempts.started,
                    elapsed_us = elapsed.as_micros() as u64,
                    "giving up: contended"
                );
                let contended = Error::Contended {
                    attempts: attempts.started,
                    elapsed,
                    last,
                };
                return (Err(contended), attempts);
            }
            std::thread::sleep(pause);
        }
    }

    fn once<T>(
        &self,
        conn: &mut MysqlConnection,
        read_only: bool,
        body: &mut impl FnMut(&mut MysqlConnection) -> Result<T, Error>,
    ) -> Result<T, Error> {
        ensure_no_open_transaction(conn)?;
        let begin = self.begin(conn, read_only)?;
        run_transaction(conn, begin, body)
    }

    /// How to begin on this connection: with the session settings saved, set and later restored,
    /// or — on a connection that carries this policy's settings already — without any.
    fn begin<'a>(
        &'a self,
        conn: &mut MysqlConnection,
        read_only: bool,
    ) -> Result<Begin<'a>, Error> {
        let sql = match self.sql.get() {
            Some(sql) => sql,
            None => {
                let built = RunnerSql::new(&self.policy, ServerFlavor::detect(conn)?);
                self.sql.get_or_init(|| built)
            }
        };
        let marked = carries_settings(conn, &sql.session);
        let kind = usize::from(read_only);
        Ok(Begin {
            setup: if marked {
                &sql.marked[kind]
            } else {
                &sql.own[kind]
            },
            begin: if read_only { BEGIN_READ } else { BEGIN_WRITE },
            restore: (!marked).then_some(sql.flavor),
            read_only,
        })
    }

    /// How this server numbers multi-row INSERTs (asked once per runner).
    pub(crate) fn insert_ids(&self, conn: &mut MysqlConnection) -> Result<InsertIds, Error> {
        if let Some(ids) = self.insert_ids.get() {
            return Ok(*ids);
        }
        let (mode, step): (i64, i64) = diesel::select((
            diesel::dsl::sql::<diesel::sql_types::BigInt>("@@innodb_autoinc_lock_mode"),
            diesel::dsl::sql::<diesel::sql_types::BigInt>("@@auto_increment_increment"),
        ))
        .get_result(conn)?;
        let ids = if mode <= 1 && step >= 1 {
            InsertIds::Consecutive { step }
        } else {
            InsertIds::Unordered
        };
        Ok(*self.insert_ids.get_or_init(|| ids))
    }

    /// Runs `body` in a read-only consistent snapshot (REPEATABLE READ, no locks taken), so
    /// reads never block or deadlock with writers and see one committed state. An interrupted
    /// or refused snapshot is retried like a write.
    pub fn read<T>(
        &self,
        conn: &mut MysqlConnection,
        body: impl FnMut(&mut MysqlConnection) -> Result<T, Error>,
    ) -> Result<T, Error> {
        self.read_by(conn, self.deadline(), body)
    }

    /// Like [`read`](Self::read), bounded by `deadline`; refused with [`Error::Timeout`]
    /// (nothing sent) once it has passed.
    pub fn read_by<T>(
        &self,
        conn: &mut MysqlConnection,
        deadline: Deadline,
        body: impl FnMut(&mut MysqlConnection) -> Result<T, Error>,
    ) -> Result<T, Error> {
        self.retried(conn, deadline, true, body).0
    }
}

/// lockstock must own the transaction to retry it: refuse a call made inside one that the
/// caller opened through Diesel (a raw `BEGIN` is caught by [`NESTED_CHECK`]). A connection
/// whose transaction manager is broken (also one lockstock marked after a failed ROLLBACK) is
/// refused as [`Error::ConnectionBroken`].
fn ensure_no_open_transaction(conn: &mut MysqlConnection) -> Result<(), Error> {
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
struct Begin<'a> {
    /// The statements before `begin`; the first one refuses a nested call, atomically.
    setup: &'a [String],
    /// `BEGIN` or the read-only snapshot's `START TRANSACTION`.
    begin: &'static str,
    /// Restore the caller's session variables afterwards (they were saved by `sql`).
    restore: Option<ServerFlavor>,
    /// A read-only snapshot: a failed COMMIT cannot have written anything.
    read_only: bool,
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
fn run_transaction<T>(
    conn: &mut MysqlConnection,
    begin: Begin<'_>,
    body: &mut impl FnMut(&mut MysqlConnection) -> Result<T, Error>,
) -> Result<T, Error> {
    for sql in begin.setup {
        // A SET is atomic: when it fails, nothing of it was applied.
        if let Err(e) = PreparedSql(sql).execute(conn) {
            let error = ServerError::new(e);
            let message = error.message().to_ascii_lowercase();
            if message.contains(NESTED_LOCALE) || message.contains(NESTED_1568) {
                return Err(Error::NestedTransaction);
            }
            return Err(Error::Server(error));
        }
    }
    if let Err(e) = PreparedSql(begin.begin).execute(conn) {
        let error = ServerError::new(e);
        // The settings are in place: put the caller's back.
        return Err(match end_failed(conn, begin) {
            Some(broken) if error.kind() != ServerErrorKind::ConnectionLost => broken,
            _ => Error::Server(error),
        });
    }
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(conn)));
    match outcome {
        Ok(Ok(value)) => match Commit.execute(conn) {
            Ok(_) => {
                // Committed: whatever happens now, the answer is the value.
                if let Some(flavor) = begin.restore {
                    if restore_session(conn, flavor).is_err() {
                        mark_broken(conn);
                    }
                }
                Ok(value)
            }
            Err(e) => {
                let _ = end_failed(conn, begin);
                let error = commit_failure(e, begin.read_only);
                trace_event!(outcome_unknown = error.is_outcome_unknown(), error = %error, "commit failed");
                Err(error)
            }
        },
        Ok(Err(error)) => match end_failed(conn, begin) {
            // A lost connection: the server rolled back already; the body's error says so.
            Some(_) if error.server_kind() == Some(ServerErrorKind::ConnectionLost) => Err(error),
            Some(broken) => Err(broken),
            None => Err(error),
        },
        Err(panic) => {
            let _ = end_failed(conn, begin);
            std::panic::resume_unwind(panic)
        }
    }
}

/// Ends a transaction that failed: ROLLBACK, then the caller's session restored. `None` when
/// both worked; otherwise the connection is marked broken and the error says why.
fn end_failed(conn: &mut MysqlConnection, begin: Begin<'_>) -> Option<Error> {
    if let Err(e) = Rollback.execute(conn) {
        // Release the locks now if the server still answers (the prepared form may be what
        // failed), but never trust this connection again.
        let _ = conn.batch_execute("ROLLBACK");
        mark_broken(conn);
        return Some(Error::ConnectionBroken {
            source: ServerError::new(e),
        });
    }
    let flavor = begin.restore?;
    match restore_session(conn, flavor) {
        Ok(()) => None,
        Err(e) => {
            mark_broken(conn);
            Some(Error::ConnectionBroken {
                source: ServerError::new(e),
            })
        }
    }
}

/// Puts back the session variables the begin batch saved.
fn restore_session(
    conn: &mut MysqlConnection,
    flavor: ServerFlavor,
) -> Result<(), diesel::result::Error> {
    match flavor {
        ServerFlavor::MariaDb => RestoreMariaDb.execute(conn),
        ServerFlavor::MySql => RestoreMySql.execute(conn),
    }
    .map(|_| ())
}

/// Marks the connection broken for Diesel and r2d2: `Connection::transaction` refuses it, an
/// r2d2 pool drops it when it is returned, and lockstock answers [`Error::ConnectionBroken`].
fn mark_broken(conn: &mut MysqlConnection) {
    AnsiTransactionManager::transaction_manager_status_mut(conn).set_in_error();
}

/// What a failed COMMIT means. A definite abort (a deadlock or certification conflict
/// reported at COMMIT) is retried like any refusal. Anything else — the connection lost, the
/// statement interrupted — may have been applied: [`Error::OutcomeUnknown`], except for a
/// read-only snapshot, which cannot have written anything.
fn commit_failure(error: diesel::result::Error, read_only: bool) -> Error {
    let error = ServerError::new(error);
    if read_only || error.kind().is_definite_abort() {
        Error::Server(error)
    } else {
        Error::OutcomeUnknown { source: error }
    }
}

thread_local! {
    static RNG_STATE: Cell<u64> = Cell::new({
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u128(Instant::now().elapsed().as_nanos());
        hasher.finish() | 1
    });
}

/// A uniform number in `[0, 1)` from a per-thread xorshift64* generator; jitter needs spread, not
/// cryptographic quality, and this keeps the crate free of an RNG dependency.
fn jitter_fraction() -> f64 {
    RNG_STATE.with(|state| {
        let mut x = state.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        state.set(x);
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_ceiling_doubles_up_to_the_cap() {
        let policy = RetryPolicy {
            max_attempts: 10,
            base_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(20),
            deadline: Duration::from_secs(1),
        };
        let ceilings: Vec<u128> = (0..8)
            .map(|r| policy.backoff_ceiling(r).as_millis())
            .collect();
        assert_eq!(ceilings, vec![1, 2, 4, 8, 16, 20, 20, 20]);
        assert_eq!(policy.backoff_ceiling(u32::MAX), Duration::from_millis(20));
    }

    #[test]
    fn backoff_is_full_jitter_within_the_ceiling() {
        let policy = RetryPolicy::default();
        for retry in 0..12 {
            let ceiling = policy.backoff_ceiling(retry);
            let samples: Vec<Duration> = (0..200).map(|_| policy.backoff(retry)).collect();
            assert!(samples.iter().all(|d| *d <= ceiling), "retry {retry}");
            // Full jitter: spread over the whole range, not clustered at the top.
            assert!(samples.iter().any(|d| *d < ceiling / 4), "retry {retry}");
            assert!(
                samples.iter().any(|d| *d > ceiling * 3 / 4),
                "retry {retry}"
            );
        }
    }

    #[test]
    fn jitter_fraction_is_in_unit_interval() {
        for _ in 0..10_000 {
            let f = jitter_fraction();
            assert!((0.0..1.0).contains(&f));
        }
    }

    #[test]
    fn session_sql_per_flavor() {
        let policy = TxnPolicy::default();
        let maria = policy.session_sql(ServerFlavor::MariaDb);
        assert!(maria.contains("max_statement_time = 5.000"), "{maria}");
        assert!(maria.contains("innodb_lock_wait_timeout = 1"), "{maria}");
        let mysql = policy.session_sql(ServerFlavor::MySql);
        assert!(mysql.contains("max_execution_time = 5000"), "{mysql}");
        assert!(!mysql.contains("max_statement_time"), "{mysql}");
    }
}
