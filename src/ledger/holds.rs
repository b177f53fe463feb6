//! Holds: [`BalanceLedger::hold`], [`capture`](BalanceLedger::capture),
//! [`release`](BalanceLedger::release), [`expire_holds`](BalanceLedger::expire_holds) and
//! [`hold_status`](BalanceLedger::hold_status).
//!
//! A hold reserves points on an account without posting them: the *available* balance is the
//! posted balance minus the active holds whose `expires_at` is still ahead of the server clock
//! (`UTC_TIMESTAMP(6)`, read inside the same locked transaction), so a hold stops reserving the
//! moment it expires, whether or not anything has run. Each hold ends exactly once:
//!
//! ```text
//!            capture (≤ amount; the rest released)
//!          ┌──────────────────────────────▶ captured
//! active ──┼─ release ────────────────────▶ released
//!          └─ expires_at passes, then ────▶ expired
//!             expire_holds marks it
//! ```
//!
//! # Statements, in order (one SERIALIZABLE transaction, through the runner)
//! * `hold` is a deduct that posts nothing: `SELECT balance, held, version FROM user_balance
//!   WHERE user_id = ? FOR UPDATE NOWAIT`; the server clock and the sum of the account's
//!   unexpired active holds (`HeldFunds`, one statement on the `(user_id, state, expires_at)`
//!   index; the same statement reads them for any operation on an account with `held > 0`);
//!   the checks `expires_at` after that clock (else `InvalidExpiry`, as the caller's clock is
//!   checked before anything is sent) and `available >= amount`; the journal
//!   `INSERT` (kind `hold`, `balance_after` = the unchanged posted balance) and
//!   `LAST_INSERT_ID()`; the `balance_hold` `INSERT` (its id is the entry's); the account
//!   `UPDATE` (`held + amount`, `version + 1`); `COMMIT`.
//! * `capture` and `release` read the hold first, lock-free (its account and amount never
//!   change), then: the account row `FOR UPDATE NOWAIT` (as above, with the clock); the hold row
//!   `FOR UPDATE NOWAIT` by primary key; the checks (active, not expired on the clock read under
//!   the lock, a capture not above the hold); the journal `INSERT` (kind `capture` or `release`,
//!   `related_entry_id` and `ended_hold_id` = the hold; the UNIQUE key on `ended_hold_id` makes a
//!   second end of one hold impossible); `UPDATE balance_hold` (state, captured amount, end
//!   time, ending entry); the account `UPDATE` (`balance - captured`, `held - amount`,
//!   `version + 1`); `COMMIT`.
//! * `expire_holds` reads up to `limit` due holds (`state = 'active' AND expires_at <=
//!   UTC_TIMESTAMP(6)`, on the `(state, expires_at)` index) in a lock-free snapshot, then per
//!   account in ascending `user_id` order one transaction per [`EXPIRY_PER_TRANSACTION`] of
//!   its due holds, each tried ONCE: the account row `FOR UPDATE NOWAIT` — refused (a caller
//!   or another sweeper holds it): the account is skipped and reported; then in ascending id
//!   order each due hold `FOR UPDATE NOWAIT` and, if it is still active and expired on the
//!   clock read under the lock, an `expire` entry (no key) and the hold's `UPDATE`; one account
//!   `UPDATE`; `COMMIT`. A transaction takes no further hold once the call's deadline has
//!   passed (it commits the ones it marked; the account is reported skipped), so a sweep of
//!   many holds neither outlives its deadline by more than one hold's statements and the
//!   COMMIT nor keeps an account locked for long. While fewer than `limit` holds are marked and
//!   the deadline allows, the due holds are read again without the accounts skipped so far
//!   (bounded by the deadline, by [`EXPIRY_PASSES`] reads, and by the length of that list:
//!   once 10,000 accounts are skipped the sweep answers what it did), so accounts locked all
//!   along cannot starve the others.
//!
//! Lock order everywhere: the account row, then its holds in ascending id order (a transfer:
//! both accounts in ascending `user_id` order). Only transactions holding an account's row lock
//! write its holds, so the hold checks and the `HeldFunds` sum see a state no one else changes
//! before COMMIT. Under SERIALIZABLE the sum takes shared locks on the account's `active` range
//! of the `(user_id, state, expires_at)` index and the gap after it; an account without active
//! holds skips the read, so deducts and charges of accounts that never hold anything run the
//! same statements as before.
//!
//! Idempotency is the journal's, as for every other call: a hold, capture or release carries
//! its key; the same key and request answer the original entry, another request
//! [`Error::IdempotencyConflict`]; a refusal (insufficient balance, hold not active, expired,
//! capture above the hold) first looks the key up, so a retried call that already succeeded
//! gets its entry back rather than the refusal.

