use super::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use diesel::RunQueryDsl;

fn within(budget: Duration) -> Deadline {
    Deadline::after(budget)
}

type Doubler = Combiner<u8, u64, u64>;

fn doubled(_: &u8, requests: Vec<u64>, _: Deadline) -> Result<Vec<Result<u64>>> {
    thread::sleep(Duration::from_millis(2));
    Ok(requests.into_iter().map(|r| Ok(r * 2)).collect())
}

#[test]
fn every_caller_gets_its_own_answer_and_requests_are_combined() {
    let combiner = Doubler::new(64);
    let barrier = Barrier::new(32);
    // One caller's 50 requests, each answered with its own double.
    let caller = |t: u64| {
        barrier.wait();
        (0..50u64).all(|i| {
            let request = t * 1000 + i;
            let deadline = within(Duration::from_secs(10));
            let answer = combiner.submit((t % 2) as u8, request, deadline, doubled);
            answer.is_ok_and(|a| a == request * 2)
        })
    };
    thread::scope(|scope| {
        let callers: Vec<_> = (0..32u64).map(|t| scope.spawn(move || caller(t))).collect();
        for handle in callers {
            assert!(handle.join().unwrap_or(false));
        }
    });
    let stats = combiner.stats();
    assert_eq!(stats.requests, 32 * 50);
    assert!(stats.batches < stats.requests, "{stats:?}");
    assert!(
        stats.largest_batch > 1 && stats.largest_batch <= 64,
        "{stats:?}"
    );
    assert!(lock(&combiner.lanes).is_empty(), "lanes left behind");
}

#[test]
fn a_queued_caller_times_out_without_being_sent_and_the_lane_recovers() {
    let combiner = Arc::new(Doubler::new(1));
    let sent = Arc::new(AtomicUsize::new(0));
    let (running, started_running) = std::sync::mpsc::channel::<()>();
    let slow = {
        let (combiner, sent) = (combiner.clone(), sent.clone());
        thread::spawn(move || {
            combiner.submit(0, 1, within(Duration::from_secs(10)), |_, requests, _| {
                sent.fetch_add(requests.len(), Ordering::SeqCst);
                let _ = running.send(());
                thread::sleep(Duration::from_millis(300));
                Ok(requests.into_iter().map(Ok).collect())
            })
        })
    };
    // The slow batch runs (holding the key's turn) before the late caller comes.
    assert!(started_running
        .recv_timeout(Duration::from_secs(10))
        .is_ok());
    let started = Instant::now();
    let late = combiner.submit(0, 2, within(Duration::from_millis(20)), |_, requests, _| {
        sent.fetch_add(requests.len(), Ordering::SeqCst);
        Ok(requests.into_iter().map(Ok).collect())
    });
    assert!(matches!(late, Err(Error::Timeout { .. })), "{late:?}");
    assert!(started.elapsed() < Duration::from_millis(250));
    assert!(matches!(slow.join().map_err(|_| ()), Ok(Ok(1))));
    assert_eq!(
        sent.load(Ordering::SeqCst),
        1,
        "the timed-out request was sent"
    );
    assert_eq!(
        combiner
            .submit(0, 3, within(Duration::from_secs(1)), doubled)
            .ok(),
        Some(6)
    );
}

/// A batch is counted as it is formed, while it runs; its requests once they are answered.
#[test]
fn a_running_batch_is_counted_and_its_requests_once_answered() {
    let combiner = Arc::new(Doubler::new(8));
    let (running, started_running) = std::sync::mpsc::channel::<()>();
    let (finish, finished) = std::sync::mpsc::channel::<()>();
    let batch = {
        let combiner = combiner.clone();
        thread::spawn(move || {
            combiner.submit(0, 1, within(Duration::from_secs(10)), |_, requests, _| {
                let _ = running.send(());
                let _ = finished.recv_timeout(Duration::from_secs(10));
                Ok(requests.into_iter().map(Ok).collect())
            })
        })
    };
    assert!(started_running
        .recv_timeout(Duration::from_secs(10))
        .is_ok());
    let during = combiner.stats();
    assert_eq!(
        (during.batches, during.largest_batch, during.requests),
        (1, 1, 0),
        "{during:?}"
    );
    let _ = finish.send(());
    assert!(matches!(batch.join().map_err(|_| ()), Ok(Ok(1))));
    let after = combiner.stats();
    assert_eq!(
        (after.batches, after.largest_batch, after.requests),
        (1, 1, 1),
        "{after:?}"
    );
}

/// The requests of one batch and the deadline it ran by.
type Seen = (Vec<u64>, Deadline);

/// A first batch of key 0 (request 1, answered 1) that runs until the returned sender sends:
/// requests submitted meanwhile queue for the next batch.
fn a_batch_held_open(
    combiner: &Arc<Doubler>,
) -> (thread::JoinHandle<Result<u64>>, std::sync::mpsc::Sender<()>) {
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let release_rx = Mutex::new(release_rx);
    let first = {
        let combiner = combiner.clone();
        thread::spawn(move || {
            combiner.submit(0, 1, within(Duration::from_secs(10)), |_, requests, _| {
                let _ = started_tx.send(());
                let _ = lock(&release_rx).recv();
                Ok(requests.into_iter().map(Ok).collect())
            })
        })
    };
    assert!(started_rx.recv().is_ok(), "first batch running");
    (first, release_tx)
}

/// Submits `requests` one after another (each once `combiner` counts the one before queued, so
/// that they queue in order) behind the batch held open by `first`, then lets that batch end;
/// their answers, in order.
fn queued_behind(
    combiner: &Doubler,
    first: thread::JoinHandle<Result<u64>>,
    release: std::sync::mpsc::Sender<()>,
    requests: impl IntoIterator<Item = (u64, Deadline)>,
    submit: impl Fn(u64, Deadline) -> thread::JoinHandle<Result<u64>>,
) -> Vec<Result<u64>> {
    let queued: Vec<_> = (requests.into_iter().enumerate())
        .map(|(before, (request, deadline))| {
            let handle = submit(request, deadline);
            // Queued before the next one and before the first batch ends (a liveness guard of
            // 20 s; a 50 ms sleep used to stand for it).
            let since = std::time::Instant::now();
            while combiner.stats().queued <= before && since.elapsed() < Duration::from_secs(20) {
                thread::sleep(Duration::from_millis(1));
            }
            handle
        })
        .collect();
    assert!(release.send(()).is_ok(), "release");
    assert!(matches!(first.join().map_err(|_| ()), Ok(Ok(1))));
    queued
        .into_iter()
        .map(|handle| {
            handle
                .join()
                .unwrap_or_else(|_| Err(Error::internal("a caller panicked")))
        })
        .collect()
}

