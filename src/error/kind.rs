//! What a server error means: [`ServerErrorKind`], and the one table that classifies server
//! errors by message text (private: read it through [`ServerError::kind`](super::ServerError::kind)
//! and [`ServerError::code`](super::ServerError::code)).
//!
//! Diesel's MySQL backend keeps the server's error number for only a few errors (1062 becomes
//! `UniqueViolation`, 1213 `SerializationFailure`); everything else arrives as `Unknown` with the
//! message text alone. lockstock therefore classifies by message text, with every pattern for both
//! MariaDB and MySQL 8 kept in [`CLASSIFICATION`] and unit-tested against both servers' texts.
//! The session runs with `lc_messages = 'en_US'` so the texts are stable.
//!
//! MariaDB Galera clusters (MariaDB only: MySQL 8 has no Galera) add two answers, both observed
//! on a 3-node MariaDB 10.11 cluster by `tests/it/galera.rs`:
//! - a write set that lost certification to a conflicting write of another node is rolled back
//!   and answered with 1213 "Deadlock found when trying to get lock; try restarting
//!   transaction", at COMMIT or at the next statement: [`ServerErrorKind::Deadlock`], a definite
//!   abort, retried. (MariaDB can also word it "WSREP detected deadlock/conflict and aborted the
//!   transaction. Try restarting the transaction", again as 1213; that text was not seen here.)
//! - a node outside the Primary component (it lost quorum, or is not yet synced) refuses every
//!   statement but `SET`, `SHOW` and table-less `SELECT`s — `BEGIN`, `ROLLBACK` and `COMMIT`
//!   included — with 1047 "WSREP has not yet prepared node for application use":
//!   [`ServerErrorKind::NodeNotReady`].

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
    /// InnoDB chose this transaction as a deadlock victim and rolled it back (1213), or — on a
    /// MariaDB Galera cluster — its write set lost certification to a conflicting write made
    /// through another node (also 1213, at COMMIT or at the next statement). Either way the
    /// whole transaction was rolled back and nothing of it was applied on any node; the runner
    /// restarts it. Also a Galera brute-force abort the server did not report, which lockstock
    /// notices when the rows a multi-row INSERT just wrote are gone and no transaction is open.
    Deadlock,
    /// "Record has changed since last read" (1020): a snapshot conflict; the transaction must restart.
    RecordChanged,
    /// A UNIQUE or PRIMARY KEY constraint rejected a write (1062).
    DuplicateKey,
    /// A CHECK constraint rejected a write (MariaDB 4025, MySQL 3819).
    CheckViolation,
    /// A FOREIGN KEY constraint rejected a write (1452: the row it refers to is missing; 1451: a
    /// row refers to the one deleted).
    ForeignKeyViolation,
    /// The statement time limit interrupted a statement (MariaDB 1969, MySQL 3024).
    StatementTimeout,
    /// The connection to the server was lost or killed (2002, 2003, 2006, 2013, 1927, 1053;
    /// MySQL 8 also 4031), or lockstock found it broken.
    ConnectionLost,
    /// The statement was interrupted by `KILL QUERY` (1317). Only the statement was rolled
    /// back; lockstock rolls back the whole transaction and retries it. During COMMIT the
    /// outcome is unknown.
    Interrupted,
    /// MariaDB Galera only (1047, "WSREP has not yet prepared node for application use"): the
    /// node is not part of the cluster's Primary component (it lost quorum, was isolated or is
    /// still joining) and refuses every statement that reads or writes tables, `BEGIN`,
    /// `ROLLBACK` and `COMMIT` included. Refused before COMMIT, nothing was applied (the
    /// statement was never run, and nothing leaves a node before COMMIT). Not retried on the
    /// same connection — the node may stay out for long: move to a connection to another node.
    /// Because the node refuses ROLLBACK as well, lockstock marks the connection broken and
    /// usually answers [`Error::ConnectionBroken`](crate::Error::ConnectionBroken) with this
    /// kind as its source; a COMMIT refused this way is answered
    /// [`Error::OutcomeUnknown`](crate::Error::OutcomeUnknown), conservatively.
    NodeNotReady,
    /// The server runs `read_only` (1290: `--read-only`, MySQL also `--super-read-only`) — a
    /// replica, a node being drained — and refuses the statement: writes, and on MariaDB 10.11
    /// also locking reads, of users without `READ ONLY ADMIN`. Nothing was applied. Not retried:
    /// the server stays read-only until someone changes it; send writes to the primary.
    ReadOnly,
    /// A table's definition changed under the transaction (1412, "Table definition has
    /// changed, please retry transaction": a table rebuilt after the transaction's snapshot),
    /// a prepared statement could not be prepared again after such a change (1615), or a wait
    /// for a table's metadata lock was aborted for a pending exclusive one (1689): DDL ran
    /// beside the call. Only the statement failed; lockstock rolls back the whole transaction
    /// and retries it. During COMMIT the outcome is unknown.
    MetadataChanged,
    /// Anything else.
    Other,
}

