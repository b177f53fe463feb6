//! What a server error means: [`ServerErrorKind`], and the one table that classifies server
//! errors by message text (private: read it through [`ServerError::kind`](super::ServerError::kind)
//! and [`ServerError::code`](super::ServerError::code)).
//!
//! Diesel's MySQL backend keeps the server's error number for only a few errors (1062 becomes
//! `UniqueViolation`, 1213 `SerializationFailure`); everything else arrives as `Unknown` with the
//! message text alone. lockstock therefore classifies by message text, with every pattern for both
//! MariaDB and MySQL 8 kept in [`CLASSIFICATION`] and unit-tested against both servers' texts.
//! The session runs with `lc_messages = 'en_US'` so the texts are stable.

use diesel::result::{DatabaseErrorKind, Error as DieselError};

/// What a server error means to lockstock, classified from Diesel's error.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServerErrorKind {
    /// MySQL 8 refused a `NOWAIT` locking read because another transaction holds the row (3572).
    LockRefused,
    /// A lock was not granted in time (1205). MariaDB also reports a `NOWAIT` refusal this way.
    /// Only the statement was rolled back; lockstock rolls back the whole transaction.
    LockWaitTimeout,
    /// InnoDB chose this transaction as a deadlock victim and rolled it back (1213).
    Deadlock,
    /// "Record has changed since last read" (1020): a snapshot conflict; the transaction must restart.
    RecordChanged,
    /// A UNIQUE or PRIMARY KEY constraint rejected a write (1062).
    DuplicateKey,
    /// A CHECK constraint rejected a write (MariaDB 4025, MySQL 3819).
    CheckViolation,
    /// The statement time limit interrupted a statement (MariaDB 1969, MySQL 3024).
    StatementTimeout,
    /// The connection to the server was lost or killed (2006, 2013, 1927, 1053, 4031).
    ConnectionLost,
    /// The statement was interrupted by `KILL QUERY` (1317). Only the statement was rolled
    /// back; lockstock rolls back the whole transaction and retries it. During COMMIT the
    /// outcome is unknown.
    Interrupted,
    /// Anything else.
    Other,
}

impl ServerErrorKind {
    /// Whether restarting the whole transaction can succeed: lock refusals and timeouts,
    /// deadlocks, snapshot conflicts and interrupted statements. A lost connection is not
    /// retried on the same connection.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Self::LockRefused
                | Self::LockWaitTimeout
                | Self::Deadlock
                | Self::RecordChanged
                | Self::Interrupted
        )
    }

    /// Whether a COMMIT that failed this way certainly applied nothing: the transaction was
    /// aborted as a deadlock victim, for a lock or snapshot conflict (as Galera reports a
    /// certification failure at COMMIT). An interrupted or lost COMMIT may have been applied.
    pub fn is_definite_abort(self) -> bool {
        matches!(
            self,
            Self::LockRefused | Self::LockWaitTimeout | Self::Deadlock | Self::RecordChanged
        )
    }

    /// The error number MariaDB uses for this kind, if there is one.
    pub fn mariadb_code(self) -> Option<u16> {
        self.rule().map(|r| r.mariadb_code).filter(|c| *c != 0)
    }

    /// The error number MySQL 8 uses for this kind, if there is one.
    pub fn mysql_code(self) -> Option<u16> {
        self.rule().map(|r| r.mysql_code).filter(|c| *c != 0)
    }

    fn rule(self) -> Option<&'static Classification> {
        CLASSIFICATION.iter().find(|r| r.kind == self)
    }
}

/// One line of the classification table.
#[derive(Debug)]
struct Classification {
    /// The kind a matching error gets.
    kind: ServerErrorKind,
    /// MariaDB's error number (0: MariaDB has none of its own).
    mariadb_code: u16,
    /// MySQL 8's error number (0: MySQL has none of its own).
    mysql_code: u16,
    /// Case-insensitive fragments of the English message; any one matching classifies the error.
    fragments: &'static [&'static str],
}

/// Every server error lockstock recognises, in match order (first match wins).
const CLASSIFICATION: &[Classification] = &[
    Classification {
        kind: ServerErrorKind::LockRefused,
        mariadb_code: 0,
        mysql_code: 3572,
        fragments: &["nowait is set", "could not be acquired immediately"],
    },
    Classification {
        kind: ServerErrorKind::LockWaitTimeout,
        mariadb_code: 1205,
        mysql_code: 1205,
        fragments: &["lock wait timeout exceeded"],
    },
    Classification {
        kind: ServerErrorKind::Deadlock,
        mariadb_code: 1213,
        mysql_code: 1213,
        fragments: &["deadlock found when trying to get lock"],
    },
    Classification {
        kind: ServerErrorKind::RecordChanged,
        mariadb_code: 1020,
        mysql_code: 1020,
        fragments: &["record has changed since last read"],
    },
    Classification {
        kind: ServerErrorKind::DuplicateKey,
        mariadb_code: 1062,
        mysql_code: 1062,
        fragments: &["duplicate entry"],
    },
    Classification {
        kind: ServerErrorKind::CheckViolation,
        mariadb_code: 4025,
        mysql_code: 3819,
        // MariaDB: "CONSTRAINT `c` failed for `db`.`t`"; MySQL: "Check constraint 'c' is violated."
        fragments: &["` failed for `", "check constraint '"],
    },
    Classification {
        kind: ServerErrorKind::StatementTimeout,
        mariadb_code: 1969,
        mysql_code: 3024,
        fragments: &[
            "max_statement_time exceeded",
            "maximum statement execution time exceeded",
        ],
    },
    // After StatementTimeout, whose texts start the same way.
    Classification {
        kind: ServerErrorKind::Interrupted,
        mariadb_code: 1317,
        mysql_code: 1317,
        fragments: &["query execution was interrupted"],
    },
    Classification {
        kind: ServerErrorKind::ConnectionLost,
        mariadb_code: 2013,
        mysql_code: 2013,
        fragments: &[
            "server has gone away",
            "lost connection to",
            "connection was killed",
            "server shutdown in progress",
            "can't connect to",
            "disconnected by the server",
            "connection refused",
            "broken pipe",
        ],
    },
];

/// Classifies a Diesel error by its kind and message text.
pub(crate) fn classify(error: &DieselError) -> ServerErrorKind {
    match error {
        DieselError::DatabaseError(kind, info) => match kind {
            DatabaseErrorKind::UniqueViolation => ServerErrorKind::DuplicateKey,
            DatabaseErrorKind::SerializationFailure => ServerErrorKind::Deadlock,
            DatabaseErrorKind::CheckViolation => ServerErrorKind::CheckViolation,
            DatabaseErrorKind::ClosedConnection => ServerErrorKind::ConnectionLost,
            _ => classify_message(info.message()),
        },
        DieselError::RollbackErrorOnCommit { commit_error, .. } => classify(commit_error),
        DieselError::BrokenTransactionManager => ServerErrorKind::ConnectionLost,
        _ => ServerErrorKind::Other,
    }
}

/// Classifies a server error message (English texts of MariaDB or MySQL 8).
fn classify_message(message: &str) -> ServerErrorKind {
    let message = message.to_ascii_lowercase();
    CLASSIFICATION
        .iter()
        .find(|rule| rule.fragments.iter().any(|f| message.contains(f)))
        .map_or(ServerErrorKind::Other, |rule| rule.kind)
}
