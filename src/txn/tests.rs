use super::policy::jitter_fraction;
use super::*;
use std::cell::Cell;
use std::time::{Duration, Instant};

std::thread_local! {
    /// Armed by a test: every COMMIT of a write this thread's runner sends until then is
    /// refused with a certification conflict (as a Galera node refuses one), without being
    /// sent — its transaction is rolled back. `true`: refused after a combiner's batch handed
    /// the key's turn on (as a standalone server's refusal comes); `false`: before (as a
    /// Galera-guarded COMMIT's, whose turn is handed on after it).
    static REFUSE_COMMITS_UNTIL: Cell<Option<(Instant, bool)>> = const { Cell::new(None) };
}

/// Arms [`REFUSE_COMMITS_UNTIL`] for the calling thread (`None`: disarms it).
pub(crate) fn refuse_commits_until(until: Option<(Instant, bool)>) {
    REFUSE_COMMITS_UNTIL.with(|armed| armed.set(until));
}

/// The hook as a write's COMMIT is about to be sent, before (`passed` false) or after the
/// handoff passed the turn on: the refusal, while armed for that moment.
pub(super) fn refused_commit(passed: bool) -> Option<diesel::result::Error> {
    let (until, after_pass) = REFUSE_COMMITS_UNTIL.with(Cell::get)?;
    (after_pass == passed && Instant::now() < until).then(|| {
        diesel::result::Error::DatabaseError(
            diesel::result::DatabaseErrorKind::SerializationFailure,
            Box::new(String::from(
                "Deadlock found when trying to get lock; try restarting transaction",
            )),
        )
    })
}

#[test]
fn backoff_ceiling_follows_its_formula_past_two_to_the_31() {
    // min(max_backoff, base_backoff * 2^retry): 2^31 µs is about 35.8 min, 2^32 µs about
    // 71.6 min — above an hour (before, the exponent stopped at 31: 35.8 min for ever).
    let policy = RetryPolicy {
        base_backoff: Duration::from_micros(1),
        max_backoff: Duration::from_secs(3_600),
        ..RetryPolicy::default()
    };
    assert_eq!(policy.backoff_ceiling(31), Duration::from_micros(1 << 31));
    assert_eq!(policy.backoff_ceiling(32), Duration::from_secs(3_600));
    assert_eq!(policy.backoff_ceiling(40), Duration::from_secs(3_600));
    let longest = RetryPolicy {
        base_backoff: Duration::MAX,
        max_backoff: Duration::MAX,
        ..RetryPolicy::default()
    };
    assert_eq!(longest.backoff_ceiling(u32::MAX), Duration::MAX);
    assert_eq!(longest.backoff_ceiling(0), Duration::MAX);
    // A zero base retries at once, however many retries (the first version of the fix gave
    // `max_backoff` from retry 128 on).
    let at_once = RetryPolicy {
        base_backoff: Duration::ZERO,
        max_backoff: Duration::from_millis(50),
        ..RetryPolicy::default()
    };
    assert_eq!(at_once.backoff_ceiling(128), Duration::ZERO);
    assert_eq!(at_once.backoff_ceiling(u32::MAX), Duration::ZERO);
}

#[test]
fn backoff_ceiling_doubles_up_to_the_cap() {
    let policy = RetryPolicy {
        max_attempts: 10,
        base_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(20),
        deadline: Duration::from_secs(1),
    };
    let ceilings: Vec<u128> = (0..8)
        .map(|r| policy.backoff_ceiling(r).as_millis())
        .collect();
    assert_eq!(ceilings, vec![1, 2, 4, 8, 16, 20, 20, 20]);
    assert_eq!(policy.backoff_ceiling(u32::MAX), Duration::from_millis(20));
}

#[test]
fn backoff_is_full_jitter_within_the_ceiling() {
    let policy = RetryPolicy::default();
    for retry in 0..12 {
        let ceiling = policy.backoff_ceiling(retry);
        let samples: Vec<Duration> = (0..200).map(|_| policy.backoff(retry)).collect();
        assert!(samples.iter().all(|d| *d <= ceiling), "retry {retry}");
        // Full jitter: spread over the whole range, not clustered at the top.
        assert!(samples.iter().any(|d| *d < ceiling / 4), "retry {retry}");
        assert!(
            samples.iter().any(|d| *d > ceiling * 3 / 4),
            "retry {retry}"
        );
    }
}

