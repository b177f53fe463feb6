//! The single operations: charge, deduct, refund, transfer, and the reads (balance, history).
//! Each write is one transaction built from the statements in [`rows`](super::rows), run through
//! the idempotency loop of [`idempotency`](super::idempotency).

use chrono::NaiveDateTime;
use diesel::mysql::MysqlConnection;
use diesel::prelude::*;
use rust_decimal::Decimal;

use super::idempotency::Step;
use super::request::{KeyLookup, Request};
use super::rows::{
    create_account, find_balance, find_entry, find_transfer_credit, insert_entries, insert_holds,
    lock_account, lock_account_row, lock_entry, lock_or_create, store_balance, unexpired_holds,
    Account,
};
use super::types::{AccountOp, Balance, Entry, EntryRow, HistoryPage, Transfer};
use super::{BalanceLedger, MAX_HISTORY_PAGE};
use crate::error::{Error, Result};
use crate::records::EntryKind;
use crate::schema::balance_history;
use crate::statements::SetRefunded;
use crate::txn::{Deadline, Holding};
use crate::util::now;
use crate::validate::{at_stored_scale, validate_amount, validate_id, validate_key};

impl BalanceLedger {
    /// Adds `amount` to `user_id`'s balance, creating the account on its first charge.
    ///
    /// # Errors
    /// Invalid input ([`Error::InvalidId`], [`Error::InvalidAmount`],
    /// [`Error::InvalidIdempotencyKey`]); [`Error::BalanceLimitExceeded`];
    /// [`Error::IdempotencyConflict`] for a key used by another request; and the runner's
    /// failures ([`Error::Contended`], [`Error::Timeout`], [`Error::OutcomeUnknown`],
    /// [`Error::NestedTransaction`], [`Error::ConnectionBroken`],
    /// [`Error::ServerUnresponsive`] for a server that stopped answering, on a Galera node
    /// [`Error::NotDesignatedWriter`] or [`Error::NotReplicated`], [`Error::Server`]).
    pub fn charge(
        &self,
        conn: &mut MysqlConnection,
        user_id: i64,
        amount: Decimal,
        idempotency_key: &str,
    ) -> Result<Entry> {
        self.charge_by(
            conn,
            user_id,
            amount,
            idempotency_key,
            self.runner.deadline(),
        )
    }

    /// [`charge`](Self::charge), bounded by the caller's `deadline` instead of one starting
    /// now (a [`Router`](crate::route::Router) passes the deadline its call started with).
    ///
    /// # Errors
    /// As [`charge`](Self::charge).
    pub fn charge_by(
        &self,
        conn: &mut MysqlConnection,
        user_id: i64,
        amount: Decimal,
        idempotency_key: &str,
        deadline: Deadline,
    ) -> Result<Entry> {
        let request = Request::plain(EntryKind::Charge, user_id, amount, idempotency_key);
        self.change(conn, &request, deadline)
    }

    /// Subtracts `amount` from `user_id`'s balance; refuses with [`Error::InsufficientBalance`]
    /// (writing nothing) when the balance is smaller.
    ///
    /// # Errors
    /// As [`charge`](Self::charge), with [`Error::InsufficientBalance`] and
    /// [`Error::AccountNotFound`] instead of [`Error::BalanceLimitExceeded`].
    pub fn deduct(
        &self,
        conn: &mut MysqlConnection,
        user_id: i64,
        amount: Decimal,
        idempotency_key: &str,
    ) -> Result<Entry> {
        self.deduct_by(
            conn,
            user_id,
            amount,
            idempotency_key,
            self.runner.deadline(),
        )
    }

    /// [`deduct`](Self::deduct), bounded by the caller's `deadline`.
    ///
    /// # Errors
    /// As [`deduct`](Self::deduct).
    pub fn deduct_by(
        &self,
        conn: &mut MysqlConnection,
        user_id: i64,
        amount: Decimal,
        idempotency_key: &str,
        deadline: Deadline,
    ) -> Result<Entry> {
        let request = Request::plain(EntryKind::Deduct, user_id, amount, idempotency_key);
        self.change(conn, &request, deadline)
    }

