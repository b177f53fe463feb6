//! The audit: proves from one consistent snapshot that an account's balance, journal and holds
//! agree.

use std::collections::HashMap;

use chrono::NaiveDateTime;
use diesel::mysql::MysqlConnection;
use diesel::prelude::*;
use rust_decimal::Decimal;

use super::request_hash;
use super::rows::{find_balance, unexpired_holds};
use super::types::{BalanceRow, Entry, EntryRow, Hold, HoldRow};
use super::BalanceLedger;
use crate::error::{Error, Result};
use crate::records::{AuditReport, EntryKind, HoldState};
use crate::schema::{balance_history, balance_hold};
use crate::statements::read_in_lists;
use crate::validate::validate_id;

/// The holds of an account as the audit reads them: the rows, the `ended_hold_id` of every
/// journal entry that ends one, the server clock and the unexpired active holds summed on it.
struct HoldsRead {
    holds: Vec<Hold>,
    ends: HashMap<i64, i64>,
    clock: NaiveDateTime,
    unexpired: Decimal,
}

impl BalanceLedger {
    /// Proves from one consistent snapshot that the stored balance equals the journal's running
    /// sum, that every entry's `balance_after` matches it, that the change counter equals the
    /// number of entries, that every deduct's refunded total equals its refunds, that every
    /// received transfer matches its sending entry and is that entry's only receiving entry (in
    /// any account), and every sent transfer has exactly one receiving entry, that every entry matches the request it recorded (its request hash,
    /// recomputed from the row: kind, account, amount and reference — a hold's from its expiry)
    /// and carries an idempotency key where the call took one (that a key is there, not which:
    /// the key is not part of the request hash, so a key changed to another value by hand is
    /// not found, and a retry under the old key would then apply again), and for holds: that
    /// every hold
    /// has its hold entry, that every hold ended exactly once (an active hold by no entry; a
    /// captured, released or expired one by exactly one entry of that kind, for the captured
    /// amount or the hold's), that the stored `held` equals the active holds, and that the
    /// available balance (posted minus the active holds not yet expired on the server clock) is
    /// not negative.
    ///
    /// # Errors
    /// [`Error::AuditFailed`] with the report when the account is inconsistent;
    /// [`Error::InvalidId`], [`Error::AccountNotFound`]; the reader's failures
    /// ([`Error::Contended`], [`Error::Timeout`], [`Error::Server`], ...).
    pub fn audit(&self, conn: &mut MysqlConnection, user_id: i64) -> Result<AuditReport> {
        validate_id("user", user_id)?;
        let deadline = self.runner.deadline();
        let (account, rows, transfers, holds) = self.runner.read_by(conn, deadline, |conn| {
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
            let senders: Vec<EntryRow> = read_in_lists(&sender_ids, Some(deadline), |ids| {
                balance_history::table
                    .filter(balance_history::id.eq_any(ids))
                    .select(EntryRow::as_select())
                    .load(conn)
            })?;
            // The receiving entries of this account's sent transfers and of the sending
            // entries its own receiving entries link to (each sent transfer has ONE).
            let sent_ids: Vec<i64> = rows
                .iter()
                .filter(|r| r.kind == EntryKind::TransferOut.as_str())
                .map(|r| r.id)
                .chain(sender_ids.iter().copied())
                .collect();
            let receivers: Vec<EntryRow> = read_in_lists(&sent_ids, Some(deadline), |ids| {
                balance_history::table
                    .filter(balance_history::related_entry_id.eq_any(ids))
                    .filter(balance_history::kind.eq(EntryKind::TransferIn.as_str()))
                    .select(EntryRow::as_select())
                    .load(conn)
            })?;
            // A hold in a state lockstock never writes (a row edited with the CHECK
            // constraints off) is a problem of the report, not a failure to read it.
            let mut unknown_states = Vec::new();
            let holds = balance_hold::table
                .filter(balance_hold::user_id.eq(user_id))
                .select(HoldRow::as_select())
                .load::<HoldRow>(conn)?
                .into_iter()
                .filter_map(|row| {
                    let (id, state) = (row.id, row.state.clone());
                    row.into_hold()
                        .map_err(|_| {
                            unknown_states
                                .push(format!("hold {id} is in an unknown state {state:?}"))
                        })
                        .ok()
                })
                .collect::<Vec<_>>();
            let ends: Vec<(i64, Option<i64>)> = balance_history::table
                .filter(balance_history::user_id.eq(user_id))
                .filter(balance_history::ended_hold_id.is_not_null())
                .select((balance_history::id, balance_history::ended_hold_id))
                .load(conn)?;
            let ends = ends
                .into_iter()
                .filter_map(|(entry, hold)| hold.map(|hold| (entry, hold)))
                .collect();
            let (clock, unexpired) = unexpired_holds(conn, user_id)?;
            let holds = HoldsRead {
                holds,
                ends,
                clock,
                unexpired,
            };
            Ok((account, rows, (senders, receivers), (holds, unknown_states)))
        })?;
        let (holds, unknown_states) = holds;
        let mut record_problems = audit_records(&rows, &holds.holds);
        record_problems.extend(unknown_states);
        // An entry of a kind lockstock never writes is reported (in `audit_records`) and left
        // out of the sums, which then disagree with the balance it changed.
        let entries = rows
            .into_iter()
            .filter_map(|row| row.into_entry().ok())
            .collect::<Vec<_>>();
        let (senders, receivers) = transfers;
        let mut report = audit_entries(&account, &entries, &senders, &receivers);
        report.problems.extend(record_problems);
        audit_holds(&account, &entries, &holds, &mut report);
        if report.is_consistent() {
            Ok(report)
        } else {
            Err(Error::AuditFailed(Box::new(report)))
        }
    }
}

