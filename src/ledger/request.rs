//! A balance-changing request: its validation, the hash stored with it for idempotency
//! ([`request_hash`]), the journal row it writes, and the answer a journal row under its key
//! gives it.

use std::collections::HashMap;

use chrono::NaiveDateTime;
use rust_decimal::Decimal;

use super::types::{Entry, EntryRow, Hold, NewEntry};
use crate::error::{Error, ExpiryProblem, Result};
use crate::records::EntryKind;
use crate::util::{now, to_micros};
use crate::validate::{
    at_stored_scale, validate_amount, validate_expiry_at, validate_id, validate_key,
};

/// The hash `balance_history.request_hash` stores for a request: FNV-1a 64 of
/// `"{kind}|{user_id}|{amount normalized}|{reference or 0}"`, as 16 lowercase hex digits.
///
/// `reference` is the counterparty of a transfer (on both sides: the receiver on the sending
/// entry, the sender on the receiving one), the deduct entry of a refund, the expiry of a hold
/// (microseconds since the Unix epoch, UTC), the hold a capture, release or expire entry ends,
/// `None` for charges and deducts. A release's amount is its hold's. `10.0` and `10.00` hash alike. The hash compares two requests under one key of one
/// account, so it is stable across versions and processes, not collision-resistant against an
/// attacker. Hand-written writers (benchmark strategies, say) store it to stay compatible with
/// the ledger's idempotency checks.
///
/// ```
/// use lockstock::{ledger::request_hash, EntryKind};
/// use rust_decimal::Decimal;
/// let a = request_hash(EntryKind::Deduct, 7, Decimal::new(100, 1), None);
/// assert_eq!(a, request_hash(EntryKind::Deduct, 7, Decimal::new(1000, 2), None));
/// assert_eq!(a.len(), 16);
/// ```
pub fn request_hash(
    kind: EntryKind,
    user_id: i64,
    amount: Decimal,
    reference: Option<i64>,
) -> String {
    let canonical = format!(
        "{kind}|{user_id}|{}|{}",
        amount.normalize(),
        reference.unwrap_or(0)
    );
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in canonical.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{hash:016x}")
}

/// A balance-changing request, as hashed for idempotency.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Request<'a> {
    pub(crate) kind: EntryKind,
    pub(crate) user_id: i64,
    pub(crate) amount: Decimal,
    /// Counterparty of a transfer, deduct entry of a refund, expiry of a hold (microseconds),
    /// the hold a capture, release or expiry ends.
    pub(crate) reference: Option<i64>,
    pub(crate) key: &'a str,
    /// A hold's expiry (at the stored precision).
    pub(crate) expires_at: Option<NaiveDateTime>,
    /// A hold whose expiry the call's clock refused when it checked it ([`Request::checked_at`]):
    /// passed, or further ahead than a hold may last. Refused unless its key was recorded
    /// before, which then decides the answer.
    pub(crate) expiry_refused: Option<ExpiryProblem>,
}

impl<'a> Request<'a> {
    /// A charge or deduct (no reference).
    pub(crate) fn plain(kind: EntryKind, user_id: i64, amount: Decimal, key: &'a str) -> Self {
        Self {
            kind,
            user_id,
            amount: at_stored_scale(amount),
            reference: None,
            key,
            expires_at: None,
            expiry_refused: None,
        }
    }

    /// A hold of `amount` until `expires_at` (kept at the stored precision: microseconds).
    pub(crate) fn hold(
        user_id: i64,
        amount: Decimal,
        key: &'a str,
        expires_at: NaiveDateTime,
    ) -> Self {
        let expires_at = to_micros(expires_at);
        Self {
            kind: EntryKind::Hold,
            user_id,
            amount: at_stored_scale(amount),
            reference: Some(expires_at.and_utc().timestamp_micros()),
            key,
            expires_at: Some(expires_at),
            expiry_refused: None,
        }
    }

    /// A capture or release (`kind`) of `amount` ending `hold`, on the hold's account.
    pub(crate) fn ending(kind: EntryKind, hold: &Hold, amount: Decimal, key: &'a str) -> Self {
        Self {
            kind,
            user_id: hold.user_id,
            amount: at_stored_scale(amount),
            reference: Some(hold.id),
            key,
            expires_at: None,
            expiry_refused: None,
        }
    }

