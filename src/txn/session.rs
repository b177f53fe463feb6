//! Session settings: which server a connection talks to, and settings applied to a connection
//! for good (directly or by an r2d2 customizer).

use diesel::connection::{Connection, Instrumentation, InstrumentationEvent, SimpleConnection};
use diesel::mysql::MysqlConnection;
use diesel::r2d2::CustomizeConnection;
use diesel::{QueryDsl, RunQueryDsl};

use super::{bounded, Deadline, TxnPolicy};
use crate::error::Error;

/// Which server a connection talks to; their variable names differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerFlavor {
    /// MariaDB (tested: 10.11).
    MariaDb,
    /// MySQL 8 (not tested here; its error texts and variables are handled).
    MySql,
}

/// A deadline `budget` from now, but no later than the call the calling thread is inside (a
/// lockstock call's body, a router's closure): [`Error::Timeout`] where that one has passed —
/// nothing is sent then, as a nested lockstock call sends nothing.
fn within_enclosing(budget: std::time::Duration) -> Result<Deadline, Error> {
    let deadline = super::enclosed(Deadline::after(budget));
    if deadline.is_expired() {
        return Err(Error::Timeout {
            elapsed: deadline.elapsed(),
        });
    }
    Ok(deadline)
}

impl ServerFlavor {
    /// Asks the server, by the default policy's deadline (and its unresponsive grace: a server
    /// that never answers is cut off then, and the connection marked broken).
    ///
    /// # Errors
    /// [`Error::Server`] when `SELECT VERSION()` fails; [`Error::ServerUnresponsive`] when the
    /// server does not answer in time; [`Error::Timeout`] (nothing sent) inside a lockstock
    /// call's body or a router's closure whose deadline has passed — asked inside one, by its
    /// deadline at the latest.
    pub fn detect(conn: &mut MysqlConnection) -> Result<Self, Error> {
        let policy = TxnPolicy::default();
        let deadline = within_enclosing(policy.retry.deadline)?;
        bounded(conn, deadline, policy.unresponsive_grace, |conn, _| {
            Self::ask(conn)
        })
    }

    /// [`detect`](Self::detect) for a caller that bounds it already (under the watchdog).
    /// Asked as a number: a caller's `character_set_results` (utf16, say) would change the
    /// version's text.
    pub(super) fn ask(conn: &mut MysqlConnection) -> Result<Self, Error> {
        let mariadb: i64 = diesel::select(diesel::dsl::sql::<diesel::sql_types::BigInt>(
            "CAST(LOWER(VERSION()) LIKE _utf8mb4'%mariadb%' AS SIGNED)",
        ))
        .limit(1)
        .get_result(conn)?;
        Ok(if mariadb != 0 {
            Self::MariaDb
        } else {
            Self::MySql
        })
    }
}

/// Whether the server rolls a whole transaction back on a lock wait timeout — on MariaDB a
/// NOWAIT refusal included — rather than the statement (`@@innodb_rollback_on_timeout`, a startup option, off
/// by default).
pub(super) fn rollback_on_timeout(conn: &mut MysqlConnection) -> Result<bool, Error> {
    let on: i64 = diesel::select(diesel::dsl::sql::<diesel::sql_types::BigInt>(
        "CAST(@@innodb_rollback_on_timeout AS SIGNED)",
    ))
    .limit(1)
    .get_result(conn)?;
    Ok(on != 0)
}