use std::collections::BTreeMap;

use diesel::dsl::sql;
use diesel::mysql::MysqlConnection;
use diesel::prelude::*;
use rust_decimal::Decimal;

use super::ops::{one, write_entry};
use super::request::Request;
use super::rows::{
    end_hold, find_hold, insert_entries, lock_account, lock_holds, store_balance, Account,
};
use super::types::{Entry, ExpiredHolds, Hold};
use super::BalanceLedger;
use crate::error::{Error, Result};
use crate::records::{EntryKind, HoldState};
use crate::schema::balance_hold;
use crate::statements::MAX_LIST_VALUES;
use crate::txn::{Deadline, Holding};
use crate::util::now;
use crate::validate::{validate_amount, validate_id, validate_key};

/// Largest `limit` of [`BalanceLedger::expire_holds`].
pub const MAX_EXPIRY_BATCH: u32 = 1000;

/// Most holds [`BalanceLedger::expire_holds`] marks in one transaction (one account's): each
/// costs four statements under the account's lock.
const EXPIRY_PER_TRANSACTION: usize = 64;

/// Most reads of the due holds one [`BalanceLedger::expire_holds`] makes (each without the
/// accounts skipped before it): as many as holds it may mark — a read marks a hold or skips an
/// account it had not met (but where others ended the holds it read meanwhile), and the call's
/// deadline ends them first.
const EXPIRY_PASSES: u32 = MAX_EXPIRY_BATCH;

impl BalanceLedger {
    /// Reserves `amount` of `user_id`'s available balance until `expires_at` (UTC, compared
    /// with the server clock) without posting it. Returns the hold's journal entry (kind
    /// [`EntryKind::Hold`]); its id is the hold's id.
    ///
    /// Safe to retry with the same key and request, also after `expires_at` has passed (a
    /// retry after [`Error::OutcomeUnknown`], say), and on a clock behind the one that placed it
    /// (to which the expiry is more than [`MAX_HOLD_DURATION`](crate::ledger::MAX_HOLD_DURATION)
    /// ahead): it answers the recorded entry. An expiry refused on the caller's clock is
    /// refused only when the key was not recorded (looked up first: where that lookup cannot
    /// be made, [`Error::OutcomeUnknown`]).
    ///
    /// # Errors
    /// Invalid input ([`Error::InvalidId`], [`Error::InvalidAmount`],
    /// [`Error::InvalidIdempotencyKey`], [`Error::InvalidExpiry`]: not in the future — on the
    /// caller's clock before anything is sent, and on the server's under the account's lock,
    /// which every later check of the hold reads — or more than
    /// [`MAX_HOLD_DURATION`](crate::ledger::MAX_HOLD_DURATION) ahead);
    /// [`Error::InsufficientBalance`] when the available balance is smaller;
    /// [`Error::BalanceLimitExceeded`] when the amount the account holds would pass what
    /// DECIMAL(19,4) holds — the stored total counts holds that have expired until
    /// [`expire_holds`](Self::expire_holds) records them, so this can refuse a hold that the
    /// available balance covers (expire the account's holds first);
    /// [`Error::AccountNotFound`]; [`Error::IdempotencyConflict`]; and the runner's failures, as
    /// for [`charge`](Self::charge).
    pub fn hold(
        &self,
        conn: &mut MysqlConnection,
        user_id: i64,
        amount: Decimal,
        idempotency_key: &str,
        expires_at: chrono::NaiveDateTime,
    ) -> Result<Entry> {
        let request = Request::hold(user_id, amount, idempotency_key, expires_at);
        self.change(conn, &request, self.runner.deadline())
    }

