//! The foundation against a real server: migrations, schema, session settings, and the
//! transaction runner's NOWAIT refusal, retry, attempt bound and deadline.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::mysql::Mysql;
use diesel::prelude::*;
use diesel::query_builder::{AsQuery, QueryFragment};
use diesel::sql_types::Text;
use diesel_migrations::MigrationHarness;
use lockstock::schema::{
    balance_history, balance_hold, coupon, designated_writer, fcfs_coupon, fcfs_coupon_restock,
    user_balance, user_coupon,
};
use lockstock::{
    BalanceLedger, Error, RetryPolicy, ServerErrorKind, StatementCache, TxnPolicy, TxnRunner,
};
use rust_decimal::Decimal;

use lockstock_testkit::fixtures::{
    concurrently, connect, fresh_database, holds_locker, lock_balance, now, open_campaign_named,
    policy_with_deadline, pool_with, retry_policy, session_vars, snapshot,
};

#[derive(QueryableByName)]
struct Name {
    #[diesel(sql_type = Text)]
    name: String,
}

fn tables(conn: &mut MysqlConnection) -> Vec<String> {
    diesel::sql_query(
        "SELECT table_name AS name FROM information_schema.tables \
         WHERE table_schema = DATABASE() AND table_name <> '__diesel_schema_migrations' \
         ORDER BY table_name",
    )
    .load::<Name>(conn)
    .expect("list tables")
    .into_iter()
    .map(|n| n.name)
    .collect()
}

#[test]
fn migrations_up_down_up() {
    let (_url, mut conn) = fresh_database("foundation_migrations");
    let all = [
        "balance_history",
        "balance_hold",
        "coupon",
        "designated_writer",
        "fcfs_coupon",
        "fcfs_coupon_restock",
        "user_balance",
        "user_coupon",
    ];
    assert_eq!(tables(&mut conn), all);
    conn.revert_all_migrations(lockstock::MIGRATIONS)
        .expect("down");
    assert!(
        tables(&mut conn).is_empty(),
        "down.sql leaves tables: {:?}",
        tables(&mut conn)
    );
    lockstock::run_migrations(&mut conn).expect("up again");
    assert_eq!(tables(&mut conn), all);
    // Idempotent: nothing pending.
    lockstock::run_migrations(&mut conn).expect("up once more");
}

/// Column names and order of `schema.rs`, read from Diesel's own SQL for `all_columns`.
fn diesel_columns(select_sql: &str) -> Vec<String> {
    let select = select_sql.split(" FROM ").next().unwrap_or_default();
    select
        .trim_start_matches("SELECT ")
        .split(", ")
        .map(|c| {
            c.rsplit('.')
                .next()
                .unwrap_or_default()
                .trim_matches('`')
                .to_owned()
        })
        .collect()
}

/// Diesel's SQL for the whole of `table` (its `all_columns`).
fn sql_of<T>(table: T) -> String
where
    T: AsQuery,
    T::Query: QueryFragment<Mysql>,
{
    diesel::debug_query::<Mysql, _>(&table.as_query()).to_string()
}

