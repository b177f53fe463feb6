//! `lockstock::route::Router` on a throwaway 3-node MariaDB Galera cluster: clients on all
//! nodes through several routers agree on one writer, and the writer killed, frozen or cut off
//! from the Primary component is failed over under load, with every acknowledged operation
//! applied exactly once, identical tables on all nodes afterwards and no call past its deadline
//! plus grace plus 1 s.
//!
//! The tests share ONE cluster (a `static`; the testkit's watchdog removes it when the test
//! process ends), healed at the start of each test (nodes resumed, restarted, synced); each test
//! has its own database, so its designated-writer row is its own. They hold `exclusive()`: they
//! assert deadlines and load both cores.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Nullable, Text, Unsigned};
use lockstock::combine::CombiningIssuer;
use lockstock::route::{ReadConsistency, Router};
use lockstock::schema::designated_writer;
use lockstock::{AccountOp, BalanceLedger, CouponIssuer, Deadline, Error, TxnPolicy};
use rust_decimal::Decimal;

use lockstock_testkit::fixtures::{count_key, exclusive, policy_with_deadline};
use lockstock_testkit::galera::{GaleraCluster, StuckMajority};
use lockstock_testkit::rng::Rng;
use lockstock_testkit::workload::{setup, verify, Op, Outcome, Record, Setup, Summary};

/// The deadline of every client call.
const DEADLINE: Duration = Duration::from_secs(3);
/// What a call may take at most: its deadline, the policy's grace for a silent server, and 1 s
/// of scheduling slack on two busy cores.
fn call_bound() -> Duration {
    DEADLINE + TxnPolicy::default().unresponsive_grace + Duration::from_secs(1)
}

/// How long one operation keeps being retried (with its key) before the client gives up on it.
const OP_BUDGET: Duration = Duration::from_secs(30);

static CLUSTER: Mutex<Option<GaleraCluster>> = Mutex::new(None);

/// The shared cluster, started on first use, with every node running, unpaused and synced
/// (a new one if an earlier test left it broken).
pub(crate) fn cluster() -> MutexGuard<'static, Option<GaleraCluster>> {
    let mut guard = CLUSTER.lock().unwrap_or_else(PoisonError::into_inner);
    let healed = guard.as_mut().is_some_and(|cluster| {
        (0..cluster.nodes()).all(|node| {
            if cluster.is_paused(node) {
                return cluster.resume(node).is_ok();
            }
            match cluster.pid(node) {
                Some(_) => true,
                None => cluster.restart(node).is_ok(),
            }
        }) && cluster.wait_cluster_synced(Duration::from_secs(40)).is_ok()
            // A test that set a node read-only, or renamed it, may have failed before turning
            // it back.
            && (0..cluster.nodes()).all(|node| {
                MysqlConnection::establish(&cluster.url(node, ""))
                    .map_err(|e| e.to_string())
                    .and_then(|mut conn| {
                        conn.batch_execute(&format!(
                            "SET GLOBAL read_only = 0; SET GLOBAL wsrep_node_name = 'node{node}'"
                        ))
                        .map_err(|e| e.to_string())
                    })
                    .is_ok()
            })
    });
    if !healed {
        *guard = None; // drop a broken one first
        let started = Instant::now();
        let cluster = GaleraCluster::builder()
            .nodes(3)
            .fast_eviction()
            .start()
            .expect("start cluster");
        eprintln!("cluster started in {:?}", started.elapsed());
        *guard = Some(cluster);
    }
    guard
}

/// A connection whose reads wait until the node applied every earlier commit.
fn causal(url: &str) -> MysqlConnection {
    let mut conn = MysqlConnection::establish(url).unwrap_or_else(|e| panic!("connect {url}: {e}"));
    conn.batch_execute("SET SESSION wsrep_sync_wait = 1")
        .expect("wsrep_sync_wait");
    conn
}

/// A fresh database on the cluster with lockstock's schema; its URLs by node.
fn database(cluster: &GaleraCluster, name: &str) -> Vec<String> {
    let urls = cluster.create_database(name).expect("database");
    let mut conn = causal(&urls[0]);
    conn.batch_execute(&format!(
        "DROP DATABASE `{name}`; CREATE DATABASE `{name}`; USE `{name}`"
    ))
    .expect("recreate database");
    lockstock::run_migrations(&mut conn).expect("migrate");
    urls
}

/// `count` routers; router `r` lists the nodes starting at node `r`, so each would pick
/// another writer if the designated-writer row did not make them agree.
fn routers(urls: &[String], count: usize) -> Vec<Arc<Router>> {
    let probe = policy_with_deadline(Duration::from_secs(1));
    (0..count)
        .map(|r| {
            let rotated = (0..urls.len()).map(|i| urls[(r + i) % urls.len()].clone());
            let router = Router::builder(rotated)
                .pool_size(4)
                .health_interval(Duration::from_millis(200))
                .probe_policy(probe.clone())
                .read_consistency(ReadConsistency::Causal)
                .build()
                .expect("router");
            router
                .wait_for_writer(Duration::from_secs(20))
                .expect("a writer");
            Arc::new(router)
        })
        .collect()
}

/// One router over `urls` with `pool_size` connections per pool, probing every `interval`
/// (1 s probe deadline, causal reads), once it has a writer; and that writer.
fn router_with(urls: &[String], pool_size: u32, interval: Duration) -> (Arc<Router>, usize) {
    let router = Router::builder(urls.to_vec())
        .pool_size(pool_size)
        .health_interval(interval)
        .probe_policy(policy_with_deadline(Duration::from_secs(1)))
        .read_consistency(ReadConsistency::Causal)
        .build()
        .expect("router");
    let writer = router
        .wait_for_writer(Duration::from_secs(20))
        .expect("a writer");
    (Arc::new(router), writer)
}

/// Turns `read_only` off again on the node of this URL (an admin's) when dropped, however the
/// test that set it ends.
struct Writable(String);

impl Drop for Writable {
    fn drop(&mut self) {
        if let Ok(mut conn) = MysqlConnection::establish(&self.0) {
            let _ = conn.batch_execute("SET GLOBAL read_only = 0");
        }
    }
}

/// A read through `router` within `deadline`: the name of the node that served it.
fn served_by(router: &Router, deadline: Duration) -> Result<String, Error> {
    router.read(Deadline::after(deadline), |conn, _| {
        Ok(
            diesel::select(diesel::dsl::sql::<Text>("CAST(@@wsrep_node_name AS CHAR)"))
                .get_result::<String>(conn)?,
        )
    })
}

/// The designated-writer row (node name, epoch), read causally on `url`.
fn designated(url: &str) -> (String, i64) {
    designated_writer::table
        .select((designated_writer::node_name, designated_writer::epoch))
        .first(&mut causal(url))
        .expect("designated writer row")
}

/// The cluster node index behind a node name (the testkit names them `node<i>`).
fn node_index(name: &str) -> usize {
    name.trim_start_matches("node")
        .parse()
        .expect("a testkit node name")
}

/// Asserts that every router writes to the node the row names.
fn assert_agree(routers: &[Arc<Router>], url: &str) -> String {
    let (name, epoch) = designated(url);
    for (r, router) in routers.iter().enumerate() {
        let stats = router.stats();
        assert_eq!(
            stats.writer_name.as_deref(),
            Some(name.as_str()),
            "router {r} writes elsewhere than the row (epoch {epoch}): {stats:?}"
        );
    }
    name
}

/// What a client hands back: its history and its slowest call.
struct ClientRun {
    records: Vec<Record>,
    /// Per record: when its final answer came.
    answered_at: Vec<Instant>,
    slowest: Duration,
    slowest_what: String,
    /// Attempts answered `ServerUnresponsive` or `OutcomeUnknown` after their whole deadline:
    /// calls that met a node which stopped answering (and were cut off by the watchdog).
    cut_off: usize,
}

/// The operation mix of a client.
#[derive(Clone, Copy)]
enum Mix {
    /// Transfers between the accounts (the total never changes) and coupon issues.
    Bank,
    /// Charges, deducts, transfers and coupon issues.
    Mixed,
}

/// Runs operations through `router` (ledger calls) and `hot` (issues, combined through the
/// same router) until `stop` is set or `max_ops` are done. Every operation is retried with its
/// key after a retryable answer until it has a definitive one (or `OP_BUDGET` runs out).
#[allow(clippy::too_many_arguments)]
fn run_client(
    name: &str,
    number: i64,
    router: &Router,
    hot: &CombiningIssuer,
    setup: &Setup,
    mix: Mix,
    stop: &AtomicBool,
    max_ops: usize,
) -> ClientRun {
    let ledger = BalanceLedger::new();
    let mut rng = Rng::new(0x5eed ^ number as u64);
    let accounts = setup.accounts as u64;
    let mut run = ClientRun {
        records: Vec::new(),
        answered_at: Vec::new(),
        slowest: Duration::ZERO,
        slowest_what: String::new(),
        cut_off: 0,
    };
    let mut next_user = 1_000_000 * (number + 1);
    while run.records.len() < max_ops && !stop.load(Ordering::Relaxed) {
        let amount = Decimal::new(rng.below(2_000) as i64 + 1, 2);
        let user = 1 + rng.below(accounts) as i64;
        let roll = rng.below(100);
        let op = match (mix, roll) {
            (_, 0..=29) => {
                next_user += 1;
                let campaign = setup.campaigns[rng.below(setup.campaigns.len() as u64) as usize];
                Op::Issue {
                    user: next_user,
                    campaign,
                }
            }
            (Mix::Mixed, 30..=49) => Op::Charge { user, amount },
            (Mix::Mixed, 50..=69) => Op::Deduct { user, amount },
            _ => Op::Transfer {
                from: user,
                to: 1 + (user + rng.below(accounts - 1) as i64) % accounts as i64,
                amount,
            },
        };
        let mut record = Record::new(format!("{name}-{}", run.records.len()), op);
        let started = Instant::now();
        // A ledger answer that said nothing was applied (with no attempt of unknown outcome
        // before it): its key must have no entry, checked before the next attempt, which would
        // answer the entry as if it had applied it (as the testkit's workload checks).
        let mut unapplied: Option<String> = None;
        record.outcome = loop {
            // Only while no attempt since has an unknown outcome (which may have written it).
            if let Some(answer) = unapplied.take().filter(|_| record.unknowns == 0) {
                let owner = record.op.key_owner();
                let entries = router.read(Deadline::after(DEADLINE), |conn, _| {
                    Ok(lockstock_testkit::workload::entries_under(
                        conn,
                        owner,
                        &record.key,
                    )?)
                });
                match entries {
                    Ok(0) => {}
                    Ok(entries) => {
                        record.unexpected.get_or_insert(format!(
                            "{answer}, which says that nothing was applied, yet the key has \
                             {entries} entries"
                        ));
                    }
                    // Not readable now: before the next attempt.
                    Err(_) => unapplied = Some(answer),
                }
            }
            if started.elapsed() > OP_BUDGET {
                break if record.unknowns > 0 {
                    Outcome::Unknown
                } else {
                    Outcome::Lost
                };
            }
            record.attempts += 1;
            let at = Instant::now();
            let answer = call(router, hot, &ledger, &record.key, &record.op);
            let took = at.elapsed();
            if took > run.slowest {
                run.slowest = took;
                run.slowest_what =
                    format!("{} attempt {}: {answer:?}", record.key, record.attempts);
            }
            let error = match answer {
                Ok(id) => break Outcome::Ok(id),
                Err(error) => error,
            };
            if took >= DEADLINE
                && (error.is_outcome_unknown() || matches!(error, Error::ServerUnresponsive { .. }))
            {
                run.cut_off += 1;
            }
            let says_nothing_applied = !error.is_outcome_unknown()
                && (matches!(error, Error::Contended { .. } | Error::Timeout { .. })
                    || error.is_retryable());
            if says_nothing_applied
                && record.unknowns == 0
                && !matches!(record.op, Op::Issue { .. })
            {
                unapplied = Some(format!("{error:?}"));
            }
            match (&record.op, &error) {
                (_, e) if e.is_outcome_unknown() => record.unknowns += 1,
                (_, Error::Contended { .. } | Error::Timeout { .. }) => record.contended += 1,
                // Nothing applied (a node failure the router could not recover in time).
                (_, e) if e.is_retryable() => record.lost += 1,
                (Op::Issue { .. }, Error::AlreadyIssued { user_coupon_id, .. })
                    if record.unknowns > 0 =>
                {
                    break Outcome::Held(*user_coupon_id)
                }
                (Op::Issue { .. }, Error::SoldOut { .. }) if record.unknowns > 0 => {
                    break Outcome::Unknown
                }
                (Op::Issue { .. }, Error::SoldOut { .. })
                | (_, Error::InsufficientBalance { .. }) => break Outcome::Refused,
                _ => {
                    record.unexpected = Some(format!("{error:?}"));
                    break if record.unknowns > 0 {
                        Outcome::Unknown
                    } else {
                        Outcome::Lost
                    };
                }
            }
            thread::sleep(Duration::from_millis(5));
        };
        run.records.push(record);
        run.answered_at.push(Instant::now());
    }
    run
}

