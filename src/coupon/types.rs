//! The issuer's public types ([`Discount`], [`Coupon`], [`Campaign`], [`IssuedCoupon`], ...),
//! their row types, the campaign facts the issuer caches, and input checks.

use chrono::NaiveDateTime;
use diesel::prelude::*;
use rust_decimal::Decimal;

use crate::error::{Error, Result};
use crate::schema::{coupon, fcfs_coupon, user_coupon};
use crate::validate::validate_amount;

/// Longest order reference, in bytes.
pub const MAX_ORDER_REF_BYTES: usize = 64;

/// What a coupon takes off an order.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discount {
    /// A fixed amount.
    Fixed(Decimal),
    /// A percentage (0 < percent <= 100), optionally capped at an amount.
    Percent {
        /// The percentage.
        percent: Decimal,
        /// The largest discount, if any.
        cap: Option<Decimal>,
    },
}

/// `total * percent / 100` (both not negative) rounded down to 4 decimal places, computed
/// exactly on their integer mantissas: `None` where a percentage has more than 4 decimals or a
/// number does not fit (then decimal arithmetic, which rounds to 28 digits, is the fallback:
/// it can round a total of many decimals up across a 4th-place boundary).
fn percent_of(total: Decimal, percent: Decimal) -> Option<Decimal> {
    let (total, percent) = (total.normalize(), percent.normalize());
    if percent.scale() > 4 {
        return None;
    }
    let product = total.mantissa().checked_mul(percent.mantissa())?;
    // The product's scale, against the answer's 4 places.
    let shift = i64::from(total.scale()) + i64::from(percent.scale()) - 4;
    let ten_to = |n: i64| 10_i128.checked_pow(u32::try_from(n).ok()?);
    let places = if shift >= 0 {
        product.checked_div(ten_to(shift)?.checked_mul(100)?)?
    } else {
        product.checked_mul(ten_to(-shift)?)?.checked_div(100)?
    };
    Decimal::try_from_i128_with_scale(places, 4).ok()
}

impl Discount {
    /// The discount on an order of `total`: never negative, never more than the total,
    /// percentages rounded down to 4 decimal places and capped. Never panics: a discount built
    /// by hand with values [`create_coupon`](super::CouponIssuer::create_coupon) would refuse is
    /// clamped (a percentage to 0..=100, an amount or cap to 0..=total).
    pub fn apply_to(&self, total: Decimal) -> Decimal {
        let total = total.max(Decimal::ZERO);
        let raw = match *self {
            Self::Fixed(amount) => amount,
            Self::Percent { percent, cap } => {
                let percent = percent.clamp(Decimal::ZERO, Decimal::ONE_HUNDRED);
                // Exact where the numbers fit in 128 bits (every total and percentage a coupon
                // takes); otherwise decimal arithmetic, which rounds to 28 digits on the way:
                // total * percent overflows for totals near Decimal::MAX, and dividing first
                // cannot (percent <= 100 keeps the product <= total), at the cost of digits
                // that large totals do not have anyway.
                let off = percent_of(total, percent).unwrap_or_else(|| {
                    total
                        .checked_mul(percent)
                        .and_then(|product| product.checked_div(Decimal::ONE_HUNDRED))
                        .or_else(|| (total / Decimal::ONE_HUNDRED).checked_mul(percent))
                        .unwrap_or(total)
                        .round_dp_with_strategy(4, rust_decimal::RoundingStrategy::ToZero)
                });
                cap.map_or(off, |cap| off.min(cap))
            }
        };
        raw.clamp(Decimal::ZERO, total)
    }

    pub(crate) fn validate(&self) -> Result<()> {
        match *self {
            Self::Fixed(amount) => validate_amount(amount),
            Self::Percent { percent, cap } => {
                if percent <= Decimal::ZERO
                    || percent > Decimal::ONE_HUNDRED
                    || percent.normalize().scale() > 4
                {
                    return Err(Error::InvalidInput {
                        field: "percent",
                        problem: "must be greater than 0 and at most 100, with at most 4 decimals",
                    });
                }
                cap.map_or(Ok(()), validate_amount)
            }
        }
    }

