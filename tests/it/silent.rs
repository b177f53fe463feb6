//! A server that never answers (SIGSTOPped with `Sandbox::pause`): every call still returns by
//! its deadline plus the policy's `unresponsive_grace` (the watchdog shuts the connection's
//! socket down), with a typed answer that is true against the database afterwards.
//!
//! Each test pauses a PRIVATE sandbox (never the shared one), runs its calls on other threads
//! and gives up itself — resuming the server so nothing hangs — when a call outlives
//! deadline + grace + 5 s, so a broken watchdog fails the test instead of hanging it.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};
use lockstock::combine::CombiningLedger;
use lockstock::{BalanceLedger, CouponIssuer, Error, SessionSettings, TxnPolicy};
use lockstock_testkit::fixtures::{
    audit_ok, connect, connection_id, count_key, exclusive, funded_account, issued_rows,
    open_campaign, policy_with_deadline, pool_with, stored_balance, user_coupon_rows,
};
use lockstock_testkit::Sandbox;
use rust_decimal::Decimal;

/// The deadline of every call here.
const DEADLINE: Duration = Duration::from_secs(1);

/// The policy of every call: [`DEADLINE`], the default grace.
fn policy() -> TxnPolicy {
    policy_with_deadline(DEADLINE)
}

/// What the watchdog promises: deadline + grace, plus a second for scheduling.
fn bound() -> Duration {
    DEADLINE + policy().unresponsive_grace + Duration::from_secs(1)
}

/// When a test stops waiting for a call: deadline + grace + 5 s.
fn give_up() -> Duration {
    DEADLINE + policy().unresponsive_grace + Duration::from_secs(5)
}

/// A private sandbox with a migrated database `name`: the sandbox, the URL, a connection.
fn private_server(name: &str) -> (Sandbox, String, MysqlConnection) {
    let sandbox = Sandbox::start().expect("a private sandbox");
    let url = sandbox.create_database(name).expect("database");
    let mut conn = connect(&url);
    lockstock::run_migrations(&mut conn).expect("migrate");
    (sandbox, url, conn)
}

/// Waits for `done` (a call running on another thread) at most [`give_up`]; if it has not
/// answered by then, resumes the server (so the call's thread can end) and fails the test.
fn answer_or_resume<T>(sandbox: &mut Sandbox, what: &str, done: &mpsc::Receiver<T>) -> T {
    match done.recv_timeout(give_up()) {
        Ok(answer) => answer,
        Err(_) => {
            let _ = sandbox.resume();
            panic!(
                "{what} did not return within {:?} of a paused server",
                give_up()
            );
        }
    }
}

/// Pauses `sandbox`'s server, runs `call` on another thread and resumes the server once it
/// answered ([`answer_or_resume`]: at most [`give_up`], else the test fails): its answer, and
/// how long it took.
fn on_paused_server<T: Send + 'static>(
    sandbox: &mut Sandbox,
    what: &str,
    call: impl FnOnce() -> T + Send + 'static,
) -> (T, Duration) {
    sandbox.pause().expect("pause");
    let (tx, rx) = mpsc::channel();
    let worker = thread::spawn(move || {
        let started = Instant::now();
        let answer = call();
        let _ = tx.send((answer, started.elapsed()));
    });
    let answered = answer_or_resume(sandbox, what, &rx);
    sandbox.resume().expect("resume");
    worker.join().expect("the calling thread");
    answered
}

/// This test binary, to run the one test `name` as a child process (of none of the calling
/// process's descriptors but stdin, stdout and stderr).
fn child_test(name: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new(std::env::current_exe().expect("test binary"));
    lockstock_testkit::inherit_no_descriptors(&mut cmd).args([
        "--exact",
        name,
        "--nocapture",
        "--test-threads=1",
    ]);
    cmd
}
#[test]
fn silent_server_deadline_holds_for_a_paused_server() {
    let _alone = exclusive();
    let (mut sandbox, url, mut conn) = private_server("silent_one");
    let ledger = BalanceLedger::with_policy(policy());
    let issuer = CouponIssuer::with_policy(policy());
    funded_account(&mut conn, &ledger, 1, Decimal::from(100));
    let campaign = open_campaign(&mut conn, &issuer, 10);
    // Four connections opened before the pause (a paused server accepts no new ones), no
    // ping on checkout (the caller's own pool code would wait for the paused server).
    let pool = Pool::builder()
        .max_size(4)
        .min_idle(Some(4))
        .test_on_check_out(false)
        .connection_customizer(Box::new(SessionSettings::new(policy())))
        .build(ConnectionManager::<MysqlConnection>::new(url.as_str()))
        .expect("pool");
    let before: HashSet<i64> = {
        let mut all: Vec<_> = (0..4).map(|_| pool.get().expect("pooled")).collect();
        all.iter_mut().map(|c| connection_id(c)).collect()
    };
    assert_eq!(before.len(), 4);
    // A combining ledger over a pool that pings on checkout: the ping runs under the watchdog.
    let combining = CombiningLedger::new(pool_with(&url, 1, policy()), ledger.clone());
    combining
        .charge(1, Decimal::ONE, "combined-warmup")
        .expect("warm-up");

    type Call<'a> = Box<dyn FnOnce(&mut MysqlConnection) -> Result<String, Error> + Send + 'a>;
    let calls: Vec<(&str, Call<'_>)> = vec![
        (
            "charge",
            Box::new(|c| Ok(format!("{:?}", ledger.charge(c, 1, Decimal::ONE, "c1")?))),
        ),
        (
            "deduct",
            Box::new(|c| Ok(format!("{:?}", ledger.deduct(c, 1, Decimal::ONE, "d1")?))),
        ),
        (
            "issue",
            Box::new(|c| Ok(format!("{:?}", issuer.issue(c, 7, campaign.id)?))),
        ),
        (
            "read",
            Box::new(|c| Ok(format!("{:?}", ledger.balance(c, 1)?))),
        ),
    ];
    sandbox.pause().expect("pause");
    thread::scope(|s| {
        for (what, call) in calls {
            let (tx, rx) = mpsc::channel();
            let pool = &pool;
            s.spawn(move || {
                let mut c = pool.get().expect("an idle pooled connection");
                let started = Instant::now();
                let answer = call(&mut c);
                let _ = tx.send((answer, started.elapsed()));
            });
            let (answer, took) = answer_or_resume(&mut sandbox, what, &rx);
            eprintln!("{what} on a paused server: {answer:?} after {took:?}");
            assert!(took <= bound(), "{what} took {took:?}");
            assert!(
                matches!(answer, Err(Error::ServerUnresponsive { .. })),
                "{what}: {answer:?}"
            );
        }
        let (tx, rx) = mpsc::channel();
        let combining = &combining;
        s.spawn(move || {
            let started = Instant::now();
            let answer = combining.charge(1, Decimal::ONE, "combined");
            let _ = tx.send((answer, started.elapsed()));
        });
        let (answer, took) = answer_or_resume(&mut sandbox, "combined charge", &rx);
        eprintln!("combined charge on a paused server: {answer:?} after {took:?}");
        assert!(took <= bound(), "combined charge took {took:?}");
        assert!(
            matches!(
                answer,
                Err(Error::Timeout { .. } | Error::ServerUnresponsive { .. })
            ),
            "combined charge: {answer:?}"
        );
        sandbox.resume().expect("resume");
    });

    // Nothing was applied, and the audit passes.
    let mut conn = connect(&url);
    assert_eq!(count_key(&mut conn, 1, "c1"), 0);
    assert_eq!(count_key(&mut conn, 1, "d1"), 0);
    assert_eq!(count_key(&mut conn, 1, "combined"), 0);
    assert_eq!(issued_rows(&mut conn, campaign.id), 0);
    assert_eq!(stored_balance(&mut conn, 1), Decimal::from(101));
    audit_ok(&ledger, &mut conn, 1);
    // The four connections the calls used were discarded, not handed out again.
    let mut after: Vec<_> = (0..4)
        .map(|_| pool.get().expect("pooled after resume"))
        .collect();
    for c in after.iter_mut() {
        let id = connection_id(c);
        assert!(
            !before.contains(&id),
            "connection {id} was handed out again"
        );
    }
    // The same calls work again on fresh connections.
    ledger
        .charge(&mut after[0], 1, Decimal::ONE, "c1")
        .expect("charge after resume");
    assert_eq!(count_key(&mut conn, 1, "c1"), 1);
}

