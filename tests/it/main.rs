//! lockstock's integration tests against a real server, as one test binary with a module per
//! component (one binary links diesel and the client library once, and its tests run in
//! parallel threads on one shared throwaway server; every test uses its own database).
//! The shared tooling lives in `lockstock-testkit` (fixtures, rng, workload).
//!
//! `cargo test --test it ledger::` runs one component.

mod combine;
mod coupon;
mod faults;
mod foundation;
mod galera;
mod galera_router;
mod holds;
mod ledger;
mod model;
mod processes;
mod review_coupon;
mod review_ledger;
mod review_runner;
mod silent;

/// What [`watch_first`] reports of the statement it watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Watched {
    /// The statement was sent.
    Sent,
    /// Its answer came (a result or an error).
    Answered,
}

/// Reports on the returned channel when `conn` sends the first statement whose SQL `picks`, and
/// when that statement's answer comes (Diesel's instrumentation hook, which this replaces on
/// `conn`; later statements are not reported).
fn watch_first(
    conn: &mut diesel::MysqlConnection,
    picks: impl Fn(&str) -> bool + Send + 'static,
) -> std::sync::mpsc::Receiver<Watched> {
    use diesel::connection::{Connection, InstrumentationEvent};
    let (sender, watched) = std::sync::mpsc::channel();
    let mut state = None;
    conn.set_instrumentation(
        move |event: InstrumentationEvent<'_>| match (event, state) {
            (InstrumentationEvent::StartQuery { query, .. }, None) if picks(&query.to_string()) => {
                state = Some(Watched::Sent);
                let _ = sender.send(Watched::Sent);
            }
            (InstrumentationEvent::FinishQuery { .. }, Some(Watched::Sent)) => {
                state = Some(Watched::Answered);
                let _ = sender.send(Watched::Answered);
            }
            _ => {}
        },
    );
    watched
}

/// A new connection to `url` whose session is killed ([`kill_at_statement`]) as it sends its
/// `n`-th lock-free snapshot (`START TRANSACTION WITH CONSISTENT SNAPSHOT`): e.g. the 2nd, the
/// key's lookup after a refusal where a call read its row lock-free first.
fn killed_at_snapshot(url: &str, n: usize) -> diesel::MysqlConnection {
    let mut conn = lockstock_testkit::fixtures::connect(url);
    let mut snapshots = 0;
    kill_at_statement(&mut conn, url, move |sql| {
        if sql.contains("CONSISTENT SNAPSHOT") {
            snapshots += 1;
        }
        snapshots == n
    });
    conn
}

/// Kills `conn`'s session (`KILL CONNECTION` from a connection of its own to `url`) as the
/// first statement that `picks` picks starts, before it is sent: that statement and every one
/// after it fail as on a lost connection (Diesel's instrumentation hook, which this replaces on
/// `conn`; `picks` sees each statement's SQL until it first says yes).
fn kill_at_statement(
    conn: &mut diesel::MysqlConnection,
    url: &str,
    mut picks: impl FnMut(&str) -> bool + Send + 'static,
) {
    use diesel::connection::{Connection, InstrumentationEvent, SimpleConnection};
    let id = lockstock_testkit::fixtures::connection_id(conn);
    let mut killer = lockstock_testkit::fixtures::connect(url);
    let mut fired = false;
    conn.set_instrumentation(move |event: InstrumentationEvent<'_>| {
        if let InstrumentationEvent::StartQuery { query, .. } = event {
            if !fired && picks(&query.to_string()) {
                fired = true;
                killer
                    .batch_execute(&format!("KILL CONNECTION {id}"))
                    .expect("kill the session");
            }
        }
    });
}

/// Waits until the statement that `watched` ([`watch_first`]) watches on session `id` was
/// sent, and then until either its answer came or it waits for a row lock (`INNODB_TRX`, read
/// on `admin`): the statement has met whatever lock it meets. A liveness guard of 20 s, not a
/// timed assertion. Tests order another program's next step after it, instead of a sleep that
/// a loaded machine can outrun.
fn until_answered_or_waiting(
    admin: &mut diesel::MysqlConnection,
    id: i64,
    watched: &std::sync::mpsc::Receiver<Watched>,
) -> Watched {
    use std::time::{Duration, Instant};
    let started = Instant::now();
    let sent = watched.recv_timeout(Duration::from_secs(20));
    assert_eq!(sent, Ok(Watched::Sent), "the statement was never sent");
    loop {
        if let Ok(answered) = watched.try_recv() {
            return answered;
        }
        if waits_for_row_lock(admin, id) {
            return Watched::Sent;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the statement neither answered nor waited for a lock"
        );
    }
}

