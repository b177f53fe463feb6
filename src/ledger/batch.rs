//! The batch planner: [`BalanceLedger::apply_many`] decides many charges, deducts, holds,
//! captures and releases of one account in order against the running balance and writes them
//! with the same statements as the single calls ([`rows`](super::rows)), so that each request is
//! answered exactly as the single call would have answered it.

use std::collections::{HashMap, HashSet};

use chrono::NaiveDateTime;
use diesel::mysql::MysqlConnection;

use rust_decimal::Decimal;

use super::holds::{ending, validate_ending};
use super::request::{KeyLookup, Request};
use super::rows::{
    end_hold, existing_holds, find_hold, insert_entries, insert_holds, lock_holds, lock_or_create,
    store_balance, Account,
};
use super::types::{AccountOp, BeforeSending, Entry, Hold};
use super::BalanceLedger;
use crate::error::{Error, Result};
use crate::records::{EntryKind, HoldState};
use crate::txn::{Deadline, Holding, InsertIds};
use crate::util::now;

/// What the batch transaction decided for one request.
#[derive(Debug)]
enum Decision {
    /// Written as the `n`-th new row.
    New(usize),
    /// The same request, under the same key, as the `n`-th new row: its result.
    SameAs(usize),
    /// A different request under the key of the `n`-th new row.
    Conflict(usize),
    /// Refused (insufficient balance, limit): nothing written.
    Refused(Error),
}

impl BalanceLedger {
    /// Applies many charges, deducts, holds, captures and releases to ONE account in one
    /// transaction, in the given order, each checked against the running balance. Each request
    /// gets its own result, exactly as the single calls made one after another would have
    /// answered it: a refused or invalid request never fails its neighbours, keys keep their
    /// meaning (inside the batch and against the journal), and a deduct or hold that comes
    /// before the batch's first charge of an account that does not exist yet is
    /// [`Error::AccountNotFound`] — also where that charge then cannot create the account (a
    /// lock on the gap where its row would go: the charge and the requests after it answer that
    /// failure). A capture or release names a hold of THIS account; a hold of
    /// another account is [`Error::HoldNotFound`] (on an account id that cannot exist, not
    /// positive, every request is [`Error::InvalidId`] for it, before anything is sent). One that names a hold not found before the
    /// batch, after a hold the batch places, may name that hold (ids are the INSERT's): the
    /// batch then runs in parts, each in its own transaction — the requests before it, then it
    /// and the rest (split again at the next such request) — so that it is decided as its
    /// single call would be, after them. A later part's hold whose expiry the caller's clock
    /// refuses has its key looked up again before that part where an earlier part wrote the
    /// key, may have (an unknown outcome) or met it written by another call: its single call,
    /// made after them, finds that entry (where that lookup fails, the hold answers as its
    /// single call would then: [`Error::OutcomeUnknown`]).
    ///
    /// Statement by statement (one [`Deadline`] for the whole call, shared by every step):
    /// 0. If the batch captures or releases holds: their rows, read lock-free (their account
    ///    and amount never change).
    /// 1. `SELECT ... FROM user_balance WHERE user_id = ? FOR UPDATE NOWAIT` — the account row,
    ///    locked once for the whole batch, with the server clock and the sum of its unexpired
    ///    active holds when it has any (the clock also when the batch places or ends holds). A
    ///    missing account is created, as for a single charge
    ///    and only if the batch has one, in the batch's transaction: found missing, the
    ///    transaction ends and the next one writes the empty row (`INSERT IGNORE`, wait-free)
    ///    and locks it, so a batch that fails leaves no account. Then the holds the batch
    ///    captures or releases, `FOR UPDATE NOWAIT` in ascending id order.
    /// 2. With the row locked, every request is decided in order against the running balance
    ///    (and the running state of each hold); the accepted ones are written with ONE
    ///    multi-row `INSERT` into the journal, then `LAST_INSERT_ID()` (or an id lookup through
    ///    the unique key, where the server does not number one INSERT's rows consecutively),
    ///    ONE multi-row `INSERT` of the new holds, one `UPDATE` per hold ended, ONE `UPDATE`
    ///    of the balance and `COMMIT`. A batch of more than 1,000 entries (or holds) writes
    ///    them with one INSERT per 1,000, each followed by its ids: one prepared statement
    ///    binds at most 65,535 values, and a batch of any size answers as its single calls.
    ///    The holds it ends cost a statement each (their locks in step 1, their `UPDATE`s),
    ///    and a larger batch an INSERT (and a key lookup) per 1,000 rows: none of those after
    ///    the first is sent once the deadline has passed — the transaction is rolled back
    ///    whole and the batch answers [`Error::Timeout`] (nothing applied; [`Error::Contended`]
    ///    where an attempt before it was refused).
    /// 3. A key already in the journal fails that INSERT as a duplicate (nothing written); the
    ///    keys are then looked up in a lock-free snapshot, those requests are answered from the
    ///    journal, and the rest run again from step 1 (as often as keys are found taken: each
    ///    such round answers at least one request; single calls never give up on it either).
    ///    Where that lookup fails, every request still open is answered
    ///    [`Error::OutcomeUnknown`], as a single call refused by its key's index whose lookup
    ///    fails: one of their keys is recorded, maybe by an earlier call of the same request,
    ///    and the batch cannot tell which.
    /// 4. After the commit, a request refused for the balance (or a missing account, or a
    ///    hold's expiry on the server clock) under a key that the batch did not write is looked
    ///    up in the journal, lock-free: a key that exists answers it, as it answers the single
    ///    call. Where that lookup fails, the request answers [`Error::OutcomeUnknown`] (an
    ///    earlier call may have recorded its key) — but one refused because the account did
    ///    not exist keeps [`Error::AccountNotFound`] (no earlier call can have recorded a key of
    ///    an account that did not exist), and a capture or release refused by its hold keeps
    ///    its refusal where the hold expired or ended otherwise than the request ends it, or
    ///    is smaller than the capture ([`Error::HoldExpired`], [`Error::HoldNotActive`],
    ///    [`Error::CaptureExceedsHold`]): a hold ends once, so the same request applied before
    ///    would have ended it as this request ends it.
    ///
    /// # Errors
    /// The outer `Err` is a failure before anything was committed ([`Error::Contended`],
    /// [`Error::Timeout`], [`Error::NestedTransaction`], [`Error::ConnectionBroken`],
    /// [`Error::NotDesignatedWriter`], [`Error::NotReplicated`], [`Error::Server`]): then no
    /// request in the batch was applied (or, for
    /// [`Error::OutcomeUnknown`] of the COMMIT, all or none were; a batch run in parts — see
    /// above — answers a part's failure per request, and gives the outer `Err` only where every
    /// part failed and none may have applied anything). It is given only for a batch
    /// of valid requests that all needed the account's row — or that failed on its connection
    /// or node ([`Error::ConnectionBroken`], a lost connection, [`Error::ServerUnresponsive`],
    /// ...: a [`Router`](crate::Router) runs such a batch again) with none of them found
    /// applied (a server's `read_only` refusal is such a failure only when no request was
    /// answered without the row: the server still serves those reads, and their answers stand,
    /// as for the single calls): where some request is refused
    /// before anything is sent (an invalid id, amount or key — what its single call answers
    /// without a round trip), is a hold whose expiry the caller's clock refuses (passed, or
    /// too far ahead), or was answered
    /// without the row before the failure (a capture or release of a hold that is not this
    /// account's: [`Error::HoldNotFound`], read lock-free as its single call reads it; a key
    /// found in the journal), such a failure is answered per request instead: those requests
    /// with their answers (the refused hold as its single call answers it: its key looked up,
    /// else [`Error::InvalidExpiry`] — looked up before the batch sends anything else, as its
    /// single call looks it up first, so that a failure that leaves the connection unusable
    /// does not change that answer), every other one with a copy of the failure.
    /// Once the batch has committed the call answers per request: the committed ones with
    /// their entries, the others with the single call's error; a refused one whose key could
    /// not be looked up after the commit (step 4) with [`Error::OutcomeUnknown`], as its single
    /// call answers it. (Through a [`CombiningLedger`](crate::combine::CombiningLedger), whose
    /// batch runs by its earliest caller's deadline, a refused request whose lookup that
    /// deadline cut short has it finished by its own caller's deadline.)
    pub fn apply_many(
        &self,
        conn: &mut MysqlConnection,
        user_id: i64,
        ops: &[AccountOp],
    ) -> Result<Vec<Result<Entry>>> {
        let judged = vec![now(); ops.len()];
        self.apply_many_by(conn, user_id, ops, &judged, self.runner.deadline())
    }

