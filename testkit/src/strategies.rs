//! Contention strategies for one hot coupon campaign and one hot account, used by lockstock's
//! `benches/contention.rs` and `examples/contention_report.rs`.
//!
//! Strategies (see [`Strategy`]):
//! * `seed` — the design note, hand-written through [`TxnRunner::run_counted`] (SERIALIZABLE,
//!   `FOR UPDATE NOWAIT`, jittered retry) so lock refusals are counted: for the coupon in the
//!   note's own order (lock the campaign, look for the user's coupon, decrease, insert); for the
//!   account the statements of `BalanceLedger::deduct` (lock, journal, update — the note's order);
//! * `seed(lib)` — the library's own `CouponIssuer::issue` (insert first, then lock the stock for
//!   one UPDATE) / `BalanceLedger::deduct`;
//! * `wait` — the same statements with a waiting `FOR UPDATE`, retried only on deadlock or lock
//!   wait timeout;
//! * `cond` — one conditional `UPDATE ... WHERE stock > 0` (or `balance >= amount`) per request;
//! * `combining` — `CombiningIssuer` / `CombiningLedger` over an r2d2 pool.
//!
//! [`Harness::run_cell`] runs one (domain, strategy, clients) cell with one thread per client
//! and checks the invariants from the database afterwards. [`Harness::on_cluster`] runs the same
//! cells on a Galera cluster, with every client on one node or spread over the nodes
//! ([`Topology`]), and counts the cluster's certification failures and brute-force aborts
//! ([`Conflicts`]). A client whose call never returns is counted as stuck and left behind
//! ([`STUCK_GRACE`]) instead of hanging the cell.
//!
//! Beyond the cells: [`Harness::floor`] measures what the server can write at a combined
//! batch's size (one connection, the batch's rows and one UPDATE per transaction, nothing
//! else); [`combining_clients`] runs one process's combiner on a hot row [`Harness::prepare`]d
//! by another process, which [`Harness::check`]s it once every process is done; and
//! [`Harness::redis_gate`] runs the Redis `DECR` gate with one INSERT per granted request.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Barrier, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use chrono::{NaiveDateTime, Utc};
use diesel::connection::SimpleConnection;
use diesel::dsl::{count_star, sum};
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};
use lockstock::combine::{CombinerStats, CombiningIssuer, CombiningLedger, MysqlPool};
use lockstock::schema::{balance_history, fcfs_coupon, user_balance, user_coupon};
use lockstock::txn::{apply_session_settings, Attempts};
use lockstock::{
    BalanceLedger, CouponIssuer, Discount, Error, NewCampaign, NewCoupon, ServerErrorKind,
    SessionSettings, StatementCache, StockRowWait, TxnPolicy, TxnRunner,
};
use rust_decimal::Decimal;

use crate::redis::RedisServer;

/// Errors of the harness itself (setup, connections, invariant queries).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

diesel::define_sql_function! {
    /// The id of the row the last INSERT on this connection created.
    fn last_insert_id() -> diesel::sql_types::Unsigned<diesel::sql_types::BigInt>;
}

/// Retries of the `wait` strategy after a deadlock or lock wait timeout.
const WAIT_MAX_RETRIES: u32 = 64;
/// What every deduct takes from the hot account.
pub const DEDUCT_AMOUNT: Decimal = Decimal::from_parts(1, 0, 0, false, 2);
/// What the hot account is charged with first: enough for 10^9 deducts.
pub const INITIAL_BALANCE: Decimal = Decimal::from_parts(10_000_000, 0, 0, false, 0);

/// Which hot row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Domain {
    /// One campaign: every request issues one coupon to a new user.
    Coupon,
    /// One account: every request deducts [`DEDUCT_AMOUNT`] under a new idempotency key.
    Ledger,
}

impl Domain {
    /// Both.
    pub const ALL: [Domain; 2] = [Domain::Coupon, Domain::Ledger];

    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Coupon => "coupon",
            Self::Ledger => "ledger",
        }
    }

    /// Title for reports.
    pub fn title(self) -> &'static str {
        match self {
            Self::Coupon => "hot coupon (one campaign, distinct users)",
            Self::Ledger => "hot account (one account, distinct keys)",
        }
    }
}

/// How a request reaches the hot row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// The design note, hand-written through `TxnRunner::run_counted` (refusals counted).
    Seed,
    /// The library's `CouponIssuer::issue` / `BalanceLedger::deduct`.
    SeedLib,
    /// SERIALIZABLE with a waiting `FOR UPDATE`.
    Wait,
    /// One conditional UPDATE per request.
    Cond,
    /// Request combining over a pool.
    Combining,
}

impl Strategy {
    /// Every strategy, in report order.
    pub const ALL: [Strategy; 5] = [
        Strategy::Seed,
        Strategy::SeedLib,
        Strategy::Wait,
        Strategy::Cond,
        Strategy::Combining,
    ];

    /// Display name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Seed => "seed",
            Self::SeedLib => "seed(lib)",
            Self::Wait => "wait",
            Self::Cond => "cond",
            Self::Combining => "combining",
        }
    }

    /// Name usable in file names and benchmark ids.
    pub fn id(self) -> &'static str {
        match self {
            Self::SeedLib => "seed_lib",
            other => other.name(),
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The hot campaign of one cell.
#[derive(Debug, Clone, Copy)]
pub struct CouponTarget {
    /// `fcfs_coupon.id`.
    pub campaign_id: i64,
    /// Its coupon template.
    pub coupon_id: i64,
    /// Its stock when created.
    pub total: i32,
}

/// Connects and applies the library's default session settings (timeouts, English messages).
pub fn connect(url: &str) -> Result<MysqlConnection, BoxError> {
    let mut conn = MysqlConnection::establish(url)?;
    apply_session_settings(&mut conn, &TxnPolicy::default())?;
    Ok(conn)
}

/// An r2d2 pool as an application would build it, with lockstock's session settings.
pub fn pool(url: &str, size: u32) -> Result<MysqlPool, BoxError> {
    if size == 0 {
        return Err("a pool needs at least one connection".into());
    }
    Ok(Pool::builder()
        .max_size(size)
        .connection_customizer(Box::new(SessionSettings::new(TxnPolicy::default())))
        .build(ConnectionManager::<MysqlConnection>::new(url))?)
}

/// The pool size used for `combining` with `clients` clients.
pub fn combining_pool_size(clients: usize) -> u32 {
    u32::try_from(clients.clamp(1, 8)).unwrap_or(8)
}

fn now() -> NaiveDateTime {
    Utc::now().naive_utc()
}

/// Hand-written transaction: `SET TRANSACTION ISOLATION LEVEL SERIALIZABLE`, then Diesel's
/// `transaction` (BEGIN ... COMMIT, ROLLBACK on error).
pub fn serializable<T>(
    conn: &mut MysqlConnection,
    body: impl FnOnce(&mut MysqlConnection) -> Result<T, Error>,
) -> Result<T, Error> {
    conn.batch_execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")?;
    conn.transaction(body)
}

/// Deadlock or lock wait timeout: what the `wait` strategy retries.
fn is_lock_failure(error: &Error) -> bool {
    matches!(
        error.server_kind(),
        Some(ServerErrorKind::Deadlock | ServerErrorKind::LockWaitTimeout)
    )
}

/// Runs `attempt` until it succeeds, fails otherwise, or [`WAIT_MAX_RETRIES`] retries are spent;
/// returns the result and the number of retries.
fn retry_lock_failures<T>(
    conn: &mut MysqlConnection,
    mut attempt: impl FnMut(&mut MysqlConnection) -> Result<T, Error>,
) -> (Result<T, Error>, u32) {
    let mut retries = 0;
    loop {
        match attempt(conn) {
            Err(error) if is_lock_failure(&error) && retries < WAIT_MAX_RETRIES => retries += 1,
            other => return (other, retries),
        }
    }
}

fn inserted_id(conn: &mut MysqlConnection) -> Result<i64, Error> {
    let id: u64 = diesel::select(last_insert_id()).get_result(conn)?;
    i64::try_from(id)
        .map_err(|e| Error::from(diesel::result::Error::DeserializationError(e.into())))
}

// ---------------------------------------------------------------------------------------------
// Hot coupon
// ---------------------------------------------------------------------------------------------

/// INSERTs the coupon row of `user_id` from `target` issued at `at`; returns its id.
fn insert_user_coupon(
    conn: &mut MysqlConnection,
    user_id: i64,
    target: &CouponTarget,
    at: NaiveDateTime,
) -> Result<i64, Error> {
    write_user_coupon(conn, user_id, target, at)?;
    inserted_id(conn)
}

/// INSERTs the coupon row of `user_id` from `target` issued at `at` (its id not read).
fn write_user_coupon(
    conn: &mut MysqlConnection,
    user_id: i64,
    target: &CouponTarget,
    at: NaiveDateTime,
) -> Result<(), Error> {
    diesel::insert_into(user_coupon::table)
        .values((
            user_coupon::user_id.eq(user_id),
            user_coupon::coupon_id.eq(target.coupon_id),
            user_coupon::fcfs_coupon_id.eq(target.campaign_id),
            user_coupon::status.eq("issued"),
            user_coupon::issued_at.eq(at),
        ))
        .execute(conn)?;
    Ok(())
}

/// The statements of `CouponIssuer::issue`: INSERT user_coupon, `SELECT stock_quantity,
/// LAST_INSERT_ID() ... FOR UPDATE [NOWAIT]` (the coupon's id comes with the lock), UPDATE
/// stock. Returns the coupon id.
fn issue_statements(
    conn: &mut MysqlConnection,
    user_id: i64,
    target: &CouponTarget,
    at: NaiveDateTime,
    nowait: bool,
) -> Result<i64, Error> {
    let campaign_id = target.campaign_id;
    write_user_coupon(conn, user_id, target, at)?;
    let stock_row = fcfs_coupon::table
        .find(campaign_id)
        .select((fcfs_coupon::stock_quantity, last_insert_id()));
    let locked: Option<(i32, u64)> = if nowait {
        stock_row.for_update().no_wait().first(conn).optional()?
    } else {
        stock_row.for_update().first(conn).optional()?
    };
    let (stock, id) = locked.ok_or(Error::CampaignNotFound { campaign_id })?;
    let id = i64::try_from(id)
        .map_err(|e| Error::from(diesel::result::Error::DeserializationError(e.into())))?;
    if stock <= 0 {
        return Err(Error::SoldOut { campaign_id });
    }
    diesel::update(fcfs_coupon::table.find(campaign_id))
        .set(fcfs_coupon::stock_quantity.eq(stock - 1))
        .execute(conn)?;
    Ok(id)
}

/// The design note's `issueFcfsCoupon`, in its order: lock the campaign row
/// (`WHERE id = ? AND stock_quantity > 0 FOR UPDATE NOWAIT`), look for the user's coupon,
/// decrease the stock, insert the coupon — all while holding the hot row.
fn design_note_issue_statements(
    conn: &mut MysqlConnection,
    user_id: i64,
    target: &CouponTarget,
    at: NaiveDateTime,
) -> Result<i64, Error> {
    let campaign_id = target.campaign_id;
    let locked: Option<i64> = fcfs_coupon::table
        .filter(fcfs_coupon::id.eq(campaign_id))
        .filter(fcfs_coupon::stock_quantity.gt(0))
        .select(fcfs_coupon::id)
        .for_update()
        .no_wait()
        .first(conn)
        .optional()?;
    // The note's snippet never checks this result; an empty one means sold out (or no campaign).
    if locked.is_none() {
        return Err(Error::SoldOut { campaign_id });
    }
    let existing: Option<i64> = user_coupon::table
        .filter(user_coupon::user_id.eq(user_id))
        .filter(user_coupon::coupon_id.eq(target.coupon_id))
        .select(user_coupon::id)
        .first(conn)
        .optional()?;
    if let Some(user_coupon_id) = existing {
        return Err(Error::AlreadyIssued {
            user_id,
            coupon_id: target.coupon_id,
            user_coupon_id,
        });
    }
    diesel::update(fcfs_coupon::table.find(campaign_id))
        .set(fcfs_coupon::stock_quantity.eq(fcfs_coupon::stock_quantity - 1))
        .execute(conn)?;
    insert_user_coupon(conn, user_id, target, at)
}

/// `seed`: the design note (its statement order, SERIALIZABLE, `FOR UPDATE NOWAIT`, jittered
/// retry) through the library's runner, counting refusals.
pub fn issue_seed(
    runner: &TxnRunner,
    conn: &mut MysqlConnection,
    user_id: i64,
    target: &CouponTarget,
) -> (Result<i64, Error>, Attempts) {
    let at = now();
    runner.run_counted(conn, |conn| {
        design_note_issue_statements(conn, user_id, target, at)
    })
}

/// Hand-written twin of `CouponIssuer::issue` for the uncontended comparison: one SERIALIZABLE
/// transaction with `FOR UPDATE NOWAIT`, no retry.
pub fn issue_hand(
    conn: &mut MysqlConnection,
    user_id: i64,
    target: &CouponTarget,
) -> Result<i64, Error> {
    issue_serializable(conn, (user_id, target, now()), true)
}

/// [`issue_statements`] in one SERIALIZABLE transaction, for `user_id` from `target` at `at`.
fn issue_serializable(
    conn: &mut MysqlConnection,
    (user_id, target, at): (i64, &CouponTarget, NaiveDateTime),
    nowait: bool,
) -> Result<i64, Error> {
    serializable(conn, |conn| {
        issue_statements(conn, user_id, target, at, nowait)
    })
}

/// `wait`: SERIALIZABLE, waiting `FOR UPDATE`, retried on deadlock / lock wait timeout.
pub fn issue_wait(
    conn: &mut MysqlConnection,
    user_id: i64,
    target: &CouponTarget,
) -> (Result<i64, Error>, u32) {
    let request = (user_id, target, now());
    retry_lock_failures(conn, |conn| issue_serializable(conn, request, false))
}

/// `cond`: INSERT user_coupon, `SELECT LAST_INSERT_ID()`, then one
/// `UPDATE fcfs_coupon SET stock_quantity = stock_quantity - 1 WHERE id = ? AND
/// stock_quantity > 0` (the hot row is locked from here to COMMIT), in one SERIALIZABLE
/// transaction; retried on deadlock / lock wait timeout like `wait`.
pub fn issue_cond(
    conn: &mut MysqlConnection,
    user_id: i64,
    target: &CouponTarget,
) -> (Result<i64, Error>, u32) {
    let campaign_id = target.campaign_id;
    let at = now();
    retry_lock_failures(conn, |conn| {
        serializable(conn, |conn| {
            let id = insert_user_coupon(conn, user_id, target, at)?;
            let taken = diesel::update(
                fcfs_coupon::table
                    .find(campaign_id)
                    .filter(fcfs_coupon::stock_quantity.gt(0)),
            )
            .set(fcfs_coupon::stock_quantity.eq(fcfs_coupon::stock_quantity - 1))
            .execute(conn)?;
            if taken == 0 {
                return Err(Error::SoldOut { campaign_id });
            }
            Ok(id)
        })
    })
}

// ---------------------------------------------------------------------------------------------
// Hot account
// ---------------------------------------------------------------------------------------------

/// The journal's `request_hash` of a deduct, as lockstock stores it, so hand-written rows look
/// like the library's.
pub fn deduct_hash(user_id: i64, amount: Decimal) -> String {
    lockstock::ledger::request_hash(lockstock::EntryKind::Deduct, user_id, amount, None)
}

/// One deduct of the hot-account strategies: `amount` from account `user_id` under
/// idempotency key `key`.
#[derive(Debug, Clone, Copy)]
pub struct Deduct<'a> {
    /// The account.
    pub user_id: i64,
    /// How much.
    pub amount: Decimal,
    /// The idempotency key.
    pub key: &'a str,
}