/// One call of the load test: which operation on which user with which key, and its answer.
#[derive(Debug)]
struct Record {
    kind: &'static str,
    user: i64,
    key: String,
    answer: Result<(), Error>,
    took: Duration,
}

/// Whether an error promises that nothing was applied.
fn nothing_applied(error: &Error) -> bool {
    matches!(
        error,
        Error::ServerUnresponsive { .. }
            | Error::Timeout { .. }
            | Error::Contended { .. }
            | Error::Pool(_)
            | Error::ConnectionBroken { .. }
            | Error::Server(_)
    )
}

#[test]
fn silent_server_pause_under_load_answers_are_true() {
    let _alone = exclusive();
    let (mut sandbox, url, mut conn) = private_server("silent_load");
    let ledger = BalanceLedger::with_policy(policy());
    let issuer = CouponIssuer::with_policy(policy());
    const THREADS: i64 = 4;
    for user in 1..=THREADS {
        funded_account(&mut conn, &ledger, user, Decimal::from(1_000_000));
    }
    let campaign = open_campaign(&mut conn, &issuer, 1_000_000);
    let stop = AtomicBool::new(false);
    let (done_tx, done_rx) = mpsc::channel::<Vec<Record>>();
    let records: Vec<Record> = thread::scope(|s| {
        let _stop_on_drop = crate::StopOnDrop(&stop);
        for thread in 0..THREADS {
            let (done_tx, stop, url) = (done_tx.clone(), &stop, url.as_str());
            let (ledger, issuer, campaign) = (&ledger, &issuer, &campaign);
            s.spawn(move || {
                let mut records = Vec::new();
                let mut conn = connect(url);
                let user = thread + 1;
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let key = format!("t{thread}-{i}");
                    let started = Instant::now();
                    let (kind, user, answer) = match i % 3 {
                        0 => (
                            "charge",
                            user,
                            ledger.charge(&mut conn, user, Decimal::ONE, &key).map(drop),
                        ),
                        1 => (
                            "deduct",
                            user,
                            ledger.deduct(&mut conn, user, Decimal::ONE, &key).map(drop),
                        ),
                        _ => {
                            let holder = 1_000_000 * (thread + 1) + i;
                            (
                                "issue",
                                holder,
                                issuer.issue(&mut conn, holder, campaign.id).map(drop),
                            )
                        }
                    };
                    let took = started.elapsed();
                    let lost = answer.is_err();
                    records.push(Record {
                        kind,
                        user,
                        key,
                        answer,
                        took,
                    });
                    if lost {
                        // A connection the watchdog shut down is broken: a new one (which
                        // waits for a paused server to come back).
                        conn = connect(url);
                    }
                }
                let _ = done_tx.send(records);
            });
        }
        drop(done_tx);
        thread::sleep(Duration::from_millis(1_500));
        sandbox.pause().expect("pause");
        thread::sleep(Duration::from_secs(3));
        sandbox.resume().expect("resume");
        thread::sleep(Duration::from_millis(1_500));
        stop.store(true, Ordering::Relaxed);
        (0..THREADS)
            .flat_map(|_| answer_or_resume(&mut sandbox, "a load thread", &done_rx))
            .collect()
    });

    let late: Vec<&Record> = records.iter().filter(|r| r.took > bound()).collect();
    // The watchdog's answers: `ServerUnresponsive`, or `OutcomeUnknown` for a call cut while
    // its COMMIT was in flight (all four calls can be: a clean-clone CI run saw no
    // `ServerUnresponsive`).
    let unresponsive = records
        .iter()
        .filter(|r| matches!(r.answer, Err(Error::ServerUnresponsive { .. })))
        .count();
    let unknown = records
        .iter()
        .filter(|r| matches!(r.answer, Err(Error::OutcomeUnknown { .. })))
        .count();
    eprintln!(
        "{} calls, {unresponsive} ServerUnresponsive, {unknown} OutcomeUnknown, worst {:?}",
        records.len(),
        records.iter().map(|r| r.took).max().unwrap_or_default()
    );
    assert!(late.is_empty(), "calls later than {:?}: {late:#?}", bound());
    assert!(
        unresponsive + unknown > 0,
        "the pause was not seen by any call"
    );

    let mut conn = connect(&url);
    let holders: HashMap<i64, usize> =
        user_coupon_rows(&mut conn)
            .iter()
            .fold(HashMap::new(), |mut held, row| {
                *held.entry(row.1).or_default() += 1;
                held
            });
    for record in &records {
        let applied = match record.kind {
            "issue" => holders.get(&record.user).copied().unwrap_or(0) as i64,
            _ => count_key(&mut conn, record.user, &record.key),
        };
        match &record.answer {
            Ok(()) => assert_eq!(applied, 1, "{record:?}"),
            Err(e) if nothing_applied(e) => assert_eq!(applied, 0, "{record:?}"),
            Err(Error::OutcomeUnknown { .. }) => {
                // Either; a retry with the same key resolves it.
                assert!(applied <= 1, "{record:?}");
                let retried = match record.kind {
                    "charge" => ledger
                        .charge(&mut conn, record.user, Decimal::ONE, &record.key)
                        .map(drop),
                    "deduct" => ledger
                        .deduct(&mut conn, record.user, Decimal::ONE, &record.key)
                        .map(drop),
                    _ => match issuer.issue(&mut conn, record.user, campaign.id) {
                        Err(Error::AlreadyIssued { .. }) => Ok(()),
                        other => other.map(drop),
                    },
                };
                retried.unwrap_or_else(|e| panic!("retry of {record:?}: {e:?}"));
            }
            Err(e) => panic!("unexpected answer {e:?} for {record:?}"),
        }
    }
    for user in 1..=THREADS {
        audit_ok(&ledger, &mut conn, user);
    }
}

