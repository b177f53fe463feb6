//! Policies: isolation, retries and the deadline of one call, and its counts.

use std::cell::Cell;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant};

use super::ServerFlavor;

/// Transaction isolation level of the writing transactions.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// The default. Plain reads take shared locks; lockstock reads hot rows only through
    /// `FOR UPDATE NOWAIT` on unique indexes (one record lock each). Its other reads in a
    /// write take shared range locks where SERIALIZABLE makes them: the sum of an account's
    /// holds (under that account's row lock) and a coupon batch's holders read (see the
    /// README's lock table).
    Serializable,
    /// InnoDB's default.
    RepeatableRead,
    /// Fewer gap locks; correctness still rests on the row locks lockstock takes.
    ReadCommitted,
}

/// What the runner knows of the connections' prepared-statement cache (Diesel's
/// `set_prepared_statement_cache_size`). After an attempt whose body may have failed inside a
/// cached read's result (which libmariadb would wait for on the statement's next use), the
/// runner drops the connection's cached statements by switching the cache off and on — Diesel
/// evicts none singly and tells no cache size — but only where the cache is on, so that a
/// caller who switched it off keeps it off.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StatementCache {
    /// Unknown: after such an attempt the runner asks the server (one cached status read,
    /// sent twice: whether the second was prepared again), at most once per call. The
    /// default. Not behind a proxy that routes statements to several servers (the two reads may
    /// reach different ones): say what you know there. A server that does not answer the
    /// question (no session status to read) leaves the cache as it is, and the connection
    /// marked broken ([`Error::ConnectionBroken`](crate::Error::ConnectionBroken)).
    #[default]
    Ask,
    /// The connections cache statements (Diesel's default): dropped after such an attempt
    /// without asking. Saves the two reads where a caller's own bodies fail often.
    Cached,
    /// The connections cache nothing (`CacheSize::Disabled`): nothing is cached to go stale,
    /// and the cache is left alone.
    Uncached,
}