    /// Captures `amount` of the active hold `hold_id`: posts it as a debit (kind
    /// [`EntryKind::Capture`], linked to the hold) and ends the hold — a partial capture
    /// releases the rest. A hold is captured at most once. The key belongs to the hold's
    /// account.
    ///
    /// # Errors
    /// Invalid input; [`Error::HoldNotFound`]; [`Error::HoldNotActive`] (already captured or
    /// released); [`Error::HoldExpired`] (its expiry passed on the server clock);
    /// [`Error::CaptureExceedsHold`]; [`Error::IdempotencyConflict`]; and the runner's failures,
    /// as for [`charge`](Self::charge).
    pub fn capture(
        &self,
        conn: &mut MysqlConnection,
        hold_id: i64,
        amount: Decimal,
        idempotency_key: &str,
    ) -> Result<Entry> {
        let deadline = self.runner.deadline();
        self.end_hold_by(
            conn,
            (hold_id, None),
            Some(amount),
            idempotency_key,
            deadline,
        )
    }

    /// Releases (voids) the active hold `hold_id`: its amount is available again, nothing is
    /// posted (an entry of kind [`EntryKind::Release`] for the hold's amount, linked to it).
    ///
    /// # Errors
    /// As [`capture`](Self::capture), without [`Error::CaptureExceedsHold`].
    pub fn release(
        &self,
        conn: &mut MysqlConnection,
        hold_id: i64,
        idempotency_key: &str,
    ) -> Result<Entry> {
        let deadline = self.runner.deadline();
        self.end_hold_by(conn, (hold_id, None), None, idempotency_key, deadline)
    }

    /// The hold `hold_id` as stored, from a lock-free snapshot. An `Active` hold whose
    /// `expires_at` has passed is expired (it reserves nothing) but not yet marked.
    ///
    /// # Errors
    /// [`Error::InvalidId`], [`Error::HoldNotFound`]; the reader's failures, as for
    /// [`balance`](Self::balance).
    pub fn hold_status(&self, conn: &mut MysqlConnection, hold_id: i64) -> Result<Hold> {
        validate_id("hold", hold_id)?;
        self.runner
            .read(conn, |conn| find_hold(conn, hold_id))?
            .ok_or(Error::HoldNotFound { hold_id })
    }