/// A private server with account 1 funded (100, then 1 charged through the combiner) and a
/// combining ledger over a pool of three connections, all idle and opened before any pause,
/// pinged on checkout (r2d2's default).
fn combining_server(name: &str) -> (Sandbox, String, std::sync::Arc<CombiningLedger>) {
    combining_server_of(name, 3)
}

/// [`combining_server`] with a pool of `connections`.
fn combining_server_of(
    name: &str,
    connections: u32,
) -> (Sandbox, String, std::sync::Arc<CombiningLedger>) {
    let (sandbox, url, mut conn) = private_server(name);
    let ledger = BalanceLedger::with_policy(policy());
    funded_account(&mut conn, &ledger, 1, Decimal::from(100));
    let combining = std::sync::Arc::new(CombiningLedger::new(
        pool_with(&url, connections, policy()),
        ledger,
    ));
    combining
        .charge(1, Decimal::ONE, "warm-up")
        .expect("warm-up");
    (sandbox, url, combining)
}

/// Pauses the server of `combining` (at `url`), has it charge account 1 under key `paused` on
/// another thread, resumes the server once the call answered; checks that it answered
/// `Timeout` or `ServerUnresponsive` and wrote nothing; how long it took.
fn paused_combined_charge(
    sandbox: &mut Sandbox,
    url: &str,
    combining: &std::sync::Arc<CombiningLedger>,
    what: &str,
) -> Duration {
    let combined = combining.clone();
    let (answer, took) = on_paused_server(sandbox, "combined charge", move || {
        combined.charge(1, Decimal::ONE, "paused")
    });
    eprintln!("combined charge over {what} on a paused server: {answer:?} after {took:?}");
    assert!(
        matches!(
            answer,
            Err(Error::Timeout { .. } | Error::ServerUnresponsive { .. })
        ),
        "{answer:?}"
    );
    assert_eq!(count_key(&mut connect(url), 1, "paused"), 0);
    took
}

/// A combiner's pool checkout on a paused server returns by deadline + grace also when the pool
/// holds several idle connections. r2d2 pings each idle connection in turn inside one checkout
/// (the pool tests connections on checkout, its default): the watchdog shuts the first ping's
/// socket down, r2d2 drops that connection and pings the next one. Before the fix the watchdog
/// looked at a call only until it had shut one socket down, so the second ping waited for the
/// paused server for ever (and with it every later caller of that key).
#[test]
fn silent_server_checkout_past_the_deadline_is_cut_on_every_connection() {
    let _alone = exclusive();
    let (mut sandbox, url, combining) = combining_server("silent_checkout");
    let took = paused_combined_charge(&mut sandbox, &url, &combining, "three idle connections");
    assert!(took <= bound(), "the call took {took:?}");
    // The combiner serves the key again.
    combining
        .charge(1, Decimal::ONE, "after")
        .expect("a charge after the resume");
    assert_eq!(stored_balance(&mut connect(&url), 1), Decimal::from(102));
}

/// The same with a pool of 100 idle connections: past the deadline + grace, every ping the
/// checkout sends is cut as soon as it blocks. Before the fix the watchdog looked at the call
/// every 10 ms, so each idle connection added up to 10 ms (a second past the promise here).
#[test]
fn silent_server_checkout_over_many_idle_connections_is_cut_promptly() {
    let _alone = exclusive();
    let (mut sandbox, url, combining) = combining_server_of("silent_many_idle", 100);
    let took = paused_combined_charge(&mut sandbox, &url, &combining, "100 idle connections");
    let promise = DEADLINE + policy().unresponsive_grace;
    assert!(
        took <= promise + Duration::from_millis(800),
        "the call took {took:?}, {:?} past its deadline + grace",
        took.saturating_sub(promise)
    );
}