impl Deduct<'_> {
    /// Its journal `request_hash` ([`deduct_hash`]).
    pub fn hash(&self) -> String {
        deduct_hash(self.user_id, self.amount)
    }
}

fn insert_deduct_entry(
    conn: &mut MysqlConnection,
    deduct: &Deduct<'_>,
    balance_after: Decimal,
    hash: &str,
) -> Result<i64, Error> {
    let Deduct {
        user_id,
        amount,
        key,
    } = *deduct;
    diesel::insert_into(balance_history::table)
        .values((
            balance_history::user_id.eq(user_id),
            balance_history::kind.eq("deduct"),
            balance_history::amount.eq(amount),
            balance_history::balance_after.eq(balance_after),
            balance_history::idempotency_key.eq(Some(key)),
            balance_history::request_hash.eq(hash),
            balance_history::created_at.eq(now()),
        ))
        .execute(conn)?;
    inserted_id(conn)
}

/// The statements of `BalanceLedger::deduct`: `SELECT balance, version ... FOR UPDATE
/// [NOWAIT]`, INSERT journal, `SELECT LAST_INSERT_ID()`, UPDATE balance and version.
fn deduct_statements(
    conn: &mut MysqlConnection,
    deduct: &Deduct<'_>,
    hash: &str,
    nowait: bool,
) -> Result<i64, Error> {
    let Deduct {
        user_id, amount, ..
    } = *deduct;
    let account = user_balance::table
        .find(user_id)
        .select((user_balance::balance, user_balance::version));
    let row: Option<(Decimal, i64)> = if nowait {
        account.for_update().no_wait().first(conn).optional()?
    } else {
        account.for_update().first(conn).optional()?
    };
    let (balance, version) = row.ok_or(Error::AccountNotFound { user_id })?;
    if balance < amount {
        return Err(Error::InsufficientBalance {
            user_id,
            available: balance,
            requested: amount,
        });
    }
    let after = balance - amount;
    let id = insert_deduct_entry(conn, deduct, after, hash)?;
    diesel::update(user_balance::table.find(user_id))
        .set((
            user_balance::balance.eq(after),
            user_balance::version.eq(version + 1),
        ))
        .execute(conn)?;
    Ok(id)
}

/// `seed`: the design note through the library's runner, counting refusals.
pub fn deduct_seed(
    runner: &TxnRunner,
    conn: &mut MysqlConnection,
    deduct: &Deduct<'_>,
) -> (Result<i64, Error>, Attempts) {
    let hash = deduct.hash();
    runner.run_counted(conn, |conn| deduct_statements(conn, deduct, &hash, true))
}

/// Hand-written twin of `BalanceLedger::deduct` for the uncontended comparison.
pub fn deduct_hand(conn: &mut MysqlConnection, deduct: &Deduct<'_>) -> Result<i64, Error> {
    let hash = deduct.hash();
    serializable(conn, |conn| deduct_statements(conn, deduct, &hash, true))
}

/// `wait`: SERIALIZABLE, waiting `FOR UPDATE`, retried on deadlock / lock wait timeout.
pub fn deduct_wait(conn: &mut MysqlConnection, deduct: &Deduct<'_>) -> (Result<i64, Error>, u32) {
    let hash = deduct.hash();
    retry_lock_failures(conn, |conn| {
        serializable(conn, |conn| deduct_statements(conn, deduct, &hash, false))
    })
}

/// `cond`: `UPDATE user_balance SET balance = balance - ?, version = version + 1 WHERE
/// user_id = ? AND balance >= ?` (locks the row), read the new balance back for the journal's
/// `balance_after`, INSERT the journal entry, `SELECT LAST_INSERT_ID()`, COMMIT.
pub fn deduct_cond(conn: &mut MysqlConnection, deduct: &Deduct<'_>) -> (Result<i64, Error>, u32) {
    let hash = deduct.hash();
    let Deduct {
        user_id, amount, ..
    } = *deduct;
    retry_lock_failures(conn, |conn| {
        serializable(conn, |conn| {
            let changed = diesel::update(
                user_balance::table
                    .find(user_id)
                    .filter(user_balance::balance.ge(amount)),
            )
            .set((
                user_balance::balance.eq(user_balance::balance - amount),
                user_balance::version.eq(user_balance::version + 1),
            ))
            .execute(conn)?;
            if changed == 0 {
                return Err(Error::InsufficientBalance {
                    user_id,
                    available: Decimal::ZERO,
                    requested: amount,
                });
            }
            let after: Decimal = user_balance::table
                .find(user_id)
                .select(user_balance::balance)
                .first(conn)?;
            insert_deduct_entry(conn, deduct, after, &hash)
        })
    })
}

// ---------------------------------------------------------------------------------------------
// Cells
// ---------------------------------------------------------------------------------------------

/// One measured cell.
#[derive(Debug, Clone)]
pub struct CellConfig {
    /// Which hot row.
    pub domain: Domain,
    /// How.
    pub strategy: Strategy,
    /// Concurrent clients (threads).
    pub clients: usize,
    /// Requests in all (also the campaign's stock).
    pub max_requests: u64,
    /// Stop starting requests after this long (requests in flight finish).
    pub max_time: Option<Duration>,
}