    /// Marks up to `limit` holds whose expiry has passed on the server clock as expired, each
    /// with an `expire` journal entry (no key; `related_entry_id`: the hold), those that
    /// expired first first. Safe to run from several processes at once: each account is locked
    /// `NOWAIT` in ascending `user_id` order and tried once; one that is locked is skipped and
    /// reported in [`ExpiredHolds::skipped_accounts`] for a later call, and the due holds are
    /// read again without it (so a locked account's holds never keep the others' from being
    /// marked) — until 10,000 accounts are skipped: the call then answers what it did. Expiry
    /// does not depend on this call: an expired hold stops reserving at once; this only
    /// records its end.
    ///
    /// An account's transaction that fails otherwise ([`Error::Server`],
    /// [`Error::OutcomeUnknown`], [`Error::ConnectionBroken`], ...) ends the sweep: once an
    /// earlier account's expirations committed, the call answers them, with the failed account
    /// and the ones not tried in [`ExpiredHolds::skipped_accounts`] (a later call picks them up;
    /// one whose COMMIT's outcome was unknown is found done or due again) — never an `Err`
    /// for work that committed.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a `limit` outside 1 to [`MAX_EXPIRY_BATCH`]; a failure of
    /// a read of the due holds, or of an account's transaction (other than a lock refusal or
    /// the deadline: a later read cut by the deadline ends the sweep with what it did) before
    /// any account's expirations committed: nothing was expired then (the
    /// accounts skipped before it are not reported; a later call picks them up) — but for
    /// [`Error::OutcomeUnknown`], that account's COMMIT that got no answer: its expirations
    /// may be recorded (a later call finds them done, or due again).
    pub fn expire_holds(&self, conn: &mut MysqlConnection, limit: u32) -> Result<ExpiredHolds> {
        if limit == 0 || limit > MAX_EXPIRY_BATCH {
            return Err(Error::InvalidInput {
                field: "limit",
                problem: "must be between 1 and 1000",
            });
        }
        let deadline = self.runner.deadline();
        let mut report = ExpiredHolds::default();
        // The due holds are read again, without the accounts skipped so far, while fewer than
        // `limit` are marked: an account locked all along (a hot one) whose holds expired
        // first must not keep every other account's from being read.
        for pass in 0..EXPIRY_PASSES {
            let wanted = (limit as usize).saturating_sub(report.expired.len());
            // The accounts skipped so far are left out of the read with one `NOT IN` list: no
            // longer than a lockstock `IN` list (far below the values one statement binds).
            // Past that, the sweep ends with what it did; a later call tries them again.
            let too_many = report.skipped_accounts.len() >= MAX_LIST_VALUES;
            if wanted == 0 || (pass > 0 && (deadline.is_expired() || too_many)) {
                break;
            }
            let skipped = report.skipped_accounts.clone();
            let due: Result<Vec<(i64, i64)>> = self.runner.read_by(conn, deadline, |conn| {
                Ok(balance_hold::table
                    .filter(balance_hold::state.eq(HoldState::Active.as_str()))
                    .filter(
                        balance_hold::expires_at
                            .le(sql::<diesel::sql_types::Datetime>("UTC_TIMESTAMP(6)")),
                    )
                    .filter(balance_hold::user_id.ne_all(&skipped))
                    .order((balance_hold::expires_at.asc(), balance_hold::id.asc()))
                    .limit(i64::try_from(wanted).unwrap_or(i64::MAX))
                    .select((balance_hold::user_id, balance_hold::id))
                    .load(conn)?)
            });
            let due = match due {
                Ok(due) if due.is_empty() => break,
                Ok(due) => due,
                Err(error) if pass == 0 => return Err(error),
                // A later read that failed otherwise than by the deadline before any hold was
                // marked (the earlier passes only skipped locked accounts): nothing was expired,
                // and the failure (a lost connection, a node gone) is the answer, as that of an
                // account's transaction would be — not an `Ok` saying no other hold was due.
                Err(error)
                    if report.expired.is_empty()
                        && !matches!(error, Error::Timeout { .. } | Error::Contended { .. }) =>
                {
                    return Err(error)
                }
                // Else (nothing of the read applied): what the earlier passes did — the holds
                // they marked, the accounts they skipped — is the answer.
                Err(_) => break,
            };
            let mut by_account: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
            for (user_id, hold_id) in due {
                by_account.entry(user_id).or_default().push(hold_id);
            }
            if !self.expire_accounts(conn, by_account, deadline, &mut report)? {
                break;
            }
        }
        Ok(report)
    }

