//! The ledger's public types ([`Entry`], [`Transfer`], [`Balance`], [`HistoryPage`],
//! [`AccountOp`]) and the journal's row types.

use std::str::FromStr;

use chrono::NaiveDateTime;
use diesel::prelude::*;
use rust_decimal::Decimal;

use super::request::Request;
use crate::error::{Error, Result};
use crate::records::EntryKind;
use crate::schema::{balance_history, user_balance};

impl FromStr for EntryKind {
    type Err = Error;

    /// # Errors
    /// [`Error::Server`] (a deserialization error) for a value that is no kind.
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.as_str() == s)
            .ok_or_else(|| {
                Error::from(diesel::result::Error::DeserializationError(
                    format!("unknown journal entry kind {s:?}").into(),
                ))
            })
    }
}

/// One journal entry: an immutable record of one balance change.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Entry id; increases with every change of the same account.
    pub id: i64,
    /// The account.
    pub user_id: i64,
    /// What happened.
    pub kind: EntryKind,
    /// How much (always positive; `kind` gives the direction).
    pub amount: Decimal,
    /// The balance right after this change.
    pub balance_after: Decimal,
    /// The caller's idempotency key (`None` on the receiving side of a transfer).
    pub idempotency_key: Option<String>,
    /// The deduct a refund refers to, or the sending entry of a received transfer.
    pub related_entry_id: Option<i64>,
    /// The other account of a transfer.
    pub counterparty_user_id: Option<i64>,
    /// On a deduct: how much of it has been refunded so far.
    pub refunded_amount: Decimal,
    /// When it was written (UTC).
    pub created_at: NaiveDateTime,
}

/// A journal row as read.
#[derive(Clone, Queryable, Selectable)]
#[diesel(table_name = balance_history, check_for_backend(diesel::mysql::Mysql))]
pub(crate) struct EntryRow {
    pub(crate) id: i64,
    pub(crate) user_id: i64,
    pub(crate) kind: String,
    pub(crate) amount: Decimal,
    pub(crate) balance_after: Decimal,
    pub(crate) idempotency_key: Option<String>,
    pub(crate) request_hash: String,
    pub(crate) related_entry_id: Option<i64>,
    pub(crate) counterparty_user_id: Option<i64>,
    pub(crate) refunded_amount: Decimal,
    pub(crate) created_at: NaiveDateTime,
}

impl EntryRow {
    pub(crate) fn into_entry(self) -> Result<Entry> {
        Ok(Entry {
            id: self.id,
            user_id: self.user_id,
            kind: self.kind.parse()?,
            amount: self.amount,
            balance_after: self.balance_after,
            idempotency_key: self.idempotency_key,
            related_entry_id: self.related_entry_id,
            counterparty_user_id: self.counterparty_user_id,
            refunded_amount: self.refunded_amount,
            created_at: self.created_at,
        })
    }
}

/// A journal row to write: built by [`Request::row`] for the single and the batch path alike.
// `treat_none_as_default_value = false`: otherwise every field is "maybe DEFAULT" and Diesel
// re-prepares the INSERT on every call (the Option columns default to NULL anyway).
#[derive(Insertable)]
#[diesel(table_name = balance_history, treat_none_as_default_value = false)]
pub(crate) struct NewEntry<'a> {
    /// What `kind` stores (not a column of its own).
    #[diesel(skip_insertion)]
    pub(crate) entry_kind: EntryKind,
    pub(crate) user_id: i64,
    pub(crate) kind: &'a str,
    pub(crate) amount: Decimal,
    pub(crate) balance_after: Decimal,
    pub(crate) idempotency_key: Option<&'a str>,
    pub(crate) request_hash: &'a str,
    pub(crate) related_entry_id: Option<i64>,
    pub(crate) counterparty_user_id: Option<i64>,
    pub(crate) created_at: NaiveDateTime,
}

impl NewEntry<'_> {
    /// The entry this row became once written with `id`.
    pub(crate) fn written(&self, id: i64) -> Entry {
        Entry {
            id,
            user_id: self.user_id,
            kind: self.entry_kind,
            amount: self.amount,
            balance_after: self.balance_after,
            idempotency_key: self.idempotency_key.map(str::to_owned),
            related_entry_id: self.related_entry_id,
            counterparty_user_id: self.counterparty_user_id,
            refunded_amount: Decimal::ZERO,
            created_at: self.created_at,
        }
    }
}

/// Both sides of a transfer.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    /// The sender's entry (kind [`EntryKind::TransferOut`], carries the idempotency key).
    pub debit: Entry,
    /// The receiver's entry (kind [`EntryKind::TransferIn`], linked to `debit`).
    pub credit: Entry,
}

/// An account's balance.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = user_balance, check_for_backend(diesel::mysql::Mysql))]
pub struct Balance {
    /// The account.
    pub user_id: i64,
    /// The balance.
    pub balance: Decimal,
    /// Number of changes applied so far.
    pub version: i64,
    /// Time of the last change (UTC).
    pub updated_at: NaiveDateTime,
}

/// One page of an account's journal, newest first.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryPage {
    /// The entries, newest first.
    pub entries: Vec<Entry>,
    /// Pass this as `before` to get the next (older) page; `None` when this page is the last.
    pub next_cursor: Option<i64>,
}

/// One request of a batch on one account (see [`BalanceLedger::apply_many`](super::BalanceLedger::apply_many)).
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccountOp {
    /// Add `amount`, as [`BalanceLedger::charge`](super::BalanceLedger::charge).
    Charge {
        /// The amount.
        amount: Decimal,
        /// The idempotency key.
        key: String,
    },
    /// Subtract `amount`, as [`BalanceLedger::deduct`](super::BalanceLedger::deduct).
    Deduct {
        /// The amount.
        amount: Decimal,
        /// The idempotency key.
        key: String,
    },
}

impl AccountOp {
    /// A charge request.
    pub fn charge(amount: Decimal, key: impl Into<String>) -> Self {
        Self::Charge {
            amount,
            key: key.into(),
        }
    }

    /// A deduct request.
    pub fn deduct(amount: Decimal, key: impl Into<String>) -> Self {
        Self::Deduct {
            amount,
            key: key.into(),
        }
    }

    pub(crate) fn request(&self, user_id: i64) -> Request<'_> {
        let (kind, amount, key) = match self {
            Self::Charge { amount, key } => (EntryKind::Charge, *amount, key),
            Self::Deduct { amount, key } => (EntryKind::Deduct, *amount, key),
        };
        Request::plain(kind, user_id, amount, key)
    }
}