/// A combiner's next leader, which opened its transaction ahead of its turn (`prime`), answers
/// by its own deadline when the turn never comes — without ending that transaction on a server
/// that does not answer. Before the fix it then sent the ROLLBACK under a fresh 1 s deadline,
/// holding the combiner's lock (every caller of every key waited for it), and answered about
/// 1.5 s past its deadline.
///
/// Caller Z's deduct runs while another program holds the account (Z's batch keeps being
/// refused, holding the key's turn); caller A, once Z's batch is seen at the account in the
/// server, leads the next batch: it checks out a connection and opens its transaction, then
/// waits for the turn. The server is paused:
/// Z's batch hangs until Z's deadline + grace, after A's deadline.
#[test]
fn silent_server_next_leader_answers_by_its_deadline() {
    let _alone = exclusive();
    let (mut sandbox, url, combining) = combining_server("silent_next_leader");
    let mut foreign = lockstock_testkit::fixtures::other_program(&url);
    lockstock_testkit::fixtures::lock_balance(&mut foreign, 1).expect("hold the account");
    let call = |key: &'static str| {
        let combining = combining.clone();
        let (tx, rx) = mpsc::channel();
        let worker = thread::spawn(move || {
            let started = Instant::now();
            let answer = combining.deduct(1, Decimal::ONE, key);
            let _ = tx.send((answer, started.elapsed()));
        });
        (worker, rx)
    };
    let (z, z_answer) = call("z");
    // Z's batch runs (holding the key's turn) once a statement of it is seen at the account.
    let foreign_id = connection_id(&mut foreign);
    let mut observer = connect(&url);
    let watching = Instant::now();
    loop {
        #[derive(QueryableByName)]
        struct Seen {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        let seen = diesel::sql_query(
            "SELECT COUNT(*) AS n FROM information_schema.PROCESSLIST \
             WHERE ID <> ? AND ID <> CONNECTION_ID() AND INFO LIKE '%FROM `user_balance`%'",
        )
        .bind::<diesel::sql_types::BigInt, _>(foreign_id)
        .get_result::<Seen>(&mut observer)
        .expect("processlist")
        .n;
        assert!(
            watching.elapsed() < DEADLINE,
            "Z's batch was never seen at the account"
        );
        if seen > 0 {
            break;
        }
        thread::sleep(Duration::from_millis(2));
    }
    drop(observer);
    let (a, a_answer) = call("a");
    // A has checked out and primed its connection (a few ms on a running server).
    thread::sleep(Duration::from_millis(300));
    sandbox.pause().expect("pause");
    let (answer, took) = answer_or_resume(&mut sandbox, "the next leader", &a_answer);
    let (z_is, z_took) = answer_or_resume(&mut sandbox, "the running batch", &z_answer);
    sandbox.resume().expect("resume");
    for worker in [z, a] {
        worker.join().expect("caller");
    }
    eprintln!("next leader: {answer:?} after {took:?}; running batch: {z_is:?} after {z_took:?}");
    assert!(
        matches!(answer, Err(Error::Timeout { .. })),
        "the next leader: {answer:?}"
    );
    assert!(
        took <= DEADLINE + policy().unresponsive_grace,
        "the next leader answered after {took:?}"
    );
    assert!(z_is.is_err(), "{z_is:?}");
    // Z's answer does not wait for A either (it waited 1.1 s for the combiner's lock before).
    assert!(
        z_took <= bound(),
        "the running batch answered after {z_took:?}"
    );
    diesel::connection::SimpleConnection::batch_execute(&mut foreign, "ROLLBACK").expect("release");
    let mut conn = connect(&url);
    assert_eq!(count_key(&mut conn, 1, "a"), 0);
    assert_eq!(count_key(&mut conn, 1, "z"), 0);
    assert_eq!(stored_balance(&mut conn, 1), Decimal::from(101));
    combining
        .deduct(1, Decimal::ONE, "after")
        .expect("a deduct after the resume");
}

/// `run_migrations_by` returns by its deadline plus the grace on a server that stops answering
/// (`ServerUnresponsive`, the connection shut down); `run_migrations` documents that it waits.
#[test]
fn silent_server_migrations_by_a_deadline_return() {
    let _alone = exclusive();
    let mut sandbox = Sandbox::start().expect("a private sandbox");
    let url = sandbox
        .create_database("silent_migrations")
        .expect("database");
    let mut conn = connect(&url);
    let (answer, took) = on_paused_server(&mut sandbox, "the migrations", move || {
        lockstock::run_migrations_by(&mut conn, lockstock::Deadline::after(DEADLINE))
    });
    assert!(
        matches!(answer, Err(Error::ServerUnresponsive { .. })),
        "{answer:?}"
    );
    assert!(took <= bound(), "the migrations answered after {took:?}");
    let mut again = connect(&url);
    lockstock::run_migrations_by(
        &mut again,
        lockstock::Deadline::after(Duration::from_secs(30)),
    )
    .expect("the migrations on a running server");
}

/// A call that the watchdog cut answers `ServerUnresponsive`; a LATER call on the same
/// (broken) connection whose deadline has already passed sends nothing and answers `Timeout`,
/// as every call whose deadline passed before it sent anything — not `ServerUnresponsive`,
/// which would say the server failed to answer that call too (a router counts it against the
/// node). Before the fix the runner remembered the cut connection for every later call on the
/// thread, not for the call that was cut.
#[test]
fn silent_server_a_later_call_on_a_cut_connection_is_not_answered_as_cut() {
    let _alone = exclusive();
    let (mut sandbox, _url, mut conn) = private_server("silent_later_call");
    let ledger = BalanceLedger::with_policy(policy());
    funded_account(&mut conn, &ledger, 1, Decimal::from(100));
    let ((cut, later), _) = on_paused_server(&mut sandbox, "the calls", move || {
        let cut = ledger.balance(&mut conn, 1).map(|b| b.balance);
        // The same thread and connection, a deadline already passed: nothing is sent.
        let later = ledger.runner().read_by(
            &mut conn,
            lockstock::Deadline::after(Duration::ZERO),
            |_| Ok(()),
        );
        (cut, later)
    });
    assert!(
        matches!(cut, Err(Error::ServerUnresponsive { .. })),
        "{cut:?}"
    );
    assert!(matches!(later, Err(Error::Timeout { .. })), "{later:?}");
}