    /// Expires the due holds of each of `accounts` (ascending `user_id`), chunk by chunk, into
    /// `report` (see [`expire_holds`](Self::expire_holds)); whether the sweep may go on
    /// (`false`: an account's transaction failed after earlier ones committed — the rest are
    /// reported skipped).
    fn expire_accounts(
        &self,
        conn: &mut MysqlConnection,
        accounts: BTreeMap<i64, Vec<i64>>,
        deadline: Deadline,
        report: &mut ExpiredHolds,
    ) -> Result<bool> {
        let mut accounts = accounts.into_iter();
        'accounts: while let Some((user_id, mut hold_ids)) = accounts.next() {
            hold_ids.sort_unstable();
            hold_ids.dedup();
            for chunk in hold_ids.chunks(EXPIRY_PER_TRANSACTION) {
                // Whether the LAST attempt left holds of the chunk untried (the deadline).
                let mut cut_short = false;
                let attempt = self.sweeper.run_by(conn, deadline, |conn| {
                    let (entries, untried) = expire_on_account(conn, user_id, chunk, deadline)?;
                    cut_short = untried;
                    Ok(entries)
                });
                match attempt {
                    Ok(entries) => {
                        report.expired.extend(entries);
                        if cut_short {
                            report.skipped_accounts.push(user_id);
                            continue 'accounts;
                        }
                    }
                    Err(Error::Contended { .. } | Error::Timeout { .. }) => {
                        report.skipped_accounts.push(user_id);
                        continue 'accounts;
                    }
                    Err(error) if report.expired.is_empty() => return Err(error),
                    // Earlier transactions committed: answer them; the rest are left for a
                    // later call.
                    Err(_) => {
                        report.skipped_accounts.push(user_id);
                        report
                            .skipped_accounts
                            .extend(accounts.map(|(user_id, _)| user_id));
                        return Ok(false);
                    }
                }
            }
        }
        Ok(true)
    }

    /// The account of the hold `hold_id` (which never changes), read by `deadline`.
    pub(crate) fn hold_owner_by(
        &self,
        conn: &mut MysqlConnection,
        hold_id: i64,
        deadline: Deadline,
    ) -> Result<i64> {
        validate_id("hold", hold_id)?;
        self.runner
            .read_by(conn, deadline, |conn| find_hold(conn, hold_id))?
            .map(|hold| hold.user_id)
            .ok_or(Error::HoldNotFound { hold_id })
    }

    /// A capture (`amount`: `Some`) or release of `hold_id` by `deadline`; with `owner`, a hold
    /// of another account is [`Error::HoldNotFound`] (a batch's answer).
    pub(crate) fn end_hold_by(
        &self,
        conn: &mut MysqlConnection,
        (hold_id, owner): (i64, Option<i64>),
        amount: Option<Decimal>,
        idempotency_key: &str,
        deadline: Deadline,
    ) -> Result<Entry> {
        validate_ending(hold_id, amount, idempotency_key)?;
        let hold = self
            .runner
            .read_by(conn, deadline, |conn| find_hold(conn, hold_id))?
            .filter(|hold| owner.unwrap_or(hold.user_id) == hold.user_id)
            .ok_or(Error::HoldNotFound { hold_id })?;
        let request = match amount {
            Some(amount) => Request::ending(EntryKind::Capture, &hold, amount, idempotency_key),
            None => Request::ending(EntryKind::Release, &hold, hold.amount, idempotency_key),
        };
        let hash = request.hash();
        self.single_entry(conn, &request, deadline, |conn, _| {
            let mut account = lock_account(conn, hold.user_id, Holding::Nothing)?.ok_or(
                Error::AccountNotFound {
                    user_id: hold.user_id,
                },
            )?;
            let locked = lock_holds(conn, &[hold_id], None)?;
            let locked = locked.first().ok_or(Error::HoldNotFound { hold_id })?;
            let now = account.clock(conn)?;
            let after = ending(&account, locked, &request, now)?;
            let end = |conn: &mut MysqlConnection, entry: &Entry| {
                end_hold(conn, hold_id, after.1, after.2, entry)
            };
            write_entry(conn, &account, (&request, &hash), after.0, end)
                .map(super::idempotency::Step::Done)
        })
    }
}

