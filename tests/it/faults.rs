//! Faults against a real server: connections killed at random points (also during COMMIT), a
//! pool whose connections are killed under the combining path, the server killed with SIGKILL and
//! restarted on the same data directory — and negative controls that prove the checks see what
//! the locks prevent.
//!
//! Every random test prints `LOCKSTOCK_SEED=...` and replays from it (thread timing still
//! varies). `LOCKSTOCK_SOAK_SECS=600` turns the kill and crash tests into soaks of that length.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};
use diesel::sql_types::{BigInt, Text};
use lockstock::combine::{CombiningIssuer, CombiningLedger};
use lockstock::schema::{user_balance, user_coupon};
use lockstock::{
    BalanceLedger, CouponIssuer, EntryKind, Error, RetryPolicy, ServerErrorKind, SessionSettings,
    TxnPolicy, TxnRunner,
};
use lockstock_testkit::fixtures::{
    audit_ok, connect, count_key, fresh_database, issued_rows, open_campaign_named, stock_row,
    stored_balance,
};
use lockstock_testkit::rng::{seed, Rng};
use lockstock_testkit::workload::{self, Client, Op, Outcome, Record, Summary};
use lockstock_testkit::Sandbox;
use rust_decimal::Decimal;

/// `LOCKSTOCK_SOAK_SECS`, if set.
fn soak_secs() -> Option<u64> {
    std::env::var("LOCKSTOCK_SOAK_SECS")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .filter(|s| *s > 0)
}

/// The server's id of this connection (read from the server, so safe to format into `KILL`).
fn connection_id(conn: &mut MysqlConnection) -> QueryResult<i64> {
    diesel::select(diesel::dsl::sql::<BigInt>("CONNECTION_ID()")).get_result(conn)
}

/// Stops the workload clients and gathers the histories they recorded.
fn stop_and_collect(
    stop: &AtomicBool,
    clients: Vec<thread::ScopedJoinHandle<'_, Vec<Record>>>,
) -> Vec<Record> {
    stop.store(true, Ordering::Relaxed);
    clients
        .into_iter()
        .flat_map(|h| h.join().expect("workload client"))
        .collect()
}

/// `KILL <id>` (or `KILL QUERY <id>`: only the running statement); `Ok(false)` if the
/// connection was already gone.
fn kill(admin: &mut MysqlConnection, id: i64, query_only: bool) -> QueryResult<bool> {
    let what = if query_only { "KILL QUERY" } else { "KILL" };
    match admin.batch_execute(&format!("{what} {id}")) {
        Ok(()) => Ok(true),
        Err(e) if e.to_string().contains("Unknown thread id") => Ok(false),
        Err(e) => Err(e),
    }
}

fn assert_no_violations(test: &str, violations: &[String]) {
    for violation in violations.iter().take(30) {
        eprintln!("{test}: VIOLATION {violation}");
    }
    assert!(
        violations.is_empty(),
        "{test}: {} violations (first: {})",
        violations.len(),
        violations[0]
    );
    eprintln!("{test}: violations found: 0");
}

fn dec(cents: i64) -> Decimal {
    Decimal::new(cents, 2)
}

// ---------------------------------------------------------------------------------------------
// 1. Connections killed mid-transaction.
// ---------------------------------------------------------------------------------------------

/// The texts MariaDB and libmariadb really produce for a killed connection are classified as a
/// lost connection: idle kill, kill during a statement, kill right before COMMIT.
#[test]
fn killed_connection_errors_are_typed() {
    let _storm = lockstock_testkit::fixtures::storm();
    let (url, mut admin) = fresh_database("faults_kill_texts");
    let ledger = BalanceLedger::new();
    ledger
        .charge(&mut admin, 1, dec(10_000), "init")
        .expect("charge");

    // Killed while idle: the next call fails before anything is written.
    let mut victim = connect(&url);
    let id = connection_id(&mut victim).expect("id");
    assert!(kill(&mut admin, id, false).expect("kill"));
    let lost = ledger
        .deduct(&mut victim, 1, dec(100), "idle-kill")
        .expect_err("killed connection");
    eprintln!(
        "idle kill: {lost} / {:?}",
        lost.server_error().map(|e| e.message())
    );
    assert_eq!(lost.server_kind(), Some(ServerErrorKind::ConnectionLost));
    assert!(
        !lost.is_outcome_unknown() && lost.is_retryable(),
        "{lost:?}"
    );
    // The broken connection keeps answering with a typed lost connection.
    let again = ledger
        .deduct(&mut victim, 1, dec(100), "idle-kill")
        .expect_err("still killed");
    assert_eq!(again.server_kind(), Some(ServerErrorKind::ConnectionLost));

    // Killed during a statement.
    let mut victim = connect(&url);
    let id = connection_id(&mut victim).expect("id");
    let killer = {
        let url = url.clone();
        thread::spawn(move || {
            let mut admin = connect(&url);
            thread::sleep(Duration::from_millis(300));
            kill(&mut admin, id, false).expect("kill")
        })
    };
    let runner = TxnRunner::default();
    let during = runner
        .run(&mut victim, |conn| {
            diesel::sql_query("SELECT SLEEP(5)").execute(conn)?;
            Ok(())
        })
        .expect_err("killed during the statement");
    assert!(killer.join().expect("killer"));
    eprintln!(
        "kill during a statement: {during} / {:?}",
        during.server_error().map(|e| e.message())
    );
    assert_eq!(during.server_kind(), Some(ServerErrorKind::ConnectionLost));
    assert!(!during.is_outcome_unknown());

    // Killed after the body, before COMMIT: the commit fails, the outcome is reported unknown
    // (here it was not applied), and the retry with the same key applies it once.
    let mut victim = connect(&url);
    let id = connection_id(&mut victim).expect("id");
    let before_commit = runner
        .run(&mut victim, |conn| {
            diesel::sql_query("UPDATE user_balance SET version = version WHERE user_id = 1")
                .execute(conn)?;
            kill(&mut admin, id, false).map_err(Error::from)?;
            Ok(())
        })
        .expect_err("commit on a killed connection");
    eprintln!(
        "kill before COMMIT: {before_commit} / {:?}",
        before_commit.server_error().map(|e| e.message())
    );
    assert!(before_commit.is_outcome_unknown(), "{before_commit:?}");
    assert_eq!(
        before_commit.server_kind(),
        Some(ServerErrorKind::ConnectionLost)
    );
    let mut fresh = connect(&url);
    let first = ledger
        .deduct(&mut fresh, 1, dec(100), "idle-kill")
        .expect("retry on a new connection");
    let replay = ledger
        .deduct(&mut fresh, 1, dec(100), "idle-kill")
        .expect("replay");
    assert_eq!(first.id, replay.id);
    assert_eq!(count_key(&mut fresh, 1, "idle-kill"), 1);
    ledger.audit(&mut fresh, 1).expect("audit");
}

