//! A mixed, fault-tolerant workload with a complete operation history, and the checks that the
//! database agrees with that history.
//!
//! Each client runs deducts, transfers, refunds, charges and coupon issues in a loop. Every
//! operation gets a unique idempotency key (coupon issues a unique user) and is retried with the
//! same key on a new connection after a lost connection or an unknown outcome, until it gets a
//! definitive answer. The client records what it invoked and what it was told: ok (with the
//! entry or coupon id), refused, unknown (given up after `OutcomeUnknown`) or lost (given up
//! after a lost connection). [`verify`] then checks from the database that every ok was applied
//! exactly once, every refusal never (and a refusal for the balance only where a balance the
//! account had while the refusing call ran allowed it), every unknown at most once, money is
//! conserved, no balance is negative, no coupon is over-issued or duplicated and every account
//! passes `audit`. A
//! ledger answer that says nothing was applied (a lost or broken connection, `Contended`,
//! `Timeout`, `ServerUnresponsive`) with no unknown outcome before it is checked at once, before
//! the retry: its key must have no entry (the retry would answer that entry as if it had applied
//! it); one found is an unexpected answer.
//!
//! lockstock's reliability tests (`faults`, `processes`) run it with connections killed, the
//! server crashed and several processes.
//!
//! ```no_run
//! use std::sync::atomic::{AtomicBool, Ordering};
//! use std::time::Duration;
//! use lockstock_testkit::fixtures::fresh_database;
//! use lockstock_testkit::workload::{run_client, setup, verify, Client, ErrorTexts};
//!
//! let (url, mut conn) = fresh_database("doc_workload");
//! let setup = setup(&mut conn, 16, 2, 200);
//! let (stop, errors) = (AtomicBool::new(false), ErrorTexts::default());
//! let records: Vec<_> = std::thread::scope(|s| {
//!     let clients: Vec<_> = (0..8)
//!         .map(|n| {
//!             let client = Client::new(&url, format!("c{n}"), n, &setup, 42 + n as u64, &errors);
//!             let stop = &stop;
//!             s.spawn(move || run_client(&client, stop, &mut |_| true))
//!         })
//!         .collect();
//!     std::thread::sleep(Duration::from_secs(2));
//!     stop.store(true, Ordering::Relaxed);
//!     clients.into_iter().flat_map(|c| c.join().unwrap()).collect()
//! });
//! assert_eq!(verify(&mut conn, &setup, &records), Vec::<String>::new());
//! ```
#![allow(clippy::expect_used)] // test tooling: a failed read of the database fails the test

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel::{Connection, MysqlConnection};
use lockstock::ledger::MAX_AMOUNT;
use lockstock::schema::user_coupon;
use lockstock::{BalanceLedger, CouponIssuer, Error, ServerErrorKind};
use rust_decimal::Decimal;

/// The name [`setup`]'s charges are keyed by as a client's would be (`init-<user>`): no
/// [`Client`] may have it.
const SETUP_NAME: &str = "init";

/// Balance every account starts with (charged by [`setup`] under key `init-<user>`).
pub const INITIAL_BALANCE: Decimal = Decimal::from_parts(100_000, 0, 0, false, 2);

/// Coupon users reserved for each client made with [`Client::new`].
const USERS_PER_CLIENT: i64 = 1_000_000;

/// How long one operation may keep retrying before it is given up.
const OP_BUDGET: Duration = Duration::from_secs(90);

/// Server error texts and how often clients were answered with them
/// (`[OutcomeUnknown] <kind>: <message>`); shared by the clients of one test.
pub type ErrorTexts = Arc<Mutex<BTreeMap<String, usize>>>;

fn note_server_error(texts: &ErrorTexts, error: &Error) {
    if let Some(server) = error.server_error() {
        let text = format!(
            "{}{:?}: {}",
            if error.is_outcome_unknown() {
                "OutcomeUnknown "
            } else {
                ""
            },
            server.kind(),
            server.message()
        );
        *texts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(text)
            .or_default() += 1;
    }
}

/// The texts, one per line with their counts.
pub fn describe(texts: &ErrorTexts) -> String {
    texts
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .map(|(text, n)| format!("  {n:6} x {text}\n"))
        .collect()
}

use crate::fixtures::{
    campaign_rows, create_campaign, snapshot, valid_coupon, HistoryRow, Snapshot,
};
use crate::rng::Rng;

/// What the database holds before the clients start.
#[derive(Debug, Clone)]
pub struct Setup {
    /// Accounts `1..=accounts`, each charged [`INITIAL_BALANCE`].
    pub accounts: i64,
    /// Campaign ids (one coupon template each).
    pub campaigns: Vec<i64>,
}

/// Charges `accounts` accounts and creates `campaigns` campaigns of `stock` coupons.
/// [`run_client`] runs what the setup allows: no transfers with fewer than two accounts, no
/// ledger operations without one, no issues without a campaign.
pub fn setup(conn: &mut MysqlConnection, accounts: i64, campaigns: usize, stock: u32) -> Setup {
    let ledger = BalanceLedger::new();
    for user in 1..=accounts {
        ledger
            .charge(conn, user, INITIAL_BALANCE, &format!("{SETUP_NAME}-{user}"))
            .unwrap_or_else(|e| panic!("initial charge of {user}: {e}"));
    }
    let issuer = CouponIssuer::new();
    let now = crate::fixtures::now();
    let campaigns = (0..campaigns)
        .map(|n| {
            let coupon = valid_coupon(conn, &issuer, &format!("workload {n}"));
            let (starts, ends) = (
                now - chrono::Duration::minutes(1),
                now + chrono::Duration::days(1),
            );
            create_campaign(conn, &issuer, coupon.id, stock, starts, ends).id
        })
        .collect();
    Setup {
        accounts,
        campaigns,
    }
}

/// One client's parameters.
#[derive(Debug, Clone)]
pub struct Client {
    /// Database URL.
    pub url: String,
    /// Unique among all clients of a run (all processes): keys and coupon users derive from it.
    /// Not empty, no whitespace (a history line's fields are separated by it) and not `init`
    /// (the setup's charges are keyed `init-<user>`): [`run_client`] refuses another.
    pub name: String,
    /// Coupon users of this client are `user_base + 1, user_base + 2, ...` (unique per client).
    pub user_base: i64,
    /// What [`setup`] made.
    pub setup: Setup,
    /// Seed of this client's operation mix.
    pub seed: u64,
    /// Per mille of operations given up after an unknown outcome instead of retried.
    pub abandon_unknown: u64,
    /// Per mille of operations given up after a lost connection instead of retried.
    pub abandon_lost: u64,
    /// Stop after this many operations (or when the stop flag is set).
    pub max_ops: usize,
    /// Where the server errors answered are counted.
    pub errors: ErrorTexts,
}

impl Client {
    /// Client `name` number `number` (coupon users from `1_000_000 * (number + 1)`) with its
    /// own `seed`, retrying every operation until it has a definitive answer, without an
    /// operation limit.
    pub fn new(
        url: &str,
        name: String,
        number: usize,
        setup: &Setup,
        seed: u64,
        errors: &ErrorTexts,
    ) -> Self {
        Self {
            url: url.to_owned(),
            name,
            user_base: USERS_PER_CLIENT * (number as i64 + 1),
            setup: setup.clone(),
            seed,
            abandon_unknown: 0,
            abandon_lost: 0,
            max_ops: usize::MAX,
            errors: errors.clone(),
        }
    }
}

/// An operation as invoked.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)] // the fields are the call's arguments, named as in the call
pub enum Op {
    /// `charge(user, amount)`.
    Charge { user: i64, amount: Decimal },
    /// `deduct(user, amount)`.
    Deduct { user: i64, amount: Decimal },
    /// `refund(deduct, amount)` of a deduct of `user`.
    Refund {
        user: i64,
        deduct: i64,
        amount: Decimal,
    },
    /// `transfer(from, to, amount)`.
    Transfer { from: i64, to: i64, amount: Decimal },
    /// `issue(user, campaign)`.
    Issue { user: i64, campaign: i64 },
}