    /// This (validated) discount as its `DECIMAL(19,4)` columns store it — four places — as
    /// [`CouponIssuer::coupon`](crate::CouponIssuer::coupon) reads it back.
    pub(crate) fn stored(&self) -> Self {
        let four = |mut value: Decimal| {
            value.rescale(4);
            value
        };
        match *self {
            Self::Fixed(amount) => Self::Fixed(four(amount)),
            Self::Percent { percent, cap } => Self::Percent {
                percent: four(percent),
                cap: cap.map(four),
            },
        }
    }

    pub(crate) fn columns(&self) -> (&'static str, Decimal, Option<Decimal>) {
        match *self {
            Self::Fixed(amount) => ("fixed", amount, None),
            Self::Percent { percent, cap } => ("percent", percent, cap),
        }
    }
}

/// A new coupon template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewCoupon<'a> {
    /// Display name (1 to 255 characters).
    pub name: &'a str,
    /// What it is worth.
    pub discount: Discount,
    /// Usable from (UTC, inclusive).
    pub valid_from: NaiveDateTime,
    /// Usable until (UTC, exclusive).
    pub valid_until: NaiveDateTime,
}

/// A coupon template.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Coupon {
    /// Its id.
    pub id: i64,
    /// Display name.
    pub name: String,
    /// What it is worth.
    pub discount: Discount,
    /// Usable from (UTC, inclusive).
    pub valid_from: NaiveDateTime,
    /// Usable until (UTC, exclusive).
    pub valid_until: NaiveDateTime,
}

/// A new first-come-first-served campaign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewCampaign {
    /// The coupon template it hands out.
    pub coupon_id: i64,
    /// How many coupons (1 to 2^31 - 1).
    pub quantity: u32,
    /// Issuing opens (UTC, inclusive).
    pub issue_starts_at: NaiveDateTime,
    /// Issuing closes (UTC, exclusive).
    pub issue_ends_at: NaiveDateTime,
}

/// A campaign and its stock.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = fcfs_coupon, check_for_backend(diesel::mysql::Mysql))]
pub struct Campaign {
    /// Its id.
    pub id: i64,
    /// The coupon template it hands out.
    pub coupon_id: i64,
    /// Coupons in all, restocks included.
    pub total_quantity: i32,
    /// Coupons left.
    pub stock_quantity: i32,
    /// Issuing opens (UTC, inclusive).
    pub issue_starts_at: NaiveDateTime,
    /// Issuing closes (UTC, exclusive).
    pub issue_ends_at: NaiveDateTime,
}

/// State of an issued coupon.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CouponStatus {
    /// Held, not used.
    Issued,
    /// Redeemed on an order.
    Used,
}

impl CouponStatus {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Issued => "issued",
            Self::Used => "used",
        }
    }
}

/// A coupon a user holds.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCoupon {
    /// Its id.
    pub id: i64,
    /// The holder.
    pub user_id: i64,
    /// The coupon template.
    pub coupon_id: i64,
    /// The campaign it came from.
    pub campaign_id: i64,
    /// Held or used.
    pub status: CouponStatus,
    /// When it was issued (UTC).
    pub issued_at: NaiveDateTime,
    /// When it was redeemed (UTC).
    pub used_at: Option<NaiveDateTime>,
    /// The order it was redeemed on.
    pub order_ref: Option<String>,
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = user_coupon, check_for_backend(diesel::mysql::Mysql))]
pub(crate) struct UserCouponRow {
    id: i64,
    user_id: i64,
    coupon_id: i64,
    fcfs_coupon_id: i64,
    status: String,
    issued_at: NaiveDateTime,
    used_at: Option<NaiveDateTime>,
    order_ref: Option<String>,
}

