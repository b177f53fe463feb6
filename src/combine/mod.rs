//! Request combining for hot rows: many concurrent callers, one transaction.
//!
//! On one hot row every request waits for the one before it, so per-request transactions top
//! out at 1 / (lock hold time), and NOWAIT turns the waiting into refusals and retries. A
//! [`Combiner`] queues concurrent requests per hot key (a campaign, an account); the first caller
//! becomes the *leader*, takes everything queued meanwhile (up to a batch limit), runs ONE batch
//! transaction on one pooled connection ([`CouponIssuer::issue_many`],
//! [`BalanceLedger::apply_many`]) and hands every caller its own result. Callers that arrive
//! while a batch runs queue up for the next one; as the leader forms its batch it hands
//! leadership to the oldest waiter left, and once its callers are answered it returns.
//! Synchronous: threads and a condition variable, no runtime.
//!
//! The row is still locked with `FOR UPDATE NOWAIT` inside SERIALIZABLE; one batch per key runs
//! its statements at a time (it holds the key's *turn* until it sends COMMIT — a batch of the
//! generic [`Combiner`], whose `run_batch` may commit more than once, until it returns), so
//! batches of one key wait for each other in the process, not in the server.
//!
//! Pipelined: the leader of the next batch is appointed when a batch is formed, and while that
//! batch runs it checks its pooled connection out (r2d2's validity ping included) and opens its
//! transaction (`SET TRANSACTION ISOLATION LEVEL ...`, `BEGIN`: [`TxnRunner::prime`], on a
//! connection that carries lockstock's session settings, not on a Galera node). Only then does it
//! wait for the turn, form its batch from everything queued by that time, and send the batch's
//! statements. A batch hands the turn on as it sends its COMMIT, not when the COMMIT answers:
//! InnoDB releases the row lock when it commits in memory, before the redo log is flushed, so the
//! next batch locks the hot row while the one before it waits for its flush and its callers are
//! answered — two batches' flushes share one, and neither the flush nor the answers are on the hot
//! row's critical path. The next batch's `FOR UPDATE NOWAIT` can reach the server just before that
//! COMMIT does: such a refusal (only the statement is rolled back) is sent again at once (for at
//! most the wait budget below: a COMMIT the server holds back, e.g. during a backup's `BACKUP STAGE
//! BLOCK_COMMIT`, keeps the row locked as long as it lasts, and the batch is then refused as by any
//! other holder). A refusal while no batch of the key is committing — another process, or any other
//! transaction, holds the row — is waited out for at most 8 ms (or a quarter of the time the batch
//! has left) before the runner rolls back and retries as always ([`locking_read`](crate::txn)): a
//! ledger batch, whose account lock is its transaction's first lock, waits for the row in the
//! server (`SET STATEMENT max_statement_time = ... FOR SELECT ... FOR UPDATE`: the server hands it
//! the row as its holder commits, and a waiter that holds nothing cannot take part in a deadlock);
//! a coupon batch, which holds the coupons it inserted, polls with NOWAIT (50 to 150 µs apart), so
//! it never waits while holding rows — unless its issuer chose to wait for the stock row in the
//! server ([`StockRowWait::InServer`](crate::StockRowWait): no lockstock transaction that holds
//! a stock row waits for anything, so only another program's transaction can close a deadlock
//! with it; between processes it is faster). Between processes this raised a hot account's 4-process
//! throughput from 0.43-0.53 to about 0.6 of one process's, and halved its p99 (see the README
//! and `docs/performance-log.md`). At 64 clients the handoff halves the batches (about 31
//! requests instead of 54: the callers of one batch are still being answered when the next is
//! formed) and raises the requests per second (coupons 40,000 to 44,000-50,000 on the machine of
//! the README; see there). A prepared
//! transaction that its batch does not use (every request refused before a round trip) is rolled
//! back before the connection goes back to the pool. A failed batch transaction is retried by the
//! runner like any other; if it still fails before committing, every caller in it gets a copy of
//! the typed error (nothing applied, or for [`Error::OutcomeUnknown`] all or none). Once a batch
//! has committed, every caller gets its own answer; a batch that fails to give them (a panic, a
//! wrong number of answers) after sending a COMMIT that was not refused for certain answers
//! [`Error::OutcomeUnknown`], never [`Error::Internal`] (which promises that nothing was
//! committed).
//!
//! After a batch of a key met a refusal of another process, the key's next leaders linger before
//! forming their batch (from 200 µs, doubled per refused batch up to 2 ms, halved per calm one,
//! at most an eighth of the time any queued caller has left), and stop as soon as as many
//! requests are queued as the key's recent batches held: between processes a batch pays the
//! wait for the row once, so it should carry every request its process has.
//!
//! Each caller has ONE [`Deadline`], fixed when it submits, for everything its call goes through:
//! the queue, the pool checkout (`get_timeout` with the time left) and the batch transaction. A
//! batch runs by the earliest deadline of the requests in it, so it never outlives any of its
//! callers. When it gives up by that deadline without committing ([`Error::Contended`] with
//! attempts left, [`Error::Timeout`], [`Error::ServerUnresponsive`] — the watchdog cut it at
//! that deadline plus grace; through a [`Router`], also a node failure — the router waited for
//! a writer until that deadline), only the callers whose deadline it ran by are answered
//! so: a request with a later deadline (at least 10 ms left) goes back to the front of the
//! queue and runs in the next batch, as its single call would still be retrying — but not
//! where the batch handed the key's turn on at a COMMIT that was then refused (the next batch
//! has formed already: those callers get the batch's answer), and not
//! once the attempts spent on it have reached the policy's `max_attempts` (the batch it runs in
//! then may take up to `max_attempts` more: a batch counts its own). So does a request that a
//! batch that failed did not apply but could not answer for certain because the lookup of its
//! key (an earlier call may have recorded it) ran out of that deadline — alone it would answer
//! [`Error::OutcomeUnknown`], but its single call would still be trying (through a [`Router`],
//! so does one whose holder or key a node failure kept the batch from reading: its single call
//! runs again after the failure); once given back so, it
//! is never answered a failure that says nothing was applied, only that `OutcomeUnknown`. A
//! request that a ledger batch refused without writing it, whose key's lookup ran out of the
//! batch's deadline, is finished by its own caller instead (after a COMMIT the turn is the
//! next batch's, and a later batch would decide it again): the lookup its single call would
//! still be making, by its own deadline, on a connection of its own — the key's entry answers
//! it, else the refusal. A waiter whose deadline passes
//! before its request was taken into a batch is removed from the queue and gets
//! [`Error::Timeout`] — or, given back by a batch, that batch's error (so does a request found
//! expired when a batch is formed, and a leader whose own deadline has passed hands the
//! leadership on without running a batch); once taken, it waits for the batch's answer so no
//! outcome is lost.
//!
//! [`CouponIssuer::issue_many`]: crate::CouponIssuer::issue_many
//! [`BalanceLedger::apply_many`]: crate::BalanceLedger::apply_many
//! [`TxnRunner::prime`]: crate::txn::TxnRunner

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use diesel::mysql::MysqlConnection;
use diesel::r2d2::{ConnectionManager, Pool, PooledConnection};
use rust_decimal::Decimal;

use crate::coupon::{CouponIssuer, IssuedCoupon};
use crate::error::{Error, Result};
use crate::ledger::{AccountOp, BalanceLedger, Entry};
use crate::route::Router;
use crate::txn::{
    mark_broken, refusals_on_this_thread, watched, with_handoff, Deadline, Handoff, TxnRunner,
};
use turn::Turn;

/// An r2d2 pool of MySQL connections.
pub type MysqlPool = Pool<ConnectionManager<MysqlConnection>>;

/// Largest batch by default.
pub const DEFAULT_MAX_BATCH: usize = 256;

/// The first linger after a batch met a refusal.
const LINGER_STEP: Duration = Duration::from_micros(200);
/// The longest linger.
const LINGER_MAX: Duration = Duration::from_millis(2);
/// A linger is at most this fraction (1 / n) of the time the queued requests have left.
const LINGER_SHARE: u32 = 8;
/// How often a lingering leader looks whether its batch is full.
const LINGER_CHECK: Duration = Duration::from_micros(50);
/// The usual batch size of a lane forgets a larger batch by 1 / n per batch.
const USUAL_DECAY: usize = 16;
/// A lane's linger is forgotten this long after its last refused batch.
const LINGER_MEMORY: Duration = Duration::from_secs(1);
/// Idle lanes that remember a linger are swept out, at most once per [`LINGER_MEMORY`], as a
/// new key's lane is added while there are at least this many.
const SWEEP_AT_LEAST: usize = 64;