    /// The hold a capture, release or expiry ends.
    pub(crate) fn ended_hold(&self) -> Option<i64> {
        self.kind.ends_hold_as().and(self.reference)
    }

    /// [`request_hash`] of this request.
    pub(crate) fn hash(&self) -> String {
        request_hash(self.kind, self.user_id, self.amount, self.reference)
    }

    /// [`validate`](Self::validate), except that a hold whose expiry the caller's clock
    /// refuses comes back marked ([`expiry_refused`](Self::expiry_refused)) instead of refused:
    /// a hold placed before its expiry passed and retried after it (say after
    /// [`Error::OutcomeUnknown`]) answers the recorded entry, as any retry does — and so does
    /// one retried on a clock behind the one that placed it, to which the same expiry is
    /// further ahead than a hold may last. Without a recorded key it is refused with
    /// [`Error::InvalidExpiry`] when decided ([`Request::expiry_refusal`]). A hold's expiry is
    /// judged against the caller's clock reading `now` (a combined request's: when its call was
    /// submitted, as its single call judges it before sending anything).
    pub(crate) fn checked_at(mut self, now: NaiveDateTime) -> Result<Self> {
        match self.validate_at(now) {
            Ok(()) => Ok(self),
            Err(Error::InvalidExpiry { problem, .. }) => {
                self.expiry_refused = Some(problem);
                Ok(self)
            }
            Err(refusal) => Err(refusal),
        }
    }

    /// The refusal of a hold marked [`expiry_refused`](Self::expiry_refused) whose key was not
    /// recorded.
    pub(crate) fn expiry_refusal(&self) -> Option<Error> {
        match (self.expiry_refused, self.expires_at) {
            (Some(problem), Some(expires_at)) => Some(Error::InvalidExpiry {
                expires_at,
                problem,
            }),
            _ => None,
        }
    }

    /// Checks the user id, the amount, the key and a hold's expiry: [`Error::InvalidId`],
    /// [`Error::InvalidAmount`], [`Error::InvalidIdempotencyKey`] or [`Error::InvalidExpiry`].
    pub(crate) fn validate(&self) -> Result<()> {
        self.validate_at(now())
    }

    /// [`validate`](Self::validate), a hold's expiry against the clock reading `now`.
    fn validate_at(&self, now: NaiveDateTime) -> Result<()> {
        validate_id("user", self.user_id)?;
        validate_amount(self.amount)?;
        validate_key(self.key)?;
        if let Some(expires_at) = self.expires_at {
            validate_expiry_at(expires_at, now)?;
        }
        Ok(())
    }

    /// The journal row this request writes, with its `hash`, the balance after it and (on the
    /// receiving side of a transfer) the sending entry.
    pub(crate) fn row(
        &self,
        hash: &'a str,
        balance_after: Decimal,
        sending_entry: Option<i64>,
        created_at: NaiveDateTime,
    ) -> NewEntry<'a> {
        let (key, related, counterparty) = match self.kind {
            EntryKind::Refund | EntryKind::Capture | EntryKind::Release => {
                (Some(self.key), self.reference, None)
            }
            EntryKind::Expire => (None, self.reference, None),
            EntryKind::TransferIn => (None, sending_entry, self.reference),
            EntryKind::TransferOut => (Some(self.key), None, self.reference),
            EntryKind::Charge | EntryKind::Deduct | EntryKind::Hold => (Some(self.key), None, None),
        };
        NewEntry {
            entry_kind: self.kind,
            user_id: self.user_id,
            kind: self.kind.as_str(),
            amount: self.amount,
            balance_after,
            idempotency_key: key,
            request_hash: hash,
            related_entry_id: related,
            counterparty_user_id: counterparty,
            created_at,
            ended_hold_id: self.ended_hold(),
        }
    }

    /// The answer the journal gives this request, if its key is among `rows`.
    pub(crate) fn answer_from(&self, rows: &KeyedRows) -> Option<Result<Entry>> {
        rows.0
            .get(self.key)
            .map(|row| self.answer_from_journal(row.clone()))
    }

    /// The answer when its key is already in the journal as `row`: the original entry for the
    /// same request, [`Error::IdempotencyConflict`] for a different one.
    pub(crate) fn answer_from_journal(&self, row: EntryRow) -> Result<Entry> {
        if row.request_hash != self.hash() {
            return Err(Error::IdempotencyConflict {
                user_id: self.user_id,
                key: self.key.to_owned(),
                existing_entry_id: row.id,
            });
        }
        row.into_entry()
    }
}