/// One attempt of `op` under `key` with a fresh deadline.
fn call(
    router: &Router,
    hot: &CombiningIssuer,
    ledger: &BalanceLedger,
    key: &str,
    op: &Op,
) -> Result<i64, Error> {
    let deadline = Deadline::after(DEADLINE);
    match *op {
        Op::Issue { user, campaign } => Ok(hot.issue(user, campaign)?.id),
        Op::Charge { user, amount } => router.write(deadline, |conn, deadline| {
            Ok(ledger.charge_by(conn, user, amount, key, deadline)?.id)
        }),
        Op::Deduct { user, amount } => router.write(deadline, |conn, deadline| {
            Ok(ledger.deduct_by(conn, user, amount, key, deadline)?.id)
        }),
        Op::Transfer { from, to, amount } => router.write(deadline, |conn, deadline| {
            Ok(ledger
                .transfer_by(conn, from, to, amount, key, deadline)?
                .debit
                .id)
        }),
        Op::Refund { deduct, amount, .. } => router.write(deadline, |conn, deadline| {
            Ok(ledger.refund_by(conn, deduct, amount, key, deadline)?.id)
        }),
    }
}

/// Runs `per_router` clients on each router until `during` returns (it gets the start time),
/// then stops them; returns their runs.
fn load(
    routers: &[Arc<Router>],
    per_router: usize,
    setup: &Setup,
    mix: Mix,
    max_ops: usize,
    during: impl FnOnce(),
) -> Vec<ClientRun> {
    let stop = AtomicBool::new(false);
    let issuers: Vec<CombiningIssuer> = routers
        .iter()
        .map(|router| CombiningIssuer::routed(router.clone(), CouponIssuer::new()))
        .collect();
    thread::scope(|s| {
        let _stop_on_drop = crate::StopOnDrop(&stop);
        let clients: Vec<_> = (0..routers.len() * per_router)
            .map(|n| {
                let (router, hot) = (&routers[n % routers.len()], &issuers[n % routers.len()]);
                let stop = &stop;
                s.spawn(move || {
                    let name = format!("c{n}");
                    run_client(&name, n as i64, router, hot, setup, mix, stop, max_ops)
                })
            })
            .collect();
        let during = std::panic::catch_unwind(std::panic::AssertUnwindSafe(during));
        stop.store(true, Ordering::Relaxed);
        let runs = clients
            .into_iter()
            .map(|c| c.join().expect("client panicked"))
            .collect();
        if let Err(panic) = during {
            std::panic::resume_unwind(panic);
        }
        runs
    })
}

#[derive(QueryableByName, Debug, PartialEq, Eq)]
struct TableChecksum {
    #[diesel(sql_type = Text, column_name = "Table")]
    table: String,
    #[diesel(sql_type = Nullable<Unsigned<BigInt>>, column_name = "Checksum")]
    checksum: Option<u64>,
}

/// `CHECKSUM TABLE` of every lockstock table on the node at `url`, after it applied every
/// earlier commit.
fn checksums(url: &str) -> Vec<TableChecksum> {
    let mut conn = causal(url);
    // A causal read first: CHECKSUM TABLE itself does not wait.
    let _ = designated_writer::table
        .count()
        .get_result::<i64>(&mut conn)
        .expect("causal read");
    diesel::sql_query(
        "CHECKSUM TABLE user_balance, balance_history, coupon, fcfs_coupon, user_coupon, \
         fcfs_coupon_restock, designated_writer",
    )
    .load(&mut conn)
    .expect("checksum")
}

/// After the load: the cluster synced, the history checker passes, the three nodes hold the
/// same tables, and no call took longer than its deadline plus grace plus 1 s. Returns all
/// records.
fn assert_converged(
    cluster: &mut GaleraCluster,
    urls: &[String],
    setup: &Setup,
    runs: &[ClientRun],
) -> Vec<Record> {
    cluster
        .wait_cluster_synced(Duration::from_secs(60))
        .expect("cluster synced");
    let records: Vec<Record> = runs.iter().flat_map(|r| r.records.clone()).collect();
    eprintln!("  {}", Summary::of(&records));
    let violations = verify(&mut causal(&urls[0]), setup, &records);
    assert!(violations.is_empty(), "history violations: {violations:#?}");
    let first = checksums(&urls[0]);
    assert!(first.iter().all(|t| t.checksum.is_some()), "{first:?}");
    for (node, url) in urls.iter().enumerate().skip(1) {
        assert_eq!(checksums(url), first, "node {node} differs from node 0");
    }
    let slowest = runs
        .iter()
        .max_by_key(|r| r.slowest)
        .expect("at least one client");
    eprintln!(
        "  slowest call {:?}: {}",
        slowest.slowest, slowest.slowest_what
    );
    assert!(
        slowest.slowest <= call_bound(),
        "a call took {:?} (bound {:?}): {}",
        slowest.slowest,
        call_bound(),
        slowest.slowest_what
    );
    records
}

/// Clients on all three nodes' routers (each listing the nodes from another one) agree on one
/// writer; transfers and a flash sale through them keep every invariant, and all nodes end up
/// with identical tables.
#[test]
fn galera_router_bank_and_flash_sale() {
    let _guard = exclusive();
    let started = Instant::now();
    let mut guard = cluster();
    let cluster = guard.as_mut().expect("cluster");
    let urls = database(cluster, "gal_route_bank");
    let setup = setup(&mut causal(&urls[0]), 8, 2, 40);
    let routers = routers(&urls, 3);
    let writer = assert_agree(&routers, &urls[0]);
    eprintln!("routers agree on {writer} after {:?}", started.elapsed());
    // Two URLs that reach the same node (the port is ignored next to a socket) are refused.
    let same = urls[0].replacen("@localhost/", "@localhost:3306/", 1);
    let refused = Router::builder([urls[0].clone(), same, urls[1].clone()]).build();
    assert!(
        matches!(refused, Err(Error::InvalidInput { .. })),
        "{refused:?}"
    );

    let runs = load(&routers, 2, &setup, Mix::Bank, 60, || {
        thread::sleep(Duration::from_secs(4))
    });
    let records = assert_converged(cluster, &urls, &setup, &runs);

    // One writer throughout: claimed once, never moved.
    assert_eq!(designated(&urls[0]), (writer.clone(), 1));
    assert_agree(&routers, &urls[0]);
    for router in &routers {
        assert_eq!(router.stats().failovers, 0, "{:?}", router.stats());
    }
    // Money only moved: the total is what the setup charged.
    let ledger = BalanceLedger::new();
    let total: Decimal = (1..=setup.accounts)
        .map(|user| {
            routers[0]
                .read(Deadline::after(DEADLINE), |conn, _| {
                    ledger.balance(conn, user)
                })
                .expect("balance")
                .balance
        })
        .sum();
    let initial = lockstock_testkit::workload::INITIAL_BALANCE * Decimal::from(setup.accounts);
    assert_eq!(total, initial, "money conserved");
    let sold = records
        .iter()
        .filter(|r| matches!((&r.op, r.outcome), (Op::Issue { .. }, Outcome::Ok(_))))
        .count();
    let refused = records
        .iter()
        .filter(|r| matches!((&r.op, r.outcome), (Op::Issue { .. }, Outcome::Refused)))
        .count();
    eprintln!("  flash sale: {sold} issued, {refused} sold out");
    assert!(sold <= 80, "over-issued: {sold}");
    assert!(
        records
            .iter()
            .filter(|r| matches!(r.outcome, Outcome::Ok(_)))
            .count()
            > 50,
        "too little got through"
    );
    eprintln!(
        "galera_router_bank_and_flash_sale took {:?}",
        started.elapsed()
    );
}

/// The failover tests' common part: load through two routers, `fault` on the writer (its
/// cluster index) after 1.5 s, load on for `after` (and until the routers moved, up to 20 s
/// more, or 60 s while the survivors have no Primary component), every router on another
/// writer, then
/// `heal` (still under load); afterwards every check of [`assert_converged`] and calls
/// acknowledged after the fault — and, where the fault `freezes` the writer, calls cut off
/// there: at least one attempt answered `ServerUnresponsive` or `OutcomeUnknown` after its
/// whole deadline (a call in flight on the frozen node, or sent there before the router knew).
fn fails_over(
    database_name: &str,
    fault: impl FnOnce(&mut GaleraCluster, usize),
    after: Duration,
    heal: impl FnOnce(&mut GaleraCluster, usize),
    freezes: bool,
) {
    let _guard = exclusive();
    let started = Instant::now();
    let mut guard = cluster();
    let cluster = guard.as_mut().expect("cluster");
    let urls = database(cluster, database_name);
    let setup = setup(&mut causal(&urls[0]), 8, 2, 200);
    let routers = routers(&urls, 2);
    let writer_name = assert_agree(&routers, &urls[0]);
    let writer = node_index(&writer_name);
    let survivor = &urls[(writer + 1) % urls.len()];

    let mut fault_at = None;
    let mut after_fault_writer = String::new();
    let runs = load(&routers, 2, &setup, Mix::Mixed, usize::MAX, || {
        thread::sleep(Duration::from_millis(1500));
        fault(cluster, writer);
        fault_at = Some(Instant::now());
        eprintln!("  fault on {writer_name} at {:?}", started.elapsed());
        thread::sleep(after);
        // Failover within a fixed time is no promise (eviction, then an election, on loaded
        // cores): wait for it, up to 20 s more, before checking — and, where the cluster
        // itself has no Primary component of the survivors yet (on loaded cores they have
        // been seen to suspect each other after a `kill -9` and stay non-Primary for more
        // than 20 s), until it has one, up to 60 s: no router can fail over before.
        let waiting = Instant::now();
        let survivors_primary = |cluster: &GaleraCluster| {
            (0..cluster.nodes())
                .filter(|node| *node != writer)
                .all(|node| {
                    cluster
                        .status(node)
                        .is_ok_and(|status| status.cluster_status == "Primary")
                })
        };
        // Survivors that see each other but stay non-Primary (Galera failed to agree on the
        // view change) are bootstrapped, as `wait_cluster_synced` does: the faulty node is
        // killed, frozen or cut off, and cannot be Primary beside them.
        let survivors: Vec<usize> = (0..cluster.nodes()).filter(|n| *n != writer).collect();
        let mut stuck = StuckMajority::default();
        while waiting.elapsed() < Duration::from_secs(60)
            && !routers.iter().all(|router| {
                let stats = router.stats();
                stats.failovers >= 1
                    && stats.writer_name.as_deref() != Some(writer_name.as_str())
                    && stats.writer_name.is_some()
            })
            && (waiting.elapsed() < Duration::from_secs(20) || !survivors_primary(cluster))
        {
            stuck.watch(cluster, &survivors);
            thread::sleep(Duration::from_millis(100));
        }
        let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            failed_over(&routers, &writer_name, survivor)
        }));
        // Healed under load, also after a failed check: the clients' calls in flight on a
        // frozen node end here at the latest, so a missing deadline mechanism fails the bound
        // below instead of hanging the test.
        heal(cluster, writer);
        match checked {
            Ok(writer) => after_fault_writer = writer,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    });
    let fault_at = fault_at.expect("the fault ran");
    let after_fault = runs
        .iter()
        .flat_map(|r| r.records.iter().zip(&r.answered_at))
        .filter(|(record, at)| **at > fault_at && matches!(record.outcome, Outcome::Ok(_)))
        .count();
    eprintln!("  {after_fault} operations acknowledged after the fault, on {after_fault_writer}");
    assert!(after_fault > 0, "calls did not continue on a new writer");
    let cut_off: usize = runs.iter().map(|run| run.cut_off).sum();
    eprintln!("  {cut_off} attempts cut off after their deadline");
    if freezes {
        assert!(
            cut_off > 0,
            "no call met the frozen writer: the test did not exercise the watchdog"
        );
    }

    assert_converged(cluster, &urls, &setup, &runs);
    eprintln!("{database_name} took {:?}", started.elapsed());
}