/// What one batch run returned to the core.
struct Ran<Resp> {
    /// One result per request, or a whole-batch error.
    outcome: Result<Vec<Result<Resp>>>,
    /// Whether the hot row was refused (and retried) during the run: another process's batch,
    /// or another path, held it.
    refused: bool,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

enum SlotState<Resp> {
    Queued,
    Taken,
    Lead,
    Done(Result<Resp>),
}

struct Slot<Resp> {
    state: Mutex<SlotState<Resp>>,
    changed: Condvar,
    /// For a request given back by batches that gave up ([`Again`]): the attempts they spent on
    /// it, and the error the last one gave up with — its answer if its deadline passes while it
    /// waits again, as its single call would answer after refusals.
    tried: Mutex<(u32, Option<Error>)>,
}

impl<Resp> Slot<Resp> {
    fn new() -> Self {
        Self {
            state: Mutex::new(SlotState::Queued),
            changed: Condvar::new(),
            tried: Mutex::new((0, None)),
        }
    }

    fn set(&self, state: SlotState<Resp>) {
        *lock(&self.state) = state;
        self.changed.notify_one();
    }

    /// `answer`, or — where a batch gave this request back because it could not look its key
    /// up by its deadline, or through a router because of a node failure
    /// ([`Error::refused_then_cut`]: an earlier call may have applied it) —
    /// that batch's [`Error::OutcomeUnknown`] instead of a later failure that would say that
    /// nothing was applied: its single call would only have gone on looking its key up, and
    /// never answered such a failure.
    fn settled(&self, answer: Result<Resp>) -> Result<Resp> {
        match answer {
            Err(failure) if failure.says_nothing_applied() => match &lock(&self.tried).1 {
                Some(unknown) if unknown.refused_then_cut().is_some() => Err(unknown.clone()),
                _ => Err(failure),
            },
            answer => answer,
        }
    }

    /// The answer of a request whose deadline passed before it was taken into a batch: the
    /// error a batch that gave it back gave up with, or [`Error::Timeout`].
    fn expired(&self, deadline: Deadline) -> Error {
        lock(&self.tried).1.take().unwrap_or(Error::Timeout {
            elapsed: deadline.elapsed(),
        })
    }
}

/// How a combiner runs a request again after its batch gave up by an earlier caller's deadline
/// (see [`Combining`]): a copy of the request is kept for it, and `spent` says whether the
/// error allows it — with the attempts spent on the request so far, the attempts spent then
/// (`None`: answer the error).
struct Again<'a, Req> {
    copy: &'a dyn Fn(&Req) -> Req,
    spent: &'a dyn Fn(&Error, u32) -> Option<u32>,
}

/// [`Again::spent`] for a policy of `max_attempts`: a request runs again after its batch gave
/// up by the deadline — [`Error::Timeout`], [`Error::Contended`] with attempts left, or
/// [`Error::ServerUnresponsive`] (the watchdog cut the batch at ITS deadline plus grace: a
/// later caller's single call would still be waiting; no COMMIT was sent, or the answer would
/// be [`Error::OutcomeUnknown`]), or (`routed`: through a [`Router`], which runs a single call
/// again after one until its deadline) a node failure — while the attempts spent on it stay
/// under `max_attempts`.
fn within_attempts(max_attempts: u32, routed: bool) -> impl Fn(&Error, u32) -> Option<u32> {
    let max_attempts = max_attempts.max(1);
    move |error, spent| match error {
        Error::Contended { attempts, last, .. } => {
            // An attempt the deadline cut through the server's statement limit is counted in
            // `attempts`; its requests' single calls would still be in it: not charged.
            let charged = if last.kind() == crate::ServerErrorKind::StatementTimeout {
                attempts.saturating_sub(1)
            } else {
                *attempts
            };
            let spent = spent.saturating_add(charged);
            (charged < max_attempts && spent < max_attempts).then_some(spent)
        }
        Error::Timeout { .. } | Error::ServerUnresponsive { .. } => Some(spent),
        error if routed && error.is_node_failure() => Some(spent),
        _ => None,
    }
}

/// Sorts one run of a batch's answers (`answers`, for the requests `open`) into those that stand
/// (`kept`) and those that run again, and returns the node failure to give the router for them
/// (`None`: every answer stands — also where `run_again` is false: not through a router, or past
/// the deadline).
///
/// A batch that failed before its commit answers a node failure to the requests it applied
/// nothing for, and keeps the answers it found without the hot row (a holder, a key found
/// applied, bad input). Through a router those requests run again on the writer, as their single
/// calls would (the node is blamed: the router sees the failure); the answers found stand — a
/// request found applied is never run again, never answered "nothing applied". After a commit
/// failures are `OutcomeUnknown`, never a node failure. A request that the batch answered
/// `OutcomeUnknown` only because a node failure kept it from looking up whether an earlier call
/// applied it (a holder among the users, a key in the journal, not known which:
/// [`Error::node_failure_behind`]) runs again too — the batch applied nothing, and its single
/// call would not have met that lookup — and that answer is kept aside in `unknown`, for a
/// later run that only says that nothing was applied ([`prefer_unknown`]).
fn sort_routed<Resp>(
    answers: Vec<Result<Resp>>,
    open: &[usize],
    kept: &mut [Option<Result<Resp>>],
    unknown: &mut [Option<Error>],
    run_again: bool,
) -> Option<Error> {
    let node_failure = answers
        .iter()
        .filter_map(|a| a.as_ref().err())
        .find_map(Error::node_failure_behind)
        .filter(|_| run_again)
        .cloned();
    for (&at, answer) in open.iter().zip(answers) {
        match answer {
            Err(e) if node_failure.is_some() && e.node_failure_behind().is_some() => {
                if e.is_outcome_unknown() {
                    unknown[at] = Some(e);
                }
            }
            answer => kept[at] = Some(answer),
        }
    }
    node_failure
}

/// An expired hold's lookup answer, for the source it ran on: an answer (`Ok`), or an `Err`
/// that the source acts on — someone else's transaction on a connection of the source
/// ([`Error::NestedTransaction`]: another connection), or an [`Error::OutcomeUnknown`] that a
/// lost connection or a node out of the Primary component caused (a [`Router`] blames the
/// node for it, as for the same call made through [`Router::write`], and answers it; the
/// answer is the same).
fn for_the_source(answer: Result<Entry>) -> Result<Result<Entry>> {
    match answer {
        Err(Error::NestedTransaction) => Err(Error::NestedTransaction),
        Err(unknown)
            if unknown.is_outcome_unknown()
                && matches!(
                    unknown.server_kind(),
                    Some(
                        crate::ServerErrorKind::ConnectionLost
                            | crate::ServerErrorKind::NodeNotReady
                    )
                ) =>
        {
            Err(unknown)
        }
        answer => Ok(answer),
    }
}

/// The answers of a routed batch's last run, where an earlier run answered a request
/// [`Error::OutcomeUnknown`] because of a node failure (`unknown`, by request) and the last
/// one only says that nothing was applied (it failed, or the router gave up): an
/// `OutcomeUnknown`, which says that an earlier call may have applied it — marked with the last
/// run's failure (as [`Error::unknown_after_refusal_by_deadline`] marks it), so that the
/// combiner judges whether to run it again by that failure (the attempts it spent, its
/// deadline), not by the node failure of the earlier run.
fn prefer_unknown<Resp>(
    answers: Vec<Result<Resp>>,
    unknown: Vec<Option<Error>>,
) -> Vec<Result<Resp>> {
    let mut unknown = unknown.into_iter();
    answers
        .into_iter()
        .map(|answer| match (answer, unknown.next().flatten()) {
            (Err(failure), Some(_)) if failure.says_nothing_applied() => {
                Err(Error::unknown_after_refusal_by_deadline(failure, None))
            }
            (answer, _) => answer,
        })
        .collect()
}

/// A request given back must have at least this much time left: with less, its single call
/// would be giving up too (its next backoff would not fit), and a batch run by it would be over
/// before it began.
const AGAIN_AT_LEAST: Duration = Duration::from_millis(10);

/// A queued request: the request, its caller's deadline, the caller's slot.
type Queued<Req, Resp> = (Req, Deadline, Arc<Slot<Resp>>);

struct Lane<Req, Resp> {
    queue: VecDeque<Queued<Req, Resp>>,
    /// A leader exists: a queued request's caller (the oldest, or the oldest behind requests a
    /// batch gave back), preparing its batch or waiting for
    /// the turn.
    leading: bool,
    /// Held by the batch of this key that is running (it holds, or is about to take, the hot
    /// row). The leader forms its batch only once the turn is free, so one batch per key runs
    /// at a time, and the leader's preparation overlaps the running batch.
    turn: Arc<Turn>,
    /// How long the next leader waits before it forms its batch (zero: not at all), and when
    /// a batch of this key last met a refusal.
    linger: Duration,
    refused_at: Option<Instant>,
    /// The size of this key's recent batches (the largest, decaying by 1 / [`USUAL_DECAY`] a
    /// batch): a lingering leader stops once that many requests are queued.
    usual: usize,
}

impl<Req, Resp> Default for Lane<Req, Resp> {
    fn default() -> Self {
        Self {
            queue: VecDeque::new(),
            leading: false,
            turn: Arc::default(),
            linger: Duration::ZERO,
            refused_at: None,
            usual: 0,
        }
    }
}

