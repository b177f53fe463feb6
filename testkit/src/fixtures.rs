//! Fixtures for integration tests against a real server: a fresh, migrated database per test
//! (on the shared throwaway sandbox, or on `DATABASE_URL`), coupon campaigns and funded
//! accounts, pools, and [`concurrently`] for races; readers of what the database stored
//! (balances, journal counts, stock rows, coupon rows, session variables), [`row_holder`] for
//! contention and [`CallLog`] for deadline tests.
//!
//! Every fixture panics with a message naming what failed: it is meant for tests, where a
//! failed setup is a failed test.
//!
//! ```no_run
//! use lockstock::{BalanceLedger, CouponIssuer};
//! use lockstock_testkit::fixtures::{concurrently, fresh_database, open_campaign};
//!
//! let (url, mut conn) = fresh_database("doc_fixtures");
//! let issuer = CouponIssuer::new();
//! let campaign = open_campaign(&mut conn, &issuer, 3);
//! // 8 users race for 3 coupons, each on its own connection.
//! let answers = concurrently(8, &url, |thread, conn| {
//!     issuer.issue(conn, thread as i64 + 1, campaign.id).is_ok()
//! });
//! assert_eq!(answers.iter().filter(|ok| **ok).count(), 3);
//! ```
#![allow(clippy::expect_used)] // fixtures panic: a failed setup is a failed test

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::{Duration as StdDuration, Instant};

use chrono::{DateTime, Duration, NaiveDateTime, Utc};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};
use diesel::sql_types::{BigInt, Double, Text};
use lockstock::combine::MysqlPool;
use lockstock::schema::{balance_history, fcfs_coupon, user_balance, user_coupon};
use lockstock::{
    BalanceLedger, Campaign, Coupon, CouponIssuer, Discount, EntryKind, Error, NewCampaign,
    NewCoupon, RetryPolicy, SessionSettings, TxnPolicy,
};
use rust_decimal::Decimal;

/// A fresh database named `name` with lockstock's migrations applied; returns its URL and a
/// connection to it. `name` must be unique among the tests that share a server (tests of one
/// binary run in parallel threads).
pub fn fresh_database(name: &str) -> (String, MysqlConnection) {
    let url = crate::sandbox::database_url(name).unwrap_or_else(|e| panic!("database {name}: {e}"));
    let mut conn = connect(&url);
    conn.batch_execute(&format!(
        "DROP DATABASE `{name}`; CREATE DATABASE `{name}`; USE `{name}`"
    ))
    .unwrap_or_else(|e| panic!("recreate {name}: {e}"));
    lockstock::run_migrations(&mut conn).unwrap_or_else(|e| panic!("migrate {name}: {e}"));
    (url, conn)
}

/// A new connection to `url`.
pub fn connect(url: &str) -> MysqlConnection {
    MysqlConnection::establish(url).unwrap_or_else(|e| panic!("connect {url}: {e}"))
}

/// An r2d2 pool of up to `size` connections to `url`, each with lockstock's session settings
/// for the default [`TxnPolicy`] (what `CombiningIssuer` / `CombiningLedger` expect).
pub fn pool(url: &str, size: u32) -> MysqlPool {
    pool_with(url, size, TxnPolicy::default())
}

/// An r2d2 pool of up to `size` connections to `url`, each with lockstock's session settings
/// for `policy`.
pub fn pool_with(url: &str, size: u32, policy: TxnPolicy) -> MysqlPool {
    Pool::builder()
        .max_size(size)
        .connection_customizer(Box::new(SessionSettings::new(policy)))
        .build(ConnectionManager::<MysqlConnection>::new(url))
        .expect("build pool")
}

/// UTC now at the microsecond precision of `DATETIME(6)`.
pub fn now() -> NaiveDateTime {
    micros_to_time(Utc::now().timestamp_micros())
}