/// Each journal row as its request recorded it: the request hash recomputed from the row (the
/// kind, the account, the amount and the reference: a refund's deduct, a hold's expiry, the
/// hold an ending entry ends, a transfer's counterparty) equals the stored one, and every entry
/// a caller asks for by key has its key. So a row relabelled (a deduct turned into a sent
/// transfer), a hold's expiry moved, or a key removed (which would let a retry apply twice) is
/// found, though the sums still agree. A key changed to another value is not: the request hash
/// leaves the key out (it tells a key's requests apart).
fn audit_records(rows: &[EntryRow], holds: &[Hold]) -> Vec<String> {
    let expiries: HashMap<i64, NaiveDateTime> = holds
        .iter()
        .map(|hold| (hold.id, hold.expires_at))
        .collect();
    let mut problems = Vec::new();
    for row in rows {
        let Ok(kind) = row.kind.parse::<EntryKind>() else {
            problems.push(format!(
                "entry {} is of an unknown kind {:?}",
                row.id, row.kind
            ));
            continue;
        };
        let reference = match kind {
            EntryKind::Charge | EntryKind::Deduct => None,
            EntryKind::Refund | EntryKind::Capture | EntryKind::Release | EntryKind::Expire => {
                row.related_entry_id
            }
            EntryKind::Hold => expiries
                .get(&row.id)
                .map(|at| at.and_utc().timestamp_micros()),
            EntryKind::TransferOut | EntryKind::TransferIn => row.counterparty_user_id,
        };
        if request_hash(kind, row.user_id, row.amount, reference) != row.request_hash {
            problems.push(format!(
                "entry {} ({kind} of {}) does not match its recorded request",
                row.id, row.amount
            ));
        }
        let keyed = !matches!(kind, EntryKind::Expire | EntryKind::TransferIn);
        if keyed && row.idempotency_key.is_none() {
            problems.push(format!("{kind} entry {} has no idempotency key", row.id));
        }
    }
    problems
}