/// What finishes a request refused without a write whose key's lookup a combined batch could
/// not make by its earliest caller's deadline: the lookup its single call would still be
/// making — the key's entry answers it (the conflict, for another request), else the refusal.
#[derive(Debug)]
pub(crate) struct KeyLookup {
    user_id: i64,
    key: String,
    hash: String,
    refusal: Error,
}

impl KeyLookup {
    /// For `request`, refused with `refusal`.
    pub(crate) fn of(request: &Request<'_>, refusal: Error) -> Self {
        Self {
            user_id: request.user_id,
            key: request.key.to_owned(),
            hash: request.hash(),
            refusal,
        }
    }

    /// The answer, by `deadline`: as [`Request::answer_from_journal`] for the key's entry, the
    /// refusal without one; a lookup that fails again is [`Error::OutcomeUnknown`], as the
    /// single call answers it.
    pub(crate) fn answer(
        &self,
        ledger: &super::BalanceLedger,
        conn: &mut diesel::mysql::MysqlConnection,
        deadline: crate::txn::Deadline,
    ) -> Result<Entry> {
        let rows = match ledger.journal_rows_by(conn, deadline, self.user_id, &[&self.key]) {
            Ok(rows) => rows,
            // On a combiner's own connection the open transaction is someone else's: the
            // combiner discards the connection and asks again on another.
            Err(Error::NestedTransaction) if crate::txn::on_source_connection_now() => {
                return Err(Error::NestedTransaction)
            }
            Err(failure) => return Err(Error::unknown_after_refusal(failure)),
        };
        match rows.0.get(&self.key) {
            Some(row) if row.request_hash != self.hash => Err(Error::IdempotencyConflict {
                user_id: self.user_id,
                key: self.key.clone(),
                existing_entry_id: row.id,
            }),
            Some(row) => row.clone().into_entry(),
            None => Err(self.refusal.clone()),
        }
    }
}

/// The journal rows a key lookup found (of one account), by their idempotency key: a batch's
/// requests find theirs in constant time however many there are.
#[derive(Default)]
pub(crate) struct KeyedRows(HashMap<String, EntryRow>);

impl KeyedRows {
    /// `rows` by key (a row without one — the receiving side of a transfer — is never a key's).
    pub(crate) fn new(rows: Vec<EntryRow>) -> Self {
        Self(
            rows.into_iter()
                .filter_map(|row| row.idempotency_key.clone().map(|key| (key, row)))
                .collect(),
        )
    }

    /// The id of the journal entry under `key`, if one was found.
    pub(crate) fn id_of(&self, key: &str) -> Option<i64> {
        self.0.get(key).map(|row| row.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_hash_is_canonical() {
        let a = Request {
            kind: EntryKind::Deduct,
            user_id: 1,
            amount: Decimal::new(100, 1),
            reference: None,
            key: "k",
            expires_at: None,
            expiry_refused: None,
        };
        let b = Request {
            amount: Decimal::new(1000, 2),
            ..a
        };
        assert_eq!(a.hash(), b.hash());
        assert_ne!(
            a.hash(),
            Request {
                kind: EntryKind::Charge,
                ..a
            }
            .hash()
        );
        assert_ne!(
            a.hash(),
            Request {
                amount: Decimal::new(101, 1),
                ..a
            }
            .hash()
        );
        assert_eq!(a.hash().len(), 16);
    }

    /// The stored hashes never change: rows written by earlier versions keep answering.
    #[test]
    fn request_hash_is_pinned() {
        let hash = request_hash(EntryKind::Deduct, 7, Decimal::new(1000, 2), None);
        assert_eq!(hash, "70050e7551c6b6cc"); // FNV-1a 64 of "deduct|7|10|0"
    }
}
