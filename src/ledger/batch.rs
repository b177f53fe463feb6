//! The batch planner: [`BalanceLedger::apply_many`] decides many charges and deducts of one
//! account in order against the running balance and writes them with the same statements as
//! the single calls ([`rows`](super::rows)), so that each request is answered exactly as the
//! single call would have answered it.

use std::collections::{HashMap, HashSet};

use diesel::mysql::MysqlConnection;

use super::idempotency::Step;
use super::request::Request;
use super::rows::{create_account, insert_entries, lock_account, store_balance, Account};
use super::types::{AccountOp, Entry};
use super::BalanceLedger;
use crate::error::{Error, Result, ServerError, ServerErrorKind};
use crate::records::EntryKind;
use crate::txn::{Deadline, InsertIds};
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
    /// Applies many charges and deducts to ONE account in one transaction, in the given order,
    /// each checked against the running balance. Each request gets its own result, exactly as
    /// the single calls made one after another would have answered it: a refused or invalid
    /// request never fails its neighbours, keys keep their meaning (inside the batch and against
    /// the journal), and a deduct that comes before the batch's first charge of an account that
    /// does not exist yet is [`Error::AccountNotFound`].
    ///
    /// Statement by statement (one [`Deadline`] for the whole call, shared by every step):
    /// 1. `SELECT ... FROM user_balance WHERE user_id = ? FOR UPDATE NOWAIT` — the account row,
    ///    locked once for the whole batch. A missing account is created first by a separate
    ///    short transaction (`INSERT IGNORE`), as for a single charge, and only if the batch
    ///    has a charge.
    /// 2. With the row locked, every request is decided in order against the running balance;
    ///    the accepted ones are written with ONE multi-row `INSERT` into the journal, then
    ///    `LAST_INSERT_ID()` (or an id lookup through the unique key, where the server does not
    ///    number one INSERT's rows consecutively), ONE `UPDATE` of the balance and `COMMIT`.
    /// 3. A key already in the journal fails that INSERT as a duplicate (nothing written); the
    ///    keys are then looked up in a lock-free snapshot, those requests are answered from the
    ///    journal, and the rest run again from step 1 (at most four rounds).
    /// 4. After the commit, a request refused for the balance (or a missing account) under a key
    ///    that the batch did not write is looked up in the journal, lock-free: a key that exists
    ///    answers it, as it answers the single call.
    ///
    /// # Errors
    /// The outer `Err` is a failure before anything was committed ([`Error::Contended`],
    /// [`Error::Timeout`], [`Error::NestedTransaction`], [`Error::ConnectionBroken`],
    /// [`Error::Server`]): then no request in the batch was applied (or, for
    /// [`Error::OutcomeUnknown`] of the COMMIT, all or none were). Once the batch has committed
    /// the call answers per request: the committed ones with their entries, the others with
    /// the single call's error; a refused one whose key could not be looked up after the commit
    /// (step 4) with [`Error::OutcomeUnknown`].
    pub fn apply_many(
        &self,
        conn: &mut MysqlConnection,
        user_id: i64,
        ops: &[AccountOp],
    ) -> Result<Vec<Result<Entry>>> {
        self.apply_many_by(conn, user_id, ops, self.runner.deadline())
    }

    /// [`apply_many`](Self::apply_many) by `deadline` (a combined batch's: its earliest caller's).
    pub(crate) fn apply_many_by(
        &self,
        conn: &mut MysqlConnection,
        user_id: i64,
        ops: &[AccountOp],
        deadline: Deadline,
    ) -> Result<Vec<Result<Entry>>> {
        let requests: Vec<Request<'_>> = ops.iter().map(|op| op.request(user_id)).collect();
        let mut results: Vec<Option<Result<Entry>>> = requests
            .iter()
            .map(|r| r.validate().err().map(Err))
            .collect();
        // Whether the account was missing when the batch first locked it: then, as for single
        // calls, a deduct before the batch's first charge finds no account.
        let mut account_was_missing = false;
        // Optimistic first: no key lookup before the write, as in the single path.
        let mut lookup_first = false;
        for round in 0.. {
            if lookup_first {
                // Nothing has been committed yet: a failure here fails the whole call.
                let open = unanswered(&results);
                let rows =
                    self.journal_rows_by(conn, deadline, user_id, &keys(&requests, &open))?;
                for index in open {
                    results[index] = requests[index].answer_from(&rows);
                }
            }
            let pending = unanswered(&results);
            if pending.is_empty() {
                break;
            }
            let decided = match self.batch_round(
                conn,
                user_id,
                &requests,
                &pending,
                deadline,
                &mut account_was_missing,
            ) {
                Ok(decided) => decided,
                Err(e) if e.server_kind() == Some(ServerErrorKind::DuplicateKey) && round < 3 => {
                    lookup_first = true;
                    continue;
                }
                Err(e) => return Err(e),
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
                    for (index, _) in refused {
                        results[index] = Some(Err(outcome_unknown(&failure)));
                    }
                }
            }
            break;
        }
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::internal("batch request left unanswered"))))
            .collect())
    }

    /// One round of a batch: the account-creation transaction if needed, then the batch
    /// transaction; the decision for every pending request. Nothing is committed when it fails.
    fn batch_round(
        &self,
        conn: &mut MysqlConnection,
        user_id: i64,
        requests: &[Request<'_>],
        pending: &[usize],
        deadline: Deadline,
        account_was_missing: &mut bool,
    ) -> Result<Vec<(usize, Result<Entry>)>> {
        let mut created = false;
        loop {
            let missing = *account_was_missing;
            let attempt = self.runner.run_by(conn, deadline, |conn| {
                let insert_ids = self.runner.insert_ids(conn)?;
                let Some(account) = lock_account(conn, user_id)? else {
                    return Ok(Step::CreateAccount(user_id));
                };
                apply_planned(conn, insert_ids, &account, missing, requests, pending)
                    .map(Step::Done)
            })?;
            match attempt {
                Step::Done(decided) => return Ok(decided),
                Step::CreateAccount(_) => {
                    *account_was_missing = true;
                    let any_charge = pending
                        .iter()
                        .any(|i| requests[*i].kind == EntryKind::Charge);
                    if created || !any_charge {
                        // As the single calls: no account, and nothing here creates one.
                        let missing = || Err(Error::AccountNotFound { user_id });
                        return Ok(pending.iter().map(|i| (*i, missing())).collect());
                    }
                    self.runner
                        .run_by(conn, deadline, |conn| create_account(conn, user_id))?;
                    created = true;
                }
            }
        }
    }
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

/// [`Error::OutcomeUnknown`] for a request that may have been applied (by another call with
/// its key) but could not be checked because of `failure`: the server's error when there is one.
fn outcome_unknown(failure: &Error) -> Error {
    let source = failure.server_error().cloned().unwrap_or_else(|| {
        ServerError::new(diesel::result::Error::QueryBuilderError(
            failure.to_string().into(),
        ))
    });
    Error::OutcomeUnknown { source }
}

/// Inside the batch transaction, with the account locked: decides every pending request in
/// order against the running balance (as if they were made one after another), writes the
/// accepted ones with one multi-row INSERT ([`insert_entries`]) and stores the final balance
/// ([`store_balance`]) — the single call's statements, for N rows.
/// `account_was_missing`: the account did not exist when the batch began, so until the first
/// charge a deduct finds no account (the single call's answer).
fn apply_planned(
    conn: &mut MysqlConnection,
    insert_ids: InsertIds,
    account: &Account,
    account_was_missing: bool,
    requests: &[Request<'_>],
    pending: &[usize],
) -> Result<Vec<(usize, Result<Entry>)>> {
    let mut running = *account;
    let mut exists = !account_was_missing;
    // (request index, balance after, request hash) of every row to write.
    let mut new_rows: Vec<(usize, rust_decimal::Decimal, String)> = Vec::new();
    let mut written_keys: HashMap<&str, usize> = HashMap::new();
    let mut decisions: Vec<(usize, Decision)> = Vec::with_capacity(pending.len());
    for &index in pending {
        let request = &requests[index];
        let hash = request.hash();
        let decision = match written_keys.get(request.key) {
            Some(&n) if new_rows[n].2 == hash => Decision::SameAs(n),
            Some(&n) => Decision::Conflict(n),
            None if !exists && request.kind == EntryKind::Deduct => {
                Decision::Refused(Error::AccountNotFound {
                    user_id: account.user_id,
                })
            }
            None => {
                // A single charge creates the account before it is decided.
                exists = true;
                match running.after(request.kind, request.amount) {
                    Ok(after) => {
                        running.balance = after;
                        new_rows.push((index, after, hash));
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
        .map(|(index, after, hash)| requests[*index].row(hash, *after, None, created_at))
        .collect();
    let entries = insert_entries(conn, Some(insert_ids), &rows)?;
    if !entries.is_empty() {
        store_balance(conn, account, running.balance, entries.len())?;
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