/// Every router writes to another node than `faulty`, failed over at least once, and all agree
/// with the designated-writer row (read on `survivor`), which moved; returns the new writer.
fn failed_over(routers: &[Arc<Router>], faulty: &str, survivor: &str) -> String {
    for (r, router) in routers.iter().enumerate() {
        let stats = router.stats();
        eprintln!("  router {r}: {stats:?}");
        assert_ne!(
            stats.writer_name.as_deref(),
            Some(faulty),
            "router {r} still writes to the faulty node"
        );
        assert!(stats.failovers >= 1, "router {r}: {stats:?}");
    }
    let writer = assert_agree(routers, survivor);
    let (_, epoch) = designated(survivor);
    assert!(
        epoch >= 2,
        "the row moved by compare-and-set: epoch {epoch}"
    );
    writer
}

/// kill -9 of the writer under load: calls continue on a new writer; after the node rejoined
/// (IST) every acknowledged operation is present exactly once and all nodes are identical.
#[test]
fn galera_router_fails_over_when_the_writer_is_killed() {
    fails_over(
        "gal_route_kill",
        |cluster, writer| cluster.kill(writer).expect("kill the writer"),
        Duration::from_secs(4),
        |cluster, writer| {
            let at = Instant::now();
            cluster.restart(writer).expect("restart");
            eprintln!("  node {writer} rejoined in {:?}", at.elapsed());
        },
        false,
    );
}

/// SIGSTOP of the writer under load: calls in flight on it answer by their deadline plus grace
/// (`ServerUnresponsive`, or `OutcomeUnknown` for a COMMIT in flight), new calls go to the new
/// writer; after SIGCONT the node rejoins and all nodes are identical.
#[test]
fn galera_router_fails_over_when_the_writer_is_paused() {
    fails_over(
        "gal_route_pause",
        |cluster, writer| cluster.pause(writer).expect("pause the writer"),
        Duration::from_secs(5),
        |cluster, writer| {
            cluster.resume(writer).expect("resume");
            let at = Instant::now();
            cluster
                .wait_cluster_synced(Duration::from_secs(60))
                .expect("synced after resume");
            eprintln!("  node {writer} rejoined in {:?}", at.elapsed());
        },
        true,
    );
}

/// The writer cut off from the other two (`gmcast.isolate`): it goes non-Primary and answers
/// 1047; the routers move to a node of the Primary component and calls continue there.
#[test]
fn galera_router_moves_away_from_a_non_primary_writer() {
    fails_over(
        "gal_route_non_primary",
        |cluster, writer| {
            isolate(cluster, writer, true);
            let at = Instant::now();
            while cluster.status(writer).expect("status").cluster_status == "Primary" {
                assert!(at.elapsed() < Duration::from_secs(20), "still Primary");
                thread::sleep(Duration::from_millis(100));
            }
            eprintln!("  node {writer} non-Primary after {:?}", at.elapsed());
        },
        Duration::from_secs(3),
        |cluster, writer| isolate(cluster, writer, false),
        false,
    );
}

/// Cuts `node` off the group communication (`gmcast.isolate=1`) or lets it back in.
fn isolate(cluster: &GaleraCluster, node: usize, isolated: bool) {
    let mut conn = MysqlConnection::establish(&cluster.url(node, "")).expect("connect");
    conn.batch_execute(&format!(
        "SET GLOBAL wsrep_provider_options = 'gmcast.isolate={}'",
        u8::from(isolated)
    ))
    .expect("gmcast.isolate");
}

/// One connection killed (`KILL`, an operator or a proxy) is not a dead writer: the call that
/// lost it runs again on the same writer once the node's probe — woken at once, on a connection
/// of its own — found the node healthy, and the writer does not move. Before, any lost
/// connection marked the node down and failed the writer over.
#[test]
fn galera_router_keeps_the_writer_when_one_connection_is_killed() {
    let _guard = exclusive();
    let mut guard = cluster();
    let cluster = guard.as_mut().expect("cluster");
    let urls = database(cluster, "gal_route_kill_one");
    let router = routers(&urls, 1).remove(0);
    let writer = router.writer().expect("a writer");
    let epoch = router.stats().epoch;
    let ledger = BalanceLedger::new();
    let ten = Decimal::new(10, 0);
    let mut attempts = 0;
    let started = Instant::now();
    let deadline = Deadline::after(Duration::from_secs(3));
    let entry = router
        .write(deadline, |conn, deadline| {
            attempts += 1;
            if attempts == 1 {
                let id: i64 = diesel::select(diesel::dsl::sql::<BigInt>("CONNECTION_ID()"))
                    .get_result(conn)
                    .expect("connection id");
                let mut killer = MysqlConnection::establish(&urls[writer]).expect("killer");
                killer
                    .batch_execute(&format!("KILL {id}"))
                    .expect("kill the call's connection");
            }
            ledger.charge_by(conn, 7, ten, "kill-one", deadline)
        })
        .expect("the call runs again on the same writer");
    let took = started.elapsed();
    assert_eq!(attempts, 2, "one lost connection, one retry");
    assert!(took < call_bound(), "took {took:?}");
    let stats = router.stats();
    assert_eq!(router.writer(), Some(writer), "{stats:?}");
    assert_eq!(stats.failovers, 0, "{stats:?}");
    assert_eq!(stats.epoch, epoch, "{stats:?}");
    let mut check = causal(&urls[writer]);
    let entries: i64 = lockstock::schema::balance_history::table
        .filter(lockstock::schema::balance_history::idempotency_key.eq("kill-one"))
        .count()
        .get_result(&mut check)
        .expect("count");
    assert_eq!(entries, 1);
    assert_eq!(entry.amount, ten);
}

/// A call refused `NotReplicated` on one pooled connection whose replication a closure turned
/// off (`SET SESSION wsrep_on = 0`): that connection's, not the node's — the router discards
/// the connection, the node's probe (which reads the node's `wsrep_on`) clears it, and the call
/// runs again on a fresh connection to the same writer. Nothing was written on the first try.
#[test]
fn galera_router_keeps_the_writer_when_one_session_does_not_replicate() {
    let _guard = exclusive();
    let mut guard = cluster();
    let cluster = guard.as_mut().expect("cluster");
    let urls = database(cluster, "gal_route_not_replicated");
    let router = routers(&urls, 1).remove(0);
    let writer = router.writer().expect("a writer");
    let epoch = router.stats().epoch;
    let ledger = BalanceLedger::new();
    let ten = Decimal::new(10, 0);
    let mut answers = Vec::new();
    let entry = router
        .write(Deadline::after(Duration::from_secs(3)), |conn, deadline| {
            if answers.is_empty() {
                conn.batch_execute("SET SESSION wsrep_on = 0")
                    .expect("replication off for this session");
            }
            let answer = ledger.charge_by(conn, 7, ten, "not-replicated", deadline);
            answers.push(format!("{answer:?}"));
            answer
        })
        .expect("the call runs again on a replicating connection");
    assert_eq!(answers.len(), 2, "{answers:?}");
    assert!(answers[0].contains("NotReplicated"), "{answers:?}");
    let stats = router.stats();
    assert_eq!(router.writer(), Some(writer), "{stats:?}");
    assert_eq!((stats.failovers, stats.epoch), (0, epoch), "{stats:?}");
    // Written once, and on every node.
    for url in &urls {
        let entries: i64 = lockstock::schema::balance_history::table
            .filter(lockstock::schema::balance_history::idempotency_key.eq("not-replicated"))
            .count()
            .get_result(&mut causal(url))
            .expect("count");
        assert_eq!(entries, 1, "{url}");
    }
    assert_eq!(entry.amount, ten);
}

/// A fresh database `name` on the cluster, one router over it, its writer, and account 7
/// funded with 10 through the router.
fn funded_router(cluster: &GaleraCluster, name: &str) -> (Vec<String>, Arc<Router>, usize) {
    let urls = database(cluster, name);
    let router = routers(&urls, 1).remove(0);
    let writer = router.writer().expect("a writer");
    router
        .write(Deadline::after(Duration::from_secs(5)), |conn, deadline| {
            BalanceLedger::new().charge_by(conn, 7, Decimal::new(10, 0), "fund", deadline)
        })
        .expect("fund");
    (urls, router, writer)
}

/// What `f` answers while `node` is paused (SIGSTOP); the node resumed and the cluster synced
/// again afterwards.
fn while_paused<T>(cluster: &mut GaleraCluster, node: usize, f: impl FnOnce() -> T) -> T {
    cluster.pause(node).expect("pause the node");
    let answer = f();
    cluster.resume(node).expect("resume");
    cluster
        .wait_cluster_synced(Duration::from_secs(60))
        .expect("synced after resume");
    answer
}

/// A closure whose lockstock call takes no deadline (here `balance`, which runs by its own
/// policy's: 3 s) still answers by the router's deadline plus grace on a frozen writer: the
/// router bounds every closure it runs. The writer is only suspected — a call cut off at its
/// deadline may have met a slow statement on a healthy node — and its probe, which times out,
/// takes it down. Before the fix the call answered after the ledger's own deadline plus grace
/// (~3.5 s).
#[test]
fn galera_router_bounds_a_call_without_a_deadline_of_its_own() {
    let _guard = exclusive();
    let mut guard = cluster();
    let cluster = guard.as_mut().expect("cluster");
    let (_urls, router, writer) = funded_router(cluster, "gal_route_bounded");
    let ledger = BalanceLedger::new();
    let long = Deadline::after(Duration::from_secs(5));
    // Warm: the balance read's connection is pooled and idle (no ping on checkout).
    router
        .write(long, |conn, _| ledger.balance(conn, 7))
        .expect("warm");
    let deadline = Duration::from_millis(300);
    let (answer, took) = while_paused(cluster, writer, || {
        let started = Instant::now();
        let answer = router.write(Deadline::after(deadline), |conn, _| ledger.balance(conn, 7));
        (answer, started.elapsed())
    });
    eprintln!("answered {answer:?} after {took:?}");
    let bound = deadline + TxnPolicy::default().unresponsive_grace + Duration::from_secs(1);
    assert!(took <= bound, "answered after {took:?} (bound {bound:?})");
    assert!(
        matches!(
            answer,
            Err(Error::ServerUnresponsive { .. } | Error::Timeout { .. })
        ),
        "{answer:?}"
    );
}