#[test]
fn a_batch_runs_by_its_earliest_deadline_and_expired_requests_are_not_sent() {
    let combiner = Arc::new(Doubler::new(8));
    let (first, release_tx) = a_batch_held_open(&combiner);
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let submit = |request: u64, deadline: Deadline| {
        let (combiner, seen) = (combiner.clone(), seen.clone());
        thread::spawn(move || {
            combiner.submit(0, request, deadline, move |_, requests, batch| {
                lock(&seen).push((requests.clone(), batch));
                Ok(requests.into_iter().map(|r| Ok(r * 2)).collect())
            })
        })
    };
    let late = within(Duration::from_secs(9));
    let early = within(Duration::from_secs(5));
    let answers: Vec<_> = queued_behind(
        &combiner,
        first,
        release_tx,
        [(2, late), (3, early)],
        submit,
    )
    .into_iter()
    .map(|r| r.map_err(|_| ()))
    .collect();
    assert_eq!(answers, vec![Ok(4), Ok(6)]);
    assert_eq!(*lock(&seen), vec![(vec![2, 3], early)]);

    // An expired request is answered Timeout and never sent.
    let expired = combiner.submit(0, 7, within(Duration::ZERO), |_, requests, _| {
        panic!("sent an expired request: {requests:?}")
    });
    assert!(matches!(expired, Err(Error::Timeout { .. })), "{expired:?}");
    assert!(lock(&combiner.lanes).is_empty(), "lanes left behind");
}

/// A refusal as the runner gives up with it after `attempts` transactions.
fn contended(attempts: u32) -> Error {
    Error::Contended {
        attempts,
        elapsed: Duration::from_millis(1),
        last: crate::error::ServerError::new(diesel::result::Error::DatabaseError(
            diesel::result::DatabaseErrorKind::Unknown,
            Box::new(String::from(
                "Lock wait timeout exceeded; try restarting transaction",
            )),
        )),
    }
}

/// Requests 2 (leading), 3 (the earliest deadline) and 4 queued behind a batch held open,
/// combined with give-backs as `Combining` does (at most `max_attempts` spent per request);
/// every batch that `fails` gives up with `failure`. The answers (`Ok` or the error's kind)
/// and the batches run.
fn given_back_behind_a_batch(
    failure: fn() -> Error,
    max_attempts: u32,
    fails: fn(&[u64]) -> bool,
) -> (Vec<std::result::Result<u64, &'static str>>, Vec<Vec<u64>>) {
    let combiner = Arc::new(Doubler::new(8));
    let (first, release_tx) = a_batch_held_open(&combiner);
    let seen: Arc<Mutex<Vec<Vec<u64>>>> = Arc::default();
    let submit = |request: u64, deadline: Deadline| {
        let (combiner, seen) = (combiner.clone(), seen.clone());
        thread::spawn(move || {
            let spent = within_attempts(max_attempts, false);
            let again = Again {
                copy: &u64::clone,
                spent: &spent,
            };
            let run = |_: &u8, requests: Vec<u64>, _: Deadline, ()| {
                lock(&seen).push(requests.clone());
                let outcome = if fails(&requests) {
                    Err(failure())
                } else {
                    Ok(requests.into_iter().map(|r| Ok(r * 2)).collect())
                };
                Ran {
                    outcome,
                    refused: false,
                }
            };
            combiner.submit_observed(0, request, deadline, Some(&again), true, |_, _| (), run)
        })
    };
    let deadlines =
        [(2, 9), (3, 5), (4, 9)].map(|(r, secs)| (r, within(Duration::from_secs(secs))));
    let answers = queued_behind(&combiner, first, release_tx, deadlines, submit)
        .into_iter()
        .map(|answer| match answer {
            Ok(answer) => Ok(answer),
            Err(Error::Timeout { .. }) => Err("timeout"),
            Err(Error::Contended { .. }) => Err("contended"),
            Err(Error::ServerUnresponsive { .. }) => Err("unresponsive"),
            Err(_) => Err("other"),
        })
        .collect();
    let batches = lock(&seen).clone();
    assert!(lock(&combiner.lanes).is_empty(), "lanes left behind");
    (answers, batches)
}

#[test]
fn a_batch_that_gives_up_by_an_earlier_deadline_runs_the_later_requests_again() {
    // Before: the later requests got the batch's error with most of their time left.
    let with_3 = |requests: &[u64]| requests.contains(&3);
    let (answers, batches) = given_back_behind_a_batch(
        || Error::Timeout {
            elapsed: Duration::from_millis(1),
        },
        64,
        with_3,
    );
    assert_eq!(answers, vec![Ok(4), Err("timeout"), Ok(8)]);
    assert_eq!(batches, vec![vec![2, 3, 4], vec![2, 4]]);
    let (answers, batches) = given_back_behind_a_batch(|| contended(3), 64, with_3);
    assert_eq!(answers, vec![Ok(4), Err("contended"), Ok(8)]);
    assert_eq!(batches, vec![vec![2, 3, 4], vec![2, 4]]);
    // Cut by the watchdog at the batch's deadline plus grace (a server that stopped
    // answering; no COMMIT sent): the callers of later deadlines would still be waiting
    // alone. Before, over a pool, every caller was answered the cut.
    let (answers, batches) = given_back_behind_a_batch(
        || Error::ServerUnresponsive {
            elapsed: Duration::from_millis(1),
        },
        64,
        with_3,
    );
    assert_eq!(answers, vec![Ok(4), Err("unresponsive"), Ok(8)]);
    assert_eq!(batches, vec![vec![2, 3, 4], vec![2, 4]]);
}

