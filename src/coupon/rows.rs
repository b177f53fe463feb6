//! The issuer's statements, one function each, shared by the single and the batch path: a
//! single issue is the batch of one. Issues write their coupons before the stock row is locked
//! ([`write_user_coupons`]; the unique index decides "already issued?"), then lock it with
//! [`lock_campaign_after_insert`], which reads the new rows' first id in the same statement;
//! between the lock and COMMIT only [`set_stock`] runs. A batch whose stock runs out inside it
//! locks first and then writes its winners ([`insert_user_coupons`], with their ids read back).
//! An INSERT of coupons waits for another transaction's lock (a coupon of the same user not
//! committed yet, a gap read under SERIALIZABLE) only where it is the transaction's first lock
//! and writes one row — a single issue: it holds nothing while it waits. Every other one (a
//! batch's: it holds the rows it read or wrote before, or the stock row) is refused at once
//! instead ([`write_under_lock`]), so an issue never closes a deadlock in which the server
//! could roll back another program's transaction — unless its issuer chose to wait for the
//! stock row in the server ([`StockRowWait::InServer`](crate::StockRowWait)): a combined batch
//! then waits for it while it holds its coupons. No transaction that holds the stock row waits
//! for anything here, so that wait closes no deadlock among lockstock's transactions, only with
//! another program's that locks the stock row and then a coupon row the batch holds. Each is a
//! cached prepared statement (the INSERTs up to
//! [`MAX_CACHED_ROWS`](crate::statements::MAX_CACHED_ROWS) rows: one per row count).

use chrono::NaiveDateTime;
use diesel::dsl;
use diesel::mysql::MysqlConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Datetime, Text};
use std::collections::HashMap;

use super::types::{Campaign, CouponStatus, IssuedCoupon, UserCouponRow};
use crate::error::{Error, Result};
use crate::schema::{coupon, fcfs_coupon, user_coupon};
use crate::statements::{
    in_pieces, insert_row, read_in_lists, read_under_lock, rows_per_insert, write_under_lock,
    InsertRows, SetStock, WaitFree,
};
use crate::txn::{bounded_waits, locking_read, note_clean_failure, Deadline, Holding, InsertIds};
use crate::util::{inserted_ids, last_insert_id, locked_row, IdStep};

/// `SELECT id, coupon_id, total_quantity, stock_quantity, issue_starts_at, issue_ends_at FROM
/// fcfs_coupon WHERE id = ?`: the campaign row through its primary key.
type CampaignRow =
    dsl::Select<dsl::Find<fcfs_coupon::table, i64>, dsl::AsSelect<Campaign, diesel::mysql::Mysql>>;

fn campaign_row(campaign_id: i64) -> CampaignRow {
    fcfs_coupon::table
        .find(campaign_id)
        .select(Campaign::as_select())
}

/// The campaign row `FOR UPDATE NOWAIT`: the hot row, through the primary key — its stock, and
/// in the same read (no extra round trip) the facts the cached ones are checked against.
/// Restocks, and batches whose stock runs out inside them (they lock before writing), lock it
/// with this statement; issues that wrote their coupons first with
/// [`lock_campaign_after_insert`]. In a combiner's batch a refusal is sent again while it
/// can be the key's previous batch committing, and polled for a few milliseconds otherwise
/// ([`locking_read`] with `holding` = [`Holding::Locks`]: an issue that locks it holds its
/// coupons or the holders' gaps already, so it never waits — a restock, which holds nothing
/// yet, is polled the same way) or waited for in the server as the issuer chose
/// ([`Holding::LocksBeforeALeaf`]: between the stock row's lock and COMMIT only wait-free
/// statements run, so no lockstock transaction waits while it holds the row).
pub(crate) fn lock_campaign(
    conn: &mut MysqlConnection,
    id: i64,
    holding: Holding,
) -> Result<Option<Campaign>> {
    Ok(locking_read(conn, holding, |conn, lock| {
        lock.read(campaign_row(id).for_update())
            .get_result(conn)
            .optional()
    })?)
}

/// [`lock_campaign`] with, in the same read, the id of the first row the last INSERT on this
/// connection created (`LAST_INSERT_ID()`) and the session's step between ids: an issue that
/// inserted its rows before the lock ([`write_user_coupons`]) learns their ids without a round
/// trip of its own. Polled or waited for as [`lock_campaign`], by `holding`.
pub(crate) fn lock_campaign_after_insert(
    conn: &mut MysqlConnection,
    id: i64,
    holding: Holding,
) -> Result<Option<(Campaign, (i64, i64))>> {
    let locked: Option<(Campaign, u64, i64)> = locking_read(conn, holding, |conn, lock| {
        let read = fcfs_coupon::table
            .find(id)
            .select((Campaign::as_select(), last_insert_id(), IdStep))
            .for_update();
        lock.read(read).get_result(conn).optional()
    })?;
    // Where the INSERT wrote no row (every user a holder), `LAST_INSERT_ID()` is the session's
    // earlier value, which no id is read from: a value no BIGINT id can have (a caller's own
    // `LAST_INSERT_ID(expr)`) is no error then.
    Ok(locked.map(|(campaign, first, step)| (campaign, (i64::try_from(first).unwrap_or(0), step))))
}