impl<Req, Resp> Lane<Req, Resp> {
    /// Adapts the linger to the last batch: doubled (from [`LINGER_STEP`], up to
    /// [`LINGER_MAX`]) when it met a refusal, halved (to zero below the step) when it did not.
    fn adapt(&mut self, refused: bool) {
        if refused {
            // A linger forgotten starts again from the step.
            if self.linger_forgotten() {
                self.linger = Duration::ZERO;
            }
            self.linger = (self.linger * 2).clamp(LINGER_STEP, LINGER_MAX);
            self.refused_at = Some(Instant::now());
        } else if self.linger > LINGER_STEP {
            self.linger /= 2;
        } else {
            self.linger = Duration::ZERO;
        }
    }

    /// Whether the lane can be forgotten: idle (no leader, no batch, nothing queued) and no
    /// linger worth remembering.
    fn forgettable(&self) -> bool {
        !self.leading
            && !self.turn.is_busy()
            && !self.turn.is_committing()
            && self.queue.is_empty()
            && (self.linger.is_zero() || self.refused_at.is_none() || self.linger_forgotten())
    }

    /// Whether the last refused batch is more than [`LINGER_MEMORY`] ago: its linger no longer
    /// counts, also for a lane kept since.
    fn linger_forgotten(&self) -> bool {
        self.refused_at
            .is_some_and(|at| at.elapsed() > LINGER_MEMORY)
    }

    /// How long a leader with `deadline` lingers now: the linger, at most a share of the time
    /// left to it and to every queued request; zero once the batch is full.
    fn linger_for(&self, deadline: Deadline, max_batch: usize) -> Duration {
        if self.linger.is_zero() || self.linger_forgotten() || self.queue.len() >= max_batch {
            return Duration::ZERO;
        }
        let least_left = self
            .queue
            .iter()
            .map(|(_, d, _)| d.remaining())
            .fold(deadline.remaining(), Duration::min);
        self.linger.min(least_left / LINGER_SHARE)
    }
}

/// Statistics of a combiner, for reports (it may gain fields: read them, build none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CombinerStats {
    /// Batches formed (one leader's run each), counted as each is formed, before it runs: a
    /// batch answered from memory (a campaign known to be sold out) counts without a
    /// transaction, and one the runner retried or a router ran again counts once.
    pub batches: u64,
    /// Requests answered through batches, counted as their batch answers them.
    pub requests: u64,
    /// Largest batch formed so far.
    pub largest_batch: usize,
    /// Requests waiting now, queued for a batch (not yet taken into one), over all keys.
    pub queued: usize,
}

/// The generic flat-combining core: per-key queues, one leader per key, one batch at a time.
pub struct Combiner<K, Req, Resp> {
    lanes: Mutex<HashMap<K, Lane<Req, Resp>>>,
    max_batch: usize,
    counts: Counts,
    /// When idle lanes were last swept out (a lane that remembers a linger stays after its last
    /// batch, and its key may never come again). Taken under `lanes`' lock.
    swept_at: Mutex<Instant>,
}

impl<K, Req, Resp> std::fmt::Debug for Combiner<K, Req, Resp> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Combiner")
            .field("max_batch", &self.max_batch)
            .field("stats", &self.snapshot())
            .finish_non_exhaustive()
    }
}

/// The counters behind [`CombinerStats`]: atomics, so that a leader counts its batch without a
/// lock.
#[derive(Default)]
struct Counts {
    batches: AtomicU64,
    requests: AtomicU64,
    largest_batch: AtomicUsize,
}

impl<K, Req, Resp> Combiner<K, Req, Resp> {
    /// The statistics now, with the requests queued.
    fn snapshot(&self) -> CombinerStats {
        let queued = lock(&self.lanes)
            .values()
            .map(|lane| lane.queue.len())
            .sum();
        CombinerStats {
            batches: self.counts.batches.load(Ordering::Relaxed),
            requests: self.counts.requests.load(Ordering::Relaxed),
            largest_batch: self.counts.largest_batch.load(Ordering::Relaxed),
            queued,
        }
    }
}

impl<K: Eq + Hash + Clone, Req, Resp> Combiner<K, Req, Resp> {
    /// A combiner that puts at most `max_batch` requests (at least 1) in one batch.
    pub fn new(max_batch: usize) -> Self {
        Self {
            lanes: Mutex::new(HashMap::new()),
            max_batch: max_batch.max(1),
            counts: Counts::default(),
            swept_at: Mutex::new(Instant::now()),
        }
    }

    /// Counts so far.
    pub fn stats(&self) -> CombinerStats {
        self.snapshot()
    }

    /// Submits `request` for `key` and returns its own result. `run_batch` gets the requests of
    /// one batch in arrival order and the batch's deadline (the earliest of its callers'), and
    /// must return one result per request, in the same order, or a whole-batch error.
    /// `deadline` is the caller's, fixed when its call started (inside another lockstock call's
    /// body or a router's closure, that call's if it is earlier): it bounds the time spent queued,
    /// and no batch the request is in runs past it: a batch's error is the answer of every
    /// request in it. One batch of a key runs at a time: the next one starts once `run_batch`
    /// has returned.
    ///
    /// # Errors
    /// [`Error::Timeout`] when `deadline` passes before the request is taken into a batch; a
    /// copy of the whole-batch error when `run_batch` fails; [`Error::Internal`] when it answers
    /// the wrong number of requests (or panics: then the panic goes on in the leader) —
    /// [`Error::OutcomeUnknown`] instead where a COMMIT of the batch was sent through
    /// lockstock's runner on the leader's thread and not refused for certain (also one of a combined call made in
    /// `run_batch` that led its own batch there; not a COMMIT another thread sent — a thread
    /// `run_batch` starts, a combined call that another thread's batch took: where `run_batch`
    /// commits so, have it answer every request).
    pub fn submit(
        &self,
        key: K,
        request: Req,
        deadline: Deadline,
        run_batch: impl Fn(&K, Vec<Req>, Deadline) -> Result<Vec<Result<Resp>>>,
    ) -> Result<Resp> {
        self.submit_observed(
            key,
            request,
            deadline,
            None,
            // Its `run_batch` may commit more than once: the key's turn is the batch's until
            // it returns.
            false,
            |_, _| (),
            |key, requests, deadline, ()| Ran {
                outcome: run_batch(key, requests, deadline),
                refused: false,
            },
        )
    }

    /// [`submit`](Self::submit) where `run_batch` also says whether its batch met a refusal
    /// of the hot row (then the next leaders of the key linger, see [`Combining`]), and where
    /// a leader first runs `prepare` with its own deadline — while the key's previous batch
    /// may still run — and hands what it made to its batch. With `again`, a request that a
    /// batch gave up on by an earlier caller's deadline is run again ([`Again`]). With
    /// `pass_at_commit` (only for batches that commit once), the key's turn passes to the next
    /// batch as this one's COMMIT is sent, not when `run_batch` returns.
    #[allow(clippy::too_many_arguments)]
    fn submit_observed<P>(
        &self,
        key: K,
        request: Req,
        deadline: Deadline,
        again: Option<&Again<'_, Req>>,
        pass_at_commit: bool,
        prepare: impl Fn(&K, Deadline) -> P,
        run_batch: impl Fn(&K, Vec<Req>, Deadline, P) -> Ran<Resp>,
    ) -> Result<Resp> {
        // Inside another lockstock call's body (or a router's closure): by its deadline at the
        // latest — also the queue's and the turn's waits, which no watchdog cuts.
        let deadline = crate::txn::enclosed(deadline);
        let slot = Arc::new(Slot::new());
        let lead_now = {
            let mut lanes = lock(&self.lanes);
            if lanes.len() >= SWEEP_AT_LEAST && !lanes.contains_key(&key) {
                let mut swept_at = lock(&self.swept_at);
                if swept_at.elapsed() > LINGER_MEMORY {
                    lanes.retain(|_, lane| !lane.forgettable());
                    *swept_at = Instant::now();
                }
            }
            let lane = lanes.entry(key.clone()).or_default();
            lane.queue.push_back((request, deadline, slot.clone()));
            !std::mem::replace(&mut lane.leading, true)
        };
        let mut lead_now = lead_now;
        loop {
            if !lead_now && !self.wait_for_turn(&key, &slot, deadline)? {
                return self.take_result(&slot);
            }
            self.lead(
                &key,
                &slot,
                (deadline, again, pass_at_commit),
                &prepare,
                &run_batch,
            );
            // Given back (its batch gave up by an earlier caller's deadline): it waits for the
            // next batch, or for the leadership, as any queued caller.
            if matches!(*lock(&slot.state), SlotState::Done(_)) {
                return self.take_result(&slot);
            }
            lead_now = false;
        }
    }

