//! The audit: proves from one consistent snapshot that an account's balance and journal agree.

use diesel::mysql::MysqlConnection;
use diesel::prelude::*;
use rust_decimal::Decimal;

use super::rows::find_balance;
use super::types::{Balance, Entry, EntryRow};
use super::BalanceLedger;
use crate::error::{Error, Result};
use crate::records::{AuditReport, EntryKind};
use crate::schema::balance_history;
use crate::validate::validate_id;

impl BalanceLedger {
    /// Proves from one consistent snapshot that the stored balance equals the journal's running
    /// sum, that every entry's `balance_after` matches it, that the change counter equals the
    /// number of entries, that every deduct's refunded total equals its refunds, and that every
    /// received transfer matches its sending entry.
    ///
    /// # Errors
    /// [`Error::AuditFailed`] with the report when the account is inconsistent;
    /// [`Error::InvalidId`], [`Error::AccountNotFound`]; the reader's failures
    /// ([`Error::Contended`], [`Error::Timeout`], [`Error::Server`], ...).
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