/// Whether the server is a MariaDB Galera node: one with a wsrep provider configured
/// (`@@wsrep_provider`, a global setting) and loaded (the `wsrep_provider_name` status is set:
/// a server started with a provider configured but `wsrep_on = OFF` loads none, and is a
/// standalone server). Not the session's `@@wsrep_on`: a caller's session with replication
/// turned off (`SET SESSION wsrep_on = 0`) is still on a Galera node, and its writes are
/// refused ([`Error::NotReplicated`]) rather than run unguarded. A server built without Galera
/// (no such variable) is not one. Answered with whether the server is built with Galera at all:
/// (built, node).
pub(super) fn galera_node(conn: &mut MysqlConnection) -> Result<(bool, bool), Error> {
    #[derive(diesel::QueryableByName)]
    struct Galera {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        built: i64,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        galera: i64,
    }
    // One read of information_schema: a provider configured (no row on a server built without
    // Galera: no error, whose text would be in the caller's `lc_messages`) and loaded. It
    // opens no transaction under a caller's `autocommit = 0`; the explicit LIMIT beats a
    // caller's `sql_select_limit`, the statement's own `sql_big_selects` a caller's
    // `max_join_size`, its own `max_statement_time` a caller's (the watchdog bounds it), and
    // its own `character_set_results` a caller's (the column's name is read).
    let galera = diesel::sql_query(
        "SET STATEMENT sql_big_selects = 1, max_statement_time = 0, \
         character_set_results = utf8mb4 FOR SELECT CAST(\
         COALESCE((SELECT variable_value FROM information_schema.GLOBAL_VARIABLES \
         WHERE variable_name = 'WSREP_PROVIDER'), 'none') <> 'none' \
         AND COALESCE((SELECT variable_value FROM information_schema.GLOBAL_STATUS \
         WHERE variable_name = 'WSREP_PROVIDER_NAME'), SPACE(0)) <> SPACE(0) \
         AS SIGNED) AS galera, CAST(EXISTS(SELECT 1 FROM information_schema.GLOBAL_VARIABLES \
         WHERE variable_name = 'WSREP_PROVIDER') AS SIGNED) AS built LIMIT 1",
    )
    .get_result::<Galera>(conn)?;
    Ok((galera.built != 0, galera.galera != 0))
}

/// Applies a policy's session settings to a connection for good, and marks the connection as
/// carrying them: lockstock calls with the same policy on it then send no session settings and
/// restore nothing (see [`TxnRunner`](super::TxnRunner)). The mark lives in the connection's Diesel
/// instrumentation slot, so it **replaces** an instrumentation set on the connection before
/// (Diesel gives none back): it wraps Diesel's default instrumentation (the process-wide one
/// `diesel::connection::set_default_instrumentation` installs, if any), which it keeps calling.
/// An instrumentation of your own on this connection must be set afterwards; setting one
/// removes the mark (lockstock then sends and restores the settings on every call, which is
/// correct, only slower).
///
/// Its statements (the server's version, on MariaDB whether it is a Galera node, the SET) are
/// bounded like a call: by the policy's
/// [`deadline`](super::RetryPolicy::deadline) from now, plus its
/// [`unresponsive_grace`](TxnPolicy::unresponsive_grace) for a server that never answers.
///
/// # Errors
/// [`Error::NestedTransaction`] inside a transaction Diesel knows of — a lockstock call's body
/// among them, which puts the caller's session back as it ends, so the settings would be gone
/// while the mark stayed (nothing sent); [`Error::ConnectionBroken`] for a connection whose
/// transaction state Diesel lost (a failed ROLLBACK); [`Error::Server`] when the server cannot be asked its
/// version or refuses a setting; [`Error::ServerUnresponsive`] when it did not answer in time
/// (the connection was shut down and marked broken); [`Error::Timeout`] (nothing sent) for a
/// policy whose deadline is zero, and inside a lockstock call's body or a router's closure
/// whose deadline has passed — applied inside one, by its deadline at the latest. (As
/// [`SessionSettings`] of a pool, a policy whose deadline is zero fails every new connection.)
pub fn apply_session_settings(conn: &mut MysqlConnection, policy: &TxnPolicy) -> Result<(), Error> {
    super::transaction::ensure_no_open_transaction(conn)?;
    let deadline = within_enclosing(policy.retry.deadline)?;
    let session = bounded(conn, deadline, policy.unresponsive_grace, |conn, _| {
        let flavor = ServerFlavor::ask(conn)?;
        let kind = match flavor {
            ServerFlavor::MariaDb => super::ServerKind::of(flavor, galera_node(conn)?),
            ServerFlavor::MySql => super::ServerKind::Plain,
        };
        let session = policy.session_sql(flavor);
        conn.batch_execute(&session)?;
        Ok((session, kind))
    })?;
    let (session, kind) = session;
    conn.set_instrumentation(SessionMark {
        session,
        kind,
        served: 0,
        sent: (
            NEXT_MARK.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            0,
        ),
        primed: None,
        inner: diesel::connection::get_default_instrumentation(),
    });
    Ok(())
}

