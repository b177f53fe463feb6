//! lockstock on a throwaway 3-node MariaDB Galera cluster (`lockstock_testkit::galera`):
//! certification conflicts between writers on different nodes are typed and retried, and a node
//! outside the Primary component answers a typed `NodeNotReady`.
//!
//! The tests that need three nodes (conflicts, a node outside the Primary component, a paused
//! node, silent rollbacks) share the router tests' cluster (`galera_router::cluster`: short
//! `evs` timeouts, healed at the start of each test, a database per test); the others start a
//! cluster of one or two nodes of their own. Each holds testkit's `exclusive()` guard: the
//! tests assert deadlines, and the servers fill the two cores.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Nullable, Text, Unsigned};
use lockstock::combine::{CombiningIssuer, CombiningLedger};
use lockstock::{BalanceLedger, CouponIssuer, Error, ServerErrorKind, TxnPolicy};
use rust_decimal::Decimal;

use lockstock_testkit::fixtures::{
    audit_ok, count_key, exclusive, funded_account, issued_rows, open_campaign,
    policy_with_deadline, pool_with, snapshot, stock_row, user_coupon_rows, Snapshot,
};
use lockstock_testkit::galera::GaleraCluster;

/// One ledger call of the conflict test: what it was, on which account, with which key, its
/// answer and how long it took.
#[derive(Debug)]
struct Call {
    /// The client and its call number (the key is `t{client}-{index}`).
    client: usize,
    index: usize,
    kind: &'static str,
    /// The account whose journal entry carries the key (a transfer's sender).
    user: i64,
    key: String,
    answer: Result<(), Error>,
    took: Duration,
}

/// How the checked calls ([`assert_true`]) were answered.
#[derive(Debug, Default)]
struct Tally {
    ok: usize,
    contended: usize,
    /// `ServerUnresponsive`: the watchdog ended the call.
    unresponsive: usize,
    timeout: usize,
    outcome_unknown: usize,
    /// `ConnectionBroken`: a call on a connection an earlier call left broken (e.g. the
    /// watchdog shut it down after COMMIT while the session was being restored): refused
    /// before anything was sent.
    broken: usize,
}

/// Asserts that `call`'s answer is typed and true against the database on `conn` (coupons of
/// `campaign`): its entry or coupon present once for a success, absent for an answer that
/// says nothing was applied, at most once for `OutcomeUnknown`. Returns how often it is present.
fn assert_true(conn: &mut MysqlConnection, campaign: i64, call: &Call, tally: &mut Tally) -> i64 {
    let applied = match call.kind {
        "issue" => held(conn, campaign, call.user),
        _ => count_key(conn, call.user, &call.key),
    };
    let (count, at_most) = match &call.answer {
        Ok(()) => (&mut tally.ok, 1),
        Err(Error::Contended { .. }) => (&mut tally.contended, 0),
        Err(Error::ServerUnresponsive { .. }) => (&mut tally.unresponsive, 0),
        Err(Error::Timeout { .. }) => (&mut tally.timeout, 0),
        Err(Error::OutcomeUnknown { .. }) => (&mut tally.outcome_unknown, 1),
        Err(Error::ConnectionBroken { .. }) => (&mut tally.broken, 0),
        Err(e) => {
            assert_typed(e, &call.key);
            panic!("unexpected answer: {call:?}");
        }
    };
    *count += 1;
    let at_least = i64::from(call.answer.is_ok());
    assert!(
        (at_least..=at_most).contains(&applied),
        "present {applied} times: {call:?}"
    );
    applied
}

/// On the node behind `url` (read causally): every account of `users` passes `audit`, and the
/// campaign's stock plus its issued rows make its total.
fn assert_node_consistent(
    ledger: &BalanceLedger,
    url: &str,
    users: impl IntoIterator<Item = i64>,
    campaign: i64,
) {
    let conn = &mut causal(url);
    for user in users {
        audit_ok(ledger, conn, user);
    }
    let (total, stock) = stock_row(conn, campaign);
    assert_eq!(
        i64::from(total - stock),
        issued_rows(conn, campaign),
        "{url}"
    );
}

/// How long the conflicting clients may take altogether before the test fails as hung.
const HANG_LIMIT: Duration = Duration::from_secs(30);

/// What the watchdog promises for a call under `policy`: its deadline plus the
/// `unresponsive_grace`, plus a second for scheduling on two busy cores.
fn bound(policy: &TxnPolicy) -> Duration {
    policy.retry.deadline + policy.unresponsive_grace + Duration::from_secs(1)
}

/// A connection to `url` whose reads wait until the node applied every earlier commit of the
/// cluster (`wsrep_sync_wait`).
fn causal(url: &str) -> MysqlConnection {
    let mut conn = MysqlConnection::establish(url).unwrap_or_else(|e| panic!("connect {url}: {e}"));
    conn.batch_execute("SET SESSION wsrep_sync_wait = 1")
        .expect("wsrep_sync_wait");
    conn
}

