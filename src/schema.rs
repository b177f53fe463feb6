//! Diesel table definitions, kept identical to `migrations/`.
//!
//! A test (`foundation::schema_rs_matches_migrations` in `tests/it`) compares these against the
//! columns the server reports after running the migrations — their names and order, and every
//! character column's length — so a drift between the two fails the build's tests.
#![allow(missing_docs)]

diesel::table! {
    /// One row per account: the balance, a change counter and the sum of its active holds.
    user_balance (user_id) {
        user_id -> BigInt,
        balance -> Numeric,
        version -> BigInt,
        updated_at -> Datetime,
        held -> Numeric,
    }
}

diesel::table! {
    /// The journal: one immutable row per balance change.
    balance_history (id) {
        id -> BigInt,
        user_id -> BigInt,
        #[max_length = 16]
        kind -> Varchar,
        amount -> Numeric,
        balance_after -> Numeric,
        #[max_length = 64]
        idempotency_key -> Nullable<Varchar>,
        #[max_length = 16]
        request_hash -> Char,
        related_entry_id -> Nullable<BigInt>,
        counterparty_user_id -> Nullable<BigInt>,
        refunded_amount -> Numeric,
        created_at -> Datetime,
        ended_hold_id -> Nullable<BigInt>,
    }
}

diesel::table! {
    /// Holds: points reserved on an account until captured, released or expired.
    balance_hold (id) {
        id -> BigInt,
        user_id -> BigInt,
        amount -> Numeric,
        captured_amount -> Numeric,
        #[max_length = 16]
        state -> Varchar,
        expires_at -> Datetime,
        created_at -> Datetime,
        ended_at -> Nullable<Datetime>,
        ended_by_entry_id -> Nullable<BigInt>,
    }
}

diesel::table! {
    /// Coupon templates.
    coupon (id) {
        id -> BigInt,
        #[max_length = 255]
        name -> Varchar,
        #[max_length = 16]
        discount_kind -> Varchar,
        discount_value -> Numeric,
        max_discount -> Nullable<Numeric>,
        valid_from -> Datetime,
        valid_until -> Datetime,
        created_at -> Datetime,
    }
}

diesel::table! {
    /// First-come-first-served campaigns; `stock_quantity` is the hot row.
    fcfs_coupon (id) {
        id -> BigInt,
        coupon_id -> BigInt,
        total_quantity -> Integer,
        stock_quantity -> Integer,
        issue_starts_at -> Datetime,
        issue_ends_at -> Datetime,
        created_at -> Datetime,
        updated_at -> Datetime,
    }
}

diesel::table! {
    /// Restocks of campaigns, at most one per (campaign, idempotency key).
    fcfs_coupon_restock (id) {
        id -> BigInt,
        fcfs_coupon_id -> BigInt,
        #[max_length = 64]
        idempotency_key -> Varchar,
        additional -> Integer,
        total_after -> Integer,
        stock_after -> Integer,
        created_at -> Datetime,
    }
}

diesel::table! {
    /// Issued coupons, at most one per (user, coupon template).
    user_coupon (id) {
        id -> BigInt,
        user_id -> BigInt,
        coupon_id -> BigInt,
        fcfs_coupon_id -> BigInt,
        #[max_length = 16]
        status -> Varchar,
        issued_at -> Datetime,
        used_at -> Nullable<Datetime>,
        #[max_length = 64]
        order_ref -> Nullable<Varchar>,
    }
}

diesel::table! {
    /// The one row naming a Galera cluster's designated writer node (see `lockstock::route`).
    designated_writer (id) {
        id -> TinyInt,
        #[max_length = 255]
        node_name -> Varchar,
        epoch -> BigInt,
        changed_at -> Datetime,
    }
}

diesel::joinable!(balance_history -> user_balance (user_id));
diesel::joinable!(balance_hold -> user_balance (user_id));
diesel::joinable!(fcfs_coupon -> coupon (coupon_id));
diesel::joinable!(fcfs_coupon_restock -> fcfs_coupon (fcfs_coupon_id));
diesel::joinable!(user_coupon -> coupon (coupon_id));

diesel::allow_tables_to_appear_in_same_query!(
    user_balance,
    balance_history,
    balance_hold,
    coupon,
    fcfs_coupon,
    fcfs_coupon_restock,
    user_coupon,
    designated_writer,
);