#[test]
fn jitter_fraction_is_in_unit_interval() {
    for _ in 0..10_000 {
        let f = jitter_fraction();
        assert!((0.0..1.0).contains(&f));
    }
}

#[test]
fn session_sql_per_flavor() {
    let policy = TxnPolicy::default();
    let maria = policy.session_sql(ServerFlavor::MariaDb);
    assert!(maria.contains("max_statement_time = 5.000"), "{maria}");
    assert!(maria.contains("innodb_lock_wait_timeout = 1"), "{maria}");
    assert!(maria.contains("idle_transaction_timeout = 0"), "{maria}");
    let mysql = policy.session_sql(ServerFlavor::MySql);
    assert!(!mysql.contains("idle_"), "{mysql}");
    assert!(mysql.contains("max_execution_time = 5000"), "{mysql}");
    assert!(!mysql.contains("max_statement_time"), "{mysql}");
}

#[test]
fn a_transactions_statement_limit_is_the_time_left_within_the_policys() {
    let policy = TxnPolicy::default();
    let ms = Duration::from_millis;
    // The policy's limit where more is left; the time left (rounded up to the millisecond)
    // where less is; never under the floor a COMMIT needs.
    assert_eq!(policy.statement_limit(ms(60_000)), 5.0);
    assert_eq!(policy.statement_limit(ms(300)), 0.3);
    assert_eq!(policy.statement_limit(Duration::from_micros(299_001)), 0.3);
    assert_eq!(policy.statement_limit(Duration::ZERO), 0.02);
    assert_eq!(policy.statement_limit(ms(5)), 0.02);
    // A policy limit under the floor stays the limit.
    let strict = TxnPolicy {
        statement_timeout: ms(3),
        ..TxnPolicy::default()
    };
    assert_eq!(strict.statement_limit(Duration::ZERO), 0.003);
    // The longest lock wait: the lock wait (whole seconds), or the statement limit if shorter.
    assert_eq!(policy.longest_lock_wait(), ms(1_000));
    assert_eq!(strict.longest_lock_wait(), ms(3));
    let bound = policy.settings_bound();
    assert!(bound.contains("max_statement_time = ?"), "{bound}");
    assert!(bound.contains("lock_wait_timeout = 1"), "{bound}");
    assert_eq!(bound.matches('?').count(), 1, "{bound}");
}

/// `insert_id = 0` clears a pending id on MariaDB only; MySQL 8 takes 0 as an id. So the
/// runner saves, pins and puts back `insert_id` on MariaDB (every restoring SET there clears
/// what it saved) and never sends it to MySQL.
#[test]
fn insert_id_is_pinned_and_put_back_on_mariadb_only() {
    use crate::statements::{RestoreGalera, RestoreMariaDb, RestoreMySql};
    fn sql<T: diesel::query_builder::QueryFragment<diesel::mysql::Mysql>>(query: &T) -> String {
        diesel::debug_query::<diesel::mysql::Mysql, _>(query).to_string()
    }
    const PIN: &str = " insert_id = ";
    const SAVED: &str = "@lockstock_insert_id";
    let policy = TxnPolicy::default();
    assert!(policy
        .session_sql(ServerFlavor::MariaDb)
        .contains("insert_id = 0"));
    assert!(policy.settings_bound().contains("insert_id = 0"));
    assert!(!policy.session_sql(ServerFlavor::MySql).contains(PIN));
    for (galera, tripwire) in [(false, false), (false, true), (true, false)] {
        let maria = RunnerSql::new(&policy, ServerFlavor::MariaDb, galera, false, tripwire);
        for own in &maria.own {
            assert!(
                own[0].contains("@lockstock_insert_id = @@session.insert_id"),
                "{own:?}"
            );
            assert!(own[0].contains("insert_id = 0"), "{own:?}");
        }
        let mysql = RunnerSql::new(&policy, ServerFlavor::MySql, galera, false, false);
        for statement in mysql.own.iter().chain(&mysql.marked).flatten() {
            assert!(
                !statement.contains(PIN) && !statement.contains(SAVED),
                "{statement}"
            );
        }
    }
    for restore in [sql(&RestoreMariaDb), sql(&RestoreGalera)] {
        assert!(
            restore.contains("insert_id = COALESCE(@lockstock_insert_id, @@session.insert_id)"),
            "{restore}"
        );
        assert!(restore.contains("@lockstock_insert_id = NULL"), "{restore}");
    }
    let mysql = sql(&RestoreMySql);
    assert!(!mysql.contains(PIN) && !mysql.contains(SAVED), "{mysql}");
}