impl UserCouponRow {
    pub(crate) fn into_coupon(self) -> Result<IssuedCoupon> {
        let status = match self.status.as_str() {
            "issued" => CouponStatus::Issued,
            "used" => CouponStatus::Used,
            other => {
                return Err(Error::from(diesel::result::Error::DeserializationError(
                    format!("unknown coupon status {other:?}").into(),
                )))
            }
        };
        Ok(IssuedCoupon {
            id: self.id,
            user_id: self.user_id,
            coupon_id: self.coupon_id,
            campaign_id: self.fcfs_coupon_id,
            status,
            issued_at: self.issued_at,
            used_at: self.used_at,
            order_ref: self.order_ref,
        })
    }
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = coupon, check_for_backend(diesel::mysql::Mysql))]
pub(crate) struct CouponRow {
    id: i64,
    name: String,
    discount_kind: String,
    discount_value: Decimal,
    max_discount: Option<Decimal>,
    valid_from: NaiveDateTime,
    valid_until: NaiveDateTime,
}

impl CouponRow {
    pub(crate) fn into_coupon(self) -> Coupon {
        let discount = if self.discount_kind == "percent" {
            Discount::Percent {
                percent: self.discount_value,
                cap: self.max_discount,
            }
        } else {
            Discount::Fixed(self.discount_value)
        };
        Coupon {
            id: self.id,
            name: self.name,
            discount,
            valid_from: self.valid_from,
            valid_until: self.valid_until,
        }
    }
}

/// What never changes about a campaign, cached per issuer and checked against the campaign row
/// whenever the row is locked or read after a duplicate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CampaignFacts {
    pub(crate) coupon_id: i64,
    pub(crate) issue_starts_at: NaiveDateTime,
    pub(crate) issue_ends_at: NaiveDateTime,
}

impl CampaignFacts {
    /// The facts of a campaign row.
    pub(crate) fn of(campaign: &Campaign) -> Self {
        Self {
            coupon_id: campaign.coupon_id,
            issue_starts_at: campaign.issue_starts_at,
            issue_ends_at: campaign.issue_ends_at,
        }
    }

    /// [`Error::NotStarted`] before the window, [`Error::Ended`] from its end on.
    pub(crate) fn check_window(&self, campaign_id: i64, at: NaiveDateTime) -> Result<()> {
        if at < self.issue_starts_at {
            Err(Error::NotStarted {
                campaign_id,
                starts_at: self.issue_starts_at,
            })
        } else if at >= self.issue_ends_at {
            Err(Error::Ended {
                campaign_id,
                ended_at: self.issue_ends_at,
            })
        } else {
            Ok(())
        }
    }
}

/// Checks an order reference: 1 to [`MAX_ORDER_REF_BYTES`] bytes, not ending with a space
/// ([`Error::InvalidInput`]).
pub(crate) fn validate_order_ref(order_ref: &str) -> Result<()> {
    // The column compares with PAD SPACE: a shop's own SQL would take "o-1 " for "o-1", which
    // lockstock tells apart (compared exactly, a restore by one of a redemption by the other
    // is refused). So, as for idempotency keys, no trailing space.
    if order_ref.is_empty() || order_ref.len() > MAX_ORDER_REF_BYTES || order_ref.ends_with(' ') {
        return Err(Error::InvalidInput {
            field: "order_ref",
            problem: "must be 1 to 64 bytes, not ending with a space",
        });
    }
    Ok(())
}

/// A quantity as the INT columns hold it: 1 to 2^31 - 1 ([`Error::InvalidInput`]).
pub(crate) fn positive_quantity(field: &'static str, quantity: u32) -> Result<i32> {
    i32::try_from(quantity)
        .ok()
        .filter(|q| *q > 0)
        .ok_or(Error::InvalidInput {
            field,
            problem: "must be between 1 and 2^31 - 1",
        })
}
