//! What the issuer remembers per campaign: the facts that never change (template and issue
//! window) and the sold-out marks (see the module docs of [`coupon`](super)).

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use diesel::mysql::MysqlConnection;

use super::types::{Campaign, CampaignFacts};
use super::CouponIssuer;
use crate::error::Result;
use crate::txn::Deadline;

/// The sold-out marks of an issuer.
#[derive(Debug, Default)]
pub(super) struct SoldOutMarks {
    /// Campaigns seen sold out, and when.
    pub(super) marked: HashMap<i64, Instant>,
    /// Per campaign, how often its stock was seen (or put) above zero. A zero read before the
    /// latest such sighting is stale and must not be marked after it.
    pub(super) sightings: HashMap<i64, u64>,
}

/// Caches hold plain data, so a panic elsewhere cannot leave them half-updated.
pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What [`CouponIssuer::sightings`] read: the count of above-zero stock sightings of a campaign,
/// and when.
#[derive(Debug, Clone, Copy)]
pub(super) struct Sightings {
    count: u64,
    at: Instant,
}

impl CouponIssuer {
    /// The campaign's facts, from the cache or read (a read that sees stock clears the mark).
    pub(super) fn facts_by(
        &self,
        conn: &mut MysqlConnection,
        campaign_id: i64,
        deadline: Deadline,
    ) -> Result<CampaignFacts> {
        if let Some(facts) = self.cached_facts(campaign_id) {
            return Ok(facts);
        }
        let campaign = self.read_campaign(conn, campaign_id, deadline)?;
        if campaign.stock_quantity > 0 {
            self.saw_stock(campaign_id);
        }
        Ok(self.cache_facts(&campaign))
    }

    /// The campaign's facts if they are cached (nothing is read).
    pub(super) fn cached_facts(&self, campaign_id: i64) -> Option<CampaignFacts> {
        lock(&self.facts).get(&campaign_id).copied()
    }

    pub(super) fn cache_facts(&self, campaign: &Campaign) -> CampaignFacts {
        let facts = CampaignFacts::of(campaign);
        lock(&self.facts).insert(campaign.id, facts);
        facts
    }

    pub(super) fn forget_facts(&self, campaign_id: i64) {
        lock(&self.facts).remove(&campaign_id);
    }

    /// How often this issuer has seen the campaign's stock above zero, and when it asked;
    /// read as each attempt that reads the stock begins (so that a mark dates from the read
    /// that set it, not from a retry loop's start), and passed to
    /// [`mark_sold_out`](Self::mark_sold_out). A sighting is noted as the stock is read, before
    /// that transaction's COMMIT: an attempt that begins after it reads a zero that is not
    /// stale.
    pub(super) fn sightings(&self, campaign_id: i64) -> Sightings {
        let count = lock(&self.sold_out)
            .sightings
            .get(&campaign_id)
            .copied()
            .unwrap_or(0);
        Sightings {
            count,
            at: Instant::now(),
        }
    }

    /// The campaign's stock was seen (or put) above zero: clears its sold-out mark, and keeps
    /// zeros read before from setting it again.
    pub(super) fn saw_stock(&self, campaign_id: i64) {
        let mut marks = lock(&self.sold_out);
        marks.marked.remove(&campaign_id);
        let sightings = marks.sightings.entry(campaign_id).or_default();
        *sightings = sightings.wrapping_add(1);
    }

    /// Marks a campaign sold out, unless its stock was seen above zero since `seen` (the
    /// [`sightings`](Self::sightings) read before the zero was): that zero may be stale. The
    /// mark dates from `seen` — before the zero was read — not from now: a TTL counts from the
    /// read, however long the call took after it (a slow COMMIT), so a restock made elsewhere
    /// after the read is seen within the TTL of it.
    pub(super) fn mark_sold_out(&self, campaign_id: i64, seen: Sightings) {
        let mut marks = lock(&self.sold_out);
        if marks.sightings.get(&campaign_id).copied().unwrap_or(0) == seen.count {
            // A slower call's older read never shortens a newer mark.
            let at = marks.marked.entry(campaign_id).or_insert(seen.at);
            *at = (*at).max(seen.at);
        }
    }

    /// Whether a sold-out mark answers the calls right after the one that set it: not with a
    /// TTL of zero, under which [`known_sold_out`](Self::known_sold_out) never holds.
    pub(super) fn marks_stick(&self) -> bool {
        !self.sold_out_ttl.is_zero()
    }

    /// Whether this issuer saw the campaign sold out within its TTL.
    pub(crate) fn known_sold_out(&self, campaign_id: i64) -> bool {
        let mut marks = lock(&self.sold_out);
        match marks.marked.get(&campaign_id) {
            None => false,
            Some(seen) if seen.elapsed() < self.sold_out_ttl => true,
            Some(_) => {
                marks.marked.remove(&campaign_id);
                false
            }
        }
    }
}