#[test]
fn a_batch_that_used_up_its_attempts_answers_everyone() {
    // The runner gave up by its attempts, not by the deadline: every single call would too.
    let with_3 = |requests: &[u64]| requests.contains(&3);
    let (answers, batches) = given_back_behind_a_batch(|| contended(64), 64, with_3);
    assert_eq!(answers, vec![Err("contended"); 3]);
    assert_eq!(batches, vec![vec![2, 3, 4]]);
    // Attempts spent by earlier batches count: every batch gives up after 40 attempts; request
    // 4, given back once (40 spent), is not given back again (80 would pass 64) — without the
    // count it would run alone in a third batch.
    let (answers, batches) = given_back_behind_a_batch(|| contended(40), 64, |_| true);
    assert_eq!(answers, vec![Err("contended"); 3]);
    assert_eq!(batches, vec![vec![2, 3, 4], vec![2, 4]]);
}

#[test]
fn a_failed_batch_answers_everyone_with_the_typed_error() {
    let combiner = Doubler::new(8);
    let failed = combiner.submit(0, 1, within(Duration::from_secs(1)), |_, _, _| {
        Err(Error::Timeout {
            elapsed: Duration::from_millis(1),
        })
    });
    assert!(matches!(failed, Err(Error::Timeout { .. })));
    let short = combiner.submit(0, 1, within(Duration::from_secs(1)), |_, _, _| {
        Ok(Vec::new())
    });
    assert!(matches!(short, Err(Error::Internal { .. })), "{short:?}");
    assert_eq!(
        combiner
            .submit(0, 4, within(Duration::from_secs(1)), doubled)
            .ok(),
        Some(8)
    );
}

#[test]
fn a_panicking_batch_does_not_wedge_the_lane() {
    let combiner = Arc::new(Doubler::new(8));
    let c = combiner.clone();
    let panicked = thread::spawn(move || {
        c.submit(
            0,
            1,
            within(Duration::from_secs(1)),
            |_, _, _| -> Result<Vec<Result<u64>>> { panic!("batch bug") },
        )
    })
    .join();
    assert!(panicked.is_err());
    assert_eq!(
        combiner
            .submit(0, 5, within(Duration::from_secs(1)), doubled)
            .ok(),
        Some(10)
    );
}

/// A batch run that reports a refusal of the hot row (as another process's batch causes).
fn refused_doubled(_: &u8, requests: Vec<u64>, _: Deadline) -> Ran<u64> {
    Ran {
        outcome: Ok(requests.into_iter().map(|r| Ok(r * 2)).collect()),
        refused: true,
    }
}

fn calm_doubled(key: &u8, requests: Vec<u64>, deadline: Deadline) -> Ran<u64> {
    Ran {
        outcome: doubled(key, requests, deadline),
        refused: false,
    }
}

/// [`Combiner::submit_observed`] with nothing to prepare.
fn observed(
    combiner: &Doubler,
    key: u8,
    request: u64,
    deadline: Deadline,
    run: fn(&u8, Vec<u64>, Deadline) -> Ran<u64>,
) -> Result<u64> {
    combiner.submit_observed(
        key,
        request,
        deadline,
        None,
        true,
        |_, _| (),
        |k, r, d, ()| run(k, r, d),
    )
}

fn linger_of(combiner: &Doubler, key: u8) -> Option<Duration> {
    lock(&combiner.lanes).get(&key).map(|lane| lane.linger)
}

#[test]
fn a_refused_batch_makes_the_next_leaders_linger_and_calm_batches_end_it() {
    let combiner = Doubler::new(8);
    let deadline = || within(Duration::from_secs(5));
    assert_eq!(
        observed(&combiner, 0, 1, deadline(), refused_doubled).ok(),
        Some(2)
    );
    // Remembered while idle, doubled by every refused batch up to the cap.
    assert_eq!(linger_of(&combiner, 0), Some(LINGER_STEP));
    for _ in 0..8 {
        assert!(observed(&combiner, 0, 1, deadline(), refused_doubled).is_ok());
    }
    assert_eq!(linger_of(&combiner, 0), Some(LINGER_MAX));
    // Halved by every calm batch; the lane is forgotten once the linger is gone.
    assert!(observed(&combiner, 0, 3, deadline(), calm_doubled).is_ok());
    assert_eq!(linger_of(&combiner, 0), Some(LINGER_MAX / 2));
    for _ in 0..8 {
        assert_eq!(
            observed(&combiner, 0, 3, deadline(), calm_doubled).ok(),
            Some(6)
        );
    }
    assert_eq!(linger_of(&combiner, 0), None, "lane left behind");
    assert_eq!(combiner.stats().batches, 18);
}

/// A key's linger is forgotten [`LINGER_MEMORY`] after its last refused batch, also while the
/// key is idle: the first leader after that does not linger, and the idle lanes of keys that
/// never come again are swept out. Before the fix a lane kept its linger (and its place in the
/// map) for ever once its last batch was refused: 100 such keys left 100 lanes.
#[test]
fn an_idle_keys_linger_is_forgotten_and_its_lane_swept_out() {
    let combiner = Doubler::new(8);
    let deadline = || within(Duration::from_secs(5));
    for key in 0..100 {
        assert!(observed(&combiner, key, 1, deadline(), refused_doubled).is_ok());
    }
    assert_eq!(lock(&combiner.lanes).len(), 100);
    std::thread::sleep(LINGER_MEMORY + Duration::from_millis(100));
    let lanes = lock(&combiner.lanes);
    let lingers: Vec<Duration> = lanes
        .values()
        .map(|lane| lane.linger_for(deadline(), 8))
        .collect();
    drop(lanes);
    assert!(lingers.iter().all(Duration::is_zero), "{lingers:?}");
    assert!(observed(&combiner, 200, 1, deadline(), calm_doubled).is_ok());
    let left = lock(&combiner.lanes).len();
    assert!(left <= 1, "{left} lanes left behind");
}