/// Whether connection `id` waits for a row lock. InnoDB refreshes the `INNODB_TRX` table only
/// when it has not been read for 100 ms, so this pauses that long before reading it.
fn waits_for_row_lock(admin: &mut diesel::MysqlConnection, id: i64) -> bool {
    use diesel::prelude::*;
    #[derive(QueryableByName)]
    struct Waiting {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    std::thread::sleep(std::time::Duration::from_millis(150));
    diesel::sql_query(
        "SELECT COUNT(*) AS n FROM information_schema.INNODB_TRX \
         WHERE trx_mysql_thread_id = ? AND trx_state = 'LOCK WAIT'",
    )
    .bind::<diesel::sql_types::BigInt, _>(id)
    .get_result::<Waiting>(admin)
    .expect("INNODB_TRX")
    .n > 0
}

/// Sets its flag when dropped: created inside a `thread::scope` closure whose threads run until
/// the flag is set, it stops them also when the closure panics (the scope waits for its threads
/// before the panic goes on: without it a failed step — a server that does not come back — left
/// the threads running and the test hanging for ever).
struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A `thread::scope` closure that panics with [`StopOnDrop`] in it stops its threads, and the
/// panic comes out of the scope; without the guard (as the crash test was when its restarted
/// server failed to start) the scope waits for them for ever.
#[test]
fn a_scope_that_panics_stops_its_threads() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let (done, ended) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let stop = AtomicBool::new(false);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            std::thread::scope(|s| {
                let _stop_on_drop = StopOnDrop(&stop);
                s.spawn(|| {
                    while !stop.load(Ordering::SeqCst) {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                });
                panic!("a step of the test failed");
            })
        }));
        let _ = done.send(outcome.is_err());
    });
    assert_eq!(
        ended.recv_timeout(std::time::Duration::from_secs(10)),
        Ok(true),
        "the scope did not end with the panic"
    );
}

/// A barrier that a failing party breaks: a party whose thread panics (holding the guard of
/// [`party`](Gate::party)) wakes the others, which then panic too instead of waiting for it for
/// ever (`std::sync::Barrier` waits for ever for a party that never comes).
struct Gate {
    parties: usize,
    /// (parties arrived in this generation, generation, broken)
    state: std::sync::Mutex<(usize, u64, bool)>,
    changed: std::sync::Condvar,
}

impl Gate {
    fn new(parties: usize) -> Self {
        Self {
            parties,
            state: std::sync::Mutex::new((0, 0, false)),
            changed: std::sync::Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (usize, u64, bool)> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Waits until every party has come (panics if one failed instead).
    fn wait(&self) {
        let mut state = self.lock();
        assert!(!state.2, "another party of the gate failed");
        state.0 += 1;
        if state.0 == self.parties {
            state.0 = 0;
            state.1 += 1;
            self.changed.notify_all();
            return;
        }
        let generation = state.1;
        while state.1 == generation && !state.2 {
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        assert!(!state.2, "another party of the gate failed");
    }

    /// The calling thread's membership: breaks the gate if the thread panics while holding it.
    fn party(&self) -> GateParty<'_> {
        GateParty(self)
    }
}

/// See [`Gate::party`].
struct GateParty<'a>(&'a Gate);

impl Drop for GateParty<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.lock().2 = true;
            self.0.changed.notify_all();
        }
    }
}

/// A party of a [`Gate`] that fails before the others come breaks it: they panic instead of
/// waiting for ever.
#[test]
fn a_gate_whose_party_fails_lets_the_others_go() {
    let gate = Gate::new(3);
    let (done, ended) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let failed = std::thread::scope(|s| {
            let waiting: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| {
                        let _party = gate.party();
                        gate.wait();
                    })
                })
                .collect();
            let failing = s.spawn(|| {
                let _party = gate.party();
                panic!("a step before the gate failed");
            });
            let failing = failing.join().is_err();
            failing && waiting.into_iter().all(|w| w.join().is_err())
        });
        let _ = done.send(failed);
    });
    assert_eq!(
        ended.recv_timeout(std::time::Duration::from_secs(10)),
        Ok(true),
        "the other parties did not come out of the gate"
    );
}
