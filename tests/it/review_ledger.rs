//! Regression tests for the ledger findings of the independent review (findings 2, 4, 9 and
//! 10c). Each test failed on the code before its fix; each checks the database afterwards.
//!
//! The races are made deterministic with the server's own locks, not with sleeps: a test holds
//! a row lock or a table's metadata lock from another connection and waits (polling
//! `information_schema`) until the ledger's connection is seen waiting for it.

use crate::waits_for_row_lock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use diesel::connection::{InstrumentationEvent, SimpleConnection};
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};
use diesel::sql_types::{BigInt, Text};
use lockstock::combine::{CombiningLedger, MysqlPool};
use lockstock::schema::balance_history;
use lockstock::{AccountOp, BalanceLedger, Entry, EntryKind, Error, SessionSettings, TxnPolicy};
use rust_decimal::Decimal;

use lockstock_testkit::fixtures::{
    assert_none_later_than, audit_ok, concurrently, connect, connection_id, count_key,
    fresh_database, journal_size, lock_balance, policy_with_deadline, pool_with, questions,
    retry_policy, row_holder, stored_balance, together, variant, while_checked_out, CallLog,
};

fn dec(units: i64) -> Decimal {
    Decimal::new(units, 0)
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// The count `n` that `query` answers for connection `id` (its one parameter).
fn count_for(admin: &mut MysqlConnection, query: &str, id: i64) -> i64 {
    diesel::sql_query(query)
        .bind::<BigInt, _>(id)
        .get_result::<Count>(admin)
        .unwrap_or_else(|e| panic!("{query}: {e}"))
        .n
}

/// Polls the server until `condition` holds (a liveness guard of 20 s, not a timed assertion).
fn wait_until(
    admin: &mut MysqlConnection,
    what: &str,
    mut condition: impl FnMut(&mut MysqlConnection) -> bool,
) {
    let started = Instant::now();
    while !condition(admin) {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "never reached: {what}"
        );
        thread::sleep(Duration::from_millis(2));
    }
}

/// The journal row behind a returned entry: (user, kind, amount, balance_after, key).
fn stored_entry(
    conn: &mut MysqlConnection,
    id: i64,
) -> Option<(i64, String, Decimal, Decimal, Option<String>)> {
    balance_history::table
        .find(id)
        .select((
            balance_history::user_id,
            balance_history::kind,
            balance_history::amount,
            balance_history::balance_after,
            balance_history::idempotency_key,
        ))
        .first(conn)
        .optional()
        .expect("entry")
}

fn assert_stored(conn: &mut MysqlConnection, entry: &Entry) {
    assert_eq!(
        stored_entry(conn, entry.id),
        Some((
            entry.user_id,
            entry.kind.as_str().to_owned(),
            entry.amount,
            entry.balance_after,
            entry.idempotency_key.clone(),
        )),
        "returned entry {entry:?} is not what the journal holds"
    );
}

/// A ledger whose calls wait out the test's locks: long lock waits, a long deadline.
fn patient_ledger() -> BalanceLedger {
    let mut policy = TxnPolicy::default();
    policy.lock_wait_timeout = Duration::from_secs(60);
    let retry = retry_policy(1_000_000, Duration::from_secs(60));
    BalanceLedger::with_policy(policy.with_retry(retry))
}

// ---------------------------------------------------------------------------------------------
// Finding 2
// ---------------------------------------------------------------------------------------------

/// The `request_hash` lockstock stores for `deduct(user, amount, key)`, read back from a
/// scratch database (so the test does not restate the hash function).
fn deduct_hash(user_id: i64, amount: Decimal, key: &str) -> String {
    let (_url, mut conn) = fresh_database("review_f2_hash");
    let ledger = BalanceLedger::new();
    ledger
        .charge(&mut conn, user_id, amount, "scratch")
        .expect("charge");
    ledger
        .deduct(&mut conn, user_id, amount, key)
        .expect("deduct");
    balance_history::table
        .filter(balance_history::idempotency_key.eq(key))
        .select(balance_history::request_hash)
        .first(&mut conn)
        .expect("hash")
}

/// The longest a [`Pauses`] keeps its connection stopped (no test stops one for nearly as long).
const PAUSE_AT_MOST: Duration = Duration::from_secs(60);

/// Stops the connection it is installed on (Diesel's instrumentation hook) before each
/// statement `stop_at` picks, until the test lets it go: [`Pauses::stopped`], [`Pauses::go`].
#[derive(Clone, Default)]
struct Pauses(Arc<(std::sync::Mutex<Option<String>>, std::sync::Condvar)>);

impl Pauses {
    fn install(
        &self,
        conn: &mut MysqlConnection,
        mut stop_at: impl FnMut(&str) -> bool + Send + 'static,
    ) {
        let this = self.clone();
        conn.set_instrumentation(move |event: InstrumentationEvent<'_>| {
            if let InstrumentationEvent::StartQuery { query, .. } = event {
                let sql = query.to_string();
                if stop_at(&sql) {
                    let (state, changed) = &*this.0;
                    let mut stopped = state.lock().expect("pauses");
                    *stopped = Some(sql);
                    changed.notify_all();
                    // Bounded: a test that fails while the connection is stopped never lets
                    // it go, and its scope would wait for this thread for ever.
                    let until = Instant::now() + PAUSE_AT_MOST;
                    while stopped.is_some() && Instant::now() < until {
                        stopped = changed
                            .wait_timeout(stopped, Duration::from_millis(100))
                            .expect("pauses")
                            .0;
                    }
                }
            }
        });
    }

    /// [`install`](Self::install), stopping before the `nth` statement (from 1) that `matches`
    /// picks.
    fn install_nth(
        &self,
        conn: &mut MysqlConnection,
        nth: usize,
        matches: impl Fn(&str) -> bool + Send + 'static,
    ) {
        let mut seen = 0;
        self.install(conn, move |sql| {
            if matches(sql) {
                seen += 1;
                return seen == nth;
            }
            false
        });
    }

    /// Waits until the connection stopped (a liveness guard of 20 s); the statement it stopped
    /// before.
    fn stopped(&self) -> String {
        let (state, changed) = &*self.0;
        let mut stopped = state.lock().expect("pauses");
        let started = Instant::now();
        loop {
            if let Some(sql) = stopped.as_ref() {
                return sql.clone();
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the connection never stopped"
            );
            stopped = changed
                .wait_timeout(stopped, Duration::from_millis(10))
                .expect("pauses")
                .0;
        }
    }

    /// Lets the stopped connection go on.
    fn go(&self) {
        let (state, changed) = &*self.0;
        *state.lock().expect("pauses") = None;
        changed.notify_all();
    }
}

/// A batch whose first round hits a key already in the journal looks the keys up, then runs a
/// second round. Another connection commits `deduct(50, "K")` after that lookup and before the
/// second round locks the account: the batch's own `deduct(50, "K")` is then refused for the
/// balance — and must still be answered from the journal, as the single call is.
///
/// Made deterministic by stopping the batch's connection (Diesel's instrumentation hook)
/// before its first round's journal INSERT — the account held, so the other connection queues
/// for it — and before its key lookup's read — its snapshot open, so the other connection
/// commits after it. (Until lockstock stopped waiting for locks while it holds an account, a
/// row lock that the first round's INSERT waited for did the first stop.)
///
/// Before the fix: `InsufficientBalance { available: 11, requested: 50 }`.
#[test]
fn finding_2_batch_replays_key_committed_by_another_connection() {
    let hash = deduct_hash(1, dec(50), "K");
    let (url, mut admin) = fresh_database("review_f2");
    let ledger = BalanceLedger::new();
    ledger.charge(&mut admin, 1, dec(60), "seed").expect("seed");
    let k0 = ledger.charge(&mut admin, 1, dec(1), "k0").expect("k0");

    // B: the batch, stopped before its first journal INSERT and before its first key lookup
    // after it.
    let mut b = connect(&url);
    let pauses = Pauses::default();
    let (mut inserts, mut lookups) = (0, 0);
    pauses.install(&mut b, move |sql| {
        if sql.contains("INSERT INTO `balance_history`") {
            inserts += 1;
            return inserts == 1;
        }
        if inserts > 0 && sql.contains("`balance_history`.`idempotency_key` IN") {
            lookups += 1;
            return lookups == 1;
        }
        false
    });
    let batch = thread::spawn(move || {
        let ops = [
            AccountOp::charge(dec(1), "k0"),
            AccountOp::deduct(dec(50), "K"),
        ];
        patient_ledger().apply_many(&mut b, 1, &ops)
    });
    let first = pauses.stopped();
    assert!(first.contains("INSERT"), "{first}");

    // H: the other connection's deduct(50, "K"); queues for the account row the batch holds,
    // and writes once told.
    let mut h = connect(&url);
    let h_id = connection_id(&mut h);
    h.batch_execute("SET SESSION innodb_lock_wait_timeout = 60; BEGIN")
        .expect("begin H");
    let (write, told) = mpsc::channel::<()>();
    let other = thread::spawn(move || {
        let balance: Decimal = lock_balance(&mut h, 1).expect("lock the account");
        assert_eq!(balance, dec(61));
        told.recv().expect("told to write");
        diesel::sql_query(
            "INSERT INTO balance_history \
             (user_id, kind, amount, balance_after, idempotency_key, request_hash, created_at) \
             VALUES (1, 'deduct', 50, 11, 'K', ?, UTC_TIMESTAMP(6))",
        )
        .bind::<Text, _>(&hash)
        .execute(&mut h)
        .expect("insert K");
        diesel::sql_query(
            "UPDATE user_balance SET balance = 11, version = version + 1 WHERE user_id = 1",
        )
        .execute(&mut h)
        .expect("update balance");
        let id: i64 = diesel::select(diesel::dsl::sql::<BigInt>("LAST_INSERT_ID()"))
            .get_result(&mut h)
            .expect("id");
        h.batch_execute("COMMIT").expect("commit H");
        id
    });
    wait_until(&mut admin, "H queues for the account row", |a| {
        waits_for_row_lock(a, h_id)
    });

    // The first round fails on the duplicate k0 and rolls back; H gets the account; the
    // batch's key lookup opens its snapshot and stops before its read; H commits K.
    pauses.go();
    let second = pauses.stopped();
    assert!(second.contains("SELECT"), "{second}");
    write.send(()).expect("tell H");
    let committed = other.join().expect("H");
    pauses.go();
    let results = batch.join().expect("batch").expect("batch call");

    assert_eq!(results.len(), 2);
    assert_eq!(results[0].as_ref().expect("k0 replayed").id, k0.id);
    match &results[1] {
        Ok(entry) => {
            assert_eq!(
                entry.id, committed,
                "not the entry the other connection wrote"
            );
            assert_eq!(entry.balance_after, dec(11));
        }
        Err(e) => panic!("deduct(50, \"K\") with K in the journal: {e:?}"),
    }
    // The single call agrees.
    let single = ledger.deduct(&mut admin, 1, dec(50), "K").expect("single");
    assert_eq!(single.id, committed);
    // The database: one K, the balance and the journal agree.
    assert_eq!(count_key(&mut admin, 1, "K"), 1);
    assert_eq!(journal_size(&mut admin, 1), 3);
    assert_eq!(stored_balance(&mut admin, 1), dec(11));
    audit_ok(&ledger, &mut admin, 1);
}

