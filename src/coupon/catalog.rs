//! Templates and campaigns: create them, read them, and the coupons a user holds.

use diesel::mysql::MysqlConnection;
use diesel::prelude::*;

use super::rows::find_campaign;
use super::types::{
    positive_quantity, Campaign, Coupon, CouponRow, IssuedCoupon, NewCampaign, NewCoupon,
    UserCouponRow,
};
use super::CouponIssuer;
use crate::error::{Error, Result};
use crate::schema::{coupon, fcfs_coupon, user_coupon};
use crate::txn::Deadline;
use crate::util::inserted_id;
use crate::validate::{validate_datetime, validate_id};

/// A new `coupon` row.
#[derive(Insertable)]
#[diesel(table_name = coupon)]
struct CouponInsert<'a> {
    name: &'a str,
    discount_kind: &'static str,
    discount_value: rust_decimal::Decimal,
    max_discount: Option<rust_decimal::Decimal>,
    valid_from: chrono::NaiveDateTime,
    valid_until: chrono::NaiveDateTime,
}

/// A new `fcfs_coupon` row: a campaign with its whole quantity in stock.
#[derive(Insertable)]
#[diesel(table_name = fcfs_coupon)]
struct CampaignInsert {
    coupon_id: i64,
    total_quantity: i32,
    stock_quantity: i32,
    issue_starts_at: chrono::NaiveDateTime,
    issue_ends_at: chrono::NaiveDateTime,
}

impl CouponIssuer {
    /// Creates a coupon template.
    ///
    /// Not idempotent: a template has no key, so a call repeated after
    /// [`Error::OutcomeUnknown`] creates a second one if the first committed. Look for it first
    /// (the `coupon` table, by name), as for any insert without a natural key.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] (name, window), [`Error::InvalidAmount`] or
    /// [`Error::InvalidInput`] for the discount; the runner's failures ([`Error::Contended`],
    /// [`Error::Timeout`], [`Error::OutcomeUnknown`], [`Error::Server`], ...).
    pub fn create_coupon(&self, conn: &mut MysqlConnection, new: &NewCoupon<'_>) -> Result<Coupon> {
        let name_chars = new.name.chars().count();
        if new.name.trim().is_empty() || name_chars > 255 {
            return Err(Error::InvalidInput {
                field: "name",
                problem: "must be 1 to 255 characters and not blank",
            });
        }
        new.discount.validate()?;
        // Compared as stored (microseconds).
        let valid_from = validate_datetime("valid_from", new.valid_from)?;
        let valid_until = validate_datetime("valid_until", new.valid_until)?;
        if valid_from >= valid_until {
            return Err(Error::InvalidInput {
                field: "valid_until",
                problem: "must be after valid_from",
            });
        }
        let (discount_kind, discount_value, max_discount) = new.discount.columns();
        let row = CouponInsert {
            name: new.name,
            discount_kind,
            discount_value,
            max_discount,
            valid_from,
            valid_until,
        };
        let id = self.insert_returning_id(conn, self.runner.deadline(), |conn| {
            diesel::insert_into(coupon::table)
                .values(&row)
                .execute(conn)
        })?;
        Ok(Coupon {
            id,
            name: new.name.to_owned(),
            discount: new.discount.stored(),
            valid_from,
            valid_until,
        })
    }

    /// The coupon template `coupon_id`.
    ///
    /// # Errors
    /// [`Error::InvalidId`], [`Error::CouponNotFound`]; the reader's failures
    /// ([`Error::Timeout`], [`Error::Server`], ...).
    pub fn coupon(&self, conn: &mut MysqlConnection, coupon_id: i64) -> Result<Coupon> {
        validate_id("coupon", coupon_id)?;
        self.coupon_by(conn, coupon_id, self.runner.deadline())
    }

    fn coupon_by(
        &self,
        conn: &mut MysqlConnection,
        coupon_id: i64,
        deadline: Deadline,
    ) -> Result<Coupon> {
        self.runner
            .read_by(conn, deadline, |conn| {
                Ok(coupon::table
                    .find(coupon_id)
                    .select(CouponRow::as_select())
                    .first(conn)
                    .optional()?)
            })?
            .map(CouponRow::into_coupon)
            .ok_or(Error::CouponNotFound { coupon_id })
    }

