//! The ledger's public types ([`Entry`], [`Transfer`], [`Balance`], [`Hold`], [`HistoryPage`],
//! [`ExpiredHolds`], [`AccountOp`]) and the journal's and holds' row types.

use std::str::FromStr;

use chrono::NaiveDateTime;
use diesel::prelude::*;
use rust_decimal::Decimal;

use super::request::Request;
use crate::error::{Error, Result};
use crate::records::{EntryKind, HoldState};
use crate::schema::{balance_history, balance_hold, user_balance};

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
    /// The caller's idempotency key (`None` on the receiving side of a transfer and on `expire`
    /// entries, which [`expire_holds`](crate::BalanceLedger::expire_holds) writes without one).
    pub idempotency_key: Option<String>,
    /// The deduct a refund refers to, the sending entry of a received transfer, or the hold
    /// (its id) a capture, release or expire entry ended.
    pub related_entry_id: Option<i64>,
    /// The other account of a transfer.
    pub counterparty_user_id: Option<i64>,
    /// On a deduct: how much of it has been refunded so far — read with the entry, so a
    /// replayed deduct answers the refunds made since its first answer (every other field is
    /// as first answered).
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

/// A journal row to write: built by [`Request::row`] for the single and the batch path alike,
/// written by `InsertRows` (its columns: `rows.rs`).
pub(crate) struct NewEntry<'a> {
    /// What `kind` stores (not a column of its own).
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
    /// The hold a capture, release or expire entry ends (unique: a hold ends once).
    pub(crate) ended_hold_id: Option<i64>,
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
            // As the column stores it (four places).
            refunded_amount: Decimal::new(0, 4),
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

/// An account's balance: posted, held and available.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Balance {
    /// The account.
    pub user_id: i64,
    /// The posted balance: what the journal's charges, deducts, refunds, transfers and captures
    /// sum to.
    pub balance: Decimal,
    /// The active holds whose expiry is still ahead of the server clock, summed.
    pub held: Decimal,
    /// `balance - held`: what a deduct, a transfer or a new hold can use.
    pub available: Decimal,
    /// Number of journal entries written so far (holds and their ends included).
    pub version: i64,
    /// Time of the last change (UTC).
    pub updated_at: NaiveDateTime,
}

/// An account row as read.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = user_balance, check_for_backend(diesel::mysql::Mysql))]
pub(crate) struct BalanceRow {
    pub(crate) user_id: i64,
    pub(crate) balance: Decimal,
    /// The ACTIVE holds summed, expired or not (see the migration).
    pub(crate) held: Decimal,
    pub(crate) version: i64,
    pub(crate) updated_at: NaiveDateTime,
}

impl BalanceRow {
    /// The balance with `unexpired` (the active holds not yet expired) held.
    pub(crate) fn with_unexpired(self, mut unexpired: Decimal) -> Balance {
        // As many places as the balance (the column's): a sum, or zero without holds, prints
        // alike then. Exact: amounts have at most the column's places.
        unexpired.rescale(self.balance.scale().max(unexpired.scale()));
        Balance {
            user_id: self.user_id,
            balance: self.balance,
            held: unexpired,
            available: self.balance - unexpired,
            version: self.version,
            updated_at: self.updated_at,
        }
    }
}

/// A hold: points reserved on an account until it is captured, released or expires.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    /// The hold's id: the id of the journal entry that placed it.
    pub id: i64,
    /// The account.
    pub user_id: i64,
    /// The amount reserved.
    pub amount: Decimal,
    /// What its capture posted (zero unless captured).
    pub captured_amount: Decimal,
    /// Where it is in its lifecycle. `Active` with `expires_at` passed: expired, not yet marked.
    pub state: HoldState,
    /// When it stops reserving (UTC, compared with the server clock).
    pub expires_at: NaiveDateTime,
    /// When it was placed (UTC).
    pub created_at: NaiveDateTime,
    /// When it was captured, released or marked expired (UTC).
    pub ended_at: Option<NaiveDateTime>,
    /// The journal entry that ended it.
    pub ended_by_entry_id: Option<i64>,
}

/// A hold row as read.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = balance_hold, check_for_backend(diesel::mysql::Mysql))]
pub(crate) struct HoldRow {
    pub(crate) id: i64,
    pub(crate) user_id: i64,
    pub(crate) amount: Decimal,
    pub(crate) captured_amount: Decimal,
    pub(crate) state: String,
    pub(crate) expires_at: NaiveDateTime,
    pub(crate) created_at: NaiveDateTime,
    pub(crate) ended_at: Option<NaiveDateTime>,
    pub(crate) ended_by_entry_id: Option<i64>,
}

impl HoldRow {
    pub(crate) fn into_hold(self) -> Result<Hold> {
        let state = HoldState::ALL
            .into_iter()
            .find(|state| state.as_str() == self.state)
            .ok_or_else(|| {
                Error::from(diesel::result::Error::DeserializationError(
                    format!("unknown hold state {:?}", self.state).into(),
                ))
            })?;
        Ok(Hold {
            id: self.id,
            user_id: self.user_id,
            amount: self.amount,
            captured_amount: self.captured_amount,
            state,
            expires_at: self.expires_at,
            created_at: self.created_at,
            ended_at: self.ended_at,
            ended_by_entry_id: self.ended_by_entry_id,
        })
    }
}

/// A hold row to write: its id is the journal entry that placed it (written by `InsertRows`).
pub(crate) struct NewHold {
    pub(crate) id: i64,
    pub(crate) user_id: i64,
    pub(crate) amount: Decimal,
    pub(crate) expires_at: NaiveDateTime,
    pub(crate) created_at: NaiveDateTime,
}