/// What one cell measured.
#[derive(Debug, Clone)]
pub struct CellResult {
    /// Which hot row.
    pub domain: Domain,
    /// How.
    pub strategy: Strategy,
    /// Where the clients connected.
    pub topology: Topology,
    /// Concurrent clients.
    pub clients: usize,
    /// Requests started.
    pub attempted: u64,
    /// Requests that succeeded.
    pub ok: u64,
    /// Requests that failed (`errors_by_kind` says how).
    pub errors: u64,
    /// Lock refusals (seed), deadlock / lock-wait-timeout retries (wait, cond); `None` where
    /// the library does not expose them (seed(lib), combining).
    pub refusals: Option<u64>,
    /// From the start signal until the last client finished.
    pub wall: Duration,
    /// Latency of every request (µs), sorted.
    pub latencies_us: Vec<u32>,
    /// Combiner statistics (combining only).
    pub batches: Option<CombinerStats>,
    /// Error counts by kind.
    pub errors_by_kind: Vec<(String, u64)>,
    /// Clients that had not finished [`STUCK_GRACE`] after the cell's time (each with one call
    /// in flight, in doubt for the checks).
    pub stuck: u64,
    /// The cluster's certification failures and brute-force aborts during the cell; `None` on a
    /// single server.
    pub conflicts: Option<Conflicts>,
    /// Invariant violations found in the database afterwards; empty when consistent.
    pub violations: Vec<String>,
}

impl CellResult {
    /// Requests answered (ok or error) per second.
    pub fn request_rate(&self) -> f64 {
        per_second(self.attempted, self.wall)
    }

    /// Successful requests per second.
    pub fn throughput(&self) -> f64 {
        per_second(self.ok, self.wall)
    }

    /// Latency percentile `p` (0..=100) in milliseconds.
    pub fn percentile_ms(&self, p: f64) -> f64 {
        percentile_us(&self.latencies_us, p) / 1000.0
    }

    /// Refusals per successful request, if observable.
    pub fn refusals_per_success(&self) -> Option<f64> {
        let refusals = self.refusals?;
        Some(if self.ok == 0 {
            refusals as f64
        } else {
            refusals as f64 / self.ok as f64
        })
    }
}

/// `count` per second of `wall` (0 for no time).
pub fn per_second(count: u64, wall: Duration) -> f64 {
    let secs = wall.as_secs_f64();
    if secs > 0.0 {
        count as f64 / secs
    } else {
        0.0
    }
}

/// Percentile `p` (0..=100) of sorted microsecond samples.
pub fn percentile_us(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    f64::from(sorted[rank.min(sorted.len() - 1)])
}

/// Mean of microsecond samples.
pub fn mean_us(samples: &[u32]) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.iter().map(|s| f64::from(*s)).sum::<f64>() / samples.len() as f64
}

/// What one client thread saw.
#[derive(Default)]
struct ClientTally {
    ok_ids: Vec<i64>,
    errors: HashMap<String, u64>,
    refusals: u64,
    latencies_us: Vec<u32>,
}

impl ClientTally {
    /// One request that started at `started`: its id or the kind of its error, and its refusals.
    fn record(&mut self, result: Result<i64, String>, refusals: u64, started: Instant) {
        let micros = started.elapsed().as_micros();
        self.latencies_us
            .push(u32::try_from(micros).unwrap_or(u32::MAX));
        self.refusals += refusals;
        match result {
            Ok(id) => self.ok_ids.push(id),
            Err(kind) => *self.errors.entry(kind).or_default() += 1,
        }
    }
}

/// What the clients of one run did, merged ([`Harness::run_cell`], [`combining_clients`],
/// [`Harness::redis_gate`]).
#[derive(Debug, Clone, Default)]
pub struct Run {
    /// The ids the successful requests handed out (coupon ids, journal entry ids).
    pub ok_ids: Vec<i64>,
    /// Failed requests by kind ([`error_kind`]).
    pub errors: HashMap<String, u64>,
    /// Refusals or retries the requests reported (0 where not observable).
    pub refusals: u64,
    /// Latency of every request (µs), sorted.
    pub latencies_us: Vec<u32>,
    /// From the start signal until the last client finished.
    pub wall: Duration,
    /// Clients still running [`STUCK_GRACE`] after the run's time (each with one call in
    /// flight, in doubt for the checks).
    pub stuck: u64,
}

impl Run {
    /// Requests answered.
    pub fn attempted(&self) -> u64 {
        self.latencies_us.len() as u64
    }

    /// Requests that failed.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Calls that may have been applied without a success to show for it: the stuck clients'
    /// and those answered [`Error::OutcomeUnknown`] (its COMMIT may have landed). The checks
    /// allow that many rows beyond the successes.
    pub fn in_doubt(&self) -> u64 {
        let unknown: u64 = self
            .errors
            .iter()
            .filter(|(kind, _)| kind.starts_with(OUTCOME_UNKNOWN))
            .map(|(_, count)| count)
            .sum();
        self.stuck + unknown
    }

    /// Successful requests per second.
    pub fn throughput(&self) -> f64 {
        per_second(self.ok_ids.len() as u64, self.wall)
    }

    /// Latency percentile `p` (0..=100) in milliseconds.
    pub fn percentile_ms(&self, p: f64) -> f64 {
        percentile_us(&self.latencies_us, p) / 1000.0
    }

    /// Error counts by kind, most frequent first.
    pub fn errors_by_kind(&self) -> Vec<(String, u64)> {
        let mut errors: Vec<(String, u64)> =
            self.errors.iter().map(|(k, n)| (k.clone(), *n)).collect();
        errors.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        errors
    }

    /// Adds `other` (another process's clients, run at the same time) to this run; the wall
    /// time is the caller's to set.
    pub fn absorb(&mut self, other: Run) {
        self.ok_ids.extend(other.ok_ids);
        for (kind, count) in other.errors {
            *self.errors.entry(kind).or_default() += count;
        }
        self.refusals += other.refusals;
        self.latencies_us.extend(other.latencies_us);
        self.latencies_us.sort_unstable();
        self.stuck += other.stuck;
    }

    /// Every request answered once, and a combiner (`batches`) batched no request that was not
    /// made and none fewer than succeeded. Returns the violations.
    pub fn consistency(&self, batches: Option<CombinerStats>) -> Vec<String> {
        let (ok, errors, attempted) = (
            self.ok_ids.len() as u64,
            self.error_count(),
            self.attempted(),
        );
        let mut violations = Vec::new();
        if ok + errors != attempted {
            violations.push(format!("{ok} ok + {errors} errors != {attempted} requests"));
        }
        if let Some(stats) = batches {
            // Requests that timed out while queued never reach a batch; a stuck client's
            // request may be in one.
            if stats.requests > attempted + self.stuck || stats.requests < ok {
                violations.push(format!(
                    "combiner batched {} requests; {attempted} were made, {ok} succeeded",
                    stats.requests
                ));
            }
        }
        violations
    }
}

/// Rows a floor measurement may write at most ([`Harness::floor`]): its campaign's stock.
const FLOOR_CAPACITY: u64 = 20_000_000;

/// What [`Harness::floor`] measured.
#[derive(Debug, Clone)]
pub struct Floor {
    /// Which hot row.
    pub domain: Domain,
    /// Rows per transaction.
    pub batch: usize,
    /// Transactions committed.
    pub transactions: u64,
    /// Rows written (`transactions * batch`).
    pub rows: u64,
    /// How long it wrote.
    pub wall: Duration,
    /// What the checks afterwards found; empty when consistent.
    pub violations: Vec<String>,
}

impl Floor {
    /// Rows written per second: the most requests per second a combiner with this batch size
    /// could answer on this server.
    pub fn rows_per_second(&self) -> f64 {
        per_second(self.rows, self.wall)
    }
}

/// One floor transaction: `SET TRANSACTION ISOLATION LEVEL SERIALIZABLE` and `BEGIN` in one
/// batch (as lockstock's runner sends them), `body`, COMMIT; ROLLBACK if `body` fails.
fn floor_transaction(conn: &mut MysqlConnection, writes: &str) -> Result<(), BoxError> {
    // One round trip: the server's cost of the writes, nothing of a client's protocol.
    let batch = format!("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE; BEGIN; {writes}; COMMIT");
    if let Err(error) = conn.batch_execute(&batch) {
        let _ = conn.batch_execute("ROLLBACK");
        return Err(error.into());
    }
    Ok(())
}

/// A `DATETIME(6)` literal.
fn sql_datetime(at: chrono::NaiveDateTime) -> String {
    at.format("%Y-%m-%d %H:%M:%S%.6f").to_string()
}

/// What [`Harness::redis_gate`] measured.
#[derive(Debug, Clone)]
pub struct Gate {
    /// Concurrent clients.
    pub clients: usize,
    /// The campaign's stock.
    pub stock: i32,
    /// `user_coupon` rows stored for the campaign.
    pub rows: u64,
    /// What Redis says is left.
    pub remaining: i64,
    /// Coupons beyond the stock (rows over it, or Redis counting more stock than is left).
    pub over_issued: u64,
    /// Stock Redis gave out without a row in MariaDB (a grant lost after `DECR`).
    pub under_issued: u64,
    /// What the clients saw.
    pub run: Run,
    /// Violations found afterwards (an over-issue included; an under-issue is reported in
    /// `under_issued`, not here); empty when consistent.
    pub violations: Vec<String>,
}

/// What [`drive`] gives back: the run and each client's state (`None`: stuck, left behind).
struct Driven<S> {
    run: Run,
    returned: Vec<Option<S>>,
}

/// Runs one thread per state, started together; each calls `request(state, n)` with request
/// numbers `n` shared by all, until `max_requests` are started or `max_time` is over, and
/// records what it returns: the id handed out or the kind of error, and refusals. A client not
/// back [`STUCK_GRACE`] after `max_time` is counted as stuck and left behind.
fn drive<S, F>(
    states: Vec<S>,
    request: F,
    max_requests: u64,
    max_time: Option<Duration>,
) -> Result<Driven<S>, BoxError>
where
    S: Send + 'static,
    F: Fn(&mut S, u64) -> (Result<i64, String>, u64) + Send + Sync + 'static,
{
    let request = Arc::new(request);
    let next = Arc::new(AtomicU64::new(0));
    let barrier = Arc::new(Barrier::new(states.len() + 1));
    let tallies: Vec<Arc<Mutex<ClientTally>>> = states.iter().map(|_| Arc::default()).collect();
    let mut threads = BoundedThreads::new();
    for (mut state, tally) in states.into_iter().zip(&tallies) {
        let (next, barrier, tally) = (next.clone(), barrier.clone(), tally.clone());
        let request = request.clone();
        threads.spawn(move || {
            barrier.wait();
            // A time too long for an `Instant` (`Duration::MAX`) is no time limit.
            let deadline = max_time.and_then(|t| Instant::now().checked_add(t));
            loop {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= max_requests {
                    break;
                }
                let started = Instant::now();
                let (result, refusals) = request(&mut state, n);
                lock(&tally).record(result, refusals, started);
            }
            state
        });
    }
    barrier.wait();
    let start = Instant::now();
    let stuck_after = max_time.and_then(|t| start.checked_add(t.saturating_add(STUCK_GRACE)));
    let (returned, last) = threads.collect(stuck_after)?;
    let mut run = Run {
        wall: last.map_or(Duration::ZERO, |at| at.saturating_duration_since(start)),
        stuck: returned.iter().filter(|r| r.is_none()).count() as u64,
        ..Run::default()
    };
    for tally in &tallies {
        let tally = std::mem::take(&mut *lock(tally));
        run.ok_ids.extend(tally.ok_ids);
        for (kind, count) in tally.errors {
            *run.errors.entry(kind).or_default() += count;
        }
        run.refusals += tally.refusals;
        run.latencies_us.extend(tally.latencies_us);
    }
    run.latencies_us.sort_unstable();
    Ok(Driven { run, returned })
}