    /// Waits until the slot is answered (`Ok(false)`) or handed leadership (`Ok(true)`).
    fn wait_for_turn(&self, key: &K, slot: &Arc<Slot<Resp>>, deadline: Deadline) -> Result<bool> {
        let mut state = lock(&slot.state);
        loop {
            match *state {
                SlotState::Done(_) => return Ok(false),
                SlotState::Lead => return Ok(true),
                SlotState::Taken => {
                    state = slot
                        .changed
                        .wait(state)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                SlotState::Queued => {
                    let left = deadline.remaining();
                    if left.is_zero() {
                        drop(state);
                        if self.withdraw(key, slot) {
                            return Err(slot.expired(deadline));
                        }
                        state = lock(&slot.state);
                        continue;
                    }
                    state = slot
                        .changed
                        .wait_timeout(state, left)
                        .map(|(guard, _)| guard)
                        .unwrap_or_else(|e| e.into_inner().0);
                }
            }
        }
    }

    /// Removes a still-queued request; false if a leader already took it or handed it the
    /// leadership (both happen under the lanes lock, so this check cannot race them).
    fn withdraw(&self, key: &K, slot: &Arc<Slot<Resp>>) -> bool {
        let mut lanes = lock(&self.lanes);
        if !matches!(*lock(&slot.state), SlotState::Queued) {
            return false;
        }
        let Some(lane) = lanes.get_mut(key) else {
            return false;
        };
        match lane.queue.iter().position(|(_, _, s)| Arc::ptr_eq(s, slot)) {
            Some(position) => {
                lane.queue.remove(position);
                true
            }
            None => false,
        }
    }

    /// Leads one batch: prepares (`prepare`, with the leader's `deadline`; the key's previous
    /// batch may still be running), waits for the key's turn, forms the batch from everything
    /// queued (up to the limit), hands the leadership to the oldest request left (whose caller
    /// prepares the next batch meanwhile), runs the batch, gives the turn back and answers.
    ///
    /// The leader's own request is in its batch (only requests a batch gave back come before
    /// it, fewer than a batch). If its `deadline` has passed before
    /// the turn came, it answers only itself ([`Error::Timeout`]) and runs no batch, so a leader
    /// never works past its own deadline; if it passes as the batch forms, what it took goes
    /// back to the front of the queue, in order. Requests found expired are answered
    /// [`Error::Timeout`] (never sent); the batch runs by the earliest deadline of the rest.
    fn lead<P>(
        &self,
        key: &K,
        own: &Arc<Slot<Resp>>,
        (deadline, again, pass_at_commit): (Deadline, Option<&Again<'_, Req>>, bool),
        prepare: &impl Fn(&K, Deadline) -> P,
        run_batch: &impl Fn(&K, Vec<Req>, Deadline, P) -> Ran<Resp>,
    ) {
        // A panicking preparation must still pass the leadership on.
        let prepared = (!deadline.is_expired()).then(|| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| prepare(key, deadline)))
        });
        let (prepared, mut panicked) = match prepared {
            Some(Ok(prepared)) => (Some(prepared), None),
            Some(Err(panic)) => (None, Some(panic)),
            None => (None, None),
        };
        // This leader keeps the lane from being forgotten.
        let turn = lock(&self.lanes)
            .entry(key.clone())
            .or_default()
            .turn
            .clone();
        let ticket = prepared.as_ref().and_then(|_| turn.acquire(deadline));
        let mut lanes = lock(&self.lanes);
        // After refusals, wait a little (holding the turn) so that more requests join.
        if ticket.is_some() {
            let linger = lanes.get(key).map_or(Duration::ZERO, |lane| {
                lane.linger_for(deadline, self.max_batch)
            });
            if !linger.is_zero() {
                // Until the batch is as large as the key's recent ones, or the linger is over —
                // shortened to the share of the time left to any caller who joins meanwhile.
                let mut until = Instant::now() + linger;
                loop {
                    let lane = lanes.get(key);
                    if let Some(lane) = lane {
                        until =
                            until.min(Instant::now() + lane.linger_for(deadline, self.max_batch));
                    }
                    let full = lane.is_none_or(|lane| lane.queue.len() >= lane.usual.max(1));
                    let left = until.saturating_duration_since(Instant::now());
                    if full || left.is_zero() {
                        break;
                    }
                    drop(lanes);
                    std::thread::sleep(left.min(LINGER_CHECK));
                    lanes = lock(&self.lanes);
                }
            }
        }
        let lane = lanes.entry(key.clone()).or_default();
        // The leader's expiry is decided here, once.
        let alone = deadline.is_expired() || ticket.is_none();
        let drained: Vec<Queued<Req, Resp>> = if alone {
            // Without the turn (this leader's deadline passed first) it answers only itself.
            lane.queue
                .iter()
                .position(|(_, _, s)| Arc::ptr_eq(s, own))
                .and_then(|at| lane.queue.remove(at))
                .into_iter()
                .collect()
        } else {
            // In arrival order. Requests given back by the batch before come first, ahead of
            // the leader's own: fewer than a batch (the one whose deadline that batch ran by is
            // never given back), so the leader's own request is in its batch.
            let take = lane.queue.len().min(self.max_batch);
            lane.queue.drain(..take).collect()
        };
        let mut requests = Vec::with_capacity(drained.len());
        let mut slots = Vec::with_capacity(drained.len());
        let mut deadlines = Vec::with_capacity(drained.len());
        let mut batch_deadline: Option<Deadline> = None;
        #[cfg(test)]
        tests::after_forming();
        // The leader's deadline passed after it was looked at above, as the batch formed.
        let mut late = false;
        for (request, deadline, slot) in drained {
            if deadline.is_expired() {
                late |= !alone && Arc::ptr_eq(&slot, own);
                slot.set(SlotState::Done(Err(slot.expired(deadline))));
                continue;
            }
            {
                let mut state = lock(&slot.state);
                if matches!(*state, SlotState::Queued | SlotState::Lead) {
                    *state = SlotState::Taken;
                }
            }
            batch_deadline = Some(batch_deadline.map_or(deadline, |d| d.min(deadline)));
            requests.push(request);
            slots.push(slot);
            deadlines.push(deadline);
        }
        if late {
            // It runs no batch (it would run by a later caller's deadline while its own caller
            // waits for the end): what it took goes back to the front of the queue, in order,
            // and the oldest request leads next.
            let taken = requests
                .drain(..)
                .zip(slots.drain(..))
                .zip(deadlines.drain(..));
            for ((request, slot), deadline) in taken.rev() {
                slot.set(SlotState::Queued);
                lane.queue.push_front((request, deadline, slot));
            }
            batch_deadline = None;
        }
        let count = requests.len();
        // The next leader prepares its batch while this one runs.
        match lane.queue.front() {
            Some((_, _, slot)) => slot.set(SlotState::Lead),
            None => lane.leading = false,
        }
        let (run, unused) = match (batch_deadline, prepared, ticket) {
            (Some(batch_deadline), Some(prepared), Some(ticket)) => {
                (Some((batch_deadline, prepared, ticket)), None)
            }
            (_, prepared, ticket) => {
                if let Some(ticket) = ticket {
                    turn.release(ticket);
                }
                (None, prepared)
            }
        };
        if lane.forgettable() {
            lanes.remove(key);
        }
        drop(lanes);
        // Not under the lanes' lock: dropping a prepared connection may end its transaction.
        drop(unused);
        let Some((batch_deadline, prepared, ticket)) = run else {
            // Nothing to run: every request taken had expired (answered above), or the
            // preparation panicked (what was prepared is dropped here).
            for slot in &slots {
                slot.set(SlotState::Done(Err(Error::internal(
                    "the batch's preparation panicked",
                ))));
            }
            if let Some(panic) = panicked {
                std::panic::resume_unwind(panic);
            }
            return;
        };
        trace_event!(batch = count, "running a combined batch");
        // Counted as it is formed (a batch in flight is counted; its requests once they are
        // answered).
        self.counts.batches.fetch_add(1, Ordering::Relaxed);
        self.counts
            .largest_batch
            .fetch_max(count, Ordering::Relaxed);
        // A panicking batch must still give the turn back and answer its callers, or every
        // later caller for this key would wait forever.
        let handoff = Rc::new(BatchHandoff {
            turn: turn.clone(),
            ticket,
            deadline: batch_deadline,
            pass_at_commit,
            passed: Cell::new(false),
            in_commit: Cell::new(false),
            refused: Cell::new(false),
            commits_sent: Cell::new(0),
        });
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // A copy of each request that could run again if the batch gives up by an earlier
            // caller's deadline (not those whose deadline the batch runs by).
            let copies: Vec<Option<Req>> = requests
                .iter()
                .zip(&deadlines)
                .map(|(request, deadline)| {
                    again
                        .filter(|_| deadline.is_later_than(&batch_deadline))
                        .map(|again| (again.copy)(request))
                })
                .collect();
            let ran = with_handoff(handoff.clone(), || {
                run_batch(key, requests, batch_deadline, prepared)
            });
            (ran, copies)
        }));
        let polled = handoff.refused.get();
        // Past a COMMIT, a batch that fails to answer may have applied its work: its callers
        // are told the outcome is unknown, never that nothing was committed.
        let committed = handoff.commits_sent.get() > 0;
        // A batch that passed the turn on at its COMMIT (refused for certain after that, and
        // then given up) gives nothing back: the next batch has formed already, and requests
        // put back now would run after newer ones.
        let passed = handoff.passed.get();
        drop(handoff);
        let refused = outcome.as_ref().ok().map(|(ran, _)| ran.refused || polled);
        let (answers, copies) = match outcome {
            Ok((ran, copies)) => (answers(slots.len(), ran.outcome, committed), copies),
            Err(panic) => {
                panicked = Some(panic);
                let failed = Err(Error::internal("the batch panicked"));
                (answers(slots.len(), failed, committed), Vec::new())
            }
        };
        // A request the batch gave up on ([`Again`]) by an earlier caller's deadline, with
        // nothing committed, goes back to the front of the queue while it has time and
        // attempts left: its single call would still be retrying — also one the batch did not
        // apply whose key it could not look up by that deadline (`Error::refused_then_cut`).
        // (A refused ledger request whose lookup was cut short — after a COMMIT or not — is
        // finished by its own caller, see `CombiningLedger::submit`: the turn may be the next
        // batch's already, and a later batch would decide it again.)
        // The rest are answered.
        let mut given_back = Vec::new();
        let mut copies = copies.into_iter();
        for ((slot, answer), deadline) in slots.into_iter().zip(answers).zip(deadlines) {
            let copy = copies.next().flatten();
            let spent = match (&answer, again, copy.is_some()) {
                (Err(error), Some(again), true)
                    if !committed
                        && !passed
                        && deadline.is_later_than(&batch_deadline)
                        && deadline.remaining() >= AGAIN_AT_LEAST =>
                {
                    // A refusal whose lookup was cut short is finished by its caller (the
                    // lookup its single call would still be making), never decided again.
                    match error.refused_then_cut() {
                        Some(cut) if cut.lookup.is_some() => None,
                        Some(cut) => (again.spent)(&cut.failure, lock(&slot.tried).0),
                        None => (again.spent)(error, lock(&slot.tried).0),
                    }
                }
                _ => None,
            };
            let answer = slot.settled(answer);
            match (spent, copy, answer) {
                (Some(spent), Some(request), Err(error)) => {
                    *lock(&slot.tried) = (spent, Some(error));
                    given_back.push((request, deadline, slot));
                }
                (_, _, answer) => slot.set(SlotState::Done(answer)),
            }
        }
        let answered = count - given_back.len();
        // A batch that committed handed the turn on as it sent COMMIT (`BatchHandoff`); one
        // that did not (it failed, answered without a write, or ran a Galera-guarded write)
        // gives it back now, after its answers — and after putting back what runs again, so
        // the next batch takes it first.
        {
            let mut lanes = lock(&self.lanes);
            if !given_back.is_empty() {
                let lane = lanes.entry(key.clone()).or_default();
                for (request, deadline, slot) in given_back.into_iter().rev() {
                    slot.set(SlotState::Queued);
                    lane.queue.push_front((request, deadline, slot));
                }
                if !std::mem::replace(&mut lane.leading, true) {
                    if let Some((_, _, slot)) = lane.queue.front() {
                        slot.set(SlotState::Lead);
                    }
                }
            }
            turn.release(ticket);
            if let Some(lane) = lanes.get_mut(key) {
                if let Some(refused) = refused {
                    lane.adapt(refused);
                }
                lane.usual = count.max(lane.usual - lane.usual / USUAL_DECAY);
                if lane.forgettable() {
                    lanes.remove(key);
                }
            }
        }
        self.counts
            .requests
            .fetch_add(answered as u64, Ordering::Relaxed);
        if let Some(panic) = panicked {
            std::panic::resume_unwind(panic);
        }
    }

    fn take_result(&self, slot: &Slot<Resp>) -> Result<Resp> {
        let mut state = lock(&slot.state);
        match std::mem::replace(&mut *state, SlotState::Taken) {
            SlotState::Done(result) => result,
            // Unreachable by construction: a caller takes its result once its slot is done.
            _ => Err(Error::internal("combined request got no answer")),
        }
    }
}