/// A lockstock call without a deadline parameter inside a router call runs by the router
/// call's deadline when that is earlier than its own policy's: with the account's row held by
/// another transaction (every NOWAIT refused at once, the thread mostly asleep in backoff, so
/// the watchdog finds no socket to cut), a `hold` inside `router.write` with 300 ms answers
/// `Contended` by then, and the writer stays. Before the fix it ran by the ledger's own 3 s
/// deadline (or was cut at a random statement past the router's deadline and the node
/// suspected).
#[test]
fn galera_router_bounds_a_call_that_is_refused_by_its_own_deadline() {
    let _guard = exclusive();
    let mut guard = cluster();
    let cluster = guard.as_mut().expect("cluster");
    let (urls, router, writer) = funded_router(cluster, "gal_route_refused_call");
    let ledger = BalanceLedger::new();
    let long = Deadline::after(Duration::from_secs(5));
    let mut holder = causal(&urls[writer]);
    holder.batch_execute("BEGIN").expect("begin");
    lockstock_testkit::fixtures::lock_balance(&mut holder, 7).expect("hold the account");
    let started = Instant::now();
    let deadline = Duration::from_millis(300);
    let expires = chrono::Utc::now().naive_utc() + chrono::Duration::hours(1);
    let answer = router.write(Deadline::after(deadline), |conn, _| {
        ledger.hold(conn, 7, Decimal::ONE, "h", expires)
    });
    let took = started.elapsed();
    // A call given a deadline of its own, later than the router's: bounded by the router's too.
    // Before the fix it retried by its own (5 s), or was cut at a random statement past the
    // router's deadline.
    let started = Instant::now();
    let own = router.write(Deadline::after(deadline), |conn, _| {
        ledger.deduct_by(conn, 7, Decimal::ONE, "d", long)
    });
    let own_took = started.elapsed();
    holder.batch_execute("ROLLBACK").expect("let go");
    eprintln!("answered {answer:?} after {took:?}, {own:?} after {own_took:?}");
    let bound = deadline + TxnPolicy::default().unresponsive_grace;
    for (answer, took) in [(answer.map(|_| ()), took), (own.map(|_| ()), own_took)] {
        assert!(
            matches!(answer, Err(Error::Contended { .. })),
            "{answer:?} after {took:?}"
        );
        assert!(took <= bound, "answered after {took:?} (bound {bound:?})");
    }
    assert_eq!(router.writer(), Some(writer), "the writer moved");
    assert_eq!(
        lockstock_testkit::fixtures::count_key(&mut holder, 7, "d"),
        0,
        "the refused deduct was applied"
    );
    let held = router
        .write(long, |conn, _| {
            ledger.hold(conn, 7, Decimal::ONE, "h", expires)
        })
        .expect("the hold, once the row is free");
    assert_eq!(held.amount, Decimal::ONE);
}

/// Calls cut off at their deadline on a healthy writer — statements slower than the deadline,
/// not a dead node; here three in flight together — do not fail the writer over: the node is
/// only suspected, its probe finds it healthy, and the writer and the designated-writer row
/// stay. Before the fix a cut call marked the node down and the routers moved the writer (and
/// with cuts merely counted, the second concurrent one did).
#[test]
fn galera_router_keeps_the_writer_after_a_slow_call_is_cut_off() {
    let _guard = exclusive();
    let mut guard = cluster();
    let cluster = guard.as_mut().expect("cluster");
    let urls = database(cluster, "gal_route_slow_call");
    let router = routers(&urls, 1).remove(0);
    let writer = router.writer().expect("a writer");
    let before = router.stats();
    let runner = lockstock::TxnRunner::new(TxnPolicy::default());
    // Three callers meet the same stall, cut off one after another: one stall, not three.
    let answers: Vec<_> = thread::scope(|scope| {
        let calls: Vec<_> = [200, 300, 400]
            .map(|ms| {
                let (router, runner) = (&router, &runner);
                scope.spawn(move || {
                    router.write(
                        Deadline::after(Duration::from_millis(ms)),
                        |conn, deadline| {
                            runner.run_by(conn, deadline, |conn| {
                                // Unlimited (the runner would stop it at the deadline):
                                // a statement that hangs.
                                diesel::sql_query(
                                    "SET STATEMENT max_statement_time = 0 FOR SELECT SLEEP(3)",
                                )
                                .execute(conn)?;
                                Ok(())
                            })
                        },
                    )
                })
            })
            .into_iter()
            .collect();
        calls
            .into_iter()
            .map(|call| call.join().expect("slow call"))
            .collect()
    });
    for answer in &answers {
        assert!(
            matches!(answer, Err(Error::ServerUnresponsive { .. })),
            "{answer:?}"
        );
    }
    // Longer than a probe round (interval 200 ms, timeout ~1.5 s) and an election.
    thread::sleep(Duration::from_secs(3));
    let after = router.stats();
    eprintln!("before {before:?}\nafter {after:?}");
    assert_eq!(router.writer(), Some(writer), "the writer moved");
    assert_eq!(after.failovers, before.failovers, "failed over");
    assert_eq!(after.epoch, before.epoch, "the designated-writer row moved");
    // And the writer takes calls.
    let ledger = BalanceLedger::new();
    router
        .write(Deadline::after(Duration::from_secs(3)), |conn, deadline| {
            ledger.charge_by(conn, 9, Decimal::new(1, 0), "after", deadline)
        })
        .expect("a call after the slow one");
}

/// Callers holding every pooled read connection for longer than the coordinator's deadline do
/// not cost the router its writer: the coordinator's read of the designated-writer row, which
/// finds no free connection (`Timeout`, nothing sent), blames no node. Before the fix it
/// marked the writer down (no writer until the probes cleared it) and every node it could not
/// reach in the same round.
#[test]
fn galera_router_keeps_its_writer_while_its_pools_are_busy() {
    let _guard = exclusive();
    let mut guard = cluster();
    let cluster = guard.as_mut().expect("cluster");
    let urls = database(cluster, "gal_route_busy_pools");
    let (router, writer) = router_with(&urls, 1, Duration::from_millis(200));
    let busy: Vec<_> = (0..urls.len())
        .map(|_| {
            let router = router.clone();
            thread::spawn(move || {
                router.read(Deadline::after(Duration::from_secs(10)), |_, _| {
                    thread::sleep(Duration::from_secs(3));
                    Ok(())
                })
            })
        })
        .collect();
    let until = Instant::now() + Duration::from_secs(3);
    let mut without = 0;
    while Instant::now() < until {
        if router.writer() != Some(writer) {
            without += 1;
        }
        thread::sleep(Duration::from_millis(50));
    }
    for call in busy {
        call.join().expect("busy read").expect("busy read answered");
    }
    let stats = router.stats();
    eprintln!("{stats:?}");
    assert_eq!(
        without, 0,
        "looks without the writer while the pools were busy"
    );
    assert_eq!(router.writer(), Some(writer));
}

