//! Redeem, restore and restock: the writes after issuing (see the module docs of
//! [`coupon`](super) for how a restock is made).

use diesel::mysql::MysqlConnection;
use diesel::prelude::*;

use super::rows::{check_validity, find_campaign, lock_campaign, lock_user_coupon, set_redemption};
use super::types::{positive_quantity, validate_order_ref, Campaign, CouponStatus, IssuedCoupon};
use super::CouponIssuer;
use crate::error::{Error, Result};
use crate::schema::{fcfs_coupon, fcfs_coupon_restock};
use crate::statements::write_under_lock;
use crate::txn::Deadline;
use crate::validate::{validate_id, validate_key};

impl CouponIssuer {
    /// Adds `additional` coupons to a campaign's stock and total, once per idempotency `key`
    /// (1 to 64 bytes, per campaign), and clears this issuer's sold-out mark of the campaign.
    ///
    /// Safe to retry: the same `key` with the same `additional` returns the campaign as that
    /// restock left it, without adding again; with a different `additional` it is refused with
    /// [`Error::RestockConflict`]. The sold-out mark is cleared before the restock runs and again
    /// after it, whatever its outcome — a restock that committed although the call failed
    /// ([`Error::OutcomeUnknown`]) leaves no mark behind.
    ///
    /// # Errors
    /// [`Error::InvalidId`], [`Error::InvalidInput`] (`additional`: zero or past 2^31 - 1, or a
    /// total it would take past that),
    /// [`Error::InvalidIdempotencyKey`]; [`Error::CampaignNotFound`], [`Error::RestockConflict`];
    /// the runner's failures ([`Error::Contended`], [`Error::Timeout`],
    /// [`Error::OutcomeUnknown`], [`Error::Server`], ...) — `OutcomeUnknown` also for a restock
    /// refused by its key's unique index, or for the total (maybe raised by an earlier call
    /// under the key), whose key could then not be looked up.
    pub fn restock(
        &self,
        conn: &mut MysqlConnection,
        campaign_id: i64,
        additional: u32,
        key: &str,
    ) -> Result<Campaign> {
        validate_id("campaign", campaign_id)?;
        let additional = positive_quantity("additional", additional)?;
        validate_key(key)?;
        let deadline = self.runner.deadline();
        self.saw_stock(campaign_id);
        let result = self.restock_by(conn, campaign_id, additional, key, deadline);
        // Also after: an issue that read zero before the restock committed must not mark it.
        self.saw_stock(campaign_id);
        result
    }

    fn restock_by(
        &self,
        conn: &mut MysqlConnection,
        campaign_id: i64,
        additional: i32,
        key: &str,
        deadline: Deadline,
    ) -> Result<Campaign> {
        // A refusal that an earlier call under the key may explain (its key taken, its total
        // raised) is the answer even where the ROLLBACK after it failed: the lookup below then
        // fails on the broken connection and answers OutcomeUnknown, never the runner's
        // ConnectionBroken ("nothing was committed").
        let applied = self
            .runner
            .run_by_keeping(conn, deadline, key_refusal, |conn| {
                let mut campaign = lock_campaign(conn, campaign_id, self.stock_holding())?
                    .ok_or(Error::CampaignNotFound { campaign_id })?;
                let (Some(total), Some(stock)) = (
                    campaign.total_quantity.checked_add(additional),
                    campaign.stock_quantity.checked_add(additional),
                ) else {
                    return Err(Error::InvalidInput {
                        field: "additional",
                        problem: "would take the campaign's total past 2^31 - 1",
                    });
                };
                // UNIQUE(fcfs_coupon_id, idempotency_key) refuses a key used before.
                // Under the stock lock: never waits (a restock of the same key elsewhere).
                write_under_lock(
                    conn,
                    diesel::insert_into(fcfs_coupon_restock::table).values((
                        fcfs_coupon_restock::fcfs_coupon_id.eq(campaign_id),
                        fcfs_coupon_restock::idempotency_key.eq(key),
                        fcfs_coupon_restock::additional.eq(additional),
                        fcfs_coupon_restock::total_after.eq(total),
                        fcfs_coupon_restock::stock_after.eq(stock),
                    )),
                )?;
                diesel::update(fcfs_coupon::table.find(campaign_id))
                    .set((
                        fcfs_coupon::total_quantity.eq(total),
                        fcfs_coupon::stock_quantity.eq(stock),
                    ))
                    .execute(conn)?;
                campaign.total_quantity = total;
                campaign.stock_quantity = stock;
                Ok(campaign)
            });
        match applied {
            // A key used before decides the answer, whatever the stock is now.
            Err(e) if key_refusal(&e) => {
                match self.recorded_restock(conn, campaign_id, additional, key, deadline)? {
                    Some(campaign) => Ok(campaign),
                    None => Err(e),
                }
            }
            other => other,
        }
    }