/// A key whose linger was forgotten while idle starts again from the step at its next refused
/// batch, as a new key does. Before, the stored linger (here the cap) was doubled again.
#[test]
fn a_forgotten_linger_starts_again_from_the_step() {
    let combiner = Doubler::new(8);
    let deadline = || within(Duration::from_secs(5));
    for _ in 0..8 {
        assert!(observed(&combiner, 1, 1, deadline(), refused_doubled).is_ok());
    }
    assert_eq!(linger_of(&combiner, 1), Some(LINGER_MAX));
    std::thread::sleep(LINGER_MEMORY + Duration::from_millis(100));
    assert!(observed(&combiner, 1, 1, deadline(), refused_doubled).is_ok());
    assert_eq!(linger_of(&combiner, 1), Some(LINGER_STEP));
}

/// A batch whose last attempt the deadline cut through the server's statement limit is not
/// charged that attempt on the requests it gives back (their single calls would still be in
/// it), as one the deadline cut between the batch's statements is not.
#[test]
fn an_attempt_cut_by_the_statement_limit_is_not_charged() {
    let cut = |attempts| Error::Contended {
        attempts,
        elapsed: Duration::from_millis(200),
        last: crate::error::ServerError::new(diesel::result::Error::DatabaseError(
            diesel::result::DatabaseErrorKind::Unknown,
            Box::new("Query execution was interrupted (max_statement_time exceeded)".to_owned()),
        )),
    };
    let charge = within_attempts(2, false);
    assert_eq!(charge(&cut(1), 0), Some(0));
    assert_eq!(charge(&cut(2), 0), Some(1));
    assert_eq!(charge(&cut(3), 0), None);
}

#[test]
fn a_lingering_leader_stops_once_its_batch_is_as_large_as_the_usual_one() {
    let combiner = Doubler::new(8);
    let deadline = || within(Duration::from_secs(5));
    // One caller, every batch refused: the linger at its cap, the usual batch one request.
    for _ in 0..8 {
        assert!(observed(&combiner, 0, 1, deadline(), refused_doubled).is_ok());
    }
    assert_eq!(linger_of(&combiner, 0), Some(LINGER_MAX));
    // A batch that is full already (the one caller is queued) does not wait out the linger:
    // the median batch takes a fraction of it (one that lingered takes all of it; the median
    // is not moved by a few batches a busy machine delayed).
    let mut took: Vec<Duration> = (0..21)
        .map(|_| {
            let started = std::time::Instant::now();
            assert!(observed(&combiner, 0, 1, deadline(), refused_doubled).is_ok());
            started.elapsed()
        })
        .collect();
    took.sort_unstable();
    assert!(
        took[took.len() / 2] < LINGER_MAX / 2,
        "batches of the usual size took {took:?}: they lingered"
    );
}

#[test]
fn a_linger_never_takes_more_than_a_share_of_any_queued_deadline() {
    let mut lane: Lane<u64, u64> = Lane {
        linger: LINGER_MAX,
        ..Lane::default()
    };
    let slot = || Arc::new(Slot::new());
    let long = within(Duration::from_secs(5));
    assert_eq!(lane.linger_for(long, 4), LINGER_MAX);
    // A queued request with 800 µs left: the leader lingers at most an eighth of it.
    lane.queue
        .push_back((1, within(Duration::from_micros(800)), slot()));
    assert!(lane.linger_for(long, 4) <= Duration::from_micros(100));
    // A leader whose own deadline has passed, or a full batch: no linger at all.
    assert_eq!(lane.linger_for(within(Duration::ZERO), 4), Duration::ZERO);
    lane.queue.clear();
    for r in 0..4 {
        lane.queue.push_back((r, long, slot()));
    }
    assert_eq!(lane.linger_for(long, 4), Duration::ZERO);
}

#[test]
fn lingering_leaders_answer_every_caller_within_its_deadline() {
    let combiner = Doubler::new(64);
    let barrier = Barrier::new(16);
    thread::scope(|scope| {
        let callers: Vec<_> = (0..16u64)
            .map(|t| {
                let (combiner, barrier) = (&combiner, &barrier);
                scope.spawn(move || {
                    barrier.wait();
                    (0..20u64).all(|i| {
                        // Every batch "refused": the linger stays at its cap. An answer that
                        // is not `Timeout` came before the deadline (a waiter whose deadline
                        // passes before its batch is formed is answered `Timeout`).
                        // 300 ms: a linger (at most 2 ms here, and an eighth of the time left)
                        // never needs it, but a preempted leader on a loaded machine may.
                        let request = t * 100 + i;
                        let deadline = within(Duration::from_millis(300));
                        let answer = observed(combiner, 0, request, deadline, refused_doubled);
                        answer.is_ok_and(|a| a == request * 2)
                    })
                })
            })
            .collect();
        for caller in callers {
            assert!(
                caller.join().unwrap_or(false),
                "a caller timed out or got a wrong answer"
            );
        }
    });
    assert_eq!(combiner.stats().requests, 16 * 20);
}

#[test]
fn the_next_leader_prepares_while_the_batch_before_it_runs_and_batches_never_overlap() {
    use std::sync::atomic::AtomicBool;
    // More callers than a batch takes: one is always left queued to lead the next batch.
    let combiner = Doubler::new(4);
    let running = AtomicBool::new(false);
    let overlapped = AtomicBool::new(false);
    // Preparations that started while a batch of the key was running.
    let prepared_during_a_batch = AtomicUsize::new(0);
    let barrier = Barrier::new(8);
    thread::scope(|scope| {
        for t in 0..8u64 {
            let (combiner, barrier) = (&combiner, &barrier);
            let (running, overlapped) = (&running, &overlapped);
            let prepared_during_a_batch = &prepared_during_a_batch;
            scope.spawn(move || {
                barrier.wait();
                for i in 0..10u64 {
                    let request = t * 100 + i;
                    let answer = combiner.submit_observed(
                        0,
                        request,
                        within(Duration::from_secs(10)),
                        None,
                        true,
                        |_, _| {
                            if running.load(Ordering::SeqCst) {
                                prepared_during_a_batch.fetch_add(1, Ordering::SeqCst);
                            }
                            thread::sleep(Duration::from_millis(1));
                        },
                        |key, requests, deadline, ()| {
                            if running.swap(true, Ordering::SeqCst) {
                                overlapped.store(true, Ordering::SeqCst);
                            }
                            let outcome = doubled(key, requests, deadline);
                            thread::sleep(Duration::from_millis(3));
                            running.store(false, Ordering::SeqCst);
                            Ran {
                                outcome,
                                refused: false,
                            }
                        },
                    );
                    assert_eq!(answer.ok(), Some(request * 2));
                }
            });
        }
    });
    assert!(
        !overlapped.load(Ordering::SeqCst),
        "two batches of one key ran at once"
    );
    assert!(
        prepared_during_a_batch.load(Ordering::SeqCst) > 0,
        "no leader prepared while a batch ran: {:?}",
        combiner.stats()
    );
    assert_eq!(combiner.stats().requests, 80);
    assert!(lock(&combiner.lanes).is_empty(), "lanes left behind");
}

