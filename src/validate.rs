//! Checks of caller input shared by the ledger and the issuer: amounts, idempotency keys, ids.
//! Nothing here touches the database.

use chrono::{NaiveDateTime, TimeDelta};
use rust_decimal::Decimal;

use crate::error::{AmountProblem, Error, ExpiryProblem, KeyProblem, Result};
use crate::util::{now, to_micros};

/// Largest value a DECIMAL(19,4) column holds.
pub const MAX_AMOUNT: Decimal = Decimal::from_parts(0x89E7_FFFF, 0x8AC7_2304, 0, false, 4);

/// Longest idempotency key, in bytes.
pub const MAX_KEY_BYTES: usize = 64;

/// Checks that `amount` fits DECIMAL(19,4) exactly and is positive.
///
/// # Errors
/// [`Error::InvalidAmount`] when it is not positive, has more than four decimal places or
/// exceeds [`MAX_AMOUNT`].
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

/// `amount` at the four decimal places a `DECIMAL(19,4)` column stores — as the server answers
/// it back, so that an answer reads the same written, replayed or read (`10` is answered
/// `10.0000`) — when it is a valid amount ([`validate_amount`]); any other value as given, for
/// its refusal.
pub(crate) fn at_stored_scale(amount: Decimal) -> Decimal {
    if validate_amount(amount).is_err() {
        return amount;
    }
    let mut stored = amount;
    stored.rescale(4);
    stored
}

/// Checks an idempotency key: 1 to 64 bytes, not ending with a space.
///
/// # Errors
/// [`Error::InvalidIdempotencyKey`] when it is empty, longer than [`MAX_KEY_BYTES`] or ends
/// with a space.
pub fn validate_key(key: &str) -> Result<()> {
    let problem = if key.is_empty() {
        KeyProblem::Empty
    } else if key.len() > MAX_KEY_BYTES {
        KeyProblem::TooLong { len: key.len() }
    } else if key.ends_with(' ') {
        // The column compares with PAD SPACE: "k " would collide with "k".
        KeyProblem::TrailingSpace
    } else {
        return Ok(());
    };
    Err(Error::InvalidIdempotencyKey { problem })
}

/// Longest time a hold may reserve points: 90 days from when it is placed.
pub const MAX_HOLD_DURATION: TimeDelta = TimeDelta::days(90);

/// Checks a hold's expiry (UTC) against the caller's clock and returns it at the precision the
/// server stores (microseconds), which is also what the request hash covers.
///
/// # Errors
/// [`Error::InvalidExpiry`] when it is not in the future or further ahead than
/// [`MAX_HOLD_DURATION`].
pub fn validate_expiry(expires_at: NaiveDateTime) -> Result<NaiveDateTime> {
    validate_expiry_at(expires_at, now())
}

/// [`validate_expiry`] against the caller's clock reading `now` (a combined request's: when
/// its call was submitted).
pub(crate) fn validate_expiry_at(
    expires_at: NaiveDateTime,
    now: NaiveDateTime,
) -> Result<NaiveDateTime> {
    let stored = to_micros(expires_at);
    let problem = if stored <= now {
        ExpiryProblem::NotInFuture
    } else if stored - now > MAX_HOLD_DURATION {
        ExpiryProblem::TooFar
    } else {
        return Ok(stored);
    };
    Err(Error::InvalidExpiry {
        expires_at,
        problem,
    })
}

/// Checks that `at` fits a `DATETIME(6)` column — 1000-01-01 00:00:00 to 9999-12-31
/// 23:59:59.999999 (the server stores a later date as a zero date, with a warning) — and
/// returns it as stored (whole microseconds).
///
/// # Errors
/// [`Error::InvalidInput`] for `field` outside that range.
pub(crate) fn validate_datetime(field: &'static str, at: NaiveDateTime) -> Result<NaiveDateTime> {
    use chrono::Datelike;
    if (1000..=9999).contains(&at.year()) {
        Ok(to_micros(at))
    } else {
        Err(Error::InvalidInput {
            field,
            problem: "must be from 1000-01-01 to 9999-12-31 (DATETIME)",
        })
    }
}

/// Checks that an id is positive: [`Error::InvalidId`] otherwise.
pub(crate) fn validate_id(what: &'static str, id: i64) -> Result<()> {
    if id > 0 {
        Ok(())
    } else {
        Err(Error::InvalidId { what, id })
    }
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
}
