//! The ledger's statements, one function each, shared by the single and the batch path: a
//! single call is the batch of one. Every statement run between the account lock and COMMIT is
//! one of [`lock_account`] (with [`HeldFunds`] when the account has active holds),
//! [`lock_entry`], [`lock_holds`], [`insert_entries`] (and the `LAST_INSERT_ID()` or key lookup
//! inside it), [`insert_holds`], [`end_hold`], [`SetRefunded`](crate::statements::SetRefunded)
//! and [`store_balance`]; each is a cached prepared statement (the INSERTs up to
//! [`MAX_CACHED_ROWS`](crate::statements::MAX_CACHED_ROWS) rows: one per row count). None of
//! them waits for a lock while the account is held: the reads and updates lock with NOWAIT or
//! touch rows this transaction locked already (and no index entry another transaction can
//! lock), the INSERTs — which another transaction's gap lock or uncommitted row under the same
//! key could hold up — are sent wait-free ([`write_under_lock`]), and so is the UPDATE that
//! ends a hold ([`end_hold`]: its state is in two secondary indexes, whose entries another
//! transaction's index-only read of the holds locks), and so is the holds sum ([`read_under_lock`]: under SERIALIZABLE
//! its range read locks the record after the account's range, another account's).

use diesel::mysql::MysqlConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Datetime, Nullable, Numeric, Text};
use rust_decimal::Decimal;

use chrono::NaiveDateTime;

use super::request::KeyedRows;
use super::types::{BalanceRow, Entry, EntryRow, Hold, HoldRow, NewEntry, NewHold};
use crate::error::{Error, Result};
use crate::records::{EntryKind, HoldState};
use crate::schema::{balance_history, balance_hold, user_balance};
use crate::statements::{
    insert_chunks, insert_row, read_in_lists, read_under_lock, write_under_lock, HeldFunds,
    InsertRows, SetBalance, SetHoldEnded,
};
use crate::txn::{locking_read, Deadline, Holding, InsertIds};
use crate::util::{inserted_ids, locked_row};
use crate::validate::MAX_AMOUNT;

/// The locked state of one account (or its running state inside a batch).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Account {
    pub(crate) user_id: i64,
    /// The posted balance.
    pub(crate) balance: Decimal,
    /// The active holds, expired or not (the stored `held`).
    pub(crate) held: Decimal,
    /// `balance` minus the active holds not yet expired on the server clock.
    pub(crate) available: Decimal,
    pub(crate) version: i64,
    /// The server clock read with the holds (`None`: the account had no active hold, so nothing
    /// was read).
    pub(crate) clock: Option<NaiveDateTime>,
}

impl Account {
    /// The account after a credit or debit of `amount`, or why it is refused.
    pub(crate) fn after(&self, kind: EntryKind, amount: Decimal) -> Result<Account> {
        if kind.is_credit() {
            self.credit(amount)
        } else {
            self.debit(amount)
        }
    }

    /// [`Error::BalanceLimitExceeded`] past DECIMAL(19,4).
    pub(crate) fn credit(&self, amount: Decimal) -> Result<Account> {
        let balance = self
            .balance
            .checked_add(amount)
            .filter(|after| *after <= MAX_AMOUNT)
            .ok_or(Error::BalanceLimitExceeded {
                user_id: self.user_id,
                balance: self.balance,
                requested: amount,
            })?;
        Ok(Account {
            balance,
            available: self.available + amount,
            ..*self
        })
    }

    /// [`Error::InsufficientBalance`] when the available balance is smaller.
    pub(crate) fn debit(&self, amount: Decimal) -> Result<Account> {
        self.covers(amount)?;
        Ok(Account {
            balance: self.balance - amount,
            available: self.available - amount,
            ..*self
        })
    }