impl Op {
    /// The account whose key namespace holds the operation's key (the coupon user for issues).
    pub fn key_owner(&self) -> i64 {
        match self {
            Op::Charge { user, .. } | Op::Deduct { user, .. } | Op::Refund { user, .. } => *user,
            Op::Transfer { from, .. } => *from,
            Op::Issue { user, .. } => *user,
        }
    }
}

/// What the caller was finally told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Applied: the journal entry (the sending entry of a transfer) or the issued coupon.
    Ok(i64),
    /// Coupon: `AlreadyIssued` after an unknown attempt: applied exactly once, this coupon.
    Held(i64),
    /// A definitive refusal: never applied.
    Refused,
    /// Given up after lost connections only: never applied (if no attempt was unknown).
    Lost,
    /// Given up after an unknown outcome (or a refusal that does not decide it): at most once.
    Unknown,
}

/// One operation of the history. Made by [`Record::new`] (or parsed from a history line), so
/// that a field added later is no breaking change.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Record {
    /// Its idempotency key (unique in the run).
    pub key: String,
    /// What was invoked.
    pub op: Op,
    /// The final answer.
    pub outcome: Outcome,
    /// Calls made.
    pub attempts: u32,
    /// Calls answered `OutcomeUnknown`.
    pub unknowns: u32,
    /// Calls answered with a lost connection (or no connection could be made).
    pub lost: u32,
    /// Calls refused for contention (`Contended`, `Timeout`).
    pub contended: u32,
    /// A final answer the workload never expects (e.g. an unclassified server error).
    pub unexpected: Option<String>,
    /// When the last call was made and when it answered (UTC wall clock, as lockstock stamps
    /// its journal entries): a refusal for the balance was decided in between, so a balance
    /// the account had then must allow it ([`verify`]). `None`: not known (no call made, or a
    /// record of an older history line).
    pub last_call: Option<(NaiveDateTime, NaiveDateTime)>,
}

impl Record {
    /// Operation `op` under `key`, not yet answered (outcome unknown, no attempts).
    pub fn new(key: String, op: Op) -> Self {
        Self {
            key,
            op,
            outcome: Outcome::Unknown,
            attempts: 0,
            unknowns: 0,
            lost: 0,
            contended: 0,
            unexpected: None,
            last_call: None,
        }
    }
}

/// A history line that is not a [`Record`]'s (a truncated line of a worker killed mid-write,
/// say): the line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRecord(pub String);

impl fmt::Display for BadRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bad history line {:?}", self.0)
    }
}

impl std::error::Error for BadRecord {}

fn field<T: FromStr>(it: &mut std::str::SplitWhitespace<'_>, line: &str) -> Result<T, BadRecord> {
    it.next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| BadRecord(line.to_owned()))
}

impl fmt::Display for Record {
    /// One line: `key kind a b amount outcome id attempts unknowns lost contended unexpected`
    /// and, where known, the last call's start and answer in microseconds since the epoch
    /// (the key has no whitespace: the workload's keys are `<client>-<n>`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (kind, a, b, amount) = match &self.op {
            Op::Charge { user, amount } => ("charge", *user, 0, *amount),
            Op::Deduct { user, amount } => ("deduct", *user, 0, *amount),
            Op::Refund {
                user,
                deduct,
                amount,
            } => ("refund", *user, *deduct, *amount),
            Op::Transfer { from, to, amount } => ("transfer", *from, *to, *amount),
            Op::Issue { user, campaign } => ("issue", *user, *campaign, Decimal::ZERO),
        };
        let (outcome, id) = match self.outcome {
            Outcome::Ok(id) => ("ok", id),
            Outcome::Held(id) => ("held", id),
            Outcome::Refused => ("refused", 0),
            Outcome::Lost => ("lost", 0),
            Outcome::Unknown => ("unknown", 0),
        };
        write!(
            f,
            "{} {kind} {a} {b} {amount} {outcome} {id} {} {} {} {} {}",
            self.key,
            self.attempts,
            self.unknowns,
            self.lost,
            self.contended,
            self.unexpected.is_some()
        )?;
        match self.last_call {
            Some((called, answered)) => write!(
                f,
                " {} {}",
                called.and_utc().timestamp_micros(),
                answered.and_utc().timestamp_micros()
            ),
            None => Ok(()),
        }
    }
}

impl FromStr for Record {
    type Err = BadRecord;

    fn from_str(line: &str) -> Result<Self, Self::Err> {
        let bad = || BadRecord(line.to_owned());
        let mut it = line.split_whitespace();
        let key: String = field(&mut it, line)?;
        let kind: String = field(&mut it, line)?;
        let a: i64 = field(&mut it, line)?;
        let b: i64 = field(&mut it, line)?;
        let amount: Decimal = field(&mut it, line)?;
        let outcome: String = field(&mut it, line)?;
        let id: i64 = field(&mut it, line)?;
        let op = match kind.as_str() {
            "charge" => Op::Charge { user: a, amount },
            "deduct" => Op::Deduct { user: a, amount },
            "refund" => Op::Refund {
                user: a,
                deduct: b,
                amount,
            },
            "transfer" => Op::Transfer {
                from: a,
                to: b,
                amount,
            },
            "issue" => Op::Issue {
                user: a,
                campaign: b,
            },
            _ => return Err(bad()),
        };
        let outcome = match outcome.as_str() {
            "ok" => Outcome::Ok(id),
            "held" => Outcome::Held(id),
            "refused" => Outcome::Refused,
            "lost" => Outcome::Lost,
            "unknown" => Outcome::Unknown,
            _ => return Err(bad()),
        };
        let record = Record {
            key,
            op,
            outcome,
            attempts: field(&mut it, line)?,
            unknowns: field(&mut it, line)?,
            lost: field(&mut it, line)?,
            contended: field(&mut it, line)?,
            unexpected: field::<bool>(&mut it, line)?.then(|| "in another process".to_owned()),
            last_call: None,
        };
        let time = |micros: &str| {
            micros
                .parse::<i64>()
                .ok()
                .and_then(chrono::DateTime::from_timestamp_micros)
                .map(|at| at.naive_utc())
                .ok_or_else(bad)
        };
        match (it.next(), it.next(), it.next()) {
            (None, _, _) => Ok(record),
            // Answered before it was made: a line cut inside its last field (a number's
            // prefix is a far earlier time), not a record.
            (Some(called), Some(answered), None) => match (time(called)?, time(answered)?) {
                (called, answered) if answered < called => Err(bad()),
                last_call => Ok(Record {
                    last_call: Some(last_call),
                    ..record
                }),
            },
            _ => Err(bad()),
        }
    }
}

/// A new connection, retried with exponential backoff (the server may be down); `None` after
/// `OP_BUDGET` (90 s), or once `stop` is set (a run that ends — or a test that failed — does
/// not wait for a server that stays down).
pub fn connect_with_backoff(url: &str, stop: &AtomicBool) -> Option<MysqlConnection> {
    let started = Instant::now();
    let mut pause = Duration::from_millis(2);
    loop {
        match MysqlConnection::establish(url) {
            Ok(conn) => return Some(conn),
            Err(_) if started.elapsed() < OP_BUDGET && !stop.load(Ordering::Relaxed) => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            Err(_) => return None,
        }
    }
}

/// The journal entries of account `user_id` under `key` (a history check: after an answer that
/// says nothing was applied, with no attempt of unknown outcome before it, there must be none).
pub fn entries_under(conn: &mut MysqlConnection, user_id: i64, key: &str) -> QueryResult<i64> {
    use lockstock::schema::balance_history;
    balance_history::table
        .filter(balance_history::user_id.eq(user_id))
        .filter(balance_history::idempotency_key.eq(key))
        .count()
        .get_result(conn)
}

/// The amount of deduct entry `deduct`, and the sum of the refunds of it in the journal.
fn refund_room(conn: &mut MysqlConnection, deduct: i64) -> QueryResult<(Decimal, Decimal)> {
    use diesel::dsl::sum;
    use lockstock::schema::balance_history;
    let deducted: Decimal = balance_history::table
        .find(deduct)
        .select(balance_history::amount)
        .first(conn)?;
    let refunded: Option<Decimal> = balance_history::table
        .filter(balance_history::related_entry_id.eq(deduct))
        .filter(balance_history::kind.eq("refund"))
        .select(sum(balance_history::amount))
        .first(conn)?;
    Ok((deducted, refunded.unwrap_or_default()))
}

