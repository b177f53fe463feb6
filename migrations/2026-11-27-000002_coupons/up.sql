-- First-come-first-served coupons.

-- A coupon template: what the coupon is worth and when it can be used.
CREATE TABLE coupon (
    id             BIGINT        NOT NULL AUTO_INCREMENT,
    name           VARCHAR(255)  NOT NULL,
    discount_kind  VARCHAR(16)   NOT NULL,
    discount_value DECIMAL(19,4) NOT NULL,
    -- Cap on a percent discount; NULL for fixed discounts.
    max_discount   DECIMAL(19,4) NULL,
    valid_from     DATETIME(6)   NOT NULL,
    valid_until    DATETIME(6)   NOT NULL,
    created_at     DATETIME(6)   NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    PRIMARY KEY (id),
    CONSTRAINT coupon_discount_kind CHECK (discount_kind IN ('fixed', 'percent')),
    CONSTRAINT coupon_discount_positive CHECK (discount_value > 0),
    CONSTRAINT coupon_percent_at_most_100 CHECK (discount_kind <> 'percent' OR discount_value <= 100),
    CONSTRAINT coupon_cap_positive CHECK (max_discount IS NULL OR max_discount > 0),
    CONSTRAINT coupon_validity_window CHECK (valid_from < valid_until)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- A first-come-first-served campaign: a limited stock of one template. `stock_quantity` is the hot row.
CREATE TABLE fcfs_coupon (
    id              BIGINT      NOT NULL AUTO_INCREMENT,
    coupon_id       BIGINT      NOT NULL,
    total_quantity  INT         NOT NULL,
    stock_quantity  INT         NOT NULL,
    issue_starts_at DATETIME(6) NOT NULL,
    issue_ends_at   DATETIME(6) NOT NULL,
    created_at      DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    updated_at      DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6),
    PRIMARY KEY (id),
    KEY fcfs_coupon_coupon (coupon_id),
    CONSTRAINT fcfs_coupon_coupon FOREIGN KEY (coupon_id) REFERENCES coupon (id),
    CONSTRAINT fcfs_coupon_total_positive CHECK (total_quantity > 0),
    CONSTRAINT fcfs_coupon_stock_non_negative CHECK (stock_quantity >= 0),
    CONSTRAINT fcfs_coupon_stock_at_most_total CHECK (stock_quantity <= total_quantity),
    CONSTRAINT fcfs_coupon_issue_window CHECK (issue_starts_at < issue_ends_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- An issued coupon. UNIQUE(user_id, coupon_id) is the second line of defence against duplicates.
-- Deliberately no foreign key to fcfs_coupon: InnoDB would take a shared lock on the hot stock row
-- for every insert, and two shared holders upgrading to FOR UPDATE deadlock.
CREATE TABLE user_coupon (
    id             BIGINT      NOT NULL AUTO_INCREMENT,
    user_id        BIGINT      NOT NULL,
    coupon_id      BIGINT      NOT NULL,
    fcfs_coupon_id BIGINT      NOT NULL,
    status         VARCHAR(16) NOT NULL DEFAULT 'issued',
    issued_at      DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    used_at        DATETIME(6) NULL,
    order_ref      VARCHAR(64) NULL,
    PRIMARY KEY (id),
    UNIQUE KEY user_coupon_once_per_user (user_id, coupon_id),
    KEY user_coupon_campaign (fcfs_coupon_id),
    KEY user_coupon_coupon (coupon_id),
    CONSTRAINT user_coupon_coupon FOREIGN KEY (coupon_id) REFERENCES coupon (id),
    CONSTRAINT user_coupon_status CHECK (status IN ('issued', 'used')),
    CONSTRAINT user_coupon_used_consistent CHECK ((status = 'used') = (used_at IS NOT NULL AND order_ref IS NOT NULL))
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
