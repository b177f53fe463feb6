//! Flash sale: 64 threads send 10,000 coupon requests from 8,000 users (2,000 of them ask twice)
//! for a campaign of 1,000 coupons, while 4 more threads charge, deduct and transfer the
//! balances of 200 other accounts. Afterwards every figure that matters is counted from the
//! database: coupons issued, over-issue, users holding two, stock + issued == total, and a
//! ledger audit of every account plus money conservation.
//!
//! The sale runs twice on campaigns of the same size with the same request order: first with
//! one transaction per request (`CouponIssuer::issue`, each thread on its own connection), then
//! combined (`CombiningIssuer` over a pool of 8), one line each and the speed-up (time until
//! the last coupon was issued). Both runs' campaigns are counted from the database and checked
//! the same way; the summary and the final `flash-sale:` line are those of the combined run,
//! which the ledger threads run beside.
//!
//! `make demo` or `cargo run --release --example flash_sale`
//!
//! Uses the throwaway MariaDB (or the server of `DATABASE_URL`); the example's own database
//! `lockstock_flash_sale` is dropped and recreated on every run. `FLASH_SALE_SEED` replays a
//! request order. Exits non-zero if, in either run, issued != 1000, anything was over-issued, a
//! user holds two coupons or the threads were answered other issues than the database holds,
//! or if the ledger does not add up.

use std::collections::BTreeMap;
use std::error::Error as StdError;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration as StdDuration, Instant};

use chrono::{Duration, Utc};
use diesel::connection::SimpleConnection;
use diesel::dsl::sum;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};
use diesel::sql_types::BigInt;
use lockstock::schema::{fcfs_coupon, user_balance, user_coupon};
use lockstock::CombiningIssuer;
use lockstock::{
    BalanceLedger, CouponIssuer, Discount, Error, NewCampaign, NewCoupon, SessionSettings,
    TxnPolicy,
};
use rust_decimal::Decimal;

type BoxError = Box<dyn StdError + Send + Sync>;

const DATABASE: &str = "lockstock_flash_sale";
const STOCK: u32 = 1_000;
const USERS: i64 = 8_000;
const TWICE: usize = 2_000;
const ISSUE_THREADS: usize = 64;
const LEDGER_THREADS: usize = 4;
const LEDGER_USERS: i64 = 200;
/// Ledger account ids: 1_000_001 ..= 1_000_200 (a separate table from coupon users anyway).
const LEDGER_BASE: i64 = 1_000_000;
const LEDGER_OPS_PER_USER: u64 = 8;
/// Connections of the combined run's pool.
const POOL_SIZE: u32 = 8;
const DEFAULT_SEED: u64 = 0x5EED_F1A5;

/// Joins the `what` threads, handing each one's stats to `merge` and noting in `failures` the
/// threads that failed or panicked.
fn join_into<S>(
    handles: Vec<thread::JoinHandle<Result<S, BoxError>>>,
    what: &str,
    failures: &mut Vec<String>,
    mut merge: impl FnMut(S),
) {
    for handle in handles {
        match handle.join() {
            Ok(Ok(stats)) => merge(stats),
            Ok(Err(e)) => failures.push(format!("{what} thread failed: {e}")),
            Err(_) => failures.push(format!("{what} thread panicked")),
        }
    }
}