/// Whether `key` is one of client `name`'s: `<name>-<number>`, as [`run_client`] makes them —
/// not a key of a client whose name merely begins the same (`a-b-0` is not client `a`'s).
fn is_key_of(name: &str, key: &str) -> bool {
    key.strip_prefix(name)
        .and_then(|rest| rest.strip_prefix('-'))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Whether `name` can name a [`Client`]: not empty, no whitespace, not `init`.
fn is_client_name(name: &str) -> bool {
    !name.is_empty() && name != SETUP_NAME && !name.chars().any(char::is_whitespace)
}

/// 0.01 to 30.00, always with scale 2.
fn amount(rng: &mut Rng) -> Decimal {
    Decimal::new(rng.below(3_000) as i64 + 1, 2)
}

/// Runs operations until `stop` is set or `max_ops` are done; returns the history.
///
/// `before_attempt` runs before every call on the connection the call will use (the kill test
/// hands the connection id to its killer there); `false` means the connection is unusable.
///
/// # Panics
/// For a client name that is empty, holds whitespace or is `init` (see [`Client::name`]):
/// its keys would not read back from a history line, or would be the setup's, and [`verify`]
/// would report violations that are not there.
pub fn run_client(
    client: &Client,
    stop: &AtomicBool,
    before_attempt: &mut dyn FnMut(&mut MysqlConnection) -> bool,
) -> Vec<Record> {
    assert!(
        is_client_name(&client.name),
        "client name {:?}: not empty, no whitespace, not \"init\"",
        client.name
    );
    let mut rng = Rng::new(client.seed);
    let ledger = BalanceLedger::new();
    let issuer = CouponIssuer::new();
    let accounts = client.setup.accounts;
    // A setup without accounts runs no ledger operations, one with a single account no
    // transfers, one without campaigns no issues (and one with neither runs nothing).
    let (ledger_ops, transfers) = (accounts >= 1, accounts >= 2);
    let issues = !client.setup.campaigns.is_empty();
    if !ledger_ops && !issues {
        return Vec::new();
    }
    let mut conn: Option<MysqlConnection> = None;
    // (entry, user, cents) of this client's deducts.
    let mut deducts: Vec<(i64, i64, u64)> = Vec::new();
    let mut records = Vec::new();
    let mut next_user = client.user_base;
    while records.len() < client.max_ops && !stop.load(Ordering::Relaxed) {
        let key = format!("{}-{}", client.name, records.len());
        let roll = rng.below(100);
        // Deducts and charges balance out (with refunds) so accounts neither drain nor grow.
        let op = if !ledger_ops || (roll >= 70 && issues) {
            next_user += 1;
            let campaigns = &client.setup.campaigns;
            Op::Issue {
                user: next_user,
                campaign: campaigns[rng.below(campaigns.len() as u64) as usize],
            }
        } else if roll < 25 {
            Op::Deduct {
                user: 1 + rng.below(accounts as u64) as i64,
                amount: amount(&mut rng),
            }
        } else if roll < 40 && transfers {
            let from = 1 + rng.below(accounts as u64) as i64;
            let to = 1 + (from + rng.below(accounts as u64 - 1) as i64) % accounts;
            Op::Transfer {
                from,
                to,
                amount: amount(&mut rng),
            }
        } else if roll < 50 && !deducts.is_empty() {
            let (deduct, user, cents) = deducts[rng.below(deducts.len() as u64) as usize];
            Op::Refund {
                user,
                deduct,
                amount: Decimal::new(1 + rng.below(cents) as i64, 2),
            }
        } else {
            Op::Charge {
                user: 1 + rng.below(accounts as u64) as i64,
                amount: amount(&mut rng),
            }
        };
        let record = execute(
            (client, stop),
            &mut |c: &mut MysqlConnection, key: &str, op: &Op| call(&ledger, &issuer, c, key, op),
            &mut conn,
            &mut rng,
            key,
            op,
            before_attempt,
        );
        if let (Op::Deduct { user, amount }, Outcome::Ok(id)) = (&record.op, record.outcome) {
            // Workload amounts have two decimals: the mantissa is the cents.
            deducts.push((id, *user, amount.mantissa() as u64));
        }
        records.push(record);
    }
    records
}

/// The call an operation makes (through lockstock: [`call`]).
type Call<'a> = dyn FnMut(&mut MysqlConnection, &str, &Op) -> Result<i64, Error> + 'a;

/// Calls `op` (through `call`) until it gets a definitive answer (or is given up on purpose).
fn execute(
    (client, stop): (&Client, &AtomicBool),
    call: &mut Call<'_>,
    conn: &mut Option<MysqlConnection>,
    rng: &mut Rng,
    key: String,
    op: Op,
    before_attempt: &mut dyn FnMut(&mut MysqlConnection) -> bool,
) -> Record {
    let started = Instant::now();
    let mut record = Record::new(key, op);
    let given_up = |record: &Record| {
        if record.unknowns > 0 {
            Outcome::Unknown
        } else {
            Outcome::Lost
        }
    };
    // A ledger answer that said nothing was applied, with no attempt of unknown outcome before
    // it: its key must have no entry then (nor may one land later), checked before the next
    // attempt — which would otherwise answer the entry, as if it had applied it.
    let mut unapplied: Option<String> = None;
    loop {
        if started.elapsed() > OP_BUDGET {
            record.outcome = given_up(&record);
            return record;
        }
        if conn.is_none() {
            *conn = connect_with_backoff(&client.url, stop);
        }
        let Some(c) = conn.as_mut() else {
            record.lost += 1;
            if stop.load(Ordering::Relaxed) {
                // No connection and the run is over: given up, as after the budget.
                record.outcome = given_up(&record);
                return record;
            }
            continue;
        };
        if let Some(answer) = unapplied.take() {
            match entries_under(c, record.op.key_owner(), &record.key) {
                Ok(0) => {}
                Ok(entries) => {
                    record.unexpected.get_or_insert(format!(
                        "{answer}, which says that nothing was applied, yet the key has \
                         {entries} entries"
                    ));
                }
                Err(_) => {
                    // Checked on the next connection.
                    unapplied = Some(answer);
                    *conn = None;
                    continue;
                }
            }
        }
        if !before_attempt(c) {
            *conn = None;
            continue;
        }
        record.attempts += 1;
        let called = crate::fixtures::now();
        let result = call(c, &record.key, &record.op);
        record.last_call = Some((called, crate::fixtures::now()));
        let error = match result {
            Ok(id) => {
                record.outcome = Outcome::Ok(id);
                return record;
            }
            Err(error) => error,
        };
        note_server_error(&client.errors, &error);
        let says_nothing_applied = !error.is_outcome_unknown()
            && error.server_kind() == Some(ServerErrorKind::ConnectionLost)
            || matches!(
                error,
                Error::ConnectionBroken { .. }
                    | Error::ServerUnresponsive { .. }
                    | Error::Contended { .. }
                    | Error::Timeout { .. }
            );
        if says_nothing_applied && record.unknowns == 0 && !matches!(record.op, Op::Issue { .. }) {
            unapplied = Some(format!("{error:?}"));
        }
        if error.is_outcome_unknown() {
            record.unknowns += 1;
            *conn = None;
            if rng.chance(client.abandon_unknown) {
                record.outcome = Outcome::Unknown;
                return record;
            }
            continue;
        }
        // Nothing applied, the connection is gone (a lost connection, a broken one, or one the
        // watchdog shut down because the server did not answer in time): a new connection.
        if error.server_kind() == Some(ServerErrorKind::ConnectionLost)
            || matches!(
                error,
                Error::ConnectionBroken { .. } | Error::ServerUnresponsive { .. }
            )
        {
            record.lost += 1;
            *conn = None;
            if rng.chance(client.abandon_lost) {
                record.outcome = given_up(&record);
                return record;
            }
            continue;
        }
        if matches!(error, Error::Contended { .. } | Error::Timeout { .. }) {
            record.contended += 1;
            std::thread::sleep(Duration::from_micros(200 + rng.below(2_000)));
            continue;
        }
        // A refund refused as beyond its deduct: only this client refunds its deducts, and
        // refunds only add up, so the refunds of the deduct in the journal now are at least
        // those the refusal saw. With room for this one among them, the refusal was wrong.
        if let (Op::Refund { deduct, amount, .. }, Error::RefundExceedsDeduct { .. }) =
            (&record.op, &error)
        {
            if let Some(c) = conn.as_mut() {
                if let Ok((deducted, refunded)) = refund_room(c, *deduct) {
                    if refunded + *amount <= deducted {
                        record.unexpected.get_or_insert(format!(
                            "{error:?}, although the deduct of {deducted} has {refunded} \
                             refunded"
                        ));
                    }
                }
            }
        }
        record.outcome = match (&record.op, &error) {
            (Op::Issue { .. }, Error::AlreadyIssued { user_coupon_id, .. }) => {
                if record.unknowns == 0 {
                    record.unexpected = Some(format!("{error:?}"));
                }
                Outcome::Held(*user_coupon_id)
            }
            // A sold-out answer may come from the issuer's cache, which does not know whether
            // an earlier unknown attempt issued this user's coupon.
            (Op::Issue { .. }, Error::SoldOut { .. }) if record.unknowns > 0 => Outcome::Unknown,
            (Op::Issue { .. }, Error::SoldOut { .. })
            | (
                _,
                Error::InsufficientBalance { .. }
                | Error::RefundExceedsDeduct { .. }
                | Error::BalanceLimitExceeded { .. },
            ) => Outcome::Refused,
            _ => {
                record.unexpected = Some(format!("{error:?}"));
                given_up(&record)
            }
        };
        return record;
    }
}

fn call(
    ledger: &BalanceLedger,
    issuer: &CouponIssuer,
    conn: &mut MysqlConnection,
    key: &str,
    op: &Op,
) -> Result<i64, Error> {
    Ok(match op {
        Op::Charge { user, amount } => ledger.charge(conn, *user, *amount, key)?.id,
        Op::Deduct { user, amount } => ledger.deduct(conn, *user, *amount, key)?.id,
        Op::Refund { deduct, amount, .. } => ledger.refund(conn, *deduct, *amount, key)?.id,
        Op::Transfer { from, to, amount } => {
            ledger.transfer(conn, *from, *to, *amount, key)?.debit.id
        }
        Op::Issue { user, campaign } => issuer.issue(conn, *user, *campaign)?.id,
    })
}

/// Counts of a history (made by the checker; `#[non_exhaustive]`, so that a count added later
/// is no breaking change).
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Summary {
    /// Operations invoked.
    pub ops: usize,
    /// Answered ok (or `AlreadyIssued` after an unknown attempt).
    pub ok: usize,
    /// Refused (insufficient balance, refund beyond the deduct, sold out).
    pub refused: usize,
    /// Given up after an unknown outcome.
    pub unknown: usize,
    /// Given up after lost connections.
    pub lost: usize,
    /// `OutcomeUnknown` answers over all attempts.
    pub unknown_answers: usize,
    /// Lost-connection answers over all attempts.
    pub lost_answers: usize,
    /// Contention refusals over all attempts.
    pub contended_answers: usize,
    /// Operations that failed at least once with a lost or unknown outcome and were retried to
    /// an ok with the same key.
    pub retried_to_ok: usize,
    /// Answers the workload never expects.
    pub unexpected: usize,
}

impl Summary {
    /// Counts `records`.
    pub fn of(records: &[Record]) -> Summary {
        let mut s = Summary {
            ops: records.len(),
            ..Summary::default()
        };
        for r in records {
            match r.outcome {
                Outcome::Ok(_) | Outcome::Held(_) => s.ok += 1,
                Outcome::Refused => s.refused += 1,
                Outcome::Unknown => s.unknown += 1,
                Outcome::Lost => s.lost += 1,
            }
            s.unknown_answers += r.unknowns as usize;
            s.lost_answers += r.lost as usize;
            s.contended_answers += r.contended as usize;
            if matches!(r.outcome, Outcome::Ok(_) | Outcome::Held(_)) && r.unknowns + r.lost > 0 {
                s.retried_to_ok += 1;
            }
            s.unexpected += usize::from(r.unexpected.is_some());
        }
        s
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "operations {} | ok {} | refused {} | unknown (given up) {} | lost (given up) {} | \
             OutcomeUnknown answers {} | ConnectionLost answers {} | contended {} | \
             retried to ok {} | unexpected {}",
            self.ops,
            self.ok,
            self.refused,
            self.unknown,
            self.lost,
            self.unknown_answers,
            self.lost_answers,
            self.contended_answers,
            self.retried_to_ok,
            self.unexpected
        )
    }
}