    /// [`apply_many`](Self::apply_many) by `deadline` (a combined batch's: its earliest
    /// caller's), each op's hold expiry judged against its caller's clock reading in `judged`
    /// (a combined request's: when its call was submitted).
    pub(crate) fn apply_many_by(
        &self,
        conn: &mut MysqlConnection,
        user_id: i64,
        ops: &[AccountOp],
        judged: &[NaiveDateTime],
        deadline: Deadline,
    ) -> Result<Vec<Result<Entry>>> {
        if judged.len() != ops.len() {
            return Err(Error::internal(
                "a batch's ops and their clock readings differ in number",
            ));
        }
        // What each single call decides without the server, decided before anything is sent
        // (an expiry is checked against its caller's clock, as the single call checks it).
        let before: Vec<BeforeSending<'_>> = ops
            .iter()
            .zip(judged)
            .map(|(op, at)| op.before_sending(user_id, *at))
            .collect();
        // The keys of holds whose expiry their caller's clock refused, looked up before the
        // batch sends anything else — also before the read that splits it (see `apply_part`).
        let looked_up = self.expired_lookups(conn, &before, deadline);
        // The holds the batch may place: those it sends (not one refused for its input or its
        // expiry, which places nothing and needs no split).
        let places: Vec<bool> = ops
            .iter()
            .zip(&before)
            .map(|(op, before)| {
                matches!(op, AccountOp::Hold { .. }) && matches!(before, BeforeSending::Send)
            })
            .collect();
        // In parts where a capture or release may name a hold the batch places (see
        // `split_at_placed_hold`): each part once the ones before it have run, as their single
        // calls would run one after another, its answers standing whatever the others meet. A
        // failure of every part that applied nothing (no unknown outcome) is the batch's.
        let Some(mut to) = self.split_at_placed_hold(conn, ops, &places, deadline) else {
            return self.apply_part(conn, user_id, ops, before, &looked_up, deadline);
        };
        let mut answers: Vec<Result<Entry>> = Vec::with_capacity(ops.len());
        let mut failures: Vec<Error> = Vec::new();
        let mut parts = 0;
        let mut from = 0;
        let mut looked_up = looked_up;
        while from < ops.len() {
            if from > 0 {
                // Where an earlier part wrote (or may have written) an expired hold's key, the
                // lookup made before the batch sent anything predates its entry.
                self.look_up_again(conn, (ops, &before), &answers, &mut looked_up, deadline);
                to = self
                    .split_at_placed_hold(conn, &ops[from..], &places[from..], deadline)
                    .map_or(ops.len(), |at| from + at);
            }
            parts += 1;
            let part = (
                &ops[from..to],
                before[from..to].to_vec(),
                &looked_up[from..to],
            );
            match self.apply_part(conn, user_id, part.0, part.1, part.2, deadline) {
                Ok(part) => answers.extend(part),
                Err(failure) => {
                    answers.extend((from..to).map(|_| Err(failure.clone())));
                    failures.push(failure);
                }
            }
            from = to;
        }
        match failures.first() {
            Some(failure)
                if failures.len() == parts && !failures.iter().any(Error::is_outcome_unknown) =>
            {
                Err(failure.clone())
            }
            _ => Ok(answers),
        }
    }