impl ServerErrorKind {
    /// Whether restarting the whole transaction can succeed: lock refusals and timeouts,
    /// deadlocks (Galera certification conflicts included), snapshot conflicts, interrupted
    /// statements and statements that met a table's definition changing. A lost connection and a Galera node outside the Primary component
    /// ([`NodeNotReady`](Self::NodeNotReady)) are not retried on the same connection.
    pub fn is_retryable(self) -> bool {
        // An interrupted statement, or one that met DDL, aborted only itself; the rest are
        // definite aborts.
        self.is_definite_abort() || matches!(self, Self::Interrupted | Self::MetadataChanged)
    }

    /// Whether a COMMIT that failed this way certainly applied nothing: the transaction was
    /// aborted as a deadlock victim, for a lock or snapshot conflict (as Galera reports a
    /// certification failure at COMMIT). An interrupted or lost COMMIT may have been applied.
    /// A COMMIT that a Galera node refused as [`NodeNotReady`](Self::NodeNotReady) is not
    /// counted as a definite abort (the server refuses it before running it, but lockstock
    /// does not rely on that).
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
    /// Case-insensitive beginnings of the English message, each with the MariaDB error number
    /// that has that text (0: none of its own, or not one number); a message that begins with
    /// any one is of this kind.
    fragments: &'static [(&'static str, u16)],
}

/// Every server error lockstock recognises, in match order (first match wins).
const CLASSIFICATION: &[Classification] = &[
    Classification {
        kind: ServerErrorKind::LockRefused,
        mariadb_code: 0,
        mysql_code: 3572,
        // MySQL 8: "Statement aborted because lock(s) could not be acquired immediately and
        // NOWAIT is set."
        fragments: &[(
            "statement aborted because lock(s) could not be acquired immediately",
            0,
        )],
    },
    Classification {
        kind: ServerErrorKind::LockWaitTimeout,
        mariadb_code: 1205,
        mysql_code: 1205,
        fragments: &[("lock wait timeout exceeded", 1205)],
    },
    Classification {
        kind: ServerErrorKind::Deadlock,
        mariadb_code: 1213,
        mysql_code: 1213,
        // The second and third: MariaDB Galera's wordings of a certification conflict
        // (MariaDB only).
        fragments: &[
            ("deadlock found when trying to get lock", 1213),
            ("wsrep detected deadlock/conflict", 1213),
            ("deadlock: wsrep aborted transaction", 1213),
        ],
    },
    Classification {
        kind: ServerErrorKind::RecordChanged,
        mariadb_code: 1020,
        mysql_code: 1020,
        fragments: &[("record has changed since last read", 1020)],
    },
    Classification {
        kind: ServerErrorKind::DuplicateKey,
        mariadb_code: 1062,
        mysql_code: 1062,
        fragments: &[
            // A key's duplicate whose value is not known (ER_DUP_UNKNOWN_IN_INDEX).
            ("duplicate entry for key", 1859),
            ("duplicate entry", 1062),
        ],
    },
    Classification {
        kind: ServerErrorKind::CheckViolation,
        mariadb_code: 4025,
        mysql_code: 3819,
        // MariaDB: "CONSTRAINT `c` failed for `db`.`t`"; MySQL: "Check constraint 'c' is violated."
        fragments: &[("constraint `", 4025), ("check constraint '", 0)],
    },
    Classification {
        kind: ServerErrorKind::ForeignKeyViolation,
        mariadb_code: 1452,
        mysql_code: 1452,
        fragments: &[
            ("cannot delete or update a parent row", 1451),
            ("cannot add or update a child row", 1452),
        ],
    },
    Classification {
        kind: ServerErrorKind::StatementTimeout,
        mariadb_code: 1969,
        mysql_code: 3024,
        fragments: &[
            (
                "query execution was interrupted (max_statement_time exceeded)",
                1969,
            ),
            (
                "query execution was interrupted, maximum statement execution time exceeded",
                0,
            ),
        ],
    },
    // After StatementTimeout, whose texts start the same way.
    Classification {
        kind: ServerErrorKind::Interrupted,
        mariadb_code: 1317,
        mysql_code: 1317,
        fragments: &[("query execution was interrupted", 1317)],
    },
    Classification {
        kind: ServerErrorKind::MetadataChanged,
        mariadb_code: 1412,
        mysql_code: 1412,
        fragments: &[
            ("table definition has changed", 1412),
            ("prepared statement needs to be re-prepared", 1615),
            (
                "wait on a lock was aborted due to a pending exclusive lock",
                1689,
            ),
        ],
    },
    Classification {
        kind: ServerErrorKind::ConnectionLost,
        mariadb_code: 2013,
        mysql_code: 2013,
        fragments: &[
            ("server has gone away", 2006),
            ("mysql server has gone away", 2006),
            ("lost connection to", 2013),
            ("connection was killed", 1927),
            ("server shutdown in progress", 1053),
            ("can't connect to local server", 2002),
            ("can't connect to", 2003),
            // MySQL 8 (4031).
            ("the client was disconnected by the server", 0),
            ("connection refused", 0),
            ("broken pipe", 0),
        ],
    },
    Classification {
        kind: ServerErrorKind::ReadOnly,
        mariadb_code: 1290,
        mysql_code: 1290,
        // "The MariaDB server is running with the --read-only option so it cannot execute this
        // statement" (older servers and MySQL: "The MySQL server ...").
        fragments: &[
            (
                "the mariadb server is running with the --read-only option",
                1290,
            ),
            (
                "the mysql server is running with the --read-only option",
                1290,
            ),
            (
                "the mysql server is running with the --super-read-only option",
                1290,
            ),
        ],
    },
    // MariaDB Galera only: MySQL 8 has no Galera (its 1047 is "Unknown command").
    Classification {
        kind: ServerErrorKind::NodeNotReady,
        mariadb_code: 1047,
        mysql_code: 0,
        fragments: &[("wsrep has not yet prepared node for application use", 1047)],
    },
];