    /// The account with a new hold of `amount` until `expires_at`: [`Error::InvalidExpiry`]
    /// when that is not after `now` (the server clock, read under the account's lock — the
    /// clock every later check of the hold uses: a hold placed expired on it would never
    /// reserve anything, yet count against `held`), [`Error::InsufficientBalance`] when the
    /// available balance is smaller.
    pub(crate) fn reserve(
        &self,
        amount: Decimal,
        expires_at: NaiveDateTime,
        now: NaiveDateTime,
    ) -> Result<Account> {
        if expires_at <= now {
            return Err(Error::InvalidExpiry {
                expires_at,
                problem: crate::error::ExpiryProblem::NotInFuture,
            });
        }
        self.covers(amount)?;
        let held = self
            .held
            .checked_add(amount)
            .filter(|held| *held <= MAX_AMOUNT)
            .ok_or(Error::BalanceLimitExceeded {
                user_id: self.user_id,
                balance: self.held,
                requested: amount,
            })?;
        Ok(Account {
            held,
            available: self.available - amount,
            ..*self
        })
    }

    /// The account after `hold` ends with `captured` posted (zero for a release or expiry):
    /// the hold no longer counts as active; if it had not expired yet its amount is available
    /// again, less what was captured.
    pub(crate) fn settle(&self, hold: &Hold, captured: Decimal, now: NaiveDateTime) -> Account {
        let reserved = if hold.expires_at > now {
            hold.amount
        } else {
            Decimal::ZERO
        };
        // At the column's four places also where the difference is zero (rust_decimal answers
        // `0.0000 - 0` as `0`): the balance is an entry's `balance_after`, answered as stored.
        let mut balance = self.balance - captured;
        balance.rescale(4);
        Account {
            balance,
            held: self.held - hold.amount,
            available: self.available + reserved - captured,
            ..*self
        }
    }

    fn covers(&self, amount: Decimal) -> Result<()> {
        // The posted balance covers whatever the available balance covers (holds are never
        // negative); both are checked so that a journal written by others cannot go negative.
        if self.available < amount || self.balance < amount {
            return Err(Error::InsufficientBalance {
                user_id: self.user_id,
                available: self.available.min(self.balance),
                requested: amount,
            });
        }
        Ok(())
    }

    /// The server clock, read now if the lock did not read it.
    pub(crate) fn clock(&mut self, conn: &mut MysqlConnection) -> Result<NaiveDateTime> {
        if let Some(now) = self.clock {
            return Ok(now);
        }
        let (now, _): (NaiveDateTime, Decimal) = read_under_lock(
            conn,
            HeldFunds {
                user_id: self.user_id,
            },
        )?;
        self.clock = Some(now);
        Ok(now)
    }
}

/// `SELECT balance, held, version FROM user_balance WHERE user_id = ? FOR UPDATE NOWAIT`: the
/// hot row, through the primary key (one record lock). `None`: no account. When the account
/// has active holds, [`HeldFunds`] then reads the server clock and sums those not yet expired
/// on it (a range of the `(user_id, state, expires_at)` index that only transactions holding
/// this row lock write to; under SERIALIZABLE the read also locks the record after the range,
/// another account's, so it never waits: [`read_under_lock`]; see [`LockedRow::summed`]). In a combiner's batch a refusal
/// is sent again while it can be the account's previous batch committing, and otherwise — when it is the transaction's first
/// lock (`holding`), as in every combined operation — waited out in the server for a few
/// milliseconds at most ([`locking_read`]).
pub(crate) fn lock_account(
    conn: &mut MysqlConnection,
    user_id: i64,
    holding: Holding,
) -> Result<Option<Account>> {
    match lock_account_row(conn, user_id, holding)? {
        Some(row) => row.summed(conn).map(Some),
        None => Ok(None),
    }
}

/// An account row locked by [`lock_account_row`], its holds not summed yet.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LockedRow {
    user_id: i64,
    balance: Decimal,
    held: Decimal,
    version: i64,
}

