-- Balances and their journal.
-- Every row that lockstock ever locks is reached through a unique index (the primary key),
-- so InnoDB takes a record lock and never a range or table lock.

CREATE TABLE user_balance (
    user_id     BIGINT        NOT NULL,
    balance     DECIMAL(19,4) NOT NULL DEFAULT 0,
    -- Bumped by every change; lets callers detect that a balance moved between two reads.
    version     BIGINT        NOT NULL DEFAULT 0,
    updated_at  DATETIME(6)   NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6),
    PRIMARY KEY (user_id),
    CONSTRAINT user_balance_non_negative CHECK (balance >= 0)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- The journal. Rows are immutable except `refunded_amount`, a running total kept on a deduct
-- entry so that concurrent refunds are bounded under the owner's row lock without a range read
-- (a SUM over a secondary index would take gap locks that block other users' refunds).
-- `lockstock` audits it against the refund rows.
CREATE TABLE balance_history (
    id                   BIGINT        NOT NULL AUTO_INCREMENT,
    user_id              BIGINT        NOT NULL,
    kind                 VARCHAR(16)   NOT NULL,
    amount               DECIMAL(19,4) NOT NULL,
    balance_after        DECIMAL(19,4) NOT NULL,
    -- NULL only on the receiving side of a transfer: the key belongs to the sender.
    idempotency_key      VARCHAR(64)   NULL,
    request_hash         CHAR(16) CHARACTER SET ascii NOT NULL,
    related_entry_id     BIGINT        NULL,
    counterparty_user_id BIGINT        NULL,
    refunded_amount      DECIMAL(19,4) NOT NULL DEFAULT 0,
    created_at           DATETIME(6)   NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    PRIMARY KEY (id),
    UNIQUE KEY balance_history_idempotency (user_id, idempotency_key),
    KEY balance_history_user_newest (user_id, id),
    KEY balance_history_related (related_entry_id),
    CONSTRAINT balance_history_user FOREIGN KEY (user_id) REFERENCES user_balance (user_id),
    CONSTRAINT balance_history_related_entry FOREIGN KEY (related_entry_id) REFERENCES balance_history (id),
    CONSTRAINT balance_history_kind CHECK (kind IN ('charge', 'deduct', 'refund', 'transfer_out', 'transfer_in')),
    CONSTRAINT balance_history_amount_positive CHECK (amount > 0),
    CONSTRAINT balance_history_balance_after_non_negative CHECK (balance_after >= 0),
    CONSTRAINT balance_history_refund_bounded CHECK (refunded_amount >= 0 AND refunded_amount <= amount)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