/// The statistics of two combiners as one.
fn merge_stats(a: CombinerStats, b: CombinerStats) -> CombinerStats {
    let mut merged = a;
    merged.batches += b.batches;
    merged.requests += b.requests;
    merged.largest_batch = a.largest_batch.max(b.largest_batch);
    merged.queued += b.queued;
    merged
}

/// Runs `clients` threads on the hot row of `prepared` through one combiner of `domain` over
/// `pool` (as one application process does), until `max_requests` are started or `max_time`
/// is over. Returns the run and the combiner's statistics; checks nothing (the caller checks
/// the database once every process is done, [`Harness::check`]).
pub fn combining_clients(
    pool: MysqlPool,
    domain: Domain,
    prepared: &Prepared,
    clients: usize,
    limits: (u64, Option<Duration>),
) -> Result<(Run, CombinerStats), BoxError> {
    let wait = StockRowWait::default();
    combining_clients_with(pool, (domain, wait), prepared, clients, limits)
}

/// [`combining_clients`] with the coupon combiner's batches waiting for a stock row another
/// process holds as `wait` says ([`CouponIssuer::with_stock_row_wait`]; a ledger has no
/// stock row and ignores it).
pub fn combining_clients_with(
    pool: MysqlPool,
    (domain, wait): (Domain, StockRowWait),
    prepared: &Prepared,
    clients: usize,
    (max_requests, max_time): (u64, Option<Duration>),
) -> Result<(Run, CombinerStats), BoxError> {
    let executor = Arc::new(Executor::combining_with(domain, pool, wait));
    let (target, user_base) = (prepared.target, prepared.user_base);
    let key_prefix: Arc<str> = prepared.key_prefix.as_str().into();
    let states: Vec<Arc<Executor>> = (0..clients.max(1)).map(|_| executor.clone()).collect();
    let driven = drive(
        states,
        move |executor, n| {
            let (result, refusals) = executor.request(None, target, user_base, &key_prefix, n);
            (result.map_err(|e| error_kind(&e)), refusals)
        },
        max_requests,
        max_time,
    )?;
    let stats = executor.stats().unwrap_or_default();
    Ok((driven.run, stats))
}

/// How [`error_kind`] names an [`Error::OutcomeUnknown`] (followed by its server error's kind).
pub const OUTCOME_UNKNOWN: &str = "OutcomeUnknown/";

/// A short name for an error, for the report; an unclassified server error (`Other`) with the
/// server's message; an [`Error::OutcomeUnknown`] starts with [`OUTCOME_UNKNOWN`].
pub fn error_kind(error: &Error) -> String {
    if let Some(server) = error.server_error() {
        let prefix = match error {
            Error::Contended { .. } => "Contended/",
            // Counted in doubt by the checks (see [`Run::in_doubt`]).
            Error::OutcomeUnknown { .. } => OUTCOME_UNKNOWN,
            _ => "",
        };
        return match server.kind() {
            ServerErrorKind::Other => format!("{prefix}Other \"{}\"", server.message()),
            kind => format!("{prefix}{kind:?}"),
        };
    }
    if let Error::Internal { reason } = error {
        return format!("Internal \"{reason}\"");
    }
    let debug = format!("{error:?}");
    debug
        .split(|c: char| !c.is_alphanumeric())
        .next()
        .unwrap_or("error")
        .to_string()
}

/// The hot row of one cell.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    /// A campaign.
    Coupon(CouponTarget),
    /// An account (`user_balance.user_id`).
    Account(i64),
}

/// A fresh hot row and room for requests on it ([`Harness::prepare`]): request `n` is made for
/// user `user_base + n` (coupons) or under idempotency key `"{key_prefix}-{n}"` (deducts).
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The hot row.
    pub target: Target,
    /// The first user id of the requests (ids up to `user_base + requests` are fresh).
    pub user_base: i64,
    /// The prefix of the requests' idempotency keys.
    pub key_prefix: String,
}

/// Per-cell request executor, shared by the client threads of one node (one combiner per node).
enum Executor {
    Own {
        strategy: Strategy,
        runner: Box<TxnRunner>,
        issuer: CouponIssuer,
        ledger: BalanceLedger,
    },
    CombiningIssuer(CombiningIssuer),
    CombiningLedger(CombiningLedger),
}

impl Executor {
    /// A combiner of `domain` over `pool`.
    fn combining(domain: Domain, pool: MysqlPool) -> Self {
        Self::combining_with(domain, pool, StockRowWait::default())
    }

    /// [`combining`](Self::combining), the issuer's batches waiting for a stock row as `wait`
    /// says.
    fn combining_with(domain: Domain, pool: MysqlPool, wait: StockRowWait) -> Self {
        match domain {
            Domain::Coupon => {
                let issuer = CouponIssuer::new().with_stock_row_wait(wait);
                Self::CombiningIssuer(CombiningIssuer::new(pool, issuer))
            }
            Domain::Ledger => {
                Self::CombiningLedger(CombiningLedger::new(pool, BalanceLedger::new()))
            }
        }
    }

    /// Request number `n` of the cell: (result, refusals).
    fn request(
        &self,
        conn: Option<&mut MysqlConnection>,
        target: Target,
        user_base: i64,
        key_prefix: &str,
        n: u64,
    ) -> (Result<i64, Error>, u64) {
        let user = user_base + i64::try_from(n).unwrap_or(i64::MAX - user_base);
        let key = format!("{key_prefix}-{n}");
        match (self, target, conn) {
            (Self::CombiningIssuer(hot), Target::Coupon(t), _) => {
                (hot.issue(user, t.campaign_id).map(|c| c.id), 0)
            }
            (Self::CombiningLedger(hot), Target::Account(account), _) => {
                (hot.deduct(account, DEDUCT_AMOUNT, &key).map(|e| e.id), 0)
            }
            (
                Self::Own {
                    strategy,
                    runner,
                    issuer,
                    ledger,
                },
                target,
                Some(conn),
            ) => match (strategy, target) {
                (Strategy::Seed, Target::Coupon(t)) => {
                    let (r, a) = issue_seed(runner, conn, user, &t);
                    (r, u64::from(a.refused))
                }
                (Strategy::SeedLib, Target::Coupon(t)) => {
                    (issuer.issue(conn, user, t.campaign_id).map(|c| c.id), 0)
                }
                (Strategy::Wait, Target::Coupon(t)) => {
                    let (r, retries) = issue_wait(conn, user, &t);
                    (r, u64::from(retries))
                }
                (Strategy::Cond, Target::Coupon(t)) => {
                    let (r, retries) = issue_cond(conn, user, &t);
                    (r, u64::from(retries))
                }
                (Strategy::Seed, Target::Account(a)) => {
                    let (r, att) = deduct_seed(runner, conn, &deduct_of(a, &key));
                    (r, u64::from(att.refused))
                }
                (Strategy::SeedLib, Target::Account(a)) => {
                    (ledger.deduct(conn, a, DEDUCT_AMOUNT, &key).map(|e| e.id), 0)
                }
                (Strategy::Wait, Target::Account(a)) => {
                    let (r, retries) = deduct_wait(conn, &deduct_of(a, &key));
                    (r, u64::from(retries))
                }
                (Strategy::Cond, Target::Account(a)) => {
                    let (r, retries) = deduct_cond(conn, &deduct_of(a, &key));
                    (r, u64::from(retries))
                }
                (Strategy::Combining, _) => (Err(harness_error("combining without a combiner")), 0),
            },
            _ => (Err(harness_error("strategy and target do not match")), 0),
        }
    }

    fn stats(&self) -> Option<CombinerStats> {
        match self {
            Self::CombiningIssuer(hot) => Some(hot.stats()),
            Self::CombiningLedger(hot) => Some(hot.stats()),
            Self::Own { .. } => None,
        }
    }
}

/// The harness's deduct: [`DEDUCT_AMOUNT`] from `user_id` under `key`.
fn deduct_of(user_id: i64, key: &str) -> Deduct<'_> {
    Deduct {
        user_id,
        amount: DEDUCT_AMOUNT,
        key,
    }
}

fn harness_error(message: &str) -> Error {
    Error::from(diesel::result::Error::QueryBuilderError(message.into()))
}

/// Where the clients of a cell connect (see [`Harness::set_topology`]). A single server is one
/// node, where both are the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Topology {
    /// Every client's connection, and combining's pool, on node 0: one writer.
    OneWriter,
    /// Client `i` on node `i % nodes`; combining runs one combiner with its own pool
    /// ([`combining_pool_size`] of that node's clients) per node, like one application process
    /// per node.
    Spread,
}

impl Topology {
    /// Both, in report order.
    pub const ALL: [Topology; 2] = [Topology::OneWriter, Topology::Spread];

    /// Display name.
    pub fn name(self) -> &'static str {
        match self {
            Self::OneWriter => "one writer",
            Self::Spread => "spread",
        }
    }
}

/// Certification failures and brute-force aborts of a Galera cluster
/// (`wsrep_local_cert_failures`, `wsrep_local_bf_aborts`), summed over its nodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Conflicts {
    /// Local transactions that failed certification at COMMIT.
    pub cert_failures: u64,
    /// Local transactions aborted by a replicated write set (brute force).
    pub bf_aborts: u64,
}

impl Conflicts {
    /// What happened between `earlier` and `self` (the counters only grow while nodes run).
    pub fn since(self, earlier: Conflicts) -> Conflicts {
        Conflicts {
            cert_failures: self.cert_failures.saturating_sub(earlier.cert_failures),
            bf_aborts: self.bf_aborts.saturating_sub(earlier.bf_aborts),
        }
    }
}

/// One row of `SHOW GLOBAL STATUS`.
#[derive(QueryableByName)]
struct WsrepCounter {
    #[diesel(sql_type = diesel::sql_types::Text, column_name = "Variable_name")]
    name: String,
    #[diesel(sql_type = diesel::sql_types::Text, column_name = "Value")]
    value: String,
}

/// The [`Conflicts`] counters of the node `conn` talks to.
fn node_conflicts(conn: &mut MysqlConnection) -> Result<Conflicts, BoxError> {
    let rows: Vec<WsrepCounter> = diesel::sql_query(
        "SHOW GLOBAL STATUS WHERE Variable_name IN \
         ('wsrep_local_cert_failures', 'wsrep_local_bf_aborts')",
    )
    .load(conn)?;
    let mut counters = Conflicts::default();
    for row in rows {
        let value: u64 = row.value.parse()?;
        match row.name.to_ascii_lowercase().as_str() {
            "wsrep_local_cert_failures" => counters.cert_failures = value,
            "wsrep_local_bf_aborts" => counters.bf_aborts = value,
            _ => {}
        }
    }
    Ok(counters)
}