impl Isolation {
    /// The value of MariaDB's `tx_isolation` variable.
    pub(super) fn variable_value(self) -> &'static str {
        match self {
            Self::Serializable => "SERIALIZABLE",
            Self::RepeatableRead => "REPEATABLE-READ",
            Self::ReadCommitted => "READ-COMMITTED",
        }
    }

    pub(super) fn sql(self) -> &'static str {
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
    /// A policy that tries once and reports a refusal as [`Error::Contended`](crate::Error::Contended) at once.
    pub fn no_retry() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// The backoff ceiling before retry number `retry` (0 for the first retry):
    /// `min(max_backoff, base_backoff * 2^retry)`.
    pub fn backoff_ceiling(&self, retry: u32) -> Duration {
        // In nanoseconds, wide enough for any doubling below the ceiling (past 2^127 the
        // product is above every `Duration` anyway).
        let base = self.base_backoff.as_nanos();
        let doubled = if base == 0 {
            Some(0)
        } else {
            1u128
                .checked_shl(retry)
                .and_then(|factor| base.checked_mul(factor))
        };
        match doubled {
            // Below the ceiling, a `Duration`: its seconds fit.
            Some(nanos) if nanos < self.max_backoff.as_nanos() => {
                match u64::try_from(nanos / 1_000_000_000) {
                    Ok(seconds) => Duration::new(seconds, (nanos % 1_000_000_000) as u32),
                    Err(_) => self.max_backoff,
                }
            }
            _ => self.max_backoff,
        }
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
    /// `innodb_lock_wait_timeout` for statements that wait for row locks and
    /// `lock_wait_timeout` for metadata locks (whole seconds, at least 1, at most a year).
    /// `NOWAIT` reads never wait. A transaction begun with less of its call's deadline left is
    /// limited to that (see [the runner](super#statements-that-wait-and-the-deadline)).
    pub lock_wait_timeout: Duration,
    /// Statement time limit (`max_statement_time` on MariaDB; `max_execution_time` on MySQL,
    /// where it bounds read-only `SELECT`s only — the rest by the lock waits and the watchdog);
    /// on MariaDB at most the time the call has left when the statement's transaction begins
    /// (but at least 20 ms: a statement may outlast the deadline by that much, so a COMMIT sent
    /// at the last moment is not stopped midway) — on a connection that carries the settings only once that is less than the lock wait
    /// (see [the runner](super#statements-that-wait-and-the-deadline)). Zero is taken as the
    /// shortest limit, 1 ms (not as the server's "no limit").
    pub statement_timeout: Duration,
    /// How long past a call's deadline lockstock waits for a server that does not answer at
    /// all before it shuts the connection down and answers
    /// [`Error::ServerUnresponsive`](crate::Error::ServerUnresponsive) (or
    /// [`Error::OutcomeUnknown`](crate::Error::OutcomeUnknown) for a COMMIT in flight).
    /// Keep it above a round trip and the statement limit's overshoot (tens of milliseconds):
    /// a shorter grace cuts off a statement that the server's own limit would have ended
    /// (`Contended`, the connection kept) a moment later. `Duration::MAX` waits a year.
    pub unresponsive_grace: Duration,
    /// On a MariaDB Galera node, refuse a write with
    /// [`Error::NotDesignatedWriter`](crate::Error::NotDesignatedWriter) when the
    /// `designated_writer` row (kept by [`Router`](crate::route::Router)) names another node
    /// (default on; an empty row — no router ever designated a writer — allows every node).
    /// Checked by a SET of its own right after the first (a SET that reads a table and turns
    /// `autocommit` off in one statement misbehaves on MariaDB 10.11): one round trip more per
    /// guarded write.
    pub designated_writer_only: bool,
    /// What the runner knows of the connections' prepared-statement cache (default
    /// [`StatementCache::Ask`]: it asks the server when it matters). lockstock's own calls note
    /// their refusals that leave no statement mid-result, so they rarely need to know; set
    /// [`StatementCache::Cached`] where your own [`run`](super::TxnRunner::run) bodies are often
    /// refused and your connections keep Diesel's default cache.
    pub statement_cache: StatementCache,
}

impl Default for TxnPolicy {
    fn default() -> Self {
        Self {
            isolation: Isolation::Serializable,
            retry: RetryPolicy::default(),
            lock_wait_timeout: Duration::from_secs(1),
            statement_timeout: Duration::from_secs(5),
            unresponsive_grace: Duration::from_millis(500),
            designated_writer_only: true,
            statement_cache: StatementCache::Ask,
        }
    }
}

/// `sql_select_limit`'s largest value: every row a read selects (`DEFAULT` would be the
/// server's global value, which may cap it too).
pub(super) const NO_SELECT_LIMIT: u64 = u64::MAX;

/// No pending `insert_id` (MariaDB, where 0 clears it): a caller's `SET insert_id = N` would
/// number lockstock's next row (a duplicate key), and the caller's own next INSERT would no
/// longer get it (the runner puts the caller's back). Not on MySQL 8, where 0 is not "none"
/// but an id: there a caller's pending `insert_id` numbers lockstock's next row.
const NO_PENDING_INSERT_ID: &str = "insert_id = 0";

/// CHECK constraints checked (MariaDB's `check_constraint_checks`, which a session may turn
/// off): the schema's checks (stock and balances never negative, refunds and captures bounded)
/// are lockstock's last line of defence. (MySQL 8 has no such switch.)
const CHECKS_ON: &str = "check_constraint_checks = 1";

impl TxnPolicy {
    /// The same policy with another isolation level.
    #[must_use]
    pub fn with_isolation(mut self, isolation: Isolation) -> Self {
        self.isolation = isolation;
        self
    }

    /// The same policy with another retry policy.
    #[must_use]
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The same policy, knowing the connections' statement cache (see [`StatementCache`]).
    #[must_use]
    pub fn with_statement_cache(mut self, cache: StatementCache) -> Self {
        self.statement_cache = cache;
        self
    }