#[test]
fn schema_rs_matches_migrations() {
    let (_url, mut conn) = fresh_database("foundation_schema");
    let declared = [
        ("user_balance", sql_of(user_balance::table)),
        ("balance_history", sql_of(balance_history::table)),
        ("balance_hold", sql_of(balance_hold::table)),
        ("coupon", sql_of(coupon::table)),
        ("fcfs_coupon", sql_of(fcfs_coupon::table)),
        ("fcfs_coupon_restock", sql_of(fcfs_coupon_restock::table)),
        ("user_coupon", sql_of(user_coupon::table)),
        ("designated_writer", sql_of(designated_writer::table)),
    ];
    for (table, sql) in declared {
        let actual: Vec<String> = diesel::sql_query(
            "SELECT column_name AS name FROM information_schema.columns \
             WHERE table_schema = DATABASE() AND table_name = ? ORDER BY ordinal_position",
        )
        .bind::<Text, _>(table)
        .load::<Name>(&mut conn)
        .expect("columns")
        .into_iter()
        .map(|n| n.name)
        .collect();
        assert_eq!(diesel_columns(&sql), actual, "{table}");
        // Every declared type deserializes what the server stores (no rows needed to type-check
        // the select list on the server).
    }
    // Every character column's length as declared (`#[max_length = N]`, read from the file:
    // Diesel keeps it nowhere at run time) is the server's.
    let mut declared_lengths = Vec::new();
    let (mut table, mut length) = (String::new(), None);
    for line in include_str!("../../src/schema.rs").lines().map(str::trim) {
        if let Some(name) = line.strip_suffix("(id) {").map(str::trim) {
            table = name.to_owned();
        } else if let Some(n) = line
            .strip_prefix("#[max_length = ")
            .and_then(|rest| rest.strip_suffix(']'))
        {
            length = n.parse::<i64>().ok();
        } else if let Some((column, _)) = line.split_once(" -> ") {
            if let Some(n) = length.take() {
                declared_lengths.push((table.clone(), column.to_owned(), n));
            }
        }
    }
    #[derive(QueryableByName)]
    struct Length {
        #[diesel(sql_type = Text)]
        table_name: String,
        #[diesel(sql_type = Text)]
        column_name: String,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        length: i64,
    }
    let mut actual_lengths: Vec<(String, String, i64)> = diesel::sql_query(
        "SELECT table_name AS table_name, column_name AS column_name, \
         CAST(character_maximum_length AS SIGNED) AS length FROM information_schema.columns \
         WHERE table_schema = DATABASE() AND character_maximum_length IS NOT NULL \
         AND table_name <> '__diesel_schema_migrations'",
    )
    .load::<Length>(&mut conn)
    .expect("column lengths")
    .into_iter()
    .map(|l| (l.table_name, l.column_name, l.length))
    .collect();
    actual_lengths.sort();
    declared_lengths.sort();
    assert_eq!(declared_lengths, actual_lengths, "character column lengths");
    // Load real rows through every column of the two domains.
    let ledger = BalanceLedger::new();
    ledger
        .charge(&mut conn, 1, Decimal::new(5, 0), "k")
        .expect("charge");
    let expires_at = chrono::Utc::now().naive_utc() + chrono::Duration::minutes(5);
    let hold = ledger
        .hold(&mut conn, 1, Decimal::new(2, 0), "h", expires_at)
        .expect("hold");
    ledger.release(&mut conn, hold.id, "r").expect("release");
    let stored = snapshot(&mut conn);
    assert_eq!(stored.balances.len(), 1);
    assert_eq!(stored.history.len(), 3);
    type HoldColumns = (
        i64,
        i64,
        Decimal,
        Decimal,
        String,
        chrono::NaiveDateTime,
        chrono::NaiveDateTime,
        Option<chrono::NaiveDateTime>,
        Option<i64>,
    );
    let holds = balance_hold::table
        .select(balance_hold::all_columns)
        .load::<HoldColumns>(&mut conn)
        .expect("balance_hold");
    assert_eq!(holds.len(), 1);
    let issuer = lockstock::CouponIssuer::new();
    let (_template, campaign) = open_campaign_named(&mut conn, &issuer, "schema", 1);
    issuer
        .restock(&mut conn, campaign.id, 2, "k")
        .expect("restock");
    let restocks = fcfs_coupon_restock::table
        .select(fcfs_coupon_restock::all_columns)
        .load::<(i64, i64, String, i32, i32, i32, chrono::NaiveDateTime)>(&mut conn)
        .expect("fcfs_coupon_restock");
    assert_eq!(restocks.len(), 1);
    // The designated-writer row the migration inserts: none designated yet.
    let writer = designated_writer::table
        .select(designated_writer::all_columns)
        .load::<(i8, String, i64, chrono::NaiveDateTime)>(&mut conn)
        .expect("designated_writer");
    assert_eq!(writer.len(), 1);
    assert_eq!((writer[0].0, writer[0].1.as_str(), writer[0].2), (1, "", 0));
}

