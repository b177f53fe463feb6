-- Restocks of first-come-first-served campaigns, one row per (campaign, idempotency key): a
-- restock retried after an unknown outcome finds its key and answers with the recorded result
-- instead of adding the coupons again. The key column compares with PAD SPACE, so keys ending
-- with a space are refused before they reach it (as balance_history's are).
CREATE TABLE fcfs_coupon_restock (
    id              BIGINT      NOT NULL AUTO_INCREMENT,
    fcfs_coupon_id  BIGINT      NOT NULL,
    idempotency_key VARCHAR(64) NOT NULL,
    additional      INT         NOT NULL,
    -- The campaign's total and stock right after this restock: the answer a retry gets.
    total_after     INT         NOT NULL,
    stock_after     INT         NOT NULL,
    created_at      DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    PRIMARY KEY (id),
    UNIQUE KEY fcfs_coupon_restock_idempotency (fcfs_coupon_id, idempotency_key),
    -- Inserted while the campaign row is locked FOR UPDATE by the same transaction, so the
    -- foreign key's shared lock on it costs nothing.
    CONSTRAINT fcfs_coupon_restock_campaign FOREIGN KEY (fcfs_coupon_id) REFERENCES fcfs_coupon (id),
    CONSTRAINT fcfs_coupon_restock_additional_positive CHECK (additional > 0),
    CONSTRAINT fcfs_coupon_restock_after CHECK (stock_after >= 0 AND stock_after <= total_after)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