    /// Where a batch is split: at the first capture or release, after a hold the batch places
    /// (`places`: per op, a hold it sends),
    /// that names a hold not found now — it may name the hold placed (its id is the batch's
    /// INSERT's), which the single calls made one after another would capture or release, so
    /// it runs once the requests before it have run. The holds named are read with one
    /// statement (per 10,000). `None` (one part) where the batch places no hold before a
    /// capture or release, or they cannot be read (the part then meets that failure itself).
    ///
    /// Never in a [`CombiningLedger`](crate::combine::CombiningLedger)'s batch: its captures and
    /// releases name holds found before they were queued (holds are never deleted), so its one
    /// COMMIT hands the key's turn on, as the combiner expects.
    fn split_at_placed_hold(
        &self,
        conn: &mut MysqlConnection,
        ops: &[AccountOp],
        places: &[bool],
        deadline: Deadline,
    ) -> Option<usize> {
        let first_hold = places.iter().position(|places| *places)?;
        let after = &ops[first_hold + 1..];
        let mut named: Vec<i64> = after
            .iter()
            .filter_map(AccountOp::hold_id)
            .filter(|id| *id > 0)
            .collect();
        if named.is_empty() {
            return None;
        }
        named.sort_unstable();
        named.dedup();
        let found: HashSet<i64> = self
            .runner
            .read_by(conn, deadline, |conn| {
                existing_holds(conn, &named, deadline)
            })
            .ok()?
            .into_iter()
            .collect();
        after
            .iter()
            .position(|op| {
                op.hold_id()
                    .is_some_and(|id| id > 0 && !found.contains(&id))
            })
            .map(|at| first_hold + 1 + at)
    }