/// Set in the child of [`silent_server_call_of_a_stopped_and_continued_process_returns`]: the
/// database URL its call uses.
const STOPPED_CHILD_URL: &str = "LOCKSTOCK_STOPPED_CHILD_URL";
/// What the child's lines to the parent begin with (libtest writes to stdout as well).
const CHILD_SAYS: &str = "stopped-child: ";

/// The child's stdin, and its lines that begin with [`CHILD_SAYS`] (what follows it), as they
/// come.
fn talk_to(child: &mut std::process::Child) -> (std::process::ChildStdin, mpsc::Receiver<String>) {
    use std::io::{BufRead, BufReader};
    let to_child = child.stdin.take().expect("child stdin");
    let from_child = BufReader::new(child.stdout.take().expect("child stdout"));
    let (lines, said) = mpsc::channel::<String>();
    thread::spawn(move || {
        for line in from_child.lines().map_while(Result::ok) {
            // libtest's own "test ... " may come first on the line.
            if let Some((_, line)) = line.split_once(CHILD_SAYS) {
                if lines.send(line.to_owned()).is_err() {
                    break;
                }
            }
        }
    });
    (to_child, said)
}

/// The next line of the child, if it begins with `what` within `within`; else the child is
/// killed and the server resumed, and the test fails.
fn expect(
    said: &mpsc::Receiver<String>,
    child: &mut std::process::Child,
    sandbox: &mut Sandbox,
    what: &str,
    within: Duration,
) -> String {
    let line = said.recv_timeout(within).ok();
    match line {
        Some(line) if line.starts_with(what) => line,
        other => {
            let _ = child.kill();
            let _ = child.wait();
            let _ = sandbox.resume();
            panic!("the child did not say {what:?} within {within:?}: {other:?}");
        }
    }
}

/// A private server with a migrated database `database` and account 1 funded, and the child
/// test `silent::<test>` started on it (the database's URL in the environment variable `env`),
/// with its stdin and stdout piped.
fn server_and_child(database: &str, test: &str, env: &str) -> (Sandbox, std::process::Child) {
    use std::process::Stdio;
    let (sandbox, url, mut conn) = private_server(database);
    funded_account(
        &mut conn,
        &BalanceLedger::with_policy(policy()),
        1,
        Decimal::from(100),
    );
    let child = child_test(&format!("silent::{test}"))
        .env(env, &url)
        .env("DATABASE_URL", &url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the child");
    (sandbox, child)
}

/// Waits for the child's `ready`, pauses the server, tells the child `go` and waits for its
/// `calling`: its call is then waiting for the paused server. The child's lines from then on.
fn pause_then_call(
    sandbox: &mut Sandbox,
    child: &mut std::process::Child,
) -> mpsc::Receiver<String> {
    use std::io::Write;
    let (mut to_child, said) = talk_to(child);
    expect(&said, child, sandbox, "ready", Duration::from_secs(30));
    sandbox.pause().expect("pause");
    writeln!(to_child, "go").expect("to the child");
    expect(&said, child, sandbox, "calling", Duration::from_secs(10));
    said
}

/// The milliseconds and the answer of a child's `answered <ms> <answer>` line: within
/// [`bound`] and `ServerUnresponsive`, or the test fails.
fn answered_in_bound(answer: &str) {
    let millis: u128 = answer
        .split_whitespace()
        .nth(1)
        .and_then(|m| m.parse().ok())
        .expect("milliseconds");
    assert!(
        Duration::from_millis(u64::try_from(millis).unwrap_or(u64::MAX)) <= bound(),
        "answered after {millis} ms, bound {:?}: {answer}",
        bound()
    );
    assert!(answer.contains("ServerUnresponsive"), "{answer}");
}

/// The child: runs only as a child of `silent_server_call_of_a_stopped_and_continued_process_returns`.
/// Connects, says `ready`, waits for `go`, says `calling` and reads a balance with
/// [`policy`]; then says what it got and after how many milliseconds.
#[test]
fn stopped_child() {
    use std::io::{BufRead, Write};
    let Ok(url) = std::env::var(STOPPED_CHILD_URL) else {
        return;
    };
    let ledger = BalanceLedger::with_policy(policy());
    let mut conn = connect(&url);
    let mut out = std::io::stdout();
    let mut say = |line: &str| {
        writeln!(out, "{CHILD_SAYS}{line}").expect("to the parent");
        out.flush().expect("to the parent");
    };
    say("ready");
    let mut go = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut go)
        .expect("from the parent");
    assert_eq!(go.trim(), "go");
    say("calling");
    let started = Instant::now();
    let answer = ledger.balance(&mut conn, 1);
    let took = started.elapsed();
    say(&format!("answered {} {answer:?}", took.as_millis()));
}

/// A call blocked on a paused server in a process that is stopped and continued meanwhile (a
/// `kill -STOP` / `kill -CONT`, Ctrl-Z and `fg`, a cgroup freeze, a debugger attaching) still
/// returns by its deadline plus grace. The stop interrupts libmariadb's `poll`, which the
/// kernel resumes as `restart_syscall` with `poll`'s arguments in place; before the fix the
/// watchdog recognised only `poll` and `ppoll` there, never shut the socket down, and the call
/// waited for as long as the server did. The call runs in a child process (this test binary
/// again, `--exact silent::stopped_child`), so only it is stopped.
#[test]
fn silent_server_call_of_a_stopped_and_continued_process_returns() {
    if std::env::var_os(STOPPED_CHILD_URL).is_some() {
        return;
    }
    let _alone = exclusive();
    let (mut sandbox, mut child) =
        server_and_child("silent_stopped", "stopped_child", STOPPED_CHILD_URL);
    let pid = libc::pid_t::try_from(child.id()).expect("a pid");
    let said = pause_then_call(&mut sandbox, &mut child);
    let (child_mut, sandbox_mut) = (&mut child, &mut sandbox);
    // The call is waiting for the paused server: stop the child and let it go on.
    thread::sleep(Duration::from_millis(300));
    let signal = |signal: libc::c_int| {
        // SAFETY: kill sends a signal to our own child process; no memory is involved.
        let sent = unsafe { libc::kill(pid, signal) };
        assert_eq!(sent, 0, "signal {signal} to the child {pid}");
    };
    signal(libc::SIGSTOP);
    thread::sleep(Duration::from_millis(100));
    signal(libc::SIGCONT);
    let answer = expect(&said, child_mut, sandbox_mut, "answered", give_up());
    let _ = sandbox.resume();
    let status = child.wait().expect("the child ends");
    assert!(status.success(), "the child failed: {status}");
    eprintln!("stopped and continued mid-call: {answer}");
    answered_in_bound(&answer);
}