/// Through a router a batch that gave up by an earlier caller's deadline during a failover
/// (a node failure: the router waited for a writer until that deadline) gives the later
/// requests back, as their single calls would still wait for the new writer; over a pool, a
/// node failure (a lost connection) is every caller's answer, as it is the single call's — but
/// not a watchdog cut, which the batch's own deadline set off (see above).
#[test]
fn a_routed_batch_gives_back_requests_after_a_node_failure() {
    let lost = || {
        Error::Server(crate::ServerError::new(
            diesel::result::Error::DatabaseError(
                diesel::result::DatabaseErrorKind::Unknown,
                Box::new("Lost connection to server during query".to_owned()),
            ),
        ))
    };
    assert!(lost().is_node_failure(), "{:?}", lost());
    assert_eq!(within_attempts(5, true)(&lost(), 2), Some(2));
    assert_eq!(within_attempts(5, false)(&lost(), 2), None);
    assert_eq!(
        within_attempts(5, true)(&Error::NotDesignatedWriter, 0),
        Some(0)
    );
    // Not a node failure: answered through a router too.
    let refused = Error::InsufficientBalance {
        user_id: 1,
        available: rust_decimal::Decimal::ONE,
        requested: rust_decimal::Decimal::TEN,
    };
    assert_eq!(within_attempts(5, true)(&refused, 0), None);
}

std::thread_local! {
    /// How long a leader on this thread pauses between forming its batch and taking its
    /// requests (0: not at all).
    static PAUSE_AFTER_FORMING: std::cell::Cell<Duration> = const { std::cell::Cell::new(Duration::ZERO) };
}

/// The pause point of [`PAUSE_AFTER_FORMING`] in `lead`.
pub(super) fn after_forming() {
    let pause = PAUSE_AFTER_FORMING.with(std::cell::Cell::get);
    if !pause.is_zero() {
        thread::sleep(pause);
    }
}

#[test]
fn a_leader_whose_deadline_passes_as_it_forms_its_batch_is_not_held_by_a_later_callers() {
    let combiner = Arc::new(Doubler::new(64));
    // Runs by its deadline: gives up at once when it has passed, else works until it passes.
    let by_deadline = |_: &u8, requests: Vec<u64>, deadline: Deadline| {
        if deadline.is_expired() {
            return Err(Error::Timeout {
                elapsed: deadline.started().elapsed(),
            });
        }
        thread::sleep(deadline.remaining());
        Ok(requests.into_iter().map(Ok).collect())
    };
    // A first batch holds the key's turn for 200 ms.
    let first = {
        let combiner = combiner.clone();
        thread::spawn(move || {
            combiner.submit(0, 1, within(Duration::from_secs(5)), |_, requests, _| {
                thread::sleep(Duration::from_millis(200));
                Ok(requests.into_iter().map(Ok).collect())
            })
        })
    };
    thread::sleep(Duration::from_millis(50));
    // The leader of the next batch has until 300 ms; it gets the turn at 200 ms and pauses
    // 400 ms as it forms its batch (its deadline passes in the pause even where its thread
    // started a few hundred ms late), with a caller that has 2 s queued behind it.
    let leader = {
        let combiner = combiner.clone();
        thread::spawn(move || {
            PAUSE_AFTER_FORMING.with(|pause| pause.set(Duration::from_millis(400)));
            let started = Instant::now();
            let answer = combiner.submit(0, 2, within(Duration::from_millis(250)), by_deadline);
            (answer, started.elapsed())
        })
    };
    thread::sleep(Duration::from_millis(50));
    let later = {
        let combiner = combiner.clone();
        thread::spawn(move || combiner.submit(0, 3, within(Duration::from_secs(2)), by_deadline))
    };
    let Ok((answer, took)) = leader.join() else {
        panic!("the leader panicked");
    };
    assert!(matches!(answer, Err(Error::Timeout { .. })), "{answer:?}");
    // Before: the leader answered itself Timeout but ran the batch by the later caller's
    // deadline, and its caller waited for it (about 2 s).
    assert!(took < Duration::from_millis(1_000), "{took:?}");
    assert!(matches!(first.join().map_err(|_| ()), Ok(Ok(1))));
    // Its request goes back to the queue and runs by its own deadline.
    assert!(
        matches!(later.join().map_err(|_| ()), Ok(Ok(3))),
        "the later caller is answered by its own batch"
    );
}

/// A batch answer for request `request` whose key's lookup the batch's deadline cut short:
/// with `lookup`, a refused ledger request (finished by its caller, never given back); without,
/// one that runs again.
fn cut_short(request: u64, lookup: bool) -> Error {
    let lookup = lookup.then(|| {
        let key = format!("k{request}");
        let refused = crate::ledger::Request::plain(
            crate::records::EntryKind::Deduct,
            9,
            rust_decimal::Decimal::ONE,
            &key,
        );
        crate::ledger::KeyLookup::of(&refused, Error::AccountNotFound { user_id: 9 })
    });
    let timeout = Error::Timeout {
        elapsed: Duration::from_millis(1),
    };
    Error::unknown_after_refusal_by_deadline(timeout, lookup)
}