/// Victims run deducts, transfers, refunds, charges and coupon issues in a loop; for about half
/// of their calls a killer thread runs `KILL <connection id>` — or, one time in three,
/// `KILL QUERY <connection id>` — after a random 0–3 ms, so kills land before, during and after
/// statements and COMMIT. Victims reconnect and retry with the
/// same key (or give up on purpose). Afterwards the database must agree with every answer.
/// Rounds of 6 s (new victims, new coupon users) run until the kills have produced every kind
/// of answer checked (an unknown outcome needs a KILL inside a COMMIT), at most four: a slow
/// machine gets more time instead of a failed test.
#[test]
fn killed_connections_never_leave_partial_state() {
    let _storm = lockstock_testkit::fixtures::storm();
    let test = "killed_connections_never_leave_partial_state";
    let seed = seed(test);
    let (url, mut admin) = fresh_database("faults_kill");
    let setup = workload::setup(&mut admin, 12, 2, 60);
    let duration = Duration::from_secs(soak_secs().unwrap_or(6));
    const VICTIMS: usize = 4;
    // Rounds of `duration` until the kills produced every kind of answer the test checks for
    // (an unknown outcome needs a KILL inside a COMMIT), at most this many.
    const ROUNDS: usize = 4;
    let kills = AtomicUsize::new(0);
    let query_kills = AtomicUsize::new(0);
    let kill_attempts = AtomicUsize::new(0);
    let errors = workload::ErrorTexts::default();
    let started = Instant::now();
    let mut records: Vec<Record> = Vec::new();
    for round in 0..ROUNDS {
        let stop = AtomicBool::new(false);
        records.extend(thread::scope(|s| {
            let _stop_on_drop = crate::StopOnDrop(&stop);
            let mut victims = Vec::new();
            for v in 0..VICTIMS {
                let (tx, rx) = mpsc::channel::<(i64, Duration, bool)>();
                let (killer_url, kills, query_kills, kill_attempts) =
                    (url.clone(), &kills, &query_kills, &kill_attempts);
                s.spawn(move || {
                    let mut admin = connect(&killer_url);
                    for (id, delay, query_only) in rx {
                        thread::sleep(delay);
                        kill_attempts.fetch_add(1, Ordering::Relaxed);
                        if kill(&mut admin, id, query_only).expect("KILL") {
                            if query_only {
                                query_kills.fetch_add(1, Ordering::Relaxed);
                            } else {
                                kills.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                });
                let client = Client {
                    abandon_unknown: 300,
                    abandon_lost: 300,
                    ..Client::new(
                        &url,
                        format!("r{round}v{v}"),
                        // Coupon users of their own in every round (one coupon per user).
                        round * VICTIMS + v,
                        &setup,
                        seed.wrapping_add((round * VICTIMS + v) as u64),
                        &errors,
                    )
                };
                let stop = &stop;
                victims.push(s.spawn(move || {
                    let mut rng = Rng::new(seed ^ 0xABCD ^ (round * VICTIMS + v) as u64);
                    let mut hook = |conn: &mut MysqlConnection| {
                        let Ok(id) = connection_id(conn) else {
                            return false;
                        };
                        if rng.chance(500) {
                            let delay = Duration::from_micros(rng.below(3_001));
                            let query_only = rng.below(3) == 0;
                            tx.send((id, delay, query_only)).expect("killer alive");
                        }
                        true
                    };
                    workload::run_client(&client, stop, &mut hook)
                }));
            }
            thread::sleep(duration);
            stop_and_collect(&stop, victims)
        }));
        let so_far = Summary::of(&records);
        if kills.load(Ordering::Relaxed) > 0
            && query_kills.load(Ordering::Relaxed) > 0
            && so_far.unknown_answers > 0
            && so_far.lost_answers > 0
            && so_far.retried_to_ok > 0
        {
            break;
        }
    }
    let summary = Summary::of(&records);
    eprintln!(
        "{test}: {:?}, {} KILLs sent, {} KILL and {} KILL QUERY hit a live connection; {summary}",
        started.elapsed(),
        kill_attempts.load(Ordering::Relaxed),
        kills.load(Ordering::Relaxed),
        query_kills.load(Ordering::Relaxed)
    );
    eprintln!(
        "{test}: server errors answered:\n{}",
        workload::describe(&errors)
    );
    let mut conn = connect(&url);
    assert_no_violations(test, &workload::verify(&mut conn, &setup, &records));
    assert!(kills.load(Ordering::Relaxed) > 0, "no kill landed");
    assert!(
        query_kills.load(Ordering::Relaxed) > 0,
        "no KILL QUERY landed"
    );
    assert!(
        summary.unknown_answers > 0 && summary.lost_answers > 0,
        "kills never produced both an unknown outcome and a lost connection: {summary}"
    );
    assert!(summary.retried_to_ok > 0, "{summary}");
}

#[derive(QueryableByName)]
struct Id {
    #[diesel(sql_type = BigInt)]
    id: i64,
}

/// The server ids of the connections to database `db`, except `keep`.
fn connections_to(
    conn: &mut MysqlConnection,
    db: &str,
    keep: &HashSet<i64>,
) -> QueryResult<Vec<i64>> {
    Ok(diesel::sql_query(
        "SELECT CAST(ID AS SIGNED) AS id FROM information_schema.PROCESSLIST \
         WHERE DB = ? AND ID <> CONNECTION_ID()",
    )
    .bind::<Text, _>(db)
    .load::<Id>(conn)?
    .into_iter()
    .map(|r| r.id)
    .filter(|id| !keep.contains(id))
    .collect())
}

/// How long the killer of [`pool_and_combiner_recover_from_killed_connections`] kills at most.
const KILLING: Duration = Duration::from_secs(4);

/// An r2d2 pool of 2 whose connections are killed: the next `pool.get()` works, and the
/// combining ledger and issuer keep answering (retried calls apply once, batches all or
/// nothing) while their pooled connections are killed under them (for the callers' first
/// [`KILLING`] at most), and work afterwards.
/// The record of `op` under `key`, answered `Ok(id)` at its first call.
fn answered_once(key: &str, op: Op, id: i64) -> Record {
    let mut record = Record::new(key.into(), op);
    record.outcome = Outcome::Ok(id);
    record.attempts = 1;
    record
}

#[test]
fn pool_and_combiner_recover_from_killed_connections() {
    let _storm = lockstock_testkit::fixtures::storm();
    let test = "pool_and_combiner_recover_from_killed_connections";
    let seed = seed(test);
    let db = "faults_pool";
    let (url, mut admin) = fresh_database(db);
    let setup = workload::setup(&mut admin, 4, 1, 60);
    let admin_id = connection_id(&mut admin).expect("admin id");
    let pool = Pool::builder()
        .max_size(2)
        .connection_customizer(Box::new(SessionSettings::new(TxnPolicy::default())))
        .build(ConnectionManager::<MysqlConnection>::new(url.clone()))
        .expect("pool");
    let ledger = BalanceLedger::new();

    // Both idle pooled connections killed.
    let killed: Vec<i64> = {
        let mut a = pool.get().expect("first");
        let mut b = pool.get().expect("second");
        vec![
            connection_id(&mut a).expect("id"),
            connection_id(&mut b).expect("id"),
        ]
    };
    for id in &killed {
        assert!(kill(&mut admin, *id, false).expect("kill"));
    }
    {
        let mut conn = pool
            .get()
            .expect("pool.get after its connections were killed");
        assert!(!killed.contains(&connection_id(&mut conn).expect("id")));
        ledger
            .deduct(&mut conn, 1, dec(100), "after-kill")
            .expect("deduct on the replacement");
    }
    let mut records = vec![answered_once(
        "after-kill",
        Op::Deduct {
            user: 1,
            amount: dec(100),
        },
        ledger
            .deduct(&mut admin, 1, dec(100), "after-kill")
            .expect("replay")
            .id,
    )];

    // The combining path while a killer kills its pooled connections every few ms.
    let combining = CombiningLedger::new(pool.clone(), BalanceLedger::new());
    let issuer = CombiningIssuer::new(pool.clone(), CouponIssuer::new());
    let stop = AtomicBool::new(false);
    let kills = AtomicUsize::new(0);
    let history = Mutex::new(Vec::new());
    thread::scope(|s| {
        let _stop_on_drop = crate::StopOnDrop(&stop);
        let killer = {
            let (url, stop, kills) = (&url, &stop, &kills);
            s.spawn(move || {
                let mut admin = connect(url);
                let mut keep = HashSet::from([admin_id]);
                keep.insert(connection_id(&mut admin).expect("id"));
                let mut rng = Rng::new(seed);
                // For a bounded time: a killer that kills every new connection within a few
                // milliseconds can keep a loaded server's pool from ever reconnecting (r2d2
                // backs off up to half its connection timeout between attempts), and the callers
                // would retry for ever (seen once in CI, with another test loading the server).
                let killing = Instant::now();
                while !stop.load(Ordering::Relaxed) && killing.elapsed() < KILLING {
                    thread::sleep(Duration::from_micros(2_000 + rng.below(4_000)));
                    let ids = connections_to(&mut admin, db, &keep).expect("processlist");
                    if let Some(id) = ids.get(rng.below(ids.len().max(1) as u64) as usize) {
                        if kill(&mut admin, *id, false).expect("kill") {
                            kills.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        };
        let callers: Vec<_> = (0..8u64)
            .map(|t| {
                let (ledger, issuer, history, url) = (&combining, &issuer, &history, &url);
                let campaign = setup.campaigns[0];
                s.spawn(move || {
                    let mut rng = Rng::new(seed ^ (t + 1));
                    for n in 0..40 {
                        let key = format!("t{t}-{n}");
                        let user = 1 + rng.below(4) as i64;
                        let amount = dec(1 + rng.below(2_000) as i64);
                        let op = match rng.below(10) {
                            0..=2 => Op::Charge { user, amount },
                            3..=6 => Op::Deduct { user, amount },
                            _ => Op::Issue {
                                user: 1_000_000 * (t as i64 + 1) + n,
                                campaign,
                            },
                        };
                        let mut record = Record::new(key.clone(), op);
                        // A ledger answer that said nothing was applied (no attempt of unknown
                        // outcome before it): its key has no entry, checked before the next
                        // attempt (which would answer the entry as if it had applied it).
                        let mut unapplied: Option<String> = None;
                        record.outcome = loop {
                            if let Some(answer) = unapplied.take() {
                                // A connection of its own, also killed at times: tried again.
                                let entries = (0..20).find_map(|_| {
                                    let mut checker =
                                        <MysqlConnection as Connection>::establish(url).ok()?;
                                    workload::entries_under(&mut checker, user, &key).ok()
                                });
                                match entries {
                                    Some(0) => {}
                                    Some(entries) => {
                                        record.unexpected.get_or_insert(format!(
                                            "{answer}, which says that nothing was applied, \
                                             yet the key has {entries} entries"
                                        ));
                                    }
                                    None => panic!("{key}: the journal could not be read"),
                                }
                            }
                            record.attempts += 1;
                            let result = match record.op {
                                Op::Charge { .. } => {
                                    ledger.charge(user, amount, &key).map(|e| e.id)
                                }
                                Op::Deduct { .. } => {
                                    ledger.deduct(user, amount, &key).map(|e| e.id)
                                }
                                Op::Issue { user, campaign } => {
                                    issuer.issue(user, campaign).map(|c| c.id)
                                }
                                _ => unreachable!(),
                            };
                            if let Err(e) = &result {
                                let says_nothing_applied = !e.is_outcome_unknown()
                                    && (e.server_kind() == Some(ServerErrorKind::ConnectionLost)
                                        || e.is_retryable());
                                if says_nothing_applied
                                    && record.unknowns == 0
                                    && !matches!(record.op, Op::Issue { .. })
                                {
                                    unapplied = Some(format!("{e:?}"));
                                }
                            }
                            match result {
                                Ok(id) => break Outcome::Ok(id),
                                Err(Error::InsufficientBalance { .. }) => break Outcome::Refused,
                                Err(Error::SoldOut { .. }) if record.unknowns == 0 => {
                                    break Outcome::Refused
                                }
                                Err(Error::SoldOut { .. }) => break Outcome::Unknown,
                                Err(Error::AlreadyIssued { user_coupon_id, .. }) => {
                                    if record.unknowns == 0 {
                                        record.unexpected = Some("AlreadyIssued".into());
                                    }
                                    break Outcome::Held(user_coupon_id);
                                }
                                Err(e) if e.is_outcome_unknown() => record.unknowns += 1,
                                Err(e)
                                    if e.server_kind() == Some(ServerErrorKind::ConnectionLost) =>
                                {
                                    record.lost += 1
                                }
                                Err(e) if e.is_retryable() => record.contended += 1,
                                Err(e) => {
                                    record.unexpected = Some(format!("{e:?}"));
                                    break Outcome::Unknown;
                                }
                            }
                            assert!(record.attempts < 1_000, "{key} never answered");
                        };
                        history.lock().expect("history").push(record);
                    }
                })
            })
            .collect();
        for caller in callers {
            caller.join().expect("caller");
        }
        stop.store(true, Ordering::Relaxed);
        killer.join().expect("killer");
    });
    records.extend(history.into_inner().expect("history"));
    let summary = Summary::of(&records);
    eprintln!(
        "{test}: {} pooled connections killed under the combiners; {summary}; ledger {:?}; \
         issuer {:?}",
        kills.load(Ordering::Relaxed),
        combining.stats(),
        issuer.stats()
    );
    // Recovered: the combining path and the pool work.
    let last = combining
        .deduct(2, dec(1), "after-the-kills")
        .expect("the combining ledger recovers");
    records.push(answered_once(
        "after-the-kills",
        Op::Deduct {
            user: 2,
            amount: dec(1),
        },
        last.id,
    ));
    pool.get().expect("pool.get after the kills");
    let mut conn = connect(&url);
    assert_no_violations(test, &workload::verify(&mut conn, &setup, &records));
    assert!(
        kills.load(Ordering::Relaxed) > 0,
        "no pooled connection killed"
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Server crash.
// ---------------------------------------------------------------------------------------------

/// 32 clients run deducts, transfers, refunds, charges and coupon issues on a private server
/// that is killed with SIGKILL and restarted on the same data directory (4 times; with
/// `LOCKSTOCK_SOAK_SECS`, every 0.5–1.5 s for that long).
/// Clients reconnect with backoff and retry with the same key. Afterwards every acknowledged
/// operation is there exactly once, every refused one is not, money is conserved, no balance is
/// negative, no coupon over-issued or duplicated, and every account audits.
///
/// MariaDB 10.11 itself has, rarely, found its InnoDB data corrupt after such a restart (seen
/// twice in CI runs: "Index for table 'user_coupon' is corrupt" answered to clients, an
/// assertion in `trx0purge.cc`, then a restart that aborts with "Data structure corruption").
/// No statement a client sends can do that, and such a run cannot be checked: it is run once
/// more on a fresh server (its error log printed), and a second such run fails the test.
#[test]
fn server_crashes_lose_no_acknowledged_operation() {
    let _storm = lockstock_testkit::fixtures::storm();
    let test = "server_crashes_lose_no_acknowledged_operation";
    let seed = seed(test);
    if let Err(log) = crash_run(test, seed) {
        eprintln!(
            "{test}: InnoDB found its own data corrupt after a SIGKILL (a server fault, not a \
             client's); running once more on a fresh server. The server's log:\n{log}"
        );
        if let Err(log) = crash_run(test, seed.wrapping_add(1)) {
            panic!("{test}: InnoDB found its data corrupt after a SIGKILL again:\n{log}");
        }
    }
}

/// Whether the server's error log `tail` says that InnoDB found its own data corrupt.
fn innodb_corruption(tail: &str) -> bool {
    [
        "is corrupt",
        "Data structure corruption",
        "InnoDB: Assertion failure",
    ]
    .iter()
    .any(|sign| tail.contains(sign))
}

/// The signs of InnoDB's own corruption are those of the CI run that saw it (12-01, the lines
/// as the server wrote them), and the messages of a healthy crash recovery are not among them.
#[test]
fn innodb_corruption_is_told_from_a_crash_recovery() {
    let corrupt = "2026-12-01  3:05:54 20 [ERROR] mariadbd: Index for table 'user_coupon' is \
                   corrupt; try to repair it\n\
                   2026-12-01  3:05:55 0 [ERROR] InnoDB: Plugin initialization aborted with \
                   error Data structure corruption";
    let recovered = "2026-12-01  3:05:40 0 [Note] InnoDB: Starting crash recovery from \
                     checkpoint LSN=44404\n\
                     2026-12-01  3:05:40 0 [Note] InnoDB: End of log at LSN=2002063\n\
                     2026-12-01  3:05:41 0 [Note] /usr/sbin/mariadbd: ready for connections.";
    assert!(innodb_corruption(corrupt));
    assert!(!innodb_corruption(recovered));
}

/// One run of [`server_crashes_lose_no_acknowledged_operation`]; `Err` with the server's error
/// log where InnoDB found its own data corrupt (the run is not checked then).
fn crash_run(test: &str, seed: u64) -> Result<(), String> {
    const LOG_TAIL: u64 = 64 * 1024;
    let mut rng = Rng::new(seed);
    let mut sandbox = Sandbox::start().expect("a private sandbox");
    let url = sandbox.create_database("crash").expect("database");
    let setup = {
        let mut conn = connect(&url);
        lockstock::run_migrations(&mut conn).expect("migrate");
        workload::setup(&mut conn, 16, 3, 1_000)
    };
    let soak = soak_secs().map(Duration::from_secs);
    const CLIENTS: usize = 32;
    let stop = AtomicBool::new(false);
    let errors = workload::ErrorTexts::default();
    let started = Instant::now();
    let mut crashes = 0;
    let mut downtime = Duration::ZERO;
    let (records, restarted) = thread::scope(|s| {
        let _stop_on_drop = crate::StopOnDrop(&stop);
        let clients: Vec<_> = (0..CLIENTS)
            .map(|n| {
                let seed = seed.wrapping_add(n as u64 + 1);
                let client = Client {
                    abandon_unknown: 100,
                    ..Client::new(&url, format!("k{n}"), n, &setup, seed, &errors)
                };
                let stop = &stop;
                s.spawn(move || workload::run_client(&client, stop, &mut |_| true))
            })
            .collect();
        let mut restarted = Ok(());
        loop {
            let done = match soak {
                Some(soak) => started.elapsed() >= soak,
                None => crashes >= 4,
            };
            if done {
                break;
            }
            thread::sleep(Duration::from_millis(500 + rng.below(1_000)));
            sandbox.kill().expect("SIGKILL the server");
            let down = Instant::now();
            crashes += 1;
            thread::sleep(Duration::from_millis(rng.below(400)));
            restarted = sandbox.restart();
            downtime += down.elapsed();
            if restarted.is_err() {
                break;
            }
        }
        if restarted.is_ok() {
            thread::sleep(Duration::from_millis(700));
        }
        (stop_and_collect(&stop, clients), restarted)
    });
    let log = sandbox.error_log_tail(LOG_TAIL);
    if innodb_corruption(&log) {
        return Err(log);
    }
    if let Err(e) = restarted {
        panic!("{test}: restart after the crash: {e}\n{log}");
    }
    let summary = Summary::of(&records);
    eprintln!(
        "{test}: {:?}, {crashes} crashes (SIGKILL + restart), {downtime:?} down; {summary}",
        started.elapsed()
    );
    eprintln!(
        "{test}: server errors answered:\n{}",
        workload::describe(&errors)
    );
    let mut conn = connect(&url);
    assert_no_violations(test, &workload::verify(&mut conn, &setup, &records));
    assert!(crashes >= 4);
    assert!(summary.ok > 0 && summary.lost_answers > 0, "{summary}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 4. Negative controls.
// ---------------------------------------------------------------------------------------------

/// The history checker itself: after a clean workload it finds nothing; each way of
/// corrupting the database behind lockstock's back — money moved between two accounts (every
/// global sum unchanged), a journal entry's `balance_after` changed, a coupon nobody asked for,
/// a coupon's stock taken without a coupon — is found (also by the checker's own reading of
/// each account's journal, not only through `audit`), and undoing it makes the database clean
/// again.
#[test]
fn negative_control_the_checker_finds_each_tampering() {
    let (url, mut conn) = fresh_database("faults_checker_tampering");
    // More coupons than the client's operations: the campaign never sells out (its stock is
    // tampered with, and a false sold-out answer needs coupons left), whatever the seed.
    let setup = workload::setup(&mut conn, 4, 1, 200);
    let errors = workload::ErrorTexts::default();
    let client = Client {
        max_ops: 150,
        ..Client::new(
            &url,
            "t0".into(),
            0,
            &setup,
            seed("checker_tampering"),
            &errors,
        )
    };
    let records = workload::run_client(&client, &AtomicBool::new(false), &mut |_| true);
    assert!(records.len() >= 150, "{} operations", records.len());
    assert_no_violations("clean", &workload::verify(&mut conn, &setup, &records));
    let campaign = setup.campaigns[0];
    let last_entry: i64 =
        diesel::sql_query("SELECT MAX(id) AS n FROM balance_history WHERE user_id = 1")
            .get_result::<Count>(&mut conn)
            .expect("account 1's last entry")
            .n;
    let template: i64 = diesel::sql_query("SELECT coupon_id AS n FROM fcfs_coupon WHERE id = ?")
        .bind::<BigInt, _>(campaign)
        .get_result::<Count>(&mut conn)
        .expect("the campaign's template")
        .n;
    let tamperings: [(&str, String, String, &str); 4] = [
        (
            "money moved between accounts",
            "UPDATE user_balance SET balance = balance + IF(user_id = 1, 1, -1) \
             WHERE user_id IN (1, 2)"
                .into(),
            "UPDATE user_balance SET balance = balance - IF(user_id = 1, 1, -1) \
             WHERE user_id IN (1, 2)"
                .into(),
            "account 1: balance",
        ),
        (
            "an entry's balance_after",
            format!("UPDATE balance_history SET balance_after = balance_after + 1 WHERE id = {last_entry}"),
            format!("UPDATE balance_history SET balance_after = balance_after - 1 WHERE id = {last_entry}"),
            "balance_after is",
        ),
        (
            "a coupon nobody asked for",
            format!(
                "INSERT INTO user_coupon (user_id, coupon_id, fcfs_coupon_id) \
                 VALUES (999999999, {template}, {campaign})"
            ),
            "DELETE FROM user_coupon WHERE user_id = 999999999".into(),
            "",
        ),
        (
            "stock taken without a coupon",
            format!("UPDATE fcfs_coupon SET stock_quantity = stock_quantity - 1 WHERE id = {campaign}"),
            format!("UPDATE fcfs_coupon SET stock_quantity = stock_quantity + 1 WHERE id = {campaign}"),
            "",
        ),
    ];
    for (what, tamper, undo, own_finding) in tamperings {
        conn.batch_execute(&tamper).expect("tamper");
        let found = workload::verify(&mut conn, &setup, &records);
        conn.batch_execute(&undo).expect("undo");
        assert!(!found.is_empty(), "{what}: not found");
        assert!(
            found.iter().any(|v| v.contains(own_finding)),
            "{what}: not found by the checker's own reading: {found:?}"
        );
        assert_no_violations(what, &workload::verify(&mut conn, &setup, &records));
    }
    // Histories that claim another call than the one applied, the journal untouched: a transfer
    // to another account, a refund of another deduct (before: both passed — only the kind and
    // the amount were compared).
    let claimed = |is: fn(&Op) -> bool| {
        records
            .iter()
            .position(|r| is(&r.op) && matches!(r.outcome, Outcome::Ok(_)))
            .expect("such an operation answered ok in the history")
    };
    let mut to_another = records.clone();
    if let Op::Transfer { from, to, .. } =
        &mut to_another[claimed(|op| matches!(op, Op::Transfer { .. }))].op
    {
        *to = (1..=4)
            .find(|a| a != from && a != to)
            .expect("another account");
    }
    let mut of_another = records.clone();
    if let Op::Refund { deduct, .. } =
        &mut of_another[claimed(|op| matches!(op, Op::Refund { .. }))].op
    {
        *deduct += 1_000_000;
    }
    // A sold-out answer while coupons are left (a false sold-out mark under-issues): a user
    // who got no coupon answered SoldOut, the campaign not sold out (before: not found —
    // every refused issue was taken on trust).
    let stock: i64 = diesel::sql_query("SELECT stock_quantity AS n FROM fcfs_coupon WHERE id = ?")
        .bind::<BigInt, _>(campaign)
        .get_result::<Count>(&mut conn)
        .expect("the campaign's stock")
        .n;
    assert!(stock > 0, "the campaign sold out: no case for the control");
    let mut false_sold_out = records.clone();
    let mut refused = workload::Record::new(
        "t0-false-sold-out".into(),
        Op::Issue {
            user: 999_999_998,
            campaign,
        },
    );
    refused.outcome = Outcome::Refused;
    refused.attempts = 1;
    false_sold_out.push(refused);
    for (what, history, finding) in [
        ("a transfer to another account", to_another, ""),
        ("a refund of another deduct", of_another, ""),
        (
            "a sold-out answer with coupons left",
            false_sold_out,
            "SoldOut with",
        ),
    ] {
        let found = workload::verify(&mut conn, &setup, &history);
        assert!(
            found.iter().any(|v| v.contains(finding)),
            "{what}: not found: {found:?}"
        );
    }
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Plain SELECT, compute in Rust, UPDATE: no lock, autocommit, REPEATABLE READ.
fn unlocked_deduct(conn: &mut MysqlConnection, user: i64, amount: Decimal) -> bool {
    let balance = stored_balance(conn, user);
    if balance < amount {
        return false;
    }
    thread::sleep(Duration::from_millis(5));
    diesel::update(user_balance::table.find(user))
        .set(user_balance::balance.eq(balance - amount))
        .execute(conn)
        .expect("write balance");
    true
}

/// The same concurrent deducts, once through an unlocked read-modify-write and once through
/// `BalanceLedger`: the harness detects the lost updates of the first, none of the second.
#[test]
fn negative_control_unlocked_deducts_lose_updates() {
    let _storm = lockstock_testkit::fixtures::storm();
    let (url, mut conn) = fresh_database("faults_negative_balance");
    let ledger = BalanceLedger::new();
    for user in [1, 2] {
        ledger
            .charge(&mut conn, user, dec(100_000), "init")
            .expect("charge");
    }
    const THREADS: usize = 8;
    const ROUNDS: usize = 5;
    let barrier = crate::Gate::new(THREADS);
    let (unlocked_ok, locked_ok) = thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let (url, barrier, ledger) = (&url, &barrier, &ledger);
                s.spawn(move || {
                    let _party = barrier.party();
                    let mut conn = connect(url);
                    conn.batch_execute("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                        .expect("isolation");
                    let mut unlocked = 0;
                    let mut locked = 0;
                    for round in 0..ROUNDS {
                        barrier.wait();
                        unlocked += usize::from(unlocked_deduct(&mut conn, 1, dec(100)));
                        barrier.wait();
                        let key = format!("t{t}-r{round}");
                        locked += usize::from(ledger.deduct(&mut conn, 2, dec(100), &key).is_ok());
                    }
                    (unlocked, locked)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .fold((0, 0), |(a, b), (c, d)| (a + c, b + d))
    });
    let balance = |conn: &mut MysqlConnection, user: i64| -> Decimal {
        user_balance::table
            .find(user)
            .select(user_balance::balance)
            .first(conn)
            .expect("balance")
    };
    let unlocked_expected = dec(100_000) - dec(100) * Decimal::from(unlocked_ok);
    let unlocked_final = balance(&mut conn, 1);
    eprintln!(
        "unlocked: {unlocked_ok} deducts answered ok, balance {unlocked_final}, expected \
         {unlocked_expected}: {} updates lost",
        ((unlocked_final - unlocked_expected) / dec(100)).normalize()
    );
    assert_ne!(
        unlocked_final, unlocked_expected,
        "the harness did not detect the lost updates of an unlocked read-modify-write"
    );
    assert!(
        ledger.audit(&mut conn, 1).is_err(),
        "audit must see the unjournaled changes"
    );
    let locked_expected = dec(100_000) - dec(100) * Decimal::from(locked_ok);
    eprintln!(
        "BalanceLedger: {locked_ok} of {} deducts answered ok",
        THREADS * ROUNDS
    );
    assert!(locked_ok > 0);
    assert_eq!(balance(&mut conn, 2), locked_expected);
    ledger
        .audit(&mut conn, 2)
        .expect("audit of the locked account");
}

/// An unlocked coupon issue (read stock, insert without a unique check, write stock - 1) under
/// concurrent load over-issues and issues twice to one user; `CouponIssuer` under the same load
/// does neither.
#[test]
fn negative_control_unlocked_issue_over_issues() {
    let _storm = lockstock_testkit::fixtures::storm();
    let (url, mut conn) = fresh_database("faults_negative_coupon");
    conn.batch_execute(
        "CREATE TABLE unsafe_campaign (id BIGINT PRIMARY KEY, stock INT NOT NULL) ENGINE=InnoDB; \
         CREATE TABLE unsafe_coupon (id BIGINT AUTO_INCREMENT PRIMARY KEY, \
             user_id BIGINT NOT NULL, campaign_id BIGINT NOT NULL) ENGINE=InnoDB; \
         INSERT INTO unsafe_campaign VALUES (1, 5)",
    )
    .expect("test-only tables");
    let issuer = CouponIssuer::new();
    let (_coupon, campaign) = open_campaign_named(&mut conn, &issuer, "control", 5);
    // 16 requests: users 1..=15, and user 1 asks twice.
    const THREADS: usize = 16;
    let barrier = crate::Gate::new(THREADS);
    thread::scope(|s| {
        for t in 0..THREADS {
            let (url, barrier, issuer) = (&url, &barrier, &issuer);
            s.spawn(move || {
                let _party = barrier.party();
                let user = (t as i64 % 15) + 1;
                let mut conn = connect(url);
                barrier.wait();
                #[derive(QueryableByName)]
                struct Stock {
                    #[diesel(sql_type = diesel::sql_types::Integer)]
                    stock: i32,
                }
                let stock = diesel::sql_query("SELECT stock FROM unsafe_campaign WHERE id = 1")
                    .get_result::<Stock>(&mut conn)
                    .expect("read stock")
                    .stock;
                // Every request reads the stock before any writes: the race always happens.
                barrier.wait();
                if stock > 0 {
                    diesel::sql_query(
                        "INSERT INTO unsafe_coupon (user_id, campaign_id) VALUES (?, 1)",
                    )
                    .bind::<BigInt, _>(user)
                    .execute(&mut conn)
                    .expect("insert");
                    diesel::sql_query("UPDATE unsafe_campaign SET stock = ? WHERE id = 1")
                        .bind::<diesel::sql_types::Integer, _>(stock - 1)
                        .execute(&mut conn)
                        .expect("write stock");
                }
                barrier.wait();
                let _ = issuer.issue(&mut conn, user, campaign.id);
            });
        }
    });
    #[derive(QueryableByName)]
    struct Counts {
        #[diesel(sql_type = BigInt)]
        issued: i64,
        #[diesel(sql_type = BigInt)]
        stock: i64,
        #[diesel(sql_type = BigInt)]
        duplicates: i64,
    }
    let unsafe_counts: Counts = diesel::sql_query(
        "SELECT (SELECT COUNT(*) FROM unsafe_coupon) AS issued, \
                (SELECT stock FROM unsafe_campaign WHERE id = 1) AS stock, \
                (SELECT COUNT(*) FROM (SELECT user_id FROM unsafe_coupon \
                    GROUP BY user_id HAVING COUNT(*) > 1) d) AS duplicates",
    )
    .get_result(&mut conn)
    .expect("counts");
    eprintln!(
        "unlocked issue: stock 5, {} issued, stock left {}, {} users hold two",
        unsafe_counts.issued, unsafe_counts.stock, unsafe_counts.duplicates
    );
    let over_issued = unsafe_counts.issued > 5 || unsafe_counts.issued != 5 - unsafe_counts.stock;
    assert!(
        over_issued && unsafe_counts.duplicates > 0,
        "the harness did not detect the over-issue and duplicate of an unlocked issue"
    );
    let issued = issued_rows(&mut conn, campaign.id);
    let (_total, stock) = stock_row(&mut conn, campaign.id);
    let holders: i64 = user_coupon::table
        .filter(user_coupon::fcfs_coupon_id.eq(campaign.id))
        .select(diesel::dsl::count(user_coupon::user_id).aggregate_distinct())
        .first(&mut conn)
        .expect("holders");
    assert_eq!((issued, stock, holders), (5, 0, 5), "CouponIssuer");
}

/// SERIALIZABLE + NOWAIT refuses at once — it does not wait, and does not silently serialise
/// behind — a connection that holds the row with FOR UPDATE: `Contended` after one attempt,
/// far below the lock wait timeout, nothing written.
#[test]
fn nowait_refuses_a_lock_holder_at_once() {
    let _exclusive = lockstock_testkit::fixtures::exclusive();
    let (url, mut holder) = fresh_database("faults_nowait");
    let mut policy = TxnPolicy::default().with_retry(RetryPolicy::no_retry());
    policy.lock_wait_timeout = Duration::from_secs(10);
    let ledger = BalanceLedger::with_policy(policy);
    ledger
        .charge(&mut holder, 1, dec(10_000), "init")
        .expect("charge");
    holder
        .batch_execute("BEGIN; SELECT balance FROM user_balance WHERE user_id = 1 FOR UPDATE")
        .expect("hold the row");
    let mut conn = connect(&url);
    let started = Instant::now();
    let refused = ledger.deduct(&mut conn, 1, dec(100), "blocked");
    let took = started.elapsed();
    eprintln!("NOWAIT refusal after {took:?}: {refused:?}");
    match &refused {
        Err(Error::Contended {
            attempts: 1, last, ..
        }) => assert!(
            last.kind().is_retryable(),
            "refusal not classified as a lock refusal: {last}"
        ),
        other => panic!("expected Contended after one attempt, got {other:?}"),
    }
    assert!(took < Duration::from_millis(900), "waited {took:?}");
    assert_eq!(count_key(&mut conn, 1, "blocked"), 0);
    let balance = lockstock_testkit::fixtures::stored_balance(&mut conn, 1);
    assert_eq!(balance, dec(10_000));
    holder.batch_execute("ROLLBACK").expect("release");
    let entry = ledger
        .deduct(&mut conn, 1, dec(100), "blocked")
        .expect("after release");
    assert_eq!(entry.balance_after, dec(9_900));
    ledger.audit(&mut conn, 1).expect("audit");
}

// ---------------------------------------------------------------------------------------------
// Holds under killed connections.
// ---------------------------------------------------------------------------------------------

/// What a victim was finally told about one hold: its id, and how the victim ended it (the
/// capture's amount, or `None` for a release).
type HoldOutcome = (i64, Option<Decimal>);

/// A call retried with the same key on a fresh connection after any failure that is not an
/// answer (a killed connection, an unknown outcome, contention), at most 100 times.
fn decided<T>(
    url: &str,
    conn: &mut MysqlConnection,
    before: &mut impl FnMut(&mut MysqlConnection),
    mut call: impl FnMut(&mut MysqlConnection) -> Result<T, Error>,
) -> Result<T, Error> {
    for _ in 0..100 {
        before(conn);
        match call(conn) {
            Ok(value) => return Ok(value),
            Err(
                e @ (Error::InsufficientBalance { .. }
                | Error::HoldNotActive { .. }
                | Error::HoldExpired { .. }
                | Error::IdempotencyConflict { .. }),
            ) => return Err(e),
            Err(_) => *conn = connect(url),
        }
    }
    panic!("no answer after 100 tries")
}

/// Victims place holds on one account and capture or release each one they got, while a killer
/// runs `KILL` or `KILL QUERY` on their connections after a random 0–3 ms for about half of
/// their calls. A victim retries every call with the same key on a new connection until it is
/// answered. Afterwards: every hold a victim was told about exists and ended as it was told,
/// no hold exists that no victim placed, every hold ended exactly once, and the audit passes.
#[test]
fn killed_connections_leave_holds_ended_exactly_once() {
    let _storm = lockstock_testkit::fixtures::storm();
    let test = "killed_connections_leave_holds_ended_exactly_once";
    let seed = seed(test);
    let (url, mut admin) = fresh_database("faults_kill_holds");
    const USER: i64 = 1;
    const VICTIMS: usize = 3;
    const ROUNDS: usize = 25;
    let ledger = BalanceLedger::new();
    ledger
        .charge(&mut admin, USER, dec(50_000), "fund")
        .expect("fund");
    let kills = AtomicUsize::new(0);
    let outcomes: Vec<HoldOutcome> = thread::scope(|s| {
        let victims: Vec<_> = (0..VICTIMS)
            .map(|v| {
                let (tx, rx) = mpsc::channel::<(i64, Duration, bool)>();
                let (killer_url, kills) = (url.clone(), &kills);
                s.spawn(move || {
                    let mut admin = connect(&killer_url);
                    for (id, delay, query_only) in rx {
                        thread::sleep(delay);
                        if kill(&mut admin, id, query_only).expect("KILL") {
                            kills.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
                let (url, ledger) = (url.clone(), &ledger);
                s.spawn(move || {
                    let mut rng = Rng::new(seed ^ v as u64);
                    let mut conn = connect(&url);
                    let mut hook_rng = Rng::new(seed ^ 0x5EED ^ v as u64);
                    let mut before = |conn: &mut MysqlConnection| {
                        if hook_rng.chance(500) {
                            if let Ok(id) = connection_id(conn) {
                                let delay = Duration::from_micros(hook_rng.below(3_001));
                                let query_only = hook_rng.below(3) == 0;
                                tx.send((id, delay, query_only)).expect("killer alive");
                            }
                        }
                    };
                    let expires_at = chrono::Utc::now().naive_utc() + chrono::Duration::minutes(10);
                    let mut told = Vec::new();
                    for round in 0..ROUNDS {
                        let amount = dec(1_000 + rng.below(9_000) as i64);
                        let key = format!("h-{v}-{round}");
                        let placed = decided(&url, &mut conn, &mut before, |c| {
                            ledger.hold(c, USER, amount, &key, expires_at)
                        });
                        let hold = match placed {
                            Ok(hold) => hold,
                            Err(Error::InsufficientBalance { .. }) => continue,
                            Err(e) => panic!("hold: {e:?}"),
                        };
                        assert_eq!((hold.kind, hold.amount), (EntryKind::Hold, amount));
                        let ended = if rng.chance(500) {
                            let part = dec(100 + rng.below(900) as i64);
                            let key = format!("c-{v}-{round}");
                            decided(&url, &mut conn, &mut before, |c| {
                                ledger.capture(c, hold.id, part, &key)
                            })
                            .map(|_| Some(part))
                        } else {
                            let key = format!("r-{v}-{round}");
                            decided(&url, &mut conn, &mut before, |c| {
                                ledger.release(c, hold.id, &key)
                            })
                            .map(|_| None)
                        };
                        told.push((hold.id, ended.unwrap_or_else(|e| panic!("end: {e:?}"))));
                    }
                    drop(tx);
                    told
                })
            })
            .collect();
        victims
            .into_iter()
            .flat_map(|h| h.join().expect("victim"))
            .collect()
    });
    let mut conn = connect(&url);
    let states = crate::holds::every_hold_ended_once(&mut conn);
    assert_eq!(states.get("active"), None, "a hold was left active");
    let rows: Vec<(i64, Decimal, String)> = lockstock::schema::balance_hold::table
        .select((
            lockstock::schema::balance_hold::id,
            lockstock::schema::balance_hold::captured_amount,
            lockstock::schema::balance_hold::state,
        ))
        .load(&mut conn)
        .expect("holds");
    assert_eq!(rows.len(), outcomes.len(), "holds no victim was told about");
    let mut posted = Decimal::ZERO;
    for (id, ended) in &outcomes {
        let row = rows
            .iter()
            .find(|r| r.0 == *id)
            .expect("a hold a victim was told about");
        match ended {
            Some(part) => {
                assert_eq!((row.1, row.2.as_str()), (*part, "captured"), "hold {id}");
                posted += *part;
            }
            None => assert_eq!(row.2, "released", "hold {id}"),
        }
    }
    let balance = ledger.balance(&mut conn, USER).expect("balance");
    assert_eq!(
        (balance.balance, balance.held),
        (dec(50_000) - posted, Decimal::ZERO)
    );
    eprintln!(
        "{test}: {} holds ended, {} kills hit a live connection",
        outcomes.len(),
        kills.load(Ordering::Relaxed)
    );
    assert!(kills.load(Ordering::Relaxed) > 0, "no kill landed");
    audit_ok(&ledger, &mut conn, USER);
}

/// The workload runs on a setup of one account and no campaign (deducts, charges and refunds,
/// no transfers, no issues) and on one of a campaign and no account (issues only); the
/// checker finds both histories clean. Before the fix the first panicked dividing by zero (a
/// transfer picked its second account among none), the second dividing by zero too (picking an
/// account among none for a deduct).
#[test]
fn the_workload_runs_on_one_account_or_on_campaigns_only() {
    let errors = workload::ErrorTexts::default();
    for (name, accounts, campaigns) in [("faults_one_account", 1, 0), ("faults_no_account", 0, 1)] {
        let (url, mut admin) = fresh_database(name);
        let setup = workload::setup(&mut admin, accounts, campaigns, 50);
        let client = Client {
            max_ops: 40,
            ..Client::new(&url, format!("{name}-0"), 0, &setup, 7, &errors)
        };
        let records = workload::run_client(&client, &AtomicBool::new(false), &mut |_| true);
        assert_eq!(records.len(), 40, "{name}");
        let issues = records
            .iter()
            .filter(|r| matches!(r.op, Op::Issue { .. }))
            .count();
        let transfers = records
            .iter()
            .filter(|r| matches!(r.op, Op::Transfer { .. }))
            .count();
        assert_eq!(transfers, 0, "{name}: a transfer needs two accounts");
        if accounts == 0 {
            assert_eq!(issues, 40, "{name}: only issues");
        } else {
            assert_eq!(issues, 0, "{name}: no campaign to issue from");
        }
        let mut conn = connect(&url);
        assert_no_violations(name, &workload::verify(&mut conn, &setup, &records));
    }
}