impl LockedRow {
    /// The account, its active holds not yet expired summed ([`HeldFunds`]) when it has any.
    /// A plain read: under REPEATABLE READ it reads the snapshot of the transaction's first
    /// plain read, so every account a transaction decides on is locked before the first sum
    /// (a transfer locks both, then sums): the snapshot then has every change committed to
    /// them before their locks. Under SERIALIZABLE the read locks what it reads (and the
    /// record after the range, another account's, which it never waits for:
    /// [`read_under_lock`]); under READ COMMITTED it reads the latest rows.
    pub(crate) fn summed(self, conn: &mut MysqlConnection) -> Result<Account> {
        let Self {
            user_id,
            balance,
            held,
            version,
        } = self;
        let (available, clock) = if held > Decimal::ZERO {
            let (now, unexpired): (NaiveDateTime, Decimal) =
                read_under_lock(conn, HeldFunds { user_id })?;
            (balance - unexpired, Some(now))
        } else {
            (balance, None)
        };
        Ok(Account {
            user_id,
            balance,
            held,
            available,
            version,
            clock,
        })
    }
}

/// The account row of [`lock_account`], locked, without its holds summed (`None`: no
/// account): for a transaction that locks several accounts before it sums any
/// ([`LockedRow::summed`]).
pub(crate) fn lock_account_row(
    conn: &mut MysqlConnection,
    user_id: i64,
    holding: Holding,
) -> Result<Option<LockedRow>> {
    let row: Option<(Decimal, Decimal, i64)> = locking_read(conn, holding, |conn, lock| {
        let read = user_balance::table
            .find(user_id)
            .select((
                user_balance::balance,
                user_balance::held,
                user_balance::version,
            ))
            .for_update();
        lock.read(read).get_result(conn).optional()
    })?;
    Ok(row.map(|(balance, held, version)| LockedRow {
        user_id,
        balance,
        held,
        version,
    }))
}

/// The server clock and the active holds of `user_id` not yet expired on it (no lock: for
/// reads in a snapshot).
pub(crate) fn unexpired_holds(
    conn: &mut MysqlConnection,
    user_id: i64,
) -> Result<(NaiveDateTime, Decimal)> {
    Ok(HeldFunds { user_id }.get_result(conn)?)
}

/// The journal entry `entry_id`, `FOR UPDATE NOWAIT` (a refund's deduct, locked after its
/// account): [`Error::EntryNotFound`] if there is none.
pub(crate) fn lock_entry(conn: &mut MysqlConnection, entry_id: i64) -> Result<Entry> {
    let entry = balance_history::table.find(entry_id);
    let read = entry.select(EntryRow::as_select()).for_update().no_wait();
    locked_row::<_, EntryRow>(conn, read, Error::EntryNotFound { entry_id })?.into_entry()
}

/// The holds `hold_ids` (of one account, whose row the caller has locked), each `FOR UPDATE
/// NOWAIT` through the primary key in ascending id order: [`Error::HoldNotFound`] for a missing
/// one; with a `deadline` (a batch's: a statement per hold), [`Error::Timeout`] where it passes
/// before the next one.
pub(crate) fn lock_holds(
    conn: &mut MysqlConnection,
    hold_ids: &[i64],
    deadline: Option<Deadline>,
) -> Result<Vec<Hold>> {
    let mut ids = hold_ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    ids.into_iter()
        .map(|hold_id| {
            if let Some(deadline) = deadline {
                deadline.before_next_statement()?;
            }
            let hold = balance_hold::table.find(hold_id);
            let read = hold.select(HoldRow::as_select()).for_update().no_wait();
            locked_row::<_, HoldRow>(conn, read, Error::HoldNotFound { hold_id })?.into_hold()
        })
        .collect()
}

/// Which of `hold_ids` name a hold (of any account; no lock): one statement per
/// [`MAX_LIST_VALUES`](crate::statements::MAX_LIST_VALUES) ids, none after the first once
/// `deadline` has passed ([`Error::Timeout`]).
pub(crate) fn existing_holds(
    conn: &mut MysqlConnection,
    hold_ids: &[i64],
    deadline: Deadline,
) -> Result<Vec<i64>> {
    read_in_lists(hold_ids, Some(deadline), |some| {
        balance_hold::table
            .filter(balance_hold::id.eq_any(some))
            .select(balance_hold::id)
            .load::<i64>(conn)
    })
}