/// [`connect`], then `SET SESSION wsrep_sync_wait = 1`: reads on the connection wait until its
/// Galera node applied every write set the cluster committed before them.
pub fn connect_causal(url: &str) -> Result<MysqlConnection, BoxError> {
    let mut conn = connect(url)?;
    conn.batch_execute("SET SESSION wsrep_sync_wait = 1")?;
    Ok(conn)
}

/// How long [`Harness::run_cell`] waits for a client past the cell's `max_time` before it counts
/// the client as stuck and goes on without it: twice lockstock's default deadline (3 s), so a
/// client whose last call honours its deadline is never counted.
pub const STUCK_GRACE: Duration = Duration::from_secs(6);

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Threads whose work may never return (a call a server never answers): started one by one,
/// then collected until a moment after which the rest count as stuck and are left behind.
pub struct BoundedThreads<T> {
    done: mpsc::Sender<(usize, T)>,
    returned: mpsc::Receiver<(usize, T)>,
    handles: Vec<std::thread::JoinHandle<()>>,
}

impl<T: Send + 'static> Default for BoundedThreads<T> {
    fn default() -> Self {
        let (done, returned) = mpsc::channel();
        Self {
            done,
            returned,
            handles: Vec::new(),
        }
    }
}

impl<T: Send + 'static> BoundedThreads<T> {
    /// No threads yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts `work` on a thread of its own (not scoped: it may outlive the collector).
    pub fn spawn(&mut self, work: impl FnOnce() -> T + Send + 'static) {
        let (index, done) = (self.handles.len(), self.done.clone());
        self.handles.push(std::thread::spawn(move || {
            let _ = done.send((index, work()));
        }));
    }

    /// Waits for every thread until `give_up` (for ever without one). Returns each thread's
    /// result in the order they were spawned (`None`: still running, stuck) and when the last
    /// result came in; an error if a thread panicked.
    pub fn collect(
        self,
        give_up: Option<Instant>,
    ) -> Result<(Vec<Option<T>>, Option<Instant>), BoxError> {
        let Self {
            done,
            returned,
            handles,
        } = self;
        drop(done);
        let mut results: Vec<Option<T>> = handles.iter().map(|_| None).collect();
        let mut last = None;
        for _ in 0..handles.len() {
            let message = match give_up {
                Some(at) => returned
                    .recv_timeout(at.saturating_duration_since(Instant::now()))
                    .ok(),
                None => returned.recv().ok(),
            };
            let Some((index, result)) = message else {
                break;
            };
            results[index] = Some(result);
            last = Some(Instant::now());
        }
        // A thread that ended without a result panicked (its result would be queued by now).
        let ended: Vec<bool> = handles.iter().map(|h| h.is_finished()).collect();
        while let Ok((index, result)) = returned.try_recv() {
            results[index] = Some(result);
            last = Some(Instant::now());
        }
        if ended.iter().zip(&results).any(|(e, r)| *e && r.is_none()) {
            return Err("a client thread panicked".into());
        }
        Ok((results, last))
    }
}

/// A database, client connections and pools, reused across cells.
pub struct Harness {
    /// Where campaigns and accounts are created and cells are checked.
    url: String,
    /// Where clients connect, by node (one URL on a single server).
    node_urls: Vec<String>,
    topology: Topology,
    setup: MysqlConnection,
    /// On a cluster: one causal connection per node (counters, waiting for a cell's target).
    observers: Vec<MysqlConnection>,
    /// Idle client connections, by node.
    clients: Vec<Vec<MysqlConnection>>,
    /// Combining pools by (node, size).
    pools: HashMap<(usize, u32), MysqlPool>,
    runner: TxnRunner,
    issuer: CouponIssuer,
    ledger: BalanceLedger,
    next_id: i64,
    tag: String,
    cells: u64,
}

impl Harness {
    /// A freshly created database `name` (dropped first if it exists) with lockstock's
    /// migrations, on `crate::sandbox::database_url(name)`.
    pub fn new(name: &str) -> Result<Self, BoxError> {
        let url = crate::sandbox::database_url(name)?;
        let mut setup = connect(&url)?;
        // `name` was validated by `database_url` ([A-Za-z0-9_]{1,64}).
        setup.batch_execute(&format!(
            "DROP DATABASE `{name}`; CREATE DATABASE `{name}`; USE `{name}`"
        ))?;
        lockstock::run_migrations(&mut setup)?;
        Ok(Self::with(url.clone(), vec![url], setup, Vec::new()))
    }