/// The campaign row, no lock (in a snapshot).
pub(crate) fn find_campaign(conn: &mut MysqlConnection, id: i64) -> Result<Option<Campaign>> {
    Ok(campaign_row(id).first(conn).optional()?)
}

/// `UPDATE fcfs_coupon SET stock_quantity = ?`.
pub(crate) fn set_stock(conn: &mut MysqlConnection, campaign_id: i64, stock: i32) -> Result<()> {
    SetStock { campaign_id, stock }.execute(conn)?;
    Ok(())
}

/// Issues a coupon of the campaign to each of `users` with ONE `INSERT` (UNIQUE(user_id,
/// coupon_id) refuses a holder) — one per [`MAX_INSERT_ROWS`](crate::statements::MAX_INSERT_ROWS)
/// users of a larger batch, each with its ids — and returns the new ids, in the order of
/// `users`. A cached prepared statement ([`InsertRows`]) for up to `MAX_CACHED_ROWS` users;
/// `order` says how several rows are numbered (see [`inserted_ids`]; `None` for one row); where
/// they are not consecutive the ids are read back through the unique index.
pub(crate) fn insert_user_coupons(
    conn: &mut MysqlConnection,
    order: Option<InsertIds>,
    (campaign_id, coupon_id): (i64, i64),
    users: &[i64],
    issued_at: NaiveDateTime,
    holding: Holding,
    deadline: Deadline,
) -> Result<Vec<i64>> {
    let mut ids = Vec::with_capacity(users.len());
    let chunks = users.chunks(rows_per_insert::<NewUserCoupon>());
    for (at, some) in in_pieces(chunks, Some(deadline)).enumerate() {
        let some = some?;
        // After the first chunk the transaction holds that chunk's rows: no later chunk may
        // wait for a lock (a one-row chunk of `Holding::Nothing` would).
        let holding = if at == 0 { holding } else { Holding::Locks };
        write_user_coupons(conn, (campaign_id, coupon_id), some, issued_at, holding)?;
        ids.extend(user_coupon_ids(
            conn, order, coupon_id, some, None, deadline,
        )?);
    }
    Ok(ids)
}

/// Whether [`write_user_coupons`] writes the coupons of `users` users with one INSERT (at most
/// [`MAX_INSERT_ROWS`](crate::statements::MAX_INSERT_ROWS)); a larger batch writes them with
/// [`insert_user_coupons`], an INSERT and its ids per chunk.
pub(crate) fn fits_one_insert(users: usize) -> bool {
    users <= rows_per_insert::<NewUserCoupon>()
}

/// Writes a coupon of the campaign for each of `users` with ONE `INSERT` (UNIQUE(user_id,
/// coupon_id) refuses a holder) and reads nothing back: the ids of the new rows follow from the
/// first one, which [`lock_campaign_after_insert`] reads (see [`user_coupon_ids`]). At most
/// [`fits_one_insert`] users.
pub(crate) fn write_user_coupons(
    conn: &mut MysqlConnection,
    (campaign_id, coupon_id): (i64, i64),
    users: &[i64],
    issued_at: NaiveDateTime,
    holding: Holding,
) -> Result<()> {
    let rows = new_rows((campaign_id, coupon_id), users, issued_at);
    if rows.is_empty() {
        return Ok(());
    }
    // One row as the transaction's first lock may wait: it holds nothing meanwhile. Anything
    // else never waits (a multi-row INSERT holds its earlier rows when a later one would).
    if holding == Holding::Nothing && rows.len() == 1 {
        // A write has no result to be left waiting for (no cache reset after a refusal).
        InsertRows(&rows)
            .execute(conn)
            .inspect_err(|_| note_clean_failure())?;
    } else {
        write_under_lock(conn, InsertRows(&rows))?;
    }
    Ok(())
}

/// The ids of the coupons [`write_user_coupons`] just wrote for `users` (in their order), the
/// first of them and the step being `first` where they were read already (else
/// `LAST_INSERT_ID()` is asked):
/// consecutive where the server numbers one INSERT's rows so, else read back through the unique
/// index (see [`inserted_ids`]).
pub(crate) fn user_coupon_ids(
    conn: &mut MysqlConnection,
    order: Option<InsertIds>,
    coupon_id: i64,
    users: &[i64],
    first: Option<(i64, i64)>,
    deadline: Deadline,
) -> Result<Vec<i64>> {
    inserted_ids(conn, order, users.len(), first, |conn| {
        let held = holders(conn, coupon_id, users, Some(deadline))?;
        Ok(users.iter().filter_map(|u| held.get(u).copied()).collect())
    })
}