/// Waits (at most 30 s) until no other session works in the test's database on any of `urls`
/// (runs a statement, or idles in an open transaction) and no node has write-sets queued to
/// apply or send; a node's state is printed and the test fails otherwise.
fn quiesce(urls: &[String]) {
    let until = Instant::now() + Duration::from_secs(30);
    for url in urls {
        let mut conn = causal(url);
        loop {
            let busy: i64 = diesel::dsl::sql::<diesel::sql_types::BigInt>(
                "SELECT (SELECT COUNT(*) FROM information_schema.PROCESSLIST p \
                   WHERE p.DB = DATABASE() AND p.ID <> CONNECTION_ID() \
                   AND (p.COMMAND <> 'Sleep' OR EXISTS (SELECT 1 FROM \
                     information_schema.INNODB_TRX t WHERE t.trx_mysql_thread_id = p.ID))) \
                 + (SELECT CAST(VARIABLE_VALUE AS SIGNED) FROM information_schema.GLOBAL_STATUS \
                   WHERE VARIABLE_NAME = 'WSREP_LOCAL_RECV_QUEUE') \
                 + (SELECT CAST(VARIABLE_VALUE AS SIGNED) FROM information_schema.GLOBAL_STATUS \
                   WHERE VARIABLE_NAME = 'WSREP_LOCAL_SEND_QUEUE')",
            )
            .get_result(&mut conn)
            .expect("the node's sessions and queues");
            if busy == 0 {
                break;
            }
            if Instant::now() >= until {
                print_node_state(url);
                panic!("{url}: still busy 30 s after the calls ended");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A connection to `url` once the node applied every commit of the cluster so far, with plain
/// (fast) reads from then on: for checking many answers after the calls ended.
fn caught_up(url: &str) -> MysqlConnection {
    let mut conn = causal(url);
    snapshot(&mut conn);
    conn.batch_execute("SET SESSION wsrep_sync_wait = 0")
        .expect("wsrep_sync_wait");
    conn
}

/// Every row of both ledger tables on one node, after it applied every earlier commit. Where
/// the node does not catch up in time (its causal read answers "Lock wait timeout exceeded",
/// seen once in CI), the node's open transactions and replication state are printed first.
fn dump(url: &str) -> Snapshot {
    let mut conn = causal(url);
    if let Err(e) = diesel::sql_query("SELECT COUNT(*) AS total FROM user_balance")
        .get_result::<Counter>(&mut conn)
    {
        eprintln!("{url}: the causal read failed: {e}");
        print_node_state(url);
    }
    snapshot(&mut conn)
}

/// A node's open InnoDB transactions, its replication queue and state, and its sessions (a
/// diagnosis printed before a test fails on that node).
fn print_node_state(url: &str) {
    #[derive(QueryableByName, Debug)]
    struct Line {
        #[diesel(sql_type = Nullable<Text>)]
        line: Option<String>,
    }
    let Ok(mut conn) = MysqlConnection::establish(url) else {
        eprintln!("{url}: cannot connect for a diagnosis");
        return;
    };
    for (what, query) in [
        (
            "open transactions",
            "SELECT CONCAT_WS(' ', trx_id, trx_state, trx_started, trx_mysql_thread_id, \
             trx_rows_locked, trx_rows_modified, LEFT(COALESCE(trx_query, ''), 80)) AS line \
             FROM information_schema.INNODB_TRX",
        ),
        (
            "replication",
            "SELECT CONCAT_WS(' ', variable_name, variable_value) AS line \
             FROM information_schema.GLOBAL_STATUS WHERE variable_name IN \
             ('WSREP_LOCAL_RECV_QUEUE', 'WSREP_LOCAL_SEND_QUEUE', 'WSREP_LOCAL_STATE_COMMENT', \
             'WSREP_FLOW_CONTROL_PAUSED', 'WSREP_LAST_COMMITTED', 'WSREP_APPLIER_THREAD_COUNT')",
        ),
        (
            "sessions",
            "SELECT CONCAT_WS(' ', id, user, command, time, COALESCE(state, ''), \
             LEFT(COALESCE(info, ''), 80)) AS line FROM information_schema.PROCESSLIST \
             WHERE command <> 'Sleep' OR time > 5",
        ),
    ] {
        match diesel::sql_query(query).load::<Line>(&mut conn) {
            Ok(lines) => {
                eprintln!("{url}: {what}:");
                for line in lines {
                    eprintln!("  {}", line.line.unwrap_or_default());
                }
            }
            Err(e) => eprintln!("{url}: {what}: {e}"),
        }
    }
}

#[derive(QueryableByName)]
struct Counter {
    #[diesel(sql_type = BigInt)]
    total: i64,
}

/// Creates database `name` on every node of `cluster` and migrates it; one URL per node. Every
/// node has the same schema (the migrations' DDL replicated, their prepared steps included).
/// The cluster is synced again before the schemas are read: a view change Galera went through
/// meanwhile (a loaded machine, short eviction timeouts) is set-up's, not the test's.
fn migrated(cluster: &mut GaleraCluster, name: &str) -> Vec<String> {
    let urls = cluster.create_database(name).expect("database");
    lockstock::run_migrations(&mut causal(&urls[0])).expect("migrate");
    cluster
        .wait_cluster_synced(Duration::from_secs(40))
        .expect("the cluster synced after the migrations");
    #[derive(QueryableByName)]
    struct Created {
        #[diesel(sql_type = diesel::sql_types::Text, column_name = "Create Table")]
        sql: String,
    }
    let schema = |url: &str| -> Vec<String> {
        let mut conn = causal(url);
        [
            "user_balance",
            "balance_history",
            "balance_hold",
            "coupon",
            "fcfs_coupon",
            "user_coupon",
            "fcfs_coupon_restock",
            "designated_writer",
        ]
        .iter()
        .map(|table| {
            diesel::sql_query(format!("SHOW CREATE TABLE `{table}`"))
                .get_result::<Created>(&mut conn)
                .unwrap_or_else(|e| panic!("{url}: table {table}: {e}"))
                .sql
        })
        .collect()
    };
    let first = schema(&urls[0]);
    for url in &urls[1..] {
        assert_eq!(
            schema(url),
            first,
            "{url}: the schema differs from node 0's"
        );
    }
    urls
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

/// A typed answer: anything but an unclassified server error or an internal failure — nor a
/// foreign-key violation, which here can only mean a row lost to a silent rollback.
fn assert_typed(error: &Error, what: &str) {
    assert!(
        !matches!(
            error.server_kind(),
            Some(ServerErrorKind::Other | ServerErrorKind::ForeignKeyViolation)
        ) && !matches!(error, Error::Internal { .. }),
        "{what}: untyped answer {error:?}"
    );
}

/// Ledger calls on the same two accounts from clients on two nodes at once: writes that lose
/// certification (or are aborted by a replicated write) come back as 1213 and are retried by the
/// runner; every answer is typed, no call outlives its deadline + grace + 1 s, and every answer
/// is true against the database: an entry for each success, none for an answer that says
/// nothing was applied, at most one for `OutcomeUnknown` (resolved by repeating the call with
/// its key). Afterwards all three nodes hold the same rows and pass the audit.
///
/// A brute-force-aborted connection can hang: the server shows it `Killed` and waits for a
/// command while the client waits for an answer (the hang the independent Galera workload saw).
/// The watchdog ends such a call at deadline + grace with `ServerUnresponsive`; the test counts
/// them. The test gives up after 30 s if a call still hangs.
#[test]
fn galera_write_conflicts_are_typed_and_retried() {
    let _guard = exclusive();
    let started = Instant::now();
    // The shared 3-node cluster of the router tests (healed at the start of each test): a
    // cluster of its own took 10-20 s to start.
    let mut guard = crate::galera_router::cluster();
    let cluster = guard.as_mut().expect("cluster");
    let urls = migrated(cluster, "gal_conflicts");
    eprintln!("cluster and schema ready after {:?}", started.elapsed());

    let ledger = BalanceLedger::new();
    let bound = bound(ledger.policy());
    let fund = Decimal::new(1_000_000, 0);
    for user in [1, 2] {
        ledger
            .charge(&mut causal(&urls[0]), user, fund, &format!("seed-{user}"))
            .expect("seed");
    }
    let before: u64 = urls.iter().map(|u| conflicts(u)).sum();

    // The ledger call `i` of client `t`: its kind, the account that holds its key, its answer.
    let perform = |ledger: &BalanceLedger, conn: &mut MysqlConnection, t: usize, i: usize| {
        let (key, one) = (format!("t{t}-{i}"), Decimal::ONE);
        match i % 3 {
            0 => ("charge", 1, ledger.charge(conn, 1, one, &key).map(drop)),
            1 => ("deduct", 1, ledger.deduct(conn, 1, one, &key).map(drop)),
            _ => {
                let (from, to) = if t < 2 { (1, 2) } else { (2, 1) };
                let sent = ledger.transfer(conn, from, to, one, &key);
                ("transfer", from, sent.map(drop))
            }
        }
    };

    // Two clients on node 0 and two on node 1, all on accounts 1 and 2.
    const THREADS: usize = 4;
    const CALLS: usize = 25;
    let barrier = Arc::new(Barrier::new(THREADS));
    let (sender, answered) = mpsc::channel::<Vec<Call>>();
    for t in 0..THREADS {
        let (url, barrier, ledger) = (urls[t % 2].clone(), barrier.clone(), ledger.clone());
        let sender = sender.clone();
        // Not scoped: a call that never returns must fail the test, not hang it.
        thread::spawn(move || {
            // Causal reads: the seeds are visible on both nodes.
            let mut conn = causal(&url);
            barrier.wait();
            let calls = (0..CALLS)
                .map(|i| {
                    let at = Instant::now();
                    let (kind, user, answer) = perform(&ledger, &mut conn, t, i);
                    let took = at.elapsed();
                    if matches!(
                        answer,
                        Err(Error::ServerUnresponsive { .. }
                            | Error::OutcomeUnknown { .. }
                            | Error::ConnectionBroken { .. })
                    ) {
                        // The watchdog shut this connection down (or it broke): a new one.
                        conn = causal(&url);
                    }
                    let key = format!("t{t}-{i}");
                    Call {
                        client: t,
                        index: i,
                        kind,
                        user,
                        key,
                        answer,
                        took,
                    }
                })
                .collect();
            let _ = sender.send(calls);
        });
    }
    let calls_started = Instant::now();
    let calls: Vec<Call> = (0..THREADS)
        .flat_map(|_| {
            answered.recv_timeout(HANG_LIMIT).unwrap_or_else(|_| {
                panic!(
                    "a client's ledger calls did not return within {:?} (bound {bound:?}): \
                     a call hangs on a connection the cluster aborted",
                    calls_started.elapsed()
                )
            })
        })
        .collect();

    let late: Vec<&Call> = calls.iter().filter(|c| c.took > bound).collect();
    assert!(late.is_empty(), "calls later than {bound:?}: {late:#?}");
    // Every answer is typed and true against the database (node 0, causal reads).
    let conn = &mut caught_up(&urls[0]);
    let (mut net, mut entries) = (Decimal::ZERO, 2);
    let (mut ok, mut contended, mut unresponsive, mut unknown) = (0, 0, 0, 0);
    let mut not_ready = 0;
    for call in &calls {
        let applied = count_key(conn, call.user, &call.key);
        match &call.answer {
            Ok(()) => {
                ok += 1;
                assert_eq!(applied, 1, "{call:?}");
            }
            Err(e @ (Error::Contended { .. } | Error::ServerUnresponsive { .. })) => {
                // Conflicts are retried: only running out of retries or deadline may fail,
                // or a call whose server did not answer (the watchdog ended it).
                if matches!(e, Error::Contended { .. }) {
                    contended += 1;
                } else {
                    unresponsive += 1;
                }
                assert_eq!(applied, 0, "answered nothing applied: {call:?}");
                continue;
            }
            // A node briefly outside the Primary component (the shared cluster evicts a
            // silent peer within ~3 s, and loaded cores can make one look silent): refused
            // before anything was applied.
            Err(e) if e.server_kind() == Some(ServerErrorKind::NodeNotReady) => {
                not_ready += 1;
                assert_eq!(applied, 0, "answered nothing applied: {call:?}");
                continue;
            }
            Err(Error::OutcomeUnknown { .. }) => {
                unknown += 1;
                assert!(applied <= 1, "{call:?}");
                // The same call with the same key settles it: applied exactly once.
                let (_, _, again) = perform(&ledger, conn, call.client, call.index);
                again.unwrap_or_else(|e| panic!("repeating {call:?}: {e:?}"));
                assert_eq!(count_key(conn, call.user, &call.key), 1, "{call:?}");
            }
            Err(e) => {
                assert_typed(e, &call.key);
                panic!("unexpected answer: {call:?}");
            }
        }
        let (change, written) = match call.kind {
            "charge" => (Decimal::ONE, 1),
            "deduct" => (-Decimal::ONE, 1),
            _ => (Decimal::ZERO, 2),
        };
        net += change;
        entries += written;
    }
    let seen: u64 = urls.iter().map(|u| conflicts(u)).sum::<u64>() - before;
    eprintln!(
        "{ok} calls succeeded, {contended} contended, {unresponsive} ServerUnresponsive \
         (the watchdog fired), {not_ready} NodeNotReady, {unknown} OutcomeUnknown; {seen} \
         conflicts aborted by the cluster; slowest call {:?}",
        calls.iter().map(|c| c.took).max().unwrap_or_default()
    );
    assert!(seen > 0, "no certification conflict was provoked");
    assert!(ok >= THREADS * CALLS * 3 / 4, "too few calls succeeded");

    // Combined calls on all three nodes: multi-row INSERTs whose ids are read back (the
    // cluster numbers them with innodb_autoinc_lock_mode = 2), under brute-force aborts.
    let issuer = CouponIssuer::new();
    let campaign = open_campaign(&mut causal(&urls[0]), &issuer, 100_000).id;
    let combined = combined_calls(&urls, &ledger, &issuer, campaign);
    // A COMMIT whose answer was lost (`OutcomeUnknown`: its connection cut, its transaction
    // aborted by another node's write and replayed) may still be applied after its caller was
    // answered: the answers and the nodes are compared once nothing runs any more.
    quiesce(&urls);
    let conn = &mut caught_up(&urls[0]);
    let late: Vec<&Call> = combined.iter().filter(|c| c.took > bound).collect();
    assert!(
        late.is_empty(),
        "combined calls later than {bound:?}: {late:#?}"
    );
    let mut tally = Tally::default();
    for call in &combined {
        // A batch the server aborted silently answered Server(Other) "Record not found" before
        // util::short_read_back (12 such answers in 25 s of 12 combining clients; this short
        // phase does not catch one reliably).
        let applied = assert_true(conn, campaign, call, &mut tally);
        let change = match call.kind {
            "charge" => Decimal::ONE,
            "deduct" => -Decimal::ONE,
            _ => Decimal::ZERO,
        };
        if call.kind != "issue" {
            net += change * Decimal::from(applied);
            entries += usize::try_from(applied).expect("a count");
        }
    }
    eprintln!("{} combined calls: {tally:?}", combined.len());

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
        assert_node_consistent(&ledger, url, [1, 2], campaign);
    }
    assert_eq!(checksums(&urls[1]), checksums(&urls[0]));
    eprintln!(
        "galera_write_conflicts_are_typed_and_retried took {:?}",
        started.elapsed()
    );
}

/// Combined calls from two clients on each node for 6 s: charges and deducts on accounts 1
/// and 2 through a `CombiningLedger`, coupons of `campaign` through a `CombiningIssuer`, each
/// over a pool to its node. Every call, in no particular order.
fn combined_calls(
    urls: &[String],
    ledger: &BalanceLedger,
    issuer: &CouponIssuer,
    campaign: i64,
) -> Vec<Call> {
    const CLIENTS: usize = 2;
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_on_drop = crate::StopOnDrop(&stop);
    let (sender, answered) = mpsc::channel::<Vec<Call>>();
    for (node, url) in urls.iter().enumerate() {
        let policy = ledger.policy().clone();
        let hot_ledger = Arc::new(CombiningLedger::new(
            pool_with(url, 2, policy.clone()),
            ledger.clone(),
        ));
        let hot_issuer = Arc::new(CombiningIssuer::new(
            pool_with(url, 2, policy),
            issuer.clone(),
        ));
        for t in 0..CLIENTS {
            let (hot_ledger, hot_issuer) = (hot_ledger.clone(), hot_issuer.clone());
            let (stop, sender) = (stop.clone(), sender.clone());
            let client = node * CLIENTS + t;
            // Not scoped: a call that never returns must fail the test, not hang it.
            thread::spawn(move || {
                let mut calls = Vec::new();
                for index in 0.. {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let key = format!("c{client}-{index}");
                    let account = 1 + (index % 2) as i64;
                    let at = Instant::now();
                    let (kind, user, answer) = match index % 3 {
                        0 => {
                            let charged = hot_ledger.charge(account, Decimal::ONE, &key);
                            ("charge", account, charged.map(drop))
                        }
                        1 => {
                            let deducted = hot_ledger.deduct(account, Decimal::ONE, &key);
                            ("deduct", account, deducted.map(drop))
                        }
                        _ => {
                            let holder = 1_000_000 * (client as i64 + 1) + index as i64;
                            (
                                "issue",
                                holder,
                                hot_issuer.issue(holder, campaign).map(drop),
                            )
                        }
                    };
                    calls.push(Call {
                        client,
                        index,
                        kind,
                        user,
                        key,
                        answer,
                        took: at.elapsed(),
                    });
                }
                let _ = sender.send(calls);
            });
        }
    }
    thread::sleep(Duration::from_secs(6));
    stop.store(true, Ordering::Relaxed);
    (0..urls.len() * CLIENTS)
        .flat_map(|_| {
            answered
                .recv_timeout(HANG_LIMIT)
                .expect("a client's combined calls did not return: a call hangs")
        })
        .collect()
}

/// A node cut off from the other two (they are paused, so it loses quorum) refuses lockstock's
/// calls with 1047: typed `NodeNotReady`, within the deadline, nothing applied; the same call
/// with the same key then succeeds on another node.
#[test]
fn galera_non_primary_node_is_typed() {
    let _guard = exclusive();
    let started = Instant::now();
    // The shared 3-node cluster of the router tests (healed at the start of each test): a
    // cluster of its own took 10-20 s to start.
    let mut guard = crate::galera_router::cluster();
    let cluster = guard.as_mut().expect("cluster");
    let urls = migrated(cluster, "gal_not_ready");
    let ledger = BalanceLedger::new();
    let bound = bound(ledger.policy());
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
        assert!(took <= bound, "{what} took {took:?}");
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

/// The checksum of each lockstock table on node `url` (`CHECKSUM TABLE`), after the node applied
/// every earlier commit of the cluster.
fn checksums(url: &str) -> Vec<(String, Option<u64>)> {
    #[derive(QueryableByName)]
    struct Checksum {
        #[diesel(sql_type = Text, column_name = "Table")]
        table: String,
        #[diesel(sql_type = Nullable<Unsigned<BigInt>>, column_name = "Checksum")]
        checksum: Option<u64>,
    }
    let conn = &mut causal(url);
    // A causal read first: CHECKSUM TABLE itself does not wait for the node to catch up.
    snapshot(conn);
    diesel::sql_query(
        "CHECKSUM TABLE user_balance, balance_history, coupon, fcfs_coupon, user_coupon",
    )
    .load::<Checksum>(conn)
    .expect("CHECKSUM TABLE")
    .into_iter()
    .map(|c| (c.table, c.checksum))
    .collect()
}

/// How many coupons of `campaign` account `holder` holds.
fn held(conn: &mut MysqlConnection, campaign: i64, holder: i64) -> i64 {
    user_coupon_rows(conn)
        .iter()
        .filter(|row| row.3 == campaign && row.1 == holder)
        .count() as i64
}

/// Waits for `done` (a call on another thread) at most `limit`; if it has not answered by then,
/// resumes `node` (so the call's thread can end) and fails the test.
fn answer_or_resume<T>(
    cluster: &mut GaleraCluster,
    node: usize,
    what: &str,
    limit: Duration,
    done: &mpsc::Receiver<T>,
) -> T {
    done.recv_timeout(limit).unwrap_or_else(|_| {
        let _ = cluster.resume(node);
        panic!("{what} did not return within {limit:?} while node {node} was paused")
    })
}

/// Node 2 is SIGSTOPped while a client runs calls on it and one on node 0: every call on node 2
/// — single and combined, ledger and coupon, the one in flight and new ones on connections
/// opened before — answers `ServerUnresponsive` (`Timeout` for a combiner's checkout) within
/// deadline + grace + 1 s, and applied nothing; calls on nodes 0 and 1 keep answering within
/// that bound and work again once the two evicted node 2 (short `evs` timeouts). After node 2
/// is resumed and rejoined, every answer is true against the database and the three nodes hold
/// identical tables (`CHECKSUM TABLE`).
#[test]
fn galera_paused_node_call_returns_by_deadline() {
    let _guard = exclusive();
    let started = Instant::now();
    // The shared 3-node cluster of the router tests (healed at the start of each test): a
    // cluster of its own took 10-20 s to start.
    let mut guard = crate::galera_router::cluster();
    let cluster = guard.as_mut().expect("cluster");
    let urls = migrated(cluster, "gal_paused");
    let policy = policy_with_deadline(Duration::from_secs(1));
    let bound = bound(&policy);
    let give_up = bound + Duration::from_secs(4);
    let ledger = BalanceLedger::with_policy(policy.clone());
    let issuer = CouponIssuer::with_policy(policy.clone());
    let conn0 = &mut causal(&urls[0]);
    for user in 1..=5 {
        funded_account(conn0, &ledger, user, Decimal::from(1_000));
    }
    let campaign = open_campaign(conn0, &issuer, 1_000).id;
    // Everything on node 2 is opened (and warmed up) before the pause: a paused node accepts
    // no new connection, and opening one is bounded by nothing.
    dump(&urls[2]);
    let mut on_paused = Some(causal(&urls[2]));
    let (mut charge_conn, mut issue_conn) = (causal(&urls[2]), causal(&urls[2]));
    let combined_ledger =
        CombiningLedger::new(pool_with(&urls[2], 1, policy.clone()), ledger.clone());
    let combined_issuer =
        CombiningIssuer::new(pool_with(&urls[2], 1, policy.clone()), issuer.clone());
    combined_ledger
        .charge(4, Decimal::ONE, "warm-up")
        .expect("combined warm-up");
    combined_issuer
        .issue(4_000, campaign)
        .expect("combined warm-up");
    eprintln!("cluster ready after {:?}", started.elapsed());

    // Clients running when the pause comes: one on node 2 (until its first failure: a new
    // connection to a paused node would hang), one on node 0 (reconnecting after a failure).
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_on_drop = crate::StopOnDrop(&stop);
    let (sender, answered) = mpsc::channel::<Vec<Call>>();
    for node in [2, 0] {
        let (ledger, issuer, stop, sender) =
            (ledger.clone(), issuer.clone(), stop.clone(), sender.clone());
        let url = urls[node].clone();
        let mut conn = match on_paused.take() {
            Some(conn) if node == 2 => conn,
            _ => causal(&url),
        };
        thread::spawn(move || {
            let mut calls = Vec::new();
            for index in 0.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let key = format!("n{node}-{index}");
                let user = node as i64 + 1;
                let at = Instant::now();
                let (kind, who, answer) = if index % 2 == 0 {
                    (
                        "charge",
                        user,
                        ledger.charge(&mut conn, user, Decimal::ONE, &key).map(drop),
                    )
                } else {
                    let holder = 10_000 * (node as i64 + 1) + index as i64;
                    (
                        "issue",
                        holder,
                        issuer.issue(&mut conn, holder, campaign).map(drop),
                    )
                };
                let failed = answer.is_err();
                calls.push(Call {
                    client: node,
                    index,
                    kind,
                    user: who,
                    key,
                    answer,
                    took: at.elapsed(),
                });
                if failed {
                    if node == 2 {
                        break;
                    }
                    conn = causal(&url);
                }
            }
            let _ = sender.send(calls);
        });
    }
    thread::sleep(Duration::from_millis(700));
    cluster.pause(2).expect("pause node 2");
    let paused = Instant::now();

    // New calls on node 2, single and combined, all at once.
    type Job = Box<dyn FnOnce() -> (&'static str, Result<(), Error>) + Send>;
    let jobs: Vec<Job> = {
        let (l, i, cl, ci) = (
            ledger.clone(),
            issuer.clone(),
            Arc::new(combined_ledger),
            Arc::new(combined_issuer),
        );
        vec![
            Box::new(move || {
                (
                    "charge",
                    l.charge(&mut charge_conn, 3, Decimal::ONE, "p-charge")
                        .map(drop),
                )
            }),
            Box::new(move || ("issue", i.issue(&mut issue_conn, 3_001, campaign).map(drop))),
            Box::new(move || {
                (
                    "combined charge",
                    cl.charge(4, Decimal::ONE, "p-combined").map(drop),
                )
            }),
            Box::new(move || ("combined issue", ci.issue(3_002, campaign).map(drop))),
        ]
    };
    let (job_sender, job_answers) = mpsc::channel();
    let jobs_count = jobs.len();
    for job in jobs {
        let job_sender = job_sender.clone();
        thread::spawn(move || {
            let at = Instant::now();
            let (what, answer) = job();
            let _ = job_sender.send((what, answer, at.elapsed()));
        });
    }
    for _ in 0..jobs_count {
        let (what, answer, took) =
            answer_or_resume(cluster, 2, "a call on node 2", give_up, &job_answers);
        eprintln!("{what} on paused node 2: {answer:?} after {took:?}");
        assert!(took <= bound, "{what} took {took:?}");
        let expected = match what {
            "charge" | "issue" => matches!(answer, Err(Error::ServerUnresponsive { .. })),
            _ => matches!(
                answer,
                Err(Error::ServerUnresponsive { .. } | Error::Timeout { .. })
            ),
        };
        assert!(expected, "{what}: {answer:?}");
    }

    // Nodes 0 and 1 evict node 2 and keep working.
    cluster
        .wait_cluster_synced(Duration::from_secs(20))
        .expect("nodes 0 and 1 evicted node 2");
    eprintln!("node 2 evicted {:?} after the pause", paused.elapsed());
    let conn1 = &mut causal(&urls[1]);
    ledger
        .charge(conn1, 5, Decimal::ONE, "after-evict")
        .expect("charge on node 1");
    issuer
        .issue(conn1, 5_001, campaign)
        .expect("issue on node 1");
    let combined0 = CombiningLedger::new(pool_with(&urls[0], 1, policy.clone()), ledger.clone());
    combined0
        .charge(5, Decimal::ONE, "after-evict-combined")
        .expect("combined charge on node 0");
    thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let calls: Vec<Call> = (0..2)
        .flat_map(|_| answer_or_resume(cluster, 2, "a running client", give_up, &answered))
        .collect();

    cluster.resume(2).expect("resume node 2");
    let resumed = Instant::now();
    cluster
        .wait_cluster_synced(Duration::from_secs(40))
        .expect("node 2 rejoined");
    eprintln!("node 2 rejoined {:?} after resume", resumed.elapsed());

    // Every answer within the bound and true; nothing of the calls on the paused node.
    let late: Vec<&Call> = calls.iter().filter(|c| c.took > bound).collect();
    assert!(late.is_empty(), "calls later than {bound:?}: {late:#?}");
    let conn = &mut caught_up(&urls[0]);
    let mut tally = Tally::default();
    for call in &calls {
        assert_true(conn, campaign, call, &mut tally);
    }
    eprintln!(
        "{} calls of the running clients: {tally:?}; slowest {:?}",
        calls.len(),
        calls.iter().map(|c| c.took).max().unwrap_or_default()
    );
    // The call in flight on node 2 when it froze: ServerUnresponsive, or OutcomeUnknown when
    // the pause caught its COMMIT — or, when the pause came just after a COMMIT, that call
    // answered its committed value once the watchdog shut the connection during the session
    // restore (taking its deadline), and the next call found the connection broken.
    let on_paused: Vec<&Call> = calls.iter().filter(|c| c.client == 2).collect();
    let last_on_paused = on_paused.iter().max_by_key(|c| c.index);
    let saw_pause = match last_on_paused.map(|c| (c.index, &c.answer)) {
        Some((_, Err(Error::ServerUnresponsive { .. } | Error::OutcomeUnknown { .. }))) => true,
        Some((index, Err(Error::ConnectionBroken { .. }))) => on_paused
            .iter()
            .any(|c| c.index + 1 == index && c.answer.is_ok() && c.took >= policy.retry.deadline),
        _ => false,
    };
    assert!(
        saw_pause,
        "the client on node 2 did not see the pause: {last_on_paused:?}"
    );
    assert_eq!(count_key(conn, 3, "p-charge"), 0);
    assert_eq!(count_key(conn, 4, "p-combined"), 0);
    assert_eq!(held(conn, campaign, 3_001) + held(conn, campaign, 3_002), 0);

    let first = checksums(&urls[0]);
    for (node, url) in urls.iter().enumerate() {
        assert_eq!(checksums(url), first, "node {node} differs from node 0");
        assert_node_consistent(&ledger, url, 1..=5, campaign);
    }
    eprintln!(
        "galera_paused_node_call_returns_by_deadline took {:?}",
        started.elapsed()
    );
}

/// The guards of a write on a Galera node, on a 1-node cluster:
/// - a transaction the server rolls back without reporting it (what MariaDB did to brute-force
///   aborted transactions with writes on several nodes; simulated here by a raw `ROLLBACK` in
///   the body's first attempt) is caught before COMMIT and retried whole — before the guard the
///   rest of the body was autocommitted and the call answered success with half of it applied;
/// - a write on a node other than the designated writer is refused, nothing applied, unless the
///   policy allows it; an empty row (no router ever designated one) allows every node.
#[test]
fn galera_guards_silent_rollbacks_and_the_designated_writer() {
    let _guard = exclusive();
    let mut cluster = GaleraCluster::start(1).expect("start cluster");
    let urls = migrated(&mut cluster, "gal_guards");
    let mut conn = causal(&urls[0]);
    conn.batch_execute(
        "CREATE TABLE silent_probe (id INT NOT NULL AUTO_INCREMENT PRIMARY KEY, \
         part VARCHAR(8) NOT NULL) ENGINE=InnoDB",
    )
    .expect("probe table");

    // A silent rollback between two writes of one transaction.
    let runner = lockstock::TxnRunner::new(TxnPolicy::default());
    let mut attempts = 0;
    runner
        .run(&mut conn, |conn| {
            attempts += 1;
            diesel::sql_query("INSERT INTO silent_probe (part) VALUES ('first')").execute(conn)?;
            if attempts == 1 {
                // What the server did to a brute-force aborted transaction: gone, unreported.
                conn.batch_execute("ROLLBACK")?;
            }
            diesel::sql_query("INSERT INTO silent_probe (part) VALUES ('second')").execute(conn)?;
            Ok(())
        })
        .expect("the transaction is retried whole");
    let parts: Vec<String> = diesel::sql_query("SELECT part FROM silent_probe ORDER BY id")
        .load::<Part>(&mut conn)
        .expect("parts")
        .into_iter()
        .map(|p| p.part)
        .collect();
    assert_eq!(parts, ["first", "second"], "attempts: {attempts}");
    assert_eq!(attempts, 2);
    let autocommit: i64 = diesel::select(diesel::dsl::sql::<BigInt>("@@autocommit"))
        .get_result(&mut conn)
        .expect("autocommit");
    assert_eq!(autocommit, 1, "the caller's autocommit is restored");

    // A body that commits through Diesel's manager (which also ends the savepoint) answers
    // `OutcomeUnknown` once, as on a standalone server. Before, the missing savepoint made it
    // a retryable deadlock: the body committed again on every attempt, and the call answered
    // `Contended` (nothing written).
    let mut attempts = 0;
    let answer = runner.run(&mut conn, |conn| {
        use diesel::connection::{AnsiTransactionManager, TransactionManager};
        attempts += 1;
        diesel::sql_query("INSERT INTO silent_probe (part) VALUES ('diesel')").execute(conn)?;
        AnsiTransactionManager::commit_transaction(conn)?;
        Ok(())
    });
    assert!(
        matches!(&answer, Err(e) if e.is_outcome_unknown()),
        "{answer:?} after {attempts} attempts"
    );
    assert_eq!(attempts, 1, "{answer:?}");
    assert_eq!(
        count(
            &mut conn,
            "SELECT COUNT(*) AS total FROM silent_probe WHERE part = 'diesel'"
        ),
        1,
        "committed once, by the body"
    );

    // The designated writer.
    let ledger = BalanceLedger::new();
    let ten = Decimal::new(10, 0);
    ledger
        .charge(&mut conn, 1, ten, "no-row")
        .expect("an empty row allows every node");
    // A caller's sql_mode may read '' as NULL (EMPTY_STRING_IS_NULL): the check must not
    // depend on it (before the fix `node_name NOT IN (NULL, <this node>)` was NULL, never true,
    // and a write on a node the row does not name went through).
    let mut null_strings = causal(&urls[0]);
    null_strings
        .batch_execute("SET SESSION sql_mode = CONCAT(@@sql_mode, ',EMPTY_STRING_IS_NULL')")
        .expect("the caller's sql_mode");
    ledger
        .charge(&mut null_strings, 1, ten, "no-row-null")
        .expect("an empty row allows every node, whatever the sql_mode");
    conn.batch_execute("UPDATE designated_writer SET node_name = 'elsewhere' WHERE id = 1")
        .expect("designate another node");
    let refused = ledger.charge(&mut conn, 1, ten, "elsewhere");
    assert!(
        matches!(refused, Err(Error::NotDesignatedWriter)),
        "{refused:?}"
    );
    assert_eq!(count_key(&mut conn, 1, "elsewhere"), 0, "nothing applied");
    let refused = ledger.charge(&mut null_strings, 1, ten, "elsewhere-null");
    assert!(
        matches!(refused, Err(Error::NotDesignatedWriter)),
        "under EMPTY_STRING_IS_NULL: {refused:?}"
    );
    assert_eq!(
        count_key(&mut conn, 1, "elsewhere-null"),
        0,
        "nothing applied"
    );
    // A row naming this node's name with a space after it names another node (the routers
    // compare names exactly): before the fix the comparison ignored trailing spaces (PAD
    // SPACE) and the write went through.
    conn.batch_execute(
        "UPDATE designated_writer SET node_name = CONCAT(@@wsrep_node_name, ' ') WHERE id = 1",
    )
    .expect("designate a node named as this one with a space after it");
    let refused = ledger.charge(&mut conn, 1, ten, "padded");
    assert!(
        matches!(refused, Err(Error::NotDesignatedWriter)),
        "{refused:?}"
    );
    assert_eq!(count_key(&mut conn, 1, "padded"), 0, "nothing applied");
    let mut allowing = TxnPolicy::default();
    allowing.designated_writer_only = false;
    BalanceLedger::with_policy(allowing)
        .charge(&mut conn, 1, ten, "allowed")
        .expect("the policy allows other nodes");
    conn.batch_execute("UPDATE designated_writer SET node_name = @@wsrep_node_name WHERE id = 1")
        .expect("designate this node");
    ledger
        .charge(&mut conn, 1, ten, "designated")
        .expect("the designated writer writes");
    assert_eq!(
        ledger.balance(&mut conn, 1).expect("balance").balance,
        Decimal::new(40, 0)
    );
    audit_ok(&ledger, &mut conn, 1);
}

#[derive(QueryableByName)]
struct Part {
    #[diesel(sql_type = Text)]
    part: String,
}

/// A single number (`... AS total`).
fn count(conn: &mut MysqlConnection, query: &str) -> i64 {
    diesel::sql_query(query)
        .get_result::<Counter>(conn)
        .unwrap_or_else(|e| panic!("{query}: {e}"))
        .total
}

/// The guard against silent rollbacks under real brute-force aborts, on two nodes of a cluster
/// that write the same row: node 0 runs transactions shaped like a ledger batch (the row
/// `FOR UPDATE`, a 2-row journal INSERT, `LAST_INSERT_ID()`, the row's UPDATE) through lockstock's
/// runner; the same transaction runs unguarded (`autocommit = 1`, plain `BEGIN`, no savepoint) on
/// two connections to node 1 and one to node 0 — the negative control, which checks right after
/// each success whether its journal rows are there.
///
/// Every success of the runner is applied whole, and nothing else is: node 0's journal rows are
/// exactly two per success and its counter column equals their number. The runner must have
/// succeeded and been aborted. The control must have answered success with its journal rows gone
/// at least once on node 0, the runner's node (the run provoked silent rollbacks there). The run
/// lasts until the control did so three times (once on node 0) and the runner succeeded 1,000
/// times, 40 s at most (it ran until 3,000 successes, 28–40 s, before sharing the cluster; 40 s
/// locally gave ~2,200 successes in ~4,300 attempts and 152 control successes with rows gone,
/// 100 of them on node 0).
///
/// With controls on node 1 only, a clean-clone CI run saw none in 40 s: only the runner's 491
/// commits aborted them (locally ~1 in 200 did). Node 1's thousands of commits abort the control
/// on the runner's own node. With the guard switched off (no `autocommit = 0`, no savepoint) the
/// runner's 3,000 successes left 5,992 and 5,984 journal rows in two runs (at 1,000 successes,
/// 1,998 in each of two).
#[test]
fn galera_runner_answers_whole_transactions_under_silent_rollbacks() {
    let _guard = exclusive();
    let started = Instant::now();
    // The shared 3-node cluster of the router tests (healed at the start of each test): a
    // cluster of its own took 10-20 s to start.
    let mut guard = crate::galera_router::cluster();
    let cluster = guard.as_mut().expect("cluster");
    let urls = migrated(cluster, "gal_silent");
    causal(&urls[0])
        .batch_execute(
            "CREATE TABLE hot (id INT PRIMARY KEY, guarded BIGINT NOT NULL, \
             unguarded BIGINT NOT NULL) ENGINE=InnoDB; \
             INSERT INTO hot VALUES (1, 0, 0); \
             CREATE TABLE journal (id BIGINT AUTO_INCREMENT PRIMARY KEY, node INT NOT NULL, \
             tag BIGINT NOT NULL, hot_id INT NOT NULL, KEY journal_tag (tag), \
             FOREIGN KEY (hot_id) REFERENCES hot (id)) ENGINE=InnoDB",
        )
        .expect("tables");

    let stop = Arc::new(AtomicBool::new(false));
    let _stop_on_drop = crate::StopOnDrop(&stop);
    let (sender, controls) = mpsc::channel::<i64>();
    let mut hammers = Vec::new();
    // Two controls on node 1 and one on node 0 (the runner's node): each node's commits abort
    // the other node's transactions, so both nodes see silent rollbacks, whichever node the
    // machine happens to make faster.
    for (thread, node) in [(0_i64, 1_i64), (1, 1), (2, 0)] {
        let (stop, sender) = (stop.clone(), sender.clone());
        let url = urls[usize::try_from(node).expect("node index")].clone();
        hammers.push(thread::spawn(move || {
            let mut conn = causal(&url);
            let (mut ok, mut half) = (0_u64, 0_u64);
            let mut tag = (thread + 1) * 1_000_000_000;
            while !stop.load(Ordering::Relaxed) {
                tag += 1;
                let attempt = (|| -> QueryResult<()> {
                    conn.batch_execute("BEGIN")?;
                    diesel::sql_query("SELECT id AS total FROM hot WHERE id = 1 FOR UPDATE")
                        .get_result::<Counter>(&mut conn)?;
                    // The controls' rows are tagged node 1 wherever they run: the runner's
                    // rows are the only ones tagged node 0.
                    diesel::sql_query(
                        "INSERT INTO journal (node, tag, hot_id) VALUES (1, ?, 1), (1, ?, 1)",
                    )
                    .bind::<BigInt, _>(tag)
                    .bind::<BigInt, _>(tag)
                    .execute(&mut conn)?;
                    diesel::sql_query("SELECT LAST_INSERT_ID()").execute(&mut conn)?;
                    diesel::sql_query("UPDATE hot SET unguarded = unguarded + 1 WHERE id = 1")
                        .execute(&mut conn)?;
                    conn.batch_execute("COMMIT")
                })();
                match attempt {
                    Ok(()) => {
                        ok += 1;
                        let rows = diesel::sql_query(
                            "SELECT COUNT(*) AS total FROM journal WHERE tag = ?",
                        )
                        .bind::<BigInt, _>(tag)
                        .get_result::<Counter>(&mut conn);
                        if rows.is_ok_and(|r| r.total == 0) {
                            half += 1;
                            let _ = sender.send(node);
                        }
                    }
                    Err(_) => {
                        let _ = conn.batch_execute("ROLLBACK");
                    }
                }
            }
            (node, ok, half)
        }));
    }
    drop(sender);

    let runner = lockstock::TxnRunner::new(TxnPolicy::default());
    let mut conn = causal(&urls[0]);
    let (mut ok, mut failed, mut attempts) = (0_i64, 0_u64, 0_u64);
    let (mut halves, mut halves_on_0) = (0, 0);
    let run_started = Instant::now();
    while (halves < 3 || halves_on_0 == 0 || ok < 1_000)
        && run_started.elapsed() < Duration::from_secs(40)
    {
        let answer = runner.run(&mut conn, |conn| {
            attempts += 1;
            diesel::sql_query("SELECT id AS total FROM hot WHERE id = 1 FOR UPDATE")
                .get_result::<Counter>(conn)?;
            diesel::sql_query(
                "INSERT INTO journal (node, tag, hot_id) VALUES (0, 0, 1), (0, 0, 1)",
            )
            .execute(conn)?;
            diesel::sql_query("SELECT LAST_INSERT_ID()").execute(conn)?;
            diesel::sql_query("UPDATE hot SET guarded = guarded + 1 WHERE id = 1").execute(conn)?;
            Ok(())
        });
        match answer {
            Ok(()) => ok += 1,
            Err(e) => {
                assert!(
                    !e.is_outcome_unknown(),
                    "an answer that cannot be checked: {e:?}"
                );
                assert!(
                    e.is_retryable(),
                    "only contention may fail a call here: {e:?}"
                );
                failed += 1;
                eprintln!("galera_runner_answers_whole_transactions_under_silent_rollbacks: failed: {e:?}");
                // A connection the runner gave up on is not used again (as a pool discards
                // it): a new one, and the old one closed.
                if matches!(
                    e,
                    lockstock::Error::ConnectionBroken { .. }
                        | lockstock::Error::ServerUnresponsive { .. }
                ) {
                    eprintln!("galera_runner_answers_whole_transactions_under_silent_rollbacks: {e}; a new connection");
                    conn = causal(&urls[0]);
                }
            }
        }
        for node in controls.try_iter() {
            halves += 1;
            halves_on_0 += usize::from(node == 0);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (mut control_ok, mut control_half, mut halves_by_node) = (0, 0, [0_u64; 2]);
    for hammer in hammers {
        let (node, ok, half) = hammer.join().expect("control thread");
        control_ok += ok;
        control_half += half;
        halves_by_node[usize::try_from(node).expect("node index")] += half;
    }
    cluster
        .wait_cluster_synced(Duration::from_secs(30))
        .expect("cluster synced");
    let check = &mut causal(&urls[0]);
    let rows = count(
        check,
        "SELECT COUNT(*) AS total FROM journal WHERE node = 0",
    );
    let counter = count(check, "SELECT guarded AS total FROM hot WHERE id = 1");
    eprintln!(
        "galera_runner_answers_whole_transactions_under_silent_rollbacks: runner {ok} successes, \
         {failed} failures in {attempts} attempts; unguarded control {control_ok} successes, \
         {control_half} of them with their journal rows gone (node 0, node 1: {halves_by_node:?}); \
         {:?} ({:?} in all)",
        run_started.elapsed(),
        started.elapsed()
    );
    assert_eq!(
        rows,
        2 * ok,
        "two journal rows per success of the runner, none else"
    );
    assert_eq!(
        counter, ok,
        "one counter step per success of the runner, none else"
    );
    assert!(
        ok > 0 && attempts > u64::try_from(ok).expect("successes") + failed,
        "the runner must have succeeded and have had attempts aborted"
    );
    assert!(
        control_half > 0,
        "the unguarded control never lost its rows: no silent rollback was provoked"
    );
    assert!(
        halves_by_node[0] > 0,
        "no silent rollback was provoked on the runner's node: {halves_by_node:?}"
    );
}

/// A caller whose session runs with `autocommit = 0` writes through lockstock on a Galera node
/// like any other: the designated-writer check (a read of `designated_writer`) comes after the
/// check that no transaction is open, so the read's implicit transaction is lockstock's own.
/// The caller's `autocommit = 0` is restored and no transaction is left open, also when the
/// node is not the designated writer. Before the fix the check's read opened a transaction
/// under the caller's `autocommit = 0`, the nested-transaction check then refused every write
/// (`NestedTransaction`), and the read's transaction stayed open on the caller's connection.
#[test]
fn galera_a_caller_with_autocommit_off_writes_and_keeps_it() {
    let _guard = exclusive();
    let mut cluster = GaleraCluster::start(1).expect("start cluster");
    let urls = migrated(&mut cluster, "gal_autocommit_off");
    let ledger = BalanceLedger::new();
    let ten = Decimal::new(10, 0);
    let session = |conn: &mut MysqlConnection| -> (i64, i64) {
        let autocommit = count(conn, "SELECT @@autocommit AS total");
        let open = count(conn, "SELECT @@in_transaction AS total");
        // The user variables that saved the caller's values are cleared again.
        let saved = count(
            conn,
            "SELECT COUNT(COALESCE(@lockstock_autocommit, @lockstock_isolation, \
             @lockstock_lock_wait, @lockstock_mdl_wait, @lockstock_read_only, \
             @lockstock_last_insert_id)) AS total",
        );
        assert_eq!(saved, 0, "lockstock's saved values left in the session");
        (autocommit, open)
    };
    let mut conn = causal(&urls[0]);
    conn.batch_execute("SET autocommit = 0")
        .expect("autocommit off");
    ledger
        .charge(&mut conn, 1, ten, "off-1")
        .expect("a charge with the caller's autocommit off");
    assert_eq!(session(&mut conn), (0, 0), "(autocommit, in transaction)");
    ledger
        .deduct(&mut conn, 1, Decimal::ONE, "off-2")
        .expect("a deduct with the caller's autocommit off");
    assert_eq!(session(&mut conn), (0, 0), "(autocommit, in transaction)");
    // Committed: another connection sees both.
    assert_eq!(
        ledger
            .balance(&mut causal(&urls[0]), 1)
            .expect("balance")
            .balance,
        Decimal::new(9, 0)
    );

    // A guarded body that wrote and then failed leaves nothing, with either autocommit (the
    // designated-writer read now runs with autocommit already off).
    causal(&urls[0])
        .batch_execute("CREATE TABLE guarded_probe (id INT PRIMARY KEY) ENGINE=InnoDB")
        .expect("probe table");
    let runner = lockstock::TxnRunner::new(TxnPolicy::default());
    let mut plain = causal(&urls[0]);
    for (id, conn) in [(1, &mut conn), (2, &mut plain)] {
        let failed = runner.run(conn, |c| {
            diesel::sql_query("INSERT INTO guarded_probe VALUES (?)")
                .bind::<diesel::sql_types::Integer, _>(id)
                .execute(c)?;
            Err::<(), _>(Error::InvalidInput {
                field: "test",
                problem: "fails after a write",
            })
        });
        assert!(
            matches!(failed, Err(Error::InvalidInput { .. })),
            "{failed:?}"
        );
    }
    assert_eq!(session(&mut conn), (0, 0), "(autocommit, in transaction)");
    assert_eq!(session(&mut plain), (1, 0), "(autocommit, in transaction)");
    assert_eq!(
        count(
            &mut causal(&urls[0]),
            "SELECT COUNT(*) AS total FROM guarded_probe"
        ),
        0,
        "the failed bodies' writes were rolled back"
    );

    // Not the designated writer: refused, nothing written, nothing left open.
    causal(&urls[0])
        .batch_execute("UPDATE designated_writer SET node_name = 'elsewhere' WHERE id = 1")
        .expect("designate another node");
    match ledger.charge(&mut conn, 1, ten, "off-3") {
        Err(Error::NotDesignatedWriter) => {}
        other => panic!("expected NotDesignatedWriter, got {other:?}"),
    }
    assert_eq!(session(&mut conn), (0, 0), "(autocommit, in transaction)");
    assert_eq!(
        count(
            &mut causal(&urls[0]),
            "SELECT COUNT(*) AS total FROM balance_history WHERE user_id = 1"
        ),
        2
    );
    audit_ok(&ledger, &mut causal(&urls[0]), 1);
}

/// A ledger whose runner first met a standalone server (`innodb_autoinc_lock_mode` 1: one
/// INSERT's rows numbered consecutively) and then runs batches on a Galera node (mode 2, where
/// they need not be) reads the ids back there instead of computing them: the step it reads
/// with `LAST_INSERT_ID()` says 0 where the server does not number consecutively. Every
/// answered id is the stored row's.
#[test]
fn galera_a_runner_that_met_another_server_first_answers_stored_ids() {
    let _guard = exclusive();
    let (_standalone_url, mut standalone) =
        lockstock_testkit::fixtures::fresh_database("gal_mode_first");
    let ledger = BalanceLedger::new();
    let two = |key: &str| {
        [
            lockstock::AccountOp::charge(Decimal::new(5, 0), format!("{key}-1")),
            lockstock::AccountOp::charge(Decimal::new(6, 0), format!("{key}-2")),
        ]
    };
    for answer in ledger
        .apply_many(&mut standalone, 1, &two("standalone"))
        .expect("batch on the standalone server")
    {
        answer.expect("charge");
    }
    let mut cluster = GaleraCluster::start(1).expect("start cluster");
    let urls = migrated(&mut cluster, "gal_mode_second");
    let mut node = causal(&urls[0]);
    for answer in ledger
        .apply_many(&mut node, 2, &two("galera"))
        .expect("batch on the Galera node")
    {
        let entry = answer.expect("charge");
        let stored: (i64, Option<String>) = lockstock::schema::balance_history::table
            .find(entry.id)
            .select((
                lockstock::schema::balance_history::user_id,
                lockstock::schema::balance_history::idempotency_key,
            ))
            .first(&mut node)
            .expect("the answered entry is stored");
        assert_eq!(stored, (2, entry.idempotency_key.clone()));
    }
    audit_ok(&ledger, &mut node, 2);
}

/// A caller's session with replication turned off (`SET SESSION wsrep_on = 0`, which takes
/// SUPER) on a Galera node: lockstock's writes there would stay on this node, and the other
/// nodes' copies of the rows would part from it. Every write is refused with `NotReplicated`
/// before anything changes — a single call, a batch, an issue — and the caller's session is left
/// as it was. A runner whose first connection was such a session still knows the node for a
/// Galera node: its later writes on other sessions are guarded (the designated-writer check).
/// Before the fix the runner asked the session's `@@wsrep_on`: it took the node for a standalone
/// server, and the writes committed on this node only.
#[test]
fn galera_a_session_with_replication_off_is_refused_and_kept() {
    let _guard = exclusive();
    let mut cluster = GaleraCluster::start(1).expect("start cluster");
    let urls = migrated(&mut cluster, "gal_wsrep_off");
    let ledger = BalanceLedger::new();
    let issuer = CouponIssuer::new();
    let ten = Decimal::new(10, 0);
    let campaign = open_campaign(&mut causal(&urls[0]), &issuer, 5);
    let mut off = causal(&urls[0]);
    off.batch_execute("SET SESSION wsrep_on = 0")
        .expect("replication off for the session");
    let session = |conn: &mut MysqlConnection| -> (i64, i64, i64) {
        let saved = count(
            conn,
            "SELECT COUNT(COALESCE(@lockstock_autocommit, @lockstock_isolation, \
             @lockstock_lock_wait, @lockstock_read_only, @lockstock_last_insert_id)) AS total",
        );
        assert_eq!(saved, 0, "lockstock's saved values left in the session");
        (
            count(conn, "SELECT CAST(@@session.wsrep_on AS SIGNED) AS total"),
            count(conn, "SELECT @@autocommit AS total"),
            count(conn, "SELECT @@in_transaction AS total"),
        )
    };
    match ledger.charge(&mut off, 1, ten, "off-1") {
        Err(Error::NotReplicated) => {}
        other => panic!("expected NotReplicated, got {other:?}"),
    }
    assert_eq!(session(&mut off), (0, 1, 0), "(wsrep_on, autocommit, open)");
    match ledger.apply_many(
        &mut off,
        1,
        &[lockstock::AccountOp::charge(ten, "off-2".to_owned())],
    ) {
        Err(Error::NotReplicated) => {}
        other => panic!("expected NotReplicated for the batch, got {other:?}"),
    }
    match issuer.issue(&mut off, 7, campaign.id) {
        Err(Error::NotReplicated) => {}
        other => panic!("expected NotReplicated for the issue, got {other:?}"),
    }
    // A runner made with `TxnRunner::default()` guards its writes as one made with `new` does
    // (before, its derived default took every server for a standalone one: the INSERT was
    // applied on this node alone).
    let written = lockstock::TxnRunner::default().run(&mut off, |conn| {
        diesel::sql_query("INSERT INTO user_balance (user_id, balance) VALUES (99, 1)")
            .execute(conn)?;
        Ok(())
    });
    match written {
        Err(Error::NotReplicated) => {}
        other => panic!("expected NotReplicated for a default runner, got {other:?}"),
    }
    assert_eq!(session(&mut off), (0, 1, 0), "(wsrep_on, autocommit, open)");
    // Refused inside another runner's body, on a standalone server's connection, whose body
    // answers with that refusal: the enclosing runner does not take it for its own first SET
    // refused (a server it mistook) and runs its body once. Before, the nested call's refusal
    // was read as the enclosing call's, which ran its body a second time.
    let (_, mut plain) = lockstock_testkit::fixtures::fresh_database("gal_wsrep_off_nested");
    let mut runs = 0;
    let nested = lockstock::TxnRunner::default().run(&mut plain, |_| {
        runs += 1;
        ledger.charge(&mut off, 1, ten, "off-nested").map(|_| ())
    });
    assert!(matches!(nested, Err(Error::NotReplicated)), "{nested:?}");
    assert_eq!(runs, 1, "the enclosing body ran again");
    assert_eq!(session(&mut off), (0, 1, 0), "(wsrep_on, autocommit, open)");
    let mut check = causal(&urls[0]);
    assert_eq!(
        count(&mut check, "SELECT COUNT(*) AS total FROM balance_history"),
        0,
        "nothing journaled"
    );
    assert_eq!(
        count(&mut check, "SELECT COUNT(*) AS total FROM user_coupon"),
        0,
        "nothing issued"
    );
    assert_eq!(
        count(
            &mut check,
            "SELECT COUNT(*) AS total FROM user_balance WHERE user_id = 99"
        ),
        0,
        "nothing written by the default runner"
    );
    // Reads need no replication: they still answer on that session.
    assert!(matches!(
        ledger.balance(&mut off, 1),
        Err(Error::AccountNotFound { user_id: 1 })
    ));

    // The same runner, on a session with replication on: it writes, guarded.
    let mut on = causal(&urls[0]);
    ledger
        .charge(&mut on, 1, ten, "on-1")
        .expect("a charge with replication on");
    causal(&urls[0])
        .batch_execute("UPDATE designated_writer SET node_name = 'elsewhere' WHERE id = 1")
        .expect("designate another node");
    match ledger.charge(&mut on, 1, ten, "on-2") {
        Err(Error::NotDesignatedWriter) => {}
        other => panic!("expected NotDesignatedWriter (a guarded write), got {other:?}"),
    }
    assert_eq!(
        count(
            &mut causal(&urls[0]),
            "SELECT COUNT(*) AS total FROM balance_history"
        ),
        1
    );
    audit_ok(&ledger, &mut causal(&urls[0]), 1);

    // The node's replication turned off while a connection is open: that session's
    // `@@session.wsrep_on` stays 1, but nothing it writes replicates any more. Refused too,
    // and the migrations as well.
    let mut opened = causal(&urls[0]);
    causal(&urls[0])
        .batch_execute("UPDATE designated_writer SET node_name = SPACE(0) WHERE id = 1")
        .expect("no designated writer");
    causal(&urls[0])
        .batch_execute("SET GLOBAL wsrep_on = 0")
        .expect("replication off for the node");
    let charged = ledger.charge(&mut opened, 1, ten, "global-off");
    let migrated = lockstock::run_migrations(&mut opened);
    causal(&urls[0])
        .batch_execute("SET GLOBAL wsrep_on = 1")
        .expect("replication on again");
    assert_eq!(
        count(
            &mut opened,
            "SELECT CAST(@@session.wsrep_on AS SIGNED) AS total"
        ),
        1,
        "the open session's own flag"
    );
    match charged {
        Err(Error::NotReplicated) => {}
        other => panic!("expected NotReplicated with the node's replication off, got {other:?}"),
    }
    match migrated {
        Err(Error::NotReplicated) => {}
        other => panic!("expected NotReplicated for the migrations, got {other:?}"),
    }
    assert_eq!(
        count(
            &mut causal(&urls[0]),
            "SELECT COUNT(*) AS total FROM balance_history"
        ),
        1
    );

    // The same runner, on a standalone server (no wsrep provider: `wsrep_on` is 0 there, and
    // nothing needs replicating): it writes.
    let (_standalone_url, mut standalone) =
        lockstock_testkit::fixtures::fresh_database("gal_wsrep_off_standalone");
    ledger
        .charge(&mut standalone, 1, ten, "standalone-1")
        .expect("a charge on a standalone server after a Galera node");
    audit_ok(&ledger, &mut standalone, 1);
}

/// What else a caller's session on a Galera node could do to lockstock, each kept out and put
/// back: a session that runs DDL locally (`wsrep_OSU_method = RSU`) still migrates the whole
/// cluster, and one with replication off is refused (`NotReplicated`); streaming replication
/// (`wsrep_trx_fragment_size`), under which a batch's duplicate key aborted the whole
/// transaction (1213, retried until `Contended`) instead of the statement, leaves a batch
/// answering as its single calls; `wsrep_dirty_reads` is turned off for a write and put back.
#[test]
fn galera_a_callers_wsrep_session_does_not_reach_lockstock() {
    let _guard = exclusive();
    let cluster = GaleraCluster::start(2).expect("start cluster");
    let urls = cluster
        .create_database("gal_wsrep_session")
        .expect("database");
    let value = |conn: &mut MysqlConnection, variable: &str| -> String {
        diesel::select(diesel::dsl::sql::<Text>(&format!(
            "CAST(@@session.{variable} AS CHAR)"
        )))
        .get_result(conn)
        .expect(variable)
    };

    // Migrations under RSU: the tables reach the other node too.
    let mut rsu = causal(&urls[0]);
    rsu.batch_execute("SET SESSION wsrep_OSU_method = 'RSU'")
        .expect("RSU");
    lockstock::run_migrations(&mut rsu).expect("migrations under RSU");
    assert_eq!(value(&mut rsu, "wsrep_OSU_method"), "RSU");
    assert_eq!(
        count(
            &mut causal(&urls[1]),
            "SELECT COUNT(*) AS total FROM information_schema.TABLES \
             WHERE table_schema = 'gal_wsrep_session' \
             AND table_name IN ('designated_writer', 'user_balance', 'user_coupon')"
        ),
        3,
        "the schema on the other node"
    );
    // Replication off: refused, nothing changed in the session.
    let mut off = causal(&urls[0]);
    off.batch_execute("SET SESSION wsrep_on = 0")
        .expect("replication off");
    match lockstock::run_migrations(&mut off) {
        Err(Error::NotReplicated) => {}
        other => panic!("expected NotReplicated, got {other:?}"),
    }
    assert_eq!(value(&mut off, "wsrep_on"), "OFF");

    // Streaming replication, one row per fragment: a batch meeting a holder answers as its
    // single issues.
    let issuer = CouponIssuer::new();
    let campaign = open_campaign(&mut causal(&urls[0]), &issuer, 10);
    let mut streaming = causal(&urls[0]);
    streaming
        .batch_execute(
            "SET SESSION wsrep_trx_fragment_unit = 'rows', wsrep_trx_fragment_size = 1, \
             wsrep_dirty_reads = 1",
        )
        .expect("streaming replication");
    issuer
        .issue(&mut streaming, 9, campaign.id)
        .expect("a single issue");
    let answers = issuer
        .issue_many(&mut streaming, campaign.id, &[2, 9])
        .expect("a batch answers per request");
    assert!(answers[0].is_ok(), "{answers:?}");
    assert!(
        matches!(answers[1], Err(Error::AlreadyIssued { .. })),
        "{answers:?}"
    );
    assert_eq!(value(&mut streaming, "wsrep_trx_fragment_size"), "1");
    assert_eq!(value(&mut streaming, "wsrep_trx_fragment_unit"), "rows");
    assert_eq!(value(&mut streaming, "wsrep_dirty_reads"), "ON");
    // Inside a write, lockstock's values; afterwards nothing of lockstock's left.
    let runner = lockstock::TxnRunner::new(TxnPolicy::default());
    let inside = runner
        .run(&mut streaming, |conn| {
            Ok((
                value(conn, "wsrep_dirty_reads"),
                value(conn, "wsrep_trx_fragment_size"),
            ))
        })
        .expect("a write");
    assert_eq!(inside, ("OFF".to_owned(), "0".to_owned()));
    assert_eq!(value(&mut streaming, "wsrep_trx_fragment_size"), "1");
    assert_eq!(
        count(
            &mut streaming,
            "SELECT COUNT(COALESCE(@lockstock_dirty_reads, @lockstock_fragment_size, \
             @lockstock_insert_id, @lockstock_autocommit, @lockstock_isolation)) AS total"
        ),
        0,
        "lockstock's saved values left in the session"
    );
    let stock = count(
        &mut causal(&urls[1]),
        &format!(
            "SELECT stock_quantity AS total FROM fcfs_coupon WHERE id = {}",
            campaign.id
        ),
    );
    assert_eq!(stock, 8, "two coupons issued, seen on the other node");
}

/// A pooled connection opened while the node's replication was off keeps `wsrep_on = 0` after
/// the node's is back: a combiner over that pool discards it once a write on it is refused
/// (`NotReplicated`), so the next call gets a replicating connection. Before the fix the
/// connection went back to the pool and every later write on it was refused.
#[test]
fn galera_a_combiner_discards_a_connection_that_does_not_replicate() {
    let _guard = exclusive();
    let mut cluster = GaleraCluster::start(1).expect("start cluster");
    let urls = migrated(&mut cluster, "gal_wsrep_pool");
    let ledger = BalanceLedger::new();
    let ten = Decimal::new(10, 0);
    causal(&urls[0])
        .batch_execute("SET GLOBAL wsrep_on = 0")
        .expect("replication off for the node");
    // Its one connection is opened now, with the node's value.
    let built = std::panic::catch_unwind(|| pool_with(&urls[0], 1, TxnPolicy::default()));
    causal(&urls[0])
        .batch_execute("SET GLOBAL wsrep_on = 1")
        .expect("replication on again");
    let pool = built.expect("pool");
    let hot = CombiningLedger::new(pool.clone(), ledger.clone());
    match hot.charge(1, ten, "first") {
        Err(Error::NotReplicated) => {}
        other => panic!("expected NotReplicated on the old connection, got {other:?}"),
    }
    hot.charge(1, ten, "second")
        .expect("a charge on a new, replicating connection");
    let wsrep_on: i64 = diesel::select(diesel::dsl::sql::<BigInt>(
        "CAST(@@session.wsrep_on AS SIGNED)",
    ))
    .get_result(&mut *pool.get().expect("pooled"))
    .expect("wsrep_on");
    assert_eq!(wsrep_on, 1, "the pool's connection replicates");
    assert_eq!(
        count(
            &mut causal(&urls[0]),
            "SELECT COUNT(*) AS total FROM balance_history"
        ),
        1
    );
    audit_ok(&ledger, &mut causal(&urls[0]), 1);
}

/// A standalone server with a wsrep provider configured but replication off (`wsrep_on =
/// OFF`: it loads none), and a migrated database `name` on it.
fn provider_off_server(name: &str) -> (lockstock_testkit::Sandbox, MysqlConnection) {
    let provider = [
        "/usr/lib/galera/libgalera_smm.so",
        "/usr/lib/galera-4/libgalera_smm.so",
        "/usr/lib64/galera-4/libgalera_smm.so",
    ]
    .into_iter()
    .find(|path| std::path::Path::new(path).exists())
    .expect("no Galera library found: install galera-4 (make deps)");
    let provider = format!("--wsrep_provider={provider}");
    let sandbox = lockstock_testkit::Sandbox::start_with(&[
        provider.as_str(),
        "--wsrep_on=OFF",
        "--binlog_format=ROW",
    ])
    .expect("start a server with a provider configured");
    let url = sandbox.create_database(name).expect("database");
    let mut conn = MysqlConnection::establish(&url).expect("connect");
    lockstock::run_migrations(&mut conn).expect("migrations on a standalone server");
    (sandbox, conn)
}

/// A server with a wsrep provider configured but started with `wsrep_on = OFF` loads none: it is
/// a standalone server (a node taken out of its cluster to run alone), and lockstock writes and
/// migrates there. Before the fix the runner took `@@wsrep_provider` alone for a Galera node
/// and refused every write and the migrations with `NotReplicated`.
#[test]
fn galera_a_server_with_a_provider_configured_but_replication_off_is_standalone() {
    // It starts a private server: never beside a test that holds `exclusive()`.
    let _storm = lockstock_testkit::fixtures::storm();
    let (_sandbox, mut conn) = provider_off_server("gal_provider_off");
    let ledger = BalanceLedger::new();
    ledger
        .charge(&mut conn, 1, Decimal::new(10, 0), "standalone")
        .expect("a charge on a standalone server");
    audit_ok(&ledger, &mut conn, 1);
}

/// One ledger (one runner) on a standalone server, then on a Galera node, then on a server
/// with a provider configured but replication off: each server's writes are guarded as that
/// server needs, whichever the runner met first. On the Galera node a session with replication
/// off is refused (`NotReplicated`) and a node that is not the designated writer too
/// (`NotDesignatedWriter`), also on a connection that carries lockstock's session settings;
/// a runner that met the node first writes on the standalone server. Before the fix a runner
/// decided once, from its first server: after a standalone server it wrote unguarded on the
/// node (committed on that node only, on any node), and after the node it refused every write
/// on the standalone server.
#[test]
fn galera_a_runner_guards_each_server_as_it_is_not_as_the_first_it_met() {
    let _guard = exclusive();
    let ten = Decimal::new(10, 0);
    let (_standalone_url, mut standalone) =
        lockstock_testkit::fixtures::fresh_database("gal_each_server");
    // Started before the node is used: a server this process started while a call on the node
    // was about to run left that call (1 run in about 12) waiting in the designated-writer SET
    // for an answer the node never sent, the node's session idle, until the watchdog cut it at
    // its deadline plus grace (not understood yet; see the README's known limits).
    let (_sandbox, mut provider_off) = provider_off_server("gal_each_server_off");
    let ledger = BalanceLedger::new();
    ledger
        .charge(&mut standalone, 1, ten, "standalone")
        .expect("a charge on a standalone server");

    let mut cluster = GaleraCluster::start(1).expect("start cluster");
    let urls = migrated(&mut cluster, "gal_each_server_node");
    let mut node = causal(&urls[0]);
    let mut off = causal(&urls[0]);
    off.batch_execute("SET SESSION wsrep_on = 0")
        .expect("replication off for the session");
    let refused = ledger.charge(&mut off, 1, ten, "replication-off");
    assert!(matches!(refused, Err(Error::NotReplicated)), "{refused:?}");
    assert_eq!(
        count_key(&mut node, 1, "replication-off"),
        0,
        "nothing applied"
    );
    node.batch_execute("UPDATE designated_writer SET node_name = 'elsewhere' WHERE id = 1")
        .expect("designate another node");
    let refused = ledger.charge(&mut node, 1, ten, "elsewhere");
    assert!(
        matches!(refused, Err(Error::NotDesignatedWriter)),
        "{refused:?}"
    );
    // A connection that carries lockstock's session settings: no first SET of its own.
    let mut marked = causal(&urls[0]);
    lockstock::txn::apply_session_settings(&mut marked, ledger.runner().policy())
        .expect("session settings");
    let fresh = BalanceLedger::new();
    fresh
        .charge(&mut standalone, 2, ten, "standalone-first")
        .expect("another runner's first server: standalone");
    let refused = fresh.charge(&mut marked, 1, ten, "elsewhere-marked");
    assert!(
        matches!(refused, Err(Error::NotDesignatedWriter)),
        "a marked connection: {refused:?}"
    );
    assert_eq!(count_key(&mut node, 1, "elsewhere"), 0, "nothing applied");
    assert_eq!(
        count_key(&mut node, 1, "elsewhere-marked"),
        0,
        "nothing applied"
    );
    node.batch_execute("UPDATE designated_writer SET node_name = @@wsrep_node_name WHERE id = 1")
        .expect("designate this node");
    ledger
        .charge(&mut node, 1, ten, "designated")
        .expect("the designated writer writes");
    audit_ok(&ledger, &mut node, 1);

    // A runner that met the node first, on a server with a provider configured but
    // replication off (a standalone server).
    let node_first = BalanceLedger::new();
    node_first
        .charge(&mut node, 3, ten, "node-first")
        .expect("a charge on the node");
    node_first
        .charge(&mut provider_off, 3, ten, "then-standalone")
        .expect("a charge on the standalone server");
    audit_ok(&node_first, &mut provider_off, 3);
}