fn main() -> Result<(), BoxError> {
    let seed = std::env::var("FLASH_SALE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SEED);
    let url = fresh_database()?;
    let mut conn = MysqlConnection::establish(&url)?;

    let issuer = Arc::new(CouponIssuer::new());
    let ledger = Arc::new(BalanceLedger::new());
    let now = Utc::now().naive_utc();
    let coupon = issuer.create_coupon(
        &mut conn,
        &NewCoupon {
            name: "Flash sale: 5,000 off",
            discount: Discount::Fixed(Decimal::new(5_000, 0)),
            valid_from: now - Duration::minutes(1),
            valid_until: now + Duration::days(7),
        },
    )?;
    let sale = NewCampaign {
        coupon_id: coupon.id,
        quantity: STOCK,
        issue_starts_at: now - Duration::seconds(1),
        issue_ends_at: now + Duration::hours(1),
    };
    let campaign = issuer.create_campaign(&mut conn, &sale)?;
    // The per-request run's campaign: the same size, the same requests, its own issuer — and
    // its own coupon template (a user holds one coupon of a template: with a shared one, the
    // first run's winners would be refused as holders in the second).
    let single_issuer = Arc::new(CouponIssuer::new());
    let single_coupon = single_issuer.create_coupon(
        &mut conn,
        &NewCoupon {
            name: "Flash sale: 5,000 off (per-request run)",
            discount: Discount::Fixed(Decimal::new(5_000, 0)),
            valid_from: now - Duration::minutes(1),
            valid_until: now + Duration::days(7),
        },
    )?;
    let single_campaign = single_issuer.create_campaign(
        &mut conn,
        &NewCampaign {
            coupon_id: single_coupon.id,
            ..sale
        },
    )?;

    let requests = Arc::new(request_order(seed));
    println!(
        "flash sale: campaign {} ({} coupons of {:?}), {} requests from {} users ({} ask twice), \
         {} issue threads; {} ledger threads on {} accounts; seed {seed}",
        campaign.id,
        STOCK,
        coupon.name,
        requests.len(),
        USERS,
        TWICE,
        ISSUE_THREADS,
        LEDGER_THREADS,
        LEDGER_USERS
    );

    let mut failures: Vec<String> = Vec::new();
    // One transaction per request, each thread on its own connection.
    let single = {
        let barrier = Arc::new(Barrier::new(ISSUE_THREADS + 1));
        let threads = issue_threads(&requests, &barrier, || {
            let (url, issuer) = (url.clone(), single_issuer.clone());
            move || -> Result<_, BoxError> {
                let mut conn = MysqlConnection::establish(&url)?;
                Ok(move |user| issuer.issue(&mut conn, user, single_campaign.id))
            }
        });
        barrier.wait();
        let started = Instant::now();
        let mut stats = IssueStats::default();
        join_into(threads, "per-request issue", &mut failures, |s| {
            stats.merge(s)
        });
        stats.finish(started)
    };
    println!("{}", single.line("per-request"));
    // Its campaign counted from the database, as the combined run's is below.
    let single_counted = Counted::read(&mut conn, single_campaign.id, single_coupon.id)?;
    println!("{:<12} {}", "", single_counted.line(single.stats.issued));

    // Combined: every thread through one CombiningIssuer; the ledger threads beside it.
    let pool = Pool::builder()
        .max_size(POOL_SIZE)
        .connection_customizer(Box::new(SessionSettings::new(TxnPolicy::default())))
        .build(ConnectionManager::<MysqlConnection>::new(url.clone()))?;
    let hot = Arc::new(CombiningIssuer::new(pool, CouponIssuer::new()));
    let barrier = Arc::new(Barrier::new(ISSUE_THREADS + LEDGER_THREADS + 1));
    let issue_threads = issue_threads(&requests, &barrier, || {
        let hot = hot.clone();
        move || -> Result<_, BoxError> { Ok(move |user| hot.issue(user, campaign.id)) }
    });
    let ledger_threads: Vec<_> = (0..LEDGER_THREADS)
        .map(|t| {
            let (url, ledger, barrier) = (url.clone(), ledger.clone(), barrier.clone());
            thread::spawn(move || -> Result<LedgerStats, BoxError> {
                let conn = MysqlConnection::establish(&url);
                barrier.wait();
                ledger_workload(&ledger, &mut conn?, t, seed)
            })
        })
        .collect();

    barrier.wait();
    let started = Instant::now();
    let mut issue = IssueStats::default();
    join_into(issue_threads, "issue", &mut failures, |stats| {
        issue.merge(stats)
    });
    let issue = issue.finish(started);
    let elapsed = issue.elapsed;
    println!("{}", issue.line("combining"));
    println!(
        "speed-up: combining issued the {STOCK} coupons {:.1}x as fast as one transaction per \
         request ({} ms vs {} ms until the last one)",
        single.sold_out.as_secs_f64() / issue.sold_out.as_secs_f64().max(1e-9),
        issue.sold_out.as_millis(),
        single.sold_out.as_millis()
    );
    // The speed-up compares the same work: both runs issued the whole stock.
    let single_others: u64 = single.stats.others.values().sum();
    if single.stats.issued != u64::from(STOCK) || single_others > 0 {
        failures.push(format!(
            "the per-request run issued {} of {STOCK} coupons ({single_others} requests failed \
             unexpectedly: {:?}): the speed-up compares different work",
            single.stats.issued, single.stats.others
        ));
    }
    let IssueRun { mut stats, .. } = issue;
    let issue = &mut stats;
    let mut money = LedgerStats::default();
    join_into(ledger_threads, "ledger", &mut failures, |stats| {
        money.merge(stats)
    });
    let ledger_elapsed = started.elapsed();

    // ---- Counted from the database ----------------------------------------------------------
    let counted = Counted::read(&mut conn, campaign.id, coupon.id)?;
    let Counted {
        rows,
        total,
        stock,
        duplicate_users,
    } = counted;
    let over_issued = counted.over_issued();
    let issued = rows;

    // ---- Ledger: audit every account, and money is conserved ---------------------------------
    let (mut consistent, mut audit_failures) = (0u32, Vec::new());
    for user in LEDGER_BASE + 1..=LEDGER_BASE + LEDGER_USERS {
        match ledger.audit(&mut conn, user) {
            // An inconsistent account is `Err(Error::AuditFailed(report))`.
            Ok(_) => consistent += 1,
            Err(Error::AuditFailed(report)) => {
                audit_failures.push(format!("user {user}: {:?}", report.problems));
            }
            Err(e) => audit_failures.push(format!("user {user}: {e}")),
        }
    }
    let balances: Option<Decimal> = user_balance::table
        .filter(user_balance::user_id.between(LEDGER_BASE + 1, LEDGER_BASE + LEDGER_USERS))
        .select(sum(user_balance::balance))
        .first(&mut conn)?;
    let balances = balances.unwrap_or_default();
    let expected_balances = money.charged - money.deducted;

    // ---- Summary ------------------------------------------------------------------------------
    let requests_sent = issue.latencies_us.len();
    println!();
    println!("coupon requests, as answered to the threads (latency of the issue call, ms):");
    println!(
        "  {:<16} {:>6} {:>9} {:>9} {:>9}",
        "", "count", "p50", "p99", "max"
    );
    let row = |name: &str, latencies: &mut Vec<u64>| {
        latencies.sort_unstable();
        println!(
            "  {name:<16} {:>6} {:>9} {:>9} {:>9}",
            latencies.len(),
            ms(percentile(latencies, 50.0)),
            ms(percentile(latencies, 99.0)),
            ms(latencies.last().copied().unwrap_or(0))
        );
    };
    for (outcome, latencies) in issue.outcomes.iter_mut() {
        row(outcome, latencies);
    }
    row("all", &mut issue.latencies_us);
    println!(
        "  throughput: {:.0} requests/s ({requests_sent} in {} ms; sold-out answers come from \
         the issuer's cache once it has seen the stock at 0)",
        requests_sent as f64 / elapsed.as_secs_f64().max(1e-9),
        elapsed.as_millis()
    );
    println!("from the database:");
    println!(
        "  user_coupon rows {issued:>6} (threads saw {} issued)",
        issue.issued
    );
    println!(
        "  stock left       {stock:>6} (stock + rows = {} of total {total})",
        i64::from(stock) + rows
    );
    println!("  over-issued      {over_issued:>6}");
    println!("  users with two   {duplicate_users:>6}");
    println!(
        "ledger ({LEDGER_USERS} accounts, {} ms):",
        ledger_elapsed.as_millis()
    );
    for (outcome, n) in &money.outcomes {
        println!("  {outcome:<26} {n:>5}");
    }
    println!(
        "  idempotent replays returning the same entry: {} of {}",
        money.replays_same, money.replays
    );
    println!(
        "  charged {} - deducted {} = {expected_balances}; balances in the database sum to {balances}",
        money.charged, money.deducted
    );
    println!(
        "  audit: {consistent} of {LEDGER_USERS} accounts consistent{}",
        if audit_failures.is_empty() {
            String::new()
        } else {
            format!(", {} FAILED", audit_failures.len())
        }
    );
    for failure in audit_failures.iter().take(10) {
        println!("    {failure}");
    }
    let others: u64 = issue.others.values().sum();
    if others > 0 {
        println!("other issue errors ({others}):");
        for (kind, n) in &issue.others {
            println!("  {kind}: {n}");
        }
    }
    for failure in &failures {
        println!("error: {failure}");
    }
    println!();
    println!(
        "flash-sale: stock={STOCK} requests={requests_sent} issued={issued} sold_out={} \
         already_issued={} contended={} over_issued={over_issued} duplicate_users={duplicate_users} \
         elapsed_ms={}",
        issue.count("sold_out"),
        issue.count("already_issued"),
        issue.count("contended"),
        elapsed.as_millis()
    );

    let mut problems = failures;
    problems.extend(counted.problems("combined", issue.issued));
    problems.extend(single_counted.problems("per-request", single.stats.issued));
    if others > 0 {
        problems.push(format!("{others} issue requests failed unexpectedly"));
    }
    if !audit_failures.is_empty() || consistent != LEDGER_USERS as u32 {
        problems.push(format!("{} ledger audits failed", audit_failures.len()));
    }
    if balances != expected_balances {
        problems.push(format!(
            "money not conserved: balances {balances}, expected {expected_balances}"
        ));
    }
    if money.replays_same != money.replays {
        problems.push("an idempotent replay applied a change twice".into());
    }
    if money.unexpected > 0 {
        problems.push(format!(
            "{} ledger calls failed unexpectedly",
            money.unexpected
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; ").into())
    }
}

/// Starts the issue threads: each runs its `setup` (made by `make`: e.g. connecting), waits at
/// `barrier`, then sends the next request of `requests` until none are left.
fn issue_threads<S, F>(
    requests: &Arc<Vec<i64>>,
    barrier: &Arc<Barrier>,
    mut make: impl FnMut() -> S,
) -> Vec<thread::JoinHandle<Result<IssueStats, BoxError>>>
where
    S: FnOnce() -> Result<F, BoxError> + Send + 'static,
    F: FnMut(i64) -> Result<lockstock::IssuedCoupon, Error>,
{
    let next = Arc::new(AtomicUsize::new(0));
    (0..ISSUE_THREADS)
        .map(|_| {
            let setup = make();
            let (requests, next, barrier) = (requests.clone(), next.clone(), barrier.clone());
            thread::spawn(move || -> Result<IssueStats, BoxError> {
                let issue = setup();
                barrier.wait();
                let mut issue = issue?;
                let mut stats = IssueStats::default();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&user) = requests.get(i) else {
                        return Ok(stats);
                    };
                    let started = Instant::now();
                    let result = issue(user);
                    stats.record(result, started);
                }
            })
        })
        .collect()
}

/// The example's database, dropped and recreated, with the migrations applied.
fn fresh_database() -> Result<String, BoxError> {
    let url = lockstock_testkit::sandbox::database_url(DATABASE)?;
    let mut conn = MysqlConnection::establish(&url)?;
    conn.batch_execute(&format!(
        "DROP DATABASE IF EXISTS `{DATABASE}`; \
         CREATE DATABASE `{DATABASE}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci; \
         USE `{DATABASE}`"
    ))?;
    lockstock::run_migrations(&mut conn)?;
    Ok(url)
}

/// Users 1..=8000 once each, 2,000 of them (chosen at random) a second time, shuffled.
fn request_order(seed: u64) -> Vec<i64> {
    let mut rng = Rng(seed);
    let mut users: Vec<i64> = (1..=USERS).collect();
    rng.shuffle(&mut users);
    let mut requests = users.clone();
    requests.extend_from_slice(&users[..TWICE]);
    rng.shuffle(&mut requests);
    requests
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// A campaign's coupons as the database holds them.
#[derive(Clone, Copy)]
struct Counted {
    /// user_coupon rows of the campaign.
    rows: i64,
    total: i32,
    stock: i32,
    /// Users holding two or more coupons of the campaign's template.
    duplicate_users: i64,
}

impl Counted {
    fn read(
        conn: &mut MysqlConnection,
        campaign_id: i64,
        coupon_id: i64,
    ) -> Result<Self, BoxError> {
        let rows: i64 = user_coupon::table
            .filter(user_coupon::fcfs_coupon_id.eq(campaign_id))
            .count()
            .get_result(conn)?;
        let (total, stock): (i32, i32) = fcfs_coupon::table
            .find(campaign_id)
            .select((fcfs_coupon::total_quantity, fcfs_coupon::stock_quantity))
            .first(conn)?;
        let duplicate_users = diesel::sql_query(
            "SELECT COUNT(*) AS n FROM (SELECT user_id FROM user_coupon WHERE coupon_id = ? \
             GROUP BY user_id HAVING COUNT(*) > 1) AS twice",
        )
        .bind::<BigInt, _>(coupon_id)
        .get_result::<Count>(conn)?
        .n;
        Ok(Self {
            rows,
            total,
            stock,
            duplicate_users,
        })
    }

    fn over_issued(&self) -> i64 {
        (self.rows - i64::from(self.total)).max(0)
    }

    /// One line: the counts, against the issues the threads were answered (`seen`).
    fn line(&self, seen: u64) -> String {
        format!(
            "from the database: {} rows (threads saw {seen} issued), stock {} + rows = {} of \
             total {}, over-issued {}, users with two {}",
            self.rows,
            self.stock,
            i64::from(self.stock) + self.rows,
            self.total,
            self.over_issued(),
            self.duplicate_users
        )
    }

    /// What is wrong with the `run`'s campaign, whose threads were answered `seen` issues.
    fn problems(&self, run: &str, seen: u64) -> Vec<String> {
        let mut problems = Vec::new();
        if self.rows != i64::from(STOCK) {
            problems.push(format!("{run} run: issued {}, expected {STOCK}", self.rows));
        }
        if self.over_issued() != 0
            || i64::from(self.stock) + self.rows != i64::from(self.total)
            || self.stock < 0
        {
            problems.push(format!(
                "{run} run: stock accounting: rows {} + stock {} vs total {}",
                self.rows, self.stock, self.total
            ));
        }
        if self.duplicate_users != 0 {
            problems.push(format!(
                "{run} run: {} users hold two coupons",
                self.duplicate_users
            ));
        }
        if u64::try_from(self.rows).ok() != Some(seen) {
            problems.push(format!(
                "{run} run: threads saw {seen} issued, the database holds {}",
                self.rows
            ));
        }
        problems
    }
}

#[derive(Default)]
struct IssueStats {
    issued: u64,
    /// When the last coupon was issued.
    last_issued: Option<Instant>,
    /// Latencies (µs) of the calls, per outcome.
    outcomes: BTreeMap<&'static str, Vec<u64>>,
    others: BTreeMap<String, u64>,
    latencies_us: Vec<u64>,
}

impl IssueStats {
    fn record(&mut self, result: Result<lockstock::IssuedCoupon, Error>, started: Instant) {
        let latency_us = micros(started.elapsed());
        let outcome = match result {
            Ok(_) => {
                self.issued += 1;
                self.last_issued = Some(Instant::now());
                "issued"
            }
            Err(Error::SoldOut { .. }) => "sold_out",
            Err(Error::AlreadyIssued { .. }) => "already_issued",
            Err(Error::Contended { .. }) => "contended",
            Err(other) => {
                *self.others.entry(error_kind(&other)).or_default() += 1;
                "other"
            }
        };
        self.outcomes.entry(outcome).or_default().push(latency_us);
        self.latencies_us.push(latency_us);
    }

    fn count(&self, outcome: &str) -> usize {
        self.outcomes.get(outcome).map_or(0, Vec::len)
    }

    fn merge(&mut self, other: IssueStats) {
        self.issued += other.issued;
        self.last_issued = self.last_issued.max(other.last_issued);
        for (k, latencies) in other.outcomes {
            self.outcomes.entry(k).or_default().extend(latencies);
        }
        for (k, n) in other.others {
            *self.others.entry(k).or_default() += n;
        }
        self.latencies_us.extend(other.latencies_us);
    }
}

impl IssueStats {
    /// The run that started at `started` and has just ended.
    fn finish(self, started: Instant) -> IssueRun {
        IssueRun {
            elapsed: started.elapsed(),
            sold_out: self.last_issued.map_or(StdDuration::ZERO, |at| {
                at.saturating_duration_since(started)
            }),
            stats: self,
        }
    }
}

/// One run of the sale: its answers and times.
struct IssueRun {
    stats: IssueStats,
    /// Until every thread had its last answer.
    elapsed: StdDuration,
    /// Until the last coupon was issued.
    sold_out: StdDuration,
}

impl IssueRun {
    /// The run's one-line summary.
    fn line(&self, name: &str) -> String {
        let issued = self.stats.issued;
        format!(
            "{name:<12} issued {issued} in {} ms ({:.0} coupons/s); {} requests answered in {} ms, \
             p99 {} ms, {} contended",
            self.sold_out.as_millis(),
            issued as f64 / self.sold_out.as_secs_f64().max(1e-9),
            self.stats.latencies_us.len(),
            self.elapsed.as_millis(),
            ms(percentile_of(&self.stats.latencies_us, 99.0)),
            self.stats.count("contended")
        )
    }
}

/// The `p`-th percentile of unsorted `values`.
fn percentile_of(values: &[u64], p: f64) -> u64 {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    percentile(&sorted, p)
}

#[derive(Default)]
struct LedgerStats {
    outcomes: BTreeMap<&'static str, u64>,
    charged: Decimal,
    deducted: Decimal,
    replays: u64,
    replays_same: u64,
    unexpected: u64,
}

impl LedgerStats {
    fn tally(&mut self, name: &'static str) {
        *self.outcomes.entry(name).or_default() += 1;
    }

    /// Counts a refusal; anything but a typed refusal or contention is unexpected.
    fn refused(&mut self, op: &'static str, error: &Error) {
        match error {
            Error::InsufficientBalance { .. } => self.tally(match op {
                "deduct" => "deduct refused (balance)",
                _ => "transfer refused (balance)",
            }),
            Error::Contended { .. } => self.tally("contended"),
            other => {
                eprintln!("ledger {op}: unexpected {other}");
                self.unexpected += 1;
                self.tally("unexpected error");
            }
        }
    }

    fn merge(&mut self, other: LedgerStats) {
        for (k, n) in other.outcomes {
            *self.outcomes.entry(k).or_default() += n;
        }
        self.charged += other.charged;
        self.deducted += other.deducted;
        self.replays += other.replays;
        self.replays_same += other.replays_same;
        self.unexpected += other.unexpected;
    }
}

/// Thread `t` owns 50 accounts: charges each, then deducts and transfers (to any of the 200
/// accounts, so threads contend on each other's rows) in interleaved rounds.
fn ledger_workload(
    ledger: &BalanceLedger,
    conn: &mut MysqlConnection,
    t: usize,
    seed: u64,
) -> Result<LedgerStats, BoxError> {
    let mut rng = Rng(seed ^ (0xA5A5_0000 + t as u64));
    let mut stats = LedgerStats::default();
    let mine: Vec<i64> = (LEDGER_BASE + 1..=LEDGER_BASE + LEDGER_USERS)
        .filter(|u| (u - LEDGER_BASE - 1) as usize % LEDGER_THREADS == t)
        .collect();
    for &user in &mine {
        let amount = Decimal::new(1_000, 0);
        match ledger.charge(conn, user, amount, "initial-charge") {
            Ok(_) => {
                stats.charged += amount;
                stats.tally("charge ok");
            }
            Err(e) => stats.refused("charge", &e),
        }
    }
    for round in 0..LEDGER_OPS_PER_USER {
        for &user in &mine {
            if rng.below(2) == 0 {
                let amount = Decimal::new(50 + rng.below(351) as i64, 0);
                let key = format!("deduct-{round}");
                match ledger.deduct(conn, user, amount, &key) {
                    Ok(entry) => {
                        stats.deducted += amount;
                        stats.tally("deduct ok");
                        if round == 0 {
                            // A client retry with the same key: the same entry, nothing applied.
                            match ledger.deduct(conn, user, amount, &key) {
                                Ok(again) => {
                                    stats.replays += 1;
                                    if again.id == entry.id {
                                        stats.replays_same += 1;
                                    }
                                }
                                Err(e) => stats.refused("deduct", &e),
                            }
                        }
                    }
                    Err(e) => stats.refused("deduct", &e),
                }
            } else {
                let mut to = LEDGER_BASE + 1 + rng.below(LEDGER_USERS as u64) as i64;
                if to == user {
                    to = LEDGER_BASE + 1 + (to - LEDGER_BASE) % LEDGER_USERS;
                }
                let amount = Decimal::new(50 + rng.below(251) as i64, 0);
                match ledger.transfer(conn, user, to, amount, &format!("transfer-{round}")) {
                    Ok(_) => stats.tally("transfer ok"),
                    Err(e) => stats.refused("transfer", &e),
                }
            }
        }
    }
    Ok(stats)
}

fn error_kind(error: &Error) -> String {
    let debug = format!("{error:?}");
    let end = debug
        .find(|c: char| !c.is_alphanumeric() && c != '_')
        .unwrap_or(debug.len());
    format!("{} ({error})", &debug[..end])
}

fn micros(d: StdDuration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn ms(us: u64) -> String {
    format!("{:.3}", us as f64 / 1_000.0)
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// splitmix64: a small seeded generator, enough to shuffle requests reproducibly.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform enough in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Fisher-Yates.
    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}
