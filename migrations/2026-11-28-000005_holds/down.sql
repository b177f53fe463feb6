-- Refused (by the restored kind check) while the journal holds hold entries: dropping them
-- would leave the balances' change counters and the journal disagreeing.
ALTER TABLE balance_history
    DROP CONSTRAINT balance_history_ends_a_hold,
    DROP CONSTRAINT balance_history_kind,
    ADD CONSTRAINT balance_history_kind CHECK (kind IN ('charge', 'deduct', 'refund', 'transfer_out', 'transfer_in')),
    DROP FOREIGN KEY balance_history_ended_hold;
ALTER TABLE balance_history
    DROP INDEX balance_history_ends_hold_once,
    DROP COLUMN ended_hold_id;
DROP TABLE balance_hold;
ALTER TABLE user_balance
    DROP CONSTRAINT user_balance_held_non_negative,
    DROP COLUMN held;