#[test]
fn pool_customizer_applies_session_settings() {
    let (url, _conn) = fresh_database("foundation_pool");
    let mut policy = TxnPolicy::default();
    policy.lock_wait_timeout = Duration::from_secs(2);
    policy.statement_timeout = Duration::from_millis(1500);
    let pool = pool_with(&url, 2, policy);
    let mut conn = pool.get().expect("pooled connection");
    let s = session_vars(&mut conn);
    assert_eq!(s.lock_wait, 2);
    assert!((s.statement - 1.5).abs() < 1e-9, "{}", s.statement);
    assert_eq!(s.messages, "en_US");
    assert_eq!(s.zone, "+00:00");
}

#[test]
fn statement_timeout_is_enforced_and_typed() {
    let (url, _conn) = fresh_database("foundation_stmt_timeout");
    let mut conn = connect(&url);
    let mut policy = TxnPolicy::default();
    policy.statement_timeout = Duration::from_millis(200);
    let runner = TxnRunner::new(policy);
    let started = Instant::now();
    let result = runner.run(&mut conn, |conn| {
        conn.batch_execute("SELECT SLEEP(3) FROM user_balance UNION ALL SELECT SLEEP(3)")?;
        Ok(())
    });
    let error = result.expect_err("the statement limit must interrupt SLEEP(3)");
    assert_eq!(
        error.server_kind(),
        Some(ServerErrorKind::StatementTimeout),
        "{error:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

fn seed_account(url: &str, user_id: i64) {
    let mut conn = connect(url);
    BalanceLedger::new()
        .charge(
            &mut conn,
            user_id,
            Decimal::new(100, 0),
            &format!("seed-{user_id}"),
        )
        .expect("seed charge");
}

fn lock_nowait(conn: &mut MysqlConnection, user_id: i64) -> Result<Decimal, Error> {
    Ok(user_balance::table
        .find(user_id)
        .select(user_balance::balance)
        .for_update()
        .no_wait()
        .first(conn)?)
}

/// Two connections race for one row with FOR UPDATE NOWAIT: exactly one holds it, the other is
/// refused at once with a typed, retryable error.
#[test]
fn nowait_race_exactly_one_holds_the_lock() {
    let _exclusive = lockstock_testkit::fixtures::exclusive();
    let (url, _conn) = fresh_database("foundation_nowait_race");
    seed_account(&url, 1);
    // Racers that have answered: a winner holds the row until the other one has (or 10 s).
    let answered = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<_> = concurrently(2, &url, |_, conn| {
        let runner = TxnRunner::new(TxnPolicy::default().with_retry(RetryPolicy::no_retry()));
        let started = Instant::now();
        let result = runner.run(conn, |conn| {
            lock_nowait(conn, 1)?;
            let holding = Instant::now();
            while answered.load(std::sync::atomic::Ordering::SeqCst) == 0
                && holding.elapsed() < Duration::from_secs(10)
            {
                thread::sleep(Duration::from_millis(5));
            }
            Ok(())
        });
        answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        (result, started.elapsed())
    });
    let winners = results.iter().filter(|(r, _)| r.is_ok()).count();
    assert_eq!(winners, 1, "{results:?}");
    let (refused, waited) = results.iter().find(|(r, _)| r.is_err()).expect("a loser");
    let refused = refused.as_ref().expect_err("loser");
    match refused {
        Error::Contended {
            attempts: 1, last, ..
        } => {
            assert!(last.kind().is_retryable(), "{last}");
            assert!(
                matches!(
                    last.kind(),
                    ServerErrorKind::LockWaitTimeout | ServerErrorKind::LockRefused
                ),
                "{last}"
            );
        }
        other => panic!("expected Contended, got {other:?}"),
    }
    assert!(refused.is_retryable());
    // NOWAIT: refused at once, not after innodb_lock_wait_timeout (1 s).
    assert!(
        *waited < Duration::from_millis(350),
        "refusal took {waited:?}"
    );
}

/// The runner's retry turns the refusal into success once the holder commits.
#[test]
fn retry_succeeds_after_holder_commits() {
    let _exclusive = lockstock_testkit::fixtures::exclusive();
    let (url, _conn) = fresh_database("foundation_retry");
    seed_account(&url, 1);
    let mut holder = connect(&url);
    let mut conn = connect(&url);
    let held = Arc::new(crate::Gate::new(2));
    let held2 = held.clone();
    // The holder commits once the runner's first attempt was refused (or after 5 s).
    let (refused_tx, refused_rx) = std::sync::mpsc::channel::<()>();
    let holder_thread = thread::spawn(move || {
        // A holder that fails before the lock breaks the gate: the test fails, never hangs.
        let _party = held2.party();
        holder
            .transaction::<_, diesel::result::Error, _>(|conn| {
                lock_balance(conn, 1)?;
                held2.wait();
                let _ = refused_rx.recv_timeout(Duration::from_secs(5));
                Ok(())
            })
            .expect("holder");
    });
    held.wait();
    let runner = TxnRunner::new(TxnPolicy::default());
    let (result, attempts) = runner.run_counted(&mut conn, |conn| {
        let read = lock_nowait(conn, 1);
        if read.is_err() {
            let _ = refused_tx.send(());
        }
        read
    });
    holder_thread.join().expect("holder thread");
    assert_eq!(result.expect("retried to success"), Decimal::new(100, 0));
    assert!(attempts.refused >= 1, "{attempts:?}");
    assert_eq!(attempts.started, attempts.refused + 1);
}

/// A fresh database `name` whose account 1 another connection holds locked for `hold` from
/// now on, and a connection to it; the holder's thread ends when the lock is released.
fn account_held_for(name: &str, hold: Duration) -> (thread::JoinHandle<()>, MysqlConnection) {
    let (url, _conn) = fresh_database(name);
    seed_account(&url, 1);
    let (holder, held) = hold_lock_for(&url, 1, hold);
    held.wait();
    (holder, connect(&url))
}

fn hold_lock_for(
    url: &str,
    user_id: i64,
    hold: Duration,
) -> (thread::JoinHandle<()>, Arc<crate::Gate>) {
    let mut holder = connect(url);
    let held = Arc::new(crate::Gate::new(2));
    let held2 = held.clone();
    let handle = thread::spawn(move || {
        // A holder that fails before the lock breaks the gate: the test fails, never hangs.
        let _party = held2.party();
        holder
            .transaction::<_, diesel::result::Error, _>(|conn| {
                lock_balance(conn, user_id)?;
                held2.wait();
                thread::sleep(hold);
                Ok(())
            })
            .expect("holder");
    });
    (handle, held)
}

#[test]
fn retries_stop_at_max_attempts() {
    let _exclusive = lockstock_testkit::fixtures::exclusive();
    let (holder, mut conn) = account_held_for("foundation_attempts", Duration::from_millis(1500));
    let mut retry = retry_policy(5, Duration::from_secs(10));
    retry.base_backoff = Duration::from_millis(1);
    retry.max_backoff = Duration::from_millis(4);
    let runner = TxnRunner::new(TxnPolicy::default().with_retry(retry));
    let (result, attempts) = runner.run_counted(&mut conn, |conn| lock_nowait(conn, 1));
    match result {
        Err(Error::Contended {
            attempts: 5,
            elapsed,
            ..
        }) => {
            // 4 backoffs of at most 1, 2, 4, 4 ms plus five refusals.
            assert!(elapsed < Duration::from_millis(1000), "{elapsed:?}");
        }
        other => panic!("expected Contended after 5 attempts, got {other:?}"),
    }
    assert_eq!((attempts.started, attempts.refused), (5, 5));
    holder.join().expect("holder");
}

#[test]
fn retries_stop_at_the_deadline() {
    let _exclusive = lockstock_testkit::fixtures::exclusive();
    let (holder, mut conn) = account_held_for("foundation_deadline", Duration::from_millis(2000));
    let retry = retry_policy(100_000, Duration::from_millis(300));
    let runner = TxnRunner::new(TxnPolicy::default().with_retry(retry));
    let started = Instant::now();
    match runner.run(&mut conn, |conn| lock_nowait(conn, 1)) {
        Err(Error::Contended {
            attempts, elapsed, ..
        }) => {
            assert!(attempts > 1 && attempts < 100_000, "{attempts}");
            // Gives up at the deadline (a backoff sleep or the attempt under way may overrun
            // it a little; the holder's 2 s and the 1 s lock wait are far later).
            assert!(elapsed <= Duration::from_millis(550), "{elapsed:?}");
        }
        other => panic!("expected Contended at the deadline, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_millis(800),
        "{:?}",
        started.elapsed()
    );
    holder.join().expect("holder");
}

#[test]
fn refuses_to_run_inside_a_callers_transaction() {
    let (url, _conn) = fresh_database("foundation_nested");
    let mut conn = connect(&url);
    let ledger = BalanceLedger::new();
    let outcome = conn.transaction::<_, diesel::result::Error, _>(|conn| {
        Ok(ledger.charge(conn, 1, Decimal::ONE, "inside"))
    });
    assert!(
        matches!(outcome, Ok(Err(Error::NestedTransaction))),
        "{outcome:?}"
    );
    let count: i64 = balance_history::table
        .count()
        .get_result(&mut conn)
        .expect("count");
    assert_eq!(count, 0);
}

#[derive(QueryableByName)]
struct Status {
    #[diesel(sql_type = Text)]
    #[diesel(column_name = Value)]
    value: String,
}

fn prepares(conn: &mut MysqlConnection) -> i64 {
    let status: Status = diesel::sql_query("SHOW SESSION STATUS LIKE 'Com_stmt_prepare'")
        .get_result(conn)
        .expect("status");
    status.value.parse().expect("a number")
}

/// The single-request hot paths run on cached prepared statements: after the first call, a
/// deduct or a coupon issue prepares nothing (a prepare is a round trip while the row is locked).
#[test]
fn hot_paths_use_cached_prepared_statements() {
    use lockstock::CouponIssuer;
    let (url, _conn) = fresh_database("foundation_prepared");
    let ledger = BalanceLedger::new();
    let issuer = CouponIssuer::new();
    let (_coupon, campaign) = open_campaign_named(&mut connect(&url), &issuer, "prepared", 100);
    // The caller's own connection (settings saved and restored) and one that carries
    // lockstock's settings (as pooled through SessionSettings).
    for (round, marked) in [(0i64, false), (1, true)] {
        let mut conn = connect(&url);
        if marked {
            lockstock::txn::apply_session_settings(&mut conn, &TxnPolicy::default())
                .expect("settings");
        }
        let user = 1 + round;
        ledger
            .charge(&mut conn, user, Decimal::new(1_000, 0), "warm-c")
            .expect("charge");
        ledger
            .deduct(&mut conn, user, Decimal::ONE, "warm-d")
            .expect("deduct");
        issuer
            .issue(&mut conn, 100 * user, campaign.id)
            .expect("issue");
        let before = prepares(&mut conn);
        for i in 0..10 {
            ledger
                .deduct(&mut conn, user, Decimal::ONE, &format!("d{i}"))
                .expect("deduct");
            ledger
                .charge(&mut conn, user, Decimal::ONE, &format!("c{i}"))
                .expect("charge");
            issuer
                .issue(&mut conn, 100 * user + 1 + i, campaign.id)
                .expect("issue");
        }
        // One prepare is the SHOW STATUS query itself.
        assert_eq!(
            prepares(&mut conn) - before,
            1,
            "marked connection: {marked}"
        );
    }
}

/// A panicking transaction body is rolled back before the panic goes on, so the connection (or
/// a pooled one) is never left with a transaction open.
#[test]
fn a_panicking_body_rolls_back() {
    let (url, _conn) = fresh_database("foundation_panic");
    let mut conn = connect(&url);
    let runner = TxnRunner::new(TxnPolicy::default());
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = runner.run(&mut conn, |conn| {
            diesel::insert_into(user_balance::table)
                .values(user_balance::user_id.eq(9))
                .execute(conn)?;
            panic!("body bug");
            #[allow(unreachable_code)]
            Ok(())
        });
    }));
    assert!(panicked.is_err());
    // Same connection: no transaction is open (a new one starts cleanly) and nothing was kept.
    let rows: i64 = user_balance::table
        .count()
        .get_result(&mut conn)
        .expect("count");
    assert_eq!(rows, 0);
    let mut other = connect(&url);
    let seen: i64 = user_balance::table
        .count()
        .get_result(&mut other)
        .expect("count");
    assert_eq!(seen, 0);
    BalanceLedger::new()
        .charge(&mut conn, 9, Decimal::ONE, "after-panic")
        .expect("the connection still works");
}