fn audit_entries(
    account: &BalanceRow,
    entries: &[Entry],
    senders: &[EntryRow],
    receivers: &[EntryRow],
) -> AuditReport {
    let senders: HashMap<i64, &EntryRow> = senders.iter().map(|s| (s.id, s)).collect();
    let mut received: HashMap<i64, Vec<&EntryRow>> = HashMap::new();
    for receiver in receivers {
        if let Some(sent) = receiver.related_entry_id {
            received.entry(sent).or_default().push(receiver);
        }
    }
    let mut problems = Vec::new();
    let mut running = Decimal::ZERO;
    let mut refunds_of = std::collections::HashMap::<i64, Decimal>::new();
    for entry in entries {
        if entry.kind.is_credit() {
            running += entry.amount;
        } else if entry.kind.is_debit() {
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
        if entry.kind == EntryKind::TransferOut {
            let matches = match received.get(&entry.id).map(Vec::as_slice) {
                Some([receiver]) => {
                    receiver.amount == entry.amount
                        && Some(receiver.user_id) == entry.counterparty_user_id
                        && receiver.counterparty_user_id == Some(entry.user_id)
                }
                _ => false,
            };
            if !matches {
                problems.push(format!(
                    "sent transfer {} has no single matching receiving entry",
                    entry.id
                ));
            }
        }
        if entry.kind == EntryKind::TransferIn {
            let sender = entry.related_entry_id.and_then(|id| senders.get(&id));
            // ... and the only receiving entry of its sending entry, in any account.
            let credited_once = entry
                .related_entry_id
                .and_then(|id| received.get(&id))
                .is_some_and(|all| matches!(all.as_slice(), [one] if one.id == entry.id));
            let matches = credited_once
                && sender.is_some_and(|s| {
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
        held: Decimal::ZERO,
        available: account.balance,
        holds: 0,
        problems,
    }
}

/// The hold checks (see [`BalanceLedger::audit`]), added to `report`.
fn audit_holds(
    account: &BalanceRow,
    entries: &[Entry],
    read: &HoldsRead,
    report: &mut AuditReport,
) {
    let problems = &mut report.problems;
    let by_id: HashMap<i64, &Hold> = read.holds.iter().map(|hold| (hold.id, hold)).collect();
    let mut ended_by: HashMap<i64, Vec<&Entry>> = HashMap::new();
    let mut placed = 0;
    for entry in entries {
        if entry.kind == EntryKind::Hold {
            placed += 1;
            let matches = by_id
                .get(&entry.id)
                .is_some_and(|hold| hold.amount == entry.amount && hold.user_id == entry.user_id);
            if !matches {
                problems.push(format!("hold entry {} has no matching hold", entry.id));
            }
        }
        let Some(state) = entry.kind.ends_hold_as() else {
            continue;
        };
        let hold_id = read.ends.get(&entry.id).copied();
        if hold_id.is_none() || hold_id != entry.related_entry_id {
            problems.push(format!(
                "{} entry {} links to hold {:?} but ends {hold_id:?}",
                entry.kind, entry.id, entry.related_entry_id
            ));
        }
        let Some(hold) = hold_id.and_then(|id| by_id.get(&id)) else {
            problems.push(format!(
                "{} entry {} ends no hold of the account",
                entry.kind, entry.id
            ));
            continue;
        };
        ended_by.entry(hold.id).or_default().push(entry);
        let amount = match state {
            HoldState::Captured => hold.captured_amount,
            _ => hold.amount,
        };
        if hold.state != state || hold.ended_by_entry_id != Some(entry.id) || entry.amount != amount
        {
            problems.push(format!(
                "{} entry {} of {} does not match hold {} ({}, ended by {:?}, {} of {})",
                entry.kind,
                entry.id,
                entry.amount,
                hold.id,
                hold.state,
                hold.ended_by_entry_id,
                hold.captured_amount,
                hold.amount
            ));
        }
    }
    if placed != read.holds.len() {
        problems.push(format!(
            "{placed} hold entries but {} holds",
            read.holds.len()
        ));
    }
    let mut active = Decimal::ZERO;
    let mut unexpired = Decimal::ZERO;
    for hold in &read.holds {
        let ends = ended_by.get(&hold.id).map_or(0, Vec::len);
        let ended_once = match hold.state {
            HoldState::Active => ends == 0 && hold.ended_by_entry_id.is_none(),
            _ => ends == 1,
        };
        if !ended_once {
            problems.push(format!(
                "hold {} is {} with {ends} ending entries",
                hold.id, hold.state
            ));
        }
        if hold.captured_amount > hold.amount {
            problems.push(format!(
                "hold {} captured {} of {}",
                hold.id, hold.captured_amount, hold.amount
            ));
        }
        if hold.state == HoldState::Active {
            active += hold.amount;
            if hold.expires_at > read.clock {
                unexpired += hold.amount;
            }
        }
    }
    if active != account.held {
        problems.push(format!(
            "held {} but the active holds sum to {active}",
            account.held
        ));
    }
    if unexpired != read.unexpired {
        problems.push(format!(
            "the unexpired holds sum to {unexpired} but the server sums {}",
            read.unexpired
        ));
    }
    let available = account.balance - unexpired;
    if available < Decimal::ZERO {
        problems.push(format!(
            "available balance {available} below zero: balance {} but {unexpired} held",
            account.balance
        ));
    }
    report.held = unexpired;
    report.available = available;
    report.holds = read.holds.len() as u64;
}