/// Set for [`forked_child`]: the database URL.
const FORKED_CHILD_URL: &str = "LOCKSTOCK_FORKED_CHILD_URL";

/// The child of `silent_server_call_of_a_forked_process_returns`: makes a call (the watchdog
/// starts in this process), then forks without exec; the forked process connects, says
/// `ready`, waits for `go`, says `calling`, reads a balance with [`policy`] and says what it
/// got and after how many milliseconds, then ends (`_exit`). This process waits for it.
#[test]
fn forked_child() {
    let Ok(url) = std::env::var(FORKED_CHILD_URL) else {
        return;
    };
    let ledger = BalanceLedger::with_policy(policy());
    let mut conn = connect(&url);
    ledger
        .balance(&mut conn, 1)
        .expect("a call before the fork");
    // SAFETY: fork; the forked process uses only what it makes itself, its inherited stdin
    // and stdout through raw reads and writes, and ends with `_exit`.
    let forked = unsafe { libc::fork() };
    assert!(forked >= 0, "fork");
    if forked == 0 {
        let say = |line: &str| {
            let line = format!("{CHILD_SAYS}{line}\n");
            // SAFETY: writes the bytes of `line` to stdout.
            unsafe { libc::write(1, line.as_ptr().cast(), line.len()) };
        };
        let mut conn = connect(&url);
        say("ready");
        let mut go = [0u8; 3];
        // SAFETY: reads at most 3 bytes into `go`.
        unsafe { libc::read(0, go.as_mut_ptr().cast(), go.len()) };
        say("calling");
        let started = Instant::now();
        let answer = ledger.balance(&mut conn, 1);
        let took = started.elapsed();
        say(&format!("answered {} {answer:?}", took.as_millis()));
        // SAFETY: ends the forked process without running the test harness's exit.
        unsafe { libc::_exit(0) };
    }
    let mut status = 0;
    // SAFETY: waits for the process forked above.
    let waited = unsafe { libc::waitpid(forked, &mut status, 0) };
    assert_eq!(waited, forked, "waitpid");
}

/// A process that forks without exec (a pre-fork worker model, a daemon's `fork`) after
/// lockstock's watchdog started in it keeps its deadlines in the forked process: a call there
/// on a paused server returns by deadline + grace. The forked process inherits the watchdog's
/// schedule and "started" mark but not its thread; before the fix nothing ever cut its calls
/// (it waited for as long as the server did). Runs in a child process (this test binary again,
/// `--exact silent::forked_child`), which forks.
#[test]
fn silent_server_call_of_a_forked_process_returns() {
    if std::env::var_os(FORKED_CHILD_URL).is_some() {
        return;
    }
    let _alone = exclusive();
    let (mut sandbox, mut child) =
        server_and_child("silent_forked", "forked_child", FORKED_CHILD_URL);
    let said = pause_then_call(&mut sandbox, &mut child);
    let (child_mut, sandbox_mut) = (&mut child, &mut sandbox);
    let answer = expect(&said, child_mut, sandbox_mut, "answered", give_up());
    let _ = sandbox.resume();
    let status = child.wait().expect("the child ends");
    assert!(status.success(), "the child failed: {status}");
    eprintln!("forked process mid-call: {answer}");
    answered_in_bound(&answer);
}

/// A process started with its standard input closed (a daemon, a supervisor that closes every
/// descriptor) hands the lowest free descriptor, 0, to the first connection it opens. The
/// watchdog leaves the process's own standard streams alone (under a service manager they may
/// be sockets), but a database socket that merely took a freed number among them is cut like
/// any other: a call on it returns by its deadline + grace.
#[test]
fn silent_server_call_on_a_connection_numbered_zero_returns() {
    let _alone = exclusive();
    let (mut sandbox, url, _setup) = private_server("silent_fd_zero");
    let ledger = BalanceLedger::with_policy(policy());
    /// Gives standard input back however the test ends.
    struct Stdin(i32);
    impl Drop for Stdin {
        fn drop(&mut self) {
            // SAFETY: plain descriptor calls on numbers this test owns.
            unsafe {
                libc::dup2(self.0, 0);
                libc::close(self.0);
            }
        }
    }
    // SAFETY: plain descriptor calls; descriptor 0 is given back by `Stdin`'s drop.
    let saved = unsafe { libc::dup(0) };
    assert!(saved > 2, "a copy of standard input");
    let stdin = Stdin(saved);
    // SAFETY: as above.
    unsafe { libc::close(0) };
    let mut conn = connect(&url);
    let peer = {
        // SAFETY: an all-zero sockaddr_un is valid; getpeername writes at most `len` bytes.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        let ok =
            unsafe { libc::getpeername(0, std::ptr::addr_of_mut!(addr).cast(), &mut len) } == 0;
        let path: Vec<u8> = addr
            .sun_path
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        ok.then(|| String::from_utf8_lossy(&path).into_owned())
    };
    assert_eq!(
        peer.as_deref(),
        sandbox.socket_path().to_str(),
        "the connection did not get descriptor 0"
    );
    funded_account(&mut conn, &ledger, 1, Decimal::from(100));
    sandbox.pause().expect("pause");
    let (tx, rx) = mpsc::channel();
    let call = {
        let ledger = ledger.clone();
        thread::spawn(move || {
            let started = Instant::now();
            let answer = ledger.deduct(&mut conn, 1, Decimal::ONE, "d1");
            let _ = tx.send((answer, started.elapsed()));
            conn
        })
    };
    // Before: the watchdog never shut descriptor 0 down, and the call waited for the server.
    let (answer, took) = answer_or_resume(&mut sandbox, "deduct on descriptor 0", &rx);
    assert!(took <= bound(), "took {took:?}");
    assert!(
        matches!(answer, Err(Error::ServerUnresponsive { .. })),
        "{answer:?}"
    );
    sandbox.resume().expect("resume");
    drop(call.join().expect("caller"));
    drop(stdin);
    let mut check = connect(&url);
    assert_eq!(stored_balance(&mut check, 1), Decimal::from(100));
    assert_eq!(count_key(&mut check, 1, "d1"), 0);
}