/// A batch that refused a ledger request and committed nothing (an account found missing ends
/// with a ROLLBACK), and could not look the request's key up by its earliest caller's deadline,
/// leaves the request to its caller to finish (the lookup its single call would still be
/// making), never to a later batch, which would decide it again; a request whose answer has no
/// such lookup runs again. Before: both ran again.
#[test]
fn a_cut_short_refusal_is_finished_by_its_caller_not_decided_again() {
    let combiner = Arc::new(Doubler::new(8));
    let (first, release_tx) = a_batch_held_open(&combiner);
    let seen: Arc<Mutex<Vec<Vec<u64>>>> = Arc::default();
    let submit = |request: u64, deadline: Deadline| {
        let (combiner, seen) = (combiner.clone(), seen.clone());
        thread::spawn(move || {
            let spent = within_attempts(64, false);
            let again = Again {
                copy: &u64::clone,
                spent: &spent,
            };
            let run = |_: &u8, requests: Vec<u64>, _: Deadline, ()| {
                let first = lock(&seen).is_empty();
                lock(&seen).push(requests.clone());
                let answers = requests
                    .into_iter()
                    .map(|r| match (first, r) {
                        (true, 3) => Err(cut_short(3, true)),
                        (true, 4) => Err(cut_short(4, false)),
                        (_, r) => Ok(r * 2),
                    })
                    .collect();
                Ran {
                    outcome: Ok(answers),
                    refused: false,
                }
            };
            combiner.submit_observed(0, request, deadline, Some(&again), true, |_, _| (), run)
        })
    };
    let deadlines =
        [(2, 5), (3, 9), (4, 9)].map(|(r, secs)| (r, within(Duration::from_secs(secs))));
    let answers = queued_behind(&combiner, first, release_tx, deadlines, submit);
    assert!(matches!(answers[0], Ok(4)), "{answers:?}");
    assert!(
        matches!(&answers[1], Err(e) if e.refused_then_cut().is_some_and(|c| c.lookup.is_some())),
        "{answers:?}"
    );
    assert!(matches!(answers[2], Ok(8)), "{answers:?}");
    assert_eq!(*lock(&seen), vec![vec![2, 3, 4], vec![4]]);
    assert!(lock(&combiner.lanes).is_empty(), "lanes left behind");
}

/// Set by the test below once its second caller is queued; the first leader's failed prime
/// waits for it.
static SECOND_QUEUED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// Armed by the test below: the hooks run (once each).
static PRIME_HOOKS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The hook after a leader's prime failed and its connection was given back.
pub(super) fn after_a_failed_prime() {
    if !PRIME_HOOKS.load(Ordering::SeqCst) {
        return;
    }
    let since = Instant::now();
    while !SECOND_QUEUED.load(Ordering::SeqCst) && since.elapsed() < Duration::from_secs(5) {
        thread::sleep(Duration::from_millis(1));
    }
}

/// The hook before a batch without a prepared connection checks one out: the next leader,
/// appointed as the batch was formed, checks its connection out first.
pub(super) fn before_an_unprepared_checkout() {
    if PRIME_HOOKS.swap(false, Ordering::SeqCst) {
        thread::sleep(Duration::from_millis(300));
    }
}

/// A leader whose prime fails (its pooled connection's session was killed) takes another
/// connection before the turn, so its batch never waits for the pool's last connection while
/// the next leader holds it and waits for the batch's turn. Before the fix the batch checked a
/// connection out only as it ran: with a pool of one, the next leader had it, and the batch
/// waited for it until its deadline (`Timeout`, nothing wrong with the server).
#[test]
fn a_leader_whose_prime_failed_holds_a_connection_before_the_turn() {
    let (url, mut admin) = crate::util::test_database("unit_combine_prime_failed");
    let ledger = BalanceLedger::new();
    for user in [1, 2] {
        assert!(ledger
            .charge(&mut admin, user, Decimal::TEN, &format!("seed-{user}"))
            .is_ok());
    }
    let policy = crate::TxnPolicy {
        retry: crate::RetryPolicy {
            deadline: Duration::from_secs(2),
            ..crate::RetryPolicy::default()
        },
        ..crate::TxnPolicy::default()
    };
    let Ok(pool) = Pool::builder()
        .max_size(1)
        .test_on_check_out(false)
        .build(ConnectionManager::<MysqlConnection>::new(&url))
    else {
        panic!("pool");
    };
    // The pool's one connection, killed while idle: the first leader's prime fails on it.
    let id: i64 = {
        let Ok(mut pooled) = pool.get() else {
            panic!("checkout");
        };
        let Ok(id) = diesel::select(diesel::dsl::sql::<diesel::sql_types::BigInt>(
            "CONNECTION_ID()",
        ))
        .get_result(&mut *pooled) else {
            panic!("connection id");
        };
        id
    };
    assert!(diesel::sql_query(format!("KILL CONNECTION {id}"))
        .execute(&mut admin)
        .is_ok());
    let combined = Arc::new(CombiningLedger::with_max_batch(
        pool,
        BalanceLedger::with_policy(policy),
        1,
    ));
    SECOND_QUEUED.store(false, Ordering::SeqCst);
    PRIME_HOOKS.store(true, Ordering::SeqCst);
    let first = {
        let combined = combined.clone();
        thread::spawn(move || combined.deduct(1, Decimal::ONE, "first"))
    };
    // The first caller leads (its request queued until its batch is formed, after its failed
    // prime); the second queues behind it on the same account.
    let queued = |count: usize| {
        let since = Instant::now();
        while combined.stats().queued < count {
            assert!(since.elapsed() < Duration::from_secs(5), "never queued");
            thread::sleep(Duration::from_millis(1));
        }
    };
    queued(1);
    let second = {
        let combined = combined.clone();
        thread::spawn(move || combined.deduct(1, Decimal::ONE, "second"))
    };
    queued(2);
    SECOND_QUEUED.store(true, Ordering::SeqCst);
    let first = first.join();
    let second = second.join();
    PRIME_HOOKS.store(false, Ordering::SeqCst);
    assert!(matches!(first, Ok(Ok(_))), "{first:?}");
    assert!(matches!(second, Ok(Ok(_))), "{second:?}");
}