/// (id, user, coupon template, campaign) of an issued coupon.
type CouponRow = (i64, i64, i64, i64);

/// Checks the database against the history; returns every violation found (empty: none).
pub fn verify(conn: &mut MysqlConnection, setup: &Setup, records: &[Record]) -> Vec<String> {
    verify_partial(conn, setup, records, &[])
}

/// [`verify`] when the histories of the `missing` clients are not in `records` (a client that
/// never returned): journal entries under their keys and coupons of their users need no
/// record; every other check is the same.
pub fn verify_partial(
    conn: &mut MysqlConnection,
    setup: &Setup,
    records: &[Record],
    missing: &[Client],
) -> Vec<String> {
    let unrecorded_key = |key: &str| missing.iter().any(|c| is_key_of(&c.name, key));
    // Coupon users of a client are `user_base + 1, user_base + 2, ...` (below the next base).
    let unrecorded_user = |user: i64| {
        missing
            .iter()
            .any(|c| user > c.user_base && user <= c.user_base + USERS_PER_CLIENT)
    };
    let mut v: Vec<String> = Vec::new();
    let Snapshot {
        balances,
        history: journal,
    } = snapshot(conn);
    let campaigns = campaign_rows(conn);
    let coupons: Vec<CouponRow> = user_coupon::table
        .select((
            user_coupon::id,
            user_coupon::user_id,
            user_coupon::coupon_id,
            user_coupon::fcfs_coupon_id,
        ))
        .load(conn)
        .expect("read the issued coupons");

    // Balances: never negative, every account audits, money is conserved.
    let ledger = BalanceLedger::new();
    let mut balance_sum = Decimal::ZERO;
    for (user, balance, ..) in &balances {
        balance_sum += balance;
        if *balance < Decimal::ZERO {
            v.push(format!("account {user} is negative: {balance}"));
        }
        if let Err(e) = ledger.audit(conn, *user) {
            v.push(format!("audit of {user}: {e}"));
        }
    }
    // Each account against its own journal, read here rather than through `audit` (the code
    // under test): every entry's `balance_after` is the running sum of the account's entries
    // in journal order, and the last one is the balance.
    let mut running: HashMap<i64, Decimal> = HashMap::new();
    for (id, user, kind, amount, balance_after, ..) in &journal {
        let sign = match kind.as_str() {
            "charge" | "refund" | "transfer_in" => Decimal::ONE,
            "deduct" | "transfer_out" => Decimal::NEGATIVE_ONE,
            other => {
                v.push(format!(
                    "entry {id}: a {other} entry, which the workload never makes"
                ));
                continue;
            }
        };
        let sum = running.entry(*user).or_default();
        *sum += sign * amount;
        if balance_after != sum {
            v.push(format!(
                "account {user}: entry {id}'s balance_after is {balance_after}, its entries sum to {sum}"
            ));
        }
    }
    for (user, balance, ..) in &balances {
        let sum = running.get(user).copied().unwrap_or_default();
        if *balance != sum {
            v.push(format!(
                "account {user}: balance {balance}, its journal sums to {sum}"
            ));
        }
    }
    let mut by_kind: BTreeMap<&str, Decimal> = BTreeMap::new();
    let mut signed = Decimal::ZERO;
    for (_, _, kind, amount, ..) in &journal {
        *by_kind.entry(kind.as_str()).or_default() += amount;
        match kind.as_str() {
            "charge" | "refund" | "transfer_in" => signed += amount,
            _ => signed -= amount,
        }
    }
    let sum = |kind: &str| by_kind.get(kind).copied().unwrap_or_default();
    if balance_sum != signed {
        v.push(format!(
            "balances sum to {balance_sum}, the journal to {signed}"
        ));
    }
    let external = sum("charge") - sum("deduct") + sum("refund");
    if balance_sum != external {
        v.push(format!(
            "balances sum to {balance_sum}, but charges - deducts + refunds = {external}"
        ));
    }
    if sum("transfer_out") != sum("transfer_in") {
        v.push(format!(
            "transfers out {} != transfers in {}",
            sum("transfer_out"),
            sum("transfer_in")
        ));
    }
    let initial: Decimal = journal
        .iter()
        .filter(|r| r.5.as_deref().is_some_and(|k| is_key_of(SETUP_NAME, k)))
        .map(|r| r.3)
        .sum();
    if initial != INITIAL_BALANCE * Decimal::from(setup.accounts) {
        v.push(format!("initial charges sum to {initial}"));
    }

    // Transfers: both sides, always.
    let mut credits_of: HashMap<i64, Vec<&HistoryRow>> = HashMap::new();
    for row in journal.iter().filter(|r| r.2 == "transfer_in") {
        match row.7 {
            Some(debit) => credits_of.entry(debit).or_default().push(row),
            None => v.push(format!("received transfer {} has no sender", row.0)),
        }
    }
    for row in journal.iter().filter(|r| r.2 == "transfer_out") {
        let credits = credits_of.remove(&row.0).unwrap_or_default();
        let matches = credits.len() == 1
            && credits[0].3 == row.3
            && credits[0].1 == row.8.unwrap_or(0)
            && credits[0].8 == Some(row.1);
        if !matches {
            v.push(format!(
                "transfer {} has {} receiving sides",
                row.0,
                credits.len()
            ));
        }
    }
    for (debit, credits) in credits_of {
        v.push(format!(
            "{} received transfers point to {debit}, which is no sending entry",
            credits.len()
        ));
    }

    // The history: ok exactly once, refused and lost never, unknown at most once.
    let mut under_key: HashMap<(i64, &str), Vec<&HistoryRow>> = HashMap::new();
    for row in &journal {
        if let Some(key) = row.5.as_deref() {
            under_key.entry((row.1, key)).or_default().push(row);
        }
    }
    let mut coupon_of: HashMap<(i64, i64), Vec<&CouponRow>> = HashMap::new();
    for row in &coupons {
        coupon_of.entry((row.1, row.3)).or_default().push(row);
    }
    let template: HashMap<i64, i64> = campaigns.iter().map(|c| (c.0, c.1)).collect();
    let mut recorded_keys: HashSet<(i64, &str)> = HashSet::new();
    let mut recorded_users: HashSet<(i64, i64)> = HashSet::new();
    for r in records {
        if let Some(what) = &r.unexpected {
            v.push(format!("{}: unexpected answer {what}", r.key));
        }
        let (count, id_matches) = if let Op::Issue { user, campaign } = r.op {
            recorded_users.insert((user, campaign));
            let rows = coupon_of
                .get(&(user, campaign))
                .cloned()
                .unwrap_or_default();
            let id_ok = |id: i64| rows.iter().any(|row| row.0 == id);
            let ok = match r.outcome {
                Outcome::Ok(id) | Outcome::Held(id) => id_ok(id),
                _ => true,
            };
            (rows.len(), ok)
        } else {
            recorded_keys.insert((r.op.key_owner(), r.key.as_str()));
            let rows = under_key
                .get(&(r.op.key_owner(), r.key.as_str()))
                .cloned()
                .unwrap_or_default();
            // Whatever the answer, a row under the key is this operation's (an unknown outcome
            // applied as another amount, kind or link is as wrong as an `Ok` so applied).
            let ok = rows.iter().all(|row| row_is_op(row, &r.op))
                && match r.outcome {
                    Outcome::Ok(id) => rows.iter().any(|row| row.0 == id),
                    _ => true,
                };
            (rows.len(), ok)
        };
        let allowed = match r.outcome {
            Outcome::Ok(_) | Outcome::Held(_) => count == 1,
            Outcome::Refused => count == 0,
            Outcome::Lost if r.unknowns == 0 => count == 0,
            Outcome::Lost | Outcome::Unknown => count <= 1,
        };
        if !allowed || !id_matches {
            v.push(format!(
                "{} {:?} answered {:?} after {} attempts ({} unknown, {} lost), but the \
                 database holds {count} rows for it{}",
                r.key,
                r.op,
                r.outcome,
                r.attempts,
                r.unknowns,
                r.lost,
                if id_matches {
                    ""
                } else {
                    " (not the id answered)"
                }
            ));
        }
    }
    v.extend(impossible_balance_refusals(&journal, records));
    for row in &journal {
        if let Some(key) = row.5.as_deref() {
            if !is_key_of(SETUP_NAME, key)
                && !recorded_keys.contains(&(row.1, key))
                && !unrecorded_key(key)
            {
                v.push(format!("journal entry {} under unknown key {key}", row.0));
            }
        }
    }

    // Coupons: never over-issued, never twice to one user, every one asked for; and never
    // under-issued: the workload puts no stock back, so a campaign that answered `SoldOut`
    // (a refusal of an issue) has none left — a false sold-out mark (a stale zero read taken
    // for the stock) would leave coupons unsold.
    for (id, coupon, total, stock) in &campaigns {
        let issued = coupons.iter().filter(|c| c.3 == *id).count() as i64;
        if *stock < 0 || issued != i64::from(*total - *stock) || issued > i64::from(*total) {
            v.push(format!(
                "campaign {id} (coupon {coupon}): total {total}, stock {stock}, {issued} issued"
            ));
        }
        let sold_out = records.iter().find(|r| {
            matches!(r.op, Op::Issue { campaign, .. } if campaign == *id)
                && matches!(r.outcome, Outcome::Refused)
        });
        if let (Some(r), true) = (sold_out, *stock > 0) {
            v.push(format!(
                "campaign {id} answered {} ({:?}) SoldOut with {stock} coupons left",
                r.key, r.op
            ));
        }
        // The stock never rises: a coupon issued by a client's later call after that client
        // was answered `SoldOut` shows the answer false (also when others sold the rest out
        // afterwards, leaving no stock for the check above to see).
        let mut refused_at: HashMap<&str, (u64, &str)> = HashMap::new();
        for r in records {
            if let (Op::Issue { campaign, .. }, Outcome::Refused, Some((client, n))) =
                (&r.op, &r.outcome, client_order(&r.key))
            {
                if *campaign == *id {
                    let first = refused_at.entry(client).or_insert((n, &r.key));
                    if n < first.0 {
                        *first = (n, &r.key);
                    }
                }
            }
        }
        for r in records {
            if let (Op::Issue { campaign, .. }, Outcome::Ok(_), Some((client, n))) =
                (&r.op, &r.outcome, client_order(&r.key))
            {
                match refused_at.get(client) {
                    Some((first, refused)) if *campaign == *id && *first < n => v.push(format!(
                        "campaign {id} answered {refused} SoldOut, and then issued {} a coupon \
                         (its stock never rises)",
                        r.key
                    )),
                    _ => {}
                }
            }
        }
    }
    let mut holders: HashMap<(i64, i64), usize> = HashMap::new();
    for (id, user, coupon, campaign) in &coupons {
        *holders.entry((*user, *coupon)).or_default() += 1;
        if template.get(campaign) != Some(coupon) {
            v.push(format!("coupon {id} has the wrong template"));
        }
        if !recorded_users.contains(&(*user, *campaign)) && !unrecorded_user(*user) {
            v.push(format!("coupon {id} issued to {user}, who never asked"));
        }
    }
    for ((user, coupon), n) in holders {
        if n > 1 {
            v.push(format!("user {user} holds coupon {coupon} {n} times"));
        }
    }
    v
}

