//! [`CouponIssuer::issue_many`]: many users, one campaign, one transaction, decided exactly as
//! the single issues made one after another would be, written with the same statements
//! ([`rows`](super::rows)).

use std::collections::{HashMap, HashSet};

use diesel::mysql::MysqlConnection;

use super::cache::lock;
use super::rows::{
    fits_one_insert, holders, insert_user_coupons, lock_campaign, lock_campaign_after_insert,
    set_stock, user_coupon_ids, write_user_coupons,
};
use super::types::{CampaignFacts, CouponStatus, IssuedCoupon};
use super::{is_marker, names_missing_row, stale_facts, CouponIssuer, FACT_REFRESHES};
use crate::error::{Error, Result, ServerErrorKind};
use crate::txn::{Deadline, Holding, InsertIds};
use crate::validate::validate_id;

/// The users a batch's attempts found holding the campaign's coupon (`coupon_id`), with their
/// coupon's id; `unknown`: an attempt was refused by the unique index (some user of the batch
/// holds the coupon, maybe from an earlier call of the same request) and no holders read has
/// told which one since.
#[derive(Debug, Default)]
struct SeenHolders {
    coupon_id: i64,
    held: HashMap<i64, i64>,
    unknown: bool,
}

impl CouponIssuer {
    /// Issues one coupon of `campaign_id` to each of `user_ids` in one transaction, first come
    /// first served in the given order.
    ///
    /// Each request gets exactly the answer the single [`issue`](Self::issue) calls, made one
    /// after another in the given order by this issuer, would have got: an invalid user id
    /// [`Error::InvalidId`]; a holder — from before or earlier in the batch —
    /// [`Error::AlreadyIssued`]; when the stock runs out the first request refused gets
    /// [`Error::SoldOut`], and since that sets this issuer's sold-out mark, every later request
    /// in the batch is answered `SoldOut` too, holders included — as `issue` answers from the
    /// mark. All requests of a batch are decided at the time the stock row is locked.
    ///
    /// Inside the transaction, as the single issue: one read of which users already hold the
    /// coupon (only for campaigns where that is needed, see below), then — before the hot row —
    /// ONE multi-row INSERT of a coupon for every request the stock decides nothing about (the
    /// unique index refusing a holder), then the stock row `FOR UPDATE NOWAIT` (with the facts
    /// the cached ones are checked against, and in the same read the first new id — where the
    /// server does not number one INSERT's rows consecutively, `innodb_autoinc_lock_mode` 2, the
    /// ids are read back before it), one
    /// UPDATE, COMMIT: the hot row is held for two statements whatever the batch size. Where the
    /// stock runs out inside the batch the attempt is rolled back and run again with the stock
    /// row locked first (then: the lock, one INSERT of the winners, their ids, the UPDATE; below
    /// SERIALIZABLE, where the holders read is a snapshot that locks nothing, it comes after the
    /// lock there, so that a user issued a coupon meanwhile is answered `AlreadyIssued`). The
    /// holders are read on campaigns where a batch has met one (a duplicate, nothing written,
    /// makes the batch run again with the read), and when a request would be refused `SoldOut`
    /// without knowing whether it holds the coupon (the batch runs again with the read: a
    /// holder is answered `AlreadyIssued`). The issue time of the batch's coupons is the
    /// attempt's start, as for a single issue; the window is checked at it and again once the
    /// stock row is locked. A batch of more than 1,000 users writes them with one INSERT per
    /// 1,000, each followed by its ids (and then locks the stock row without reading an id):
    /// one prepared statement binds at most 65,535 values, and a batch of any size answers as
    /// its single issues. No INSERT after the first is sent once the deadline has passed: the
    /// attempt is rolled back whole and the batch answers [`Error::Timeout`] (nothing issued;
    /// [`Error::Contended`] where an attempt before it was refused).
    ///
    /// # Errors
    /// The outer `Err` is a failure of the whole transaction ([`Error::Contended`],
    /// [`Error::Timeout`], [`Error::NestedTransaction`], [`Error::ConnectionBroken`],
    /// [`Error::ServerUnresponsive`], [`Error::NotDesignatedWriter`], [`Error::NotReplicated`],
    /// [`Error::Server`],
    /// [`Error::Internal`] for facts that keep disagreeing): then no request was applied (or,
    /// for [`Error::OutcomeUnknown`], all or none were). It is given only when every user id
    /// is valid and the batch found none of its users holding the coupon — before answering a
    /// failure with time left (not a node failure, but for a read-only server's refusal) it
    /// looks them up in a lock-free snapshot,
    /// as a single issue refused by the unique index reads its holder: otherwise such a
    /// failure is answered per request, an invalid id with [`Error::InvalidId`] (as `issue`
    /// answers it before sending anything), a user found holding the coupon with
    /// [`Error::AlreadyIssued`] (as `issue` answers it without the stock row: the unique index
    /// refuses its INSERT) and every other request with a copy of the failure. Where the
    /// unique index refused the batch's INSERT and the holders could not be read since, some
    /// user holds the coupon — maybe from an earlier call of the same request — and the batch
    /// cannot tell which: every user not found holding is answered [`Error::OutcomeUnknown`],
    /// as a single issue whose holder cannot be looked up is, never the outer `Err` (through a
    /// [`Router`](crate::Router)'s combiner, which runs its single calls again after a node
    /// failure, such a request runs again where the failure was one). Refusals of the
    /// campaign as a whole (an invalid campaign id, not found, window closed, sold out) are
    /// answered per request.
    pub fn issue_many(
        &self,
        conn: &mut MysqlConnection,
        campaign_id: i64,
        user_ids: &[i64],
    ) -> Result<Vec<Result<IssuedCoupon>>> {
        self.issue_many_by(conn, campaign_id, user_ids, self.runner.deadline())
    }