/// Through a router, a batch's `OutcomeUnknown` behind a node failure (a coupon batch that met
/// a holder among its users and lost its connection before it could read which one: it applied
/// nothing) runs again with the requests the node failure left open, as their single calls run
/// again after it, while the answers found stand; where no later run answers such a request
/// better than "nothing applied" (the router gave up), it keeps that `OutcomeUnknown` — an
/// earlier call of it may have applied it. Before the fix the answer stood: every user of the
/// batch not found holding was answered `OutcomeUnknown`.
#[test]
fn a_routed_batch_runs_again_the_requests_a_node_failure_left_unknown() {
    let lost = Error::ConnectionBroken {
        source: crate::error::ServerError::new(diesel::result::Error::DatabaseError(
            diesel::result::DatabaseErrorKind::Unknown,
            Box::new("Lost connection to server during query".to_owned()),
        )),
    };
    let unknown = Error::unknown_after_refusal_by_deadline(lost.clone(), None);
    let refused = || Error::InvalidId {
        what: "user",
        id: -1,
    };
    let run = || -> Vec<Result<u64>> { vec![Err(unknown.clone()), Ok(7), Err(refused())] };
    let open = [0, 1, 2];

    // Through a router, before the deadline: the unknown runs again, the rest stand.
    let (mut kept, mut unknowns) = (vec![None, None, None], vec![None, None, None]);
    let failure = sort_routed(run(), &open, &mut kept, &mut unknowns, true);
    assert!(
        matches!(&failure, Some(Error::ConnectionBroken { .. })),
        "{failure:?}"
    );
    assert!(kept[0].is_none(), "runs again: {:?}", kept[0]);
    assert!(matches!(kept[1], Some(Ok(7))), "{:?}", kept[1]);
    assert!(
        matches!(kept[2], Some(Err(Error::InvalidId { .. }))),
        "{:?}",
        kept[2]
    );
    assert!(unknowns[0].as_ref().is_some_and(Error::is_outcome_unknown));
    // Its next run issues it: that answer. A run that only says that nothing was applied: the
    // earlier unknown.
    let issued = prefer_unknown(vec![Ok(3), Ok(7), Err(refused())], unknowns.clone());
    assert!(matches!(issued[0], Ok(3)), "{:?}", issued[0]);
    let cut = Error::Timeout {
        elapsed: Duration::from_millis(1),
    };
    let gave_up = prefer_unknown(
        vec![Err(cut.clone()), Ok(7), Err(refused())],
        unknowns.clone(),
    );
    assert!(
        gave_up[0].as_ref().is_err_and(Error::is_outcome_unknown),
        "{:?}",
        gave_up[0]
    );
    assert!(matches!(gave_up[2], Err(Error::InvalidId { .. })));
    // Marked with the last run's failure: the combiner judges a give-back by it. A last run
    // refused until its attempts ran out is not run again.
    let worn_out = prefer_unknown(vec![Err(contended(3)), Ok(7), Err(refused())], unknowns);
    let Err(unknown) = &worn_out[0] else {
        panic!("{:?}", worn_out[0]);
    };
    assert!(unknown.is_outcome_unknown(), "{unknown:?}");
    assert!(
        matches!(
            unknown.refused_then_cut().map(|cut| &cut.failure),
            Some(Error::Contended { .. })
        ),
        "{unknown:?}"
    );
    assert_eq!(within_attempts(3, true)(&contended(3), 0), None);

    // Not through a router (or past the deadline): every answer stands.
    let (mut kept, mut unknowns) = (vec![None, None, None], vec![None, None, None]);
    assert!(sort_routed(run(), &open, &mut kept, &mut unknowns, false).is_none());
    assert!(kept[0]
        .as_ref()
        .is_some_and(|a| a.as_ref().is_err_and(Error::is_outcome_unknown)));
    assert!(unknowns.iter().all(Option::is_none));
}

/// An expired hold's lookup that a lost connection (or a node out of the Primary component)
/// left unknown is handed to the source as a failure, so that a router blames the node — as it
/// does for the same call made through `Router::write` — while the answer stays the same
/// `OutcomeUnknown`; any other answer is the answer. Before the fix every answer but
/// `NestedTransaction` went to the router as an answer, and the writer was not blamed.
#[test]
fn an_expired_holds_lookup_lost_with_its_node_blames_the_node() {
    let lost = |text: &str| {
        Error::outcome_unknown(&Error::Server(crate::error::ServerError::new(
            diesel::result::Error::DatabaseError(
                diesel::result::DatabaseErrorKind::Unknown,
                Box::new(text.to_owned()),
            ),
        )))
    };
    for text in [
        "Lost connection to server during query",
        "WSREP has not yet prepared node for application use",
    ] {
        let unknown = lost(text);
        assert!(unknown.is_outcome_unknown());
        match for_the_source(Err(unknown)) {
            Err(e) => assert!(e.is_outcome_unknown(), "{e:?}"),
            Ok(answer) => panic!("{text}: handed to the router as an answer: {answer:?}"),
        }
    }
    assert!(matches!(
        for_the_source(Err(Error::NestedTransaction)),
        Err(Error::NestedTransaction)
    ));
    // Not the node's: answers.
    let refused = Error::HoldNotFound { hold_id: 7 };
    assert!(matches!(
        for_the_source(Err(refused)),
        Ok(Err(Error::HoldNotFound { .. }))
    ));
    let commit = lost("Deadlock found when trying to get lock");
    assert!(matches!(for_the_source(Err(commit)), Ok(Err(_))));
}