/// A running batch's side of the [handoff at COMMIT](crate::txn::Handoff): the turn is passed
/// on as its first COMMIT is sent (where `pass_at_commit`), and counted as committing until
/// that COMMIT answers.
struct BatchHandoff {
    turn: Arc<Turn>,
    ticket: u64,
    /// The batch's deadline: waiting for a row held elsewhere takes a share of what is left.
    deadline: Deadline,
    /// Whether the turn passes at the first COMMIT: only for batches that commit once (the
    /// combining types'). A generic `run_batch` may commit again after it; its turn passes
    /// when it returns, so that one batch of a key runs at a time.
    pass_at_commit: bool,
    passed: Cell<bool>,
    in_commit: Cell<bool>,
    /// The hot row was refused (held by another process, or any other transaction).
    refused: Cell<bool>,
    /// The COMMITs of the batch sent and not refused for certain: above zero, its work may be
    /// committed. (A transaction whose COMMIT was refused is retried, or the batch gives up
    /// having committed nothing: its callers with later deadlines may run again.)
    commits_sent: Cell<u32>,
}

/// How long a batch waits for a hot row another process holds before its transaction is
/// retried by the runner (see [`locking_read`](crate::txn::locking_read)): a few batches of the
/// other processes ...
const WAIT_BUDGET: Duration = Duration::from_millis(8);
/// ... and at most this share (1 / n) of the time the batch has left.
const WAIT_SHARE: u32 = 4;

impl Handoff for BatchHandoff {
    fn commit_sent(&self) {
        self.commits_sent
            .set(self.commits_sent.get().saturating_add(1));
    }

    fn commit_refused(&self) {
        self.commits_sent
            .set(self.commits_sent.get().saturating_sub(1));
    }

    fn before_commit(&self) {
        if self.pass_at_commit && !self.passed.get() && self.turn.pass_at_commit(self.ticket) {
            self.passed.set(true);
            self.in_commit.set(true);
        }
    }

    fn after_commit(&self) {
        if self.in_commit.replace(false) {
            self.turn.committed();
        }
    }

    fn predecessor_committing(&self) -> bool {
        !self.in_commit.get() && self.turn.is_committing()
    }

    fn wait_budget(&self) -> Duration {
        (self.deadline.remaining() / WAIT_SHARE).min(WAIT_BUDGET)
    }

    fn refused(&self) {
        self.refused.set(true);
    }
}

impl Drop for BatchHandoff {
    fn drop(&mut self) {
        // A COMMIT that never answered (a panic in it) counts as done.
        self.after_commit();
    }
}

/// The answers of the `count` callers of a batch from its `outcome` (a whole-batch error is
/// copied to each). Where the batch failed to answer each caller (a wrong number of results, a
/// panic: [`Error::Internal`]) after a COMMIT was sent and not refused for certain
/// (`committed`), its work may be applied: the callers get [`Error::OutcomeUnknown`] instead.
fn answers<Resp>(
    count: usize,
    outcome: Result<Vec<Result<Resp>>>,
    committed: bool,
) -> Vec<Result<Resp>> {
    let outcome = match outcome {
        Ok(results) if results.len() != count => Err(Error::internal(format!(
            "batch returned {} results for {count} requests",
            results.len(),
        ))),
        other => other,
    }
    .map_err(|error| match error {
        Error::Internal { .. } if committed => Error::outcome_unknown(&error),
        error => error,
    });
    match outcome {
        Ok(results) => results,
        Err(error) => (0..count).map(|_| Err(error.clone())).collect(),
    }
}

/// A pooled connection, waiting at most until `deadline`: [`Error::Timeout`] once it has passed
/// (nothing sent), [`Error::Pool`] for any other checkout failure. The pool's validity ping
/// runs under the watchdog (`grace` past the deadline): a connection whose ping the watchdog
/// shut down is never handed out.
pub(crate) fn checkout(
    pool: &MysqlPool,
    deadline: Deadline,
    grace: Duration,
) -> Result<PooledMysql> {
    checkout_within(pool, deadline, grace, deadline.remaining())
}

/// Like [`checkout`], waiting at most `wait` (a router leaves time for another node).
pub(crate) fn checkout_within(
    pool: &MysqlPool,
    deadline: Deadline,
    grace: Duration,
    wait: Duration,
) -> Result<PooledMysql> {
    let timeout = |deadline: Deadline| Error::Timeout {
        elapsed: deadline.elapsed(),
    };
    if deadline.is_expired() {
        return Err(timeout(deadline));
    }
    let started = Instant::now();
    let (got, fired) = watched(deadline, grace, |_| {
        // In slices: each `get_timeout` opens a connection where the pool has room, so a
        // waiter is never stranded by a connection discarded without a word ([`give_back`]
        // covers lockstock's own). The error kept says why no connection could be made, where
        // one did.
        let mut failed: Option<diesel::r2d2::PoolError> = None;
        loop {
            let left = wait.saturating_sub(started.elapsed());
            match pool.get_timeout(left.min(CHECKOUT_SLICE)) {
                Ok(conn) => return Ok(conn),
                Err(error) => {
                    if failed.as_ref().is_none_or(|kept| {
                        names_connect_error(&error) || !names_connect_error(kept)
                    }) {
                        failed = Some(error);
                    }
                    if started.elapsed() >= wait {
                        return Err(failed);
                    }
                }
            }
        }
    });
    match got {
        Ok(mut conn) if fired => {
            // The ping answered as its socket was shut down: r2d2 discards the connection.
            mark_broken(&mut conn);
            give_back(pool, conn);
            Err(timeout(deadline))
        }
        Ok(conn) => Ok(conn),
        Err(_) if deadline.is_expired() => Err(timeout(deadline)),
        Err(Some(error)) => Err(Error::Pool(Arc::new(error))),
        Err(None) => Err(timeout(deadline)),
    }
}

