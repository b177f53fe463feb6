//! The idempotency loop around every single write: run the transaction, run it again creating a
//! missing account inside it (so a call that fails leaves no account), and answer a reused key
//! (or a refusal while the key exists) from the journal — the original entry for the same
//! request, [`Error::IdempotencyConflict`] for a different one.

use diesel::mysql::MysqlConnection;

use super::request::{KeyedRows, Request};
use super::rows::journal_rows;
use super::types::Entry;
use super::BalanceLedger;
use crate::error::{Error, ExpiryProblem, Result};
use crate::txn::Deadline;

/// Outcome of one transaction attempt that is not an error.
pub(crate) enum Step<T> {
    Done(T),
    /// The account row is missing and the operation creates it (charge, transfer receiver).
    CreateAccount(i64),
}

impl BalanceLedger {
    /// Runs a one-entry operation with idempotency.
    pub(crate) fn single_entry(
        &self,
        conn: &mut MysqlConnection,
        request: &Request<'_>,
        deadline: Deadline,
        attempt: impl FnMut(&mut MysqlConnection, bool) -> Result<Step<Entry>>,
    ) -> Result<Entry> {
        self.idempotent(conn, request, deadline, attempt, |_, entry| Ok(entry))
    }

    /// Runs `attempt` in the runner; when it finds the account missing
    /// ([`Step::CreateAccount`]), runs it again with `true` (create the account: an empty row,
    /// written in that same transaction, so a call that fails leaves no account behind); turns a
    /// reused key (or a refusal while the key exists) into the original result or an
    /// [`Error::IdempotencyConflict`]. Everything runs by the call's one `deadline`.
    pub(crate) fn idempotent<T>(
        &self,
        conn: &mut MysqlConnection,
        request: &Request<'_>,
        deadline: Deadline,
        mut attempt: impl FnMut(&mut MysqlConnection, bool) -> Result<Step<T>>,
        replay: impl FnOnce(&mut MysqlConnection, Entry) -> Result<T>,
    ) -> Result<T> {
        let mut create = false;
        loop {
            // An attempt that finds the account missing ends with a ROLLBACK, not an empty
            // COMMIT (which in a combiner would hand the key's turn on while the call goes on).
            let mut missing = None;
            // A refusal that the key's lookup answers stays the answer when the runner could
            // not end its attempt: the lookup then fails, and answers OutcomeUnknown. Not one
            // that shows no call of the request can have been applied (a missing account: no
            // entry of an account that does not exist can be recorded; a hold ended otherwise
            // than this request ends it): where its ROLLBACK failed that failure is the answer
            // (as a batch answers it).
            let refusal = |e: &Error| {
                (e.replay_may_apply() && !e.refusal_proves_unapplied(request.kind))
                    || e.is_expiry_refusal()
            };
            let attempt = self.runner.run_by_keeping(conn, deadline, refusal, |conn| {
                missing = None;
                match attempt(conn, create)? {
                    Step::CreateAccount(user_id) => {
                        missing = Some(user_id);
                        Err(account_missing())
                    }
                    done => Ok(done),
                }
            });
            // Only the marker itself: a failure of the runner after it (its ROLLBACK, the
            // watchdog) is the call's answer.
            let attempt = match (attempt, missing) {
                (Err(e), Some(user_id)) if is_account_missing(&e) => {
                    Ok(Step::CreateAccount(user_id))
                }
                (attempt, _) => attempt,
            };
            match attempt {
                Ok(Step::Done(value)) => return Ok(value),
                Ok(Step::CreateAccount(_)) if !create => {
                    // A key already used decides the answer before the account is written.
                    if let Some(entry) = self.existing(conn, request, deadline)? {
                        return replay(conn, entry);
                    }
                    create = true;
                }
                Ok(Step::CreateAccount(user_id)) => return Err(Error::AccountNotFound { user_id }),
                // A hold whose expiry had passed on the server clock: answered as one refused
                // on the caller's clock (see `expired_hold` for a key it cannot look up).
                Err(error) if error.is_expiry_refusal() => {
                    let entry = self.expired_hold(conn, request, error, deadline)?;
                    return replay(conn, entry);
                }
                Err(error) if error.replay_may_apply() => {
                    return match self.existing(conn, request, deadline) {
                        Ok(Some(entry)) => replay(conn, entry),
                        Ok(None) => Err(error),
                        // Another request under the key: the answer, not a failure.
                        Err(conflict @ Error::IdempotencyConflict { .. }) => Err(conflict),
                        // No earlier call of the request can have been applied (an account
                        // that did not exist, a hold ended otherwise): the refusal stands where
                        // its key cannot be looked up (the lookup would only find another
                        // request under it, a conflict: nothing of this one applied either).
                        Err(_) if error.refusal_proves_unapplied(request.kind) => Err(error),
                        Err(failure) => Err(Error::unknown_after_refusal(failure)),
                    };
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// The entry recorded under the request's key, if any; a different request under the same
    /// key is an [`Error::IdempotencyConflict`].
    pub(crate) fn existing(
        &self,
        conn: &mut MysqlConnection,
        request: &Request<'_>,
        deadline: Deadline,
    ) -> Result<Option<Entry>> {
        let rows = self.journal_rows_by(conn, deadline, request.user_id, &[request.key])?;
        request.answer_from(&rows).transpose()
    }

    /// The journal rows of `user_id` under `keys`, in a lock-free snapshot by `deadline`.
    pub(crate) fn journal_rows_by(
        &self,
        conn: &mut MysqlConnection,
        deadline: Deadline,
        user_id: i64,
        keys: &[&str],
    ) -> Result<KeyedRows> {
        if keys.is_empty() {
            return Ok(KeyedRows::default());
        }
        let rows = self.runner.read_by(conn, deadline, |conn| {
            journal_rows(conn, user_id, keys, Some(deadline))
        })?;
        Ok(KeyedRows::new(rows))
    }
}

/// Why an attempt that found its account missing ended (with a ROLLBACK, where an empty
/// COMMIT would hand a combiner's turn on while the call goes on): a marker the runner answers
/// as it is, turned back into [`Step::CreateAccount`] by the caller.
const ACCOUNT_MISSING: &str = "lockstock: the account is missing (an attempt's marker)";

/// The marker error of an attempt that found its account missing.
pub(crate) fn account_missing() -> Error {
    Error::internal(ACCOUNT_MISSING)
}

/// Whether `error` is [`account_missing`]'s marker (not a failure that came after it).
pub(crate) fn is_account_missing(error: &Error) -> bool {
    matches!(error, Error::Internal { reason } if &**reason == ACCOUNT_MISSING)
}

impl Error {
    /// A hold refused because its expiry is not in the future (on either clock): answered by
    /// its key's lookup — the entry recorded under the key, else this refusal, and
    /// [`Error::OutcomeUnknown`] where the lookup fails (see `expired_hold`).
    pub(crate) fn is_expiry_refusal(&self) -> bool {
        matches!(
            self,
            Self::InvalidExpiry {
                problem: ExpiryProblem::NotInFuture,
                ..
            }
        )
    }

    /// Refusals after which an existing entry under the same key decides the answer.
    pub(crate) fn replay_may_apply(&self) -> bool {
        matches!(
            self,
            Self::InsufficientBalance { .. }
                | Self::BalanceLimitExceeded { .. }
                | Self::RefundExceedsDeduct { .. }
                | Self::AccountNotFound { .. }
                | Self::HoldNotActive { .. }
                | Self::HoldExpired { .. }
                | Self::CaptureExceedsHold { .. }
                // A hold's expiry refused on a clock: passed, or (on a clock behind the one
                // that placed it) too far ahead.
                | Self::InvalidExpiry { .. }
        ) || self.is_duplicate()
    }
}