/// READ COMMITTED (selectable per policy) keeps the ledger's promises too: they rest on the row
/// lock, not on the isolation level.
#[test]
fn read_committed_policy_keeps_balances_exact() {
    use lockstock::Isolation;
    let (url, mut conn) = fresh_database("foundation_read_committed");
    let ledger =
        BalanceLedger::with_policy(TxnPolicy::default().with_isolation(Isolation::ReadCommitted));
    ledger
        .charge(&mut conn, 1, Decimal::new(100, 0), "seed")
        .expect("seed");
    let workers: Vec<_> = concurrently(8, &url, |t, conn| {
        (0..10)
            .filter(
                |i| match ledger.deduct(conn, 1, Decimal::new(3, 0), &format!("{t}-{i}")) {
                    Ok(_) => true,
                    Err(Error::InsufficientBalance { .. } | Error::Contended { .. }) => false,
                    Err(e) => panic!("untyped: {e:?}"),
                },
            )
            .count() as i64
    });
    let ok: i64 = workers.into_iter().sum();
    let balance = lockstock_testkit::fixtures::stored_balance(&mut conn, 1);
    assert_eq!(
        balance,
        Decimal::new(100, 0) - Decimal::from(ok) * Decimal::new(3, 0)
    );
    assert!(balance >= Decimal::ZERO);
    ledger.audit(&mut conn, 1).expect("audit");
}