/// Whether the journal row `row` is what `op` writes: its kind and amount, and the account it
/// moved money to (a transfer) or the deduct it refunded (a refund).
/// A record key's client and its place in that client's history (`<client>-<n>`: a client
/// makes its calls one after another).
fn client_order(key: &str) -> Option<(&str, u64)> {
    let (client, n) = key.rsplit_once('-')?;
    Some((client, n.parse().ok()?))
}

fn row_is_op(row: &HistoryRow, op: &Op) -> bool {
    let linked = match *op {
        Op::Transfer { to, .. } => row.8 == Some(to),
        Op::Refund { deduct, .. } => row.7 == Some(deduct),
        Op::Charge { .. } | Op::Deduct { .. } | Op::Issue { .. } => true,
    };
    linked && row.3 == op_amount(op) && row.2 == op_kind(op)
}

fn op_amount(op: &Op) -> Decimal {
    match op {
        Op::Charge { amount, .. }
        | Op::Deduct { amount, .. }
        | Op::Refund { amount, .. }
        | Op::Transfer { amount, .. } => *amount,
        Op::Issue { .. } => Decimal::ZERO,
    }
}

fn op_kind(op: &Op) -> &'static str {
    match op {
        Op::Charge { .. } => "charge",
        Op::Deduct { .. } => "deduct",
        Op::Refund { .. } => "refund",
        Op::Transfer { .. } => "transfer_out",
        Op::Issue { .. } => "issue",
    }
}