    /// The campaign as the restock recorded under `key` left it; a different restock under the
    /// key is an [`Error::RestockConflict`].
    fn recorded_restock(
        &self,
        conn: &mut MysqlConnection,
        campaign_id: i64,
        additional: i32,
        key: &str,
        deadline: Deadline,
    ) -> Result<Option<Campaign>> {
        // A key the unique index refused, or a retry refused for what its first attempt added:
        // where the key cannot be looked up the restock may be applied (OutcomeUnknown).
        let recorded = self.runner.read_by(conn, deadline, |conn| {
            let restock: Option<(i32, i32, i32)> = fcfs_coupon_restock::table
                .filter(fcfs_coupon_restock::fcfs_coupon_id.eq(campaign_id))
                .filter(fcfs_coupon_restock::idempotency_key.eq(key))
                .select((
                    fcfs_coupon_restock::additional,
                    fcfs_coupon_restock::total_after,
                    fcfs_coupon_restock::stock_after,
                ))
                .first(conn)
                .optional()?;
            let Some(restock) = restock else {
                return Ok(None);
            };
            let campaign =
                find_campaign(conn, campaign_id)?.ok_or(Error::CampaignNotFound { campaign_id })?;
            Ok(Some((restock, campaign)))
        });
        let recorded = recorded.map_err(Error::unknown_after_refusal)?;
        let Some(((recorded, total, stock), mut campaign)) = recorded else {
            return Ok(None);
        };
        if recorded != additional {
            return Err(Error::RestockConflict {
                campaign_id,
                key: key.to_owned(),
                recorded_additional: u32::try_from(recorded).unwrap_or(0),
            });
        }
        campaign.total_quantity = total;
        campaign.stock_quantity = stock;
        Ok(Some(campaign))
    }

    /// Marks a held coupon used on order `order_ref` (1 to 64 bytes, not ending with a space).
    /// Exactly one of concurrent redeems wins; the others get [`Error::AlreadyRedeemed`].
    ///
    /// Safe to retry (after [`Error::OutcomeUnknown`], say): a coupon already redeemed by the
    /// same `order_ref` is returned as it is, unchanged, whatever the time now. The order
    /// reference is the only key: a retry still pending after that order was cancelled
    /// ([`restore`](Self::restore)) redeems the coupon again for it — stop retrying a redeem
    /// once its order is cancelled, and never reuse an order reference for a new order.
    ///
    /// # Errors
    /// [`Error::InvalidId`], [`Error::InvalidInput`] (order reference);
    /// [`Error::UserCouponNotFound`], [`Error::AlreadyRedeemed`], [`Error::CouponNotValid`];
    /// the runner's failures ([`Error::Contended`], [`Error::Timeout`],
    /// [`Error::OutcomeUnknown`], [`Error::Server`], ...).
    pub fn redeem(
        &self,
        conn: &mut MysqlConnection,
        user_coupon_id: i64,
        order_ref: &str,
    ) -> Result<IssuedCoupon> {
        self.set_use(
            conn,
            user_coupon_id,
            order_ref,
            CouponStatus::Used,
            |held| {
                (held.status == CouponStatus::Used).then(|| {
                    if held.order_ref.as_deref() == Some(order_ref) {
                        Ok(held.clone())
                    } else {
                        Err(Error::AlreadyRedeemed { user_coupon_id })
                    }
                })
            },
        )
    }