#[derive(QueryableByName)]
struct Level {
    #[diesel(sql_type = Text)]
    level: String,
}

/// Every transaction runs at the policy's isolation level: SERIALIZABLE by default (read from
/// InnoDB's own view of the running transaction, not from session variables).
#[test]
fn transactions_run_at_the_policys_isolation_level() {
    use lockstock::Isolation;
    let (url, _conn) = fresh_database("foundation_isolation");
    seed_account(&url, 1);
    let mut conn = connect(&url);
    for (isolation, expected) in [
        (Isolation::Serializable, "SERIALIZABLE"),
        (Isolation::RepeatableRead, "REPEATABLE READ"),
        (Isolation::ReadCommitted, "READ COMMITTED"),
    ] {
        let runner = TxnRunner::new(TxnPolicy::default().with_isolation(isolation));
        let level = runner
            .run(&mut conn, |conn| {
                lock_nowait(conn, 1)?;
                // INFORMATION_SCHEMA.INNODB_TRX is a snapshot refreshed at most every 0.1 s.
                thread::sleep(Duration::from_millis(150));
                Ok(diesel::sql_query(
                    "SELECT trx_isolation_level AS level FROM information_schema.innodb_trx \
                     WHERE trx_mysql_thread_id = CONNECTION_ID()",
                )
                .get_result::<Level>(conn)?
                .level)
            })
            .expect("level");
        assert_eq!(level, expected);
    }
    // The default policy is SERIALIZABLE.
    assert_eq!(TxnPolicy::default().isolation, Isolation::Serializable);
}