/// The UTC time `micros` microseconds after the Unix epoch.
pub fn micros_to_time(micros: i64) -> NaiveDateTime {
    DateTime::from_timestamp_micros(micros)
        .expect("representable time")
        .naive_utc()
}

/// A coupon template `name` worth a fixed 1,000, valid from `valid_from` (inclusive) to
/// `valid_until` (exclusive).
pub fn create_coupon(
    conn: &mut MysqlConnection,
    issuer: &CouponIssuer,
    name: &str,
    valid_from: NaiveDateTime,
    valid_until: NaiveDateTime,
) -> Coupon {
    issuer
        .create_coupon(
            conn,
            &NewCoupon {
                name,
                discount: Discount::Fixed(Decimal::new(1_000, 0)),
                valid_from,
                valid_until,
            },
        )
        .unwrap_or_else(|e| panic!("create coupon {name}: {e}"))
}

/// A campaign of `quantity` coupons of template `coupon_id`, issuing from `starts` (inclusive)
/// to `ends` (exclusive).
pub fn create_campaign(
    conn: &mut MysqlConnection,
    issuer: &CouponIssuer,
    coupon_id: i64,
    quantity: u32,
    starts: NaiveDateTime,
    ends: NaiveDateTime,
) -> Campaign {
    issuer
        .create_campaign(
            conn,
            &NewCampaign {
                coupon_id,
                quantity,
                issue_starts_at: starts,
                issue_ends_at: ends,
            },
        )
        .unwrap_or_else(|e| panic!("create campaign of coupon {coupon_id}: {e}"))
}

/// A coupon template `name` worth a fixed 1,000, valid from an hour ago for a week.
pub fn valid_coupon(conn: &mut MysqlConnection, issuer: &CouponIssuer, name: &str) -> Coupon {
    let t = now();
    create_coupon(
        conn,
        issuer,
        name,
        t - Duration::hours(1),
        t + Duration::days(7),
    )
}

/// A campaign of `quantity` coupons of template `coupon_id`, open from a minute ago for an
/// hour.
pub fn open_campaign_of(
    conn: &mut MysqlConnection,
    issuer: &CouponIssuer,
    coupon_id: i64,
    quantity: u32,
) -> Campaign {
    let t = now();
    let (starts, ends) = (t - Duration::minutes(1), t + Duration::hours(1));
    create_campaign(conn, issuer, coupon_id, quantity, starts, ends)
}

/// A template `name` ([`valid_coupon`]) and a campaign of `quantity` coupons of it
/// ([`open_campaign_of`]: open from a minute ago for an hour).
pub fn open_campaign_named(
    conn: &mut MysqlConnection,
    issuer: &CouponIssuer,
    name: &str,
    quantity: u32,
) -> (Coupon, Campaign) {
    let coupon = valid_coupon(conn, issuer, name);
    let campaign = open_campaign_of(conn, issuer, coupon.id, quantity);
    (coupon, campaign)
}

/// A coupon template ([`valid_coupon`]) and a campaign of `quantity` coupons of it, open from a
/// minute ago for an hour.
pub fn open_campaign(conn: &mut MysqlConnection, issuer: &CouponIssuer, quantity: u32) -> Campaign {
    open_campaign_named(conn, issuer, "test coupon", quantity).1
}

/// Charges `amount` to account `user` (idempotency key `fund-<user>`), creating the account.
pub fn funded_account(
    conn: &mut MysqlConnection,
    ledger: &BalanceLedger,
    user: i64,
    amount: Decimal,
) {
    ledger
        .charge(conn, user, amount, &format!("fund-{user}"))
        .unwrap_or_else(|e| panic!("fund account {user} with {amount}: {e}"));
}

/// Runs `work(thread, conn)` on `threads` threads, each with its own connection to `url`;
/// the threads connect first and then start together (a barrier), so they race. Returns
/// their results in thread order; a panic in a thread fails the caller.
pub fn concurrently<T, F>(threads: usize, url: &str, work: F) -> Vec<T>
where
    T: Send,
    F: Fn(usize, &mut MysqlConnection) -> T + Sync,
{
    race(threads, || connect(url), work)
}

