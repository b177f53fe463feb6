//! The ledger's statements, one function each, shared by the single and the batch path: a
//! single call is the batch of one. Every statement run between the account lock and COMMIT is
//! one of [`lock_account`], [`lock_entry`], [`insert_entries`] (and the `LAST_INSERT_ID()` or
//! key lookup inside it), [`SetRefunded`](crate::statements::SetRefunded) and
//! [`store_balance`]; each is a cached prepared statement on the single path.

use diesel::mysql::MysqlConnection;
use diesel::prelude::*;
use rust_decimal::Decimal;

use super::types::{Balance, Entry, EntryRow, NewEntry};
use crate::error::{Error, Result};
use crate::records::EntryKind;
use crate::schema::{balance_history, user_balance};
use crate::statements::SetBalance;
use crate::txn::InsertIds;
use crate::util::{inserted_ids, locked_row};
use crate::validate::MAX_AMOUNT;

/// The locked state of one account.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Account {
    pub(crate) user_id: i64,
    pub(crate) balance: Decimal,
    pub(crate) version: i64,
}

impl Account {
    /// The balance after a credit or debit of `amount`, or why it is refused.
    pub(crate) fn after(&self, kind: EntryKind, amount: Decimal) -> Result<Decimal> {
        if kind.is_credit() {
            self.credit(amount)
        } else {
            self.debit(amount)
        }
    }

    /// [`Error::BalanceLimitExceeded`] past DECIMAL(19,4).
    pub(crate) fn credit(&self, amount: Decimal) -> Result<Decimal> {
        self.balance
            .checked_add(amount)
            .filter(|after| *after <= MAX_AMOUNT)
            .ok_or(Error::BalanceLimitExceeded {
                user_id: self.user_id,
                balance: self.balance,
                requested: amount,
            })
    }

    /// [`Error::InsufficientBalance`] below zero.
    pub(crate) fn debit(&self, amount: Decimal) -> Result<Decimal> {
        if self.balance < amount {
            return Err(Error::InsufficientBalance {
                user_id: self.user_id,
                available: self.balance,
                requested: amount,
            });
        }
        Ok(self.balance - amount)
    }
}

/// `SELECT balance, version FROM user_balance WHERE user_id = ? FOR UPDATE NOWAIT`: the hot
/// row, through the primary key (one record lock). `None`: no account.
pub(crate) fn lock_account(conn: &mut MysqlConnection, user_id: i64) -> Result<Option<Account>> {
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

/// The journal entry `entry_id`, `FOR UPDATE NOWAIT` (a refund's deduct, locked after its
/// account): [`Error::EntryNotFound`] if there is none.
pub(crate) fn lock_entry(conn: &mut MysqlConnection, entry_id: i64) -> Result<Entry> {
    let entry = balance_history::table.find(entry_id);
    let read = entry.select(EntryRow::as_select()).for_update().no_wait();
    locked_row::<_, EntryRow>(conn, read, Error::EntryNotFound { entry_id })?.into_entry()
}

/// Writes `rows` (of one account) with ONE `INSERT` and returns their entries with their ids,
/// in order. One row is a cached prepared statement; `order` says how several rows are numbered
/// (see [`inserted_ids`]; `None` for one row). Several rows carry their keys, through which
/// their ids are read back where they are not consecutive.
pub(crate) fn insert_entries(
    conn: &mut MysqlConnection,
    order: Option<InsertIds>,
    rows: &[NewEntry<'_>],
) -> Result<Vec<Entry>> {
    match rows {
        [] => return Ok(Vec::new()),
        [one] => diesel::insert_into(balance_history::table)
            .values(one)
            .execute(conn)?,
        _ => diesel::insert_into(balance_history::table)
            .values(rows)
            .execute(conn)?,
    };
    let ids = inserted_ids(conn, order, rows.len(), |conn| {
        let keys: Vec<&str> = rows.iter().filter_map(|row| row.idempotency_key).collect();
        let stored = journal_rows(conn, rows[0].user_id, &keys)?;
        Ok(keys
            .iter()
            .filter_map(|key| {
                let row = stored
                    .iter()
                    .find(|r| r.idempotency_key.as_deref() == Some(*key));
                row.map(|r| r.id)
            })
            .collect())
    })?;
    Ok(rows
        .iter()
        .zip(ids)
        .map(|(row, id)| row.written(id))
        .collect())
}

/// `UPDATE user_balance SET balance = ?, version = ?`: the account's new balance after
/// `written` journal entries.
pub(crate) fn store_balance(
    conn: &mut MysqlConnection,
    account: &Account,
    balance: Decimal,
    written: usize,
) -> Result<()> {
    SetBalance {
        user_id: account.user_id,
        balance,
        version: account.version + i64::try_from(written).unwrap_or(i64::MAX),
    }
    .execute(conn)?;
    Ok(())
}

/// `INSERT IGNORE` of an empty account: idempotent, so racing creators are harmless.
pub(crate) fn create_account(conn: &mut MysqlConnection, user_id: i64) -> Result<()> {
    diesel::insert_or_ignore_into(user_balance::table)
        .values(user_balance::user_id.eq(user_id))
        .execute(conn)?;
    Ok(())
}

/// The journal rows of `user_id` under `keys` — one key or a batch's, one statement.
pub(crate) fn journal_rows(
    conn: &mut MysqlConnection,
    user_id: i64,
    keys: &[&str],
) -> Result<Vec<EntryRow>> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    Ok(balance_history::table
        .filter(balance_history::user_id.eq(user_id))
        .filter(balance_history::idempotency_key.eq_any(keys))
        .select(EntryRow::as_select())
        .load(conn)?)
}

/// The journal entry `entry_id` (no lock).
pub(crate) fn find_entry(conn: &mut MysqlConnection, entry_id: i64) -> Result<Option<Entry>> {
    balance_history::table
        .find(entry_id)
        .select(EntryRow::as_select())
        .first::<EntryRow>(conn)
        .optional()?
        .map(EntryRow::into_entry)
        .transpose()
}

/// The receiving entry of the transfer whose sending entry is `debit_id`.
pub(crate) fn find_transfer_credit(
    conn: &mut MysqlConnection,
    debit_id: i64,
) -> Result<Option<Entry>> {
    balance_history::table
        .filter(balance_history::related_entry_id.eq(debit_id))
        .filter(balance_history::kind.eq(EntryKind::TransferIn.as_str()))
        .select(EntryRow::as_select())
        .first::<EntryRow>(conn)
        .optional()?
        .map(EntryRow::into_entry)
        .transpose()
}

/// The account's balance row (no lock).
pub(crate) fn find_balance(conn: &mut MysqlConnection, user_id: i64) -> Result<Option<Balance>> {
    Ok(user_balance::table
        .find(user_id)
        .select(Balance::as_select())
        .first(conn)
        .optional()?)
}