    /// [`issue_many`](Self::issue_many), bounded by the caller's `deadline`.
    pub(crate) fn issue_many_by(
        &self,
        conn: &mut MysqlConnection,
        campaign_id: i64,
        user_ids: &[i64],
        deadline: Deadline,
    ) -> Result<Vec<Result<IssuedCoupon>>> {
        let mut found = SeenHolders::default();
        let failure = match self.decide_many_by(conn, campaign_id, user_ids, deadline, &mut found) {
            Err(failure) => failure,
            decided => return decided,
        };
        // With time left, the users not found holding are looked up lock-free first, as a
        // single issue refused by the unique index reads its holder: a batch refused before it
        // could tell (its holders read refused until its attempts ran out) still answers a
        // holder `AlreadyIssued`. Not after a node failure (a router runs the batch again on
        // the writer) nor an unknown outcome — except a read-only server's refusal: a single
        // issue refused so reads its holder too (a read-only server serves the read).
        let open: Vec<i64> = user_ids
            .iter()
            .copied()
            .filter(|&user_id| user_id > 0 && !found.held.contains_key(&user_id))
            .collect();
        let read_only = failure.server_kind() == Some(ServerErrorKind::ReadOnly);
        if found.coupon_id > 0
            && !open.is_empty()
            && !deadline.is_expired()
            && (read_only || !failure.is_node_failure())
            && !failure.is_outcome_unknown()
        {
            let coupon_id = found.coupon_id;
            if let Ok(held) = self.runner.read_by(conn, deadline, |conn| {
                holders(conn, coupon_id, &open, Some(deadline))
            }) {
                found.held.extend(held);
                // Every user's holder is known as of this read.
                found.unknown = false;
            }
        }
        let holder = |user_id: i64| found.held.get(&user_id).copied();
        // A user found holding the coupon is never answered the failure (a node failure
        // included: it may say that nothing was applied); nor is any user while a holder among
        // them is known to exist but not which one.
        if !found.unknown
            && user_ids
                .iter()
                .all(|&user_id| user_id > 0 && holder(user_id).is_none())
        {
            return Err(failure);
        }
        // As the single issues: an invalid user id is refused whatever the rest met, and a user
        // found holding the coupon (its single issue's INSERT is refused by the unique index,
        // and it is answered without the stock row) is `AlreadyIssued`.
        Ok(user_ids
            .iter()
            .map(|&user_id| {
                validate_id("user", user_id)?;
                Err(match holder(user_id) {
                    Some(user_coupon_id) => Error::AlreadyIssued {
                        user_id,
                        coupon_id: found.coupon_id,
                        user_coupon_id,
                    },
                    // Refused by the unique index, the holder not read since: this user may
                    // hold the coupon from an earlier call of this request, so it may be
                    // applied — as a single issue whose holder cannot be looked up answers.
                    None if found.unknown => {
                        Error::unknown_after_refusal_by_deadline(failure.clone(), None)
                    }
                    None => failure.clone(),
                })
            })
            .collect())
    }