/// Runs `work(thread)` on `threads` threads started together (a barrier), like
/// [`concurrently`] without connections. Returns their results in thread order; a panic in a
/// thread fails the caller.
pub fn together<T, F>(threads: usize, work: F) -> Vec<T>
where
    T: Send,
    F: Fn(usize) -> T + Sync,
{
    race(threads, || (), |thread, ()| work(thread))
}

/// Each thread runs `prepare`, waits for the others, then runs `work` with what it prepared. A
/// `prepare` that panics (a connection refused) still reaches the barrier, so the others are
/// not left waiting for it for ever, and its panic fails the caller.
fn race<T, C, F>(threads: usize, prepare: impl Fn() -> C + Sync, work: F) -> Vec<T>
where
    T: Send,
    F: Fn(usize, &mut C) -> T + Sync,
{
    let barrier = Barrier::new(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|thread| {
                let (barrier, prepare, work) = (&barrier, &prepare, &work);
                s.spawn(move || {
                    let prepared = std::panic::catch_unwind(std::panic::AssertUnwindSafe(prepare));
                    barrier.wait();
                    match prepared {
                        Ok(mut prepared) => work(thread, &mut prepared),
                        Err(panic) => std::panic::resume_unwind(panic),
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    })
}

/// The machine-load lock of one test binary: [`exclusive`] takes it alone, [`storm`] shares it.
static LOAD: RwLock<()> = RwLock::new(());

/// Runs the test that holds the returned guard without any [`exclusive`] or [`storm`] test
/// beside it (within one test binary).
///
/// All integration tests of a crate share one binary and run in parallel on a few cores. Tests
/// that assert time bounds (deadlines, a refusal within so many milliseconds) take this guard;
/// light tests still run beside them.
pub fn exclusive() -> RwLockWriteGuard<'static, ()> {
    LOAD.write().unwrap_or_else(PoisonError::into_inner)
}

/// Lets the test that holds the returned guard load the server (kills, crashes, several
/// processes) together with other such tests, but never beside an [`exclusive`] one.
pub fn storm() -> RwLockReadGuard<'static, ()> {
    LOAD.read().unwrap_or_else(PoisonError::into_inner)
}

/// The server's id of `conn`'s session (`CONNECTION_ID()`, what `KILL` takes).
pub fn connection_id(conn: &mut MysqlConnection) -> i64 {
    diesel::select(diesel::dsl::sql::<BigInt>("CONNECTION_ID()"))
        .get_result(conn)
        .expect("connection id")
}

/// The number of statements `conn`'s session has sent (`QUESTIONS`, the reading itself
/// included): tests bound what a call sends by it, not by the time it takes.
pub fn questions(conn: &mut MysqlConnection) -> i64 {
    diesel::dsl::sql::<BigInt>(
        "SELECT CAST(VARIABLE_VALUE AS SIGNED) FROM information_schema.SESSION_STATUS \
         WHERE VARIABLE_NAME = 'QUESTIONS'",
    )
    .get_result(conn)
    .expect("the session's statement count")
}

/// A connection to `url` whose server session `killer` has killed: any round trip on it fails.
pub fn killed_connection(url: &str, killer: &mut MysqlConnection) -> MysqlConnection {
    let mut doomed = connect(url);
    let id = connection_id(&mut doomed);
    killer
        .batch_execute(&format!("KILL CONNECTION {id}"))
        .expect("kill session");
    assert!(
        doomed.batch_execute("SELECT 1").is_err(),
        "the killed session still answers"
    );
    doomed
}

// ---------------------------------------------------------------------------------------------
// Readers of what the database stored
// ---------------------------------------------------------------------------------------------

/// Every column of a `user_balance` row: (user, balance, version, updated_at, held).
pub type BalanceRow = (i64, Decimal, i64, NaiveDateTime, Decimal);

/// Every column of a `balance_history` row, in schema order.
pub type HistoryRow = (
    i64,
    i64,
    String,
    Decimal,
    Decimal,
    Option<String>,
    String,
    Option<i64>,
    Option<i64>,
    Decimal,
    NaiveDateTime,
    Option<i64>,
);

/// (id, coupon template, total_quantity, stock_quantity) of a campaign.
pub type CampaignRow = (i64, i64, i32, i32);

/// Every row of both ledger tables, in primary-key order.
#[derive(Debug, PartialEq)]
pub struct Snapshot {
    /// The `user_balance` rows, by user.
    pub balances: Vec<BalanceRow>,
    /// The `balance_history` rows, in journal order.
    pub history: Vec<HistoryRow>,
}

/// Every row of both ledger tables ([`Snapshot`]).
pub fn snapshot(conn: &mut MysqlConnection) -> Snapshot {
    Snapshot {
        balances: user_balance::table
            .select(user_balance::all_columns)
            .order(user_balance::user_id.asc())
            .load(conn)
            .expect("read user_balance"),
        history: balance_history::table
            .select(balance_history::all_columns)
            .order(balance_history::id.asc())
            .load(conn)
            .expect("read balance_history"),
    }
}

/// The stored balance of account `user_id`.
pub fn stored_balance(conn: &mut MysqlConnection, user_id: i64) -> Decimal {
    user_balance::table
        .find(user_id)
        .select(user_balance::balance)
        .first(conn)
        .expect("read balance")
}

/// How many journal entries account `user_id` has.
pub fn journal_size(conn: &mut MysqlConnection, user_id: i64) -> i64 {
    balance_history::table
        .filter(balance_history::user_id.eq(user_id))
        .count()
        .get_result(conn)
        .expect("count journal")
}

/// How many journal entries of `kind` account `user_id` has.
pub fn count_kind(conn: &mut MysqlConnection, user_id: i64, kind: EntryKind) -> i64 {
    balance_history::table
        .filter(balance_history::user_id.eq(user_id))
        .filter(balance_history::kind.eq(kind.as_str()))
        .count()
        .get_result(conn)
        .expect("count journal entries")
}

/// How many journal entries of account `user_id` carry idempotency key `key`.
pub fn count_key(conn: &mut MysqlConnection, user_id: i64, key: &str) -> i64 {
    balance_history::table
        .filter(balance_history::user_id.eq(user_id))
        .filter(balance_history::idempotency_key.eq(key))
        .count()
        .get_result(conn)
        .expect("count key")
}

/// Asserts that `ledger.audit` finds account `user_id` consistent (balance = journal).
pub fn audit_ok(ledger: &BalanceLedger, conn: &mut MysqlConnection, user_id: i64) {
    match ledger.audit(conn, user_id) {
        Ok(report) => assert!(report.is_consistent(), "{report:?}"),
        Err(e) => panic!("audit of user {user_id} failed: {e}"),
    }
}

/// (total_quantity, stock_quantity) of a campaign.
pub fn stock_row(conn: &mut MysqlConnection, campaign_id: i64) -> (i32, i32) {
    fcfs_coupon::table
        .find(campaign_id)
        .select((fcfs_coupon::total_quantity, fcfs_coupon::stock_quantity))
        .first(conn)
        .expect("read fcfs_coupon")
}

/// How many statements the server has prepared for this connection so far
/// (`Com_stmt_prepare`), read with a statement that is itself prepared only once.
pub fn statement_prepares(conn: &mut MysqlConnection) -> i64 {
    diesel::select(diesel::dsl::sql::<BigInt>(
        "(SELECT CAST(VARIABLE_VALUE AS SIGNED) FROM information_schema.SESSION_STATUS \
         WHERE VARIABLE_NAME = 'COM_STMT_PREPARE')",
    ))
    .get_result(conn)
    .expect("read Com_stmt_prepare")
}

/// Every campaign row.
pub fn campaign_rows(conn: &mut MysqlConnection) -> Vec<CampaignRow> {
    fcfs_coupon::table
        .select((
            fcfs_coupon::id,
            fcfs_coupon::coupon_id,
            fcfs_coupon::total_quantity,
            fcfs_coupon::stock_quantity,
        ))
        .load(conn)
        .expect("read the campaigns")
}

/// A `user_coupon` row: (id, user, coupon template, campaign, status, used_at, order_ref).
pub type UserCouponRow = (
    i64,
    i64,
    i64,
    i64,
    String,
    Option<NaiveDateTime>,
    Option<String>,
);

/// Every `user_coupon` row ([`UserCouponRow`]), by id.
pub fn user_coupon_rows(conn: &mut MysqlConnection) -> Vec<UserCouponRow> {
    user_coupon::table
        .select((
            user_coupon::id,
            user_coupon::user_id,
            user_coupon::coupon_id,
            user_coupon::fcfs_coupon_id,
            user_coupon::status,
            user_coupon::used_at,
            user_coupon::order_ref,
        ))
        .order(user_coupon::id.asc())
        .load(conn)
        .expect("read user_coupon")
}

/// How many rows `user_coupon` holds for a campaign.
pub fn issued_rows(conn: &mut MysqlConnection, campaign_id: i64) -> i64 {
    user_coupon::table
        .filter(user_coupon::fcfs_coupon_id.eq(campaign_id))
        .count()
        .get_result(conn)
        .expect("count user_coupon")
}

/// (status, order_ref, used_at) of a user coupon.
pub fn user_coupon_row(
    conn: &mut MysqlConnection,
    id: i64,
) -> (String, Option<String>, Option<NaiveDateTime>) {
    user_coupon::table
        .find(id)
        .select((
            user_coupon::status,
            user_coupon::order_ref,
            user_coupon::used_at,
        ))
        .first(conn)
        .expect("read user_coupon")
}

/// The session variables lockstock's [`SessionSettings`] set, as a connection sees them.
#[derive(QueryableByName, Debug, PartialEq)]
pub struct SessionVars {
    /// `innodb_lock_wait_timeout`, in seconds.
    #[diesel(sql_type = BigInt)]
    pub lock_wait: i64,
    /// `lock_wait_timeout` (metadata locks), in seconds.
    #[diesel(sql_type = BigInt)]
    pub metadata_lock_wait: i64,
    /// `max_statement_time`, in seconds.
    #[diesel(sql_type = Double)]
    pub statement: f64,
    /// `lc_messages`.
    #[diesel(sql_type = Text)]
    pub messages: String,
    /// `time_zone`.
    #[diesel(sql_type = Text)]
    pub zone: String,
    /// `tx_isolation`.
    #[diesel(sql_type = Text)]
    pub isolation: String,
    /// `sql_select_limit`, as text (it is unsigned).
    #[diesel(sql_type = Text)]
    pub select_limit: String,
    /// `unique_checks` and `foreign_key_checks`, 0 or 1 each.
    #[diesel(sql_type = Text)]
    pub key_checks: String,
    /// `character_set_client`, `character_set_results` (`NULL` when unset) and
    /// `collation_connection`, comma-separated.
    #[diesel(sql_type = Text)]
    pub charsets: String,
    /// `sql_big_selects` (0 or 1) and the pending `insert_id` (0: none), comma-separated.
    #[diesel(sql_type = Text)]
    pub big_selects_insert_id: String,
}

/// The session variables of `conn` ([`SessionVars`]).
pub fn session_vars(conn: &mut MysqlConnection) -> SessionVars {
    diesel::sql_query(
        "SELECT @@session.innodb_lock_wait_timeout AS lock_wait, \
         CAST(@@session.lock_wait_timeout AS SIGNED) AS metadata_lock_wait, \
         @@session.max_statement_time AS statement, @@session.lc_messages AS messages, \
         @@session.time_zone AS zone, @@session.tx_isolation AS isolation, \
         CAST(@@session.sql_select_limit AS CHAR) AS select_limit, \
         CONCAT(@@session.unique_checks, @@session.foreign_key_checks) AS key_checks, \
         CONCAT_WS(',', @@session.character_set_client, \
         COALESCE(@@session.character_set_results, 'NULL'), \
         @@session.collation_connection) AS charsets, \
         CONCAT_WS(',', @@session.sql_big_selects, @@session.insert_id) AS big_selects_insert_id \
         LIMIT 1",
    )
    .get_result(conn)
    .expect("read session variables")
}

// ---------------------------------------------------------------------------------------------
// Contention and deadlines
// ---------------------------------------------------------------------------------------------

/// Another program's transaction on `url`: SERIALIZABLE (its reads take shared locks, gaps
/// included, as the design note's "does it exist?" reads do), waiting up to 10 s for a lock,
/// begun. End it with COMMIT or ROLLBACK (or [`assert_not_sacrificed`]).
pub fn other_program(url: &str) -> MysqlConnection {
    let mut foreign = connect(url);
    foreign
        .batch_execute(
            "SET SESSION innodb_lock_wait_timeout = 10; \
             SET TRANSACTION ISOLATION LEVEL SERIALIZABLE; BEGIN",
        )
        .expect("begin the other program");
    foreign
}

/// [`other_program`], holding `user_id`'s active holds `FOR UPDATE` (their index records too: a
/// range read of the account before it, under SERIALIZABLE, locks the first of them and waits).
/// Roll it back to let go.
pub fn holds_locker(url: &str, user_id: i64) -> MysqlConnection {
    let mut foreign = other_program(url);
    let _: Vec<i64> = lockstock::schema::balance_hold::table
        .filter(lockstock::schema::balance_hold::user_id.eq(user_id))
        .filter(lockstock::schema::balance_hold::state.eq("active"))
        .select(lockstock::schema::balance_hold::id)
        .for_update()
        .load(&mut foreign)
        .expect("lock the account's holds");
    foreign
}

/// Another program's transaction, open on `foreign`: after `delay` (while lockstock's call runs
/// beside it) it does `work` — typically asking for a row the call holds — and commits; if the
/// server rolled it back instead (a deadlock victim: 1213), it rolls back and panics. The
/// check that lockstock never waits for a lock while it holds one, so never closes a deadlock
/// in which someone else's transaction is sacrificed. Returns what `work` answered.
pub fn assert_not_sacrificed<T>(
    foreign: &mut MysqlConnection,
    delay: StdDuration,
    work: impl FnOnce(&mut MysqlConnection) -> QueryResult<T>,
) -> T {
    std::thread::sleep(delay);
    match work(foreign) {
        Ok(answer) => {
            foreign
                .batch_execute("COMMIT")
                .expect("commit the other program");
            answer
        }
        Err(e) => {
            foreign.batch_execute("ROLLBACK").ok();
            panic!("the other program's transaction was rolled back: {e:?}");
        }
    }
}

/// Holds rows from its own connection to `url` until `stop` is set: runs `session` (SQL) once,
/// then over and over `BEGIN`, `lock(conn)` (locking reads), `hold`, `COMMIT`, `gap`. Calls on
/// those rows are refused (or wait) most of the time.
pub fn row_holder(
    url: &str,
    session: &'static str,
    (hold, gap): (StdDuration, StdDuration),
    stop: Arc<AtomicBool>,
    mut lock: impl FnMut(&mut MysqlConnection) + Send + 'static,
) -> JoinHandle<()> {
    let mut conn = connect(url);
    std::thread::spawn(move || {
        conn.batch_execute(session).expect("holder session");
        while !stop.load(Ordering::SeqCst) {
            conn.batch_execute("BEGIN").expect("begin");
            lock(&mut conn);
            std::thread::sleep(hold);
            conn.batch_execute("COMMIT").expect("commit");
            std::thread::sleep(gap);
        }
    })
}

/// One call timed by a [`CallLog`]: what it was, how long it took, and the items it answered
/// with (or its error, formatted with `{:?}`).
#[derive(Debug)]
pub struct TimedCall<T> {
    /// What the call was; its first word is its kind.
    pub what: String,
    /// How long the call took.
    pub elapsed: StdDuration,
    /// The items it answered with, or its error.
    pub answer: Result<Vec<T>, String>,
}

/// The timed calls of a deadline test, recorded from many threads (clones share one log).
/// Every error a call answers with must be a deadline's (`Contended`, `Timeout`,
/// `ServerUnresponsive`, `OutcomeUnknown`) or one the log's `refusal` accepts.
pub struct CallLog<T> {
    calls: Arc<Mutex<Vec<TimedCall<T>>>>,
    refusal: fn(&Error) -> bool,
}

impl<T> Clone for CallLog<T> {
    fn clone(&self) -> Self {
        Self {
            calls: self.calls.clone(),
            refusal: self.refusal,
        }
    }
}

impl<T> CallLog<T> {
    /// An empty log whose calls may fail only with a deadline's errors or those `refusal`
    /// accepts.
    pub fn new(refusal: fn(&Error) -> bool) -> Self {
        Self {
            calls: Arc::default(),
            refusal,
        }
    }

    /// Times `call` and records it: its answer as `items(value)`, or its error (which must be
    /// one the log accepts: else this panics, naming `what`).
    pub fn time<V>(
        &self,
        what: String,
        call: impl FnOnce() -> Result<V, Error>,
        items: impl FnOnce(V) -> Vec<T>,
    ) {
        let started = Instant::now();
        let result = call();
        let elapsed = started.elapsed();
        let answer = match result {
            Ok(value) => Ok(items(value)),
            Err(e) => {
                // The answers of a call ended by its deadline — the watchdog's too, which cuts
                // a statement still unanswered at the deadline plus its grace (a loaded machine
                // can keep a healthy server's answer that long).
                let deadline = matches!(
                    e,
                    Error::Contended { .. }
                        | Error::Timeout { .. }
                        | Error::ServerUnresponsive { .. }
                        | Error::OutcomeUnknown { .. }
                );
                assert!(
                    deadline || (self.refusal)(&e),
                    "{what}: unexpected answer {e:?}"
                );
                Err(format!("{e:?}"))
            }
        };
        self.calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(TimedCall {
                what,
                elapsed,
                answer,
            });
    }

    /// The calls recorded so far (the log is left empty).
    pub fn take(&self) -> Vec<TimedCall<T>> {
        std::mem::take(&mut *self.calls.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// Prints a summary of `calls` under `label` (calls, ok, late, worst, and (calls, ok) by kind)
/// and asserts that none took longer than `bound`, listing the late ones.
pub fn assert_none_later_than<T: Debug>(label: &str, calls: &[TimedCall<T>], bound: StdDuration) {
    let late: Vec<&TimedCall<T>> = calls.iter().filter(|c| c.elapsed > bound).collect();
    let worst = calls.iter().map(|c| c.elapsed).max().unwrap_or_default();
    let ok = calls.iter().filter(|c| c.answer.is_ok()).count();
    let mut by_kind: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for call in calls {
        let kind = by_kind
            .entry(call.what.split(' ').next().unwrap_or(&call.what))
            .or_default();
        kind.0 += 1;
        kind.1 += usize::from(call.answer.is_ok());
    }
    eprintln!(
        "{label}: {} calls, {ok} ok, {} late, worst {worst:?}; (calls, ok) {by_kind:?}",
        calls.len(),
        late.len()
    );
    let listed: Vec<String> = late
        .iter()
        .map(|c| format!("{} took {:?}: {:?}", c.what, c.elapsed, c.answer))
        .collect();
    assert!(
        late.is_empty(),
        "{} of {} calls returned later than {bound:?}:\n  {}",
        late.len(),
        calls.len(),
        listed.join("\n  ")
    );
}

/// The default [`TxnPolicy`] with one overall retry deadline of `deadline`.
pub fn policy_with_deadline(deadline: StdDuration) -> TxnPolicy {
    let attempts = RetryPolicy::default().max_attempts;
    TxnPolicy::default().with_retry(retry_policy(attempts, deadline))
}

/// The default [`RetryPolicy`] with at most `max_attempts` attempts within `deadline`.
pub fn retry_policy(max_attempts: u32, deadline: StdDuration) -> RetryPolicy {
    let mut retry = RetryPolicy::default();
    retry.max_attempts = max_attempts;
    retry.deadline = deadline;
    retry
}

/// Runs `work` while the connection of a one-connection `pool` is checked out for the first
/// `busy` (from another thread): the checkouts of `work` wait for it.
pub fn while_checked_out<T>(pool: &MysqlPool, busy: StdDuration, work: impl FnOnce() -> T) -> T {
    let held = pool.get().expect("the pooled connection");
    let release = std::thread::spawn(move || {
        std::thread::sleep(busy);
        drop(held);
    });
    let result = work();
    release.join().expect("release the pooled connection");
    result
}

/// Asserts that `result` is an error that `expected` accepts; else panics with what it was.
#[track_caller]
pub fn assert_refused<T: Debug>(result: &Result<T, Error>, expected: impl FnOnce(&Error) -> bool) {
    match result {
        Err(e) if expected(e) => {}
        other => panic!("unexpected answer: {other:?}"),
    }
}

/// The name of an answer's variant: `Ok`, or the error's (`Contended`, `InvalidId`, ...) — to
/// compare a batch's answers with its single calls'.
pub fn variant<T>(result: &Result<T, Error>) -> String {
    match result {
        Ok(_) => "Ok".to_owned(),
        Err(e) => format!("{e:?}")
            .split([' ', '{', '('])
            .next()
            .unwrap_or_default()
            .to_owned(),
    }
}

/// Begins a transaction on `conn` that holds campaign `campaign_id`'s stock row `FOR UPDATE`
/// (waiting for it): the row stays locked until `conn`'s transaction ends.
pub fn hold_stock_row(conn: &mut MysqlConnection, campaign_id: i64) {
    conn.batch_execute("BEGIN").expect("begin");
    let _: Vec<i32> = fcfs_coupon::table
        .find(campaign_id)
        .select(fcfs_coupon::stock_quantity)
        .for_update()
        .load(conn)
        .expect("lock the stock row");
}

/// Reads account `user_id`'s balance with `FOR UPDATE` (waiting): the row stays locked until
/// `conn`'s transaction ends.
pub fn lock_balance(conn: &mut MysqlConnection, user_id: i64) -> QueryResult<Decimal> {
    user_balance::table
        .find(user_id)
        .select(user_balance::balance)
        .for_update()
        .first(conn)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A thread whose preparation panics (a connection refused) fails the race instead of
    /// leaving the others waiting at the barrier for ever (before the fix: a hang).
    #[test]
    fn a_race_whose_preparation_fails_fails_instead_of_hanging() {
        let (answer, answered) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let prepared = AtomicUsize::new(0);
            let raced = std::panic::catch_unwind(|| {
                race(
                    3,
                    || {
                        if prepared.fetch_add(1, Ordering::SeqCst) == 0 {
                            panic!("a refused connection");
                        }
                    },
                    |_, ()| (),
                )
            });
            let _ = answer.send(raced.is_err());
        });
        assert_eq!(
            answered.recv_timeout(StdDuration::from_secs(20)).ok(),
            Some(true),
            "the race panics (it does not hang)"
        );
    }
}