    /// Gives a coupon redeemed on order `order_ref` back to its holder (the order was
    /// cancelled), if the coupon is still within its validity window.
    ///
    /// Only the order that holds the coupon can give it back: a coupon redeemed by another order
    /// is refused with [`Error::RedeemedByAnotherOrder`], one not redeemed with
    /// [`Error::NotRedeemed`]. So a repeated cancel — or a retry after [`Error::OutcomeUnknown`]
    /// whose first attempt did restore the coupon — never frees a later order's redemption: it
    /// answers `NotRedeemed` (or `RedeemedByAnotherOrder` once another order used the coupon),
    /// both meaning "this order does not hold the coupon (any more)", with nothing written —
    /// as long as each order has its own reference: a retried restore after the same reference
    /// redeemed the coupon again frees that redemption.
    ///
    /// # Errors
    /// [`Error::InvalidId`], [`Error::InvalidInput`] (order reference);
    /// [`Error::UserCouponNotFound`], [`Error::NotRedeemed`], [`Error::RedeemedByAnotherOrder`],
    /// [`Error::CouponNotValid`] (outside its validity window); the runner's failures, as for
    /// [`redeem`](Self::redeem).
    pub fn restore(
        &self,
        conn: &mut MysqlConnection,
        user_coupon_id: i64,
        order_ref: &str,
    ) -> Result<IssuedCoupon> {
        self.set_use(
            conn,
            user_coupon_id,
            order_ref,
            CouponStatus::Issued,
            |held| {
                if held.status != CouponStatus::Used {
                    Some(Err(Error::NotRedeemed { user_coupon_id }))
                } else if held.order_ref.as_deref() != Some(order_ref) {
                    Some(Err(Error::RedeemedByAnotherOrder {
                        user_coupon_id,
                        order_ref: order_ref.to_owned(),
                    }))
                } else {
                    None
                }
            },
        )
    }

    /// A redeem (`to` used) or restore (`to` issued) in one transaction: the coupon row
    /// `FOR UPDATE NOWAIT`, `answer` (an answer without a write, if any), the template's validity
    /// at this attempt's time (read wait-free: refused where another transaction holds the
    /// template), one `UPDATE`, `COMMIT`.
    fn set_use(
        &self,
        conn: &mut MysqlConnection,
        user_coupon_id: i64,
        order_ref: &str,
        to: CouponStatus,
        answer: impl Fn(&IssuedCoupon) -> Option<Result<IssuedCoupon>>,
    ) -> Result<IssuedCoupon> {
        validate_id("user coupon", user_coupon_id)?;
        validate_order_ref(order_ref)?;
        let deadline = self.runner.deadline();
        // Every refusal comes before the UPDATE, the only write: where the ROLLBACK after it
        // fails, the refusal is still the answer (a restore retried after its first attempt
        // restored the coupon is `NotRedeemed`), not the runner's ConnectionBroken.
        self.runner
            .run_by_keeping(conn, deadline, is_refusal_of_use, |conn| {
                let at = self.now();
                let mut held = lock_user_coupon(conn, user_coupon_id)?;
                if let Some(answer) = answer(&held) {
                    return answer;
                }
                check_validity(conn, &held, at)?;
                let used = (to == CouponStatus::Used).then_some((at, order_ref));
                set_redemption(conn, &mut held, used)?;
                Ok(held)
            })
    }
}

/// Whether a restock was refused for what an earlier call under its key may have done: the
/// key's unique index, or a total its first attempt already raised.
fn key_refusal(error: &Error) -> bool {
    error.is_duplicate()
        || matches!(
            error,
            Error::InvalidInput {
                field: "additional",
                ..
            }
        )
}

/// Whether a redeem or restore was refused for the coupon's state (decided before anything is
/// written).
fn is_refusal_of_use(error: &Error) -> bool {
    matches!(
        error,
        Error::UserCouponNotFound { .. }
            | Error::AlreadyRedeemed { .. }
            | Error::NotRedeemed { .. }
            | Error::RedeemedByAnotherOrder { .. }
            | Error::CouponNotValid { .. }
    )
}