/// Callers queueing for the writer's one pooled connection for longer than the probe timeout,
/// while connections are discarded and replaced (each closure leaves its transaction open, so
/// the router never hands its connection on), do not cost the router its writer: a checkout
/// that found no connection in time, and no connect refused, only makes the node suspect, and
/// its probe clears it. Before the fix such a checkout took the writer down whenever the pool,
/// sampled after the wait, did not look busy — with a discarded connection being replaced, or
/// one just given back — and the writer moved without a fault.
#[test]
fn galera_router_keeps_its_writer_while_a_busy_pool_replaces_connections() {
    let _guard = exclusive();
    let mut guard = cluster();
    let cluster = guard.as_mut().expect("cluster");
    let urls = database(cluster, "gal_route_busy_replaced");
    // Probe timeout 1.1 s: eight callers holding the one connection 200 ms each queue longer.
    // (A 400 ms probe timeout was within reach of a probe's own scheduling on loaded cores.)
    let mut probe = policy_with_deadline(Duration::from_secs(1));
    probe.unresponsive_grace = Duration::from_millis(100);
    let router = Router::builder(urls.clone())
        .pool_size(1)
        .health_interval(Duration::from_millis(200))
        .probe_policy(probe)
        .build()
        .expect("router");
    let writer = router
        .wait_for_writer(Duration::from_secs(20))
        .expect("a writer");
    let router = Arc::new(router);
    let until = Instant::now() + Duration::from_secs(6);
    let callers: Vec<_> = (0..8)
        .map(|_| {
            let router = router.clone();
            thread::spawn(move || {
                let mut calls = 0u32;
                while Instant::now() < until {
                    router.write(Deadline::after(Duration::from_secs(20)), |conn, _| {
                        thread::sleep(Duration::from_millis(200));
                        conn.batch_execute("START TRANSACTION")
                            .map_err(|e| Error::Server(lockstock::ServerError::new(e)))
                    })?;
                    calls += 1;
                }
                Ok::<_, Error>(calls)
            })
        })
        .collect();
    let mut without = 0;
    while Instant::now() < until {
        if router.writer() != Some(writer) {
            without += 1;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let calls: u32 = callers
        .into_iter()
        .map(|caller| caller.join().expect("caller").expect("every call answered"))
        .sum();
    let stats = router.stats();
    eprintln!("{calls} calls; {stats:?}");
    assert_eq!(stats.failovers, 0, "the writer moved without a fault");
    assert_eq!(
        without, 0,
        "looked without the writer while its pool was busy"
    );
    assert_eq!(router.writer(), Some(writer));
    assert!(calls > 8, "the callers made no progress: {calls} calls");
}

/// A router over database `name` (made afresh) with `pool_size` connections per pool, node 0
/// reached through a [`Relay`] (and the relay), nodes 1 and 2 directly; 200 ms health
/// interval, 1 s probe deadline.
fn relayed_router(cluster: &GaleraCluster, name: &str, pool_size: u32) -> (Relay, Router) {
    let urls = database(cluster, name);
    let relay = Relay::to(
        format!("127.0.0.1:{}", cluster.ports(0).client)
            .parse()
            .expect("node 0's address"),
    );
    let relayed = format!("mysql://root@127.0.0.1:{}/{name}", relay.port);
    let router = Router::builder([relayed, urls[1].clone(), urls[2].clone()])
        .pool_size(pool_size)
        .health_interval(Duration::from_millis(200))
        .probe_policy(policy_with_deadline(Duration::from_secs(1)))
        .build()
        .expect("router");
    (relay, router)
}

/// A TCP relay on 127.0.0.1 to `target`. While `cut` is set it black-holes every connection:
/// the server side is closed, the client side kept open and silent — a half-open connection,
/// as a network failure leaves one — and new connections are held the same way. Cleared, new
/// connections are relayed again (the held ones stay silent).
struct Relay {
    port: u16,
    cut: Arc<AtomicBool>,
    /// While set, new connections are held silent (accepted, never greeted) and the ones
    /// relayed already go on.
    hold_new: Arc<AtomicBool>,
}

impl Relay {
    fn to(target: std::net::SocketAddr) -> Relay {
        use std::net::TcpListener;
        let listener = TcpListener::bind("127.0.0.1:0").expect("relay listener");
        let port = listener.local_addr().expect("relay port").port();
        let cut = Arc::new(AtomicBool::new(false));
        let hold_new = Arc::new(AtomicBool::new(false));
        let held: Arc<Mutex<Vec<std::net::TcpStream>>> = Arc::default();
        let (cutting, holding, holding_new) = (cut.clone(), held.clone(), hold_new.clone());
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                if cutting.load(Ordering::SeqCst) || holding_new.load(Ordering::SeqCst) {
                    holding.lock().expect("held").push(client);
                    continue;
                }
                let Ok(server) = std::net::TcpStream::connect(target) else {
                    continue;
                };
                let pump = |from: std::net::TcpStream, to: std::net::TcpStream, to_server| {
                    let (cut, held) = (cutting.clone(), holding.clone());
                    move || Relay::pump(from, to, to_server, &cut, &held)
                };
                let (c1, s1) = (
                    client.try_clone().expect("clone"),
                    server.try_clone().expect("clone"),
                );
                thread::spawn(pump(client, server, true));
                thread::spawn(pump(s1, c1, false));
            }
        });
        Relay {
            port,
            cut,
            hold_new,
        }
    }

    /// Copies `from` to `to` (`to_server`: from the client to the server) until either closes
    /// or the relay is cut: then the server's socket is shut down and the client's kept open
    /// and silent in `held` — by whichever pump sees the cut first (the client must never get
    /// a FIN: its connection is to be half-open).
    fn pump(
        mut from: std::net::TcpStream,
        mut to: std::net::TcpStream,
        to_server: bool,
        cut: &AtomicBool,
        held: &Mutex<Vec<std::net::TcpStream>>,
    ) {
        use std::io::{Read, Write};
        from.set_read_timeout(Some(Duration::from_millis(20)))
            .expect("read timeout");
        let mut buffer = [0u8; 16 * 1024];
        loop {
            if cut.load(Ordering::SeqCst) {
                let (server, client) = if to_server { (to, from) } else { (from, to) };
                let _ = server.shutdown(std::net::Shutdown::Both);
                held.lock().expect("held").push(client);
                return;
            }
            match from.read(&mut buffer) {
                Ok(0) => return,
                Ok(n) => {
                    if to.write_all(&buffer[..n]).is_err() {
                        return;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return,
            }
        }
    }
}

/// A writer whose new connections hang (accepted, never greeted: a node draining, a firewall
/// fault) while the connections made before go on — its probe answers on the one it keeps —
/// is taken down after two writes in a row got no connection from its write pool (its read
/// pool's connection serving reads meanwhile), and the call runs on the new writer within its
/// deadline. (The fix for a busy pool, which made such a checkout only suspect the node, left
/// it the writer for good: calls answered `Pool` at their deadlines.)
#[test]
fn galera_router_fails_over_from_a_writer_whose_new_connections_hang() {
    let _guard = exclusive();
    let mut guard = cluster();
    let cluster = guard.as_mut().expect("cluster");
    let (relay, router) = relayed_router(cluster, "gal_route_new_conns_hang", 1);
    let writer = router
        .wait_for_writer(Duration::from_secs(20))
        .expect("a writer");
    assert_eq!(
        writer, 0,
        "the relayed node is the writer: the test's premise"
    );
    let ask = |deadline: Duration| {
        router.write(Deadline::after(deadline), |conn, _| {
            diesel::select(diesel::dsl::sql::<Text>("CAST(@@wsrep_node_name AS CHAR)"))
                .get_result::<String>(conn)
                .map_err(|e| Error::Server(lockstock::ServerError::new(e)))
        })
    };
    ask(Duration::from_secs(5)).expect("a write through the relay");
    // Reads (round robin over the nodes) open node 0's read pool, whose connection goes on
    // serving reads throughout: they say nothing of its write pool's new connections.
    for _ in 0..6 {
        served_by(&router, Duration::from_secs(5)).expect("a read");
    }
    relay.hold_new.store(true, Ordering::SeqCst);
    // The writer's one pooled connection is discarded (the closure leaves a transaction
    // open): its pool opens another, which hangs.
    router
        .write(Deadline::after(Duration::from_secs(5)), |conn, _| {
            conn.batch_execute("START TRANSACTION")
                .map_err(|e| Error::Server(lockstock::ServerError::new(e)))
        })
        .expect("the closure");
    let started = Instant::now();
    let stop = AtomicBool::new(false);
    let (answer, reads) = thread::scope(|scope| {
        let _stop_on_drop = crate::StopOnDrop(&stop);
        let reader = scope.spawn(|| {
            let mut reads = 0u32;
            while !stop.load(Ordering::SeqCst) {
                if served_by(&router, Duration::from_millis(500)).is_ok() {
                    reads += 1;
                }
                thread::sleep(Duration::from_millis(20));
            }
            reads
        });
        let answer = ask(Duration::from_secs(10));
        stop.store(true, Ordering::SeqCst);
        (answer, reader.join().expect("the reader"))
    });
    eprintln!(
        "{answer:?} after {:?} ({reads} reads meanwhile): {:?}",
        started.elapsed(),
        router.stats()
    );
    let served = answer.expect("answered on the new writer");
    assert_ne!(router.writer(), Some(0), "still the writer");
    assert_ne!(
        served, "node0",
        "served by the writer whose connections hang"
    );
}

/// A node whose probe connection is left half-open (the network dropped the server's side
/// without a word) is probed afresh once the probe timed out, and is healthy again as soon as
/// new connections reach it. Before the fix the probe waited on the dead connection for ever,
/// so the node never came back.
#[test]
fn galera_router_probe_recovers_from_a_half_open_connection() {
    let _guard = exclusive();
    let mut guard = cluster();
    let cluster = guard.as_mut().expect("cluster");
    let (relay, router) = relayed_router(cluster, "gal_route_half_open", 2);
    router
        .wait_for_writer(Duration::from_secs(20))
        .expect("a writer");
    let healthy = |router: &Router| router.stats().nodes[0].healthy;
    let wait = |want: bool, within: Duration| -> bool {
        let until = Instant::now() + within;
        while Instant::now() < until {
            if healthy(&router) == want {
                return true;
            }
            thread::sleep(Duration::from_millis(50));
        }
        false
    };
    assert!(
        wait(true, Duration::from_secs(10)),
        "node 0 healthy through the relay"
    );
    relay.cut.store(true, Ordering::SeqCst);
    assert!(
        wait(false, Duration::from_secs(10)),
        "node 0 down while cut"
    );
    relay.cut.store(false, Ordering::SeqCst);
    let back = wait(true, Duration::from_secs(15));
    eprintln!("{:?}", router.stats().nodes[0]);
    assert!(back, "node 0 never healthy again after the network healed");
}

/// Calls cut off at their deadline in a row on the writer — its statements hang although its
/// probe (a status read) still answers — take it down and the router fails over; one cut-off
/// call alone does not (see `galera_router_keeps_the_writer_after_a_slow_call_is_cut_off`).
#[test]
fn galera_router_fails_over_when_the_writers_calls_keep_being_cut_off() {
    let _guard = exclusive();
    let mut guard = cluster();
    let cluster = guard.as_mut().expect("cluster");
    let urls = database(cluster, "gal_route_cut_calls");
    let router = routers(&urls, 1).remove(0);
    let writer = router.writer().expect("a writer");
    let before = router.stats();
    let runner = lockstock::TxnRunner::new(TxnPolicy::default());
    let slow = || {
        router.write(Deadline::after(Duration::from_secs(1)), |conn, deadline| {
            runner.run_by(conn, deadline, |conn| {
                // Unlimited (the runner would stop it at the deadline):
                // a statement that hangs.
                diesel::sql_query("SET STATEMENT max_statement_time = 0 FOR SELECT SLEEP(5)")
                    .execute(conn)?;
                Ok(())
            })
        })
    };
    // The first cut makes the writer suspect; its probe clears it (the second call waits for
    // that); the second cut, with no call answered BY THE NODE between them, takes it down: a
    // call answered without a round trip (bad input) between them says nothing of the node.
    // Before the fix it cleared the count, and a writer whose statements hang was never taken
    // down while such calls came.
    let ledger = BalanceLedger::new();
    for round in 0..2 {
        let answer = slow();
        assert!(
            matches!(answer, Err(Error::ServerUnresponsive { .. })),
            "{answer:?}"
        );
        if round == 0 {
            let refused = router
                .write(Deadline::after(Duration::from_secs(1)), |conn, deadline| {
                    ledger.charge_by(conn, 9, Decimal::new(-1, 0), "bad", deadline)
                });
            assert!(
                matches!(refused, Err(Error::InvalidAmount { .. })),
                "{refused:?}"
            );
        }
    }
    let until = Instant::now() + Duration::from_secs(15);
    while router.writer().is_none_or(|w| w == writer) && Instant::now() < until {
        thread::sleep(Duration::from_millis(100));
    }
    let after = router.stats();
    eprintln!("before {before:?}\nafter {after:?}");
    assert_ne!(router.writer(), Some(writer), "still the writer");
    assert!(after.failovers > before.failovers, "{after:?}");
}

/// A writer taken down by cut-off calls is not handed its writer back by its probe: the probe
/// (a status read) answers while the node's statements hang, and one that answered between the
/// take-down and the coordinator's next look made the node healthy again — the coordinator
/// adopted it anew, and the calls kept hanging there. Here the probe runs without pause, so it
/// always answers first: the node stays down until the coordinator has run once since, and the
/// writer moves. Twice, on two databases, so a lucky ordering cannot pass it.
#[test]
fn galera_router_fails_over_from_cut_calls_although_the_probe_answers_at_once() {
    let _guard = exclusive();
    let mut guard = cluster();
    let cluster = guard.as_mut().expect("cluster");
    for round in 0..2 {
        let urls = database(cluster, &format!("gal_route_cut_probe_{round}"));
        let router = Router::builder(urls)
            .pool_size(2)
            .health_interval(Duration::from_millis(1))
            .probe_policy(policy_with_deadline(Duration::from_secs(1)))
            .build()
            .expect("router");
        let writer = router
            .wait_for_writer(Duration::from_secs(20))
            .expect("a writer");
        let runner = lockstock::TxnRunner::new(TxnPolicy::default());
        for _ in 0..2 {
            let answer = router.write(Deadline::after(Duration::from_secs(1)), |conn, deadline| {
                runner.run_by(conn, deadline, |conn| {
                    diesel::sql_query("SET STATEMENT max_statement_time = 0 FOR SELECT SLEEP(5)")
                        .execute(conn)?;
                    Ok(())
                })
            });
            assert!(
                matches!(answer, Err(Error::ServerUnresponsive { .. })),
                "{answer:?}"
            );
        }
        let until = Instant::now() + Duration::from_secs(15);
        while router.writer().is_none_or(|w| w == writer) && Instant::now() < until {
            thread::sleep(Duration::from_millis(20));
        }
        let stats = router.stats();
        assert_ne!(
            router.writer(),
            Some(writer),
            "round {round}: still the writer {stats:?}"
        );
        assert_eq!(stats.failovers, 1, "round {round}: {stats:?}");
        assert!(stats.epoch >= 2, "round {round}: the row moved {stats:?}");
    }
}

/// A call cut off on the writer, while another caller waits for the pool's only connection,
/// does not cost the router its writer: the cut connection is discarded, and the waiter gets a
/// new one. (r2d2 wakes no waiter when it discards a connection and, with `min_idle = 0`, opens
/// none: the waiter slept out its checkout wait, found a pool with room that gave nothing, and
/// the router took the writer down and failed over.)
#[test]
fn galera_router_keeps_the_writer_when_a_call_waits_for_a_cut_connection() {
    let _guard = exclusive();
    let mut guard = cluster();
    let cluster = guard.as_mut().expect("cluster");
    let urls = database(cluster, "gal_route_cut_waiter");
    let router = Arc::new(
        Router::builder(urls.clone())
            .pool_size(1)
            .build()
            .expect("router"),
    );
    let writer = router
        .wait_for_writer(Duration::from_secs(20))
        .expect("a writer");
    let before = router.stats();
    let runner = lockstock::TxnRunner::new(TxnPolicy::default());
    let (started, slow_started) = std::sync::mpsc::channel();
    let slow = {
        let (router, runner) = (router.clone(), runner.clone());
        thread::spawn(move || {
            router.write(
                Deadline::after(Duration::from_millis(500)),
                |conn, deadline| {
                    started.send(()).expect("tell");
                    runner.run_by(conn, deadline, |conn| {
                        diesel::sql_query(
                            "SET STATEMENT max_statement_time = 0 FOR SELECT SLEEP(3)",
                        )
                        .execute(conn)?;
                        Ok(())
                    })
                },
            )
        })
    };
    slow_started
        .recv()
        .expect("the slow call holds the connection");
    let ledger = BalanceLedger::new();
    let waiter = router.write(
        Deadline::after(Duration::from_secs(10)),
        |conn, deadline| ledger.charge_by(conn, 9, Decimal::new(1, 0), "waiter", deadline),
    );
    let cut = slow.join().expect("slow call");
    assert!(
        matches!(cut, Err(Error::ServerUnresponsive { .. })),
        "{cut:?}"
    );
    let after = router.stats();
    eprintln!("before {before:?}\nafter {after:?}");
    assert!(waiter.is_ok(), "the waiting call: {waiter:?}");
    assert_eq!(router.writer(), Some(writer), "the writer moved");
    assert_eq!(after.failovers, before.failovers, "failed over");
    assert_eq!(after.epoch, before.epoch, "the designated-writer row moved");
}

#[derive(QueryableByName)]
struct ThreadId {
    #[diesel(sql_type = Unsigned<BigInt>)]
    id: u64,
}

/// A routed combined batch whose connection is lost before it commits, after it found one of
/// its users holding the coupon: that user's answer (`AlreadyIssued`) stands, and the other
/// request runs again on the writer, as its single call would — it was answered the lost
/// connection, with its deadline's time left and the node not blamed, because the batch's
/// answers showed a request "applied".
#[test]
fn galera_router_runs_a_cut_off_batchs_open_requests_again() {
    let _guard = exclusive();
    let mut guard = cluster();
    let cluster = guard.as_mut().expect("cluster");
    let urls = database(cluster, "gal_route_batch_open");
    let router = routers(&urls, 1).remove(0);
    let writer = router.writer().expect("a writer");
    let mut check = causal(&urls[writer]);
    let campaign =
        lockstock_testkit::fixtures::open_campaign(&mut check, &CouponIssuer::new(), 10).id;
    let hot = Arc::new(CombiningIssuer::routed(
        router.clone(),
        // Attempts enough for every batch to run until its deadline.
        CouponIssuer::with_policy(TxnPolicy::default().with_retry(
            lockstock_testkit::fixtures::retry_policy(100_000, Duration::from_secs(4)),
        )),
    ));
    const HOLDER: i64 = 1;
    const LATE: i64 = 2;
    const FIRST: i64 = 9;
    hot.issue(HOLDER, campaign).expect("the holder's coupon");
    // Another program holds the campaign row: every batch polls it until its deadline.
    let mut other = causal(&urls[writer]);
    let other_id: u64 = diesel::select(diesel::dsl::sql::<Unsigned<BigInt>>("CONNECTION_ID()"))
        .get_result(&mut other)
        .expect("connection id");
    other.batch_execute("BEGIN").expect("begin");
    let locked: Vec<i64> = lockstock::schema::fcfs_coupon::table
        .find(campaign)
        .select(lockstock::schema::fcfs_coupon::id)
        .for_update()
        .load(&mut other)
        .expect("lock the campaign row");
    assert_eq!(locked, [campaign]);
    // The first caller's batch holds the key's turn until its deadline (4 s); the late user
    // and the holder queue meanwhile and form the next batch, which runs by the late user's
    // deadline (2 s later).
    let spawn = |user: i64| {
        let hot = hot.clone();
        thread::spawn(move || hot.issue(user, campaign))
    };
    let first = spawn(FIRST);
    thread::sleep(Duration::from_secs(2));
    let queued = |n: usize| {
        let since = Instant::now();
        while hot.stats().queued < n && since.elapsed() < Duration::from_secs(5) {
            thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(hot.stats().queued, n);
    };
    let late = spawn(LATE);
    queued(1);
    let holder = spawn(HOLDER);
    queued(2);
    assert!(
        matches!(
            first.join().expect("first caller"),
            Err(Error::Contended { .. } | Error::Timeout { .. })
        ),
        "the first caller's batch polls the held row until its deadline"
    );
    // The next batch has found the holder (its first attempt's INSERT met the holder's
    // coupon, the next ones read the holders) and polls the row, retrying: the router's
    // connections to the writer are killed (the batch's among them).
    thread::sleep(Duration::from_millis(300));
    assert!(
        !late.is_finished(),
        "the late user's batch runs until its deadline"
    );
    let others: Vec<ThreadId> = diesel::sql_query(
        "SELECT id FROM information_schema.processlist \
         WHERE db = DATABASE() AND id <> CONNECTION_ID() AND id <> ?",
    )
    .bind::<Unsigned<BigInt>, _>(other_id)
    .load(&mut check)
    .expect("the router's connections");
    assert!(!others.is_empty());
    for victim in others {
        // A server-given id.
        let _ = check.batch_execute(&format!("KILL CONNECTION {}", victim.id));
    }
    other
        .batch_execute("ROLLBACK")
        .expect("let the campaign row go");
    let late = late.join().expect("late caller");
    let holder = holder.join().expect("holder");
    assert!(
        matches!(holder, Err(Error::AlreadyIssued { .. })),
        "{holder:?}"
    );
    let issued = late.expect("the late user's request runs again on the writer");
    assert_eq!(issued.user_id, LATE);
    let rows: i64 = lockstock::schema::user_coupon::table
        .filter(lockstock::schema::user_coupon::fcfs_coupon_id.eq(campaign))
        .count()
        .get_result(&mut causal(&urls[writer]))
        .expect("coupons");
    assert_eq!(rows, 2, "the holder's and the late user's");
}

/// A node that was killed and came back serves calls at once. A read that met the dead node's
/// empty pool made r2d2 begin a connection there, which r2d2 retries in the background (up to
/// 15 s apart) while it holds the pool's one slot. Before the fix the router kept the node's
/// pools when its probe found it healthy again, so reads routed to it answered `Timeout` until
/// that retry woke — here for seconds after the node was back.
#[test]
fn galera_router_serves_a_node_that_came_back_at_once() {
    let _guard = exclusive();
    let mut guard = cluster();
    let cluster = guard.as_mut().expect("cluster");
    let urls = database(cluster, "gal_route_back");
    let (router, writer) = router_with(&urls, 1, Duration::from_secs(2));
    let back = (writer + 1) % urls.len();
    let all_healthy = |router: &Router| router.stats().nodes.iter().all(|n| n.healthy);
    let until = Instant::now() + Duration::from_secs(20);
    while !all_healthy(&router) {
        assert!(
            Instant::now() < until,
            "not every node healthy: {:?}",
            router.stats()
        );
        thread::sleep(Duration::from_millis(50));
    }
    let read = |router: &Router| served_by(router, Duration::from_millis(300));
    cluster
        .kill(back)
        .expect("kill a node that is not the writer");
    let killed = Instant::now();
    // Before its probe finds it gone, a read goes to the killed node, whose read pool (never
    // used) begins a connection there: no connection within the deadline is `Timeout`. (A
    // read on another node may be cut off meanwhile: the cluster stalls until it evicts the
    // killed node. The writer's read pool is the coordinator's too, which reads there every
    // 2 s: a `Timeout` there is possible but unlikely.) The reads go out one per node at
    // once, so that taking turns among the nodes one of them goes to the killed node at once:
    // one after the other, reads cut off by the stall could use up the time before the probe
    // (a CI run saw three cut off at 800 ms on a loaded machine, and the probe came first).
    let mut failed: Vec<Error> = Vec::new();
    while !failed.iter().any(|e| matches!(e, Error::Timeout { .. }))
        && router.stats().nodes[back].healthy
        && killed.elapsed() < Duration::from_secs(5)
    {
        thread::scope(|s| {
            let reads: Vec<_> = (0..urls.len()).map(|_| s.spawn(|| read(&router))).collect();
            for handle in reads {
                failed.extend(handle.join().expect("a read thread").err());
            }
        });
    }
    assert!(
        failed.iter().any(|e| matches!(e, Error::Timeout { .. })),
        "no read met the killed node (its probe found it down first?): {failed:?}"
    );
    // Down for 13 s: with r2d2's default, retries of that connection are 12.8 s apart by then
    // (the router's pools now retry at most half the probe timeout apart).
    thread::sleep(Duration::from_secs(13).saturating_sub(killed.elapsed()));
    cluster.restart(back).expect("restart the node");
    let until = Instant::now() + Duration::from_secs(30);
    while !router.stats().nodes[back].healthy {
        assert!(
            Instant::now() < until,
            "the node is not back: {:?}",
            router.stats()
        );
        thread::sleep(Duration::from_millis(20));
    }
    let back_at = killed.elapsed();
    let name = router.stats().nodes[back].name.clone().expect("its name");
    let mut served = 0;
    for _ in 0..2 * urls.len() {
        // 2 s (the reads above had 300 ms, to meet the killed node's pool): the first read on
        // the node that came back opens a connection and waits for its causal read just after
        // IST. A retry of r2d2's is still 12.8 s away.
        match served_by(&router, Duration::from_secs(2)) {
            Ok(node) => served += usize::from(node == name),
            Err(e) => panic!(
                "a read {:?} after the node was back ({back_at:?} after the kill): {e}",
                killed.elapsed() - back_at
            ),
        }
    }
    assert!(served >= 1, "no read went to the node that came back");
    eprintln!("  node {back} back {back_at:?} after the kill; served {served} reads at once");
}

/// A writer switched to `read_only` (an operator draining the node): the router moves the
/// writer to a node that takes writes, and the write the read-only node refused runs there —
/// applied once; so does a batch refused by the next writer. The read-only node keeps taking
/// reads. The router connects as a user without `READ_ONLY ADMIN` (root writes through
/// `read_only`), and probes a minute apart: it learns of `read_only` from the refused writes.
/// Before the fix every write answered `Error::Server` (1290) for as long as the node stayed
/// read-only.
#[test]
fn galera_router_moves_the_writer_off_a_read_only_node() {
    let _guard = exclusive();
    let mut guard = cluster();
    let cluster = guard.as_mut().expect("cluster");
    let name = "gal_route_read_only";
    let urls = database(cluster, name);
    let app_urls = user_urls(
        &urls,
        ("lockstock_app", "app"),
        &format!("ALL ON `{name}`.*"),
    );
    // Probes a minute apart: the router learns that the writer went read-only from the write
    // it refused, not from a probe.
    let (router, writer) = router_with(&app_urls, 4, Duration::from_secs(60));
    let _writable = Writable(urls[writer].clone());
    let ledger = BalanceLedger::new();
    let ten = Decimal::new(10, 0);
    router
        .write(Deadline::after(DEADLINE), |conn, deadline| {
            ledger.charge_by(conn, 1, ten, "before", deadline)
        })
        .expect("a write before");
    causal(&urls[writer])
        .batch_execute("SET GLOBAL read_only = 1")
        .expect("the writer read-only");
    let started = Instant::now();
    let entry = router
        .write(Deadline::after(DEADLINE), |conn, deadline| {
            ledger.charge_by(conn, 1, ten, "read-only", deadline)
        })
        .expect("the write runs on a node that takes writes");
    assert_eq!(entry.amount, ten);
    assert!(started.elapsed() < call_bound(), "{:?}", started.elapsed());
    let stats = router.stats();
    let moved = router.writer().expect("a new writer");
    assert_ne!(moved, writer, "{stats:?}");
    assert!(stats.failovers >= 1, "{stats:?}");
    assert!(stats.nodes[writer].read_only, "{stats:?}");
    let (designated, _) = designated(&urls[moved]);
    assert_eq!(
        Some(designated),
        stats.nodes[moved].name.clone(),
        "the row names the new writer"
    );
    // Applied once, on the cluster.
    assert_eq!(count_key(&mut causal(&urls[moved]), 1, "read-only"), 1);
    // The read-only node still takes reads.
    let mut served = false;
    for _ in 0..2 * urls.len() {
        let node = served_by(&router, DEADLINE).expect("a read");
        served |= Some(node) == stats.nodes[writer].name;
    }
    assert!(
        served,
        "no read went to the read-only node: {:?}",
        router.stats()
    );

    // A batch (one transaction for four charges) on a writer switched to `read_only`: refused
    // as a whole, it runs again on the third node.
    let _writable_too = Writable(urls[moved].clone());
    causal(&urls[moved])
        .batch_execute("SET GLOBAL read_only = 1")
        .expect("the second writer read-only");
    let ops: Vec<AccountOp> = (0..4)
        .map(|i| AccountOp::charge(ten, format!("combined-{i}")))
        .collect();
    let answers = router
        .write(Deadline::after(DEADLINE), |conn, _| {
            ledger.apply_many(conn, 2, &ops)
        })
        .unwrap_or_else(|e| {
            panic!(
                "the batch runs on the node that takes writes: {e:?}; {:?}",
                router.stats()
            )
        });
    assert!(answers.iter().all(Result::is_ok), "{answers:?}");
    let third = router.writer().expect("a third writer");
    assert!(third != writer && third != moved, "{:?}", router.stats());
    let mut check = causal(&urls[third]);
    for i in 0..4 {
        let key = format!("combined-{i}");
        assert_eq!(count_key(&mut check, 2, &key), 1, "{key}");
    }
}

/// A writer switched to `read_only` with no write in flight: its probe finds it, and the router
/// moves the writer before any write is refused. Before the fix the router kept it.
#[test]
fn galera_router_probe_moves_the_writer_off_a_read_only_node() {
    let _guard = exclusive();
    let mut guard = cluster();
    let cluster = guard.as_mut().expect("cluster");
    let urls = database(cluster, "gal_route_probe_read_only");
    let (router, writer) = router_with(&urls, 2, Duration::from_millis(200));
    let _writable = Writable(urls[writer].clone());
    causal(&urls[writer])
        .batch_execute("SET GLOBAL read_only = 1")
        .expect("the writer read-only");
    let until = Instant::now() + Duration::from_secs(10);
    while router.writer().is_none_or(|w| w == writer) {
        assert!(
            Instant::now() < until,
            "the router kept its read-only writer: {:?}",
            router.stats()
        );
        thread::sleep(Duration::from_millis(20));
    }
    let stats = router.stats();
    assert!(stats.nodes[writer].read_only, "{stats:?}");
    assert!(
        stats.nodes[writer].healthy,
        "it still takes reads: {stats:?}"
    );
    assert!(stats.failovers >= 1, "{stats:?}");
    let moved = router.writer().expect("a new writer");
    let (designated, _) = designated(&urls[moved]);
    assert_eq!(Some(designated), stats.nodes[moved].name, "the row moved");
}

/// Sets the `wsrep_node_name` of the node at `url` to `name`.
fn rename(url: &str, name: &str) -> Result<(), String> {
    let mut conn = MysqlConnection::establish(url).map_err(|e| e.to_string())?;
    diesel::sql_query("SET GLOBAL wsrep_node_name = ?")
        .bind::<Text, _>(name)
        .execute(&mut conn)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// `urls` for the user `(name, password)`, created with `GRANT <grant>`, once every node lets
/// it in: the user reaches the other nodes a moment after the first, and a router probing a
/// node that does not know it yet takes that node for down (until its next probe).
fn user_urls(urls: &[String], (user, password): (&str, &str), grant: &str) -> Vec<String> {
    causal(&urls[0])
        .batch_execute(&format!(
            "CREATE USER IF NOT EXISTS '{user}'@'localhost' IDENTIFIED BY '{password}'; \
             GRANT {grant} TO '{user}'@'localhost'"
        ))
        .expect("a user");
    let user_urls: Vec<String> = urls
        .iter()
        .map(|url| url.replacen("mysql://root@", &format!("mysql://{user}:{password}@"), 1))
        .collect();
    let until = Instant::now() + Duration::from_secs(20);
    for url in &user_urls {
        while let Err(e) = MysqlConnection::establish(url) {
            assert!(Instant::now() < until, "the user {user} on {url}: {e}");
            thread::sleep(Duration::from_millis(20));
        }
    }
    user_urls
}

/// The cluster's nodes renamed (`wsrep_node_name`, a dynamic variable) to `name + suffix`;
/// their testkit names (`node<i>`) put back when dropped, also by a failing test.
struct Renamed {
    urls: Vec<String>,
}

impl Renamed {
    fn with_suffix(cluster: &GaleraCluster, suffix: &str) -> Self {
        // Made first: a rename that fails puts the ones before it back as it unwinds.
        let renamed = Renamed {
            urls: (0..cluster.nodes()).map(|n| cluster.url(n, "")).collect(),
        };
        for (node, url) in renamed.urls.iter().enumerate() {
            if let Err(e) = rename(url, &format!("node{node}{suffix}")) {
                panic!("rename node {node}: {e}");
            }
        }
        renamed
    }
}

impl Drop for Renamed {
    fn drop(&mut self) {
        for (node, url) in self.urls.iter().enumerate() {
            if let Err(e) = rename(url, &format!("node{node}")) {
                eprintln!("node {node}'s name not put back: {e}");
            }
        }
    }
}

/// A node an operator drains (`wsrep_reject_queries = ALL`: every statement but the probe's
/// reads of variables and status answers 1047) is not healthy, and no read is sent to it. Before
/// the fix the probe found it healthy: each call sent there met 1047 and took it down, and the
/// next probe brought it back for the next call to meet the same.
#[test]
fn galera_router_keeps_calls_off_a_node_that_rejects_queries() {
    let _guard = exclusive();
    let mut guard = cluster();
    let cluster = guard.as_mut().expect("cluster");
    let urls = database(cluster, "gal_route_reject_queries");
    let (router, writer) = router_with(&urls, 2, Duration::from_millis(100));
    let drained = (writer + 1) % urls.len();
    /// Puts the node back to taking queries, also when the test fails.
    struct Drained(String);
    impl Drop for Drained {
        fn drop(&mut self) {
            if let Err(e) = causal(&self.0).batch_execute("SET GLOBAL wsrep_reject_queries = NONE")
            {
                eprintln!("{}: wsrep_reject_queries not put back: {e}", self.0);
            }
        }
    }
    let mut admin = causal(&urls[drained]);
    let _drained = Drained(urls[drained].clone());
    admin
        .batch_execute("SET GLOBAL wsrep_reject_queries = ALL")
        .expect("drain the node");
    let since = Instant::now();
    while router.stats().nodes[drained].healthy {
        assert!(
            since.elapsed() < Duration::from_secs(5),
            "still healthy: {:?}",
            router.stats().nodes[drained]
        );
        thread::sleep(Duration::from_millis(20));
    }
    let drained_name = format!("node{drained}");
    for _ in 0..30 {
        let served = served_by(&router, Duration::from_secs(2)).expect("a read");
        assert_ne!(served, drained_name, "a read was sent to the drained node");
        assert!(
            !router.stats().nodes[drained].healthy,
            "{:?}",
            router.stats().nodes[drained]
        );
    }
}

/// Nodes named longer than 64 characters (a fully qualified host name, say): the
/// designated-writer row held 64, so every claim was refused ("Data too long"), the router took
/// each node down in turn — again at every election — and found no writer while every node was
/// Primary and Synced. The row holds 255 characters now: a writer of such a name is elected, a
/// write goes through, the row names it, and every node stays healthy.
#[test]
fn galera_router_elects_a_writer_of_a_long_name() {
    let _guard = exclusive();
    let mut guard = cluster();
    let cluster = guard.as_mut().expect("cluster");
    let suffix = format!(".{}.example", "long-domain-name".repeat(5));
    let _renamed = Renamed::with_suffix(cluster, &suffix);
    let urls = database(cluster, "gal_route_long_names");
    let (router, writer) = router_with(&urls, 2, Duration::from_millis(200));
    router
        .write(Deadline::after(Duration::from_secs(5)), |conn, deadline| {
            BalanceLedger::new().charge_by(conn, 7, Decimal::new(10, 0), "long", deadline)
        })
        .expect("a write through the writer");
    let (name, _) = designated(&urls[0]);
    assert_eq!(name, format!("node{writer}{suffix}"));
    assert!(name.chars().count() > 64, "{name}");
    let stats = router.stats();
    assert!(
        stats.nodes.iter().all(|node| node.healthy),
        "{:?}",
        stats.nodes
    );
}

/// A claim of the writer's row refused for what the statement is, not for what the node is —
/// here a user that may read the database but not update the row (1142): no writer can be
/// elected, but no node is taken down for it either; every node stays healthy and serves
/// reads, and their health says why there is no writer. Before, each refused claim took its
/// node down as a node failure, in turn, at every election: reads found no healthy node.
#[test]
fn galera_router_keeps_nodes_up_when_a_claim_is_refused_for_the_statement() {
    let _guard = exclusive();
    let mut guard = cluster();
    let cluster = guard.as_mut().expect("cluster");
    let name = "gal_route_claim_refused";
    let urls = database(cluster, name);
    let reader_urls = user_urls(
        &urls,
        ("lockstock_reader", "reader"),
        &format!("SELECT ON `{name}`.*"),
    );
    let router = Router::builder(reader_urls)
        .pool_size(2)
        .health_interval(Duration::from_millis(100))
        .probe_policy(policy_with_deadline(Duration::from_secs(1)))
        .read_consistency(ReadConsistency::Causal)
        .build()
        .expect("router");
    assert!(
        router.wait_for_writer(Duration::from_secs(2)).is_err(),
        "no claim can succeed"
    );
    // Elections keep running (callers wait for a writer): every node stays up throughout.
    for _ in 0..20 {
        let stats = router.stats();
        assert!(
            stats.nodes.iter().all(|node| node.healthy),
            "{:?}",
            stats.nodes
        );
        served_by(&router, Duration::from_secs(2)).expect("a read");
        thread::sleep(Duration::from_millis(50));
    }
    let stats = router.stats();
    assert!(
        stats
            .nodes
            .iter()
            .any(|node| node.last_error.as_deref().is_some_and(
                |e| e.contains("claiming the writer's row failed")
                // The server's reason too (before: "... failed: database error").
                && e.contains("denied")
            )),
        "{:?}",
        stats.nodes
    );
}

/// Killing every session of the router's user on the writer — the probe's own connection among
/// them (an operator's `KILL USER`, idle connections reset) — does not move the writer: a probe
/// whose kept connection was lost asks again at once on a new one, and only the node's own
/// failure takes it down. Before the fix the probe's next run failed on its dead connection,
/// the writer was dropped and another node elected (a failover, the epoch one higher).
#[test]
fn galera_router_keeps_the_writer_when_its_probe_connection_is_killed() {
    let _guard = exclusive();
    let mut guard = cluster();
    let cluster = guard.as_mut().expect("cluster");
    let name = "gal_route_probe_killed";
    let urls = database(cluster, name);
    let app_urls = user_urls(
        &urls,
        ("lockstock_app", "app"),
        &format!("ALL ON `{name}`.*"),
    );
    let (router, writer) = router_with(&app_urls, 2, Duration::from_millis(200));
    // A write first: the writer's pool holds a connection too.
    router
        .write(Deadline::after(OP_BUDGET), |conn, _| {
            BalanceLedger::new().charge(conn, 1, Decimal::ONE, "before")
        })
        .expect("a write");
    let before = router.stats();
    let mut root = causal(&urls[writer]);
    let sessions: Vec<ThreadId> = diesel::sql_query(
        "SELECT id FROM information_schema.processlist WHERE user = 'lockstock_app'",
    )
    .load(&mut root)
    .expect("the user's sessions");
    assert!(!sessions.is_empty());
    let last_killed = sessions.iter().map(|s| s.id).max().unwrap_or(0);
    for session in sessions {
        // A server-given id.
        let _ = root.batch_execute(&format!("KILL CONNECTION {}", session.id));
    }
    // Until the writer's probe has run again: a session of the user opened after the kills
    // (the probe's new connection; before the fix it came only at the probe after the one
    // that failed, the writer already dropped). The stats are read after the probe answered.
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let newer: Vec<ThreadId> = diesel::sql_query(
            "SELECT id FROM information_schema.processlist \
             WHERE user = 'lockstock_app' AND id > ?",
        )
        .bind::<Unsigned<BigInt>, _>(last_killed)
        .load(&mut root)
        .expect("the user's sessions");
        if !newer.is_empty() {
            break;
        }
        assert!(Instant::now() < until, "the writer's probe never ran again");
        thread::sleep(Duration::from_millis(20));
    }
    // Its answer recorded (the probe answers in a few milliseconds; an interval is 200 ms).
    thread::sleep(Duration::from_millis(100));
    let after = router.stats();
    assert_eq!(
        (after.writer, after.epoch, after.failovers),
        (Some(writer), before.epoch, before.failovers),
        "{after:?}"
    );
    router
        .write(Deadline::after(OP_BUDGET), |conn, _| {
            BalanceLedger::new().charge(conn, 1, Decimal::ONE, "after")
        })
        .expect("a write on the same writer");
}

/// A router never gives a connection that a closure left inside a transaction back to its
/// pool: the next closure gets a connection outside any, and a retry of a hold whose expiry has
/// passed, made with a plain `Router::write`, answers the recorded entry as its single call
/// does. Before the fix the connection went back with the transaction open: the retry's key
/// lookup met it as the caller's own and answered `InvalidExpiry` ("never placed") while the
/// hold stood, and a closure's raw write landed inside the leftover transaction.
#[test]
fn galera_router_discards_a_connection_a_closure_left_inside_a_transaction() {
    let _guard = exclusive();
    let mut guard = cluster();
    let cluster = guard.as_mut().expect("cluster");
    let urls = database(cluster, "gal_route_left_open");
    let (router, _writer) = router_with(&urls, 1, Duration::from_millis(200));
    let ledger = BalanceLedger::new();
    let write = |f: &dyn Fn(&mut MysqlConnection) -> Result<lockstock::Entry, Error>| {
        router.write(Deadline::after(OP_BUDGET), |conn, _| f(conn))
    };
    write(&|c| ledger.charge(c, 1, Decimal::new(100, 0), "fund")).expect("fund");
    let expires_at = chrono::Utc::now().naive_utc() + chrono::Duration::milliseconds(1_500);
    let hold =
        write(&|c| ledger.hold(c, 1, Decimal::new(10, 0), "h", expires_at)).expect("the hold");
    while chrono::Utc::now().naive_utc() <= expires_at + chrono::Duration::milliseconds(100) {
        thread::sleep(Duration::from_millis(50));
    }
    // The next closure runs outside any transaction, whatever the one before left.
    let next_is_outside = |after: &str| {
        let open: i64 = router
            .write(Deadline::after(OP_BUDGET), |conn, _| {
                diesel::select(diesel::dsl::sql::<diesel::sql_types::BigInt>(
                    "CAST(@@in_transaction AS SIGNED)",
                ))
                .get_result(conn)
                .map_err(|e| Error::Server(lockstock::ServerError::new(e)))
            })
            .expect("the next closure");
        assert_eq!(
            open, 0,
            "the next closure ran inside the transaction {after}"
        );
    };
    // The application's closure leaves a transaction open on the writer's only pooled
    // connection.
    router
        .write(Deadline::after(OP_BUDGET), |conn, _| {
            conn.batch_execute("START TRANSACTION; SELECT 1")
                .map_err(|e| Error::Server(lockstock::ServerError::new(e)))
        })
        .expect("the application's closure");
    next_is_outside("left open");
    // Also after a closure whose batch failed at its last statement, having begun the
    // transaction (its failure is the batch's one answer: no statement counted as answered).
    let failed = router.write(Deadline::after(OP_BUDGET), |conn, _| {
        conn.batch_execute("START TRANSACTION; SELECT * FROM no_such_table")
            .map_err(|e| Error::Server(lockstock::ServerError::new(e)))
    });
    assert!(matches!(failed, Err(Error::Server(_))), "{failed:?}");
    next_is_outside("a failed batch began");
    router
        .write(Deadline::after(OP_BUDGET), |conn, _| {
            conn.batch_execute("START TRANSACTION; SELECT 1")
                .map_err(|e| Error::Server(lockstock::ServerError::new(e)))
        })
        .expect("the application's closure again");
    let retried = write(&|c| ledger.hold(c, 1, Decimal::new(10, 0), "h", expires_at));
    assert_eq!(retried.expect("the recorded entry"), hold);
    write(&|c| ledger.deduct(c, 1, Decimal::ONE, "after")).expect("a deduct");
}

/// A closure answered without a round trip (bad input) gets its own answer through a router
/// also while the writer is frozen: the router's check whether the closure left a transaction
/// open is not sent for a closure that sent nothing, and a check that hangs never replaces the
/// closure's answer. Before the fix the check was sent to the frozen writer inside the call's
/// watchdog, which cut it at the deadline plus grace and answered `ServerUnresponsive`.
#[test]
fn galera_router_answers_a_call_without_a_round_trip_on_a_frozen_writer() {
    let _guard = exclusive();
    let mut guard = cluster();
    let cluster = guard.as_mut().expect("cluster");
    let (_urls, router, writer) = funded_router(cluster, "gal_route_frozen_bad_input");
    let ledger = BalanceLedger::new();
    let answer = while_paused(cluster, writer, || {
        router.write(
            Deadline::after(Duration::from_millis(500)),
            |conn, deadline| ledger.charge_by(conn, 9, Decimal::new(-1, 0), "bad", deadline),
        )
    });
    assert!(
        matches!(answer, Err(Error::InvalidAmount { .. })),
        "{answer:?}"
    );
}

/// A routed `CombiningLedger` answers a retry of a hold whose expiry has passed as its single
/// call — the recorded entry — also when the writer's pooled connection was left inside a
/// transaction by a router closure of the application: that connection is discarded and the
/// lookup runs on another. Before the fix the lookup met the open transaction as the caller's
/// own and answered the retry `InvalidExpiry` ("never placed") while its hold stood.
#[test]
fn galera_routed_retry_of_an_expired_hold_is_not_fooled_by_a_leftover_transaction() {
    use lockstock::combine::CombiningLedger;
    let _guard = exclusive();
    let mut guard = cluster();
    let cluster = guard.as_mut().expect("cluster");
    let urls = database(cluster, "gal_route_expired_leftover");
    let (router, _writer) = router_with(&urls, 1, Duration::from_millis(200));
    let hot = CombiningLedger::routed(router.clone(), BalanceLedger::new());
    hot.charge(1, Decimal::new(100, 0), "fund").expect("fund");
    let expires_at = chrono::Utc::now().naive_utc() + chrono::Duration::milliseconds(1_500);
    let hold = hot
        .hold(1, Decimal::new(10, 0), "h", expires_at)
        .expect("the hold");
    while chrono::Utc::now().naive_utc() <= expires_at + chrono::Duration::milliseconds(100) {
        thread::sleep(Duration::from_millis(50));
    }
    // The application's closure leaves a transaction open on the writer's only pooled
    // connection.
    router
        .write(Deadline::after(OP_BUDGET), |conn, _| {
            conn.batch_execute("START TRANSACTION; SELECT 1")
                .map_err(|e| Error::Server(lockstock::ServerError::new(e)))
        })
        .expect("the application's closure");
    let retried = hot.hold(1, Decimal::new(10, 0), "h", expires_at);
    assert_eq!(retried.expect("the recorded entry"), hold);
}

/// Sets `wsrep_sync_wait` globally on every node of these URLs, and back to 0 when dropped,
/// however the test ends.
struct GlobalSyncWait(Vec<String>);

impl GlobalSyncWait {
    fn set(urls: &[String], value: u32) -> Self {
        for url in urls {
            causal(url)
                .batch_execute(&format!("SET GLOBAL wsrep_sync_wait = {value}"))
                .expect("a global causal wait");
        }
        Self(urls.to_vec())
    }
}

impl Drop for GlobalSyncWait {
    fn drop(&mut self) {
        for url in &self.0 {
            if let Ok(mut conn) = MysqlConnection::establish(url) {
                let _ = conn.batch_execute("SET GLOBAL wsrep_sync_wait = 0");
            }
        }
    }
}

/// On a cluster whose nodes wait causally by default (a global `wsrep_sync_wait = 1`, set up for
/// read-your-writes), the router's writes do not: its write sessions set `wsrep_sync_wait = 0`
/// (a NOWAIT read would wait for the node to apply the cluster's earlier writes, stalled with
/// it when another node pauses), and its causal reads keep theirs. Before the fix the write
/// sessions took the node's global value.
#[test]
fn galera_router_writes_without_a_causal_wait_whatever_the_nodes_default() {
    let _guard = exclusive();
    let mut guard = cluster();
    let cluster = guard.as_mut().expect("cluster");
    let urls = database(cluster, "gal_route_sync_wait");
    let _global = GlobalSyncWait::set(&urls, 1);
    let (router, _writer) = router_with(&urls, 2, Duration::from_secs(2));
    let session_wait = |conn: &mut MysqlConnection| -> Result<i64, Error> {
        Ok(diesel::select(diesel::dsl::sql::<BigInt>(
            "CAST(@@session.wsrep_sync_wait AS SIGNED)",
        ))
        .get_result::<i64>(conn)?)
    };
    let written = router
        .write(Deadline::after(DEADLINE), |conn, _| session_wait(conn))
        .expect("a write session");
    let read = router
        .read(Deadline::after(DEADLINE), |conn, _| session_wait(conn))
        .expect("a read session");
    assert_eq!(written, 0, "the write session waits causally");
    assert_eq!(read, 1, "the read session does not");
}