/// A caller's own body may read a range with a cached prepared statement (Diesel caches every
/// query whose SQL does not vary). When that read is refused in the middle of its result — here
/// it locks, under SERIALIZABLE, the record after its range, which another transaction holds —
/// the runner retries the body without hanging: it answers `Contended` by the deadline, and the
/// connection then runs the same body. Before the fix the retry re-ran the cached statement,
/// which waited for the rest of the first result: the call hung until the watchdog ended it as
/// `ServerUnresponsive`, and the connection was lost.
#[test]
fn a_callers_range_read_refused_mid_result_is_retried_without_hanging() {
    let (url, mut conn) = fresh_database("runner_stale_statement");
    let ledger = BalanceLedger::new();
    for user in [10i64, 11] {
        ledger
            .charge(
                &mut conn,
                user,
                Decimal::new(100, 0),
                &format!("fund-{user}"),
            )
            .expect("fund");
        ledger
            .hold(
                &mut conn,
                user,
                Decimal::ONE,
                "hold",
                now() + chrono::Duration::hours(1),
            )
            .expect("hold");
    }
    let mut foreign = holds_locker(&url, 11);
    let since = now() - chrono::Duration::hours(1);
    let read = |c: &mut MysqlConnection| -> Result<Vec<i64>, Error> {
        Ok(balance_hold::table
            .filter(balance_hold::user_id.eq(10))
            .filter(balance_hold::state.eq("active"))
            .filter(balance_hold::expires_at.gt(since))
            .select(balance_hold::id)
            .load(c)?)
    };
    let runner = TxnRunner::new(policy_with_deadline(Duration::from_secs(2)));
    let mut caller = connect(&url);
    match runner.run(&mut caller, read) {
        Err(Error::Contended { attempts, .. }) => assert!(attempts > 1, "{attempts}"),
        other => panic!("{other:?}"),
    }
    foreign.batch_execute("ROLLBACK").expect("release");
    let holds = runner
        .run(&mut caller, read)
        .expect("the same connection, next call");
    assert_eq!(holds.len(), 1);
}

