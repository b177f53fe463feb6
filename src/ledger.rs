//! [`BalanceLedger`]: charge, deduct, refund and transfer — never negative, never applied twice,
//! every change journaled.
//!
//! # How a change is made
//! One SERIALIZABLE transaction per call (see [`TxnRunner`]):
//! 1. `SELECT ... FROM user_balance WHERE user_id = ? FOR UPDATE NOWAIT` — through the primary key,
//!    so InnoDB takes one record lock. A transfer locks both rows in ascending `user_id` order.
//! 2. Check the balance against the request (nothing written on refusal).
//! 3. `INSERT` the journal entry, `SELECT LAST_INSERT_ID()`, `UPDATE` the balance, `COMMIT`.
//!
//! There is no "does this key exist?" read before the insert: under SERIALIZABLE a read of a
//! missing key locks the gap around it, which would block other users' inserts. Instead the
//! UNIQUE(user_id, idempotency_key) index rejects a reused key, and only then — or when the
//! request is refused — is the key looked up, in a lock-free snapshot. A key that exists always
//! wins: the same request gets its original entry back, a different one [`Error::IdempotencyConflict`],
//! whatever the balance is now (TigerBeetle's `exists` semantics).
//!
//! Every call has ONE [`Deadline`], fixed when it starts (the policy's
//! [`RetryPolicy::deadline`](crate::RetryPolicy::deadline)) and shared by all it does: the
//! account-creation transaction, every retry, every round of a batch and every key lookup. Once
//! it has passed nothing more is sent.

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;

use chrono::{NaiveDateTime, Utc};
use diesel::mysql::MysqlConnection;
use diesel::prelude::*;
use rust_decimal::Decimal;

use crate::error::{AmountProblem, Error, KeyProblem, Result, ServerError, ServerErrorKind};
use crate::schema::{balance_history, user_balance};
use crate::statements::{SetBalance, SetRefunded};
use crate::txn::{Deadline, InsertIds, TxnPolicy, TxnRunner};

diesel::define_sql_function! {
    /// The id of the row the last INSERT on this connection created.
    fn last_insert_id() -> diesel::sql_types::Unsigned<diesel::sql_types::BigInt>;
}

/// Largest value a DECIMAL(19,4) column holds.
pub const MAX_AMOUNT: Decimal = Decimal::from_parts(0x89E7_FFFF, 0x8AC7_2304, 0, false, 4);

/// Longest idempotency key, in bytes.
pub const MAX_KEY_BYTES: usize = 64;

/// Largest page [`BalanceLedger::history`] returns.
pub const MAX_HISTORY_PAGE: u32 = 1000;

/// What a journal entry records.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryKind {
    /// Money added.
    Charge,
    /// Money spent.
    Deduct,
    /// Money given back against a deduct.
    Refund,
    /// The sending side of a transfer.
    TransferOut,
    /// The receiving side of a transfer.
    TransferIn,
}

impl EntryKind {
    /// The value stored in `balance_history.kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Charge => "charge",
            Self::Deduct => "deduct",
            Self::Refund => "refund",
            Self::TransferOut => "transfer_out",
            Self::TransferIn => "transfer_in",
        }
    }

    /// Whether the entry adds to the balance (otherwise it subtracts).
    pub fn is_credit(self) -> bool {
        matches!(self, Self::Charge | Self::Refund | Self::TransferIn)
    }
}

impl fmt::Display for EntryKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EntryKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "charge" => Self::Charge,
            "deduct" => Self::Deduct,
            "refund" => Self::Refund,
            "transfer_out" => Self::TransferOut,
            "transfer_in" => Self::TransferIn,
            _ => {
                return Err(Error::from(diesel::result::Error::DeserializationError(
                    format!("unknown journal entry kind {s:?}").into(),
                )))
            }
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

#[derive(Clone, Queryable, Selectable)]
#[diesel(table_name = balance_history, check_for_backend(diesel::mysql::Mysql))]
struct EntryRow {
    id: i64,
    user_id: i64,
    kind: String,
    amount: Decimal,
    balance_after: Decimal,
    idempotency_key: Option<String>,
    request_hash: String,
    related_entry_id: Option<i64>,
    counterparty_user_id: Option<i64>,
    refunded_amount: Decimal,
    created_at: NaiveDateTime,
}

impl EntryRow {
    fn into_entry(self) -> Result<Entry> {
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

// `treat_none_as_default_value = false`: otherwise every field is "maybe DEFAULT" and Diesel
// re-prepares the INSERT on every call (the Option columns default to NULL anyway).
#[derive(Insertable)]
#[diesel(table_name = balance_history, treat_none_as_default_value = false)]
struct NewEntry<'a> {
    user_id: i64,
    kind: &'a str,
    amount: Decimal,
    balance_after: Decimal,
    idempotency_key: Option<&'a str>,
    request_hash: &'a str,
    related_entry_id: Option<i64>,
    counterparty_user_id: Option<i64>,
    created_at: NaiveDateTime,
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

/// What [`BalanceLedger::audit`] checked.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditReport {
    /// The account.
    pub user_id: i64,
    /// The stored balance.
    pub balance: Decimal,
    /// The journal's running sum.
    pub journal_sum: Decimal,
    /// Journal entries read.
    pub entries: u64,
    /// Everything that does not add up; empty when the account is consistent.
    pub problems: Vec<String>,
}

impl AuditReport {
    /// Whether the account is consistent.
    pub fn is_consistent(&self) -> bool {
        self.problems.is_empty()
    }
}

/// A balance-changing request, as hashed for idempotency.
#[derive(Debug, Clone, Copy)]
struct Request<'a> {
    kind: EntryKind,
    user_id: i64,
    amount: Decimal,
    /// Counterparty of a transfer, deduct entry of a refund.
    reference: Option<i64>,
    key: &'a str,
}