/// Checks a capture's or release's input before anything is sent: the hold id, the capture's
/// amount and the key.
pub(crate) fn validate_ending(hold_id: i64, amount: Option<Decimal>, key: &str) -> Result<()> {
    validate_id("hold", hold_id)?;
    if let Some(amount) = amount {
        validate_amount(amount)?;
    }
    validate_key(key)
}

/// Whether `request` (a capture, release or expiry) may end `hold` on the (locked or running)
/// `account` at the server time `now`; if so, the account after it, the hold's new state and
/// the amount captured. Refusals: [`Error::HoldNotActive`], [`Error::HoldExpired`] (an expired
/// hold for a capture or release), [`Error::CaptureExceedsHold`].
pub(crate) fn ending(
    account: &Account,
    hold: &Hold,
    request: &Request<'_>,
    now: chrono::NaiveDateTime,
) -> Result<(Account, HoldState, Decimal)> {
    let hold_id = hold.id;
    let state = request
        .kind
        .ends_hold_as()
        .ok_or_else(|| Error::internal("ending a hold with an entry that ends none"))?;
    let expired = Error::HoldExpired {
        hold_id,
        expired_at: hold.expires_at,
    };
    match hold.state {
        HoldState::Active if hold.expires_at > now && state == HoldState::Expired => {
            return Err(Error::internal("expiring a hold that has not expired"))
        }
        HoldState::Active if hold.expires_at <= now && state != HoldState::Expired => {
            return Err(expired)
        }
        HoldState::Active => {}
        HoldState::Expired => return Err(expired),
        ended => {
            return Err(Error::HoldNotActive {
                hold_id,
                state: ended,
            })
        }
    }
    let captured = if state == HoldState::Captured {
        if request.amount > hold.amount {
            return Err(Error::CaptureExceedsHold {
                hold_id,
                held: hold.amount,
                requested: request.amount,
            });
        }
        request.amount
    } else {
        Decimal::ZERO
    };
    if account.balance < captured {
        // Unreachable while every debit checks the available balance; kept so that a journal
        // written by others can never be taken below zero.
        return Err(Error::InsufficientBalance {
            user_id: account.user_id,
            available: account.balance,
            requested: captured,
        });
    }
    Ok((account.settle(hold, captured, now), state, captured))
}

/// Inside a sweeper's transaction: marks the due `hold_ids` (ascending) of `user_id` that are
/// still active and expired on the server clock read under the account's lock, each locked
/// just before it is marked; none once `deadline` has passed. Also whether it left some untried
/// for the deadline.
fn expire_on_account(
    conn: &mut MysqlConnection,
    user_id: i64,
    hold_ids: &[i64],
    deadline: Deadline,
) -> Result<(Vec<Entry>, bool)> {
    let Some(mut account) = lock_account(conn, user_id, Holding::Nothing)? else {
        return Ok((Vec::new(), false));
    };
    let clock = account.clock(conn)?;
    let mut running = account;
    let mut entries = Vec::new();
    let mut untried = false;
    for &hold_id in hold_ids {
        if deadline.is_expired() {
            untried = true;
            break;
        }
        let Some(hold) = lock_holds(conn, &[hold_id], None)?.pop() else {
            continue;
        };
        if hold.user_id != user_id || hold.state != HoldState::Active || hold.expires_at > clock {
            continue;
        }
        let request = Request::ending(EntryKind::Expire, &hold, hold.amount, "");
        let hash = request.hash();
        let (after, state, captured) = ending(&running, &hold, &request, clock)?;
        running = after;
        // Journal timestamps are the client's, as for every entry; expiry uses the server's.
        let row = request.row(&hash, running.balance, None, now());
        let entry = one(insert_entries(conn, None, &[row], None)?)?;
        end_hold(conn, hold.id, state, captured, &entry)?;
        entries.push(entry);
    }
    if !entries.is_empty() {
        store_balance(conn, &account, &running, entries.len())?;
    }
    Ok((entries, untried))
}