    /// Creates a campaign of `quantity` coupons of a template.
    ///
    /// Not idempotent: a campaign has no key, so a call repeated after
    /// [`Error::OutcomeUnknown`] creates a second campaign — with its own full stock of the same
    /// template — if the first committed. Look for it first (the `fcfs_coupon` table, by
    /// template and window) before creating it again.
    ///
    /// A user gets one coupon per template, not per campaign: a second campaign of the same
    /// template answers the users who hold its coupon [`Error::AlreadyIssued`].
    ///
    /// # Errors
    /// [`Error::InvalidId`], [`Error::InvalidInput`] (quantity, window, a window that starts
    /// after the coupon's validity), [`Error::CouponNotFound`]; the runner's failures, as for
    /// [`create_coupon`](Self::create_coupon).
    pub fn create_campaign(
        &self,
        conn: &mut MysqlConnection,
        new: &NewCampaign,
    ) -> Result<Campaign> {
        validate_id("coupon", new.coupon_id)?;
        let quantity = positive_quantity("quantity", new.quantity)?;
        // Compared as stored (microseconds).
        let starts = validate_datetime("issue_starts_at", new.issue_starts_at)?;
        let ends = validate_datetime("issue_ends_at", new.issue_ends_at)?;
        if starts >= ends {
            return Err(Error::InvalidInput {
                field: "issue_ends_at",
                problem: "must be after issue_starts_at",
            });
        }
        let deadline = self.runner.deadline();
        let template = self.coupon_by(conn, new.coupon_id, deadline)?;
        if starts >= template.valid_until {
            return Err(Error::InvalidInput {
                field: "issue_starts_at",
                problem: "must be before the coupon's valid_until",
            });
        }
        let row = CampaignInsert {
            coupon_id: new.coupon_id,
            total_quantity: quantity,
            stock_quantity: quantity,
            issue_starts_at: starts,
            issue_ends_at: ends,
        };
        let id = self.insert_returning_id(conn, deadline, |conn| {
            diesel::insert_into(fcfs_coupon::table)
                .values(&row)
                .execute(conn)
        })?;
        Ok(Campaign {
            id,
            coupon_id: new.coupon_id,
            total_quantity: quantity,
            stock_quantity: quantity,
            issue_starts_at: starts,
            issue_ends_at: ends,
        })
    }

    /// The campaign `campaign_id` with its current stock. Seeing the stock at zero sets this
    /// issuer's sold-out mark of the campaign, seeing it above zero clears the mark.
    ///
    /// # Errors
    /// [`Error::InvalidId`], [`Error::CampaignNotFound`]; the reader's failures
    /// ([`Error::Timeout`], [`Error::Server`], ...).
    pub fn campaign(&self, conn: &mut MysqlConnection, campaign_id: i64) -> Result<Campaign> {
        validate_id("campaign", campaign_id)?;
        let deadline = self.runner.deadline();
        let seen = self.sightings(campaign_id);
        let campaign = self.read_campaign(conn, campaign_id, deadline)?;
        self.cache_facts(&campaign);
        if campaign.stock_quantity > 0 {
            self.saw_stock(campaign_id);
        } else {
            self.mark_sold_out(campaign_id, seen);
        }
        Ok(campaign)
    }

    /// Coupons left in a campaign (read as [`campaign`](Self::campaign) reads it).
    ///
    /// # Errors
    /// As [`campaign`](Self::campaign).
    pub fn remaining(&self, conn: &mut MysqlConnection, campaign_id: i64) -> Result<u32> {
        let campaign = self.campaign(conn, campaign_id)?;
        Ok(u32::try_from(campaign.stock_quantity).unwrap_or(0))
    }

    /// The coupons `user_id` holds, oldest first.
    ///
    /// # Errors
    /// [`Error::InvalidId`]; the reader's failures ([`Error::Timeout`], [`Error::Server`], ...).
    pub fn user_coupons(
        &self,
        conn: &mut MysqlConnection,
        user_id: i64,
    ) -> Result<Vec<IssuedCoupon>> {
        validate_id("user", user_id)?;
        let deadline = self.runner.deadline();
        let rows: Vec<UserCouponRow> = self.runner.read_by(conn, deadline, |conn| {
            Ok(user_coupon::table
                .filter(user_coupon::user_id.eq(user_id))
                .order(user_coupon::id.asc())
                .select(UserCouponRow::as_select())
                .load(conn)?)
        })?;
        rows.into_iter().map(UserCouponRow::into_coupon).collect()
    }

    /// The campaign row in a snapshot ([`Error::CampaignNotFound`] if there is none).
    pub(super) fn read_campaign(
        &self,
        conn: &mut MysqlConnection,
        campaign_id: i64,
        deadline: Deadline,
    ) -> Result<Campaign> {
        self.runner
            .read_by(conn, deadline, |conn| find_campaign(conn, campaign_id))?
            .ok_or(Error::CampaignNotFound { campaign_id })
    }

    /// One INSERT in its own transaction, and the id of the row it created.
    fn insert_returning_id(
        &self,
        conn: &mut MysqlConnection,
        deadline: Deadline,
        insert: impl Fn(&mut MysqlConnection) -> QueryResult<usize>,
    ) -> Result<i64> {
        self.runner.run_by(conn, deadline, |conn| {
            insert(conn)?;
            inserted_id(conn)
        })
    }
}
