//! Plain data that both the ledger and the errors name ([`EntryKind`], [`HoldState`],
//! [`AuditReport`]). A leaf:
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
    /// Points reserved: the available balance shrinks, the posted balance stays. The entry's id
    /// is the hold's id.
    Hold,
    /// A hold captured: the captured amount is posted as a debit, the rest of the hold released.
    Capture,
    /// A hold released (voided) by its owner: nothing posted.
    Release,
    /// A hold that expired, marked by [`BalanceLedger::expire_holds`](crate::BalanceLedger::expire_holds):
    /// nothing posted.
    Expire,
}

impl EntryKind {
    /// Every kind, in the order above.
    pub(crate) const ALL: [Self; 9] = [
        Self::Charge,
        Self::Deduct,
        Self::Refund,
        Self::TransferOut,
        Self::TransferIn,
        Self::Hold,
        Self::Capture,
        Self::Release,
        Self::Expire,
    ];

    /// The value stored in `balance_history.kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Charge => "charge",
            Self::Deduct => "deduct",
            Self::Refund => "refund",
            Self::TransferOut => "transfer_out",
            Self::TransferIn => "transfer_in",
            Self::Hold => "hold",
            Self::Capture => "capture",
            Self::Release => "release",
            Self::Expire => "expire",
        }
    }

    /// Whether the entry adds to the (posted) balance.
    pub fn is_credit(self) -> bool {
        matches!(self, Self::Charge | Self::Refund | Self::TransferIn)
    }

    /// Whether the entry subtracts from the (posted) balance. Hold, release and expire entries
    /// do neither: they change what is available, not what is posted.
    pub fn is_debit(self) -> bool {
        matches!(self, Self::Deduct | Self::TransferOut | Self::Capture)
    }

    /// The state a hold ends in by an entry of this kind (`None`: the kind ends no hold).
    pub fn ends_hold_as(self) -> Option<HoldState> {
        match self {
            Self::Capture => Some(HoldState::Captured),
            Self::Release => Some(HoldState::Released),
            Self::Expire => Some(HoldState::Expired),
            _ => None,
        }
    }
}

/// Where a hold is in its lifecycle: `Active` until exactly one of capture, release or expiry
/// ends it.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HoldState {
    /// Reserving its amount (until its expiry passes on the server clock).
    Active,
    /// Captured: part or all of it posted as a debit, the rest released.
    Captured,
    /// Released by its owner.
    Released,
    /// Expired and marked so by [`BalanceLedger::expire_holds`](crate::BalanceLedger::expire_holds).
    Expired,
}

impl HoldState {
    /// Every state, in the order above.
    pub(crate) const ALL: [Self; 4] = [Self::Active, Self::Captured, Self::Released, Self::Expired];

    /// The value stored in `balance_hold.state`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Captured => "captured",
            Self::Released => "released",
            Self::Expired => "expired",
        }
    }
}

impl fmt::Display for HoldState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
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
    /// The active holds not yet expired on the server clock, summed.
    pub held: Decimal,
    /// `balance - held`: what the account can spend or hold (never below zero in a consistent
    /// report; a report with it below zero comes inside [`Error::AuditFailed`](crate::Error::AuditFailed)).
    pub available: Decimal,
    /// Holds of the account read (in every state).
    pub holds: u64,
    /// Everything that does not add up; empty when the account is consistent.
    pub problems: Vec<String>,
}

impl AuditReport {
    /// Whether the account is consistent.
    pub fn is_consistent(&self) -> bool {
        self.problems.is_empty()
    }
}