impl Request<'_> {
    /// FNV-1a 64 of the canonical request, hex. It compares two requests under one key of one
    /// account, so it needs stability across versions and processes, not collision resistance
    /// against an attacker.
    fn hash(&self) -> String {
        let canonical = format!(
            "{}|{}|{}|{}",
            self.kind,
            self.user_id,
            self.amount.normalize(),
            self.reference.unwrap_or(0)
        );
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in canonical.bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        format!("{hash:016x}")
    }
}

/// Checks that `amount` fits DECIMAL(19,4) exactly and is positive.
pub fn validate_amount(amount: Decimal) -> Result<()> {
    let problem = if amount <= Decimal::ZERO {
        Some(AmountProblem::NotPositive)
    } else if amount.normalize().scale() > 4 {
        Some(AmountProblem::TooManyDecimals)
    } else if amount > MAX_AMOUNT {
        Some(AmountProblem::TooLarge)
    } else {
        None
    };
    problem.map_or(Ok(()), |problem| {
        Err(Error::InvalidAmount { amount, problem })
    })
}

/// Checks an idempotency key: 1 to 64 bytes, not ending with a space.
pub fn validate_key(key: &str) -> Result<()> {
    if key.is_empty() {
        Err(Error::InvalidIdempotencyKey {
            problem: KeyProblem::Empty,
        })
    } else if key.len() > MAX_KEY_BYTES {
        Err(Error::InvalidIdempotencyKey {
            problem: KeyProblem::TooLong { len: key.len() },
        })
    } else if key.ends_with(' ') {
        // The column compares with PAD SPACE: "k " would collide with "k".
        Err(Error::InvalidIdempotencyKey {
            problem: KeyProblem::TrailingSpace,
        })
    } else {
        Ok(())
    }
}

/// Checks that an id is positive.
pub(crate) fn validate_id(what: &'static str, id: i64) -> Result<()> {
    if id > 0 {
        Ok(())
    } else {
        Err(Error::InvalidId { what, id })
    }
}

/// Outcome of one transaction attempt that is not an error.
enum Step<T> {
    Done(T),
    /// The account row is missing and the operation creates it (charge, transfer receiver).
    CreateAccount(i64),
}

/// Keeps point/money balances: charge, deduct, refund, transfer, balance, history, audit.
///
/// Holds a [`TxnPolicy`], no connection; share one ledger between threads.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use diesel::{Connection, MysqlConnection};
/// use lockstock::{BalanceLedger, Error};
/// use rust_decimal::Decimal;
/// let dec = Decimal::new;
///
/// let url = lockstock_testkit::sandbox::database_url("doc_ledger")?;
/// let mut conn = MysqlConnection::establish(&url)?;
/// # use diesel::connection::SimpleConnection;
/// # conn.batch_execute("DROP DATABASE doc_ledger; CREATE DATABASE doc_ledger; USE doc_ledger")?; // a fresh run each time
/// lockstock::run_migrations(&mut conn)?;
/// let ledger = BalanceLedger::new();
///
/// ledger.charge(&mut conn, 7, dec(100_00, 2), "charge-1")?;
/// let spent = ledger.deduct(&mut conn, 7, dec(30_00, 2), "order-1")?;
/// assert_eq!(spent.balance_after, dec(70_00, 2));
///
/// // The same key and request again: the original entry, nothing applied twice.
/// assert_eq!(ledger.deduct(&mut conn, 7, dec(30_00, 2), "order-1")?.id, spent.id);
///
/// // Partial refund, linked to the deduct; refunds can never exceed it.
/// let back = ledger.refund(&mut conn, spent.id, dec(10_00, 2), "refund-1")?;
/// assert_eq!(back.related_entry_id, Some(spent.id));
/// assert!(matches!(
///     ledger.refund(&mut conn, spent.id, dec(25_00, 2), "refund-2"),
///     Err(Error::RefundExceedsDeduct { .. })
/// ));
///
/// assert!(matches!(
///     ledger.deduct(&mut conn, 7, dec(1_000_00, 2), "order-2"),
///     Err(Error::InsufficientBalance { .. })
/// ));
/// assert_eq!(ledger.balance(&mut conn, 7)?.balance, dec(80_00, 2));
/// assert!(ledger.audit(&mut conn, 7)?.is_consistent());
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Default)]
pub struct BalanceLedger {
    runner: TxnRunner,
}