    /// The answers, into `looked_up`, of the expired holds from `from` on whose key the batch's
    /// parts before `from` (answered: `answers`) may have written, or found written — as each
    /// one's single call, made after those requests, would find its key. A hold whose key the
    /// first lookup found keeps that answer (a written key never changes). Where an earlier
    /// request of its key was written (`Ok`), may have been (its outcome unknown) or met the
    /// key written by another call (`IdempotencyConflict`), the key is looked up again (the
    /// entry answers: the same request — its hash, which holds a hold's expiry — or a
    /// conflict; a failed lookup answers as its single call's would). Otherwise — the earlier
    /// requests refused, nothing of the key written — the first lookup stands, also once the
    /// batch's deadline or connection is spent.
    fn look_up_again(
        &self,
        conn: &mut MysqlConnection,
        (ops, before): (&[AccountOp], &[BeforeSending<'_>]),
        answers: &[Result<Entry>],
        looked_up: &mut [Option<Result<Entry>>],
        deadline: Deadline,
    ) {
        let from = answers.len();
        let mut again: Vec<BeforeSending<'_>> = vec![BeforeSending::Send; before.len()];
        let mut ask = false;
        for at in from..ops.len() {
            if !matches!(before[at], BeforeSending::Expired(..))
                || matches!(
                    looked_up[at],
                    Some(Ok(_) | Err(Error::IdempotencyConflict { .. }))
                )
            {
                continue;
            }
            let key_met = (0..from).any(|i| {
                matches!(before[i], BeforeSending::Send)
                    && ops[i].key() == ops[at].key()
                    && match &answers[i] {
                        Ok(_) | Err(Error::IdempotencyConflict { .. }) => true,
                        Err(e) => e.is_outcome_unknown(),
                    }
            });
            if key_met {
                again[at] = before[at].clone();
                ask = true;
            }
        }
        if !ask {
            return;
        }
        for (at, answer) in self
            .expired_lookups(conn, &again, deadline)
            .into_iter()
            .enumerate()
        {
            if let Some(answer) = answer {
                looked_up[at] = Some(answer);
            }
        }
    }

    /// The answers of the key lookups of the batch's holds whose expiry their caller's clock
    /// refused (`None` for every other op), all with one read: made first, as each of their
    /// single calls makes it first.
    fn expired_lookups(
        &self,
        conn: &mut MysqlConnection,
        before: &[BeforeSending<'_>],
        deadline: Deadline,
    ) -> Vec<Option<Result<Entry>>> {
        let expired: Vec<(usize, (&Request<'_>, Error))> = before
            .iter()
            .enumerate()
            .filter_map(|(at, b)| match b {
                BeforeSending::Expired(request, refusal) => Some((at, (request, refusal.clone()))),
                _ => None,
            })
            .collect();
        let mut looked_up: Vec<Option<Result<Entry>>> = vec![None; before.len()];
        if expired.is_empty() {
            return looked_up;
        }
        let holds: Vec<(&Request<'_>, Error)> = expired.iter().map(|(_, h)| h.clone()).collect();
        let found = self.expired_holds(conn, &holds, deadline);
        for ((at, _), answer) in expired.iter().zip(found) {
            looked_up[*at] = Some(answer);
        }
        looked_up
    }

    /// [`apply_many_by`](Self::apply_many_by) of a batch, or of a part of it, in one
    /// transaction (and its rounds): `before`, what each single call decides before sending
    /// anything; `looked_up`, [`expired_lookups`](Self::expired_lookups) of its ops.
    fn apply_part(
        &self,
        conn: &mut MysqlConnection,
        user_id: i64,
        ops: &[AccountOp],
        mut before: Vec<BeforeSending<'_>>,
        looked_up: &[Option<Result<Entry>>],
        deadline: Deadline,
    ) -> Result<Vec<Result<Entry>>> {
        // A hold whose expiry its caller's clock refused is answered as its single call answers
        // it, with the first thing that call sends: its key looked up (the entry of a retry of
        // a hold placed in time, else the refusal). Looked up now, before the batch sends
        // anything else, so that its answer does not hang on what the batch meets afterwards —
        // a failed batch's connection may be unusable, its deadline spent. Where a request of
        // the batch before it carries its key, the batch decides it in order (that request's
        // entry answers it: the same request, or a conflict), and this answer stands only if
        // the batch fails, when that request wrote nothing.
        // All of them with one read, made for the whole batch before it sent anything (before
        // the read that splits it too): `looked_up`.
        let expired: Vec<(usize, Result<Entry>)> = before
            .iter()
            .enumerate()
            .filter_map(|(at, b)| match b {
                BeforeSending::Expired(_, refusal) => Some((
                    at,
                    looked_up
                        .get(at)
                        .cloned()
                        .flatten()
                        .unwrap_or_else(|| Err(refusal.clone())),
                )),
                _ => None,
            })
            .collect();
        let mut expired_answers: Vec<Option<Result<Entry>>> = vec![None; ops.len()];
        let mut answered = Vec::new();
        for (at, answer) in expired {
            if ops[..at]
                .iter()
                .any(|earlier| earlier.key() == ops[at].key())
            {
                expired_answers[at] = Some(answer);
            } else {
                answered.push((at, answer));
            }
        }
        for (at, answer) in answered {
            before[at] = BeforeSending::Answered(answer);
        }
        let mut results: Vec<Option<Result<Entry>>> = Vec::with_capacity(ops.len());
        let failure = match self.decide_many_by(conn, user_id, ops, &before, deadline, &mut results)
        {
            Ok(()) => {
                return Ok(results
                    .into_iter()
                    // Past the batch's commit: never "nothing committed" (`Internal`).
                    .map(|r| {
                        r.unwrap_or_else(|| {
                            Err(Error::outcome_unknown(&Error::internal(
                                "batch request left unanswered",
                            )))
                        })
                    })
                    .collect());
            }
            Err(failure) => failure,
        };
        // A node failure stays the whole batch's (a `Router` runs the batch again on the
        // writer, which answers every request), unless a request is refused for its input or
        // was found applied (its key's entry: never answered "nothing applied"). Not a
        // `read_only` refusal: the server still serves the reads that answered some requests
        // (a hold that is not the account's), as it serves their single calls.
        let found_applied = results.iter().any(|r| matches!(r, Some(Ok(_))));
        let whole = failure.is_node_failure()
            && failure.server_kind() != Some(crate::error::ServerErrorKind::ReadOnly);
        if before.iter().all(|b| matches!(b, BeforeSending::Send))
            && ((whole && !found_applied) || results.iter().all(Option::is_none))
        {
            return Err(failure);
        }
        // As the single calls: each refused one answers its refusal, a hold whose expiry passed
        // what its single call answers (its key looked up), and one answered without the
        // account's row before the failure (a hold that is not the account's, a key found in
        // the journal) that answer, whatever the rest met.
        results.resize_with(before.len(), || None);
        // A hold decided in the batch after a request of its key that the batch may have
        // written (sent, and not answered without the row): where the COMMIT's outcome is
        // unknown, that request's entry may answer this one too.
        let after_a_written_key: Vec<bool> = (0..before.len())
            .map(|at| {
                matches!(before[at], BeforeSending::Expired(..))
                    && (0..at).any(|earlier| {
                        ops[earlier].key() == ops[at].key()
                            && matches!(before[earlier], BeforeSending::Send)
                            && results[earlier].is_none()
                    })
            })
            .collect();
        Ok(before
            .into_iter()
            .zip(results)
            .zip(expired_answers)
            .zip(after_a_written_key)
            .map(
                |(((before, settled), expired), after_written)| match (settled, before) {
                    (_, BeforeSending::Refused(refusal)) => Err(refusal),
                    (_, BeforeSending::Answered(answer)) => answer,
                    // Found in the journal by a round's key lookup (its key was committed by
                    // another call meanwhile): that answer, as its single call made then finds.
                    (Some(found), BeforeSending::Expired(..)) => found,
                    (_, BeforeSending::Expired(..))
                        if after_written && failure.is_outcome_unknown() =>
                    {
                        Err(failure.clone())
                    }
                    (_, BeforeSending::Expired(_, refusal)) => expired.unwrap_or(Err(refusal)),
                    (Some(settled), BeforeSending::Send) => settled,
                    (None, BeforeSending::Send) => Err(failure.clone()),
                },
            )
            .collect())
    }

    /// [`apply_many_by`](Self::apply_many_by): the answers in `results` (one per request once
    /// the batch's holds are read: `None` where a request is not answered yet), and a failure
    /// before the commit as the `Err` (`results` then keeps what was answered without the
    /// account's row).
    fn decide_many_by(
        &self,
        conn: &mut MysqlConnection,
        user_id: i64,
        ops: &[AccountOp],
        before: &[BeforeSending<'_>],
        deadline: Deadline,
        results: &mut Vec<Option<Result<Entry>>>,
    ) -> Result<()> {
        // Only the holds of the requests it sends: one refused before sending (its input, or
        // the account id) reads nothing, as its single call reads nothing.
        let sent: Vec<&AccountOp> = ops
            .iter()
            .zip(before)
            .filter(|(_, before)| !matches!(before, BeforeSending::Refused(_)))
            .map(|(op, _)| op)
            .collect();
        let holds = self.ended_holds(conn, &sent, deadline)?;
        let mut requests: Vec<Request<'_>> = Vec::with_capacity(ops.len());
        let holds: HashMap<i64, &Hold> = holds.iter().map(|hold| (hold.id, hold)).collect();
        // A request answered already: never decided, never written.
        let answered = || Request::plain(EntryKind::Charge, user_id, Decimal::ZERO, "");
        for (op, before) in ops.iter().zip(before) {
            match before {
                BeforeSending::Answered(answer) => {
                    results.push(Some(answer.clone()));
                    requests.push(answered());
                    continue;
                }
                // What its single call answers before sending anything, whatever the read of
                // the holds finds.
                BeforeSending::Refused(refusal) => {
                    results.push(Some(Err(refusal.clone())));
                    requests.push(answered());
                    continue;
                }
                _ => {}
            }
            // Its input was checked before anything was sent (`BeforeSending`): a request
            // here is one to send, only the hold it ends is read now.
            let hold = op.hold_id().and_then(|id| holds.get(&id).copied());
            let request = op.request(user_id, hold).map(|mut request| {
                // The caller's clock judges a hold's expiry once, before anything is sent,
                // as for its single call: a second look after the holds' read could judge
                // a hold at a bound otherwise, and a batch that then fails would answer a
                // hold it wrote as refused.
                request.expiry_refused = match before {
                    BeforeSending::Expired(first, _) => first.expiry_refused,
                    _ => None,
                };
                request
            });
            match request {
                Ok(request) => {
                    results.push(None);
                    requests.push(request);
                }
                Err(refusal) => {
                    results.push(Some(Err(refusal)));
                    requests.push(answered());
                }
            }
        }
        // `Some` if the account was missing when the batch first locked it: then, as for single
        // calls, a deduct before the batch's first charge finds no account — or before the
        // request it holds, the first one answered from the journal (its entry is the
        // account's, so the account exists for every request after it).
        let mut missing_before: Option<usize> = None;
        // Optimistic first: no key lookup before the write, as in the single path.
        let mut lookup_first = false;
        for round in 0.. {
            if lookup_first {
                // Nothing has been committed yet, but a key of the batch is in the journal (the
                // unique index refused it): a request still open may have been applied by an
                // earlier call under its key, and the batch cannot tell which — each is
                // answered as its single call answers a failed lookup after a refusal
                // (`Error::unknown_after_refusal`), never with the failure, which would say
                // that nothing was applied. The answers found so far stay.
                let open = unanswered(results);
                let rows =
                    match self.journal_rows_by(conn, deadline, user_id, &keys(&requests, &open)) {
                        Ok(rows) => rows,
                        Err(failure) => {
                            for index in open {
                                results[index] = Some(Err(
                                    Error::unknown_after_refusal_by_deadline(failure.clone(), None),
                                ));
                            }
                            return Ok(());
                        }
                    };
                for index in open {
                    results[index] = requests[index].answer_from(&rows);
                    if let (Some(_), Some(first)) = (&results[index], missing_before.as_mut()) {
                        *first = (*first).min(index);
                    }
                }
            }
            let pending = unanswered(results);
            if pending.is_empty() {
                break;
            }
            let decided = match self.batch_round(
                conn,
                user_id,
                &requests,
                &pending,
                deadline,
                &mut missing_before,
            ) {
                Ok(decided) => decided,
                // Each such round answers at least the request whose key another call
                // committed meanwhile (the lookup sees it), so this ends.
                Err(e) if e.is_duplicate() && round < requests.len() => {
                    lookup_first = true;
                    continue;
                }
                Err(e) => {
                    // Found missing, the account was then to be created for a charge, which
                    // failed: the requests before that charge were answered as the account was
                    // read (their single calls answer so without waiting for any lock: a row
                    // that does not exist is not held), whatever the charge met.
                    if let Some(first) = missing_before {
                        for (index, refusal) in refused_while_missing(&requests, &pending, first) {
                            results[index] = Some(refusal);
                        }
                    }
                    return Err(e);
                }
            };
            // From here on the batch has committed: every answer is per request.
            let written: HashSet<&str> = decided
                .iter()
                .filter(|(_, result)| result.is_ok())
                .map(|(index, _)| requests[*index].key)
                .collect();
            let mut refused = Vec::new();
            for (index, result) in decided {
                match result {
                    // A key this batch wrote was free when the request was refused; any other
                    // key may have been committed meanwhile (also between a lookup of an
                    // earlier round and this round's lock), so it is looked up afterwards.
                    Err(e) if e.replay_may_apply() && !written.contains(requests[index].key) => {
                        refused.push((index, e))
                    }
                    other => results[index] = Some(other),
                }
            }
            let open: Vec<usize> = refused.iter().map(|(index, _)| *index).collect();
            match self.journal_rows_by(conn, deadline, user_id, &keys(&requests, &open)) {
                Ok(rows) => {
                    for (index, refusal) in refused {
                        let answer = requests[index].answer_from(&rows);
                        results[index] = Some(answer.unwrap_or(Err(refusal)));
                    }
                }
                Err(failure) => {
                    // Its key may have been recorded by an earlier call: as its single call
                    // answers it (`Error::unknown_after_refusal`) — with what a combiner needs
                    // to finish the lookup by the request's own caller's deadline. Not where
                    // the refusal shows that no call of the request can have been applied (an
                    // account that did not exist, a hold that ended otherwise): it stands, as
                    // for its single call (`Error::refusal_proves_unapplied`).
                    let (stands, refused): (Vec<_>, Vec<_>) =
                        refused.into_iter().partition(|(index, refusal)| {
                            refusal.refusal_proves_unapplied(requests[*index].kind)
                        });
                    for (index, refusal) in stands {
                        results[index] = Some(Err(refusal));
                    }
                    for (index, refusal) in refused {
                        let lookup = KeyLookup::of(&requests[index], refusal);
                        results[index] = Some(Err(Error::unknown_after_refusal_by_deadline(
                            failure.clone(),
                            Some(lookup),
                        )));
                    }
                }
            }
            break;
        }
        Ok(())
    }

    /// One round of a batch: the batch transaction (run again to create the account when it is
    /// missing and the batch has a charge); the decision for every pending request. Nothing is
    /// committed when it fails.
    fn batch_round(
        &self,
        conn: &mut MysqlConnection,
        user_id: i64,
        requests: &[Request<'_>],
        pending: &[usize],
        deadline: Deadline,
        missing_before: &mut Option<usize>,
    ) -> Result<Vec<(usize, Result<Entry>)>> {
        // Whether to create the missing account (in the batch's transaction: a batch that
        // fails leaves none behind).
        let mut create = false;
        loop {
            let missing = *missing_before;
            // The account was found missing: the attempt ends with a ROLLBACK (its marker
            // error), not an empty COMMIT, which in a combiner would hand the key's turn on (and
            // count as a commit) while this batch goes on.
            // A key taken (the journal's unique index) stays the answer when the runner could
            // not end the attempt: the keys' lookup then fails, and answers OutcomeUnknown.
            let attempt = self
                .runner
                .run_by_keeping(conn, deadline, Error::is_duplicate, |conn| {
                    let insert_ids = self.runner.insert_ids(conn)?;
                    let Some(mut account) =
                        lock_or_create(conn, user_id, Holding::Nothing, create)?
                    else {
                        #[cfg(test)]
                        super::tests::after_account_missing(conn);
                        return Err(super::idempotency::account_missing());
                    };
                    let ended: Vec<i64> = pending
                        .iter()
                        .filter_map(|i| requests[*i].ended_hold())
                        .collect();
                    // A statement per hold: none once the batch's deadline has passed.
                    let holds = lock_holds(conn, &ended, Some(deadline))?;
                    // The server clock, for the holds it ends and the holds it places.
                    let places = pending.iter().any(|i| requests[*i].kind == EntryKind::Hold);
                    let now = match holds.is_empty() && !places {
                        true => None,
                        false => Some(account.clock(conn)?),
                    };
                    let locked = Locked {
                        account: &account,
                        holds,
                        now,
                    };
                    apply_planned(
                        conn, insert_ids, locked, missing, requests, pending, deadline,
                    )
                });
            match attempt {
                Ok(decided) => return Ok(decided),
                // Only the marker itself: a failure of the runner after it (its ROLLBACK, the
                // watchdog) is the batch's.
                Err(e) if super::idempotency::is_account_missing(&e) => {
                    missing_before.get_or_insert(usize::MAX);
                    let any_charge = pending
                        .iter()
                        .any(|i| requests[*i].kind == EntryKind::Charge);
                    if create || !any_charge {
                        // As the single calls: no account, and nothing here creates one (a
                        // hold whose expiry passed is refused for that before any account).
                        let refusal = |i: usize| {
                            Err(requests[i]
                                .expiry_refusal()
                                .unwrap_or(Error::AccountNotFound { user_id }))
                        };
                        return Ok(pending.iter().map(|i| (*i, refusal(*i))).collect());
                    }
                    create = true;
                }
                Err(failure) => return Err(failure),
            }
        }
    }
}

impl BalanceLedger {
    /// The holds the batch's captures and releases name (valid ids only), read lock-free by
    /// `deadline`: their account and amount never change, and they decide the requests' hashes.
    fn ended_holds(
        &self,
        conn: &mut MysqlConnection,
        ops: &[&AccountOp],
        deadline: Deadline,
    ) -> Result<Vec<Hold>> {
        let mut ids: Vec<i64> = ops
            .iter()
            .filter_map(|op| op.hold_id())
            .filter(|id| *id > 0)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        self.runner.read_by(conn, deadline, |conn| {
            let mut holds = Vec::with_capacity(ids.len());
            for id in &ids {
                // A statement per hold: none once the deadline has passed.
                deadline.before_next_statement()?;
                holds.extend(find_hold(conn, *id)?);
            }
            Ok(holds)
        })
    }
}

/// A capture's or release's input, checked as its single call checks it before anything else.
pub(crate) fn check_ending(op: &AccountOp) -> Result<()> {
    match op {
        AccountOp::Capture {
            hold_id,
            amount,
            key,
        } => validate_ending(*hold_id, Some(*amount), key),
        AccountOp::Release { hold_id, key } => validate_ending(*hold_id, None, key),
        _ => Ok(()),
    }
}

/// How a capture or release ends its hold: the state and the amount captured.
type HoldEnd = (HoldState, Decimal);

/// What a batch transaction holds locked: the account, the holds its captures and releases
/// end, and the server clock read under the account's lock (when it ends or places holds).
struct Locked<'a> {
    account: &'a Account,
    /// In ascending id order (as [`lock_holds`] returns them).
    holds: Vec<Hold>,
    now: Option<chrono::NaiveDateTime>,
}

/// The keys of the requests `open`.
fn keys<'a>(requests: &[Request<'a>], open: &[usize]) -> Vec<&'a str> {
    open.iter().map(|i| requests[*i].key).collect()
}

/// The requests of a batch that have no answer yet.
fn unanswered(results: &[Option<Result<Entry>>]) -> Vec<usize> {
    (0..results.len())
        .filter(|i| results[*i].is_none())
        .collect()
}

/// The answers of the pending requests of a batch whose account was missing that come before
/// its first charge (and before `first`, the first request answered from the journal): each
/// refused as its single call refuses it on an account that does not exist — its expiry, else
/// [`Error::AccountNotFound`] — as [`apply_planned`] decides them.
fn refused_while_missing(
    requests: &[Request<'_>],
    pending: &[usize],
    first: usize,
) -> Vec<(usize, Result<Entry>)> {
    pending
        .iter()
        .take_while(|&&index| index <= first && requests[index].kind != EntryKind::Charge)
        .map(|&index| {
            let request = &requests[index];
            let refusal = request.expiry_refusal().unwrap_or(Error::AccountNotFound {
                user_id: request.user_id,
            });
            (index, Err(refusal))
        })
        .collect()
}

/// Inside the batch transaction, with the account (and the holds the batch ends) locked:
/// decides every pending request in order against the running balance and the running state of
/// each hold (as if they were made one after another), writes the accepted ones with one
/// multi-row INSERT ([`insert_entries`]), the new holds with another ([`insert_holds`]), ends
/// the holds captured or released ([`end_hold`]) and stores the final balance
/// ([`store_balance`]) — the single call's statements, for N rows.
/// `missing_before`: `Some` if the account did not exist when the batch began, so until the
/// first charge a deduct or hold finds no account (the single call's answer) — unless it comes
/// after the request `missing_before` holds, the first answered from the journal, whose entry
/// shows the account exists.
fn apply_planned(
    conn: &mut MysqlConnection,
    insert_ids: InsertIds,
    mut locked: Locked<'_>,
    missing_before: Option<usize>,
    requests: &[Request<'_>],
    pending: &[usize],
    deadline: Deadline,
) -> Result<Vec<(usize, Result<Entry>)>> {
    let account = locked.account;
    let mut running = *account;
    let mut exists = missing_before.is_none();
    // (request index, balance after, request hash, how it ends a hold) of every row to write.
    let mut new_rows: Vec<(usize, Decimal, String, Option<HoldEnd>)> = Vec::new();
    let mut written_keys: HashMap<&str, usize> = HashMap::new();
    let mut decisions: Vec<(usize, Decision)> = Vec::with_capacity(pending.len());
    for &index in pending {
        let request = &requests[index];
        let hash = request.hash();
        if missing_before.is_some_and(|first| index > first) {
            exists = true;
        }
        let decision = match (written_keys.get(request.key), request.expiry_refusal()) {
            (Some(&n), _) if new_rows[n].2 == hash => Decision::SameAs(n),
            (Some(&n), _) => Decision::Conflict(n),
            // Its key was free when it came (the single call's order: its key, then its
            // expiry); a key recorded before the batch answers it after the commit.
            (None, Some(refusal)) => Decision::Refused(refusal),
            (None, None) if !exists && request.kind != EntryKind::Charge => {
                Decision::Refused(Error::AccountNotFound {
                    user_id: account.user_id,
                })
            }
            (None, None) => {
                // A single charge creates the account before it is decided.
                exists = true;
                match decide(&running, &mut locked, request) {
                    Ok((after, ends)) => {
                        running = after;
                        new_rows.push((index, after.balance, hash, ends));
                        written_keys.insert(request.key, new_rows.len() - 1);
                        Decision::New(new_rows.len() - 1)
                    }
                    Err(refusal) => Decision::Refused(refusal),
                }
            }
        };
        decisions.push((index, decision));
    }
    let created_at = now();
    let rows: Vec<_> = new_rows
        .iter()
        .map(|(index, after, hash, _)| requests[*index].row(hash, *after, None, created_at))
        .collect();
    let entries = insert_entries(conn, Some(insert_ids), &rows, Some(deadline))?;
    let placed: Vec<_> = new_rows
        .iter()
        .zip(&entries)
        .filter_map(|((index, ..), entry)| requests[*index].expires_at.map(|at| (entry, at)))
        .collect();
    insert_holds(conn, &placed, Some(deadline))?;
    for ((index, _, _, ends), entry) in new_rows.iter().zip(&entries) {
        if let (Some((state, captured)), Some(hold_id)) = (ends, requests[*index].ended_hold()) {
            // A statement per hold ended: none once the batch's deadline has passed.
            deadline.before_next_statement()?;
            end_hold(conn, hold_id, *state, *captured, entry)?;
        }
    }
    if !entries.is_empty() {
        store_balance(conn, account, &running, entries.len())?;
    }
    Ok(decisions
        .into_iter()
        .map(|(index, decision)| {
            let result = match decision {
                Decision::New(n) | Decision::SameAs(n) => Ok(entries[n].clone()),
                Decision::Conflict(n) => Err(Error::IdempotencyConflict {
                    user_id: account.user_id,
                    key: requests[index].key.to_owned(),
                    existing_entry_id: entries[n].id,
                }),
                Decision::Refused(refusal) => Err(refusal),
            };
            (index, result)
        })
        .collect())
}

/// One request decided on the `running` account: the account after it and, for a capture or
/// release, the state it ends its hold in and the amount captured (the hold's running state is
/// updated, so a second end of it in the batch is refused as the single call would be).
fn decide(
    running: &Account,
    locked: &mut Locked<'_>,
    request: &Request<'_>,
) -> Result<(Account, Option<HoldEnd>)> {
    match request.kind {
        EntryKind::Hold => {
            let (expires_at, now) = request
                .expires_at
                .zip(locked.now)
                .ok_or_else(|| Error::internal("a hold decided without its expiry or the clock"))?;
            Ok((running.reserve(request.amount, expires_at, now)?, None))
        }
        EntryKind::Capture | EntryKind::Release => {
            let hold_id = request.ended_hold().unwrap_or_default();
            let now = locked.now.ok_or(Error::HoldNotFound { hold_id })?;
            // `lock_holds` returns them in ascending id order.
            let found = locked.holds.binary_search_by_key(&hold_id, |hold| hold.id);
            let hold = found
                .ok()
                .and_then(|at| locked.holds.get_mut(at))
                .ok_or(Error::HoldNotFound { hold_id })?;
            let (after, state, captured) = ending(running, hold, request, now)?;
            hold.state = state;
            Ok((after, Some((state, captured))))
        }
        kind => Ok((running.after(kind, request.amount)?, None)),
    }
}
