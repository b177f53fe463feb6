use super::policy::jitter_fraction;
use super::*;
use std::time::Duration;

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
    let mysql = policy.session_sql(ServerFlavor::MySql);
    assert!(mysql.contains("max_execution_time = 5000"), "{mysql}");
    assert!(!mysql.contains("max_statement_time"), "{mysql}");
}