impl BalanceLedger {
    /// A ledger with the default policy (SERIALIZABLE, NOWAIT locks, bounded retries).
    pub fn new() -> Self {
        Self::default()
    }

    /// A ledger with `policy`.
    pub fn with_policy(policy: TxnPolicy) -> Self {
        Self {
            runner: TxnRunner::new(policy),
        }
    }

    /// The policy.
    pub fn policy(&self) -> &TxnPolicy {
        self.runner.policy()
    }

    /// The transaction runner (for batch and combining layers built on the ledger).
    pub fn runner(&self) -> &TxnRunner {
        &self.runner
    }

    /// Adds `amount` to `user_id`'s balance, creating the account on its first charge.
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

    /// [`charge`](Self::charge) by `deadline` (a combined caller's).
    pub(crate) fn charge_by(
        &self,
        conn: &mut MysqlConnection,
        user_id: i64,
        amount: Decimal,
        idempotency_key: &str,
        deadline: Deadline,
    ) -> Result<Entry> {
        let kind = EntryKind::Charge;
        self.change(conn, kind, user_id, amount, idempotency_key, deadline)
    }

    /// Subtracts `amount` from `user_id`'s balance; refuses with [`Error::InsufficientBalance`]
    /// (writing nothing) when the balance is smaller.
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

    /// [`deduct`](Self::deduct) by `deadline` (a combined caller's).
    pub(crate) fn deduct_by(
        &self,
        conn: &mut MysqlConnection,
        user_id: i64,
        amount: Decimal,
        idempotency_key: &str,
        deadline: Deadline,
    ) -> Result<Entry> {
        let kind = EntryKind::Deduct;
        self.change(conn, kind, user_id, amount, idempotency_key, deadline)
    }

    /// A charge or a deduct: one account, one journal entry.
    fn change(
        &self,
        conn: &mut MysqlConnection,
        kind: EntryKind,
        user_id: i64,
        amount: Decimal,
        idempotency_key: &str,
        deadline: Deadline,
    ) -> Result<Entry> {
        let request = Request {
            kind,
            user_id,
            amount,
            reference: None,
            key: idempotency_key,
        };
        validate_request(&request)?;
        self.single_entry(conn, &request, deadline, |conn| {
            let Some(account) = lock_account(conn, user_id)? else {
                return if kind == EntryKind::Charge {
                    Ok(Step::CreateAccount(user_id))
                } else {
                    Err(Error::AccountNotFound { user_id })
                };
            };
            let balance_after = balance_after(&account, kind, amount)?;
            let entry = insert_entry(conn, &request, balance_after, None)?;
            store_balance(conn, &account, balance_after)?;
            Ok(Step::Done(entry))
        })
    }