/// Classifies a Diesel error by its kind and message text: the kind, and the MariaDB error
/// number of the text that matched (`None`: no number of its own, or no text to tell it by —
/// Diesel keeps the number of no error).
pub(crate) fn classify_with_code(error: &DieselError) -> (ServerErrorKind, Option<u16>) {
    match error {
        DieselError::DatabaseError(kind, info) => {
            let (by_text, code) = classify_message(info.message());
            let kind = match kind {
                DatabaseErrorKind::UniqueViolation => ServerErrorKind::DuplicateKey,
                DatabaseErrorKind::SerializationFailure => ServerErrorKind::Deadlock,
                DatabaseErrorKind::CheckViolation => ServerErrorKind::CheckViolation,
                DatabaseErrorKind::ForeignKeyViolation => ServerErrorKind::ForeignKeyViolation,
                DatabaseErrorKind::ClosedConnection => ServerErrorKind::ConnectionLost,
                _ => by_text,
            };
            // A number only from a text of the kind Diesel found (a caller's SIGNAL may say
            // anything).
            (kind, code.filter(|_| by_text == kind))
        }
        DieselError::RollbackErrorOnCommit { commit_error, .. } => classify_with_code(commit_error),
        // lockstock's or Diesel's verdict on the connection, not a server error.
        DieselError::BrokenTransactionManager => (ServerErrorKind::ConnectionLost, None),
        _ => (ServerErrorKind::Other, None),
    }
}

/// Classifies a Diesel error by its kind and message text.
pub(crate) fn classify(error: &DieselError) -> ServerErrorKind {
    classify_with_code(error).0
}

/// Classifies a server error message (English texts of MariaDB or MySQL 8): its kind, and the
/// MariaDB error number of the fragment that matched.
///
/// Only the message's BEGINNING counts: every text recognised here begins with the server's
/// (or the client library's) own words, and a caller's string — an end user's input bound into
/// a statement of the caller's, which the server echoes (`Incorrect integer value: '...' for
/// column`, `Duplicate entry '...'`) or a caller's trigger puts in its `SIGNAL`
/// (`CONCAT('Rejected name: ', NEW.name)`) — must not make a refused value read as a read-only
/// server, a node not ready or a lost connection (a [`Router`](crate::Router) would replace a
/// healthy writer, or run the call again) or a deadlock (retried as if it could pass). (A
/// `SIGNAL` whose whole text is a server error's still reads as that error: the number, which
/// would tell them apart, is not kept by Diesel.)
fn classify_message(message: &str) -> (ServerErrorKind, Option<u16>) {
    let message = message.to_ascii_lowercase();
    CLASSIFICATION
        .iter()
        .find_map(|rule| {
            rule.fragments
                .iter()
                .find(|(fragment, _)| message.starts_with(fragment))
                .map(|&(_, code)| (rule.kind, Some(code).filter(|c| *c != 0)))
        })
        .unwrap_or((ServerErrorKind::Other, None))
}