/// How far apart two readings of the wall clock may be taken as the same moment: a journal
/// entry's time is read by lockstock (`created_at`, under the account's lock) and a call's by
/// the client, on the same machine.
const CLOCK_SLACK: chrono::TimeDelta = chrono::TimeDelta::milliseconds(100);

/// The refusals of `records` that no balance of the account allowed while the refused call
/// ran. A deduct or transfer refused for want of funds needs a balance of the sender below its
/// amount; a charge, or a transfer refused for the receiver's limit, one within the amount of
/// [`MAX_AMOUNT`] (a credit past it is refused `BalanceLimitExceeded`). An account's balance
/// at any moment after [`setup`] is one of its entries' `balance_after` (the workload places no
/// holds: all of it is available), and a refusal is decided with the account locked, during
/// the last call of its record ([`Record::last_call`]): every entry stamped before that call
/// began was committed by then (its transaction held the lock as it stamped it, and committed
/// before letting it go), and none stamped after the call answered was. So the balances that
/// call could have seen run from the last entry stamped before it began to the last stamped
/// before it answered ([`CLOCK_SLACK`] either side); a refusal that none of them allows was
/// decided on a balance the account did not have — an impossible one, or a stale one, from
/// before the call. (A record without its call's times is checked against every balance the
/// account ever had. A refund may be refused as beyond its deduct, which `execute` checks as
/// it is answered.)
fn impossible_balance_refusals(journal: &[HistoryRow], records: &[Record]) -> Vec<String> {
    // Each account's (stamp, balance after) in journal order.
    let mut entries: HashMap<i64, Vec<(NaiveDateTime, Decimal)>> = HashMap::new();
    for row in journal {
        entries.entry(row.1).or_default().push((row.10, row.4));
    }
    // (lowest, highest) balance of `user` a call made during `call` could have seen.
    let seen = |user: i64, call: Option<(NaiveDateTime, NaiveDateTime)>| {
        // (Each list has an entry: it was made by pushing one.)
        let Some(list) = entries.get(&user) else {
            return (Decimal::ZERO, Decimal::ZERO);
        };
        let (first, last) = match call {
            Some((called, answered)) => {
                // (Saturating at the ends of time: a parsed line may hold any time.)
                let before = called
                    .checked_sub_signed(CLOCK_SLACK)
                    .unwrap_or(NaiveDateTime::MIN);
                let after = answered
                    .checked_add_signed(CLOCK_SLACK)
                    .unwrap_or(NaiveDateTime::MAX);
                let first = list.iter().rposition(|(at, _)| *at < before).unwrap_or(0);
                let last = list
                    .iter()
                    .rposition(|(at, _)| *at <= after)
                    .unwrap_or(first)
                    .max(first);
                (first, last)
            }
            None => (0, list.len() - 1),
        };
        list[first..=last]
            .iter()
            .fold((Decimal::MAX, Decimal::MIN), |(low, high), (_, balance)| {
                (low.min(*balance), high.max(*balance))
            })
    };
    records
        .iter()
        .filter(|r| r.outcome == Outcome::Refused)
        .filter_map(|r| {
            let short = |user: i64, amount: Decimal| seen(user, r.last_call).0 < amount;
            let full = |user: i64, amount: Decimal| {
                seen(user, r.last_call)
                    .1
                    .checked_add(amount)
                    .is_none_or(|after| after > MAX_AMOUNT)
            };
            let wrong = match r.op {
                Op::Deduct { user, amount } => !short(user, amount),
                Op::Transfer { from, to, amount } => !short(from, amount) && !full(to, amount),
                Op::Charge { user, amount } => !full(user, amount),
                Op::Refund { .. } | Op::Issue { .. } => false,
            };
            wrong.then(|| {
                format!(
                    "{} {:?} was refused, but no balance the journal shows for the time of its \
                     call ({:?}) allowed the refusal",
                    r.key, r.op, r.last_call
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A refusal decided on a balance the account had only BEFORE the refused call began (a
    /// stale one) is reported; one that a balance of its call's time allows is not; a record
    /// without its call's times is checked against every balance, as before. Negative control
    /// of the check: before it took the call's times, the stale refusal passed (the account
    /// had once been at 0).
    #[test]
    fn a_refusal_on_a_balance_from_before_its_call_is_reported() {
        let start = crate::fixtures::micros_to_time(1_800_000_000_000_000);
        let at = |millis: i64| start + chrono::TimeDelta::milliseconds(millis);
        let entry = |id: i64, balance: i64, stamped: i64| -> HistoryRow {
            (
                id,
                7,
                "charge".to_owned(),
                Decimal::ONE,
                Decimal::new(balance, 0),
                Some(format!("k{id}")),
                "0000000000000000".to_owned(),
                None,
                None,
                Decimal::ZERO,
                at(stamped),
                None,
            )
        };
        // 100 from the start, 0 after one second, 100 again after two.
        let journal = vec![entry(1, 100, 0), entry(2, 0, 1_000), entry(3, 100, 2_000)];
        let refused = |key: &str, call: Option<(i64, i64)>| Record {
            outcome: Outcome::Refused,
            last_call: call.map(|(called, answered)| (at(called), at(answered))),
            ..Record::new(
                key.to_owned(),
                Op::Deduct {
                    user: 7,
                    amount: Decimal::new(50, 0),
                },
            )
        };
        let records = [
            // Called at 2.5 s: the balance was 100 all along — refused on the stale 0.
            refused("stale", Some((2_500, 2_600))),
            // Called at 1.2 s: the balance was 0.
            refused("then-empty", Some((1_200, 1_300))),
            // Called as the balance went from 0 to 100: either may have been seen.
            refused("across", Some((1_950, 2_050))),
            // Without its call's times: the account was at 0 once.
            refused("untimed", None),
        ];
        let found = impossible_balance_refusals(&journal, &records);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].starts_with("stale "), "{found:?}");
        // A history line keeps the call's times.
        let line = records[0].to_string();
        let back: Record = line.parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back.last_call, records[0].last_call, "{line}");
        let untimed: Record = records[3]
            .to_string()
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(untimed.last_call, None);
    }

    /// A history line cut anywhere inside its call's times is not read as a record (before,
    /// 15 such prefixes parsed, answered in 1970, and the balance check then judged the call
    /// against the balances before it only); a line at either end of time is checked without
    /// a panic (before: `NaiveDateTime - TimeDelta` overflowed).
    #[test]
    fn a_line_cut_in_its_times_is_no_record_and_no_time_panics_the_check() {
        let timed = Record {
            outcome: Outcome::Refused,
            last_call: Some((
                crate::fixtures::micros_to_time(1_800_000_000_123_456),
                crate::fixtures::micros_to_time(1_800_000_000_125_956),
            )),
            ..Record::new(
                "c0-5".to_owned(),
                Op::Deduct {
                    user: 1,
                    amount: Decimal::new(500, 2),
                },
            )
        };
        let line = timed.to_string();
        let untimed = line.len() - " 1800000000123456 1800000000125956".len();
        // (Cut right after `false `, it is the untimed line.)
        for cut in untimed + 2..line.len() {
            let prefix = &line[..cut];
            assert!(prefix.parse::<Record>().is_err(), "{prefix:?} parsed");
        }
        assert_eq!(
            line[..untimed].parse::<Record>().map(|r| r.last_call),
            Ok(None)
        );
        let (earliest, latest) = (
            NaiveDateTime::MIN.and_utc().timestamp_micros(),
            NaiveDateTime::MAX.and_utc().timestamp_micros(),
        );
        for times in [
            format!("{earliest} {earliest}"),
            format!("{latest} {latest}"),
        ] {
            let line = format!("k-0 deduct 7 0 50 refused 0 1 0 0 0 false {times}");
            let record = line
                .parse::<Record>()
                .unwrap_or_else(|e| panic!("{line}: {e}"));
            let journal = vec![(
                1,
                7,
                "charge".to_owned(),
                Decimal::ONE,
                Decimal::ZERO,
                Some("k".to_owned()),
                "0000000000000000".to_owned(),
                None,
                None,
                Decimal::ZERO,
                crate::fixtures::micros_to_time(0),
                None,
            )];
            let found = impossible_balance_refusals(&journal, &[record]);
            assert!(found.len() <= 1, "{found:?}");
        }
    }

    /// A missing client's keys are only its own: `verify_partial` skipped every key that began
    /// with `<name>-`, so client `a` missing hid unknown keys of a present client `a-b`.
    #[test]
    fn a_missing_clients_keys_are_only_its_own() {
        assert!(is_key_of("a", "a-0") && is_key_of("a", "a-17") && is_key_of("a-b", "a-b-3"));
        for key in ["a-b-0", "a-", "a-x", "a0", "ab-0", "b-0", "init-1", "a-1 "] {
            assert!(!is_key_of("a", key), "{key}");
        }
    }

    /// A client named so that its keys would not read back (whitespace) or would be the
    /// setup's (`init`) is refused before it runs anything: `verify` reported violations that
    /// were not there (client `init`'s `init-1` is the setup's charge of account 1).
    #[test]
    fn a_client_name_that_keys_cannot_carry_is_refused() {
        for name in ["init", "", "worker 1", "tab\t", "nbsp\u{a0}x"] {
            let setup = Setup {
                accounts: 1,
                campaigns: Vec::new(),
            };
            let client = Client::new(
                "mysql://nobody@127.0.0.1:1/none",
                name.to_owned(),
                0,
                &setup,
                1,
                &ErrorTexts::default(),
            );
            let stop = AtomicBool::new(false);
            let ran = std::panic::catch_unwind(|| run_client(&client, &stop, &mut |_| true));
            assert!(ran.is_err(), "{name:?} was run");
        }
        assert!(is_client_name("c0") && is_client_name("p1c2") && is_client_name("initial"));
    }

    /// A client whose server is down stops retrying its connection once the run's stop flag
    /// is set: it gives its operation up (lost) instead of reconnecting for the 90 s budget.
    /// Before the fix it took the whole budget to return.
    #[test]
    fn a_client_whose_server_is_down_stops_with_the_run() {
        let (_conn, mut client) = one_account_client("testkit_workload_down", "down");
        // A port nothing listens on (bound, then let go).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or_else(|e| panic!("a free port: {e}"));
        client.url = format!("mysql://root@127.0.0.1:{port}/nowhere");
        let stop = AtomicBool::new(false);
        let started = Instant::now();
        let records = std::thread::scope(|s| {
            let running = s.spawn(|| run_client(&client, &stop, &mut |_| true));
            std::thread::sleep(Duration::from_millis(300));
            stop.store(true, Ordering::Relaxed);
            // Bounded: a client that ignores the flag is reported, not waited for (the
            // scope still joins it).
            while !running.is_finished() && started.elapsed() < Duration::from_secs(20) {
                std::thread::sleep(Duration::from_millis(20));
            }
            assert!(
                running.is_finished(),
                "the client still runs {:?} after the stop",
                started.elapsed()
            );
            running
                .join()
                .unwrap_or_else(|_| panic!("the client panicked"))
        });
        assert_eq!(records.len(), 1, "{records:?}");
        assert_eq!(records[0].outcome, Outcome::Lost, "{records:?}");
        assert!(records[0].lost > 0, "{records:?}");
    }

    /// A fresh database `name` with one funded account, and a client `client` of it.
    fn one_account_client(name: &str, client: &str) -> (MysqlConnection, Client) {
        let (url, mut conn) = crate::fixtures::fresh_database(name);
        let setup = setup(&mut conn, 1, 0, 1);
        let client = Client::new(&url, client.into(), 0, &setup, 1, &ErrorTexts::default());
        (conn, client)
    }

    /// A deduct, transfer or charge answered as refused for the balance, although no balance
    /// the account ever had allowed that refusal, is found by `verify`; refusals that some
    /// balance allowed are not. Before the fix every such refusal was taken on trust.
    #[test]
    fn a_balance_refusal_that_no_balance_allowed_is_found() {
        let (_, mut conn) = crate::fixtures::fresh_database("testkit_workload_balance_refused");
        let setup = setup(&mut conn, 2, 0, 1);
        let ledger = BalanceLedger::new();
        // Account 1 goes down to 400.00 and back (its lowest balance), account 2 stays at 1000.
        for (amount, key) in [(-60_000, "dip"), (60_000, "back")] {
            let amount = Decimal::new(amount, 2);
            let applied = if amount.is_sign_negative() {
                ledger.deduct(&mut conn, 1, -amount, key)
            } else {
                ledger.charge(&mut conn, 1, amount, key)
            };
            if let Err(e) = applied {
                panic!("{key}: {e}");
            }
        }
        let refused = |key: &str, op: Op| {
            let mut record = Record::new(key.into(), op);
            record.outcome = Outcome::Refused;
            record.attempts = 1;
            record
        };
        let cents = |c: i64| Decimal::new(c, 2);
        let impossible = [
            refused(
                "lie-deduct",
                Op::Deduct {
                    user: 1,
                    amount: cents(40_000),
                },
            ),
            refused(
                "lie-transfer",
                Op::Transfer {
                    from: 2,
                    to: 1,
                    amount: cents(100_000),
                },
            ),
            refused(
                "lie-charge",
                Op::Charge {
                    user: 2,
                    amount: cents(100),
                },
            ),
        ];
        let possible = [
            refused(
                "true-deduct",
                Op::Deduct {
                    user: 1,
                    amount: cents(40_001),
                },
            ),
            refused(
                "true-transfer",
                Op::Transfer {
                    from: 2,
                    to: 1,
                    amount: cents(100_001),
                },
            ),
            refused(
                "true-charge",
                Op::Charge {
                    user: 2,
                    amount: MAX_AMOUNT,
                },
            ),
        ];
        let mut records = vec![
            applied_record(
                "dip",
                Op::Deduct {
                    user: 1,
                    amount: cents(60_000),
                },
                &mut conn,
            ),
            applied_record(
                "back",
                Op::Charge {
                    user: 1,
                    amount: cents(60_000),
                },
                &mut conn,
            ),
        ];
        records.extend(possible);
        assert_eq!(verify(&mut conn, &setup, &records), Vec::<String>::new());
        records.extend(impossible);
        let found = verify(&mut conn, &setup, &records);
        assert_eq!(found.len(), 3, "{found:?}");
        for key in ["lie-deduct", "lie-transfer", "lie-charge"] {
            assert!(
                found.iter().any(|f| f.starts_with(&format!("{key} "))),
                "{key}: {found:?}"
            );
        }
    }

    /// The record of `op`, applied under `key` by the test itself: `Ok` with its entry.
    fn applied_record(key: &str, op: Op, conn: &mut MysqlConnection) -> Record {
        let user = op.key_owner();
        let id: i64 = lockstock::schema::balance_history::table
            .filter(lockstock::schema::balance_history::user_id.eq(user))
            .filter(lockstock::schema::balance_history::idempotency_key.eq(key))
            .select(lockstock::schema::balance_history::id)
            .first(conn)
            .unwrap_or_else(|e| panic!("{key}: {e}"));
        let mut record = Record::new(key.into(), op);
        record.outcome = Outcome::Ok(id);
        record.attempts = 1;
        record
    }

    /// A refund refused as beyond its deduct while the deduct had room for it (a refusal made
    /// on a stale refunded amount, say) is an unexpected answer; one refused for want of room
    /// is not. Before the fix every such refusal was taken on trust.
    #[test]
    fn a_refund_refused_with_room_left_is_unexpected() {
        let (mut conn, client) = one_account_client("testkit_workload_refund_refused", "refunds");
        let ledger = BalanceLedger::new();
        let issuer = CouponIssuer::new();
        let deduct = match ledger.deduct(&mut conn, 1, Decimal::new(500, 2), "refunds-deduct") {
            Ok(entry) => entry.id,
            Err(e) => panic!("a deduct: {e}"),
        };
        if let Err(e) = ledger.refund(&mut conn, deduct, Decimal::new(300, 2), "refunds-first") {
            panic!("a first refund: {e}");
        }
        // 2.00 of 5.00 left: a refund of 2.00 has room (the lie), one of 2.01 has not (true).
        for (cents, lie) in [(200, true), (201, false)] {
            let mut refusing = |c: &mut MysqlConnection, key: &str, op: &Op| match op {
                Op::Refund { amount, .. } if lie => Err(Error::RefundExceedsDeduct {
                    entry_id: deduct,
                    deducted: Decimal::new(500, 2),
                    refunded: Decimal::new(400, 2),
                    requested: *amount,
                }),
                _ => call(&ledger, &issuer, c, key, op),
            };
            let (mut own, mut rng) = (None, Rng::new(7));
            let record = execute(
                (&client, &AtomicBool::new(false)),
                &mut refusing,
                &mut own,
                &mut rng,
                format!("refunds-{cents}"),
                Op::Refund {
                    user: 1,
                    deduct,
                    amount: Decimal::new(cents, 2),
                },
                &mut |_| true,
            );
            assert_eq!(record.outcome, Outcome::Refused, "{record:?}");
            assert_eq!(
                record.unexpected.is_some(),
                lie,
                "{cents} (lying: {lie}): {record:?}"
            );
        }
    }

    /// A ledger call that answers "nothing applied" (`Contended`, a lost connection, ...)
    /// although its change was committed is found at once, before the next attempt — which
    /// answers the committed entry under the same key, as if it had applied it, so that the
    /// history would show one `Ok` and one entry. Before the fix such a call passed every
    /// check (the key was looked at only through the final answer).
    #[test]
    fn a_ledger_change_answered_nothing_applied_but_committed_is_unexpected() {
        let (_conn, client) = one_account_client("testkit_workload_lying_answer", "lying");
        let ledger = BalanceLedger::new();
        let issuer = CouponIssuer::new();
        for (lie, kind) in [(true, "charge"), (false, "charge")] {
            let mut lied = false;
            let mut lying = |c: &mut MysqlConnection, key: &str, op: &Op| {
                let answer = call(&ledger, &issuer, c, key, op);
                match answer {
                    Ok(_) if lie && !std::mem::replace(&mut lied, true) => Err(Error::Timeout {
                        elapsed: Duration::from_millis(1),
                    }),
                    answer => answer,
                }
            };
            let (mut side, mut rng) = (None, Rng::new(7));
            let record = execute(
                (&client, &AtomicBool::new(false)),
                &mut lying,
                &mut side,
                &mut rng,
                format!("lying-{lie}"),
                Op::Charge {
                    user: 1,
                    amount: Decimal::ONE,
                },
                &mut |_| true,
            );
            assert!(
                matches!(record.outcome, Outcome::Ok(_)),
                "{kind}: {record:?}"
            );
            assert_eq!(
                record.unexpected.is_some(),
                lie,
                "{kind} (lying: {lie}): {record:?}"
            );
        }
    }

    /// A record with everything but its key, operation and outcome zero.
    fn record(key: &str, op: Op, outcome: Outcome) -> Record {
        Record {
            outcome,
            unknowns: u32::from(matches!(outcome, Outcome::Unknown)),
            attempts: 1,
            ..Record::new(key.into(), op)
        }
    }

    /// A client answered `SoldOut` that later gets a coupon of the same campaign was answered
    /// falsely (the stock never rises) — also when the stock is sold out by the end, where the
    /// check of the stock left sees nothing. Before the fix such a history passed.
    #[test]
    fn a_sold_out_answer_before_the_clients_own_later_issue_is_a_violation() {
        let (_, mut conn) = crate::fixtures::fresh_database("testkit_workload_false_sold_out");
        let setup = setup(&mut conn, 0, 1, 2);
        let campaign = setup.campaigns[0];
        let issuer = CouponIssuer::new();
        let mut issued = |user: i64| match issuer.issue(&mut conn, user, campaign) {
            Ok(coupon) => Outcome::Ok(coupon.id),
            Err(e) => panic!("an issue to {user}: {e}"),
        };
        let issue = |user: i64| Op::Issue { user, campaign };
        let (second, third) = (issued(102), issued(103));
        let sold_out = issuer.issue(&mut conn, 104, campaign);
        assert!(
            matches!(sold_out, Err(Error::SoldOut { .. })),
            "{sold_out:?}"
        );
        // Refused first, then two coupons: the refusal was false.
        let lying = [
            record("c-0", issue(101), Outcome::Refused),
            record("c-1", issue(102), second),
            record("c-2", issue(103), third),
        ];
        let found = verify(&mut conn, &setup, &lying);
        assert!(
            found.iter().any(|v| v.contains("answered c-0 SoldOut")),
            "{found:?}"
        );
        // Refused after the two coupons (the same rows): true.
        let honest = [
            record("c-0", issue(102), second),
            record("c-1", issue(103), third),
            record("c-2", issue(104), Outcome::Refused),
        ];
        assert_eq!(verify(&mut conn, &setup, &honest), Vec::<String>::new());
    }

    /// A row under a key whose call answered `OutcomeUnknown` must be that call's: applied as
    /// another amount it is a violation. Before the fix only the number of such rows was
    /// checked.
    #[test]
    fn an_unknown_outcome_applied_as_another_operation_is_a_violation() {
        let (_, mut conn) = crate::fixtures::fresh_database("testkit_workload_unknown_rows");
        let setup = setup(&mut conn, 1, 0, 1);
        let ledger = BalanceLedger::new();
        if let Err(e) = ledger.deduct(&mut conn, 1, Decimal::new(5000, 2), "t0-0") {
            panic!("a deduct: {e}");
        }
        let deduct = |cents| Op::Deduct {
            user: 1,
            amount: Decimal::new(cents, 2),
        };
        let wrong = [record("t0-0", deduct(500), Outcome::Unknown)];
        let found = verify(&mut conn, &setup, &wrong);
        assert!(found.iter().any(|v| v.contains("t0-0")), "{found:?}");
        let right = [record("t0-0", deduct(5000), Outcome::Unknown)];
        assert_eq!(verify(&mut conn, &setup, &right), Vec::<String>::new());
    }

    /// A record round-trips through its line; a line that is not a record's (truncated, an
    /// unknown kind or outcome, a field too many) is an error, not a panic.
    #[test]
    fn history_lines() {
        let record = Record {
            key: "k3-17".into(),
            op: Op::Transfer {
                from: 1,
                to: 2,
                amount: Decimal::new(125, 2),
            },
            outcome: Outcome::Ok(42),
            attempts: 3,
            unknowns: 1,
            lost: 0,
            contended: 2,
            unexpected: None,
            last_call: None,
        };
        let line = record.to_string();
        assert_eq!(line.parse::<Record>().map(|r| r.to_string()), Ok(line));
        let called = crate::fixtures::micros_to_time(1_800_000_000_123_456);
        let timed = Record {
            last_call: Some((called, called + chrono::TimeDelta::microseconds(2_500))),
            ..record
        };
        let line = timed.to_string();
        assert!(
            line.ends_with(" 1800000000123456 1800000000125956"),
            "{line}"
        );
        assert_eq!(line.parse::<Record>().map(|r| r.to_string()), Ok(line));
        for bad in [
            "",
            "k deduct 1",
            "k steal 1 0 5 ok 1 1 0 0 0 false",
            "k deduct 1 0 5 maybe 1 1 0 0 0 false",
            "k deduct 1 0 5 ok 1 1 0 0 0 false extra",
            "k deduct 1 0 5 ok 1 1 0 0 0 false 1 x",
            "k deduct 1 0 5 ok 1 1 0 0 0 false 1 2 3",
        ] {
            assert_eq!(
                bad.parse::<Record>().err(),
                Some(BadRecord(bad.to_owned())),
                "{bad:?}"
            );
        }
    }
}