/// Whether r2d2's checkout `error` names the connect error its pool met: the node refused or
/// failed a new connection. Without one, every connection was in use for the whole wait (or a
/// connect neither succeeded nor failed in it). r2d2's message is "timed out waiting for
/// connection", then ": " and the last connect error if there was one.
pub(crate) fn names_connect_error(error: &diesel::r2d2::PoolError) -> bool {
    error.to_string().contains(": ")
}

/// Marks `conn` broken (its pool discards it, and the server rolls back what is open on it)
/// where a batch on it was refused, as a whole or for a request, for the session rather than
/// the request:
/// - [`Error::NotReplicated`]: its session does not replicate — one opened while its Galera
///   node's `wsrep_on` was off keeps `wsrep_on = 0`;
/// - [`Error::NestedTransaction`]: a connection lockstock checked out itself carries a
///   transaction that is not lockstock's — one the application left open on a pool it shares
///   (a raw `START TRANSACTION`, say), holding its locks.
///
/// Either would refuse every call on it until the pool retired it.
fn discard_if_unusable<Resp>(conn: &mut MysqlConnection, outcome: &Result<Vec<Result<Resp>>>) {
    let unusable = |error: &Error| matches!(error, Error::NotReplicated | Error::NestedTransaction);
    if refused_for(outcome, unusable) {
        mark_broken(conn);
    }
}

/// Whether `outcome` is, as a whole or for a request, an error that `is`.
fn refused_for<Resp>(outcome: &Result<Vec<Result<Resp>>>, is: impl Fn(&Error) -> bool) -> bool {
    match outcome {
        Err(error) => is(error),
        Ok(answers) => answers
            .iter()
            .any(|answer| matches!(answer, Err(error) if is(error))),
    }
}

/// Whether a batch met a connection of its source inside a transaction that is not
/// lockstock's ([`Error::NestedTransaction`], as a whole or for a request): then no
/// transaction of it ran on that connection (every one is refused at its first statement), so
/// nothing of it was committed and it may run again on another connection.
fn met_a_foreign_transaction<Resp>(outcome: &Result<Vec<Result<Resp>>>) -> bool {
    refused_for(outcome, |error| matches!(error, Error::NestedTransaction))
}

/// How many connections found carrying a transaction not lockstock's a batch runs on at most
/// before it answers [`Error::NestedTransaction`] ([`discard_if_unusable`]).
const MAX_FOREIGN_TRANSACTIONS: u32 = 16;

/// How long one wait for a pooled connection lasts before [`checkout_within`] asks again.
const CHECKOUT_SLICE: Duration = Duration::from_millis(50);

type PooledMysql = PooledConnection<ConnectionManager<MysqlConnection>>;

/// Gives `conn` back to `pool`. A broken one (marked by lockstock, or cut by the watchdog) r2d2
/// discards — without waking a caller waiting for a connection and, in a pool with `min_idle
/// = 0` (the [`Router`]'s), without opening one in its place: the waiter slept out its whole
/// checkout wait, and a router took the pool that gave nothing for a failed node. So a pool
/// with no idle connection is asked for one at once (`get_timeout(0)`: nothing waits), which
/// opens one where it has room; when that connection arrives, a waiter gets it. Only a pool
/// that does not test on checkout (the router's): one that does would ping an idle connection
/// returned meanwhile by another thread, and a silent server's ping never returns. Waiters on
/// such a pool get the new connection at their next slice ([`checkout_within`]).
pub(crate) fn give_back(pool: &MysqlPool, mut conn: PooledMysql) {
    let broken = diesel::r2d2::R2D2Connection::is_broken(&mut *conn);
    drop(conn);
    if broken && !pool.test_on_check_out() && pool.state().idle_connections == 0 {
        // An idle connection found instead goes straight back (and wakes a waiter).
        let _ = pool.get_timeout(Duration::ZERO);
    }
}

/// A leader's connection, checked out (and its transaction perhaps opened) ahead of its turn.
/// Back to the pool on drop — with a transaction nothing used ended first, so a pooled
/// connection never goes back with one open.
struct Prepared<'a> {
    /// Taken back only by `drop` (always `Some` until then).
    conn: Option<PooledMysql>,
    pool: &'a MysqlPool,
    runner: &'a TxnRunner,
    /// The deadline of the leader that prepared it, then of the batch that runs on it (its
    /// earliest caller's): ending its transaction unused never outlasts it.
    deadline: Deadline,
}

impl Prepared<'_> {
    fn conn(&mut self) -> Result<&mut MysqlConnection> {
        match self.conn.as_mut() {
            Some(conn) => Ok(&mut **conn),
            None => Err(Error::internal(
                "a prepared connection used after it was given back",
            )),
        }
    }
}

impl Drop for Prepared<'_> {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        if self.deadline.is_expired() {
            // Nothing is sent past the leader's deadline: if a transaction is open, the pool
            // discards the connection and the server rolls it back.
            self.runner.abandon_primed(&mut conn);
        } else {
            self.runner.unprime(&mut conn, self.deadline);
        }
        give_back(self.pool, conn);
    }
}

/// A domain type (`S`: a [`CouponIssuer`] or a [`BalanceLedger`]) in front of a pool, with a
/// [`Combiner`] that combines concurrent requests per hot key (a campaign, an account) into
/// batch transactions. Share it between threads (it is `Sync`). Used as [`CombiningIssuer`] and
/// [`CombiningLedger`].
#[derive(Debug)]
pub struct Combining<S, Req, Resp> {
    source: Source,
    inner: S,
    combiner: Combiner<i64, Req, Resp>,
}

/// Where a [`Combining`]'s batches get their connection.
#[derive(Debug)]
enum Source {
    /// One server's pool.
    Pool(MysqlPool),
    /// The writer of a Galera cluster; a batch that meets a node failure runs again on the new
    /// writer ([`Router::write`]).
    Router(Arc<Router>),
}

impl<S, Req: Clone, Resp> Combining<S, Req, Resp> {
    /// Combines over `pool` with batches of up to [`DEFAULT_MAX_BATCH`].
    ///
    /// Build the pool with [`SessionSettings`](crate::SessionSettings) of the same policy as
    /// `inner`'s (`SessionSettings::new(inner.policy().clone())` as its connection customizer):
    /// only on connections that carry them does a batch send no session settings and open its
    /// transaction ahead of its turn (the pipelining above). Over a pool without them — or
    /// with another policy's — every answer is the same, but each batch saves, sets and
    /// restores the session settings around its transaction and opens it only once it has
    /// the turn: slower on a hot row.
    pub fn new(pool: MysqlPool, inner: S) -> Self {
        Self::with_max_batch(pool, inner, DEFAULT_MAX_BATCH)
    }

    /// Combines over `pool` with batches of up to `max_batch` requests.
    pub fn with_max_batch(pool: MysqlPool, inner: S, max_batch: usize) -> Self {
        Self {
            source: Source::Pool(pool),
            inner,
            combiner: Combiner::new(max_batch),
        }
    }

    /// Combines through `router`: every batch runs on the Galera cluster's writer, and a batch
    /// that meets a node failure (nothing applied) runs again on the new writer within its
    /// deadline ([`Router::write`]) — only its requests answered the failure, or answered
    /// [`Error::OutcomeUnknown`] only because the failure kept the batch from looking up whether
    /// an earlier call applied them (a holder among a coupon batch's users, a key in the
    /// journal, not known which; where no later run answers such a request better than "nothing
    /// applied", it keeps that answer): those it answered without the hot row (a holder, a key
    /// found applied, bad input) keep their answers — and its callers with a later deadline are given back to the queue when it
    /// gives up by an earlier one; batches of up to [`DEFAULT_MAX_BATCH`].
    pub fn routed(router: Arc<Router>, inner: S) -> Self {
        Self {
            source: Source::Router(router),
            inner,
            combiner: Combiner::new(DEFAULT_MAX_BATCH),
        }
    }

    /// Batch counts so far.
    pub fn stats(&self) -> CombinerStats {
        self.combiner.stats()
    }

