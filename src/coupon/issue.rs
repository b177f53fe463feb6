//! [`CouponIssuer::issue`]: one coupon, one transaction, in the lock order the module docs of
//! [`coupon`](super) give statement by statement.

use diesel::mysql::MysqlConnection;

use super::rows::{
    find_campaign, holders, lock_campaign_after_insert, set_stock, write_user_coupons,
};
use super::types::{CampaignFacts, CouponStatus, IssuedCoupon};
use super::{is_marker, names_missing_row, stale_facts, CouponIssuer, FACT_REFRESHES};
use crate::error::{Error, Result, ServerErrorKind};
use crate::txn::{Deadline, Holding};
use crate::validate::validate_id;

impl CouponIssuer {
    /// Issues one coupon of `campaign_id` to `user_id`.
    ///
    /// The window is checked at the time of the attempt that commits (a refused and retried
    /// attempt reads the clock again), and `issued_at` is that attempt's time.
    ///
    /// Once this issuer has seen the campaign sold out it answers [`Error::SoldOut`] from memory,
    /// also to a user who already holds the coupon ([`user_coupons`](Self::user_coupons)
    /// tells); while it has not, a holder gets [`Error::AlreadyIssued`] even at zero stock.
    ///
    /// Safe to retry after [`Error::OutcomeUnknown`]: one coupon per user, so a repeat never
    /// issues a second one; it answers [`Error::AlreadyIssued`] with the coupon's id if the
    /// first committed — or [`Error::SoldOut`] once this issuer has seen the campaign sold out
    /// (perhaps by that very coupon), or [`Error::Ended`] once the window has closed (the
    /// window is checked before the coupon is looked for): then
    /// [`user_coupons`](Self::user_coupons) tells.
    ///
    /// # Errors
    /// [`Error::InvalidId`]; [`Error::SoldOut`], [`Error::AlreadyIssued`],
    /// [`Error::NotStarted`], [`Error::Ended`], [`Error::CampaignNotFound`]; the runner's
    /// failures ([`Error::Contended`], [`Error::Timeout`], [`Error::OutcomeUnknown`],
    /// [`Error::NestedTransaction`], [`Error::ConnectionBroken`],
    /// [`Error::ServerUnresponsive`], [`Error::NotDesignatedWriter`] or
    /// [`Error::NotReplicated`] on a Galera node,
    /// [`Error::Server`]); [`Error::Internal`] when the cached campaign facts keep disagreeing
    /// with the database. A server running `read_only` refuses the INSERT
    /// ([`ServerErrorKind::ReadOnly`]); a user who holds the coupon is then still answered
    /// [`Error::AlreadyIssued`] (looked up with a plain read), as a batch answers it. Where
    /// that read fails, the refusal stands: this call applied nothing (unlike a duplicate
    /// key, a read-only refusal says nothing of whether the user holds one; retry by user as
    /// after any refusal).
    pub fn issue(
        &self,
        conn: &mut MysqlConnection,
        user_id: i64,
        campaign_id: i64,
    ) -> Result<IssuedCoupon> {
        self.issue_by(conn, user_id, campaign_id, self.runner.deadline())
    }

    /// What [`issue`](Self::issue) answers before it sends anything, if it refuses: an invalid
    /// id, the sold-out mark, or a window that the cached facts of the campaign show closed.
    pub(crate) fn refusal_before_sending(&self, user_id: i64, campaign_id: i64) -> Option<Error> {
        if let Err(refusal) = validate_id("user", user_id).and(validate_id("campaign", campaign_id))
        {
            return Some(refusal);
        }
        if self.known_sold_out(campaign_id) {
            return Some(Error::SoldOut { campaign_id });
        }
        let facts = self.cached_facts(campaign_id)?;
        facts.check_window(campaign_id, self.now()).err()
    }