/// Set in the child of [`silent_server_call_under_a_seccomp_filter_returns`]: the database URL.
const FILTERED_CHILD_URL: &str = "LOCKSTOCK_FILTERED_CHILD_URL";

/// Refuses `process_vm_readv` with EPERM in this thread and the threads it starts later (the
/// watchdog's among them), as container and service-manager profiles that leave out the
/// debugging system calls do (systemd's `@system-service`, with `SystemCallErrorNumber=EPERM`).
#[cfg(target_arch = "x86_64")]
fn refuse_process_vm_readv() {
    const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
    const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const RET_K: u16 = 0x06; // BPF_RET | BPF_K
    const RET_ALLOW: u32 = 0x7fff_0000;
    const RET_ERRNO: u32 = 0x0005_0000;
    let op = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
    let program = [
        op(LD_W_ABS, 0, 0, 4), // seccomp_data.arch
        op(JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        op(RET_K, 0, 0, RET_ALLOW),
        op(LD_W_ABS, 0, 0, 0), // seccomp_data.nr
        op(JEQ_K, 0, 1, libc::SYS_process_vm_readv as u32),
        op(RET_K, 0, 0, RET_ERRNO | libc::EPERM as u32),
        op(RET_K, 0, 0, RET_ALLOW),
    ];
    let filter = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: prctl with a valid filter program that outlives the call.
    unsafe {
        assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
        assert_eq!(
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                std::ptr::addr_of!(filter)
            ),
            0,
            "install the filter"
        );
    }
    let (mut byte, source) = (0_u8, 7_u8);
    let local = libc::iovec {
        iov_base: std::ptr::addr_of_mut!(byte).cast(),
        iov_len: 1,
    };
    let remote = libc::iovec {
        iov_base: std::ptr::addr_of!(source).cast_mut().cast(),
        iov_len: 1,
    };
    // SAFETY: reads one byte of our own memory into `byte`.
    let read = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
    assert_eq!(read, -1, "the filter refuses process_vm_readv");
}

/// The child of [`silent_server_call_under_a_seccomp_filter_returns`]: connects, refuses
/// itself `process_vm_readv`, says `ready`, waits for `go` (the server is paused then), reads a
/// balance with [`policy`] and says what it got after how many milliseconds.
#[cfg(target_arch = "x86_64")]
#[test]
fn filtered_child() {
    use std::io::{BufRead, Write};
    let Ok(url) = std::env::var(FILTERED_CHILD_URL) else {
        return;
    };
    let ledger = BalanceLedger::with_policy(policy());
    let mut conn = connect(&url);
    refuse_process_vm_readv();
    let mut out = std::io::stdout();
    let mut say = |line: &str| {
        writeln!(out, "{CHILD_SAYS}{line}").expect("to the parent");
        out.flush().expect("to the parent");
    };
    say("ready");
    let mut go = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut go)
        .expect("from the parent");
    assert_eq!(go.trim(), "go");
    let started = Instant::now();
    let answer = ledger.balance(&mut conn, 1);
    let took = started.elapsed();
    say(&format!("answered {} {answer:?}", took.as_millis()));
}

/// A process whose seccomp filter refuses `process_vm_readv` (a hardened container or unit)
/// still has its call on a paused server cut by deadline + grace: the watchdog reads the
/// blocked `poll`'s descriptor through `/proc/self/mem`. Before the fix it read it only with
/// `process_vm_readv`, found nothing, and the call waited as long as the server did (under a
/// filter that kills instead, the first overdue call killed the process). The call runs in a
/// child process (this test binary again), so only it is filtered.
#[cfg(target_arch = "x86_64")]
#[test]
fn silent_server_call_under_a_seccomp_filter_returns() {
    use std::io::Write;
    if std::env::var_os(FILTERED_CHILD_URL).is_some() {
        return;
    }
    let _alone = exclusive();
    let (mut sandbox, mut child) =
        server_and_child("silent_filtered", "filtered_child", FILTERED_CHILD_URL);
    let (mut to_child, said) = talk_to(&mut child);
    expect(
        &said,
        &mut child,
        &mut sandbox,
        "ready",
        Duration::from_secs(30),
    );
    sandbox.pause().expect("pause");
    writeln!(to_child, "go").expect("to the child");
    let answer = expect(&said, &mut child, &mut sandbox, "answered", give_up());
    let _ = sandbox.resume();
    let status = child.wait().expect("the child ends");
    assert!(status.success(), "the child failed: {status}");
    eprintln!("under a seccomp filter: {answer}");
    answered_in_bound(&answer);
}

/// Set in the child of [`a_standard_stream_socket_put_in_place_later_is_not_cut`].
const STDERR_CHILD_URL: &str = "LOCKSTOCK_STDERR_CHILD_URL";

