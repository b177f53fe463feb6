-- Holds: points reserved at checkout, captured on payment, released on cancel or expiry.
--
-- A hold is placed by a journal entry of kind 'hold' and its row in balance_hold carries that
-- entry's id as its own. It ends exactly once, by ONE journal entry of kind 'capture', 'release'
-- or 'expire' whose `ended_hold_id` names it: the unique key on that column makes a second
-- ending entry impossible, whatever the code does.
--
-- `user_balance.held` is the sum of the ACTIVE holds (expired or not: a hold is only marked
-- expired by a later transaction), maintained under the account's row lock like the balance.
-- The available balance is `balance - (active holds whose expires_at is still ahead of the
-- server clock)`, computed inside the locked transaction; `held` lets an account without active
-- holds skip that read.

-- Each statement below commits on its own (DDL), and each is all or nothing. A run stopped
-- between them (by the deadline of `run_migrations_by`, whose bounds make a statement waiting
-- for a table a live transaction reads give up, or by a crash) left the ones before it applied
-- and the migration unrecorded: so each is sent only where its work is not there yet, and the
-- migration applies when run again. What tells is a constraint only that statement creates (a
-- name of lockstock's own): a column or table of the same name that the application has is
-- never taken for it — the statement is sent and fails ("Duplicate column", "already
-- exists"), as it did before. (Portable: a statement chosen by a read of information_schema,
-- prepared and run — MySQL 8 has no `ADD COLUMN IF NOT EXISTS`.)

SET @lockstock_step = IF(
    (SELECT COUNT(*) FROM information_schema.TABLE_CONSTRAINTS
      WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'user_balance'
        AND CONSTRAINT_NAME = 'user_balance_held_non_negative') = 0,
    'ALTER TABLE user_balance
         ADD COLUMN held DECIMAL(19,4) NOT NULL DEFAULT 0,
         ADD CONSTRAINT user_balance_held_non_negative CHECK (held >= 0)',
    'DO 0');
PREPARE lockstock_step FROM @lockstock_step;
EXECUTE lockstock_step;
DEALLOCATE PREPARE lockstock_step;

SET @lockstock_step = IF(
    (SELECT COUNT(*) FROM information_schema.TABLE_CONSTRAINTS
      WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'balance_hold'
        AND CONSTRAINT_NAME = 'balance_hold_entry') = 0,
    'CREATE TABLE balance_hold (
    -- The id of the journal entry that placed the hold.
    id                BIGINT        NOT NULL,
    user_id           BIGINT        NOT NULL,
    amount            DECIMAL(19,4) NOT NULL,
    -- What a capture posted; the rest of the hold was released with it.
    captured_amount   DECIMAL(19,4) NOT NULL DEFAULT 0,
    state             VARCHAR(16)   NOT NULL DEFAULT ''active'',
    -- UTC; compared with the server''s UTC_TIMESTAMP(6).
    expires_at        DATETIME(6)   NOT NULL,
    created_at        DATETIME(6)   NOT NULL,
    ended_at          DATETIME(6)   NULL,
    -- The journal entry that ended it (capture, release or expire).
    ended_by_entry_id BIGINT        NULL,
    PRIMARY KEY (id),
    -- The locked account''s active holds (the available balance) and the expiry sweep.
    KEY balance_hold_active (user_id, state, expires_at),
    KEY balance_hold_expiry (state, expires_at),
    UNIQUE KEY balance_hold_ended_by (ended_by_entry_id),
    -- Inserted and updated while the account row and the journal entries involved are locked
    -- by the same transaction, so the foreign keys'' shared locks cost nothing.
    CONSTRAINT balance_hold_entry FOREIGN KEY (id) REFERENCES balance_history (id),
    CONSTRAINT balance_hold_user FOREIGN KEY (user_id) REFERENCES user_balance (user_id),
    CONSTRAINT balance_hold_ended_by_entry FOREIGN KEY (ended_by_entry_id) REFERENCES balance_history (id),
    CONSTRAINT balance_hold_amount_positive CHECK (amount > 0),
    CONSTRAINT balance_hold_captured_bounded CHECK (captured_amount >= 0 AND captured_amount <= amount),
    CONSTRAINT balance_hold_state CHECK (state IN (''active'', ''captured'', ''released'', ''expired'')),
    CONSTRAINT balance_hold_ended_consistent CHECK ((state = ''active'') = (ended_at IS NULL AND ended_by_entry_id IS NULL)),
    CONSTRAINT balance_hold_captured_only_when_captured CHECK (state = ''captured'' OR captured_amount = 0)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin',
    'DO 0');
PREPARE lockstock_step FROM @lockstock_step;
EXECUTE lockstock_step;
DEALLOCATE PREPARE lockstock_step;

SET @lockstock_step = IF(
    (SELECT COUNT(*) FROM information_schema.TABLE_CONSTRAINTS
      WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'balance_history'
        AND CONSTRAINT_NAME = 'balance_history_ended_hold') = 0,
    'ALTER TABLE balance_history
         ADD COLUMN ended_hold_id BIGINT NULL,
         ADD UNIQUE KEY balance_history_ends_hold_once (ended_hold_id),
         ADD CONSTRAINT balance_history_ended_hold FOREIGN KEY (ended_hold_id) REFERENCES balance_hold (id),
         DROP CONSTRAINT balance_history_kind,
         ADD CONSTRAINT balance_history_kind CHECK (kind IN (''charge'', ''deduct'', ''refund'', ''transfer_out'', ''transfer_in'', ''hold'', ''capture'', ''release'', ''expire'')),
         ADD CONSTRAINT balance_history_ends_a_hold CHECK ((ended_hold_id IS NOT NULL) = (kind IN (''capture'', ''release'', ''expire'')))',
    'DO 0');
PREPARE lockstock_step FROM @lockstock_step;
EXECUTE lockstock_step;
DEALLOCATE PREPARE lockstock_step;
SET @lockstock_step = NULL;