/// The mark [`apply_session_settings`] leaves on a connection: which settings it carries.
struct SessionMark {
    session: String,
    /// What the connection's server is (asked as the settings were applied): a node's writes
    /// are guarded whatever server a runner met first.
    kind: super::ServerKind,
    /// Statements the server answered on the connection (a router tells by it whether a call
    /// reached the node at all).
    served: u64,
    /// This mark's own number and the statements sent on the connection since it was set,
    /// answered or not (a router tells by it whether a closure sent anything: a
    /// multi-statement batch whose last statement failed counts as sent, though its first ones
    /// ran).
    sent: (u64, u64),
    /// A write transaction is open on the connection, begun by [`TxnRunner::prime`] at this
    /// isolation level, with nothing sent in it yet.
    ///
    /// [`TxnRunner::prime`]: super::TxnRunner::prime
    primed: Option<super::Isolation>,
    inner: Option<Box<dyn Instrumentation>>,
}

impl Instrumentation for SessionMark {
    fn on_connection_event(&mut self, event: InstrumentationEvent<'_>) {
        if matches!(event, InstrumentationEvent::FinishQuery { error: None, .. }) {
            self.served = self.served.wrapping_add(1);
        }
        if matches!(event, InstrumentationEvent::StartQuery { .. }) {
            self.sent.1 = self.sent.1.wrapping_add(1);
        }
        if let Some(inner) = self.inner.as_mut() {
            inner.on_connection_event(event);
        }
    }
}

/// Whether `conn` carries the session settings `session` already.
pub(super) fn carries_settings(conn: &mut MysqlConnection, session: &str) -> bool {
    conn.instrumentation()
        .downcast_ref::<SessionMark>()
        .is_some_and(|mark| mark.session == session)
}

/// Numbers the marks, so that a mark set anew (its count starting again) is told apart.
static NEXT_MARK: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Which mark a marked connection carries and how many statements were sent on it since,
/// answered or not (`None`: not a marked connection): unchanged across a call, the call sent
/// nothing.
pub(crate) fn statements_sent(conn: &mut MysqlConnection) -> Option<(u64, u64)> {
    conn.instrumentation()
        .downcast_ref::<SessionMark>()
        .map(|mark| mark.sent)
}

/// How many statements the server has answered on a marked connection (`None`: not a marked
/// connection).
pub(crate) fn statements_served(conn: &mut MysqlConnection) -> Option<u64> {
    conn.instrumentation()
        .downcast_ref::<SessionMark>()
        .map(|mark| mark.served)
}

/// What a marked connection's server is (`None`: not a marked connection).
pub(super) fn marked_kind(conn: &mut MysqlConnection) -> Option<super::ServerKind> {
    conn.instrumentation()
        .downcast_ref::<SessionMark>()
        .map(|mark| mark.kind)
}

/// Records on a marked connection that a write transaction at `isolation` is open on it with
/// nothing sent in it yet (false: not a marked connection, nothing recorded).
pub(super) fn set_primed(conn: &mut MysqlConnection, isolation: super::Isolation) -> bool {
    match conn.instrumentation().downcast_mut::<SessionMark>() {
        Some(mark) => {
            mark.primed = Some(isolation);
            true
        }
        None => false,
    }
}

/// Takes the record of [`set_primed`]: the isolation level of the open, unused transaction.
pub(super) fn take_primed(conn: &mut MysqlConnection) -> Option<super::Isolation> {
    conn.instrumentation()
        .downcast_mut::<SessionMark>()
        .and_then(|mark| mark.primed.take())
}

/// An r2d2 connection customizer that applies a [`TxnPolicy`]'s session settings (timeouts,
/// English messages, UTC, no `sql_select_limit`, `unique_checks` and `foreign_key_checks` on,
/// the connection character set utf8mb4, `sql_big_selects` on, no pending `insert_id` and
/// CHECK constraints checked (`check_constraint_checks`) on MariaDB, and there no `idle_transaction_timeout` or `idle_readonly_transaction_timeout`: a
/// combiner opens its next batch's transaction while the batch before it runs, and a server's
/// idle limit would end that session meanwhile)
/// to every connection the pool opens, once — for the caller's own statements on it too, and
/// a caller who changes them on such a connection changes them for lockstock's. Calls through a runner with
/// the same policy then send no session settings at all (see [`apply_session_settings`]).
///
/// The mark that says so lives in the connection's Diesel instrumentation slot: an
/// instrumentation set on the connection before is replaced, and one set afterwards removes
/// the mark (calls then send and restore the settings each time, correct but slower). Only a
/// process-wide `diesel::connection::set_default_instrumentation` lives with it.
#[derive(Debug, Clone, Default)]
pub struct SessionSettings {
    policy: TxnPolicy,
}

impl SessionSettings {
    /// The policy the settings are taken from.
    pub(crate) fn policy(&self) -> &TxnPolicy {
        &self.policy
    }

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