/// How many statements the server prepared for `conn` while it ran a cacheable `SELECT ?` twice,
/// counted with `Com_stmt_prepare` (read through `sql_query`, which Diesel never caches: the
/// second read counts itself): 3 with Diesel's statement cache off, 1 with it on and the
/// `SELECT` cached, 2 with it on and the `SELECT` not cached yet.
fn prepares_for_two_runs(conn: &mut MysqlConnection) -> i64 {
    let before = prepares(conn);
    for _ in 0..2 {
        diesel::select(1_i32.into_sql::<diesel::sql_types::Integer>())
            .get_result::<i32>(conn)
            .expect("run");
    }
    prepares(conn) - before
}

/// A caller who switched Diesel's statement cache off keeps it off through a failed attempt —
/// with the default policy, which asks the server, and with one that says so
/// (`StatementCache::Uncached`). After a failure that may leave a cached read expecting the
/// rest of its result, the runner drops the connection's cached statements by switching the
/// cache off and on (Diesel evicts no single statement and tells no cache size); before the
/// fix it did so for every caller, switching the cache on also for one who had it off (for a
/// server's `max_prepared_stmt_count`, or a proxy that cannot keep prepared statements), and
/// then for every caller whose policy did not say so. With the cache on, the same failure
/// empties it and leaves it on.
#[test]
fn a_failed_attempt_keeps_the_callers_statement_cache_setting() {
    use diesel::connection::CacheSize;
    let (url, _conn) = fresh_database("runner_cache_setting");
    let failing = |conn: &mut MysqlConnection| -> Result<(), Error> {
        diesel::sql_query("SELECT no_such_column FROM user_balance").execute(conn)?;
        Ok(())
    };
    for (size, cache) in [
        (CacheSize::Disabled, StatementCache::Ask),
        (CacheSize::Unbounded, StatementCache::Ask),
        (CacheSize::Disabled, StatementCache::Uncached),
        (CacheSize::Unbounded, StatementCache::Cached),
    ] {
        let expected = if size == CacheSize::Disabled { 3 } else { 1 };
        let mut policy = TxnPolicy::default();
        policy.statement_cache = cache;
        let runner = TxnRunner::new(policy);
        let mut caller = connect(&url);
        caller.set_prepared_statement_cache_size(size);
        // Warm: with the cache on, the `SELECT` is cached from here on.
        prepares_for_two_runs(&mut caller);
        assert_eq!(
            prepares_for_two_runs(&mut caller),
            expected,
            "{size:?}, before"
        );
        match runner.run(&mut caller, failing) {
            Err(Error::Server(e)) => assert_eq!(e.kind(), ServerErrorKind::Other, "{e:?}"),
            other => panic!("{other:?}"),
        }
        let after = prepares_for_two_runs(&mut caller);
        match size {
            // The cache emptied: the `SELECT` prepared once more.
            CacheSize::Unbounded => assert_eq!(after, 2, "{size:?}, after"),
            _ => assert_eq!(after, expected, "{size:?}, after"),
        }
        assert_eq!(
            prepares_for_two_runs(&mut caller),
            expected,
            "{size:?}, after"
        );
    }
}