// ---------------------------------------------------------------------------------------------
// Finding 4
// ---------------------------------------------------------------------------------------------

/// A server account that may lock and change balances and write the journal but not read the
/// journal: the key lookup after a commit fails on the server ("SELECT command denied").
fn journal_blind_url(url: &str, admin: &mut MysqlConnection, database: &str) -> Restricted {
    restricted_url(
        url,
        admin,
        (database, &format!("blind_{database}")),
        &[
            ("SELECT, INSERT, UPDATE", "user_balance"),
            ("INSERT", "balance_history"),
        ],
    )
}

/// A server account (password `blind`) that has only some privileges, and its URL; dropped
/// from the server with it — also by a test that fails.
pub(crate) struct Restricted {
    url: String,
    admin_url: String,
    user: String,
}

impl Restricted {
    pub(crate) fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for Restricted {
    fn drop(&mut self) {
        if let Ok(mut admin) = MysqlConnection::establish(&self.admin_url) {
            let user = &self.user;
            let _ = admin.batch_execute(&format!(
                "DROP USER IF EXISTS '{user}'@'localhost', '{user}'@'%'"
            ));
        }
    }
}

/// A server account `user` (password `blind`; a name of the test's own: tests run in
/// parallel) that has only `grants` — privileges on a table of `database` — created through
/// `admin` (connected to `url`).
pub(crate) fn restricted_url(
    url: &str,
    admin: &mut MysqlConnection,
    (database, user): (&str, &str),
    grants: &[(&str, &str)],
) -> Restricted {
    for host in ["localhost", "%"] {
        let mut sql = format!("CREATE USER IF NOT EXISTS '{user}'@'{host}' IDENTIFIED BY 'blind'");
        for (privileges, table) in grants {
            sql.push_str(&format!(
                "; GRANT {privileges} ON `{database}`.`{table}` TO '{user}'@'{host}'"
            ));
        }
        admin.batch_execute(&sql).expect("restricted user");
    }
    let rest = url.split_once('@').map_or(url, |(_, rest)| rest);
    Restricted {
        url: format!("mysql://{user}:blind@{rest}"),
        admin_url: url.to_owned(),
        user: user.to_owned(),
    }
}

/// `OutcomeUnknown` whose source is the server's refusal of a privilege ("... denied").
pub(crate) fn is_denied_outcome_unknown<T>(result: &Result<T, Error>) -> bool {
    match result {
        Err(e @ Error::OutcomeUnknown { source }) => {
            e.is_outcome_unknown() && source.message().to_lowercase().contains("denied")
        }
        _ => false,
    }
}

/// A batch commits a charge, then the key lookup for its refused deduct fails. Before the fix
/// the whole call was `Err(Server)` ("nothing was committed") although the charge committed.
/// Now: the charge gets its entry, the refused deduct `OutcomeUnknown`.
#[test]
fn finding_4_committed_batch_never_answers_nothing_applied() {
    let (url, mut admin) = fresh_database("review_f4");
    let ledger = BalanceLedger::new();
    ledger
        .charge(&mut admin, 1, dec(100), "seed")
        .expect("seed");
    let blind = journal_blind_url(&url, &mut admin, "review_f4");
    let mut conn = connect(blind.url());

    let ops = [
        AccountOp::charge(dec(10), "c1"),
        AccountOp::deduct(dec(1_000), "big"),
    ];
    let results = match ledger.apply_many(&mut conn, 1, &ops) {
        Ok(results) => results,
        Err(e) => panic!("the batch committed c1, but the call answered {e:?}"),
    };
    let c1 = results[0].as_ref().expect("c1 committed");
    assert_stored(&mut admin, c1);
    assert_eq!(c1.balance_after, dec(110));
    assert!(is_denied_outcome_unknown(&results[1]), "{:?}", results[1]);

    assert_eq!(count_key(&mut admin, 1, "c1"), 1);
    assert_eq!(count_key(&mut admin, 1, "big"), 0);
    assert_eq!(stored_balance(&mut admin, 1), dec(110));
    audit_ok(&ledger, &mut admin, 1);
}

/// The same through `CombiningLedger`: two callers combined into one batch that commits one of
/// them. Before the fix both got a copy of the lookup's `Err(Server)`, with
/// `is_outcome_unknown() == false`, although one had committed.
///
/// The two callers queue while the lane's first batch (seen at the account row in the server)
/// waits for an account row the test holds; the test waits until the combiner shows both
/// queued, and its counts afterwards prove that the two were one batch.
#[test]
fn finding_4_combined_callers_of_a_committed_batch_get_their_own_answers() {
    let (url, mut admin) = fresh_database("review_f4c");
    let patient = patient_ledger();
    patient
        .charge(&mut admin, 1, dec(100), "seed")
        .expect("seed");
    let blind = journal_blind_url(&url, &mut admin, "review_f4c");
    let pool: MysqlPool = Pool::builder()
        .max_size(2)
        .connection_customizer(Box::new(SessionSettings::new(patient.policy().clone())))
        .build(ConnectionManager::<MysqlConnection>::new(blind.url()))
        .expect("pool");
    let hot = Arc::new(CombiningLedger::new(pool, patient.clone()));

    // Hold the account: the first caller's batch (alone) waits for it.
    let mut holder = connect(&url);
    holder.batch_execute("BEGIN").expect("begin");
    let _: Decimal = lock_balance(&mut holder, 1).expect("hold the account");
    let first = {
        let hot = hot.clone();
        thread::spawn(move || hot.charge(1, dec(1), "a"))
    };
    // The first batch is running once its connection is seen at the account row.
    let mut observer = connect(&url);
    wait_until(
        &mut observer,
        "the first batch at the account",
        |observer| {
            diesel::sql_query(
                "SELECT COUNT(*) AS n FROM information_schema.PROCESSLIST \
             WHERE USER = 'blind_review_f4c' AND DB = 'review_f4c' AND INFO LIKE '%user_balance%'",
            )
            .get_result::<Count>(observer)
            .expect("processlist")
            .n > 0
        },
    );
    let x = {
        let hot = hot.clone();
        thread::spawn(move || hot.charge(1, dec(10), "x"))
    };
    let y = {
        let hot = hot.clone();
        thread::spawn(move || hot.deduct(1, dec(1_000), "y"))
    };
    // Both queued behind the first batch (not a fixed sleep: a thread started late would form
    // a batch of its own).
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while hot.stats().queued < 2 && std::time::Instant::now() < until {
        thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        hot.stats().queued,
        2,
        "x and y queued behind the first batch"
    );
    holder.batch_execute("ROLLBACK").expect("release");

    let first = first.join().expect("first");
    let x = x.join().expect("x");
    let y = y.join().expect("y");
    let stats = hot.stats();
    assert_eq!(
        (stats.batches, stats.largest_batch),
        (2, 2),
        "x and y were not combined into one batch: {stats:?}"
    );
    assert_stored(&mut admin, first.as_ref().expect("a"));
    match &x {
        Ok(entry) => assert_stored(&mut admin, entry),
        Err(e) => panic!(
            "x committed but was answered {e:?} (outcome unknown: {})",
            e.is_outcome_unknown()
        ),
    }
    assert!(is_denied_outcome_unknown(&y), "{y:?}");
    assert_eq!(count_key(&mut admin, 1, "x"), 1);
    assert_eq!(count_key(&mut admin, 1, "y"), 0);
    assert_eq!(stored_balance(&mut admin, 1), dec(111));
    audit_ok(&patient, &mut admin, 1);
}

/// A batch retried under a key already in the journal (say after `OutcomeUnknown`) is refused
/// by the key's unique index, and its keys are looked up; where that lookup fails (here a
/// server account that may not read the journal) the requests still open may be applied, so
/// each is answered `OutcomeUnknown`, as the single call is — never the lookup's failure as
/// the batch's outer `Err`, which says that no request was applied. Before the fix the batch
/// answered `Err(Server)` ("SELECT command denied").
#[test]
fn a_batch_whose_keys_cannot_be_looked_up_after_a_clash_may_be_applied() {
    let (url, mut admin) = fresh_database("review_clash_lookup");
    let ledger = BalanceLedger::new();
    ledger
        .charge(&mut admin, 1, dec(100), "seed")
        .expect("seed");
    let applied = ledger
        .deduct(&mut admin, 1, dec(10), "d")
        .expect("the first deduct, applied");
    let blind = journal_blind_url(&url, &mut admin, "review_clash_lookup");
    let mut conn = connect(blind.url());

    let single = ledger.deduct(&mut conn, 1, dec(10), "d");
    assert!(is_denied_outcome_unknown(&single), "{single:?}");
    let ops = [
        AccountOp::deduct(dec(10), "d"),
        AccountOp::charge(dec(5), "c2"),
    ];
    let results = match ledger.apply_many(&mut conn, 1, &ops) {
        Ok(results) => results,
        Err(e) => panic!("a key of the batch is recorded, but the call answered {e:?}"),
    };
    assert_eq!(results.len(), 2);
    for result in &results {
        assert!(is_denied_outcome_unknown(result), "{result:?}");
    }

    // Nothing more was written: the first deduct only, no charge `c2`.
    assert_eq!(count_key(&mut admin, 1, "d"), 1);
    assert_eq!(count_key(&mut admin, 1, "c2"), 0);
    assert_eq!(stored_balance(&mut admin, 1), dec(90));
    let replayed = ledger
        .deduct(&mut admin, 1, dec(10), "d")
        .expect("the retry, answered from the journal");
    assert_eq!(replayed.id, applied.id);
    audit_ok(&ledger, &mut admin, 1);
}

// ---------------------------------------------------------------------------------------------
// Finding 9
// ---------------------------------------------------------------------------------------------

/// The finding 9 calls' deadline, and what they may take beyond it: scheduling on two loaded
/// cores (995 ms was seen against 600 + 400 ms with other work beside the test; 632 ms once
/// against 300 + 200 ms). Before the fix calls took up to about twice their deadline, so a
/// bound of 1.6 times it still tells the two apart.
const DEADLINE: Duration = Duration::from_millis(1_000);
const SLACK: Duration = Duration::from_millis(600);

fn short_policy() -> TxnPolicy {
    policy_with_deadline(DEADLINE)
}

/// Holds account `user`'s row for 250 ms at a time, asking for it again 2 ms after each release
/// (waiting, so it queues behind a ledger transaction that got in), until stopped: calls on the
/// account are refused most of the time, and a call that got through once is often refused
/// again in its next transaction.
fn hot_row_holder(url: &str, user: i64, stop: Arc<AtomicBool>) -> thread::JoinHandle<()> {
    let pace = (Duration::from_millis(250), Duration::from_millis(2));
    row_holder(
        url,
        "SET SESSION innodb_lock_wait_timeout = 30",
        pace,
        stop,
        move |conn| {
            let _: Decimal = lock_balance(conn, user).expect("hold");
        },
    )
}

/// Every call of one deadline returns within deadline + 600 ms, whatever it went through:
/// `apply_many` rounds (a replayed key forces a second round), combined callers queueing
/// for a batch and for the one pooled connection, single charges, deducts and transfers to
/// new accounts (account creation plus a second transaction) — all on an account another
/// connection holds most of the time.
///
/// Before the fix: calls took up to about twice the deadline (each round, each transaction of a
/// single call, and a combined batch after its queueing got a fresh deadline; pool checkout
/// waited up to r2d2's 30 s).
#[test]
fn finding_9_deadline_bounds_ledger_calls() {
    let _exclusive = lockstock_testkit::fixtures::exclusive();
    let (url, mut admin) = fresh_database("review_f9");
    let ledger = BalanceLedger::with_policy(short_policy());
    for user in 1..=3 {
        ledger
            .charge(&mut admin, user, dec(1_000_000), "seed")
            .expect("seed");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let holder = hot_row_holder(&url, 1, stop.clone());
    let calls: CallLog<Entry> = CallLog::new(|e| matches!(e, Error::InsufficientBalance { .. }));

    // apply_many: every batch replays "seed" (in the journal), so it needs two rounds.
    concurrently(6, &url, |t, conn| {
        for i in 0..6 {
            let ops = [
                AccountOp::charge(dec(1_000_000), "seed"),
                AccountOp::deduct(dec(1), format!("m{t}-{i}")),
                AccountOp::charge(dec(2), format!("p{t}-{i}")),
            ];
            calls.time(
                format!("apply_many {t}-{i}"),
                || ledger.apply_many(conn, 1, &ops),
                |results| results.into_iter().filter_map(Result::ok).collect(),
            );
        }
    });

    // Combined callers on three accounts, one pooled connection between them.
    let pool = pool_with(&url, 1, short_policy());
    let hot = CombiningLedger::new(pool.clone(), ledger.clone());
    // The pool's one connection is busy for the first deadline's length: checkouts wait.
    while_checked_out(&pool, DEADLINE, || {
        together(9, |t| {
            let user = 1 + t as i64 % 3;
            for i in 0..8 {
                let key = format!("c{t}-{i}");
                if i % 2 == 0 {
                    calls.time(
                        format!("combined charge {key} on {user}"),
                        || hot.charge(user, dec(3), &key),
                        |e| vec![e],
                    );
                } else {
                    calls.time(
                        format!("combined deduct {key} on {user}"),
                        || hot.deduct(user, dec(1), &key),
                        |e| vec![e],
                    );
                }
            }
        })
    });

    // Single calls: charges, deducts and transfers from the held account to new accounts.
    concurrently(6, &url, |t, conn| {
        for i in 0..6i64 {
            let key = format!("s{t}-{i}");
            match i % 3 {
                0 => calls.time(
                    format!("deduct {key}"),
                    || ledger.deduct(conn, 1, dec(1), &key),
                    |e| vec![e],
                ),
                1 => calls.time(
                    format!("charge {key}"),
                    || ledger.charge(conn, 1, dec(1), &key),
                    |e| vec![e],
                ),
                _ => {
                    let to = 1_000 + t as i64 * 10 + i;
                    calls.time(
                        format!("transfer {key} to new account {to}"),
                        || ledger.transfer(conn, 1, to, dec(1), &key),
                        |tr| vec![tr.debit, tr.credit],
                    );
                }
            }
        }
    });
    stop.store(true, Ordering::SeqCst);
    holder.join().expect("holder");

    let calls = calls.take();
    assert_none_later_than("finding_9", &calls, DEADLINE + SLACK);

    // The database: every returned entry is in the journal, every touched account audits.
    let mut users: Vec<i64> = vec![1, 2, 3];
    for call in &calls {
        for entry in call.answer.iter().flatten() {
            assert_stored(&mut admin, entry);
            users.push(entry.user_id);
        }
    }
    users.sort_unstable();
    users.dedup();
    for user in users {
        audit_ok(&ledger, &mut admin, user);
    }
    assert_eq!(count_key(&mut admin, 1, "seed"), 1);
}

// ---------------------------------------------------------------------------------------------
// Finding 10c
// ---------------------------------------------------------------------------------------------

/// A deduct that comes before any charge of a not-yet-existing account is `AccountNotFound` in
/// a batch, as it is for the single call; after the batch's charge created the account, the
/// usual rules. Before the fix: `InsufficientBalance { available: 0 }`.
#[test]
fn finding_10c_batch_deduct_before_first_charge_is_account_not_found() {
    let (_url, mut conn) = fresh_database("review_f10c");
    let ledger = BalanceLedger::new();
    let ops = [
        AccountOp::deduct(dec(10), "d1"),
        AccountOp::deduct(dec(10), "d1"),
        AccountOp::charge(dec(20), "c1"),
        AccountOp::deduct(dec(10), "d2"),
        AccountOp::deduct(dec(50), "d3"),
        AccountOp::deduct(dec(10), "d1"),
    ];
    // The same requests as single calls, on account 8.
    let singles: Vec<Result<Entry, Error>> = ops
        .iter()
        .map(|op| match op {
            AccountOp::Charge { amount, key } => ledger.charge(&mut conn, 8, *amount, key),
            AccountOp::Deduct { amount, key } => ledger.deduct(&mut conn, 8, *amount, key),
            _ => unreachable!("only charges and deducts"),
        })
        .collect();
    let batch = ledger.apply_many(&mut conn, 5, &ops).expect("batch");

    for (i, (single, batched)) in singles.iter().zip(&batch).enumerate() {
        match (single, batched) {
            (Ok(s), Ok(b)) => assert_eq!(
                (s.kind, s.amount, s.balance_after),
                (b.kind, b.amount, b.balance_after),
                "request {i}"
            ),
            (
                Err(Error::AccountNotFound { user_id: 8 }),
                Err(Error::AccountNotFound { user_id: 5 }),
            ) => {}
            (
                Err(Error::InsufficientBalance {
                    available: a,
                    requested: r,
                    ..
                }),
                Err(Error::InsufficientBalance {
                    available: b,
                    requested: q,
                    ..
                }),
            ) if (a, r) == (b, q) => {}
            (s, b) => panic!("request {i}: single call {s:?}, batch {b:?}"),
        }
    }
    assert!(
        matches!(batch[0], Err(Error::AccountNotFound { user_id: 5 })),
        "{:?}",
        batch[0]
    );
    assert_eq!(
        batch[5]
            .as_ref()
            .expect("d1 after the charge")
            .balance_after,
        dec(0)
    );
    // The database: c1, d2 and the late d1; d3 refused; the balance and journal agree.
    assert_eq!(journal_size(&mut conn, 5), 3);
    assert_eq!(count_key(&mut conn, 5, "d3"), 0);
    assert_eq!(stored_balance(&mut conn, 5), dec(0));
    assert_eq!(journal_size(&mut conn, 8), 3);
    let kinds: Vec<String> = balance_history::table
        .filter(balance_history::user_id.eq(5i64))
        .order(balance_history::id.asc())
        .select(balance_history::kind)
        .load(&mut conn)
        .expect("kinds");
    assert_eq!(
        kinds,
        [EntryKind::Charge, EntryKind::Deduct, EntryKind::Deduct].map(|k| k.as_str().to_owned())
    );
    audit_ok(&ledger, &mut conn, 5);
    audit_ok(&ledger, &mut conn, 8);
}

/// A batch whose transaction fails as a whole (here `Contended`: another program holds the
/// account's row) still answers each request as its single call would: one with bad input is
/// refused for its input, before anything is sent, and only the valid ones get the failure.
/// Before the fix the whole batch answered `Err(Contended)`, and a combined charge with a zero
/// amount waited in the queue and answered `Timeout` when no pooled connection came free.
#[test]
fn a_failed_batch_refuses_bad_input_as_its_single_calls_do() {
    let (url, mut conn) = fresh_database("review_batch_bad_input");
    let ledger = BalanceLedger::new();
    ledger.charge(&mut conn, 7, dec(10), "fund").expect("fund");
    let once = BalanceLedger::with_policy(
        TxnPolicy::default().with_retry(retry_policy(1, Duration::from_secs(5))),
    );
    let ops = [
        AccountOp::charge(dec(0), "a"),
        AccountOp::deduct(dec(1), "b"),
        AccountOp::charge(dec(1), ""),
        AccountOp::deduct(Decimal::new(1, 7), "c"),
        AccountOp::release(-3, "d"),
    ];
    let mut holder = connect(&url);
    holder.batch_execute("BEGIN").expect("begin");
    lock_balance(&mut holder, 7).expect("hold the account");
    let singles: Vec<String> = [
        once.charge(&mut conn, 7, dec(0), "a"),
        once.deduct(&mut conn, 7, dec(1), "b"),
        once.charge(&mut conn, 7, dec(1), ""),
        once.deduct(&mut conn, 7, Decimal::new(1, 7), "c"),
        once.release(&mut conn, -3, "d"),
    ]
    .iter()
    .map(variant)
    .collect();
    assert_eq!(
        singles,
        [
            "InvalidAmount",
            "Contended",
            "InvalidIdempotencyKey",
            "InvalidAmount",
            "InvalidId"
        ]
    );
    let batch = once
        .apply_many(&mut conn, 7, &ops)
        .expect("answered per request");
    assert_eq!(batch.iter().map(variant).collect::<Vec<_>>(), singles);
    // A batch of valid requests only keeps the whole-batch failure.
    assert!(matches!(
        once.apply_many(&mut conn, 7, &ops[1..2]),
        Err(Error::Contended { .. })
    ));

    // Combined: bad input is answered before anything is queued or checked out.
    let one = pool_with(&url, 1, policy_with_deadline(Duration::from_millis(300)));
    let combined = CombiningLedger::new(
        one.clone(),
        BalanceLedger::with_policy(policy_with_deadline(Duration::from_millis(300))),
    );
    let answers = while_checked_out(&one, Duration::from_secs(1), || {
        [
            combined.charge(7, dec(0), "z"),
            combined.deduct(-7, dec(1), "y"),
            combined.hold(7, dec(1), "", chrono::Utc::now().naive_utc()),
        ]
    });
    assert_eq!(
        answers.iter().map(variant).collect::<Vec<_>>(),
        ["InvalidAmount", "InvalidId", "InvalidIdempotencyKey"]
    );
    holder.batch_execute("ROLLBACK").expect("rollback");
    assert_eq!(journal_size(&mut conn, 7), 1, "only the funding charge");
    assert_eq!(stored_balance(&mut conn, 7), dec(10));
    audit_ok(&ledger, &mut conn, 7);
}

/// A hold whose expiry has passed is answered in a batch as its single call answers it — its
/// key looked up, else `InvalidExpiry` — also when the batch cannot run at all (here: inside
/// the caller's own transaction, where a batch of valid requests answers `NestedTransaction`).
/// Before the fix the batch answered the whole-batch failure for it: `Err(NestedTransaction)`.
#[test]
fn a_failed_batch_answers_an_expired_hold_as_its_single_call_does() {
    let (_url, mut conn) = fresh_database("review_batch_expired_hold");
    let ledger = BalanceLedger::new();
    ledger.charge(&mut conn, 7, dec(10), "fund").expect("fund");
    let past = chrono::Utc::now().naive_utc() - chrono::Duration::seconds(5);
    let late = AccountOp::hold(dec(1), "late", past);
    conn.batch_execute("BEGIN")
        .expect("the caller's transaction");
    let single = ledger.hold(&mut conn, 7, dec(1), "late", past);
    assert_eq!(variant(&single), "InvalidExpiry");
    let alone = ledger
        .apply_many(&mut conn, 7, std::slice::from_ref(&late))
        .expect("answered per request");
    assert_eq!(
        alone.iter().map(variant).collect::<Vec<_>>(),
        ["InvalidExpiry"]
    );
    let mixed = ledger
        .apply_many(
            &mut conn,
            7,
            &[
                AccountOp::charge(dec(0), "z"),
                late,
                AccountOp::charge(dec(1), "y"),
            ],
        )
        .expect("answered per request");
    assert_eq!(
        mixed.iter().map(variant).collect::<Vec<_>>(),
        ["InvalidAmount", "InvalidExpiry", "NestedTransaction"]
    );
    assert!(matches!(
        ledger.apply_many(&mut conn, 7, &[AccountOp::charge(dec(1), "y")]),
        Err(Error::NestedTransaction)
    ));
    conn.batch_execute("ROLLBACK").expect("rollback");
    assert_eq!(journal_size(&mut conn, 7), 1, "only the funding charge");
    audit_ok(&ledger, &mut conn, 7);
}

/// A retry of a deduct that was applied (say after `OutcomeUnknown`) is refused for the balance
/// its first attempt spent; its key is then looked up. Where it cannot be (here another
/// program holds the journal with `LOCK TABLES ... WRITE` past the call's deadline) the answer
/// is `OutcomeUnknown` — the request may be applied, and here it is — never the lookup's own
/// failure (`Contended`, `Timeout`), which says that nothing was applied. Single call and
/// batch alike; before, the single call answered the lookup's failure and the batch
/// `OutcomeUnknown`.
#[test]
fn a_refused_retry_whose_key_cannot_be_looked_up_may_be_applied() {
    let (url, mut conn) = fresh_database("review_refused_lookup");
    let ledger = BalanceLedger::new();
    ledger.charge(&mut conn, 1, dec(10), "c").expect("charge");
    let first = ledger
        .deduct(&mut conn, 1, dec(8), "d")
        .expect("the first deduct, applied");
    crate::holds::unknown_while_the_journal_is_locked(
        &url,
        &mut conn,
        1,
        &AccountOp::deduct(dec(8), "d"),
        |ledger, conn| ledger.deduct(conn, 1, dec(8), "d"),
    );
    // Once it can be looked up, the retry answers the recorded entry.
    let retried = ledger
        .deduct(&mut conn, 1, dec(8), "d")
        .expect("the retry, answered from the journal");
    assert_eq!(retried.id, first.id);
    assert_eq!(journal_size(&mut conn, 1), 2);
    audit_ok(&ledger, &mut conn, 1);
}

/// A batch that fails as a whole (here: its account held by another program past its
/// deadline) still answers each request that its single call answers without the account's
/// row: a capture of a hold that does not exist, or of another account's hold, is
/// `HoldNotFound` (read lock-free before the batch), as the single capture answers it — only
/// the requests that needed the row share the failure. Before, the whole batch answered the
/// failure (`Contended`).
#[test]
fn a_failed_batch_answers_a_missing_hold_as_its_single_call_does() {
    let (url, mut conn) = fresh_database("review_failed_batch_hold");
    let ledger = BalanceLedger::new();
    ledger.charge(&mut conn, 1, dec(100), "c").expect("charge");
    ledger.charge(&mut conn, 2, dec(100), "c").expect("charge");
    let others = ledger
        .hold(
            &mut conn,
            2,
            dec(10),
            "h",
            chrono::Utc::now().naive_utc() + chrono::Duration::hours(1),
        )
        .expect("another account's hold");
    let mut holder = connect(&url);
    holder.batch_execute("BEGIN").expect("begin");
    let _: Decimal = lock_balance(&mut holder, 1).expect("hold the account");
    let short = BalanceLedger::with_policy(policy_with_deadline(Duration::from_millis(300)));
    let ops = [
        AccountOp::capture(999_999, dec(1), "c1"),
        AccountOp::charge(dec(10), "k1"),
        AccountOp::release(others.id, "r1"),
    ];
    let batch = short.apply_many(&mut conn, 1, &ops);
    let single = short.capture(&mut conn, 999_999, dec(1), "c1");
    holder.batch_execute("ROLLBACK").expect("release");
    assert!(
        matches!(single, Err(Error::HoldNotFound { hold_id: 999_999 })),
        "{single:?}"
    );
    match batch.as_deref() {
        Ok(
            [Err(Error::HoldNotFound { hold_id: 999_999 }), Err(Error::Contended { .. } | Error::Timeout { .. }), Err(Error::HoldNotFound { hold_id })],
        ) => assert_eq!(*hold_id, others.id),
        other => panic!("{other:?}"),
    }
    assert_eq!(journal_size(&mut conn, 1), 1, "nothing applied");
    audit_ok(&ledger, &mut conn, 1);
}

/// A transfer retried after it applied (say after `OutcomeUnknown`) finds its debit under its
/// key and reads its credit; when that read fails (here the connection is killed right before
/// it) the answer is `OutcomeUnknown` — the transfer is applied — never the read's own failure,
/// which says that nothing was applied. Before: the lost connection's error.
#[test]
fn a_transfer_retry_whose_credit_cannot_be_read_may_be_applied() {
    let (url, mut admin) = fresh_database("review_transfer_replay");
    let ledger = BalanceLedger::new();
    ledger.charge(&mut admin, 1, dec(100), "c").expect("charge");
    ledger.charge(&mut admin, 2, dec(1), "c").expect("charge");
    let first = ledger
        .transfer(&mut admin, 1, 2, dec(10), "t")
        .expect("the first transfer, applied");
    let mut retrying = connect(&url);
    let id = connection_id(&mut retrying);
    let pauses = Pauses::default();
    // The credit's read: the only statement that filters on the related entry.
    pauses.install(&mut retrying, |sql| {
        sql.starts_with("SELECT") && sql.contains("`related_entry_id` = ")
    });
    let retry = {
        let ledger = ledger.clone();
        thread::spawn(move || ledger.transfer(&mut retrying, 1, 2, dec(10), "t"))
    };
    pauses.stopped();
    admin
        .batch_execute(&format!("KILL {id}"))
        .expect("kill the retrying connection");
    pauses.go();
    let answer = retry.join().expect("retry");
    assert!(
        matches!(answer, Err(Error::OutcomeUnknown { .. })),
        "{answer:?}"
    );
    let replayed = ledger
        .transfer(&mut connect(&url), 1, 2, dec(10), "t")
        .expect("the retry on a new connection");
    assert_eq!(
        (replayed.debit.id, replayed.credit.id),
        (first.debit.id, first.credit.id)
    );
    assert_eq!(stored_balance(&mut admin, 1), dec(90));
    assert_eq!(stored_balance(&mut admin, 2), dec(11));
}

/// Under REPEATABLE READ a transfer's second account must count the holds committed before its
/// lock. The transfer locks the lower account id first and sums that account's holds — its
/// first plain read, which fixes the transaction's snapshot — then locks the sender. A hold on
/// the sender committed in between (the transfer's connection stopped before its second lock)
/// was missing from the sender's sum, read from that older snapshot: the transfer spent the
/// held funds (`Ok`, the sender left with balance 10 and 110 held, available below zero).
/// Now both accounts are locked before either sum, so the snapshot has the hold:
/// `InsufficientBalance`.
#[test]
fn a_transfer_under_repeatable_read_counts_holds_committed_before_its_lock() {
    let (url, mut admin) = fresh_database("review_rr_transfer_holds");
    let ledger = BalanceLedger::new();
    // The receiver (the lower id, locked first) has a hold, so its sum is read.
    ledger
        .charge(&mut admin, 1, dec(10), "seed 1")
        .expect("seed 1");
    let expires = lockstock_testkit::fixtures::now() + chrono::Duration::hours(1);
    ledger
        .hold(&mut admin, 1, dec(5), "receiver's hold", expires)
        .expect("the receiver's hold");
    // The sender has a hold too, expiring before the one placed during the transfer.
    ledger
        .charge(&mut admin, 2, dec(200), "seed 2")
        .expect("seed 2");
    ledger
        .hold(
            &mut admin,
            2,
            dec(10),
            "sender's first hold",
            expires - chrono::Duration::minutes(30),
        )
        .expect("the sender's first hold");

    let mut t = connect(&url);
    let pauses = Pauses::default();
    pauses.install_nth(&mut t, 2, |sql| {
        sql.contains("FROM `user_balance`") && sql.contains("FOR UPDATE")
    });
    let transfer = thread::spawn(move || {
        BalanceLedger::with_policy(
            TxnPolicy::default().with_isolation(lockstock::Isolation::RepeatableRead),
        )
        .transfer(&mut t, 2, 1, dec(190), "spend all")
    });
    let stopped = pauses.stopped();
    assert!(stopped.contains("FOR UPDATE"), "{stopped}");
    ledger
        .hold(&mut admin, 2, dec(100), "sender's hold", expires)
        .expect("the sender's hold, committed before the transfer locks the sender");
    pauses.go();
    let answer = transfer.join().expect("the transfer");
    assert!(
        matches!(answer, Err(Error::InsufficientBalance { .. })),
        "the held funds are not available: {answer:?}"
    );
    assert_eq!(stored_balance(&mut admin, 2), dec(200));
    audit_ok(&ledger, &mut admin, 1);
    audit_ok(&ledger, &mut admin, 2);
}

/// `balance` and `audit` read one consistent snapshot, holds included, and lock nothing. Each
/// reader is stopped before its holds sum while another connection ends or places a hold and
/// commits; the sum must still be the snapshot's. (Reading it as the latest rows — a locking
/// read — answered an available balance that never existed and made `audit` fail a healthy
/// account; the reader's shared locks also refused the writers.)
#[test]
fn balance_and_audit_read_the_holds_of_their_snapshot() {
    let (url, mut admin) = fresh_database("review_snapshot_holds");
    let ledger = BalanceLedger::new();
    ledger
        .charge(&mut admin, 1, dec(100), "seed")
        .expect("seed");
    let expires = lockstock_testkit::fixtures::now() + chrono::Duration::hours(1);
    let hold = ledger
        .hold(&mut admin, 1, dec(10), "h", expires)
        .expect("the hold");
    let stopped_before_the_sum = |conn: &mut MysqlConnection| {
        let pauses = Pauses::default();
        let mut stopped = false;
        pauses.install(conn, move |sql| {
            if !stopped && sql.contains("FROM `balance_hold`") && sql.contains("SUM(") {
                stopped = true;
                return true;
            }
            false
        });
        pauses
    };

    let mut reader = connect(&url);
    let pauses = stopped_before_the_sum(&mut reader);
    let read = thread::spawn(move || BalanceLedger::new().balance(&mut reader, 1));
    pauses.stopped();
    ledger
        .capture(&mut admin, hold.id, dec(10), "capture")
        .expect("the capture, while the reader is stopped");
    pauses.go();
    let balance = read.join().expect("the reader").expect("the balance");
    assert_eq!(
        (balance.balance, balance.held, balance.available),
        (dec(100), dec(10), dec(90)),
        "the snapshot's balance, held and available"
    );

    let mut auditor = connect(&url);
    let pauses = stopped_before_the_sum(&mut auditor);
    let audit = thread::spawn(move || BalanceLedger::new().audit(&mut auditor, 1));
    pauses.stopped();
    ledger
        .hold(&mut admin, 1, dec(20), "h2", expires)
        .expect("a hold placed while the audit is stopped");
    pauses.go();
    let report = audit.join().expect("the auditor");
    assert!(report.is_ok(), "a consistent account: {report:?}");
    audit_ok(&ledger, &mut admin, 1);
}

/// Under REPEATABLE READ one account's holds sum locks nothing of another account: a hold on
/// account 2 is placed while a deduct on account 1 (whose holds it summed) is stopped before
/// its balance UPDATE. (A locking sum took next-key locks up to the next account's index
/// entries, and the hold on account 2 was refused until `Contended`.)
#[test]
fn under_repeatable_read_one_accounts_holds_sum_does_not_block_another_account() {
    let (url, mut admin) = fresh_database("review_rr_sum_gap");
    let rr = || {
        BalanceLedger::with_policy(
            policy_with_deadline(Duration::from_secs(2))
                .with_isolation(lockstock::Isolation::RepeatableRead),
        )
    };
    let ledger = rr();
    let expires = lockstock_testkit::fixtures::now() + chrono::Duration::hours(1);
    ledger
        .charge(&mut admin, 1, dec(100), "seed 1")
        .expect("seed 1");
    ledger
        .hold(&mut admin, 1, dec(10), "h1", expires)
        .expect("account 1's hold");
    ledger
        .charge(&mut admin, 2, dec(100), "seed 2")
        .expect("seed 2");

    let mut d = connect(&url);
    let pauses = Pauses::default();
    pauses.install(&mut d, |sql| sql.starts_with("UPDATE `user_balance`"));
    let deduct = thread::spawn(move || rr().deduct(&mut d, 1, dec(5), "d"));
    pauses.stopped();
    let placed = ledger.hold(&mut admin, 2, dec(10), "h2", expires);
    pauses.go();
    assert!(placed.is_ok(), "account 2's hold: {placed:?}");
    deduct
        .join()
        .expect("the deduct")
        .expect("account 1's deduct");
    audit_ok(&ledger, &mut admin, 1);
    audit_ok(&ledger, &mut admin, 2);
}

/// A batch on a server switched to `read_only` answers per request, as the single calls do:
/// a capture of another account's hold `HoldNotFound` (read lock-free, which a read-only
/// server still serves), the write the refusal (1290). A `read_only` refusal is a node failure
/// to a `Router` (which runs the batch again on a node that takes writes), but without one it
/// is not the whole batch's answer. The batch runs as a user without `READ_ONLY ADMIN` (root
/// writes through `read_only`), on a server of its own.
#[test]
fn a_batch_on_a_read_only_server_answers_as_its_single_calls() {
    let _load = lockstock_testkit::fixtures::storm();
    let sandbox = lockstock_testkit::Sandbox::start().expect("a private server");
    let (_, mut root, app_url) =
        super::review_runner::database_with_app_user(&sandbox, "review_read_only");
    let ledger = BalanceLedger::new();
    ledger
        .charge(&mut root, 1, dec(100), "fund-1")
        .expect("fund 1");
    ledger
        .charge(&mut root, 2, dec(100), "fund-2")
        .expect("fund 2");
    let expires = chrono::Utc::now().naive_utc() + chrono::Duration::seconds(600);
    let hold = ledger
        .hold(&mut root, 1, dec(10), "hold-1", expires)
        .expect("a hold of account 1");
    root.batch_execute("SET GLOBAL read_only = 1")
        .expect("read-only");
    let mut app = connect(&app_url);
    let ops = [
        AccountOp::capture(hold.id, dec(5), "capture"),
        AccountOp::charge(dec(1), "charge"),
    ];
    let answers = ledger.apply_many(&mut app, 2, &ops);
    let single = ledger.charge(&mut app, 2, dec(1), "charge-alone");
    root.batch_execute("SET GLOBAL read_only = 0")
        .expect("writable again");
    let answers = answers.expect("answered per request");
    assert!(
        matches!(answers[0], Err(Error::HoldNotFound { hold_id }) if hold_id == hold.id),
        "{answers:?}"
    );
    let read_only = |answer: &Result<Entry, Error>| matches!(answer, Err(e) if e.server_kind() == Some(lockstock::ServerErrorKind::ReadOnly));
    assert!(read_only(&answers[1]), "{answers:?}");
    assert!(read_only(&single), "the single call: {single:?}");
    assert_eq!(
        journal_size(&mut root, 2),
        1,
        "nothing written for account 2"
    );
}

/// A batch larger than one INSERT (1,000 rows each) sends no INSERT after the first once its
/// deadline has passed: it answers `Timeout` and nothing of it is applied. A trigger makes the
/// first row of the first INSERT take 1 s and of the second 1.2 s, so the deadline (2 s)
/// passes while the second runs (it began before the deadline, within its statement limit:
/// the time left at BEGIN; the watchdog's grace is 2 s). Each step is ~0.7 s from the next
/// bound: at 0.3 s each and a 0.5 s deadline, a loaded machine could run the first INSERT's
/// 1,000 rows into its statement limit (`Contended`). Before the fix the batch went on past its
/// deadline — the third INSERT, its ids, the balance and the COMMIT — and answered `Ok` with
/// all 2,500 entries committed.
#[test]
fn a_batch_of_several_inserts_sends_none_past_its_deadline() {
    let (_url, mut conn) = fresh_database("review_batch_pieces_deadline");
    let ledger = BalanceLedger::new();
    ledger.charge(&mut conn, 7, dec(10), "fund").expect("fund");
    conn.batch_execute(
        "CREATE TRIGGER slow_pieces BEFORE INSERT ON balance_history FOR EACH ROW \
         IF NEW.idempotency_key = 'k0' THEN SET @slept = SLEEP(1); \
         ELSEIF NEW.idempotency_key = 'k1000' THEN SET @slept = SLEEP(1.2); END IF",
    )
    .expect("trigger");
    let ops: Vec<AccountOp> = (0..2_500)
        .map(|i| AccountOp::charge(dec(1), format!("k{i}")))
        .collect();
    let mut policy = TxnPolicy::default().with_retry(retry_policy(1, Duration::from_secs(2)));
    policy.unresponsive_grace = Duration::from_secs(2);
    let short = BalanceLedger::with_policy(policy);
    let started = Instant::now();
    let answer = short.apply_many(&mut conn, 7, &ops);
    let took = started.elapsed();
    assert!(
        matches!(answer, Err(Error::Timeout { .. })),
        "answered {:?} after {took:?}",
        answer.as_ref().map(Vec::len)
    );
    conn.batch_execute("DROP TRIGGER slow_pieces")
        .expect("drop trigger");
    assert_eq!(journal_size(&mut conn, 7), 1, "only the funding charge");
    assert_eq!(stored_balance(&mut conn, 7), dec(10));
    audit_ok(&ledger, &mut conn, 7);
}

/// A failed batch answers a hold whose expiry has passed as its single call answers it — its
/// key looked up, else `InvalidExpiry` — also when the failure left the batch's connection
/// unusable (killed while the batch retried its account's lock). Before the fix the batch
/// looked the key up only after the failure, on the dead connection, and answered the hold
/// `OutcomeUnknown`.
#[test]
fn a_batch_killed_while_it_retries_answers_an_expired_hold_as_its_single_call() {
    let (url, mut conn) = fresh_database("review_batch_expired_killed");
    let ledger = BalanceLedger::new();
    ledger.charge(&mut conn, 7, dec(10), "fund").expect("fund");
    let past = chrono::Utc::now().naive_utc() - chrono::Duration::minutes(1);
    let single = ledger.hold(&mut conn, 7, dec(1), "late", past);
    assert_eq!(variant(&single), "InvalidExpiry");
    let ops = [
        AccountOp::hold(dec(1), "late", past),
        AccountOp::charge(dec(5), "more"),
    ];
    let mut holder = connect(&url);
    holder.batch_execute("BEGIN").expect("begin");
    lock_balance(&mut holder, 7).expect("hold the account");
    let mut doomed = connect(&url);
    let doomed_id = connection_id(&mut doomed);
    // Stopped before its second NOWAIT read of the account: its first was refused, and it
    // retries (for up to a minute).
    let pauses = Pauses::default();
    pauses.install_nth(&mut doomed, 2, |sql| sql.contains("NOWAIT"));
    let patient = patient_ledger();
    let answers = thread::scope(|s| {
        let call = s.spawn(|| patient.apply_many(&mut doomed, 7, &ops));
        pauses.stopped();
        conn.batch_execute(&format!("KILL CONNECTION {doomed_id}"))
            .expect("kill the batch's session");
        pauses.go();
        call.join().expect("the batch's thread")
    });
    holder.batch_execute("ROLLBACK").expect("rollback");
    let answers = answers.expect("answered per request");
    assert_eq!(variant(&answers[0]), "InvalidExpiry", "{answers:?}");
    assert!(answers[1].is_err(), "{answers:?}");
    assert_eq!(journal_size(&mut conn, 7), 1, "only the funding charge");
    assert_eq!(stored_balance(&mut conn, 7), dec(10));
    audit_ok(&ledger, &mut conn, 7);
}

/// A capture or release in a batch that names the hold an earlier request of the same batch
/// places is answered as the single calls made one after another answer it: captured (or
/// released), with the same journal, balance and hold afterwards. Before the fix the batch read
/// the named holds before writing anything and answered `HoldNotFound`, leaving the hold active.
#[test]
fn a_batch_captures_and_releases_the_holds_it_places() {
    let past_charge = |conn: &mut MysqlConnection, ledger: &BalanceLedger| {
        ledger.charge(conn, 7, dec(100), "fund").expect("fund").id
    };
    let later = chrono::Utc::now().naive_utc() + chrono::Duration::minutes(10);
    let ops = |funded: i64| {
        [
            AccountOp::hold(dec(50), "h1", later),
            AccountOp::capture(funded + 1, dec(30), "cap"),
            AccountOp::hold(dec(20), "h2", later),
            AccountOp::release(funded + 3, "rel"),
            AccountOp::deduct(dec(60), "d"),
        ]
    };
    let ledger = BalanceLedger::new();
    let (_url, mut singles) = fresh_database("review_batch_placed_holds_single");
    let funded = past_charge(&mut singles, &ledger);
    let single_answers: Vec<String> = ops(funded)
        .iter()
        .map(|op| {
            variant(
                &ledger
                    .apply_many(&mut singles, 7, std::slice::from_ref(op))
                    .expect("one")[0],
            )
        })
        .collect();
    let (_url, mut batch) = fresh_database("review_batch_placed_holds_batch");
    assert_eq!(past_charge(&mut batch, &ledger), funded, "the same ids");
    let batch_answers: Vec<String> = ledger
        .apply_many(&mut batch, 7, &ops(funded))
        .expect("answered per request")
        .iter()
        .map(variant)
        .collect();
    assert_eq!(single_answers, ["Ok", "Ok", "Ok", "Ok", "Ok"]);
    assert_eq!(batch_answers, single_answers);
    for conn in [&mut singles, &mut batch] {
        assert_eq!(stored_balance(conn, 7), dec(10));
        assert_eq!(journal_size(conn, 7), 6);
        let first = ledger.hold_status(conn, funded + 1).expect("first hold");
        let second = ledger.hold_status(conn, funded + 3).expect("second hold");
        assert_eq!(
            (format!("{:?}", first.state), format!("{:?}", second.state)),
            ("Captured".to_owned(), "Released".to_owned())
        );
        audit_ok(&ledger, conn, 7);
    }
}

/// A batch's holds whose expiry has passed are looked up with one read of their keys, not a
/// read transaction each: a batch of 1,000 of them and a charge sends a few dozen statements.
/// Before the fix each was looked up on its own (about 4,000 statements, and a short deadline
/// spent on lookups answered the charge `Timeout`).
#[test]
fn a_batchs_expired_holds_are_looked_up_with_one_read() {
    let (_url, mut conn) = fresh_database("review_batch_expired_one_read");
    let ledger = BalanceLedger::new();
    ledger.charge(&mut conn, 7, dec(10), "fund").expect("fund");
    let past = chrono::Utc::now().naive_utc() - chrono::Duration::minutes(1);
    let mut ops = vec![AccountOp::charge(dec(1), "c")];
    ops.extend((0..1_000).map(|i| AccountOp::hold(dec(1), format!("x{i}"), past)));
    let before = questions(&mut conn);
    let answers = ledger.apply_many(&mut conn, 7, &ops).expect("answered");
    let sent = questions(&mut conn) - before;
    assert_eq!(variant(&answers[0]), "Ok");
    assert!(answers[1..].iter().all(|a| variant(a) == "InvalidExpiry"));
    assert!(sent < 60, "the batch sent {sent} statements");
    assert_eq!(stored_balance(&mut conn, 7), dec(11));
    audit_ok(&ledger, &mut conn, 7);
}

/// A batch that captures each hold it places right after placing it runs in one part per
/// capture, and sends statements in proportion to its requests: the holds it names are read
/// with one statement per part. Before the fix each part read every hold named after it, one
/// statement each (a batch of 200 pairs sent tens of thousands of statements), and the parts
/// nested one call deep each.
#[test]
fn a_batch_split_at_its_own_holds_sends_statements_in_proportion() {
    let (_url, mut conn) = fresh_database("review_batch_split_proportion");
    // 200 parts, a transaction each, by one deadline: the default 3 s ran out after 168 parts
    // on a loaded machine (a CI run). What is counted here is statements, not time.
    let ledger = BalanceLedger::with_policy(lockstock_testkit::fixtures::policy_with_deadline(
        std::time::Duration::from_secs(60),
    ));
    let funded = ledger
        .charge(&mut conn, 7, dec(1_000), "fund")
        .expect("fund")
        .id;
    let later = chrono::Utc::now().naive_utc() + chrono::Duration::minutes(10);
    const PAIRS: i64 = 200;
    // Hold i is entry `funded + 2i - 1`: each part is the capture of the hold before and the
    // next hold.
    let ops: Vec<AccountOp> = (1..=PAIRS)
        .flat_map(|i| {
            [
                AccountOp::hold(dec(1), format!("h{i}"), later),
                AccountOp::capture(funded + 2 * i - 1, dec(1), format!("c{i}")),
            ]
        })
        .collect();
    let before = questions(&mut conn);
    let answers = ledger.apply_many(&mut conn, 7, &ops).expect("answered");
    let sent = questions(&mut conn) - before;
    assert!(answers.iter().all(|a| a.is_ok()), "{answers:?}");
    assert!(sent < 40 * PAIRS, "the batch sent {sent} statements");
    assert_eq!(stored_balance(&mut conn, 7), dec(800));
    assert_eq!(journal_size(&mut conn, 7), 1 + 2 * PAIRS);
    audit_ok(&ledger, &mut conn, 7);
}

/// What `apply_many` answers.
type BatchAnswer = Result<Vec<Result<Entry, Error>>, Error>;

/// `apply_many(7, ops)` on a private server whose COMMIT is held back by a backup (`BACKUP
/// STAGE BLOCK_COMMIT`) and killed (`KILL QUERY`): its answer, and the connection for checks.
fn batch_whose_commit_is_killed(
    name: &str,
    ops: &[AccountOp],
) -> (lockstock_testkit::Sandbox, MysqlConnection, BatchAnswer) {
    let sandbox = lockstock_testkit::Sandbox::start().expect("a private server");
    let url = sandbox.create_database(name).expect("database");
    let mut conn = connect(&url);
    lockstock::run_migrations(&mut conn).expect("migrate");
    BalanceLedger::new()
        .charge(&mut conn, 7, dec(10), "fund")
        .expect("fund");
    let mut doomed = connect(&url);
    let doomed_id = connection_id(&mut doomed);
    let patient = patient_ledger();
    let mut backup = connect(&url);
    backup
        .batch_execute("BACKUP STAGE START; BACKUP STAGE BLOCK_COMMIT")
        .expect("block commits");
    let answer = thread::scope(|s| {
        let call = s.spawn(|| patient.apply_many(&mut doomed, 7, ops));
        wait_until(&mut conn, "the batch's COMMIT held back", |admin| {
            count_for(
                admin,
                "SELECT COUNT(*) AS n FROM information_schema.PROCESSLIST \
                 WHERE ID = ? AND INFO LIKE 'COMMIT%'",
                doomed_id,
            ) > 0
        });
        conn.batch_execute(&format!("KILL QUERY {doomed_id}"))
            .expect("kill the COMMIT");
        call.join().expect("the batch's thread")
    });
    backup.batch_execute("BACKUP STAGE END").expect("unblock");
    (sandbox, conn, answer)
}

/// A hold whose expiry has passed, after a request of the same key in its batch, is answered
/// `OutcomeUnknown` when the batch's COMMIT is: that request may be applied, and its entry
/// would answer the hold (a conflict), as its single call would find. Before the fix the hold
/// was answered `InvalidExpiry` — "never placed, nothing under its key" — from a lookup made
/// before the batch.
#[test]
fn an_expired_hold_after_its_key_in_a_batch_of_unknown_outcome_is_unknown() {
    // It starts a private server: never beside a test that holds `exclusive()`.
    let _storm = lockstock_testkit::fixtures::storm();
    let past = chrono::Utc::now().naive_utc() - chrono::Duration::minutes(1);
    let ops = [
        AccountOp::charge(dec(5), "k"),
        AccountOp::hold(dec(1), "k", past),
    ];
    let (_sandbox, mut conn, answers) =
        batch_whose_commit_is_killed("review_batch_expired_unknown", &ops);
    let answers = answers.expect("answered per request");
    assert_eq!(variant(&answers[0]), "OutcomeUnknown", "{answers:?}");
    assert_eq!(variant(&answers[1]), "OutcomeUnknown", "{answers:?}");
    audit_ok(&BalanceLedger::new(), &mut conn, 7);
}

/// A batch of valid requests whose COMMIT's outcome is unknown answers it as its outer `Err`
/// (all or none applied), as documented — also now that a batch may run in parts (before the
/// fix of the parts, every batch answered it per request instead).
#[test]
fn a_batch_of_unknown_outcome_answers_it_whole() {
    // It starts a private server: never beside a test that holds `exclusive()`.
    let _storm = lockstock_testkit::fixtures::storm();
    let ops = [
        AccountOp::charge(dec(5), "a"),
        AccountOp::deduct(dec(1), "b"),
    ];
    let (_sandbox, mut conn, answer) =
        batch_whose_commit_is_killed("review_batch_unknown_whole", &ops);
    assert!(
        matches!(answer, Err(Error::OutcomeUnknown { .. })),
        "{answer:?}"
    );
    audit_ok(&BalanceLedger::new(), &mut conn, 7);
}

/// A hold whose expiry has passed, after a request of its key that the batch never sent (an
/// identical expired hold, answered by the lookup before the batch), keeps its single call's
/// answer when the batch's COMMIT is of unknown outcome: nothing under its key was written.
/// Before the fix it was answered `OutcomeUnknown` like a hold after a written key.
#[test]
fn an_expired_hold_after_an_unsent_request_of_its_key_keeps_its_answer() {
    // It starts a private server: never beside a test that holds `exclusive()`.
    let _storm = lockstock_testkit::fixtures::storm();
    let past = chrono::Utc::now().naive_utc() - chrono::Duration::minutes(1);
    let ops = [
        AccountOp::hold(dec(1), "k", past),
        AccountOp::hold(dec(1), "k", past),
        AccountOp::charge(dec(5), "c"),
    ];
    let (_sandbox, mut conn, answers) =
        batch_whose_commit_is_killed("review_batch_expired_unsent", &ops);
    let answers = answers.expect("answered per request");
    let variants: Vec<String> = answers.iter().map(variant).collect();
    assert_eq!(
        variants,
        ["InvalidExpiry", "InvalidExpiry", "OutcomeUnknown"],
        "{answers:?}"
    );
    audit_ok(&BalanceLedger::new(), &mut conn, 7);
}

/// A batch on an account that does not exist, whose first charge cannot create it (another
/// transaction holds a lock on the gap where its row would go: the batch's `INSERT IGNORE`
/// waits until its deadline), answers the deducts and holds before that charge as their
/// single calls answer them — `AccountNotFound` (a locking read of a row that does not exist
/// waits for nothing) — and only the charge and what follows it with the failure. Also with a
/// request refused for its input in the batch, and through a `CombiningLedger`.
///
/// Before the fix: the whole batch answered `Contended` (the deduct too).
#[test]
fn a_batch_whose_first_charge_cannot_create_the_account_answers_what_came_before_it() {
    let (url, mut conn) = fresh_database("review_missing_then_contended");
    let ledger = BalanceLedger::with_policy(policy_with_deadline(Duration::from_millis(300)));
    // Account 8 exists, account 7 does not: a lock on 7 is a lock on the gap before 8.
    ledger
        .charge(&mut conn, 8, dec(100), "fund")
        .expect("fund 8");
    let mut other = connect(&url);
    other.batch_execute("BEGIN").expect("begin");
    assert!(
        lockstock_testkit::fixtures::lock_balance(&mut other, 7).is_err(),
        "no row 7: a gap lock only"
    );
    let single = ledger.deduct(&mut conn, 7, dec(5), "d");
    assert!(
        matches!(single, Err(Error::AccountNotFound { user_id: 7 })),
        "the single deduct: {single:?}"
    );
    let later = lockstock_testkit::fixtures::now() + chrono::Duration::hours(1);
    let batches: [Vec<AccountOp>; 2] = [
        vec![
            AccountOp::deduct(dec(5), "d"),
            AccountOp::hold(dec(1), "h", later),
            AccountOp::charge(dec(10), "c"),
            AccountOp::deduct(dec(1), "after"),
        ],
        vec![
            AccountOp::deduct(dec(5), "d"),
            AccountOp::charge(Decimal::ZERO, "bad"),
            AccountOp::charge(dec(10), "c"),
        ],
    ];
    for ops in &batches {
        let answers = match ledger.apply_many(&mut conn, 7, ops) {
            Ok(answers) => answers,
            Err(e) => panic!("{ops:?}: the whole batch failed: {e:?}"),
        };
        assert!(
            matches!(answers[0], Err(Error::AccountNotFound { user_id: 7 })),
            "{ops:?}: the deduct before the charge: {answers:?}"
        );
        for (op, answer) in ops.iter().zip(&answers) {
            match op {
                AccountOp::Hold { .. } => assert!(
                    matches!(answer, Err(Error::AccountNotFound { user_id: 7 })),
                    "the hold before the charge: {answer:?}"
                ),
                AccountOp::Charge { amount, .. } if amount.is_zero() => assert!(
                    matches!(answer, Err(Error::InvalidAmount { .. })),
                    "{answer:?}"
                ),
                // The charge, and what would only have run after it: the failure.
                AccountOp::Charge { .. } => assert!(
                    matches!(answer, Err(Error::Contended { .. } | Error::Timeout { .. })),
                    "the charge: {answer:?}"
                ),
                _ => {}
            }
        }
    }
    // Combined, the same, in a batch that forms: a first charge leads (and waits for the
    // gap), a deduct and a second charge queue behind it and run together once it gives up.
    let combining = CombiningLedger::new(
        lockstock_testkit::strategies::pool(&url, 3).expect("pool"),
        BalanceLedger::with_policy(policy_with_deadline(Duration::from_millis(600))),
    );
    let (deduct, stats) = thread::scope(|s| {
        let c = &combining;
        let started = std::time::Instant::now();
        let leader = s.spawn(move || c.charge(7, dec(10), "c1"));
        wait_until(&mut conn, "the first charge ran", |_| {
            c.stats().batches >= 1
        });
        // The two that queue behind it get deadlines 200 ms later than the leader's (each
        // call's deadline starts as it is made): its batch may overrun its deadline by a few
        // ms (or more on a loaded machine) before it gives the turn back, and the deduct must
        // still have time to lead the next batch then, or it answers `Timeout` alone and the
        // second charge runs by itself.
        thread::sleep(Duration::from_millis(200).saturating_sub(started.elapsed()));
        assert_eq!(c.stats().requests, 0, "the first charge is still waiting");
        let deduct = s.spawn(move || c.deduct(7, dec(5), "d"));
        wait_until(&mut conn, "the deduct queued", |_| c.stats().queued >= 1);
        let second = s.spawn(move || c.charge(7, dec(10), "c2"));
        wait_until(&mut conn, "the second charge queued", |_| {
            c.stats().queued >= 2
        });
        let deduct = deduct.join().expect("deduct");
        for charge in [leader, second] {
            let charged = charge.join().expect("charge");
            assert!(
                matches!(
                    charged,
                    Err(Error::Contended { .. } | Error::Timeout { .. })
                ),
                "a charge: {charged:?}"
            );
        }
        (deduct, c.stats())
    });
    assert!(
        stats.largest_batch >= 2,
        "no batch of two formed: {stats:?}"
    );
    assert!(
        matches!(deduct, Err(Error::AccountNotFound { user_id: 7 })),
        "the combined deduct: {deduct:?}"
    );
    other.batch_execute("ROLLBACK").expect("release");
    // Nothing was written for account 7.
    let rows: i64 = balance_history::table
        .filter(balance_history::user_id.eq(7))
        .count()
        .get_result(&mut conn)
        .expect("journal");
    assert_eq!(rows, 0);
}

/// A request refused because its account does not exist, whose key's lookup then loses its
/// connection, answers `AccountNotFound` — no earlier call can have recorded a key of an account
/// that did not exist (the journal's foreign key), so nothing may be applied — as a single
/// deduct, a transfer from that account and a batch. The database has no such account after.
///
/// Before the fix: `OutcomeUnknown` ("Server has gone away") for all three.
#[test]
fn a_refusal_for_a_missing_account_stands_when_its_key_cannot_be_looked_up() {
    let (url, mut admin) = fresh_database("review_missing_lookup_lost");
    let ledger = BalanceLedger::new();
    ledger
        .charge(&mut admin, 1, dec(100), "fund")
        .expect("fund 1");
    // A connection killed as the key's lookup begins its snapshot: after the attempt found no
    // account and rolled back.
    let armed = || {
        let mut conn = connect(&url);
        crate::kill_at_statement(&mut conn, &url, |sql| sql.contains("CONSISTENT SNAPSHOT"));
        conn
    };
    type Call<'a> = Box<dyn Fn(&mut MysqlConnection) -> Result<i64, Error> + 'a>;
    let calls: [(&str, Call<'_>); 3] = [
        (
            "deduct",
            Box::new(|c| ledger.deduct(c, 40, dec(1), "k").map(|e| e.id)),
        ),
        (
            "transfer",
            Box::new(|c| ledger.transfer(c, 40, 1, dec(1), "t").map(|t| t.debit.id)),
        ),
        (
            "batch",
            Box::new(|c| {
                let answers = ledger.apply_many(c, 40, &[AccountOp::deduct(dec(1), "b")])?;
                answers
                    .into_iter()
                    .next()
                    .unwrap_or_else(|| panic!("no answer"))
                    .map(|e| e.id)
            }),
        ),
    ];
    for (what, call) in &calls {
        let mut conn = armed();
        let answer = call(&mut conn);
        assert!(
            matches!(answer, Err(Error::AccountNotFound { user_id: 40 })),
            "{what}: {answer:?}"
        );
    }
    let accounts: i64 =
        diesel::sql_query("SELECT COUNT(*) AS n FROM user_balance WHERE user_id = 40")
            .get_result::<Count>(&mut admin)
            .expect("accounts")
            .n;
    assert_eq!(accounts, 0, "an account was created");
}

/// A call whose earlier step the watchdog cut off after that step's work was done answered
/// `Timeout`, which says that only the time ran out. A charge on a missing account looks its
/// key up before it creates the account. Here the lookup's read commits and the server freezes
/// (SIGSTOP) as the SET that puts the caller's session back is sent: the watchdog shuts the
/// connection down at the deadline and its grace. The read's answer stands (its work was done)
/// and the connection is marked broken. The create attempt then found the deadline passed and
/// answered `Timeout`, where a router counts no node failure (it failed over one call later).
/// Now the call answers what happened: `ServerUnresponsive` (which a combiner treats as it
/// treats `Timeout`: its later callers run again by their own deadlines). Nothing is applied.
///
/// Before the fix: `Timeout`.
#[test]
fn a_call_cut_off_after_a_finished_step_answers_server_unresponsive() {
    let _load = lockstock_testkit::fixtures::storm();
    let mut sandbox = lockstock_testkit::Sandbox::start().expect("a private server");
    let url = sandbox
        .create_database("review_cut_restore")
        .expect("a database");
    lockstock::run_migrations(&mut connect(&url)).expect("migrations");
    // Room for the dozen statements before the stop on a loaded machine: the lookup must
    // finish its read before the deadline for the call to reach the case.
    let deadline = Duration::from_secs(2);
    let ledger = BalanceLedger::with_policy(policy_with_deadline(deadline));
    let mut conn = connect(&url);
    let pauses = Pauses::default();
    // The second restoring SET: the first ends the attempt that found no account, the second
    // the key's lookup.
    pauses.install_nth(&mut conn, 2, |sql| {
        sql.starts_with("SET") && sql.contains("@lockstock_isolation = NULL")
    });
    let call = {
        let ledger = ledger.clone();
        thread::spawn(move || ledger.charge(&mut conn, 41, dec(5), "k"))
    };
    let stopped = pauses.stopped();
    assert!(stopped.contains("@lockstock_isolation = NULL"), "{stopped}");
    sandbox.pause().expect("freeze the server");
    pauses.go();
    let answer = call.join().expect("the charge");
    sandbox.resume().expect("thaw the server");
    assert!(
        matches!(answer, Err(Error::ServerUnresponsive { .. })),
        "{answer:?}"
    );
    let mut admin = connect(&url);
    assert_eq!(
        count_for(
            &mut admin,
            "SELECT COUNT(*) AS n FROM user_balance WHERE user_id = ?",
            41
        ),
        0
    );
    assert_eq!(count_key(&mut admin, 41, "k"), 0);
}

/// A refund refused as more than its deduct has left, where less has been refunded than it
/// asks for, can never have been applied (a deduct's refunded amount only grows): it keeps its
/// refusal where the key's lookup after it fails, instead of answering `OutcomeUnknown` — also
/// one larger than the whole deduct. Where as much as it asks for has been refunded, that may
/// be its own earlier call under the key: still `OutcomeUnknown` (the negative control).
#[test]
fn a_refund_that_was_never_applied_keeps_its_refusal_where_its_key_lookup_fails() {
    let (url, mut admin) = fresh_database("review_refund_lookup_lost");
    let ledger = BalanceLedger::new();
    ledger
        .charge(&mut admin, 1, dec(100), "seed")
        .expect("seed");
    let deduct = ledger.deduct(&mut admin, 1, dec(10), "d1").expect("deduct");
    ledger
        .refund(&mut admin, deduct.id, dec(3), "r1")
        .expect("refund 3 of 10");
    let entries = journal_size(&mut admin, 1);
    // A connection killed as it sends its second lock-free snapshot: the first reads the
    // deduct, the second is the key's lookup after the refusal.
    let armed = || crate::killed_at_snapshot(&url, 2);
    for (amount, key) in [(11, "r-more-than-the-deduct"), (8, "r-more-than-is-left")] {
        let refused = ledger.refund(&mut armed(), deduct.id, dec(amount), key);
        assert!(
            matches!(
                refused,
                Err(Error::RefundExceedsDeduct { entry_id, .. }) if entry_id == deduct.id
            ),
            "{key}: {refused:?}"
        );
    }
    // The negative control: with 7 of 10 refunded, a refund of 4 refused now may be the retry
    // of an earlier call under its key that refunded 4 of those 7.
    ledger
        .refund(&mut admin, deduct.id, dec(4), "r2")
        .expect("refund 4 more: 7 of 10");
    let entries = entries + 1;
    let again = ledger.refund(&mut armed(), deduct.id, dec(4), "r3");
    assert!(
        matches!(&again, Err(e) if e.is_outcome_unknown()),
        "{again:?}"
    );
    assert_eq!(journal_size(&mut admin, 1), entries, "nothing was written");
    audit_ok(&ledger, &mut admin, 1);
}