    /// [`issue_many_by`](Self::issue_many_by), with a failure of the whole transaction as the
    /// outer `Err`; `found`: the holders among `user_ids` that its attempts read (committed
    /// coupons: still held when the batch fails).
    fn decide_many_by(
        &self,
        conn: &mut MysqlConnection,
        campaign_id: i64,
        user_ids: &[i64],
        deadline: Deadline,
        found: &mut SeenHolders,
    ) -> Result<Vec<Result<IssuedCoupon>>> {
        // A refusal of the whole campaign: `issue` checks the user id before anything else.
        let everyone = |refusal: &dyn Fn() -> Error| -> Vec<Result<IssuedCoupon>> {
            user_ids
                .iter()
                .map(|&user_id| validate_id("user", user_id).and_then(|()| Err(refusal())))
                .collect()
        };
        if user_ids.iter().all(|&user_id| user_id <= 0) {
            return Ok(user_ids
                .iter()
                .map(|&id| Err(Error::InvalidId { what: "user", id }))
                .collect());
        }
        if let Err(Error::InvalidId { what, id }) = validate_id("campaign", campaign_id) {
            return Ok(everyone(&|| Error::InvalidId { what, id }));
        }
        if self.known_sold_out(campaign_id) {
            return Ok(everyone(&|| Error::SoldOut { campaign_id }));
        }
        let closed = |refusal: Error| match refusal {
            Error::NotStarted { starts_at, .. } => Ok(everyone(&|| Error::NotStarted {
                campaign_id,
                starts_at,
            })),
            Error::Ended { ended_at, .. } => Ok(everyone(&|| Error::Ended {
                campaign_id,
                ended_at,
            })),
            Error::CampaignNotFound { .. } => {
                Ok(everyone(&|| Error::CampaignNotFound { campaign_id }))
            }
            other => Err(other),
        };
        let mut read_holders = lock(&self.repeat_askers).contains(&campaign_id);
        let (mut refreshes, mut late_holders) = (0, 0);
        let mut insert_first = true;
        let ((decisions, ids, at, seen), coupon_id) = loop {
            let facts = match self.facts_by(conn, campaign_id, deadline) {
                Ok(facts) => facts,
                Err(refusal) => return closed(refusal),
            };
            // A closed window is refused without a round trip.
            if let Err(refusal) = facts.check_window(campaign_id, self.now()) {
                return closed(refusal);
            }
            let coupon_id = facts.coupon_id;
            // The unique index's refusal stays the answer when the runner could not end the
            // attempt: the holders' lookup then fails, and the users not found holding are
            // answered OutcomeUnknown.
            let attempt = self
                .runner
                .run_by_keeping(conn, deadline, Error::is_duplicate, |conn| {
                    #[cfg(test)]
                    super::tests::attempt_begins();
                    // Read as the attempt begins, before it reads the stock: a zero read after a
                    // newer sighting is not marked. A sold-out mark dates from it, as a single
                    // issue's does.
                    let mut seen = self.sightings(campaign_id);
                    let insert_ids = self.runner.insert_ids(conn)?;
                    let valid: Vec<i64> = user_ids.iter().copied().filter(|u| *u > 0).collect();
                    if found.coupon_id != coupon_id {
                        *found = SeenHolders {
                            coupon_id,
                            ..SeenHolders::default()
                        };
                    }
                    // Below SERIALIZABLE the holders read is a snapshot that locks nothing, and
                    // an attempt that locks the stock row first writes only its winners' coupons:
                    // a user issued a coupon by another call before the lock would meet no
                    // unique index, and be refused `SoldOut` where its single issue answers
                    // `AlreadyIssued`. Such an attempt reads the holders once it holds the stock
                    // row (no holder commits through lockstock while it does, and the snapshot
                    // is taken then), still locking nothing.
                    let holders_after_lock = read_holders
                        && !insert_first
                        && self.runner.policy().isolation != crate::Isolation::Serializable;
                    let mut holders = if read_holders && !holders_after_lock {
                        holders(conn, coupon_id, &valid, Some(deadline))?
                    } else {
                        HashMap::new()
                    };
                    // Every holder among the users, as of this read.
                    if read_holders && !holders_after_lock {
                        found.unknown = false;
                    }
                    found
                        .held
                        .extend(holders.iter().map(|(user, id)| (*user, *id)));
                    // This attempt's time: the issue time, and the window is checked at it.
                    let at = self.now();
                    facts.check_window(campaign_id, at)?;
                    // Before the hot row, as the single issue: the coupons of every request that
                    // the stock decides nothing about, written with the unique index checking
                    // them; the lock then reads the first new id.
                    // A batch too large for one INSERT writes a chunk at a time, each with its ids.
                    // The holders read locked rows and gaps: an INSERT after it never waits.
                    let holding = if read_holders {
                        Holding::Locks
                    } else {
                        Holding::Nothing
                    };
                    let early = if insert_first {
                        let (_, everyone) =
                            decide(user_ids, &holders, i32::MAX, self.marks_stick());
                        // Where one INSERT's rows are numbered consecutively, the lock reads the
                        // first id; otherwise (innodb_autoinc_lock_mode 2: Galera, MySQL 8) the ids
                        // are read back now, before the hot row, not under its lock.
                        let ids = if fits_one_insert(everyone.len())
                            && insert_ids == InsertIds::Consecutive
                        {
                            write_user_coupons(
                                conn,
                                (campaign_id, coupon_id),
                                &everyone,
                                at,
                                holding,
                            )?;
                            None
                        } else {
                            let written = (campaign_id, coupon_id);
                            Some(insert_user_coupons(
                                conn,
                                Some(insert_ids),
                                written,
                                &everyone,
                                at,
                                holding,
                                deadline,
                            )?)
                        };
                        Some((everyone, ids))
                    } else {
                        None
                    };
                    let not_found = || Error::CampaignNotFound { campaign_id };
                    // With the coupons written by one INSERT: their first id in the same read.
                    let (campaign, first_id) = if let Some((_, None)) = early {
                        let (campaign, first) =
                            lock_campaign_after_insert(conn, campaign_id, self.stock_holding())?
                                .ok_or_else(not_found)?;
                        (campaign, Some(first))
                    } else {
                        (
                            lock_campaign(conn, campaign_id, self.stock_holding())?
                                .ok_or_else(not_found)?,
                            None,
                        )
                    };
                    let (stock, current) = (campaign.stock_quantity, CampaignFacts::of(&campaign));
                    if current != facts {
                        #[cfg(test)]
                        super::tests::before_marker();
                        return Err(stale_facts(campaign_id));
                    }
                    if holders_after_lock {
                        holders = super::rows::holders(conn, coupon_id, &valid, Some(deadline))?;
                        found.unknown = false;
                        found
                            .held
                            .extend(holders.iter().map(|(user, id)| (*user, *id)));
                    }
                    // Every request is decided now, with the hot row held.
                    current.check_window(campaign_id, self.now())?;
                    if stock > 0 {
                        // A sighting as the stock is read, before the COMMIT, whatever this
                        // attempt meets next (as for a single issue); this batch's own zero, if
                        // it sells the rest out, comes after it.
                        self.saw_stock(campaign_id);
                        seen = self.sightings(campaign_id);
                    }
                    let (decisions, winners) =
                        decide(user_ids, &holders, stock, self.marks_stick());
                    if !read_holders && decisions.contains(&BatchDecision::SoldOut) {
                        // The refused user may hold the coupon (then: AlreadyIssued).
                        #[cfg(test)]
                        if let Some(aborted) = super::tests::holders_needed() {
                            return Err(aborted);
                        }
                        #[cfg(test)]
                        super::tests::before_marker();
                        return Err(holders_needed());
                    }
                    let new_ids = match early {
                        Some((written, Some(ids))) if written == winners => ids,
                        Some((written, None)) if written == winners => user_coupon_ids(
                            conn,
                            Some(insert_ids),
                            coupon_id,
                            &winners,
                            first_id,
                            deadline,
                        )?,
                        // The stock runs out in this batch: written for too many; again with the
                        // stock read first.
                        Some(_) => {
                            #[cfg(test)]
                            super::tests::before_marker();
                            return Err(stock_runs_out());
                        }
                        None => insert_user_coupons(
                            conn,
                            Some(insert_ids),
                            (campaign_id, coupon_id),
                            &winners,
                            at,
                            Holding::Locks,
                            deadline,
                        )?,
                    };
                    if !winners.is_empty() {
                        let left = stock.max(0) - i32::try_from(winners.len()).unwrap_or(i32::MAX);
                        set_stock(conn, campaign_id, left)?;
                    }
                    let ids: HashMap<i64, i64> = winners.into_iter().zip(new_ids).collect();
                    Ok((decisions, ids, at, seen))
                });
            #[cfg(test)]
            super::tests::after_the_transaction(self);
            match attempt {
                // Facts of another database (the INSERT names a template or campaign missing
                // here) are stale facts too.
                // Only the last attempt's marker error itself sends the batch round again: a
                // failure of the runner after it (its ROLLBACK cut, the connection lost) is the
                // batch's answer.
                Err(e)
                    if (is_marker(&e, &stale_facts(campaign_id)) || names_missing_row(&e))
                        && refreshes < FACT_REFRESHES =>
                {
                    self.forget_facts(campaign_id);
                    refreshes += 1;
                }
                Err(e) if names_missing_row(&e) => return closed(stale_facts(campaign_id)),
                Err(e) if is_marker(&e, &holders_needed()) => {
                    read_holders = true;
                }
                Err(e) if is_marker(&e, &stock_runs_out()) => insert_first = false,
                Err(e) if !read_holders && e.is_duplicate() => {
                    lock(&self.repeat_askers).insert(campaign_id);
                    read_holders = true;
                    found.unknown = true;
                }
                // Below SERIALIZABLE the holders read is a snapshot that locks nothing: a user
                // was issued a coupon after it. Read again (each time for a new holder among
                // the batch's users, so at most once per user).
                Err(e) if e.is_duplicate() && late_holders < user_ids.len() => {
                    late_holders += 1;
                    found.unknown = true;
                }
                Err(refusal) => return closed(refusal),
                Ok(decided) => break (decided, coupon_id),
            }
        };

        if decisions.contains(&BatchDecision::SoldOut) {
            self.mark_sold_out(campaign_id, seen);
        }
        let issued = |user_id: i64| {
            ids.get(&user_id).map(|&id| IssuedCoupon {
                id,
                user_id,
                coupon_id,
                campaign_id,
                status: CouponStatus::Issued,
                issued_at: at,
                used_at: None,
                order_ref: None,
            })
        };
        // Past the batch's commit: never "nothing committed" (`Internal`) for a request.
        let missing =
            || Error::outcome_unknown(&Error::internal("a request the batch issued has no id"));
        Ok(user_ids
            .iter()
            .zip(decisions)
            .map(|(&user_id, decision)| match decision {
                BatchDecision::Invalid => Err(Error::InvalidId {
                    what: "user",
                    id: user_id,
                }),
                BatchDecision::Issue => issued(user_id).ok_or_else(missing),
                BatchDecision::Held(user_coupon_id) => Err(Error::AlreadyIssued {
                    user_id,
                    coupon_id,
                    user_coupon_id,
                }),
                BatchDecision::Repeated => match ids.get(&user_id) {
                    Some(&user_coupon_id) => Err(Error::AlreadyIssued {
                        user_id,
                        coupon_id,
                        user_coupon_id,
                    }),
                    None => Err(missing()),
                },
                BatchDecision::SoldOut | BatchDecision::Marked => {
                    Err(Error::SoldOut { campaign_id })
                }
            })
            .collect())
    }
}