    /// A harness on a Galera cluster. `setup_url` is an empty database on one node (e.g. the
    /// first URL of `GaleraCluster::create_database`): lockstock's migrations run there, cells'
    /// campaigns and accounts are created there and every cell is checked there, with
    /// `wsrep_sync_wait = 1` so the checks see every commit of the cluster. `node_urls` are the
    /// same database on every node (index = node); clients connect to them by [`Topology`]. Before
    /// a cell starts every node has applied its campaign or account, and the cell reports the
    /// cluster's [`Conflicts`].
    pub fn on_cluster(setup_url: &str, node_urls: Vec<String>) -> Result<Self, BoxError> {
        if node_urls.is_empty() {
            return Err("a cluster harness needs the URL of at least one node".into());
        }
        let mut setup = connect_causal(setup_url)?;
        lockstock::run_migrations(&mut setup)?;
        let observers = node_urls
            .iter()
            .map(|url| connect_causal(url))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::with(
            setup_url.to_owned(),
            node_urls,
            setup,
            observers,
        ))
    }

    fn with(
        url: String,
        node_urls: Vec<String>,
        setup: MysqlConnection,
        observers: Vec<MysqlConnection>,
    ) -> Self {
        Self {
            url,
            clients: node_urls.iter().map(|_| Vec::new()).collect(),
            node_urls,
            topology: Topology::OneWriter,
            setup,
            observers,
            pools: HashMap::new(),
            // The cells' connections keep Diesel's statement cache: told, the runner need not
            // ask the server after each refusal of the design note's body.
            runner: TxnRunner::new(
                TxnPolicy::default().with_statement_cache(StatementCache::Cached),
            ),
            issuer: CouponIssuer::new(),
            ledger: BalanceLedger::new(),
            next_id: 1_000,
            tag: format!("{:x}", Utc::now().timestamp_micros()),
            cells: 0,
        }
    }

    /// The database URL (setup and checks).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Where the clients of the next cells connect ([`Topology::OneWriter`] at first).
    pub fn set_topology(&mut self, topology: Topology) {
        self.topology = topology;
    }

    /// `SELECT VERSION()`.
    pub fn server_version(&mut self) -> Result<String, BoxError> {
        Ok(
            diesel::select(diesel::dsl::sql::<diesel::sql_types::Text>("VERSION()"))
                .get_result(&mut self.setup)?,
        )
    }

    /// The server settings behind the figures: durability of a commit
    /// (`innodb_flush_log_at_trx_commit`, the binary log, `sync_binlog`), the buffer pool and
    /// `max_connections`, as one line.
    pub fn server_settings(&mut self) -> Result<String, BoxError> {
        Ok(diesel::select(diesel::dsl::sql::<diesel::sql_types::Text>(
            "CONCAT('innodb_flush_log_at_trx_commit=', @@innodb_flush_log_at_trx_commit, \
             ' log_bin=', @@log_bin, ' sync_binlog=', @@sync_binlog, \
             ' innodb_buffer_pool_size=', @@innodb_buffer_pool_size DIV 1048576, 'M', \
             ' max_connections=', @@max_connections)",
        ))
        .get_result(&mut self.setup)?)
    }

    /// The cluster's [`Conflicts`] counters now, summed over the nodes (node-wide: they count
    /// every database's transactions); `None` on a single server.
    pub fn conflicts(&mut self) -> Result<Option<Conflicts>, BoxError> {
        if self.observers.is_empty() {
            return Ok(None);
        }
        let mut sum = Conflicts::default();
        for conn in &mut self.observers {
            let node = node_conflicts(conn)?;
            sum.cert_failures += node.cert_failures;
            sum.bf_aborts += node.bf_aborts;
        }
        Ok(Some(sum))
    }

    /// Waits until every node applied what was committed so far (a causal read on each).
    fn sync_nodes(&mut self) -> Result<(), BoxError> {
        for conn in &mut self.observers {
            fcfs_coupon::table.count().get_result::<i64>(conn)?;
        }
        Ok(())
    }

    /// The node client number `client` connects to.
    fn node_of(&self, client: usize) -> usize {
        match self.topology {
            Topology::OneWriter => 0,
            Topology::Spread => client % self.node_urls.len(),
        }
    }

    /// An idle client connection to `node`, or a new one.
    fn client(&mut self, node: usize) -> Result<MysqlConnection, BoxError> {
        match self.clients[node].pop() {
            Some(conn) => Ok(conn),
            None => connect(&self.node_urls[node]),
        }
    }

    fn pool(&mut self, node: usize, size: u32) -> Result<MysqlPool, BoxError> {
        if let Some(pool) = self.pools.get(&(node, size)) {
            return Ok(pool.clone());
        }
        let pool = pool(&self.node_urls[node], size)?;
        self.pools.insert((node, size), pool.clone());
        Ok(pool)
    }

    /// `count` ids nobody used, the first of them: at most 2^40 a call (a `max_requests` of
    /// `u64::MAX`, "no limit", reserves that many — more than any run can use).
    fn fresh_ids(&mut self, count: u64) -> i64 {
        const MOST: u64 = 1 << 40;
        let base = self.next_id;
        let step = i64::try_from(count.min(MOST)).unwrap_or(1 << 40) + 1;
        self.next_id = self.next_id.saturating_add(step);
        base
    }

    /// A new campaign of `quantity` coupons, open now.
    pub fn new_campaign(&mut self, quantity: u64) -> Result<CouponTarget, BoxError> {
        let total = i32::try_from(quantity.max(1)).map_err(|_| "campaign too large")?;
        let at = now();
        let coupon = self.issuer.create_coupon(
            &mut self.setup,
            &NewCoupon {
                name: "contention",
                discount: Discount::Fixed(Decimal::new(1_000, 0)),
                valid_from: at - chrono::Duration::hours(1),
                valid_until: at + chrono::Duration::days(2),
            },
        )?;
        let campaign = self.issuer.create_campaign(
            &mut self.setup,
            &NewCampaign {
                coupon_id: coupon.id,
                quantity: total.unsigned_abs(),
                issue_starts_at: at - chrono::Duration::minutes(1),
                issue_ends_at: at + chrono::Duration::days(1),
            },
        )?;
        Ok(CouponTarget {
            campaign_id: campaign.id,
            coupon_id: coupon.id,
            total,
        })
    }

    /// A new account charged with [`INITIAL_BALANCE`].
    pub fn new_account(&mut self) -> Result<i64, BoxError> {
        let user_id = self.fresh_ids(1);
        let key = format!("{}-initial-{user_id}", self.tag);
        self.ledger
            .charge(&mut self.setup, user_id, INITIAL_BALANCE, &key)?;
        Ok(user_id)
    }

    /// A fresh hot row of `domain` for up to `requests` requests (a campaign of that stock, or
    /// an account charged with [`INITIAL_BALANCE`]), with as many fresh user ids and a key
    /// prefix of its own.
    pub fn prepare(&mut self, domain: Domain, requests: u64) -> Result<Prepared, BoxError> {
        self.cells += 1;
        let key_prefix = format!("{}-{}", self.tag, self.cells);
        let user_base = self.fresh_ids(requests);
        let target = match domain {
            Domain::Coupon => Target::Coupon(self.new_campaign(requests)?),
            Domain::Ledger => Target::Account(self.new_account()?),
        };
        Ok(Prepared {
            target,
            user_base,
            key_prefix,
        })
    }

    /// Runs one cell: fresh campaign/account, `clients` threads (each with its own connection,
    /// or sharing its node's combiner) placed by the [`Topology`], then checks the invariants
    /// from the database.
    ///
    /// With a `max_time`, a client that has not finished [`STUCK_GRACE`] after it is counted as
    /// stuck (its thread is left behind with its call): the cell goes on without it, the
    /// requests it completed count, and its one call in flight is in doubt for the checks.
    pub fn run_cell(&mut self, config: &CellConfig) -> Result<CellResult, BoxError> {
        let clients = config.clients.max(1);
        let prepared = self.prepare(config.domain, config.max_requests)?;
        let target = prepared.target;
        self.sync_nodes()?;
        let before = self.conflicts()?;
        let nodes: Vec<usize> = (0..clients).map(|i| self.node_of(i)).collect();
        let combining = config.strategy == Strategy::Combining;
        // By node: one combiner with its own pool each, or one executor for all.
        let mut executors: HashMap<usize, Arc<Executor>> = HashMap::new();
        let mut states: Vec<(Arc<Executor>, Option<MysqlConnection>, Arc<str>)> =
            Vec::with_capacity(clients);
        if combining {
            for &node in &nodes {
                if executors.contains_key(&node) {
                    continue;
                }
                let on_node = nodes.iter().filter(|&&n| n == node).count();
                let pool = self.pool(node, combining_pool_size(on_node))?;
                executors.insert(node, Arc::new(Executor::combining(config.domain, pool)));
            }
            for node in &nodes {
                let executor = executors
                    .get(node)
                    .ok_or("no executor for a client's node")?;
                states.push((
                    executor.clone(),
                    None,
                    Arc::from(self.node_urls[*node].as_str()),
                ));
            }
        } else {
            let own = Arc::new(Executor::Own {
                strategy: config.strategy,
                runner: Box::new(self.runner.clone()),
                issuer: self.issuer.clone(),
                ledger: self.ledger.clone(),
            });
            executors.insert(0, own.clone());
            for &node in &nodes {
                let url = Arc::from(self.node_urls[node].as_str());
                states.push((own.clone(), Some(self.client(node)?), url));
            }
        }
        let (user_base, key_prefix) = (prepared.user_base, Arc::<str>::from(prepared.key_prefix));
        let run = drive(
            states,
            move |(executor, conn, url), n| {
                // A client of its own connection whose reconnect failed (the server or node
                // briefly down) tries again before each request, as an application would.
                if !combining && conn.is_none() {
                    *conn = connect(url).ok();
                    if conn.is_none() {
                        std::thread::sleep(Duration::from_millis(10));
                        return (Err("ConnectionLost (no new connection)".to_owned()), 0);
                    }
                }
                let (result, refusals) =
                    executor.request(conn.as_mut(), target, user_base, &key_prefix, n);
                // A client whose connection is gone (lost, broken, or shut down by the watchdog)
                // continues on a new one, like an application would.
                if let (Err(error), Some(_)) = (&result, conn.as_ref()) {
                    let gone = error.server_kind() == Some(ServerErrorKind::ConnectionLost)
                        || matches!(
                            error,
                            Error::ConnectionBroken { .. } | Error::ServerUnresponsive { .. }
                        );
                    if gone {
                        *conn = connect(url).ok();
                    }
                }
                (result.map_err(|e| error_kind(&e)), refusals)
            },
            config.max_requests,
            config.max_time,
        )?;
        for (i, state) in run.returned.into_iter().enumerate() {
            if let Some((_, Some(conn), _)) = state {
                self.clients[nodes[i]].push(conn);
            }
        }
        let run = run.run;
        if run.stuck > 0 && combining {
            // A stuck pool connection is never given back.
            self.pools.clear();
        }
        let batches = executors
            .values()
            .filter_map(|e| e.stats())
            .reduce(merge_stats);
        drop(executors);
        let mut violations = run.consistency(batches);
        violations.extend(self.check(target, &run.ok_ids, run.in_doubt())?);
        let conflicts = match (before, self.conflicts()?) {
            (Some(before), Some(after)) => Some(after.since(before)),
            _ => None,
        };
        let refusals = match config.strategy {
            // Not observable through the library's API for these two.
            Strategy::SeedLib | Strategy::Combining => None,
            _ => Some(run.refusals),
        };
        Ok(CellResult {
            domain: config.domain,
            strategy: config.strategy,
            topology: self.topology,
            clients,
            attempted: run.attempted(),
            ok: run.ok_ids.len() as u64,
            errors: run.error_count(),
            refusals,
            wall: run.wall,
            errors_by_kind: run.errors_by_kind(),
            latencies_us: run.latencies_us,
            batches,
            stuck: run.stuck,
            conflicts,
            violations,
        })
    }

    /// Checks the hot row `target` against the database after requests whose successes handed
    /// out `ok_ids` (coupon ids or journal entry ids), of which up to `in_doubt` more may have
    /// been applied without an answer ([`Run::in_doubt`]: calls of stuck clients, calls answered
    /// `OutcomeUnknown`). Returns the violations.
    pub fn check(
        &mut self,
        target: Target,
        ok_ids: &[i64],
        in_doubt: u64,
    ) -> Result<Vec<String>, BoxError> {
        let mut violations = Vec::new();
        match target {
            Target::Coupon(t) => self.check_coupons(&t, ok_ids, in_doubt, &mut violations)?,
            Target::Account(a) => self.check_account(a, ok_ids, in_doubt, &mut violations)?,
        }
        Ok(violations)
    }

    /// The floor of a combined batch of `batch` requests on `domain`: one connection writing,
    /// per transaction, exactly the rows such a batch writes — one multi-row INSERT of `batch`
    /// `user_coupon` rows (the columns `CouponIssuer` writes) or `batch` deduct journal rows
    /// (the columns `BalanceLedger` writes, with their running `balance_after`), one UPDATE of
    /// the hot row to its new stock or balance and version, COMMIT — SERIALIZABLE like
    /// lockstock's transactions, with no locking read and no per-request answers — on a fresh
    /// campaign or account, for `time`. Each transaction is ONE text batch (`SET TRANSACTION`,
    /// `BEGIN`, the INSERT, the UPDATE, `COMMIT`): one round trip, so the floor is what the
    /// server can write, not what a client protocol costs. Its values are integers, decimals,
    /// timestamps and the harness's own keys (`[0-9a-z-]`), never caller data. The rows are
    /// real: they are checked afterwards like a cell's ([`Floor::violations`]).
    pub fn floor(
        &mut self,
        domain: Domain,
        batch: usize,
        time: Duration,
    ) -> Result<Floor, BoxError> {
        let batch = batch.max(1);
        let prepared = self.prepare(domain, FLOOR_CAPACITY)?;
        let mut conn = self.client(0)?;
        let mut floor = Floor {
            domain,
            batch,
            transactions: 0,
            rows: 0,
            wall: Duration::ZERO,
            violations: Vec::new(),
        };
        let start = Instant::now();
        match prepared.target {
            Target::Coupon(t) => {
                let mut stock = t.total;
                let size = i32::try_from(batch).map_err(|_| "batch too large")?;
                while start.elapsed() < time && stock >= size {
                    let first = prepared.user_base + floor.rows as i64;
                    let at = sql_datetime(now());
                    let values: Vec<String> = (first..first + i64::from(size))
                        .map(|user_id| {
                            format!(
                                "({user_id}, {}, {}, 'issued', '{at}')",
                                t.coupon_id, t.campaign_id
                            )
                        })
                        .collect();
                    floor_transaction(
                        &mut conn,
                        &format!(
                            "INSERT INTO user_coupon \
                             (user_id, coupon_id, fcfs_coupon_id, status, issued_at) VALUES {}; \
                             UPDATE fcfs_coupon SET stock_quantity = {} WHERE id = {}",
                            values.join(", "),
                            stock - size,
                            t.campaign_id
                        ),
                    )?;
                    stock -= size;
                    floor.rows += batch as u64;
                    floor.transactions += 1;
                }
            }
            Target::Account(user_id) => {
                let (mut balance, mut version): (Decimal, i64) = user_balance::table
                    .find(user_id)
                    .select((user_balance::balance, user_balance::version))
                    .first(&mut conn)?;
                let hash = deduct_hash(user_id, DEDUCT_AMOUNT);
                while start.elapsed() < time && balance >= DEDUCT_AMOUNT * Decimal::from(batch) {
                    let keys: Vec<String> = (floor.rows..floor.rows + batch as u64)
                        .map(|n| format!("{}-{n}", prepared.key_prefix))
                        .collect();
                    let at = sql_datetime(now());
                    let values: Vec<String> = keys
                        .iter()
                        .enumerate()
                        .map(|(i, key)| {
                            format!(
                                "({user_id}, 'deduct', {DEDUCT_AMOUNT}, {}, '{key}', '{hash}', '{at}')",
                                balance - DEDUCT_AMOUNT * Decimal::from(i + 1)
                            )
                        })
                        .collect();
                    let after = balance - DEDUCT_AMOUNT * Decimal::from(batch);
                    let next_version = version + batch as i64;
                    floor_transaction(
                        &mut conn,
                        &format!(
                            "INSERT INTO balance_history (user_id, kind, amount, balance_after, \
                             idempotency_key, request_hash, created_at) VALUES {}; \
                             UPDATE user_balance SET balance = {after}, version = {next_version} \
                             WHERE user_id = {user_id}",
                            values.join(", ")
                        ),
                    )?;
                    (balance, version) = (after, next_version);
                    floor.rows += batch as u64;
                    floor.transactions += 1;
                }
            }
        }
        floor.wall = start.elapsed();
        self.clients[0].push(conn);
        floor.violations = self.check_floor(prepared.target, floor.rows)?;
        Ok(floor)
    }

    /// The Redis gate, the pattern large shops run for flash sales: a campaign of `stock`
    /// whose stock lives in Redis (`SET` to `stock` first); each request `DECR`s it — a value
    /// below zero is sold out (`INCR` back, answered `SoldOut`) — and a granted request INSERTs
    /// its `user_coupon` row into MariaDB (autocommit, then `LAST_INSERT_ID()` for the id it
    /// hands out), `INCR`ing the stock back if the INSERT fails. `clients` threads, each with
    /// its own MariaDB and Redis connection, up to `max_requests` requests (fresh users) or
    /// `max_time`. The campaign's row in MariaDB is never touched: Redis is the gate.
    ///
    /// Checked afterwards: rows == successes (up to stuck calls in doubt), no user twice, the
    /// ids handed out are the rows stored, and Redis's remaining stock + rows == `stock`
    /// ([`Gate::over_issued`], [`Gate::under_issued`] say by how much not).
    pub fn redis_gate(
        &mut self,
        redis: &RedisServer,
        clients: usize,
        stock: u64,
        (max_requests, max_time): (u64, Option<Duration>),
    ) -> Result<Gate, BoxError> {
        let user_base = self.fresh_ids(max_requests);
        let campaign = self.new_campaign(stock)?;
        let key = format!("lockstock:{}:stock:{}", self.tag, campaign.campaign_id);
        let mut admin = redis.connect()?;
        admin.set(&key, i64::from(campaign.total))?;
        let mut states = Vec::with_capacity(clients.max(1));
        for _ in 0..clients.max(1) {
            states.push((self.client(0)?, redis.connect()?));
        }
        let gate_key: Arc<str> = key.as_str().into();
        let driven = drive(
            states,
            move |(conn, redis), n| {
                let user = user_base + i64::try_from(n).unwrap_or(i64::MAX - user_base);
                let result = match redis.decr(&gate_key) {
                    Err(e) => Err(format!("Redis DECR: {e}")),
                    Ok(left) if left < 0 => match redis.incr(&gate_key) {
                        Ok(_) => Err("SoldOut".to_string()),
                        Err(e) => Err(format!("Redis INCR: {e}")),
                    },
                    Ok(_) => match insert_user_coupon(conn, user, &campaign, now()) {
                        Ok(id) => Ok(id),
                        Err(error) => {
                            // Given back; if this fails too, the grant is lost (under-issue).
                            let _ = redis.incr(&gate_key);
                            Err(error_kind(&error))
                        }
                    },
                };
                (result, 0)
            },
            max_requests,
            max_time,
        )?;
        for (conn, _) in driven.returned.into_iter().flatten() {
            self.clients[0].push(conn);
        }
        let run = driven.run;
        let (stored, _, total, repeated) = coupon_facts(&mut self.setup, &campaign)?;
        let remaining = admin.get_integer(&key)?.unwrap_or(0);
        let rows = stored.len() as i64;
        let mut violations = run.consistency(None);
        if !within_doubt(stored.len(), run.ok_ids.len(), run.in_doubt()) {
            violations.push(format!(
                "redis gate: {rows} rows for the campaign but {} successes{}",
                run.ok_ids.len(),
                doubt_note(run.in_doubt())
            ));
        }
        if !repeated.is_empty() {
            violations.push(format!(
                "redis gate: {} users hold the coupon twice",
                repeated.len()
            ));
        }
        let names = ("redis gate", "coupon id", "not stored for the campaign");
        check_handed_out(names, stored, &run.ok_ids, run.in_doubt(), &mut violations);
        // Stock the gate and the rows account for beyond the campaign's (> 0: coupons beyond
        // the stock, or will be), or short of it (< 0: stock taken without a row).
        let accounted = remaining + rows - i64::from(total);
        let over_issued = (rows - i64::from(total))
            .max(accounted)
            .max(0)
            .unsigned_abs();
        if over_issued > 0 {
            violations.push(format!(
                "redis gate: over-issued by {over_issued}: {rows} rows, {remaining} left in \
                 Redis, stock {total}"
            ));
        }
        let gate = Gate {
            clients: clients.max(1),
            stock: total,
            rows: rows.unsigned_abs(),
            remaining,
            over_issued,
            under_issued: (-accounted).max(0).unsigned_abs(),
            run,
            violations,
        };
        Ok(gate)
    }

    /// A floor's hot row after `rows` rows: exactly that many rows, the stock or balance they
    /// account for, and (ledger) the library's audit.
    fn check_floor(&mut self, target: Target, rows: u64) -> Result<Vec<String>, BoxError> {
        let mut violations = Vec::new();
        let written = i64::try_from(rows)?;
        match target {
            Target::Coupon(t) => {
                let (stored, stock, total, _) = coupon_facts(&mut self.setup, &t)?;
                let stored = stored.len() as i64;
                if stored != written || i64::from(stock) + stored != i64::from(total) {
                    violations.push(format!(
                        "floor coupon: {stored} rows stored, {written} written, stock {stock}, \
                         total {total}"
                    ));
                }
            }
            Target::Account(user_id) => {
                let deducts: i64 = balance_history::table
                    .filter(balance_history::user_id.eq(user_id))
                    .filter(balance_history::kind.eq("deduct"))
                    .count()
                    .get_result(&mut self.setup)?;
                let balance: Decimal = user_balance::table
                    .find(user_id)
                    .select(user_balance::balance)
                    .first(&mut self.setup)?;
                let expected = INITIAL_BALANCE - DEDUCT_AMOUNT * Decimal::from(written);
                if deducts != written || balance != expected {
                    violations.push(format!(
                        "floor ledger: {deducts} deduct rows stored, {written} written, balance \
                         {balance}, expected {expected}"
                    ));
                }
                self.audit_into(user_id, "floor ledger", &mut violations)?;
            }
        }
        Ok(violations)
    }

    /// The library's audit of account `user_id` (running sum, balance_after, version); its
    /// problems go to `violations`, named `what`.
    fn audit_into(
        &mut self,
        user_id: i64,
        what: &str,
        violations: &mut Vec<String>,
    ) -> Result<(), BoxError> {
        match self.ledger.audit(&mut self.setup, user_id) {
            Ok(report) if report.is_consistent() => {}
            Ok(report) => violations.push(format!("{what}: audit: {:?}", report.problems)),
            Err(Error::AuditFailed(report)) => {
                violations.push(format!("{what}: audit: {:?}", report.problems))
            }
            Err(other) => return Err(other.into()),
        }
        Ok(())
    }

    /// Coupons: rows == successes, stock + rows == total, stock >= 0, no user twice, and the
    /// ids handed out are exactly the rows stored (up to `in_doubt` more rows: calls in doubt).
    fn check_coupons(
        &mut self,
        target: &CouponTarget,
        ok_ids: &[i64],
        in_doubt: u64,
        violations: &mut Vec<String>,
    ) -> Result<(), BoxError> {
        let (rows, stock, total, repeated) = coupon_facts(&mut self.setup, target)?;
        let row_count = rows.len() as i64;
        if !within_doubt(rows.len(), ok_ids.len(), in_doubt) {
            violations.push(format!(
                "coupon: {row_count} rows for the campaign but {} successes{}",
                ok_ids.len(),
                doubt_note(in_doubt)
            ));
        }
        if i64::from(stock) + row_count != i64::from(total) || total != target.total {
            violations.push(format!(
                "coupon: stock {stock} + rows {row_count} != total {total} (created with {})",
                target.total
            ));
        }
        if stock < 0 {
            violations.push(format!("coupon: negative stock {stock}"));
        }
        if !repeated.is_empty() {
            violations.push(format!(
                "coupon: {} users hold the coupon twice (e.g. {})",
                repeated.len(),
                repeated[0]
            ));
        }
        let names = ("coupon", "coupon id", "not stored for the campaign");
        check_handed_out(names, rows, ok_ids, in_doubt, violations);
        Ok(())
    }

    /// Ledger: deduct rows == successes, balance == initial - sum(deducts), the library's audit
    /// (running sum, balance_after, version) passes, and the entry ids handed out are exactly the
    /// deduct rows stored (up to `in_doubt` more rows: calls in doubt).
    fn check_account(
        &mut self,
        user_id: i64,
        ok_ids: &[i64],
        in_doubt: u64,
        violations: &mut Vec<String>,
    ) -> Result<(), BoxError> {
        let conn = &mut self.setup;
        let deducts: Vec<i64> = balance_history::table
            .filter(balance_history::user_id.eq(user_id))
            .filter(balance_history::kind.eq("deduct"))
            .select(balance_history::id)
            .load(conn)?;
        let deducted: Option<Decimal> = balance_history::table
            .filter(balance_history::user_id.eq(user_id))
            .filter(balance_history::kind.eq("deduct"))
            .select(sum(balance_history::amount))
            .first(conn)?;
        let deducted = deducted.unwrap_or(Decimal::ZERO);
        let balance: Decimal = user_balance::table
            .find(user_id)
            .select(user_balance::balance)
            .first(conn)?;
        if !within_doubt(deducts.len(), ok_ids.len(), in_doubt) {
            violations.push(format!(
                "ledger: {} deduct rows but {} successes{}",
                deducts.len(),
                ok_ids.len(),
                doubt_note(in_doubt)
            ));
        }
        if balance != INITIAL_BALANCE - deducted {
            violations.push(format!(
                "ledger: balance {balance} != {INITIAL_BALANCE} - {deducted} deducted"
            ));
        }
        // Every request deducts DEDUCT_AMOUNT: a stored amount of another size (with a
        // balance that agrees with it) is as wrong as a missing row.
        let wrong_amounts: i64 = balance_history::table
            .filter(balance_history::user_id.eq(user_id))
            .filter(balance_history::kind.eq("deduct"))
            .filter(balance_history::amount.ne(DEDUCT_AMOUNT))
            .count()
            .get_result(conn)?;
        if wrong_amounts > 0 {
            violations.push(format!(
                "ledger: {wrong_amounts} deduct rows of another amount than {DEDUCT_AMOUNT}"
            ));
        }
        if balance < Decimal::ZERO {
            violations.push(format!("ledger: negative balance {balance}"));
        }
        self.audit_into(user_id, "ledger", violations)?;
        let names = ("ledger", "entry id", "not stored deducts");
        check_handed_out(names, deducts, ok_ids, in_doubt, violations);
        Ok(())
    }
}

