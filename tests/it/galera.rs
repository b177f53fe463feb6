//! lockstock on a throwaway 3-node MariaDB Galera cluster (`lockstock_testkit::galera`):
//! certification conflicts between writers on different nodes are typed and retried, and a node
//! outside the Primary component answers a typed `NodeNotReady`.
//!
//! Each test starts its own cluster (about 10 s) and holds testkit's `exclusive()` guard: the
//! tests assert deadlines, and three servers per test fill the two cores.

use std::sync::{mpsc, Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::BigInt;
use lockstock::{BalanceLedger, Error, ServerErrorKind};
use rust_decimal::Decimal;

use lockstock_testkit::fixtures::{exclusive, snapshot, Snapshot};
use lockstock_testkit::galera::GaleraCluster;

/// Per call: its key, (the change to the accounts' total, journal entries written), time.
type Answer = (String, Result<(Decimal, usize), Error>, Duration);

/// How long the conflicting clients may take altogether before the test fails as hung.
const HANG_LIMIT: Duration = Duration::from_secs(30);

/// How far a call may run past its deadline (a scheduling slice on two busy cores).
const DEADLINE_SLACK: Duration = Duration::from_secs(1);

/// A connection to `url` whose reads wait until the node applied every earlier commit of the
/// cluster (`wsrep_sync_wait`).
fn causal(url: &str) -> MysqlConnection {
    let mut conn = MysqlConnection::establish(url).unwrap_or_else(|e| panic!("connect {url}: {e}"));
    conn.batch_execute("SET SESSION wsrep_sync_wait = 1")
        .expect("wsrep_sync_wait");
    conn
}

/// Every row of both ledger tables on one node, after it applied every earlier commit.
fn dump(url: &str) -> Snapshot {
    snapshot(&mut causal(url))
}

#[derive(QueryableByName)]
struct Counter {
    #[diesel(sql_type = BigInt)]
    total: i64,
}

/// Transactions of this node that lost certification or were aborted by a replicated write.
fn conflicts(url: &str) -> u64 {
    let counter: Counter = diesel::sql_query(
        "SELECT CAST(COALESCE(SUM(variable_value), 0) AS SIGNED) AS total \
         FROM information_schema.global_status \
         WHERE variable_name IN ('WSREP_LOCAL_CERT_FAILURES', 'WSREP_LOCAL_BF_ABORTS')",
    )
    .get_result(&mut causal(url))
    .expect("wsrep status");
    eprintln!(
        "  {url}: {} certification failures and brute-force aborts",
        counter.total
    );
    u64::try_from(counter.total).expect("a counter")
}

/// A typed answer: anything but an unclassified server error or an internal failure.
fn assert_typed(error: &Error, what: &str) {
    assert!(
        !matches!(error.server_kind(), Some(ServerErrorKind::Other))
            && !matches!(error, Error::Internal { .. }),
        "{what}: untyped answer {error:?}"
    );
}

/// Ledger calls on the same two accounts from clients on two nodes at once: writes that lose
/// certification (or are aborted by a replicated write) come back as 1213 and are retried by the
/// runner, every answer is typed and within its deadline, and afterwards all three nodes hold
/// the same rows and pass the audit.
///
/// Not in `make test` yet: in about 2 runs of 5 one call never returns — its connection was
/// brute-force aborted by a replicated write, the server shows it `Killed` and waits for a
/// command while the client waits for the answer to `SELECT LAST_INSERT_ID()` (the hang the
/// independent Galera workload saw). The test gives up after 30 s and fails then. It goes back
/// into the suite with the client-side deadline mechanism of issue 11 (a watchdog that ends a
/// call whose server went silent). Run it with `cargo test --test it galera:: -- --ignored`.
#[test]
#[ignore = "a brute-force-aborted connection can hang forever until the client-side deadline mechanism lands (issue 11)"]
fn galera_write_conflicts_are_typed_and_retried() {
    let _guard = exclusive();
    let started = Instant::now();
    let mut cluster = GaleraCluster::start(3).expect("start cluster");
    let urls = cluster.create_database("gal_conflicts").expect("database");
    lockstock::run_migrations(&mut causal(&urls[0])).expect("migrate");
    eprintln!("cluster and schema ready after {:?}", started.elapsed());

    let ledger = BalanceLedger::new();
    let deadline = ledger.policy().retry.deadline;
    let fund = Decimal::new(1_000_000, 0);
    for user in [1, 2] {
        ledger
            .charge(&mut causal(&urls[0]), user, fund, &format!("seed-{user}"))
            .expect("seed");
    }
    let before: u64 = urls.iter().map(|u| conflicts(u)).sum();

    // Two clients on node 0 and two on node 1, all on accounts 1 and 2.
    const THREADS: usize = 4;
    const CALLS: usize = 25;
    let barrier = Arc::new(Barrier::new(THREADS));
    let (sender, answered) = mpsc::channel::<Vec<Answer>>();
    for t in 0..THREADS {
        let (url, barrier, ledger) = (urls[t % 2].clone(), barrier.clone(), ledger.clone());
        let sender = sender.clone();
        // Not scoped: a call that never returns must fail the test, not hang it.
        thread::spawn(move || {
            // Causal reads: the seeds are visible on both nodes.
            let conn = &mut causal(&url);
            barrier.wait();
            let answers = (0..CALLS)
                .map(|i| {
                    let key = format!("t{t}-{i}");
                    let one = Decimal::ONE;
                    let at = Instant::now();
                    let answer = match i % 3 {
                        0 => ledger.charge(conn, 1, one, &key).map(|_| (one, 1)),
                        1 => ledger.deduct(conn, 1, one, &key).map(|_| (-one, 1)),
                        _ => {
                            let (from, to) = if t < 2 { (1, 2) } else { (2, 1) };
                            let sent = ledger.transfer(conn, from, to, one, &key);
                            sent.map(|_| (Decimal::ZERO, 2))
                        }
                    };
                    (key, answer, at.elapsed())
                })
                .collect();
            let _ = sender.send(answers);
        });
    }
    let calls_started = Instant::now();
    let answers: Vec<Vec<Answer>> = (0..THREADS)
        .map(|_| {
            answered.recv_timeout(HANG_LIMIT).unwrap_or_else(|_| {
                panic!(
                    "a client's ledger calls did not return within {:?} (deadline {deadline:?}): \
                     a call hangs on a connection the cluster aborted",
                    calls_started.elapsed()
                )
            })
        })
        .collect();

    let (mut net, mut entries) = (Decimal::ZERO, 2);
    let (mut ok, mut contended, mut slowest) = (0, 0, Duration::ZERO);
    for (key, answer, took) in answers.iter().flatten() {
        slowest = slowest.max(*took);
        assert!(
            *took <= deadline + DEADLINE_SLACK,
            "{key} took {took:?}: {answer:?}"
        );
        match answer {
            Ok((change, written)) => {
                ok += 1;
                net += change;
                entries += written;
            }
            Err(e) => {
                assert_typed(e, key);
                // Conflicts are retried: only running out of retries or deadline may fail.
                assert!(matches!(e, Error::Contended { .. }), "{key}: {e:?}");
                contended += 1;
            }
        }
    }
    let seen: u64 = urls.iter().map(|u| conflicts(u)).sum::<u64>() - before;
    eprintln!(
        "{ok} calls succeeded, {contended} contended, {seen} conflicts aborted by the cluster, \
         slowest call {slowest:?}"
    );
    assert!(seen > 0, "no certification conflict was provoked");
    assert!(ok >= THREADS * CALLS * 9 / 10, "too few calls succeeded");

    // The same rows on every node, consistent on every node.
    cluster
        .wait_cluster_synced(Duration::from_secs(30))
        .expect("cluster synced");
    let first = dump(&urls[0]);
    let total: Decimal = first.balances.iter().map(|b| b.1).sum();
    assert_eq!(total, fund + fund + net, "the money adds up");
    assert_eq!(
        first.history.len(),
        entries,
        "one journal entry per charge and deduct, two per transfer"
    );
    for (node, url) in urls.iter().enumerate() {
        assert_eq!(dump(url), first, "node {node} differs from node 0");
        let conn = &mut causal(url);
        for user in [1, 2] {
            let report = ledger
                .audit(conn, user)
                .unwrap_or_else(|e| panic!("audit of {user} on node {node}: {e}"));
            assert!(report.problems.is_empty(), "node {node}: {report:?}");
        }
    }
    eprintln!(
        "galera_write_conflicts_are_typed_and_retried took {:?}",
        started.elapsed()
    );
}

/// A node cut off from the other two (they are paused, so it loses quorum) refuses lockstock's
/// calls with 1047: typed `NodeNotReady`, within the deadline, nothing applied; the same call
/// with the same key then succeeds on another node.
#[test]
fn galera_non_primary_node_is_typed() {
    let _guard = exclusive();
    let started = Instant::now();
    let mut cluster = GaleraCluster::builder()
        .nodes(3)
        .fast_eviction()
        .start()
        .expect("start cluster");
    let urls = cluster.create_database("gal_not_ready").expect("database");
    lockstock::run_migrations(&mut causal(&urls[0])).expect("migrate");
    let ledger = BalanceLedger::new();
    let deadline = ledger.policy().retry.deadline;
    let mut node0 = causal(&urls[0]);
    let ten = Decimal::new(10, 0);
    ledger.charge(&mut node0, 1, ten, "seed").expect("seed");

    // Isolate node 0: it goes non-Primary once it gives up on the others.
    cluster.pause(1).expect("pause 1");
    cluster.pause(2).expect("pause 2");
    let isolated = Instant::now();
    loop {
        let status = cluster.status(0).expect("status of node 0");
        if status.cluster_status != "Primary" {
            eprintln!("node 0 is {status:?} after {:?}", isolated.elapsed());
            break;
        }
        assert!(
            isolated.elapsed() < Duration::from_secs(30),
            "node 0 stayed Primary"
        );
        thread::sleep(Duration::from_millis(100));
    }

    // A write on a connection that worked before, a read, and a write on a new connection.
    let mut fresh = MysqlConnection::establish(&urls[0]).expect("connect to node 0");
    let mut fresh2 = MysqlConnection::establish(&urls[0]).expect("connect to node 0");
    let calls: [(&str, &mut MysqlConnection, bool); 3] = [
        ("deduct", &mut node0, true),
        ("balance", &mut fresh, false),
        ("deduct on a new connection", &mut fresh2, true),
    ];
    for (what, conn, write) in calls {
        let at = Instant::now();
        let answer = if write {
            ledger.deduct(conn, 1, Decimal::ONE, "cut-off").map(|_| ())
        } else {
            ledger.balance(conn, 1).map(|_| ())
        };
        let took = at.elapsed();
        eprintln!("{what} on the non-Primary node: {answer:?} in {took:?}");
        let error = answer.expect_err("a non-Primary node must refuse");
        assert_typed(&error, what);
        assert_eq!(
            error.server_kind(),
            Some(ServerErrorKind::NodeNotReady),
            "{what}: {error:?}"
        );
        assert!(
            error.is_retryable() && !error.is_outcome_unknown(),
            "{what}: {error:?}"
        );
        assert!(took <= deadline + DEADLINE_SLACK, "{what} took {took:?}");
    }

    // Bring the others back; the call, repeated with the same key on node 1, applies once.
    cluster.resume(1).expect("resume 1");
    cluster.resume(2).expect("resume 2");
    let rejoin = Instant::now();
    cluster
        .wait_cluster_synced(Duration::from_secs(40))
        .expect("cluster synced again");
    eprintln!("cluster synced {:?} after resume", rejoin.elapsed());
    let entry = ledger
        .deduct(&mut causal(&urls[1]), 1, Decimal::ONE, "cut-off")
        .expect("the same deduct on node 1");
    assert_eq!(
        entry.balance_after,
        ten - Decimal::ONE,
        "applied exactly once"
    );
    for (node, url) in urls.iter().enumerate() {
        let conn = &mut causal(url);
        let report = ledger
            .audit(conn, 1)
            .unwrap_or_else(|e| panic!("audit on node {node}: {e}"));
        assert!(
            report.problems.is_empty() && report.entries == 2,
            "node {node}: {report:?}"
        );
    }
    eprintln!(
        "galera_non_primary_node_is_typed took {:?}",
        started.elapsed()
    );
}