/// The child of [`a_standard_stream_socket_put_in_place_later_is_not_cut`]: puts a full socket
/// in place of its standard error (as a daemon hands it to the journal after its start), runs
/// a transaction whose body writes a line there past deadline + grace (blocked until the other
/// end is drained), and says whether its standard error still works afterwards.
#[test]
fn stderr_child() {
    use std::io::Write;
    let Ok(url) = std::env::var(STDERR_CHILD_URL) else {
        return;
    };
    let mut conn = connect(&url);
    let mut ends = [0; 2];
    // SAFETY: plain descriptor calls on descriptors this test creates.
    unsafe {
        assert_eq!(
            libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, ends.as_mut_ptr()),
            0
        );
        // Full: writes to it block until the other end reads.
        libc::fcntl(ends[0], libc::F_SETFL, libc::O_NONBLOCK);
        let chunk = [b'.'; 4096];
        while libc::write(ends[0], chunk.as_ptr().cast(), chunk.len()) > 0 {}
        libc::fcntl(ends[0], libc::F_SETFL, 0);
        assert_eq!(libc::dup2(ends[0], 2), 2);
    }
    let reader = ends[1];
    let drain = thread::spawn(move || {
        thread::sleep(Duration::from_millis(1_500));
        let mut buffer = [0_u8; 65_536];
        // SAFETY: reads into a buffer this thread owns.
        unsafe { libc::fcntl(reader, libc::F_SETFL, libc::O_NONBLOCK) };
        let until = Instant::now() + Duration::from_millis(1_000);
        while Instant::now() < until {
            // SAFETY: as above.
            let read = unsafe { libc::read(reader, buffer.as_mut_ptr().cast(), buffer.len()) };
            if read <= 0 {
                thread::sleep(Duration::from_millis(5));
            }
        }
    });
    let runner = lockstock::TxnRunner::new(policy_with_deadline(Duration::from_millis(300)));
    let _ = runner.run(&mut conn, |_| {
        thread::sleep(Duration::from_millis(700));
        // Blocked in write(2) past deadline + grace.
        let _ = writeln!(std::io::stderr(), "a line for the journal");
        Ok(())
    });
    drain.join().expect("drained");
    // SAFETY: writes one byte from a constant.
    let works = unsafe { libc::write(2, b"z".as_ptr().cast(), 1) } == 1;
    let mut out = std::io::stdout();
    writeln!(out, "{CHILD_SAYS}stderr works: {works}").expect("to the parent");
}

/// The watchdog leaves a socket put in place of a standard stream after the start (a daemon's
/// journal stream) alone while a guarded thread writes to it past deadline + grace: it cuts
/// only a call waiting to receive there, as a database call waits. Before the fix such a
/// write had the process's standard error shut down for good.
#[test]
fn a_standard_stream_socket_put_in_place_later_is_not_cut() {
    use std::process::Stdio;
    if std::env::var_os(STDERR_CHILD_URL).is_some() {
        return;
    }
    let _alone = exclusive();
    let (_sandbox, url, _conn) = private_server("silent_stderr");
    let output = child_test("silent::stderr_child")
        .env(STDERR_CHILD_URL, &url)
        .stdin(Stdio::null())
        .output()
        .expect("the child");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("stderr works: true"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Set in the child of [`a_process_that_cannot_see_its_threads_is_told`].
const DUMPABLE_CHILD: &str = "LOCKSTOCK_DUMPABLE_CHILD";

/// The child of [`a_process_that_cannot_see_its_threads_is_told`]: says what
/// `watchdog_available` answers as it starts, once it can no longer read its own threads'
/// `/proc` files (root dropping to `nobody`, as a daemon does; otherwise not dumpable), and
/// once it made itself dumpable again.
#[test]
fn dumpable_child() {
    use std::io::Write;
    if std::env::var_os(DUMPABLE_CHILD).is_none() {
        return;
    }
    let available = lockstock::txn::watchdog_available;
    let mut seen = vec![available()];
    // SAFETY: plain process-attribute calls.
    unsafe {
        if libc::geteuid() == 0 {
            assert_eq!(libc::setgid(65_534), 0, "setgid");
            assert_eq!(libc::setuid(65_534), 0, "setuid");
        } else {
            assert_eq!(libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0), 0);
        }
    }
    seen.push(available());
    // SAFETY: as above.
    unsafe { assert_eq!(libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0), 0) };
    seen.push(available());
    let mut out = std::io::stdout();
    writeln!(out, "{CHILD_SAYS}available: {seen:?}").expect("to the parent");
}

/// A process that cannot read what its threads are blocked in (not dumpable and not root: a
/// daemon that dropped root) cannot have a call on a silent server cut at its deadline: it is
/// told so by `watchdog_available`, which the docs tell it to check at start-up. Before, nothing
/// told it (the watchdog looked again and again, and the call waited for the server).
#[test]
fn a_process_that_cannot_see_its_threads_is_told() {
    use std::process::Stdio;
    if std::env::var_os(DUMPABLE_CHILD).is_some() {
        return;
    }
    assert!(lockstock::txn::watchdog_available(), "this test process");
    let output = child_test("silent::dumpable_child")
        .env(DUMPABLE_CHILD, "1")
        .stdin(Stdio::null())
        .output()
        .expect("the child");
    let stdout = String::from_utf8_lossy(&output.stdout);
    eprintln!("the child: {stdout}");
    assert!(
        stdout.contains("available: [true, false, true]"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `ServerFlavor::detect` asked inside a runner's body on the body's own connection, when the
/// server stops answering: the watchdog cuts it off (and marks the connection broken), and the
/// call answers `ServerUnresponsive` — no COMMIT was sent, nothing was committed. Before the
/// fix the runner took lockstock's own mark of the cut connection for the body having ended
/// the transaction through Diesel's manager, and answered `OutcomeUnknown` (which a caller must
/// not run again without its key, and a router does not).
#[test]
fn silent_server_detect_cut_inside_a_body_says_nothing_was_committed() {
    let _alone = exclusive();
    let (mut sandbox, _url, mut conn) = private_server("silent_detect_in_body");
    let runner = lockstock::TxnRunner::new(policy());
    let (ready, pause) = mpsc::channel();
    let (paused, go) = mpsc::channel::<()>();
    let (answered, answer) = mpsc::channel();
    let call = thread::spawn(move || {
        let started = Instant::now();
        let result = runner.run(&mut conn, |conn| {
            let _ = ready.send(());
            let _ = go.recv();
            lockstock::txn::ServerFlavor::detect(conn).map(|_| ())
        });
        let _ = answered.send((result, started.elapsed()));
    });
    pause.recv().expect("the body began");
    sandbox.pause().expect("pause");
    paused.send(()).expect("the body waits");
    let (result, took) = answer_or_resume(&mut sandbox, "detect inside a body", &answer);
    sandbox.resume().expect("resume");
    call.join().expect("the call");
    assert!(
        matches!(result, Err(Error::ServerUnresponsive { .. })),
        "{result:?} after {took:?}"
    );
    assert!(took <= bound(), "answered after {took:?}");
}