/// The hold `hold_id` (no lock).
pub(crate) fn find_hold(conn: &mut MysqlConnection, hold_id: i64) -> Result<Option<Hold>> {
    balance_hold::table
        .find(hold_id)
        .select(HoldRow::as_select())
        .first::<HoldRow>(conn)
        .optional()?
        .map(HoldRow::into_hold)
        .transpose()
}

insert_row! {
    NewEntry<'_> => "balance_history" {
        user_id: BigInt => "user_id",
        kind: Text => "kind",
        amount: Numeric => "amount",
        balance_after: Numeric => "balance_after",
        idempotency_key: Nullable<Text> => "idempotency_key",
        request_hash: Text => "request_hash",
        related_entry_id: Nullable<BigInt> => "related_entry_id",
        counterparty_user_id: Nullable<BigInt> => "counterparty_user_id",
        created_at: Datetime => "created_at",
        ended_hold_id: Nullable<BigInt> => "ended_hold_id",
    }
}

insert_row! {
    NewHold => "balance_hold" {
        id: BigInt => "id",
        user_id: BigInt => "user_id",
        amount: Numeric => "amount",
        expires_at: Datetime => "expires_at",
        created_at: Datetime => "created_at",
    }
}

/// Writes the hold rows of the hold `entries` just written (one INSERT, one per
/// [`MAX_INSERT_ROWS`](crate::statements::MAX_INSERT_ROWS) holds), with `expires_at` of each;
/// with a `deadline` (a batch's), [`Error::Timeout`] where it passes before an INSERT after the
/// first.
pub(crate) fn insert_holds(
    conn: &mut MysqlConnection,
    holds: &[(&Entry, NaiveDateTime)],
    deadline: Option<Deadline>,
) -> Result<()> {
    let rows: Vec<NewHold> = holds
        .iter()
        .map(|(entry, expires_at)| NewHold {
            id: entry.id,
            user_id: entry.user_id,
            amount: entry.amount,
            expires_at: *expires_at,
            created_at: entry.created_at,
        })
        .collect();
    for chunk in insert_chunks(&rows, deadline) {
        write_under_lock(conn, InsertRows(chunk?))?;
    }
    Ok(())
}

/// `UPDATE balance_hold SET state = ..`: `hold` ended by `entry` (a capture, release or expire
/// entry) as `state`, with `captured` posted.
pub(crate) fn end_hold(
    conn: &mut MysqlConnection,
    hold_id: i64,
    state: HoldState,
    captured: Decimal,
    entry: &Entry,
) -> Result<()> {
    // Wait-free: the hold's state is in two secondary indexes, and rewriting their entries
    // needs locks on them that another transaction's read of the holds (its index entries
    // only) may hold — a wait here, with the account held, could close a deadlock.
    write_under_lock(
        conn,
        SetHoldEnded {
            state: state.as_str(),
            captured,
            ended_at: entry.created_at,
            entry_id: entry.id,
            hold_id,
        },
    )?;
    Ok(())
}