fn new_rows(
    (campaign_id, coupon_id): (i64, i64),
    users: &[i64],
    issued_at: NaiveDateTime,
) -> Vec<NewUserCoupon> {
    users
        .iter()
        .map(|&user_id| NewUserCoupon {
            user_id,
            coupon_id,
            campaign_id,
            status: CouponStatus::Issued.as_str(),
            issued_at,
        })
        .collect()
}

/// A `user_coupon` row to write.
struct NewUserCoupon {
    user_id: i64,
    coupon_id: i64,
    campaign_id: i64,
    status: &'static str,
    issued_at: NaiveDateTime,
}

insert_row! {
    NewUserCoupon => "user_coupon" {
        user_id: BigInt => "user_id",
        coupon_id: BigInt => "coupon_id",
        campaign_id: BigInt => "fcfs_coupon_id",
        status: Text => "status",
        issued_at: Datetime => "issued_at",
    }
}

/// Which of `users` hold a coupon of the template, and its id — one user or a batch's, one
/// statement (one per [`MAX_LIST_VALUES`](crate::statements::MAX_LIST_VALUES) users; no lock on
/// the hot row). Wait-free on MariaDB ([`WaitFree`]): under SERIALIZABLE the read locks one
/// user's index range after another, so waiting for a later user's row (another transaction's
/// uncommitted coupon) would hold the earlier users' gaps — a deadlock if that transaction then
/// inserts one of them, broken by rolling someone back. Refused at once instead — and, in a
/// combined batch, sent again a few times within its wait budget ([`locking_read`] as for a
/// transaction that holds rows: only the statement was refused) before the refusal goes to
/// the runner. The statement (an `IN` list) is never cached, so a refusal leaves no stale one.
pub(crate) fn holders(
    conn: &mut MysqlConnection,
    coupon_id: i64,
    users: &[i64],
    deadline: Option<Deadline>,
) -> Result<HashMap<i64, i64>> {
    let held = read_in_lists(users, deadline, |some| {
        locking_read(conn, Holding::Locks, |conn, _| {
            let read = user_coupon::table
                .filter(user_coupon::coupon_id.eq(coupon_id))
                .filter(user_coupon::user_id.eq_any(some))
                .select((user_coupon::user_id, user_coupon::id));
            if bounded_waits() {
                WaitFree(read).load::<(i64, i64)>(conn)
            } else {
                read.load::<(i64, i64)>(conn)
            }
        })
    })?;
    Ok(held.into_iter().collect())
}

/// The issued coupon `user_coupon_id`, `FOR UPDATE NOWAIT` (a redeem's or restore's only lock):
/// [`Error::UserCouponNotFound`] if there is none.
pub(crate) fn lock_user_coupon(conn: &mut MysqlConnection, id: i64) -> Result<IssuedCoupon> {
    let missing = Error::UserCouponNotFound { user_coupon_id: id };
    let held = user_coupon::table
        .find(id)
        .select(UserCouponRow::as_select());
    locked_row::<_, UserCouponRow>(conn, held.for_update().no_wait(), missing)?.into_coupon()
}

/// Marks `held` used at `used` = (time, order), or back to issued (`None`): one `UPDATE`, and
/// `held` as it is afterwards.
pub(crate) fn set_redemption(
    conn: &mut MysqlConnection,
    held: &mut IssuedCoupon,
    used: Option<(NaiveDateTime, &str)>,
) -> Result<()> {
    let status = match used {
        Some(_) => CouponStatus::Used,
        None => CouponStatus::Issued,
    };
    let (used_at, order_ref) = (used.map(|u| u.0), used.map(|u| u.1));
    diesel::update(user_coupon::table.find(held.id))
        .set((
            user_coupon::status.eq(status.as_str()),
            user_coupon::used_at.eq(used_at),
            user_coupon::order_ref.eq(order_ref),
        ))
        .execute(conn)?;
    held.status = status;
    held.used_at = used_at;
    held.order_ref = order_ref.map(str::to_owned);
    Ok(())
}

/// [`Error::CouponNotValid`] unless `at` is inside the coupon template's validity window.
/// Read with the coupon's row locked, and under SERIALIZABLE a read takes a shared lock:
/// wait-free ([`read_under_lock`]), so a transaction that holds the template refuses it at once
/// (the runner rolls back and retries) instead of a wait that could close a deadlock with it.
pub(crate) fn check_validity(
    conn: &mut MysqlConnection,
    held: &IssuedCoupon,
    at: NaiveDateTime,
) -> Result<()> {
    let (valid_from, valid_until): (NaiveDateTime, NaiveDateTime) = read_under_lock(
        conn,
        coupon::table
            .find(held.coupon_id)
            .select((coupon::valid_from, coupon::valid_until)),
    )?;
    if at < valid_from || at >= valid_until {
        return Err(Error::CouponNotValid {
            user_coupon_id: held.id,
            valid_from,
            valid_until,
        });
    }
    Ok(())
}