/// A campaign's rows (ids), its stock and total, and the users holding its coupon twice.
fn coupon_facts(
    conn: &mut MysqlConnection,
    target: &CouponTarget,
) -> Result<(Vec<i64>, i32, i32, Vec<i64>), BoxError> {
    let rows: Vec<i64> = user_coupon::table
        .filter(user_coupon::fcfs_coupon_id.eq(target.campaign_id))
        .select(user_coupon::id)
        .load(conn)?;
    let (stock, total): (i32, i32) = fcfs_coupon::table
        .find(target.campaign_id)
        .select((fcfs_coupon::stock_quantity, fcfs_coupon::total_quantity))
        .first(conn)?;
    let repeated: Vec<i64> = user_coupon::table
        .filter(user_coupon::coupon_id.eq(target.coupon_id))
        .group_by(user_coupon::user_id)
        .having(count_star().gt(1))
        .select(user_coupon::user_id)
        .load(conn)?;
    Ok((rows, stock, total, repeated))
}

/// `stored` rows for `ok` successes, when up to `in_doubt` calls may have been applied without
/// an answer.
fn within_doubt(stored: usize, ok: usize, in_doubt: u64) -> bool {
    stored >= ok && (stored - ok) as u64 <= in_doubt
}

/// What a violation message adds when calls were in doubt.
fn doubt_note(in_doubt: u64) -> String {
    if in_doubt == 0 {
        String::new()
    } else {
        format!(" ({in_doubt} calls in doubt: stuck clients' and OutcomeUnknown answers)")
    }
}