diesel::table! {
    signal_rows (id) {
        id -> Integer,
    }
}

diesel::define_sql_function! {
    /// The test's stored function: its argument, or (on row 2 while the flag is set) a SIGNAL
    /// whose text reads like a lost connection.
    fn lost_at(x: diesel::sql_types::Integer) -> diesel::sql_types::Integer;
}

/// A cached range read that fails in the middle of its result with an error whose text reads
/// "lost connection" while the connection is alive (a procedure's SIGNAL; a FEDERATED or Spider
/// table's remote): the runner's ROLLBACK answers, so the connection is kept, and its cached
/// statements are dropped as after any failure mid-result. Before, "lost connection" was taken
/// for the connection's own (whose statements would be gone with it): the next run of the read
/// waited for the rest of the old result until the watchdog cut it off.
#[test]
fn a_read_failing_mid_result_with_a_lost_connections_text_is_not_left_in_the_cache() {
    let (_url, mut conn) = fresh_database("runner_lost_text");
    conn.batch_execute(
        "CREATE TABLE signal_rows (id INT PRIMARY KEY); \
         INSERT INTO signal_rows VALUES (1), (2), (3); \
         CREATE TABLE signal_flag (raised INT NOT NULL); \
         INSERT INTO signal_flag VALUES (1); \
         CREATE FUNCTION lost_at(x INT) RETURNS INT NOT DETERMINISTIC READS SQL DATA \
         BEGIN \
           IF x = 2 AND (SELECT raised FROM signal_flag) = 1 THEN \
             SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'Lost connection to upstream'; \
           END IF; \
           RETURN x; \
         END",
    )
    .expect("the test's table and function");
    let read = |c: &mut MysqlConnection| -> Result<Vec<i32>, Error> {
        Ok(signal_rows::table
            .select(lost_at(signal_rows::id))
            .order(signal_rows::id)
            .load(c)?)
    };
    let runner = TxnRunner::new(policy_with_deadline(Duration::from_secs(2)));
    let failed = runner.run(&mut conn, read);
    assert!(
        matches!(&failed, Err(e) if e.server_kind() == Some(ServerErrorKind::ConnectionLost)),
        "{failed:?}"
    );
    conn.batch_execute("UPDATE signal_flag SET raised = 0")
        .expect("lower the flag");
    let rows = runner
        .run(&mut conn, read)
        .expect("the same connection, the same cached read");
    assert_eq!(rows, [1, 2, 3]);
}