#[test]
fn an_unbounded_grace_never_cuts_at_the_deadline() {
    let deadline = Deadline::after(Duration::from_secs(1));
    // Before: `Duration::MAX` overflowed the deadline's instant and the watchdog came due at
    // the deadline itself.
    let day = Duration::from_secs(86_400);
    assert!(deadline.past(Duration::MAX) > deadline.past(day));
    assert_eq!(
        deadline.past(Duration::from_millis(20)),
        deadline.past(Duration::ZERO) + Duration::from_millis(20)
    );
}

/// A deadline that passes inside a later attempt (a body's own check between a large batch's
/// pieces answers `Timeout`) after a refused attempt gives up as `Contended`, with the refusal
/// and the attempts refused (1: the one the deadline cut is not charged), as a deadline found
/// passed at the top of the retry loop does:
/// `Timeout` says nothing was sent, and a combiner charges a batch's attempts to the requests
/// it gives back only through `Contended`. Before the fix the body's `Timeout` came back as it
/// was.
#[test]
fn a_deadline_passing_inside_a_retried_attempt_is_contended() {
    let (_url, mut conn) = crate::util::test_database("unit_txn_timeout_after_refusal");
    let runner = TxnRunner::new(TxnPolicy::default());
    let deadline = Deadline::after(Duration::from_millis(300));
    let mut calls = 0;
    let answer: Result<(), Error> = runner.run_by(&mut conn, deadline, |_| {
        calls += 1;
        if calls == 1 {
            return Err(Error::Server(crate::error::ServerError::new(
                diesel::result::Error::DatabaseError(
                    diesel::result::DatabaseErrorKind::Unknown,
                    Box::new("Lock wait timeout exceeded; try restarting transaction".to_owned()),
                ),
            )));
        }
        std::thread::sleep(deadline.remaining());
        Err(Error::Timeout {
            elapsed: deadline.elapsed(),
        })
    });
    assert!(
        matches!(
            &answer,
            Err(Error::Contended { attempts: 1, last, .. })
                if last.kind() == crate::ServerErrorKind::LockWaitTimeout
        ),
        "{answer:?}"
    );
}

/// The undo of the result character set's SET changes nothing when sent again (as after a late
/// abort): the caller's character set stays. Before, the second send set it to NULL (its
/// saved value was cleared by the first).
#[test]
fn the_result_character_sets_undo_sent_twice_keeps_the_callers() {
    use diesel::RunQueryDsl;
    let (_url, mut conn) = crate::util::test_database("unit_txn_undo_results_twice");
    let latin1 = |conn: &mut MysqlConnection| -> i64 {
        let Ok(is) = diesel::select(diesel::dsl::sql::<diesel::sql_types::BigInt>(
            "CAST(COALESCE(@@session.character_set_results = _utf8mb4'latin1', 0) AS SIGNED)",
        ))
        .get_result(conn) else {
            panic!("read the session");
        };
        is
    };
    let Ok(_) =
        crate::statements::PreparedSql("SET character_set_results = latin1").execute(&mut conn)
    else {
        panic!("the caller's character set");
    };
    let Ok(_) = crate::statements::PreparedSql(transaction::READABLE_ERRORS).execute(&mut conn)
    else {
        panic!("the readable errors' SET");
    };
    assert_eq!(latin1(&mut conn), 0, "utf8mb4 while lockstock runs");
    assert!(transaction::undo_readable_errors(&mut conn).is_none());
    assert!(transaction::undo_readable_errors(&mut conn).is_none());
    assert_eq!(
        latin1(&mut conn),
        1,
        "the caller's character set after two undos"
    );
}