/// Writes `rows` (of one account) with ONE `INSERT` — one per
/// [`MAX_INSERT_ROWS`](crate::statements::MAX_INSERT_ROWS) rows of a larger batch, each with
/// its ids — and returns their entries with their ids, in order. A cached prepared statement
/// ([`InsertRows`]) for up to `MAX_CACHED_ROWS` rows; `order` says how several rows are
/// numbered (see [`inserted_ids`]; `None` for one row). Several rows carry their keys, through
/// which their ids are read back where they are not consecutive. With a `deadline` (a batch's),
/// [`Error::Timeout`] where it passes before an INSERT after the first (or a read-back's
/// statement after its first).
pub(crate) fn insert_entries(
    conn: &mut MysqlConnection,
    order: Option<InsertIds>,
    rows: &[NewEntry<'_>],
    deadline: Option<Deadline>,
) -> Result<Vec<Entry>> {
    let mut entries = Vec::with_capacity(rows.len());
    for chunk in insert_chunks(rows, deadline) {
        let chunk = chunk?;
        write_under_lock(conn, InsertRows(chunk))?;
        let ids = inserted_ids(conn, order, chunk.len(), None, |conn| {
            let keys: Vec<&str> = chunk.iter().filter_map(|row| row.idempotency_key).collect();
            let stored = KeyedRows::new(journal_rows(conn, chunk[0].user_id, &keys, deadline)?);
            Ok(keys.iter().filter_map(|key| stored.id_of(key)).collect())
        })?;
        entries.extend(chunk.iter().zip(ids).map(|(row, id)| row.written(id)));
    }
    Ok(entries)
}

/// `UPDATE user_balance SET balance = ?, held = ?, version = ?`: the locked `account`'s new
/// state `after` `written` journal entries.
pub(crate) fn store_balance(
    conn: &mut MysqlConnection,
    account: &Account,
    after: &Account,
    written: usize,
) -> Result<()> {
    // The version is the server's: a row edited by hand to near 2^63 must give a typed
    // error (the transaction is rolled back), not an overflow.
    let version = i64::try_from(written)
        .ok()
        .and_then(|written| account.version.checked_add(written))
        .ok_or_else(|| {
            crate::Error::internal(format!(
                "account {}'s version {} cannot count {written} more journal entries",
                account.user_id, account.version
            ))
        })?;
    SetBalance {
        user_id: account.user_id,
        balance: after.balance,
        held: after.held,
        version,
    }
    .execute(conn)?;
    Ok(())
}

/// [`lock_account`], or with `create` (the account was found missing: a first charge, a
/// transfer's receiver) [`create_account`] and then the lock. Sent as the transaction's first
/// statements.
pub(crate) fn lock_or_create(
    conn: &mut MysqlConnection,
    user_id: i64,
    holding: Holding,
    create: bool,
) -> Result<Option<Account>> {
    if !create {
        return lock_account(conn, user_id, holding);
    }
    create_account(conn, user_id)?;
    lock_account(conn, user_id, Holding::Locks)
}

/// Writes `user_id`'s account, empty, unless it exists (`INSERT IGNORE`: a racing creator's
/// committed row is kept), in the caller's transaction — so the account exists only if that
/// transaction commits. Sent before any lock read of the missing key, whose gap lock would
/// refuse a racing creator's INSERT (and theirs this one); wait-free: a racing creator's
/// uncommitted row (or another transaction's gap lock) refuses it, and the runner retries.
pub(crate) fn create_account(conn: &mut MysqlConnection, user_id: i64) -> Result<()> {
    write_under_lock(
        conn,
        diesel::insert_or_ignore_into(user_balance::table)
            .values(user_balance::user_id.eq(user_id)),
    )?;
    Ok(())
}

/// The journal rows of `user_id` under `keys` — one key or a batch's, one statement (one per
/// [`MAX_LIST_VALUES`](crate::statements::MAX_LIST_VALUES) keys; with a `deadline`, none after
/// the first once it has passed: [`Error::Timeout`]).
pub(crate) fn journal_rows(
    conn: &mut MysqlConnection,
    user_id: i64,
    keys: &[&str],
    deadline: Option<Deadline>,
) -> Result<Vec<EntryRow>> {
    read_in_lists(keys, deadline, |some| {
        balance_history::table
            .filter(balance_history::user_id.eq(user_id))
            .filter(balance_history::idempotency_key.eq_any(some))
            .select(EntryRow::as_select())
            .load(conn)
    })
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
pub(crate) fn find_balance(conn: &mut MysqlConnection, user_id: i64) -> Result<Option<BalanceRow>> {
    Ok(user_balance::table
        .find(user_id)
        .select(BalanceRow::as_select())
        .first(conn)
        .optional()?)
}