    /// One request of a batch by `deadline` (a combined caller's), through its single call: the
    /// batch of one. A hold's expiry is judged against the clock reading that comes with it
    /// (when its call was submitted). A capture or release of a hold of another account is
    /// [`Error::HoldNotFound`], as in a batch.
    pub(crate) fn apply_one_by(
        &self,
        conn: &mut MysqlConnection,
        user_id: i64,
        (op, judged): &(AccountOp, NaiveDateTime),
        deadline: Deadline,
    ) -> Result<Entry> {
        match op {
            AccountOp::Charge { .. } | AccountOp::Deduct { .. } | AccountOp::Hold { .. } => {
                self.change_judged(conn, &op.request(user_id, None)?, *judged, deadline)
            }
            AccountOp::Capture {
                hold_id,
                amount,
                key,
            } => self.end_hold_by(
                conn,
                (*hold_id, Some(user_id)),
                Some(*amount),
                key,
                deadline,
            ),
            AccountOp::Release { hold_id, key } => {
                self.end_hold_by(conn, (*hold_id, Some(user_id)), None, key, deadline)
            }
        }
    }

    /// The answer to a hold whose expiry the caller's clock refused (`refusal`: passed, or
    /// further ahead than a hold may last): a retry of a hold placed before its expiry passed,
    /// or placed on a clock ahead of this one, answers the recorded entry (another request
    /// under its key, the conflict); a key not recorded, the refusal. Inside a transaction the
    /// caller opened, where lockstock sends nothing, the refusal too, as every bad input is
    /// refused there — but on a combiner's own connection ([`on_source_connection`]) such a
    /// transaction is someone else's: [`Error::NestedTransaction`], and the combiner asks again
    /// on another connection.
    ///
    /// [`on_source_connection`]: crate::txn::on_source_connection
    /// Where the key cannot be looked up otherwise (a server gone, a lock wait past the
    /// deadline) the answer is [`Error::OutcomeUnknown`] with that failure: the refusal would
    /// tell a retry that its hold was never placed, and the failure itself that nothing was
    /// applied, neither of which the call could find out.
    pub(crate) fn expired_hold(
        &self,
        conn: &mut MysqlConnection,
        request: &Request<'_>,
        refusal: Error,
        deadline: Deadline,
    ) -> Result<Entry> {
        let mut answers = self.expired_holds(conn, &[(request, refusal)], deadline);
        answers
            .pop()
            .unwrap_or_else(|| Err(Error::internal("an expired hold left unanswered")))
    }