    /// [`issue`](Self::issue), bounded by the caller's `deadline` (a combiner or a
    /// [`Router`](crate::route::Router) passes the deadline its caller started with).
    ///
    /// # Errors
    /// As [`issue`](Self::issue).
    pub fn issue_by(
        &self,
        conn: &mut MysqlConnection,
        user_id: i64,
        campaign_id: i64,
        deadline: Deadline,
    ) -> Result<IssuedCoupon> {
        if let Some(refusal) = self.refusal_before_sending(user_id, campaign_id) {
            return Err(refusal);
        }
        let mut refreshes = 0;
        loop {
            let facts = self.facts_by(conn, campaign_id, deadline)?;
            // A closed window is refused without a round trip.
            facts.check_window(campaign_id, self.now())?;
            // Read as each attempt begins, before it reads the stock: a zero read after a
            // newer sighting is not marked.
            let mut read = self.sightings(campaign_id);
            // The unique index's refusal stays the answer when the runner could not end the
            // attempt: the holder's lookup then fails, and answers OutcomeUnknown.
            let result = self
                .runner
                .run_by_keeping(conn, deadline, Error::is_duplicate, |conn| {
                    #[cfg(test)]
                    super::tests::attempt_begins();
                    // This attempt's time: the window is checked at it, and it is the issue time.
                    let at = self.now();
                    read = self.sightings(campaign_id);
                    facts.check_window(campaign_id, at)?;
                    // Before the hot row: the unique index decides "already issued?".
                    write_user_coupons(
                        conn,
                        (campaign_id, facts.coupon_id),
                        &[user_id],
                        at,
                        Holding::Nothing,
                    )?;
                    // The hot row, with the new coupon's id: locked from here to COMMIT for one
                    // UPDATE.
                    let (campaign, (id, _step)) =
                        lock_campaign_after_insert(conn, campaign_id, self.stock_holding())?
                            .ok_or(Error::CampaignNotFound { campaign_id })?;
                    let current = CampaignFacts::of(&campaign);
                    if current != facts {
                        #[cfg(test)]
                        super::tests::before_marker();
                        return Err(stale_facts(campaign_id));
                    }
                    // Once the row is ours this attempt commits (or fails) at once: the window must
                    // still be open now.
                    current.check_window(campaign_id, self.now())?;
                    if campaign.stock_quantity <= 0 {
                        return Err(Error::SoldOut { campaign_id });
                    }
                    // A sighting as the stock is read, before the COMMIT, whatever this attempt
                    // meets next: a call whose attempt begins after it (a combined batch after
                    // this one's COMMIT was sent, say) reads a zero that is not stale.
                    self.saw_stock(campaign_id);
                    set_stock(conn, campaign_id, campaign.stock_quantity - 1)?;
                    #[cfg(test)]
                    if let Some(refused) = super::tests::after_the_stock_update() {
                        return Err(refused);
                    }
                    Ok(IssuedCoupon {
                        id,
                        user_id,
                        coupon_id: facts.coupon_id,
                        campaign_id,
                        status: CouponStatus::Issued,
                        issued_at: at,
                        used_at: None,
                        order_ref: None,
                    })
                });
            #[cfg(test)]
            super::tests::after_the_transaction(self);
            // Facts of another database (the INSERT names a template or campaign missing here)
            // are stale facts too.
            let missing_row = result.as_ref().is_err_and(names_missing_row);
            // Only the last attempt's marker error itself: a failure of the runner after it is
            // the call's answer.
            let stale = result
                .as_ref()
                .is_err_and(|e| is_marker(e, &stale_facts(campaign_id)));
            if (stale || missing_row) && refreshes < FACT_REFRESHES {
                self.forget_facts(campaign_id);
                refreshes += 1;
                continue;
            }
            if missing_row {
                return Err(stale_facts(campaign_id));
            }
            return match result {
                Err(Error::SoldOut { .. }) => {
                    self.mark_sold_out(campaign_id, read);
                    Err(Error::SoldOut { campaign_id })
                }
                Err(e) if e.is_duplicate() => {
                    match self.already_issued(conn, user_id, campaign_id, &facts, deadline) {
                        Ok(Some(refusal)) => Err(refusal),
                        // The template is not the cached one: another database.
                        Ok(None) if refreshes < FACT_REFRESHES => {
                            self.forget_facts(campaign_id);
                            refreshes += 1;
                            continue;
                        }
                        Ok(None) => Err(stale_facts(campaign_id)),
                        // The user holds a coupon of the template (maybe from an earlier call of
                        // this one that answered OutcomeUnknown): where it cannot be looked up,
                        // the issue may be applied — never the lookup's failure, which would say
                        // that nothing was (a retry answers AlreadyIssued).
                        Err(lookup) => Err(Error::unknown_after_refusal(lookup)),
                    }
                }
                // A read-only server refuses the INSERT before its unique index could: a user
                // who holds the coupon is answered as a writable server answers it (and as a
                // batch that read the holders answers it), through a plain read, which a
                // read-only server serves. Anyone else gets the refusal: nothing was applied
                // by this call — also where that read fails (the refusal, unlike a duplicate
                // key, says nothing of a holder; a batch answers it alike).
                Err(e) if e.server_kind() == Some(ServerErrorKind::ReadOnly) => {
                    match self.already_issued(conn, user_id, campaign_id, &facts, deadline) {
                        Ok(Some(refusal)) => Err(refusal),
                        Ok(None) | Err(_) => Err(e),
                    }
                }
                other => other,
            };
        }
    }

    /// After a duplicate-key refusal: the coupon `user_id` holds, read in one snapshot with the
    /// campaign row. `None` if the row does not match the cached `facts` (the issuer was used
    /// on another database; see [`CouponIssuer`]).
    fn already_issued(
        &self,
        conn: &mut MysqlConnection,
        user_id: i64,
        campaign_id: i64,
        facts: &CampaignFacts,
        deadline: Deadline,
    ) -> Result<Option<Error>> {
        let coupon_id = facts.coupon_id;
        let held: Option<i64> = self.runner.read_by(conn, deadline, |conn| {
            let current = find_campaign(conn, campaign_id)?.map(|c| CampaignFacts::of(&c));
            if current.as_ref() != Some(facts) {
                return Ok(None);
            }
            Ok(holders(conn, coupon_id, &[user_id], None)?
                .get(&user_id)
                .copied())
        })?;
        Ok(held.map(|user_coupon_id| Error::AlreadyIssued {
            user_id,
            coupon_id,
            user_coupon_id,
        }))
    }
}