    /// The `SET SESSION` statement for this policy on a server of `flavor`.
    pub(super) fn session_sql(&self, flavor: ServerFlavor) -> String {
        // MariaDB: a combiner opens its next batch's transaction ahead and leaves it idle while
        // the batch before it runs (see `TxnRunner::prime`), which may take as long as that
        // batch's deadline; a server's `idle_transaction_timeout` (or its read-only variant)
        // would end the session meanwhile, and the batch would fail on a healthy server.
        // Only on connections that carry the settings: only those are opened ahead.
        let idle = match flavor {
            ServerFlavor::MariaDb => {
                ", idle_transaction_timeout = 0, idle_readonly_transaction_timeout = 0"
            }
            ServerFlavor::MySql => "",
        };
        format!(
            "SET SESSION {}{idle}, lc_messages = _utf8mb4'en_US'",
            self.settings(flavor)
        )
    }

    /// The session assignments of this policy but `lc_messages`.
    ///
    /// Timeouts are rounded up, never down: a statement limit under a millisecond becomes one
    /// millisecond (0 would mean "no limit"), a lock wait under a second becomes one second.
    /// The lock wait bounds row locks (`innodb_lock_wait_timeout`) and metadata locks
    /// (`lock_wait_timeout`, e.g. behind a concurrent `ALTER TABLE`) alike.
    pub(super) fn settings(&self, flavor: ServerFlavor) -> String {
        let millis = statement_millis(self.statement_timeout);
        let limit = match flavor {
            ServerFlavor::MariaDb => format!(
                "max_statement_time = {}.{:03}, {NO_PENDING_INSERT_ID}, {CHECKS_ON}",
                millis / 1000,
                millis % 1000
            ),
            ServerFlavor::MySql => format!("max_execution_time = {millis}"),
        };
        self.settings_with(&limit)
    }

    /// [`settings`](Self::settings) with the statement limit a bound parameter (MariaDB):
    /// each transaction of a call on a connection without the settings limits its statements
    /// to the time the call has left ([`statement_limit`](Self::statement_limit)).
    pub(super) fn settings_bound(&self) -> String {
        self.settings_with(&format!(
            "max_statement_time = ?, {NO_PENDING_INSERT_ID}, {CHECKS_ON}"
        ))
    }

    fn settings_with(&self, limit: &str) -> String {
        let lock_wait = self.lock_wait_seconds();
        // What lockstock's statements rely on, whatever the caller set: every row a read
        // selects (`sql_select_limit` cuts a batch's reads and `audit` short), the unique and
        // foreign keys checked, and keys, order references and answers sent as utf8mb4 (a
        // caller's `SET NAMES utf8mb3` turned a 4-byte character of a key into '?' or an
        // error), and no cap on the rows a read may examine (a caller's `max_join_size` turns
        // `sql_big_selects` off: lockstock's reads were refused).
        format!(
            "innodb_lock_wait_timeout = {lock_wait}, lock_wait_timeout = {lock_wait}, {limit}, \
             time_zone = _utf8mb4'+00:00', sql_select_limit = {NO_SELECT_LIMIT}, unique_checks = 1, \
             foreign_key_checks = 1, character_set_client = utf8mb4, \
             character_set_results = utf8mb4, collation_connection = utf8mb4_general_ci, \
             sql_big_selects = 1"
        )
    }

    /// The lock wait the server is told: whole seconds, at least one, at most
    /// [`LONGEST_LOCK_WAIT_SECONDS`] (a longer one is refused by a session in
    /// `STRICT_ALL_TABLES` mode — every call would fail — and cut to it by others).
    fn lock_wait_seconds(&self) -> u64 {
        (self.lock_wait_timeout.as_secs_f64().ceil() as u64).clamp(1, LONGEST_LOCK_WAIT_SECONDS)
    }