    /// Submits `request` for the hot row `key` with the caller's `deadline`; the batch it joins
    /// runs on a pooled connection checked out by the batch's deadline, through `many` — or,
    /// alone in its batch, through the single-request path `one` (shorter than a batch of one).
    /// `grace`: the policy's [`unresponsive_grace`](crate::TxnPolicy::unresponsive_grace), for
    /// the checkout.
    ///
    /// Pipelined: a leader checks its connection out and opens its transaction
    /// ([`TxnRunner::prime`]) while the key's previous batch still runs, so that once the turn
    /// comes only the hot-row statements and COMMIT remain (`prime_if`: whether it is worth it
    /// for this key — not for a campaign known to be sold out, answered without a round trip).
    fn submit_pooled(
        &self,
        (key, request, deadline): (i64, Req, Deadline),
        runner: &TxnRunner,
        prime_if: impl Fn(i64) -> bool,
        one: impl Fn(&S, &mut MysqlConnection, i64, &Req, Deadline) -> Result<Resp>,
        many: impl Fn(&S, &mut MysqlConnection, i64, &[Req], Deadline) -> Result<Vec<Result<Resp>>>,
    ) -> Result<Resp> {
        let grace = runner.policy().unresponsive_grace;
        let prepare = |key: &i64, deadline: Deadline| match &self.source {
            Source::Pool(pool) => {
                let mut conn = checkout(pool, deadline, grace).ok()?;
                if prime_if(*key)
                    && runner.prime(&mut conn, deadline).is_err_and(|failure| {
                        discard_if_unusable(&mut conn, &Err::<Vec<Result<()>>, _>(failure));
                        true
                    })
                {
                    // Marked broken if it is (then discarded). Another connection, not primed,
                    // is taken now, before the turn: a batch that checked one out only once it
                    // runs could wait for the last one while the next leader, appointed as the
                    // batch is formed, holds it and waits for this batch's turn.
                    give_back(pool, conn);
                    #[cfg(test)]
                    tests::after_a_failed_prime();
                    conn = checkout(pool, deadline, grace).ok()?;
                }
                Some(Prepared {
                    conn: Some(conn),
                    pool,
                    runner,
                    deadline,
                })
            }
            Source::Router(_) => None,
        };
        // A request its batch gave up on by an earlier caller's deadline runs again while it
        // has attempts left: a `Contended` batch that used up the attempts answers everyone.
        let routed = matches!(self.source, Source::Router(_));
        let spent = within_attempts(runner.policy().retry.max_attempts, routed);
        let again = Again {
            copy: &Req::clone,
            spent: &spent,
        };
        self.combiner.submit_observed(
            key,
            request,
            deadline,
            Some(&again),
            // Each batch of a combining type commits once.
            true,
            prepare,
            |key, requests, deadline, prepared| {
                // Through a router, the answers a run of the batch gave that stand (see below),
                // kept for the router's next run of it.
                let kept: RefCell<Vec<Option<Result<Resp>>>> = RefCell::new(Vec::new());
                // Through a router, for a request run again because a node failure kept its
                // run from telling whether an earlier call applied it (`Error::OutcomeUnknown`):
                // that answer, where no later run answers it better than "nothing applied".
                let unknown: RefCell<Vec<Option<Error>>> = RefCell::new(Vec::new());
                // A lone request's error is the batch's: the same answer reaches its caller,
                // and a router sees the node failures among them.
                let answer = |conn: &mut MysqlConnection, deadline| match requests.as_slice() {
                    [alone] => one(&self.inner, conn, *key, alone, deadline).map(|r| vec![Ok(r)]),
                    all => {
                        let mut kept = kept.borrow_mut();
                        kept.resize_with(all.len(), || None);
                        unknown.borrow_mut().resize_with(all.len(), || None);
                        let open: Vec<usize> =
                            (0..all.len()).filter(|&i| kept[i].is_none()).collect();
                        // Copies only for a router's later run that kept answers.
                        let answers = if open.len() == all.len() {
                            many(&self.inner, conn, *key, all, deadline)?
                        } else {
                            let some: Vec<Req> = open.iter().map(|&i| all[i].clone()).collect();
                            many(&self.inner, conn, *key, &some, deadline)?
                        };
                        if answers.len() != open.len() {
                            // The whole batch's error (after a COMMIT: OutcomeUnknown).
                            return Err(Error::internal(format!(
                                "batch returned {} results for {} requests",
                                answers.len(),
                                open.len()
                            )));
                        }
                        // Through a router, the requests a node failure kept the batch from
                        // answering run again (`sort_routed`); not past the deadline: the router
                        // would not run them again.
                        let node_failure = sort_routed(
                            answers,
                            &open,
                            &mut kept,
                            &mut unknown.borrow_mut(),
                            routed && !deadline.is_expired(),
                        );
                        if let Some(failure) = node_failure {
                            return Err(failure);
                        }
                        Ok(kept
                            .drain(..)
                            .map(|a| {
                                a.unwrap_or_else(|| {
                                    Err(Error::internal("a request left unanswered"))
                                })
                            })
                            .collect())
                    }
                };
                let run = |conn: &mut MysqlConnection, deadline| {
                    // A connection of the source: a transaction found open on it is not the
                    // caller's (see `crate::ledger`'s expired holds).
                    let outcome = crate::txn::on_source_connection(|| answer(conn, deadline));
                    discard_if_unusable(conn, &outcome);
                    outcome
                };
                let refusals = refusals_on_this_thread();
                let outcome = match prepared {
                    Some(mut prepared) => {
                        // Dropped before the callers are answered: ending a transaction the
                        // batch did not use is bounded by their deadline, not the leader's.
                        prepared.deadline = prepared.deadline.min(deadline);
                        prepared.conn().and_then(|conn| run(conn, deadline))
                    }
                    None => {
                        #[cfg(test)]
                        tests::before_an_unprepared_checkout();
                        self.with_connection(deadline, grace, run)
                    }
                };
                // A connection of the source that carried a transaction not lockstock's (one
                // the application left open on a pool it shares) was discarded above; nothing
                // was sent in the batch, so it runs again on another — until one is free of
                // such a transaction (the pool opens new ones in place of those discarded), or
                // the deadline passes.
                let mut outcome = outcome;
                let mut discarded = 1;
                while met_a_foreign_transaction(&outcome)
                    && discarded < MAX_FOREIGN_TRANSACTIONS
                    && !deadline.is_expired()
                {
                    discarded += 1;
                    outcome = self.with_connection(deadline, grace, run);
                }
                // A router that gave up (its deadline passed without a writer) answers the
                // requests still open; the answers kept stand.
                // (An `Internal` failure, which says that nothing was committed, is answered
                // `OutcomeUnknown` then: a later run may have committed.)
                let kept = kept.take();
                let unknown = unknown.take();
                let outcome = match outcome {
                    Err(failure)
                        if kept.iter().any(Option::is_some)
                            || unknown.iter().any(Option::is_some) =>
                    {
                        let failure = match failure {
                            Error::Internal { .. } => Error::outcome_unknown(&failure),
                            failure => failure,
                        };
                        Ok(kept
                            .into_iter()
                            .map(|a| a.unwrap_or_else(|| Err(failure.clone())))
                            .collect())
                    }
                    outcome => outcome,
                };
                let outcome = outcome.map(|answers| prefer_unknown(answers, unknown));
                Ran {
                    outcome,
                    refused: refusals_on_this_thread() > refusals,
                }
            },
        )
    }

    /// Runs `f` on a connection of the source: a pooled connection checked out by `deadline`
    /// (under the watchdog, `grace` past it), or the router's writer.
    fn with_connection<T>(
        &self,
        deadline: Deadline,
        grace: Duration,
        mut f: impl FnMut(&mut MysqlConnection, Deadline) -> Result<T>,
    ) -> Result<T> {
        // A connection found inside a transaction that is not lockstock's (left open by the
        // application on a pool it shares, or by a router's closure) is discarded, and `f` runs
        // again on another: nothing of `f` ran on it (every lockstock transaction and read is
        // refused at its first statement there). A router discards such a connection itself.
        let mut discarded = 0;
        loop {
            let answer = match &self.source {
                Source::Pool(pool) => {
                    let mut conn = checkout(pool, deadline, grace)?;
                    let answer = crate::txn::on_source_connection(|| f(&mut conn, deadline));
                    if matches!(answer, Err(Error::NestedTransaction)) {
                        mark_broken(&mut conn);
                    }
                    give_back(pool, conn);
                    answer
                }
                Source::Router(router) => router.write(deadline, |conn, deadline| {
                    crate::txn::on_source_connection(|| f(conn, deadline))
                }),
            };
            discarded += 1;
            let foreign = matches!(answer, Err(Error::NestedTransaction));
            if !foreign || discarded >= MAX_FOREIGN_TRANSACTIONS || deadline.is_expired() {
                return answer;
            }
        }
    }
}

/// A [`CouponIssuer`] in front of a pool that combines concurrent `issue` calls per campaign
/// into batch transactions. Share it between threads (it is `Sync`).
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use diesel::r2d2::{ConnectionManager, Pool};
/// use lockstock::combine::CombiningIssuer;
/// use lockstock::{CouponIssuer, SessionSettings};
///
/// let issuer = CouponIssuer::new();
/// // The issuer's session settings on every pooled connection (see `Combining::new`).
/// let pool = Pool::builder()
///     .max_size(8)
///     .connection_customizer(Box::new(SessionSettings::new(issuer.policy().clone())))
///     .build(ConnectionManager::new("mysql://root@localhost/shop"))?;
/// let hot = std::sync::Arc::new(CombiningIssuer::new(pool, issuer));
/// // From many threads:
/// let coupon = hot.issue(42, 7)?;
/// # Ok(())
/// # }
/// ```
pub type CombiningIssuer = Combining<CouponIssuer, i64, IssuedCoupon>;