/// What the batch transaction decided for one issue request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BatchDecision {
    Invalid,
    Issue,
    /// Already held before the batch: the held coupon's id.
    Held(i64),
    /// Issued earlier in the batch.
    Repeated,
    /// Refused by the stock: sets the sold-out mark.
    SoldOut,
    /// After a `SoldOut` in the batch: `issue` would answer from the mark.
    Marked,
}

/// The marker of a batch attempt that refused users the stock without knowing whether they
/// hold the coupon: the next attempt reads the holders first.
fn holders_needed() -> Error {
    Error::internal("holders needed")
}

/// The marker of a batch attempt that wrote coupons for more users than the stock serves: the
/// next attempt reads the stock first.
fn stock_runs_out() -> Error {
    Error::internal("the stock runs out in the batch")
}

/// The single calls' answers, in order, for a locked `stock` and the known `holders`; and the
/// users to issue to. `marks_stick`: a sold-out mark set by one call answers the next ones (the
/// issuer keeps its marks: no TTL, or a TTL above zero).
fn decide(
    user_ids: &[i64],
    holders: &HashMap<i64, i64>,
    stock: i32,
    marks_stick: bool,
) -> (Vec<BatchDecision>, Vec<i64>) {
    let mut left = stock.max(0);
    let mut winners: Vec<i64> = Vec::new();
    let mut issued: HashSet<i64> = HashSet::new();
    let mut marked = false;
    let decisions = user_ids
        .iter()
        .map(|&user_id| {
            if user_id <= 0 {
                BatchDecision::Invalid
            } else if marked {
                BatchDecision::Marked
            } else if let Some(&existing) = holders.get(&user_id) {
                BatchDecision::Held(existing)
            } else if issued.contains(&user_id) {
                BatchDecision::Repeated
            } else if left > 0 {
                left -= 1;
                issued.insert(user_id);
                winners.push(user_id);
                BatchDecision::Issue
            } else {
                marked = marks_stick;
                BatchDecision::SoldOut
            }
        })
        .collect();
    (decisions, winners)
}