    /// The longest a statement may wait for a lock with the policy's settings: the lock wait
    /// or the statement limit, whichever is shorter. (A statement slow for another reason may
    /// run up to the statement limit.)
    pub(super) fn longest_lock_wait(&self) -> Duration {
        Duration::from_secs(self.lock_wait_seconds()).min(Duration::from_millis(statement_millis(
            self.statement_timeout,
        ) as u64))
    }

    /// The statement limit (MariaDB's `max_statement_time`, in seconds) of a transaction
    /// begun with `left` of its call's deadline: the policy's limit, or `left` where that is
    /// shorter (rounded up to the millisecond) but never under [`SHORTEST_LIMIT`], so that no
    /// statement outlives the deadline by waiting for a lock, and a COMMIT sent in the last
    /// moments is not stopped in the middle by the limit alone (an outcome the caller could not
    /// know; a COMMIT that waits longer, e.g. behind a backup's commit lock, is stopped, and
    /// answers [`Error::OutcomeUnknown`](crate::Error::OutcomeUnknown)).
    pub(super) fn statement_limit(&self, left: Duration) -> f64 {
        let limit = self
            .statement_timeout
            .min(left.max(SHORTEST_LIMIT.min(self.statement_timeout)));
        statement_millis(limit) as f64 / 1000.0
    }
}

/// The longest lock wait the server takes: `lock_wait_timeout`'s maximum (one year, on
/// MariaDB and MySQL alike; `innodb_lock_wait_timeout`'s is longer), and as long as the longest
/// deadline ([`Deadline::after`]).
pub(super) const LONGEST_LOCK_WAIT_SECONDS: u64 = 31_536_000;

/// The shortest statement limit a transaction gets from its deadline (see
/// [`TxnPolicy::statement_limit`]): a statement may outlast its deadline by this much.
pub(super) const SHORTEST_LIMIT: Duration = Duration::from_millis(20);

/// A statement limit in whole milliseconds, rounded up: at least one (0 means "no limit").
fn statement_millis(limit: Duration) -> u128 {
    limit
        .as_nanos()
        .div_ceil(1_000_000)
        .clamp(1, u128::from(u32::MAX))
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

    /// Inside a transaction's body that sends a statement per row: `Err(Error::Timeout)` once
    /// the deadline has passed, so the body stops there and its transaction is rolled back
    /// (nothing of it applied) instead of sending its remaining statements past the deadline.
    pub(crate) fn before_next_statement(&self) -> Result<(), crate::Error> {
        if self.is_expired() {
            return Err(crate::Error::Timeout {
                elapsed: self.elapsed(),
            });
        }
        Ok(())
    }

    /// The moment `grace` after the deadline (when the watchdog shuts a silent connection down).
    pub(crate) fn past(&self, grace: Duration) -> Instant {
        // A grace too long for an `Instant` (`Duration::MAX`: "never cut") is a year, as
        // [`after`](Self::after) caps a budget: never the deadline itself, which would cut a
        // call at its deadline instead of never.
        self.at
            .checked_add(grace)
            .or_else(|| self.at.checked_add(Duration::from_secs(86_400 * 365)))
            .unwrap_or(self.at)
    }

    /// Whether this deadline is later than `other`.
    pub(crate) fn is_later_than(&self, other: &Self) -> bool {
        self.at > other.at
    }

    /// The earlier of two deadlines (a combined batch runs by its earliest caller's).
    #[must_use]
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

thread_local! {
    static RNG_STATE: Cell<u64> = Cell::new({
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u128(Instant::now().elapsed().as_nanos());
        hasher.finish() | 1
    });
}

/// A uniform number in `[0, 1)` from a per-thread xorshift64* generator; jitter needs spread, not
/// cryptographic quality, and this keeps the crate free of an RNG dependency.
pub(super) fn jitter_fraction() -> f64 {
    RNG_STATE.with(|state| {
        let mut x = state.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        state.set(x);
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    })
}