impl CombiningIssuer {
    /// The issuer the batches run through (for restocks, redeems and reads).
    pub fn issuer(&self) -> &CouponIssuer {
        &self.inner
    }

    /// Issues one coupon of `campaign_id` to `user_id`, combined with concurrent requests for the
    /// same campaign. Same answers as [`CouponIssuer::issue`], plus [`Error::Timeout`] if the
    /// policy's deadline passes while queued.
    ///
    /// # Errors
    /// As [`CouponIssuer::issue`]; also [`Error::Timeout`] (queued or waiting for a pooled
    /// connection past the deadline — also from a pool that cannot open a connection: r2d2
    /// keeps trying until then), and a copy of a whole-batch failure.
    pub fn issue(&self, user_id: i64, campaign_id: i64) -> Result<IssuedCoupon> {
        // Answered before anything is queued or checked out, as `issue` answers it.
        if let Some(refusal) = self.inner.refusal_before_sending(user_id, campaign_id) {
            return Err(refusal);
        }
        let request = (campaign_id, user_id, self.inner.runner().deadline());
        self.submit_pooled(
            request,
            self.inner.runner(),
            |campaign| !self.inner.known_sold_out(campaign),
            |issuer, conn, campaign, user, deadline| {
                issuer.issue_by(conn, *user, campaign, deadline)
            },
            CouponIssuer::issue_many_by,
        )
    }
}

/// A [`BalanceLedger`] in front of a pool that combines concurrent charges, deducts, holds,
/// captures and releases per account into batch transactions. Share it between threads (it is
/// `Sync`).
///
/// Each op is queued with the caller's clock reading when it was submitted: a hold's expiry is
/// judged against it once, as its single call judges it before sending anything, however long
/// the request then waits for its batch (or runs again).
pub type CombiningLedger = Combining<BalanceLedger, (AccountOp, chrono::NaiveDateTime), Entry>;

impl CombiningLedger {
    /// The ledger the batches run through (for refunds, transfers and reads).
    pub fn ledger(&self) -> &BalanceLedger {
        &self.inner
    }

    /// [`BalanceLedger::charge`], combined with concurrent requests for the same account.
    ///
    /// # Errors
    /// As [`BalanceLedger::charge`]; also [`Error::Timeout`] (queued or waiting for a pooled
    /// connection past the deadline — also from a pool that cannot open a connection: r2d2
    /// keeps trying until then), and a copy of a whole-batch failure.
    pub fn charge(&self, user_id: i64, amount: Decimal, idempotency_key: &str) -> Result<Entry> {
        self.apply(user_id, AccountOp::charge(amount, idempotency_key))
    }

    /// [`BalanceLedger::deduct`], combined with concurrent requests for the same account.
    ///
    /// # Errors
    /// As [`BalanceLedger::deduct`], with the additions of [`charge`](Self::charge).
    pub fn deduct(&self, user_id: i64, amount: Decimal, idempotency_key: &str) -> Result<Entry> {
        self.apply(user_id, AccountOp::deduct(amount, idempotency_key))
    }

    /// [`BalanceLedger::hold`], combined with concurrent requests for the same account.
    ///
    /// # Errors
    /// As [`BalanceLedger::hold`], with the additions of [`charge`](Self::charge).
    pub fn hold(
        &self,
        user_id: i64,
        amount: Decimal,
        idempotency_key: &str,
        expires_at: chrono::NaiveDateTime,
    ) -> Result<Entry> {
        self.apply(
            user_id,
            AccountOp::hold(amount, idempotency_key, expires_at),
        )
    }

    /// [`BalanceLedger::capture`], combined with concurrent requests for the hold's account
    /// (read first on a pooled connection: a hold's account never changes).
    ///
    /// # Errors
    /// As [`BalanceLedger::capture`], with the additions of [`charge`](Self::charge).
    pub fn capture(&self, hold_id: i64, amount: Decimal, idempotency_key: &str) -> Result<Entry> {
        self.on_hold_account(
            hold_id,
            AccountOp::capture(hold_id, amount, idempotency_key),
        )
    }

    /// [`BalanceLedger::release`], combined with concurrent requests for the hold's account.
    ///
    /// # Errors
    /// As [`BalanceLedger::release`], with the additions of [`charge`](Self::charge).
    pub fn release(&self, hold_id: i64, idempotency_key: &str) -> Result<Entry> {
        self.on_hold_account(hold_id, AccountOp::release(hold_id, idempotency_key))
    }

    /// A capture or release, submitted for the account of `hold_id`; its input is checked
    /// before anything is sent, as the single call checks it.
    fn on_hold_account(&self, hold_id: i64, op: AccountOp) -> Result<Entry> {
        let deadline = self.inner.runner().deadline();
        crate::ledger::check_ending(&op)?;
        let grace = self.inner.runner().policy().unresponsive_grace;
        let owner = self.with_connection(deadline, grace, |conn, deadline| {
            self.inner.hold_owner_by(conn, hold_id, deadline)
        })?;
        self.submit(owner, (op, crate::util::now()), deadline)
    }

    /// A charge, deduct or hold; its input is checked before anything is queued, as the single
    /// call checks it before it sends anything. A hold whose expiry its caller's clock refuses
    /// is answered as its single call answers it — its key looked up, else the refusal; where
    /// the lookup cannot be made, [`Error::OutcomeUnknown`] — on a connection of the source,
    /// never queued: it needs no account lock (queued, a deadline passing in the queue would
    /// answer it `Timeout`, "nothing applied", though a retry's hold may stand).
    fn apply(&self, user_id: i64, op: AccountOp) -> Result<Entry> {
        use crate::ledger::BeforeSending;
        let deadline = self.inner.runner().deadline();
        let judged = crate::util::now();
        match op.before_sending(user_id, judged) {
            BeforeSending::Refused(refusal) => Err(refusal),
            BeforeSending::Expired(request, refusal) => {
                let grace = self.inner.runner().policy().unresponsive_grace;
                let looked_up = self.with_connection(deadline, grace, |conn, deadline| {
                    for_the_source(self.inner.expired_hold(
                        conn,
                        &request,
                        refusal.clone(),
                        deadline,
                    ))
                });
                looked_up.unwrap_or_else(|failure| {
                    let lookup = crate::ledger::KeyLookup::of(&request, refusal);
                    Err(Error::unknown_after_refusal_by_deadline(
                        failure,
                        Some(lookup),
                    ))
                })
            }
            _ => self.submit(user_id, (op, judged), deadline),
        }
    }

    fn submit(
        &self,
        user_id: i64,
        op: (AccountOp, chrono::NaiveDateTime),
        deadline: Deadline,
    ) -> Result<Entry> {
        let request = (user_id, op, deadline);
        let answer = self.submit_pooled(
            request,
            self.inner.runner(),
            |_| true,
            BalanceLedger::apply_one_by,
            |ledger, conn, user_id, requests, deadline| {
                let (ops, judged): (Vec<AccountOp>, Vec<chrono::NaiveDateTime>) =
                    requests.iter().cloned().unzip();
                ledger.apply_many_by(conn, user_id, &ops, &judged, deadline)
            },
        );
        // A request the batch refused and committed without, whose key it could not look up
        // by its earliest caller's deadline: its single call would still be looking, by this
        // caller's deadline — so the lookup is finished here, on a connection of its own (the
        // batch's callers are answered, and the turn is the next batch's).
        match answer {
            Err(unknown) => {
                let runner = self.inner.runner();
                // Cut by the deadline, not by the attempts (the marked failures are a timeout,
                // a refusal or the watchdog's cut: `within_attempts` as for a routed batch).
                let by_deadline = within_attempts(runner.policy().retry.max_attempts, true);
                let finish = unknown.refused_then_cut().and_then(|cut| {
                    let cut_by_deadline = by_deadline(&cut.failure, 0).is_some();
                    cut.lookup.as_ref().filter(|_| cut_by_deadline)
                });
                match finish {
                    Some(lookup) if !deadline.is_expired() => {
                        let grace = runner.policy().unresponsive_grace;
                        self.with_connection(deadline, grace, |conn, deadline| {
                            lookup.answer(&self.inner, conn, deadline)
                        })
                        // Not even a connection by the deadline: the batch's answer stands
                        // (the lookup's own failures are `OutcomeUnknown` already).
                        .map_err(|failure| {
                            match failure.says_nothing_applied() {
                                true => unknown,
                                false => failure,
                            }
                        })
                    }
                    _ => Err(unknown),
                }
            }
            answer => answer,
        }
    }
}

#[cfg(test)]
mod tests;
mod turn;