/// The ids handed out (`ok_ids`) are distinct and exactly the `stored` ones, but for up to
/// `in_doubt` stored ones never answered. The violations name the `domain`, the `id` ("the same
/// entry id was handed out twice") and what ids handed out but not stored are (`not_stored`).
fn check_handed_out(
    (domain, id, not_stored): (&str, &str, &str),
    stored: Vec<i64>,
    ok_ids: &[i64],
    in_doubt: u64,
    violations: &mut Vec<String>,
) {
    let stored: HashSet<i64> = stored.into_iter().collect();
    let handed: HashSet<i64> = ok_ids.iter().copied().collect();
    if handed.len() != ok_ids.len() {
        violations.push(format!("{domain}: the same {id} was handed out twice"));
    }
    let unanswered = stored.difference(&handed).count() as u64;
    if !handed.is_subset(&stored) || unanswered > in_doubt {
        violations.push(format!(
            "{domain}: {} ids handed out are {not_stored}, {} stored were not handed out",
            handed.difference(&stored).count(),
            unanswered
        ));
    }
}

// ---------------------------------------------------------------------------------------------
// Uncontended latency: library call vs its hand-written twin, one client, sequential
// ---------------------------------------------------------------------------------------------

/// One uncontended operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Single {
    /// `CouponIssuer::issue` on a connection that carries lockstock's session settings.
    IssueLib,
    /// `CouponIssuer::issue` on the caller's own connection (no settings applied): it saves the
    /// caller's session variables in its first SET and restores them after COMMIT.
    IssueOwn,
    /// Its hand-written twin ([`issue_hand`]).
    IssueHand,
    /// `BalanceLedger::deduct` on a connection that carries lockstock's session settings.
    DeductLib,
    /// `BalanceLedger::deduct` on the caller's own connection (session saved and restored).
    DeductOwn,
    /// Its hand-written twin ([`deduct_hand`]).
    DeductHand,
}

impl Single {
    /// All six, lib (settings applied, then own connection) before hand for each call.
    pub const ALL: [Single; 6] = [
        Single::IssueLib,
        Single::IssueOwn,
        Single::IssueHand,
        Single::DeductLib,
        Single::DeductOwn,
        Single::DeductHand,
    ];

    /// Name for reports and benchmark ids.
    pub fn name(self) -> &'static str {
        match self {
            Self::IssueLib => "issue/lib",
            Self::IssueOwn => "issue/lib-own",
            Self::IssueHand => "issue/hand",
            Self::DeductLib => "deduct/lib",
            Self::DeductOwn => "deduct/lib-own",
            Self::DeductHand => "deduct/hand",
        }
    }
}

/// A campaign and an account for sequential single requests on one connection.
pub struct Uncontended {
    conn: MysqlConnection,
    /// A plain connection, as a caller opens it: no session settings applied.
    own: MysqlConnection,
    issuer: CouponIssuer,
    ledger: BalanceLedger,
    campaign: CouponTarget,
    account: i64,
    next_user: i64,
    next_key: u64,
    tag: String,
    issued: u64,
    deducted: u64,
}

impl Uncontended {
    /// Room for `capacity` issues; deducts are bounded by [`INITIAL_BALANCE`].
    pub fn new(harness: &mut Harness, capacity: u64) -> Result<Self, BoxError> {
        let campaign = harness.new_campaign(capacity)?;
        let account = harness.new_account()?;
        let next_user = harness.fresh_ids(capacity);
        Ok(Self {
            conn: connect(harness.url())?,
            own: MysqlConnection::establish(harness.url())?,
            issuer: CouponIssuer::new(),
            ledger: BalanceLedger::new(),
            campaign,
            account,
            next_user,
            next_key: 0,
            tag: format!("{}-single-{account}", harness.tag),
            issued: 0,
            deducted: 0,
        })
    }

    /// Runs one request of `op`.
    pub fn once(&mut self, op: Single) -> Result<(), Error> {
        match op {
            Single::IssueLib | Single::IssueOwn | Single::IssueHand => {
                let user = self.next_user;
                self.next_user += 1;
                let campaign_id = self.campaign.campaign_id;
                match op {
                    Single::IssueLib => {
                        self.issuer.issue(&mut self.conn, user, campaign_id)?;
                    }
                    Single::IssueOwn => {
                        self.issuer.issue(&mut self.own, user, campaign_id)?;
                    }
                    _ => {
                        issue_hand(&mut self.conn, user, &self.campaign)?;
                    }
                }
                self.issued += 1;
            }
            Single::DeductLib | Single::DeductOwn | Single::DeductHand => {
                self.next_key += 1;
                let key = format!("{}-{}", self.tag, self.next_key);
                let (ledger, account) = (&self.ledger, self.account);
                match op {
                    Single::DeductLib => {
                        ledger.deduct(&mut self.conn, account, DEDUCT_AMOUNT, &key)?;
                    }
                    Single::DeductOwn => {
                        ledger.deduct(&mut self.own, account, DEDUCT_AMOUNT, &key)?;
                    }
                    _ => {
                        deduct_hand(&mut self.conn, &deduct_of(account, &key))?;
                    }
                }
                self.deducted += 1;
            }
        }
        Ok(())
    }

    /// Checks the campaign and the account after the run (same rules as the cells).
    pub fn check(&mut self) -> Result<Vec<String>, BoxError> {
        let mut violations = Vec::new();
        let rows: i64 = user_coupon::table
            .filter(user_coupon::fcfs_coupon_id.eq(self.campaign.campaign_id))
            .count()
            .get_result(&mut self.conn)?;
        let (stock, total): (i32, i32) = fcfs_coupon::table
            .find(self.campaign.campaign_id)
            .select((fcfs_coupon::stock_quantity, fcfs_coupon::total_quantity))
            .first(&mut self.conn)?;
        if rows != self.issued as i64 || i64::from(stock) + rows != i64::from(total) {
            violations.push(format!(
                "uncontended coupon: {rows} rows, {} issued, stock {stock}, total {total}",
                self.issued
            ));
        }
        let deducts: i64 = balance_history::table
            .filter(balance_history::user_id.eq(self.account))
            .filter(balance_history::kind.eq("deduct"))
            .count()
            .get_result(&mut self.conn)?;
        if deducts != self.deducted as i64 {
            violations.push(format!(
                "uncontended ledger: {deducts} deduct rows, {} deducted",
                self.deducted
            ));
        }
        let expected = INITIAL_BALANCE - DEDUCT_AMOUNT * Decimal::from(self.deducted);
        let balance: Decimal = user_balance::table
            .find(self.account)
            .select(user_balance::balance)
            .first(&mut self.conn)?;
        if balance != expected {
            violations.push(format!(
                "uncontended ledger: balance {balance}, expected {expected}"
            ));
        }
        match self.ledger.audit(&mut self.conn, self.account) {
            Ok(_) => {}
            Err(Error::AuditFailed(report)) => {
                violations.push(format!("uncontended ledger: audit: {:?}", report.problems))
            }
            Err(other) => return Err(other.into()),
        }
        Ok(violations)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hot account whose deduct was stored with another amount than the request's — the
    /// balance, `balance_after` and request hash agreeing with the stored amount, so that
    /// `audit` and the balance check pass — is a violation. Before, only the balance against
    /// the stored amounts and the number of rows were checked.
    #[test]
    fn a_deduct_stored_with_another_amount_is_a_violation() {
        let mut harness =
            Harness::new("testkit_strategies_amount").unwrap_or_else(|e| panic!("harness: {e}"));
        let account = harness
            .new_account()
            .unwrap_or_else(|e| panic!("account: {e}"));
        let entry = BalanceLedger::new()
            .deduct(&mut harness.setup, account, DEDUCT_AMOUNT, "amount-1")
            .unwrap_or_else(|e| panic!("deduct: {e}"));
        let check = |harness: &mut Harness| {
            harness
                .check(Target::Account(account), &[entry.id], 0)
                .unwrap_or_else(|e| panic!("check: {e}"))
        };
        assert_eq!(check(&mut harness), Vec::<String>::new());
        let wrong = DEDUCT_AMOUNT * Decimal::from(2);
        let hash =
            lockstock::ledger::request_hash(lockstock::EntryKind::Deduct, account, wrong, None);
        diesel::update(balance_history::table.find(entry.id))
            .set((
                balance_history::amount.eq(wrong),
                balance_history::balance_after.eq(INITIAL_BALANCE - wrong),
                balance_history::request_hash.eq(hash),
            ))
            .execute(&mut harness.setup)
            .unwrap_or_else(|e| panic!("corrupt the entry: {e}"));
        diesel::update(user_balance::table.find(account))
            .set(user_balance::balance.eq(INITIAL_BALANCE - wrong))
            .execute(&mut harness.setup)
            .unwrap_or_else(|e| panic!("corrupt the balance: {e}"));
        let found = check(&mut harness);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains("of another amount"), "{found:?}");
    }

    /// A call answered `OutcomeUnknown` may have committed: the checks count it in doubt, as a
    /// stuck client's call, instead of reporting its row as a violation ("rows != successes").
    /// Before, only stuck clients were in doubt.
    #[test]
    fn calls_answered_outcome_unknown_are_in_doubt() {
        let mut run = Run {
            stuck: 1,
            ..Run::default()
        };
        run.errors
            .insert(format!("{OUTCOME_UNKNOWN}ConnectionLost"), 2);
        run.errors.insert("SoldOut".to_owned(), 5);
        run.errors.insert("Contended/LockRefused".to_owned(), 4);
        assert_eq!(run.in_doubt(), 3);
        assert!(within_doubt(13, 10, run.in_doubt()));
        assert!(!within_doubt(14, 10, run.in_doubt()));
    }
}