    /// [`expired_hold`](Self::expired_hold) for several such `holds` of ONE account (a
    /// batch's), their keys looked up with one read: one answer each, in order.
    pub(crate) fn expired_holds(
        &self,
        conn: &mut MysqlConnection,
        holds: &[(&Request<'_>, Error)],
        deadline: Deadline,
    ) -> Vec<Result<Entry>> {
        let Some((first, _)) = holds.first() else {
            return Vec::new();
        };
        let keys: Vec<&str> = holds.iter().map(|(request, _)| request.key).collect();
        let rows = self.journal_rows_by(conn, deadline, first.user_id, &keys);
        holds
            .iter()
            .map(|(request, refusal)| match &rows {
                Ok(rows) => request.answer_from(rows).unwrap_or(Err(refusal.clone())),
                // On a combiner's own connection the open transaction is someone else's: the
                // combiner discards the connection and asks again on another.
                Err(Error::NestedTransaction) if crate::txn::on_source_connection_now() => {
                    Err(Error::NestedTransaction)
                }
                Err(Error::NestedTransaction) => Err(refusal.clone()),
                Err(failure) => {
                    let lookup = KeyLookup::of(request, refusal.clone());
                    Err(Error::unknown_after_refusal_by_deadline(
                        failure.clone(),
                        Some(lookup),
                    ))
                }
            })
            .collect()
    }

    /// A charge, a deduct or a hold: one account, one journal entry (and a hold's row).
    pub(crate) fn change(
        &self,
        conn: &mut MysqlConnection,
        request: &Request<'_>,
        deadline: Deadline,
    ) -> Result<Entry> {
        self.change_judged(conn, request, now(), deadline)
    }

    /// [`change`](Self::change), a hold's expiry judged against the caller's clock reading
    /// `judged` (a combined request's: when its call was submitted).
    pub(crate) fn change_judged(
        &self,
        conn: &mut MysqlConnection,
        request: &Request<'_>,
        judged: NaiveDateTime,
        deadline: Deadline,
    ) -> Result<Entry> {
        let request = &request.checked_at(judged)?;
        if let Some(refusal) = request.expiry_refusal() {
            return self.expired_hold(conn, request, refusal, deadline);
        }
        let (kind, user_id) = (request.kind, request.user_id);
        let hash = request.hash();
        self.single_entry(conn, request, deadline, |conn, create| {
            let create = create && kind == EntryKind::Charge;
            let Some(mut account) = lock_or_create(conn, user_id, Holding::Nothing, create)? else {
                return if kind == EntryKind::Charge {
                    Ok(Step::CreateAccount(user_id))
                } else {
                    Err(Error::AccountNotFound { user_id })
                };
            };
            match (kind, request.expires_at) {
                (EntryKind::Hold, Some(expires_at)) => {
                    let now = account.clock(conn)?;
                    let after = account.reserve(request.amount, expires_at, now)?;
                    let place = |conn: &mut MysqlConnection, entry: &Entry| {
                        insert_holds(conn, &[(entry, expires_at)], None)
                    };
                    write_entry(conn, &account, (request, &hash), after, place)
                }
                _ => {
                    let after = account.after(kind, request.amount)?;
                    write_entry(conn, &account, (request, &hash), after, |_, _| Ok(()))
                }
            }
            .map(Step::Done)
        })
    }

    /// Gives back `amount` of the deduct `deduct_entry_id`. Partial refunds are allowed; their
    /// sum never exceeds the deduct ([`Error::RefundExceedsDeduct`]), also when they race. The
    /// key belongs to the deduct's account: a key of that account used by another request wins
    /// over every refusal but [`Error::EntryNotFound`] (no entry: no account to look the key up
    /// in) — and but [`Error::NotRefundable`] where the key cannot be looked up (that refusal
    /// stands whatever the key holds: such a refund is never written).
    ///
    /// # Errors
    /// Invalid input; [`Error::EntryNotFound`], [`Error::NotRefundable`] (not a deduct),
    /// [`Error::RefundExceedsDeduct`], [`Error::BalanceLimitExceeded`],
    /// [`Error::IdempotencyConflict`]; and the runner's failures, as for
    /// [`charge`](Self::charge).
    pub fn refund(
        &self,
        conn: &mut MysqlConnection,
        deduct_entry_id: i64,
        amount: Decimal,
        idempotency_key: &str,
    ) -> Result<Entry> {
        // The call's one deadline starts with it, as a charge's does.
        self.refund_by(
            conn,
            deduct_entry_id,
            amount,
            idempotency_key,
            self.runner.deadline(),
        )
    }

    /// [`refund`](Self::refund), bounded by the caller's `deadline`.
    ///
    /// # Errors
    /// As [`refund`](Self::refund).
    pub fn refund_by(
        &self,
        conn: &mut MysqlConnection,
        deduct_entry_id: i64,
        amount: Decimal,
        idempotency_key: &str,
        deadline: Deadline,
    ) -> Result<Entry> {
        validate_id("journal entry", deduct_entry_id)?;
        validate_amount(amount)?;
        validate_key(idempotency_key)?;
        // Who owns the deduct never changes, so it can be read before any lock.
        let original = self
            .runner
            .read_by(conn, deadline, |conn| find_entry(conn, deduct_entry_id))?
            .ok_or(Error::EntryNotFound {
                entry_id: deduct_entry_id,
            })?;
        let request = Request {
            kind: EntryKind::Refund,
            user_id: original.user_id,
            amount: at_stored_scale(amount),
            reference: Some(deduct_entry_id),
            key: idempotency_key,
            expires_at: None,
            expiry_refused: None,
        };
        // Answered as stored (four places).
        let amount = request.amount;
        if original.kind != EntryKind::Deduct {
            let refusal = Error::NotRefundable {
                entry_id: deduct_entry_id,
                kind: original.kind,
            };
            // A key that exists wins, as for every other refusal. This request was never
            // applied (a refund of anything but a deduct is never written), so a key found is
            // another request's, and a lookup that fails leaves the refusal standing.
            return match self.existing(conn, &request, deadline) {
                Err(conflict @ Error::IdempotencyConflict { .. }) => Err(conflict),
                Ok(Some(_)) | Ok(None) | Err(_) => Err(refusal),
            };
        }
        let hash = request.hash();
        self.single_entry(conn, &request, deadline, |conn, _| {
            let account = lock_account(conn, original.user_id, Holding::Nothing)?.ok_or(
                Error::AccountNotFound {
                    user_id: original.user_id,
                },
            )?;
            let deduct = lock_entry(conn, deduct_entry_id)?;
            if deduct.refunded_amount + amount > deduct.amount {
                return Err(Error::RefundExceedsDeduct {
                    entry_id: deduct_entry_id,
                    deducted: deduct.amount,
                    refunded: deduct.refunded_amount,
                    requested: amount,
                });
            }
            let after = account.credit(amount)?;
            let refunded = deduct.refunded_amount + amount;
            let set_refunded = |conn: &mut MysqlConnection, _: &Entry| {
                SetRefunded {
                    entry_id: deduct_entry_id,
                    refunded,
                }
                .execute(conn)?;
                Ok(())
            };
            write_entry(conn, &account, (&request, &hash), after, set_refunded).map(Step::Done)
        })
    }

    /// Moves `amount` from `from` to `to`: both rows locked in ascending `user_id` order (so
    /// opposite transfers cannot deadlock; a receiver found missing is first written by a
    /// wait-free `INSERT IGNORE`, which locks its new row before the other, and the lock reads
    /// after it never wait, so no cycle can close either), one journal entry per side. The receiver's account is
    /// created if needed; the key belongs to the sender.
    ///
    /// # Errors
    /// Invalid input; [`Error::SelfTransfer`], [`Error::AccountNotFound`] (no sender),
    /// [`Error::InsufficientBalance`], [`Error::BalanceLimitExceeded`] (receiver),
    /// [`Error::IdempotencyConflict`]; [`Error::Internal`] for a retry whose key's debit the
    /// journal holds without its credit (they commit together: a journal changed by hand); and
    /// the runner's failures, as for [`charge`](Self::charge).
    pub fn transfer(
        &self,
        conn: &mut MysqlConnection,
        from: i64,
        to: i64,
        amount: Decimal,
        idempotency_key: &str,
    ) -> Result<Transfer> {
        let deadline = self.runner.deadline();
        self.transfer_by(conn, from, to, amount, idempotency_key, deadline)
    }

    /// [`transfer`](Self::transfer), bounded by the caller's `deadline`.
    ///
    /// # Errors
    /// As [`transfer`](Self::transfer).
    pub fn transfer_by(
        &self,
        conn: &mut MysqlConnection,
        from: i64,
        to: i64,
        amount: Decimal,
        idempotency_key: &str,
        deadline: Deadline,
    ) -> Result<Transfer> {
        let request = Request {
            kind: EntryKind::TransferOut,
            user_id: from,
            amount: at_stored_scale(amount),
            reference: Some(to),
            key: idempotency_key,
            expires_at: None,
            expiry_refused: None,
        };
        request.validate()?;
        let amount = request.amount;
        validate_id("user", to)?;
        if from == to {
            return Err(Error::SelfTransfer { user_id: from });
        }
        let incoming = Request {
            kind: EntryKind::TransferIn,
            user_id: to,
            reference: Some(from),
            ..request
        };
        let (out_hash, in_hash) = (request.hash(), incoming.hash());
        let attempt = |conn: &mut MysqlConnection, create: bool| {
            let (first, second) = (from.min(to), from.max(to));
            // The receiver was found missing: written first (before any lock read of its key).
            if create {
                create_account(conn, to)?;
            }
            let holding = if create {
                Holding::Locks
            } else {
                Holding::Nothing
            };
            // Both rows locked before either account's holds are summed: under REPEATABLE
            // READ the first sum fixes the snapshot, which must have every change committed to
            // either account before its lock (a hold on the second account, committed between
            // the two locks, was missing from its sum, and the transfer spent it).
            let first_row = lock_account_row(conn, first, holding)?;
            let second_row = lock_account_row(conn, second, Holding::Locks)?;
            let first_row = first_row.map(|row| row.summed(conn)).transpose()?;
            let second_row = second_row.map(|row| row.summed(conn)).transpose()?;
            let (sender, receiver) = if first == from {
                (first_row, second_row)
            } else {
                (second_row, first_row)
            };
            let sender = sender.ok_or(Error::AccountNotFound { user_id: from })?;
            // Refused here, the transfer writes nothing (a receiver created above is rolled
            // back with it).
            let sender_after = sender.debit(amount)?;
            let Some(receiver) = receiver else {
                return Ok(Step::CreateAccount(to));
            };
            let receiver_after = receiver.credit(amount)?;
            let at = now();
            let debit = one(insert_entries(
                conn,
                None,
                &[request.row(&out_hash, sender_after.balance, None, at)],
                None,
            )?)?;
            let credit_row = incoming.row(&in_hash, receiver_after.balance, Some(debit.id), at);
            let credit = one(insert_entries(conn, None, &[credit_row], None)?)?;
            store_balance(conn, &sender, &sender_after, 1)?;
            store_balance(conn, &receiver, &receiver_after, 1)?;
            Ok(Step::Done(Transfer { debit, credit }))
        };
        // The key's debit is recorded, so the transfer is applied: its credit, where it cannot
        // be read, makes the answer OutcomeUnknown (look it up, or retry), never a failure that
        // says nothing was applied. (A debit without its credit — they commit together — is a
        // broken journal: `Internal`.)
        self.idempotent(conn, &request, deadline, attempt, |conn, debit| {
            let credit = self
                .runner
                .read_by(conn, deadline, |conn| find_transfer_credit(conn, debit.id))
                .map_err(Error::unknown_after_refusal)?
                .ok_or_else(|| {
                    Error::internal(format!(
                        "the credit entry of transfer {} is missing from the journal",
                        debit.id
                    ))
                })?;
            Ok(Transfer { debit, credit })
        })
    }

    /// The current balance of `user_id` — posted, held (active holds not yet expired on the
    /// server clock) and available — from a lock-free consistent snapshot.
    ///
    /// # Errors
    /// [`Error::InvalidId`], [`Error::AccountNotFound`]; the reader's failures
    /// ([`Error::Contended`], [`Error::Timeout`], [`Error::Server`], ...).
    pub fn balance(&self, conn: &mut MysqlConnection, user_id: i64) -> Result<Balance> {
        validate_id("user", user_id)?;
        self.runner.read(conn, |conn| {
            let row = find_balance(conn, user_id)?.ok_or(Error::AccountNotFound { user_id })?;
            let unexpired = if row.held > Decimal::ZERO {
                unexpired_holds(conn, user_id)?.1
            } else {
                Decimal::ZERO
            };
            Ok(row.with_unexpired(unexpired))
        })
    }

    /// Up to `limit` journal entries of `user_id`, newest first, older than the entry id
    /// `before` (keyset pagination over the (user_id, id) index: no OFFSET scans).
    ///
    /// # Errors
    /// [`Error::InvalidId`] (the user, or a cursor `before` that is no entry id: not
    /// positive), [`Error::InvalidInput`] for a `limit` outside 1 to [`MAX_HISTORY_PAGE`]; the
    /// reader's failures, as for [`balance`](Self::balance).
    pub fn history(
        &self,
        conn: &mut MysqlConnection,
        user_id: i64,
        before: Option<i64>,
        limit: u32,
    ) -> Result<HistoryPage> {
        validate_id("user", user_id)?;
        if let Some(cursor) = before {
            validate_id("entry", cursor)?;
        }
        if limit == 0 || limit > MAX_HISTORY_PAGE {
            return Err(Error::InvalidInput {
                field: "limit",
                problem: "must be between 1 and 1000",
            });
        }
        // One entry more than the page: whether an older page exists.
        let rows: Vec<EntryRow> = self.runner.read(conn, |conn| {
            let mut query = balance_history::table
                .filter(balance_history::user_id.eq(user_id))
                .order(balance_history::id.desc())
                .limit(i64::from(limit) + 1)
                .select(EntryRow::as_select())
                .into_boxed();
            if let Some(cursor) = before {
                query = query.filter(balance_history::id.lt(cursor));
            }
            Ok(query.load(conn)?)
        })?;
        let more = rows.len() > limit as usize;
        let entries = rows
            .into_iter()
            .take(limit as usize)
            .map(EntryRow::into_entry)
            .collect::<Result<Vec<_>>>()?;
        let next_cursor = if more {
            entries.last().map(|e| e.id)
        } else {
            None
        };
        Ok(HistoryPage {
            entries,
            next_cursor,
        })
    }
}

/// The single write of one entry on a locked `account`: the journal INSERT (a batch of one),
/// `between` (a refund's update of its deduct, a hold's row, the end of a hold), then the
/// balance UPDATE.
pub(super) fn write_entry(
    conn: &mut MysqlConnection,
    account: &Account,
    (request, hash): (&Request<'_>, &str),
    after: Account,
    between: impl FnOnce(&mut MysqlConnection, &Entry) -> Result<()>,
) -> Result<Entry> {
    let entry = one(insert_entries(
        conn,
        None,
        &[request.row(hash, after.balance, None, now())],
        None,
    )?)?;
    between(conn, &entry)?;
    store_balance(conn, account, &after, 1)?;
    Ok(entry)
}

/// The entry of a batch of one.
pub(super) fn one(entries: Vec<Entry>) -> Result<Entry> {
    entries
        .into_iter()
        .next()
        .ok_or_else(|| Error::internal("a written row has no entry"))
}
