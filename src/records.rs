//! Plain data that both the ledger and the errors name ([`EntryKind`], [`AuditReport`]). A leaf:
//! it depends on no other lockstock module, so `error` does not depend on `ledger`.

use std::fmt;

use rust_decimal::Decimal;

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
    /// Every kind, in the order above.
    pub(crate) const ALL: [Self; 5] = [
        Self::Charge,
        Self::Deduct,
        Self::Refund,
        Self::TransferOut,
        Self::TransferIn,
    ];

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

/// What [`BalanceLedger::audit`](crate::BalanceLedger::audit) checked.
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