/// What a single call decides of its request before it sends anything.
#[derive(Clone)]
pub(crate) enum BeforeSending<'a> {
    /// Refused for its input: an invalid id, amount, key or expiry.
    Refused(Error),
    /// A hold whose expiry has passed, with that refusal: its key is looked up first (a retry
    /// of a hold placed in time answers its entry).
    Expired(Request<'a>, Error),
    /// Such a hold, answered by that lookup, made before the batch sends anything else (as its
    /// single call makes it first): no request of the batch before it carries its key.
    Answered(Result<Entry>),
    /// Sent to the server.
    Send,
}

/// What one [`BalanceLedger::expire_holds`](super::BalanceLedger::expire_holds) call did.
#[non_exhaustive]
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExpiredHolds {
    /// The expire entries written, one per hold marked expired (`related_entry_id`: the hold).
    pub expired: Vec<Entry>,
    /// Accounts with expired holds that were skipped because their row was locked (by a
    /// caller or another sweeper) or the call's deadline ran out, and — when an account's
    /// transaction failed after others had committed — that account and the ones not tried
    /// after it: a later call picks them up.
    pub skipped_accounts: Vec<i64>,
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
    /// Reserve `amount` until `expires_at`, as [`BalanceLedger::hold`](super::BalanceLedger::hold).
    Hold {
        /// The amount.
        amount: Decimal,
        /// The idempotency key.
        key: String,
        /// When the hold stops reserving (UTC).
        expires_at: NaiveDateTime,
    },
    /// Capture `amount` of the account's hold `hold_id`, as
    /// [`BalanceLedger::capture`](super::BalanceLedger::capture).
    Capture {
        /// The hold (of the batch's account).
        hold_id: i64,
        /// The amount.
        amount: Decimal,
        /// The idempotency key.
        key: String,
    },
    /// Release the account's hold `hold_id`, as
    /// [`BalanceLedger::release`](super::BalanceLedger::release).
    Release {
        /// The hold (of the batch's account).
        hold_id: i64,
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

    /// A hold request.
    pub fn hold(amount: Decimal, key: impl Into<String>, expires_at: NaiveDateTime) -> Self {
        Self::Hold {
            amount,
            key: key.into(),
            expires_at,
        }
    }

    /// A capture request.
    pub fn capture(hold_id: i64, amount: Decimal, key: impl Into<String>) -> Self {
        Self::Capture {
            hold_id,
            amount,
            key: key.into(),
        }
    }

    /// A release request.
    pub fn release(hold_id: i64, key: impl Into<String>) -> Self {
        Self::Release {
            hold_id,
            key: key.into(),
        }
    }

    /// The idempotency key.
    pub(crate) fn key(&self) -> &str {
        match self {
            Self::Charge { key, .. }
            | Self::Deduct { key, .. }
            | Self::Hold { key, .. }
            | Self::Capture { key, .. }
            | Self::Release { key, .. } => key,
        }
    }

    /// The hold a capture or release ends.
    pub(crate) fn hold_id(&self) -> Option<i64> {
        match self {
            Self::Capture { hold_id, .. } | Self::Release { hold_id, .. } => Some(*hold_id),
            _ => None,
        }
    }

    /// What the single call of this op on `user_id` decides before it sends anything, a hold's
    /// expiry judged against the caller's clock reading `now`.
    pub(crate) fn before_sending(&self, user_id: i64, now: NaiveDateTime) -> BeforeSending<'_> {
        let checked = match self {
            // The account first, as every other op checks its user id first: a batch on an
            // account that cannot exist refuses its captures and releases before sending
            // anything, as it refuses its charges.
            Self::Capture { .. } | Self::Release { .. } => {
                let checked = crate::validate::validate_id("user", user_id)
                    .and_then(|()| super::check_ending(self));
                return match checked {
                    Ok(()) => BeforeSending::Send,
                    Err(refusal) => BeforeSending::Refused(refusal),
                };
            }
            _ => self
                .request(user_id, None)
                .and_then(|request| request.checked_at(now)),
        };
        match checked {
            Err(refusal) => BeforeSending::Refused(refusal),
            Ok(request) => match request.expiry_refusal() {
                Some(refusal) => BeforeSending::Expired(request, refusal),
                None => BeforeSending::Send,
            },
        }
    }

    /// The request of this op on `user_id`; a capture or release with the hold it ends (read
    /// beforehand: its owner and amount never change). [`Error::HoldNotFound`] for a hold that
    /// is not the account's.
    pub(crate) fn request(&self, user_id: i64, hold: Option<&Hold>) -> Result<Request<'_>> {
        let ended = |hold_id: i64| match hold {
            Some(hold) if hold.id == hold_id && hold.user_id == user_id => Ok(hold),
            _ => Err(Error::HoldNotFound { hold_id }),
        };
        Ok(match self {
            Self::Charge { amount, key } => {
                Request::plain(EntryKind::Charge, user_id, *amount, key)
            }
            Self::Deduct { amount, key } => {
                Request::plain(EntryKind::Deduct, user_id, *amount, key)
            }
            Self::Hold {
                amount,
                key,
                expires_at,
            } => Request::hold(user_id, *amount, key, *expires_at),
            Self::Capture {
                hold_id,
                amount,
                key,
            } => Request::ending(EntryKind::Capture, ended(*hold_id)?, *amount, key),
            Self::Release { hold_id, key } => {
                let hold = ended(*hold_id)?;
                Request::ending(EntryKind::Release, hold, hold.amount, key)
            }
        })
    }
}