/// Requests 2 (leading), 3 (the earliest deadline, 800 ms) and 4 queued behind a batch held
/// open, their batches run through lockstock's runner (one INSERT per request) with every
/// COMMIT of a batch holding request 3 refused for certain — before the batch hands the key's
/// turn on (`after_pass` false: as a Galera-guarded COMMIT is refused) or after (as a
/// standalone server's). The answers, the batches run and the rows committed.
fn refused_commits_behind_a_batch(
    name: &str,
    after_pass: bool,
) -> (Vec<Result<u64>>, Vec<Vec<u64>>, Vec<i64>) {
    use diesel::connection::SimpleConnection;
    let (_, mut conn) = crate::util::test_database(name);
    assert!(conn
        .batch_execute("CREATE TABLE applied (id BIGINT PRIMARY KEY)")
        .is_ok());
    let conn = Arc::new(Mutex::new(conn));
    let combiner = Arc::new(Doubler::new(8));
    let (first, release_tx) = a_batch_held_open(&combiner);
    let seen: Arc<Mutex<Vec<Vec<u64>>>> = Arc::default();
    let submit = |request: u64, deadline: Deadline| {
        let (combiner, seen, conn) = (combiner.clone(), seen.clone(), conn.clone());
        thread::spawn(move || {
            let spent = within_attempts(crate::RetryPolicy::default().max_attempts, false);
            let again = Again {
                copy: &u64::clone,
                spent: &spent,
            };
            let run = |_: &u8, requests: Vec<u64>, deadline: Deadline, ()| {
                lock(&seen).push(requests.clone());
                if requests.contains(&3) {
                    crate::txn::tests::refuse_commits_until(Some((
                        Instant::now() + Duration::from_secs(10),
                        after_pass,
                    )));
                }
                let outcome = insert_each(&mut lock(&conn), &requests, deadline)
                    .map(|()| requests.iter().map(|r| Ok(r * 2)).collect());
                crate::txn::tests::refuse_commits_until(None);
                Ran {
                    outcome,
                    refused: false,
                }
            };
            combiner.submit_observed(0, request, deadline, Some(&again), true, |_, _| (), run)
        })
    };
    let deadlines =
        [(2, 4_000), (3, 800), (4, 4_000)].map(|(r, ms)| (r, within(Duration::from_millis(ms))));
    let answers = queued_behind(&combiner, first, release_tx, deadlines, submit);
    let seen = lock(&seen).clone();
    let applied = applied_rows(&mut lock(&conn));
    (answers, seen, applied)
}

/// One transaction through lockstock's runner, by `deadline`: a row of `applied` per request.
fn insert_each(
    conn: &mut diesel::MysqlConnection,
    requests: &[u64],
    deadline: Deadline,
) -> Result<()> {
    TxnRunner::default().run_by(conn, deadline, |c| {
        for id in requests {
            diesel::sql_query("INSERT INTO applied VALUES (?)")
                .bind::<diesel::sql_types::BigInt, _>(i64::try_from(*id).unwrap_or(0))
                .execute(c)?;
        }
        Ok(())
    })
}

/// The ids in `applied`, in order.
fn applied_rows(conn: &mut diesel::MysqlConnection) -> Vec<i64> {
    let Ok(applied) =
        diesel::dsl::sql::<diesel::sql_types::BigInt>("SELECT id FROM applied ORDER BY id")
            .load::<i64>(conn)
    else {
        panic!("the applied rows");
    };
    applied
}

/// A batch whose COMMIT was refused for certain before it handed the key's turn on (a Galera
/// certification conflict; here every COMMIT until past its deadline: nothing committed) and
/// which then gives up by an earlier caller's deadline gives its callers with later deadlines
/// back to the queue, as a batch that never sent a COMMIT does: their single calls would still
/// be retrying. Before the fix the COMMIT sent marked the batch as maybe committed for good,
/// and every caller got its error. One refused after it handed the turn on gives nothing back
/// (the next batch has formed: what it put back would run after newer requests) — and still
/// answers its own error, never `OutcomeUnknown`.
#[test]
fn a_batch_whose_commit_was_refused_gives_back_its_later_callers() {
    let given_up = |answer: &Result<u64>| {
        matches!(answer, Err(Error::Timeout { .. } | Error::Contended { .. }))
    };
    let (answers, seen, applied) =
        refused_commits_behind_a_batch("unit_combine_commit_refused", false);
    assert!(matches!(answers[0], Ok(4)), "{:?}", answers[0]);
    assert!(given_up(&answers[1]), "{:?}", answers[1]);
    assert!(matches!(answers[2], Ok(8)), "{:?}", answers[2]);
    assert_eq!(seen, vec![vec![2, 3, 4], vec![2, 4]]);
    assert_eq!(
        applied,
        vec![2, 4],
        "only the batch that ran again committed"
    );

    let (answers, seen, applied) =
        refused_commits_behind_a_batch("unit_combine_commit_refused_passed", true);
    assert!(answers.iter().all(given_up), "{answers:?}");
    assert_eq!(seen, vec![vec![2, 3, 4]]);
    assert!(applied.is_empty(), "{applied:?}");
}

/// A batch that committed one transaction and then had another's COMMIT refused for certain
/// has still committed: where it fails to answer its callers it answers `OutcomeUnknown`, never
/// `Internal` — the refusal takes back only its own COMMIT.
#[test]
fn a_batch_that_committed_before_a_refused_commit_stays_committed() {
    use diesel::connection::SimpleConnection;
    let (_, mut conn) = crate::util::test_database("unit_combine_commit_then_refused");
    assert!(conn
        .batch_execute("CREATE TABLE applied (id BIGINT PRIMARY KEY)")
        .is_ok());
    let conn = Mutex::new(conn);
    let combiner = Doubler::new(8);
    let answer = combiner.submit(0, 1, within(Duration::from_secs(5)), |_, _, _| {
        let mut conn = lock(&conn);
        insert_each(&mut conn, &[1], within(Duration::from_secs(5)))?;
        crate::txn::tests::refuse_commits_until(Some((
            Instant::now() + Duration::from_secs(10),
            false,
        )));
        let refused = insert_each(&mut conn, &[2], within(Duration::from_millis(300)));
        crate::txn::tests::refuse_commits_until(None);
        assert!(refused.is_err(), "{refused:?}");
        Ok(Vec::new())
    });
    assert!(
        matches!(answer, Err(Error::OutcomeUnknown { .. })),
        "{answer:?}"
    );
    assert_eq!(applied_rows(&mut lock(&conn)), vec![1]);
}