    /// Gives back `amount` of the deduct `deduct_entry_id`. Partial refunds are allowed; their
    /// sum never exceeds the deduct ([`Error::RefundExceedsDeduct`]), also when they race. The
    /// key belongs to the deduct's account.
    pub fn refund(
        &self,
        conn: &mut MysqlConnection,
        deduct_entry_id: i64,
        amount: Decimal,
        idempotency_key: &str,
    ) -> Result<Entry> {
        validate_id("journal entry", deduct_entry_id)?;
        validate_amount(amount)?;
        validate_key(idempotency_key)?;
        let deadline = self.runner.deadline();
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
            amount,
            reference: Some(deduct_entry_id),
            key: idempotency_key,
        };
        if original.kind != EntryKind::Deduct {
            return Err(Error::NotRefundable {
                entry_id: deduct_entry_id,
                kind: original.kind,
            });
        }
        self.single_entry(conn, &request, deadline, |conn| {
            let account = lock_account(conn, original.user_id)?.ok_or(Error::AccountNotFound {
                user_id: original.user_id,
            })?;
            let deduct = lock_entry(conn, deduct_entry_id)?;
            if deduct.refunded_amount + amount > deduct.amount {
                return Err(Error::RefundExceedsDeduct {
                    entry_id: deduct_entry_id,
                    deducted: deduct.amount,
                    refunded: deduct.refunded_amount,
                    requested: amount,
                });
            }
            let balance_after = credit(&account, amount)?;
            let entry = insert_entry(conn, &request, balance_after, None)?;
            SetRefunded {
                entry_id: deduct_entry_id,
                refunded: deduct.refunded_amount + amount,
            }
            .execute(conn)?;
            store_balance(conn, &account, balance_after)?;
            Ok(Step::Done(entry))
        })
    }

    /// Moves `amount` from `from` to `to`: both rows locked in ascending `user_id` order (so
    /// opposite transfers cannot deadlock), one journal entry per side. The receiver's account is
    /// created if needed; the key belongs to the sender.
    pub fn transfer(
        &self,
        conn: &mut MysqlConnection,
        from: i64,
        to: i64,
        amount: Decimal,
        idempotency_key: &str,
    ) -> Result<Transfer> {
        let request = Request {
            kind: EntryKind::TransferOut,
            user_id: from,
            amount,
            reference: Some(to),
            key: idempotency_key,
        };
        validate_request(&request)?;
        validate_id("user", to)?;
        if from == to {
            return Err(Error::SelfTransfer { user_id: from });
        }
        let deadline = self.runner.deadline();
        let attempt = |conn: &mut MysqlConnection| {
            let (first, second) = (from.min(to), from.max(to));
            let first_row = lock_account(conn, first)?;
            let second_row = lock_account(conn, second)?;
            let (sender, receiver) = if first == from {
                (first_row, second_row)
            } else {
                (second_row, first_row)
            };
            let sender = sender.ok_or(Error::AccountNotFound { user_id: from })?;
            // Refuse before creating the receiver: a refused transfer writes nothing.
            let sender_after = debit(&sender, amount)?;
            let Some(receiver) = receiver else {
                return Ok(Step::CreateAccount(to));
            };
            let receiver_after = credit(&receiver, amount)?;
            let debit_entry = insert_entry(conn, &request, sender_after, None)?;
            let incoming = Request {
                kind: EntryKind::TransferIn,
                user_id: to,
                amount,
                reference: Some(from),
                key: idempotency_key,
            };
            let credit_entry = insert_entry(conn, &incoming, receiver_after, Some(debit_entry.id))?;
            store_balance(conn, &sender, sender_after)?;
            store_balance(conn, &receiver, receiver_after)?;
            Ok(Step::Done(Transfer {
                debit: debit_entry,
                credit: credit_entry,
            }))
        };
        self.idempotent(conn, &request, deadline, attempt, |conn, debit| {
            let credit = self
                .runner
                .read_by(conn, deadline, |conn| find_transfer_credit(conn, debit.id))?
                .ok_or(Error::EntryNotFound { entry_id: debit.id })?;
            Ok(Transfer { debit, credit })
        })
    }

    /// The current balance of `user_id`, from a lock-free consistent snapshot.
    pub fn balance(&self, conn: &mut MysqlConnection, user_id: i64) -> Result<Balance> {
        validate_id("user", user_id)?;
        self.runner
            .read(conn, |conn| find_balance(conn, user_id))?
            .ok_or(Error::AccountNotFound { user_id })
    }

    /// Up to `limit` journal entries of `user_id`, newest first, older than the entry id
    /// `before` (keyset pagination over the (user_id, id) index: no OFFSET scans).
    pub fn history(
        &self,
        conn: &mut MysqlConnection,
        user_id: i64,
        before: Option<i64>,
        limit: u32,
    ) -> Result<HistoryPage> {
        validate_id("user", user_id)?;
        if limit == 0 || limit > MAX_HISTORY_PAGE {
            return Err(Error::InvalidInput {
                field: "limit",
                problem: "must be between 1 and 1000",
            });
        }
        let rows: Vec<EntryRow> = self.runner.read(conn, |conn| {
            let mut query = balance_history::table
                .filter(balance_history::user_id.eq(user_id))
                .order(balance_history::id.desc())
                .limit(i64::from(limit))
                .select(EntryRow::as_select())
                .into_boxed();
            if let Some(cursor) = before {
                query = query.filter(balance_history::id.lt(cursor));
            }
            Ok(query.load(conn)?)
        })?;
        let entries = rows
            .into_iter()
            .map(EntryRow::into_entry)
            .collect::<Result<Vec<_>>>()?;
        let next_cursor = if entries.len() == limit as usize {
            entries.last().map(|e| e.id)
        } else {
            None
        };
        Ok(HistoryPage {
            entries,
            next_cursor,
        })
    }

    /// Proves from one consistent snapshot that the stored balance equals the journal's running
    /// sum, that every entry's `balance_after` matches it, that the change counter equals the
    /// number of entries, that every deduct's refunded total equals its refunds, and that every
    /// received transfer matches its sending entry. Inconsistency: [`Error::AuditFailed`].
    pub fn audit(&self, conn: &mut MysqlConnection, user_id: i64) -> Result<AuditReport> {
        validate_id("user", user_id)?;
        let (account, rows, senders) = self.runner.read(conn, |conn| {
            let account = find_balance(conn, user_id)?.ok_or(Error::AccountNotFound { user_id })?;
            let rows: Vec<EntryRow> = balance_history::table
                .filter(balance_history::user_id.eq(user_id))
                .order(balance_history::id.asc())
                .select(EntryRow::as_select())
                .load(conn)?;
            let sender_ids: Vec<i64> = rows
                .iter()
                .filter(|r| r.kind == EntryKind::TransferIn.as_str())
                .filter_map(|r| r.related_entry_id)
                .collect();
            let senders: Vec<EntryRow> = balance_history::table
                .filter(balance_history::id.eq_any(&sender_ids))
                .select(EntryRow::as_select())
                .load(conn)?;
            Ok((account, rows, senders))
        })?;
        let entries = rows
            .into_iter()
            .map(EntryRow::into_entry)
            .collect::<Result<Vec<_>>>()?;
        let report = audit_entries(&account, &entries, &senders);
        if report.is_consistent() {
            Ok(report)
        } else {
            Err(Error::AuditFailed(Box::new(report)))
        }
    }

    /// Runs a one-entry operation with idempotency.
    fn single_entry(
        &self,
        conn: &mut MysqlConnection,
        request: &Request<'_>,
        deadline: Deadline,
        attempt: impl FnMut(&mut MysqlConnection) -> Result<Step<Entry>>,
    ) -> Result<Entry> {
        self.idempotent(conn, request, deadline, attempt, |_, entry| Ok(entry))
    }

    /// Runs `attempt` in the runner; creates a missing account outside the transaction and runs
    /// again; turns a reused key (or a refusal while the key exists) into the original result or
    /// an [`Error::IdempotencyConflict`]. Everything runs by the call's one `deadline`.
    fn idempotent<T>(
        &self,
        conn: &mut MysqlConnection,
        request: &Request<'_>,
        deadline: Deadline,
        mut attempt: impl FnMut(&mut MysqlConnection) -> Result<Step<T>>,
        replay: impl FnOnce(&mut MysqlConnection, Entry) -> Result<T>,
    ) -> Result<T> {
        // Creating an account is a separate short transaction (retried like any other): an
        // empty FOR UPDATE on a missing key holds only a gap lock, and two first charges
        // inserting into the same gap would deadlock. INSERT IGNORE is idempotent, so racing
        // creators are harmless.
        let mut created = false;
        loop {
            match self.runner.run_by(conn, deadline, &mut attempt) {
                Ok(Step::Done(value)) => return Ok(value),
                Ok(Step::CreateAccount(user_id)) if !created => {
                    // A key already used decides the answer before the account is written.
                    if let Some(entry) = self.existing(conn, request, deadline)? {
                        return replay(conn, entry);
                    }
                    self.runner
                        .run_by(conn, deadline, |conn| create_account(conn, user_id))?;
                    created = true;
                }
                Ok(Step::CreateAccount(user_id)) => return Err(Error::AccountNotFound { user_id }),
                Err(error) if error.replay_may_apply() => {
                    return match self.existing(conn, request, deadline)? {
                        Some(entry) => replay(conn, entry),
                        None => Err(error),
                    }
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// The entry recorded under the request's key, if any; a different request under the same
    /// key is an [`Error::IdempotencyConflict`].
    fn existing(
        &self,
        conn: &mut MysqlConnection,
        request: &Request<'_>,
        deadline: Deadline,
    ) -> Result<Option<Entry>> {
        let row: Option<EntryRow> = self.runner.read_by(conn, deadline, |conn| {
            Ok(balance_history::table
                .filter(balance_history::user_id.eq(request.user_id))
                .filter(balance_history::idempotency_key.eq(request.key))
                .select(EntryRow::as_select())
                .first(conn)
                .optional()?)
        })?;
        row.map(|row| answer_from_journal(row, request)).transpose()
    }
}

impl Error {
    /// Refusals after which an existing entry under the same key decides the answer.
    fn replay_may_apply(&self) -> bool {
        matches!(
            self,
            Self::InsufficientBalance { .. }
                | Self::BalanceLimitExceeded { .. }
                | Self::RefundExceedsDeduct { .. }
                | Self::AccountNotFound { .. }
        ) || self.server_kind() == Some(ServerErrorKind::DuplicateKey)
    }
}

fn validate_request(request: &Request<'_>) -> Result<()> {
    validate_id("user", request.user_id)?;
    validate_amount(request.amount)?;
    validate_key(request.key)
}

/// The locked state of one account.
#[derive(Debug, Clone, Copy)]
struct Account {
    user_id: i64,
    balance: Decimal,
    version: i64,
}

fn lock_account(conn: &mut MysqlConnection, user_id: i64) -> Result<Option<Account>> {
    let row: Option<(Decimal, i64)> = user_balance::table
        .find(user_id)
        .select((user_balance::balance, user_balance::version))
        .for_update()
        .no_wait()
        .first(conn)
        .optional()?;
    Ok(row.map(|(balance, version)| Account {
        user_id,
        balance,
        version,
    }))
}

fn lock_entry(conn: &mut MysqlConnection, entry_id: i64) -> Result<Entry> {
    balance_history::table
        .find(entry_id)
        .select(EntryRow::as_select())
        .for_update()
        .no_wait()
        .first::<EntryRow>(conn)
        .optional()?
        .ok_or(Error::EntryNotFound { entry_id })?
        .into_entry()
}

/// The balance after a credit or debit of `amount`, or why it is refused.
fn balance_after(account: &Account, kind: EntryKind, amount: Decimal) -> Result<Decimal> {
    if kind.is_credit() {
        credit(account, amount)
    } else {
        debit(account, amount)
    }
}

fn credit(account: &Account, amount: Decimal) -> Result<Decimal> {
    account
        .balance
        .checked_add(amount)
        .filter(|after| *after <= MAX_AMOUNT)
        .ok_or(Error::BalanceLimitExceeded {
            user_id: account.user_id,
            balance: account.balance,
            requested: amount,
        })
}

fn debit(account: &Account, amount: Decimal) -> Result<Decimal> {
    if account.balance < amount {
        return Err(Error::InsufficientBalance {
            user_id: account.user_id,
            available: account.balance,
            requested: amount,
        });
    }
    Ok(account.balance - amount)
}

fn insert_entry(
    conn: &mut MysqlConnection,
    request: &Request<'_>,
    balance_after: Decimal,
    related_entry_id: Option<i64>,
) -> Result<Entry> {
    let created_at = now();
    let (key, related, counterparty) = match request.kind {
        EntryKind::Refund => (Some(request.key), request.reference, None),
        EntryKind::TransferIn => (None, related_entry_id, request.reference),
        EntryKind::TransferOut => (Some(request.key), None, request.reference),
        EntryKind::Charge | EntryKind::Deduct => (Some(request.key), None, None),
    };
    let hash = request.hash();
    diesel::insert_into(balance_history::table)
        .values(NewEntry {
            user_id: request.user_id,
            kind: request.kind.as_str(),
            amount: request.amount,
            balance_after,
            idempotency_key: key,
            request_hash: &hash,
            related_entry_id: related,
            counterparty_user_id: counterparty,
            created_at,
        })
        .execute(conn)?;
    Ok(Entry {
        id: inserted_id(conn)?,
        user_id: request.user_id,
        kind: request.kind,
        amount: request.amount,
        balance_after,
        idempotency_key: key.map(str::to_owned),
        related_entry_id: related,
        counterparty_user_id: counterparty,
        refunded_amount: Decimal::ZERO,
        created_at,
    })
}

/// The id of the first row the last INSERT on this connection created.
pub(crate) fn inserted_id(conn: &mut MysqlConnection) -> Result<i64> {
    let id: u64 = diesel::select(last_insert_id()).get_result(conn)?;
    i64::try_from(id)
        .map_err(|e| Error::from(diesel::result::Error::DeserializationError(e.into())))
}

fn store_balance(conn: &mut MysqlConnection, account: &Account, balance: Decimal) -> Result<()> {
    SetBalance {
        user_id: account.user_id,
        balance,
        version: account.version + 1,
    }
    .execute(conn)?;
    Ok(())
}

fn create_account(conn: &mut MysqlConnection, user_id: i64) -> Result<()> {
    diesel::insert_or_ignore_into(user_balance::table)
        .values(user_balance::user_id.eq(user_id))
        .execute(conn)?;
    Ok(())
}

fn find_entry(conn: &mut MysqlConnection, entry_id: i64) -> Result<Option<Entry>> {
    balance_history::table
        .find(entry_id)
        .select(EntryRow::as_select())
        .first::<EntryRow>(conn)
        .optional()?
        .map(EntryRow::into_entry)
        .transpose()
}

fn find_transfer_credit(conn: &mut MysqlConnection, debit_id: i64) -> Result<Option<Entry>> {
    balance_history::table
        .filter(balance_history::related_entry_id.eq(debit_id))
        .filter(balance_history::kind.eq(EntryKind::TransferIn.as_str()))
        .select(EntryRow::as_select())
        .first::<EntryRow>(conn)
        .optional()?
        .map(EntryRow::into_entry)
        .transpose()
}

fn find_balance(conn: &mut MysqlConnection, user_id: i64) -> Result<Option<Balance>> {
    Ok(user_balance::table
        .find(user_id)
        .select(Balance::as_select())
        .first(conn)
        .optional()?)
}

/// Current UTC time at the precision of DATETIME(6), so a returned value equals the stored one.
pub(crate) fn now() -> NaiveDateTime {
    to_micros(Utc::now().naive_utc())
}

/// `at` truncated to DATETIME(6)'s microseconds, so what is returned equals what is stored.
pub(crate) fn to_micros(at: NaiveDateTime) -> NaiveDateTime {
    use chrono::Timelike;
    let nanos = at.nanosecond();
    at.with_nanosecond(nanos - nanos % 1_000).unwrap_or(at)
}

fn audit_entries(account: &Balance, entries: &[Entry], senders: &[EntryRow]) -> AuditReport {
    let mut problems = Vec::new();
    let mut running = Decimal::ZERO;
    let mut refunds_of = std::collections::HashMap::<i64, Decimal>::new();
    for entry in entries {
        if entry.kind.is_credit() {
            running += entry.amount;
        } else {
            running -= entry.amount;
        }
        if running < Decimal::ZERO {
            problems.push(format!(
                "entry {} takes the running sum below zero: {running}",
                entry.id
            ));
        }
        if entry.balance_after != running {
            problems.push(format!(
                "entry {}: balance_after {} but running sum {running}",
                entry.id, entry.balance_after
            ));
        }
        if entry.kind == EntryKind::Refund {
            match entry.related_entry_id {
                Some(deduct) => *refunds_of.entry(deduct).or_default() += entry.amount,
                None => problems.push(format!("refund {} links to no deduct", entry.id)),
            }
        }
        if entry.kind == EntryKind::TransferIn {
            let sender = senders
                .iter()
                .find(|s| Some(s.id) == entry.related_entry_id);
            let matches = sender.is_some_and(|s| {
                s.kind == EntryKind::TransferOut.as_str()
                    && s.amount == entry.amount
                    && s.counterparty_user_id == Some(entry.user_id)
                    && Some(s.user_id) == entry.counterparty_user_id
            });
            if !matches {
                problems.push(format!(
                    "received transfer {} has no matching sending entry",
                    entry.id
                ));
            }
        }
    }
    for entry in entries.iter().filter(|e| e.kind == EntryKind::Deduct) {
        let refunded = refunds_of.remove(&entry.id).unwrap_or_default();
        if refunded != entry.refunded_amount || refunded > entry.amount {
            problems.push(format!(
                "deduct {}: refunded_amount {} but refunds sum to {refunded} (amount {})",
                entry.id, entry.refunded_amount, entry.amount
            ));
        }
    }
    for (deduct, sum) in refunds_of {
        problems.push(format!(
            "refunds of {sum} link to {deduct}, which is not a deduct of this account"
        ));
    }
    if running != account.balance {
        problems.push(format!(
            "balance {} but journal sums to {running}",
            account.balance
        ));
    }
    let count = entries.len() as u64;
    if u64::try_from(account.version).ok() != Some(count) {
        problems.push(format!(
            "version {} but {count} journal entries",
            account.version
        ));
    }
    AuditReport {
        user_id: account.user_id,
        balance: account.balance,
        journal_sum: running,
        entries: count,
        problems,
    }
}

/// One request of a batch on one account (see [`BalanceLedger::apply_many`]).
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccountOp {
    /// Add `amount`, as [`BalanceLedger::charge`].
    Charge {
        /// The amount.
        amount: Decimal,
        /// The idempotency key.
        key: String,
    },
    /// Subtract `amount`, as [`BalanceLedger::deduct`].
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

    fn request(&self, user_id: i64) -> Request<'_> {
        let (kind, amount, key) = match self {
            Self::Charge { amount, key } => (EntryKind::Charge, *amount, key),
            Self::Deduct { amount, key } => (EntryKind::Deduct, *amount, key),
        };
        Request {
            kind,
            user_id,
            amount,
            reference: None,
            key,
        }
    }
}

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
    /// The outer `Err` is a failure before anything was committed ([`Error::Contended`],
    /// [`Error::Timeout`], ...): then no request in the batch was applied (or, for
    /// [`Error::OutcomeUnknown`] of the COMMIT, all or none were). Once the batch has committed
    /// the call answers per request: the committed ones with their entries; a refused one whose
    /// key could not be looked up after the commit (step 4) with [`Error::OutcomeUnknown`].
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
            .map(|r| validate_request(r).err().map(Err))
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
                let rows = self.journal_rows(conn, deadline, user_id, &requests, &open)?;
                for index in open {
                    results[index] = answer_from_rows(&rows, &requests[index]);
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
            if !refused.is_empty() {
                let open: Vec<usize> = refused.iter().map(|(index, _)| *index).collect();
                match self.journal_rows(conn, deadline, user_id, &requests, &open) {
                    Ok(rows) => {
                        for (index, refusal) in refused {
                            results[index] = Some(
                                answer_from_rows(&rows, &requests[index]).unwrap_or(Err(refusal)),
                            );
                        }
                    }
                    Err(failure) => {
                        for (index, _) in refused {
                            results[index] = Some(Err(outcome_unknown(&failure)));
                        }
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

    /// The journal rows of `user_id` under the keys of the requests `open` (lock-free snapshot).
    fn journal_rows(
        &self,
        conn: &mut MysqlConnection,
        deadline: Deadline,
        user_id: i64,
        requests: &[Request<'_>],
        open: &[usize],
    ) -> Result<Vec<EntryRow>> {
        let keys: Vec<&str> = open.iter().map(|i| requests[*i].key).collect();
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        self.runner.read_by(conn, deadline, |conn| {
            Ok(balance_history::table
                .filter(balance_history::user_id.eq(user_id))
                .filter(balance_history::idempotency_key.eq_any(&keys))
                .select(EntryRow::as_select())
                .load(conn)?)
        })
    }
}

/// The requests of a batch that have no answer yet.
fn unanswered(results: &[Option<Result<Entry>>]) -> Vec<usize> {
    (0..results.len())
        .filter(|i| results[*i].is_none())
        .collect()
}

/// The answer the journal gives `request`, if its key is among `rows`.
fn answer_from_rows(rows: &[EntryRow], request: &Request<'_>) -> Option<Result<Entry>> {
    rows.iter()
        .find(|r| r.idempotency_key.as_deref() == Some(request.key))
        .map(|row| answer_from_journal(row.clone(), request))
}

/// The answer to `request` when its key is already in the journal as `row`: the original entry
/// for the same request, [`Error::IdempotencyConflict`] for a different one.
fn answer_from_journal(row: EntryRow, request: &Request<'_>) -> Result<Entry> {
    if row.request_hash != request.hash() {
        return Err(Error::IdempotencyConflict {
            user_id: request.user_id,
            key: request.key.to_owned(),
            existing_entry_id: row.id,
        });
    }
    row.into_entry()
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
/// accepted ones with one multi-row INSERT, reads their ids back and stores the final balance.
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
    let created_at = now();
    let mut running = *account;
    let mut exists = !account_was_missing;
    // (request index, balance after, request hash) of every row to write.
    let mut new_rows: Vec<(usize, Decimal, String)> = Vec::new();
    let mut written_keys: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
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
                match balance_after(&running, request.kind, request.amount) {
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
    let ids = write_rows(
        conn,
        insert_ids,
        account,
        requests,
        &new_rows,
        running.balance,
        created_at,
    )?;
    let entry_of = |n: usize| -> Entry {
        let (index, after, _) = &new_rows[n];
        let request = &requests[*index];
        Entry {
            id: ids[n],
            user_id: account.user_id,
            kind: request.kind,
            amount: request.amount,
            balance_after: *after,
            idempotency_key: Some(request.key.to_owned()),
            related_entry_id: None,
            counterparty_user_id: None,
            refunded_amount: Decimal::ZERO,
            created_at,
        }
    };
    Ok(decisions
        .into_iter()
        .map(|(index, decision)| {
            let result = match decision {
                Decision::New(n) | Decision::SameAs(n) => Ok(entry_of(n)),
                Decision::Conflict(n) => Err(Error::IdempotencyConflict {
                    user_id: account.user_id,
                    key: requests[index].key.to_owned(),
                    existing_entry_id: ids[n],
                }),
                Decision::Refused(refusal) => Err(refusal),
            };
            (index, result)
        })
        .collect())
}

/// Writes the batch's rows and the account's new balance; returns the rows' ids in order.
fn write_rows(
    conn: &mut MysqlConnection,
    insert_ids: InsertIds,
    account: &Account,
    requests: &[Request<'_>],
    new_rows: &[(usize, Decimal, String)],
    balance: Decimal,
    created_at: NaiveDateTime,
) -> Result<Vec<i64>> {
    if new_rows.is_empty() {
        return Ok(Vec::new());
    }
    let values: Vec<NewEntry<'_>> = new_rows
        .iter()
        .map(|(index, after, hash)| {
            let request = &requests[*index];
            NewEntry {
                user_id: account.user_id,
                kind: request.kind.as_str(),
                amount: request.amount,
                balance_after: *after,
                idempotency_key: Some(request.key),
                request_hash: hash,
                related_entry_id: None,
                counterparty_user_id: None,
                created_at,
            }
        })
        .collect();
    diesel::insert_into(balance_history::table)
        .values(&values)
        .execute(conn)?;
    let ids = match insert_ids {
        InsertIds::Consecutive { step } => {
            let first = inserted_id(conn)?;
            (0..new_rows.len())
                .map(|i| first + step * i64::try_from(i).unwrap_or(i64::MAX))
                .collect()
        }
        // Under innodb_autoinc_lock_mode = 2 (MySQL 8's default) one INSERT's ids need not be
        // consecutive: read them back through the unique (user_id, key) index.
        InsertIds::Unordered => {
            let keys: Vec<&str> = new_rows.iter().map(|(i, _, _)| requests[*i].key).collect();
            let stored: std::collections::HashMap<String, i64> = balance_history::table
                .filter(balance_history::user_id.eq(account.user_id))
                .filter(balance_history::idempotency_key.eq_any(&keys))
                .select((balance_history::idempotency_key, balance_history::id))
                .load::<(Option<String>, i64)>(conn)?
                .into_iter()
                .filter_map(|(key, id)| key.map(|k| (k, id)))
                .collect();
            keys.iter()
                .map(|key| {
                    stored
                        .get(*key)
                        .copied()
                        .ok_or(Error::from(diesel::result::Error::NotFound))
                })
                .collect::<Result<Vec<i64>>>()?
        }
    };
    let written = i64::try_from(new_rows.len()).unwrap_or(i64::MAX);
    SetBalance {
        user_id: account.user_id,
        balance,
        version: account.version + written,
    }
    .execute(conn)?;
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_amount_is_decimal_19_4() {
        assert_eq!(MAX_AMOUNT.to_string(), "999999999999999.9999");
    }

    #[test]
    fn amount_validation() {
        assert!(validate_amount(Decimal::new(1, 4)).is_ok());
        assert!(validate_amount(MAX_AMOUNT).is_ok());
        // Trailing zeros are not extra precision.
        assert!(validate_amount(Decimal::new(1_000_000, 6)).is_ok());
        let problem = |d| match validate_amount(d) {
            Err(Error::InvalidAmount { problem, .. }) => Some(problem),
            _ => None,
        };
        assert_eq!(problem(Decimal::ZERO), Some(AmountProblem::NotPositive));
        assert_eq!(
            problem(Decimal::new(-5, 0)),
            Some(AmountProblem::NotPositive)
        );
        assert_eq!(
            problem(Decimal::new(1, 5)),
            Some(AmountProblem::TooManyDecimals)
        );
        assert_eq!(
            problem(MAX_AMOUNT + Decimal::new(1, 4)),
            Some(AmountProblem::TooLarge)
        );
    }

    #[test]
    fn request_hash_is_canonical() {
        let a = Request {
            kind: EntryKind::Deduct,
            user_id: 1,
            amount: Decimal::new(100, 1),
            reference: None,
            key: "k",
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
}
