use std::cell::RefCell;

use diesel::prelude::*;
use rust_decimal::Decimal;

use super::cache::lock;
use super::types::{positive_quantity, Discount};
use super::CouponIssuer;
use crate::error::{Error, ServerError};

thread_local! {
    /// Armed by a test: the next "holders needed" refusal of a batch attempt is answered as the
    /// runner answers a body's failure on a Galera-guarded write whose savepoint is gone (the
    /// node aborted the transaction meanwhile): a deadlock, retried.
    static ABORT_WHEN_HOLDERS_NEEDED: RefCell<bool> = const { RefCell::new(false) };
    /// Run as the attempt after the aborted one begins (that one rolled back): another
    /// program's write. Moved to [`AT_THIS_ATTEMPT`] by the abort.
    static AT_NEXT_ATTEMPT: RefCell<Option<Box<dyn FnOnce()>>> = const { RefCell::new(None) };
    static AT_THIS_ATTEMPT: RefCell<Option<Box<dyn FnOnce()>>> = const { RefCell::new(None) };
}

/// Another call of an issuer, made from inside one of its calls (see [`after_the_transaction`]).
type IssuerCall = Box<dyn FnOnce(&CouponIssuer)>;

thread_local! {
    /// Armed by a test: run once as the next issue or batch of this thread has finished its
    /// transaction (committed, here), before it answers — another call of the same issuer.
    static AFTER_THE_TRANSACTION: RefCell<Option<IssuerCall>> = const { RefCell::new(None) };
}

/// The hook after an issue's or a batch's transaction, before the call answers.
pub(super) fn after_the_transaction(issuer: &CouponIssuer) {
    if let Some(call) = AFTER_THE_TRANSACTION.with(|armed| armed.borrow_mut().take()) {
        call(issuer);
    }
}

/// Another call of the issuer, on a connection of its own to `url`, made as the test's call
/// has committed the last coupon and before it answers: a zero read that is not stale, and
/// answered `SoldOut`.
fn sold_out_right_after_the_transaction(url: &str, campaign_id: i64, batch: bool) {
    let url = url.to_owned();
    AFTER_THE_TRANSACTION.with(|armed| {
        *armed.borrow_mut() = Some(Box::new(move |issuer: &CouponIssuer| {
            let Ok(mut other) = MysqlConnection::establish(&url) else {
                panic!("another connection");
            };
            let answer = if batch {
                match issuer.issue_many(&mut other, campaign_id, &[5]) {
                    Ok(mut answers) => answers.remove(0),
                    Err(e) => Err(e),
                }
            } else {
                issuer.issue(&mut other, 5, campaign_id)
            };
            assert!(matches!(answer, Err(Error::SoldOut { .. })), "{answer:?}");
        }));
    });
}

/// Once a call of the issuer has read the campaign sold out, the campaign is marked so — also
/// when the call that took the last coupon answers after it (a combined batch's COMMIT
/// answers after the next batch, which got the turn as that COMMIT was sent, has read the
/// zero): a holder's later issue answers `SoldOut` from memory, as the module promises, as it
/// does after single calls made one after another. Before the fix the call that took the last
/// coupon noted its sighting only after its COMMIT answered, which cleared the newer mark (or
/// kept it from being set): the holder was answered `AlreadyIssued` by a round trip.
#[test]
fn a_sold_out_read_after_the_last_coupon_was_taken_stays_marked() {
    for batch in [false, true] {
        let name = format!("unit_coupon_late_sighting_{batch}");
        let (url, mut conn) = crate::util::test_database(&name);
        let issuer = CouponIssuer::new().with_sold_out_ttl(std::time::Duration::MAX);
        let campaign_id = open_campaign(&mut conn, &issuer, &name, 2).id;
        if let Err(e) = issuer.issue(&mut conn, 9, campaign_id) {
            panic!("a first issue: {e}");
        }
        sold_out_right_after_the_transaction(&url, campaign_id, batch);
        let last = if batch {
            issuer
                .issue_many(&mut conn, campaign_id, &[4])
                .map(|mut answers| answers.remove(0))
        } else {
            Ok(issuer.issue(&mut conn, 4, campaign_id))
        };
        assert!(matches!(last, Ok(Ok(_))), "batch {batch}: {last:?}");
        assert!(
            issuer.known_sold_out(campaign_id),
            "batch {batch}: the sold-out read was forgotten"
        );
        let holder = issuer.issue(&mut conn, 9, campaign_id);
        assert!(
            matches!(holder, Err(Error::SoldOut { .. })),
            "batch {batch}: {holder:?}"
        );
        assert_eq!(campaign_rows(&mut conn, campaign_id), (0, vec![4, 9]));
    }
}

/// The hook where a batch attempt finds it needs its users' holders.
pub(super) fn holders_needed() -> Option<Error> {
    let armed = ABORT_WHEN_HOLDERS_NEEDED.with(|armed| armed.replace(false));
    if armed {
        let write = AT_NEXT_ATTEMPT.with(|next| next.borrow_mut().take());
        AT_THIS_ATTEMPT.with(|this| *this.borrow_mut() = write);
    }
    armed.then(|| {
        Error::Server(ServerError::new(diesel::result::Error::DatabaseError(
            diesel::result::DatabaseErrorKind::SerializationFailure,
            Box::new(
                "Deadlock found when trying to get lock; try restarting transaction".to_owned(),
            ),
        )))
    })
}

thread_local! {
    /// Armed by a test: the next single issue's attempt fails after its stock UPDATE with a
    /// read-only server's refusal (as a COMMIT refused by `read_only` fails).
    static READ_ONLY_AFTER_THE_STOCK: RefCell<bool> = const { RefCell::new(false) };
    /// Armed by a test: the next single issue's attempt is aborted after its stock UPDATE as
    /// the runner answers a Galera-guarded body whose savepoint is gone (a deadlock, retried);
    /// [`AT_NEXT_ATTEMPT`] runs as the next attempt begins.
    static ABORT_AFTER_THE_STOCK: RefCell<bool> = const { RefCell::new(false) };
}

/// The hook after a single issue's stock UPDATE.
pub(super) fn after_the_stock_update() -> Option<Error> {
    if ABORT_AFTER_THE_STOCK.with(|armed| armed.replace(false)) {
        let write = AT_NEXT_ATTEMPT.with(|next| next.borrow_mut().take());
        AT_THIS_ATTEMPT.with(|this| *this.borrow_mut() = write);
        return Some(Error::Server(ServerError::new(
            diesel::result::Error::DatabaseError(
                diesel::result::DatabaseErrorKind::SerializationFailure,
                Box::new(
                    "Deadlock found when trying to get lock; try restarting transaction".to_owned(),
                ),
            ),
        )));
    }
    READ_ONLY_AFTER_THE_STOCK
        .with(|armed| armed.replace(false))
        .then(|| {
            Error::Server(ServerError::new(diesel::result::Error::DatabaseError(
                diesel::result::DatabaseErrorKind::Unknown,
                Box::new(
                    "The MariaDB server is running with the --read-only option so it cannot \
                     execute this statement"
                        .to_owned(),
                ),
            )))
        })
}

/// A single issue refused by a read-only server after it read the stock (its COMMIT refused)
/// counts as a sighting of that stock, as any other failure after the read does: an older zero
/// read of the campaign must not mark it sold out afterwards. Before, the arm that answers a
/// holder on a read-only server skipped it.
#[test]
fn an_issue_refused_as_read_only_after_reading_the_stock_is_a_sighting() {
    let (_url, mut conn) = crate::util::test_database("unit_coupon_read_only_sighting");
    let issuer = CouponIssuer::new().with_sold_out_ttl(std::time::Duration::MAX);
    let campaign = open_campaign(&mut conn, &issuer, "sighting", 5);
    // The campaign's facts cached (the next issue reads nothing before its attempt).
    if let Err(e) = issuer.issue(&mut conn, 2, campaign.id) {
        panic!("a first issue: {e}");
    }
    // A zero read of another call, taken before the issue read the stock.
    let before = issuer.sightings(campaign.id);
    READ_ONLY_AFTER_THE_STOCK.with(|armed| *armed.borrow_mut() = true);
    let answer = issuer.issue(&mut conn, 1, campaign.id);
    assert!(
        matches!(&answer, Err(e) if e.server_kind() == Some(crate::ServerErrorKind::ReadOnly)),
        "{answer:?}"
    );
    issuer.mark_sold_out(campaign.id, before);
    assert!(
        !issuer.known_sold_out(campaign.id),
        "a stale zero marked the campaign sold out"
    );
    // The refused attempt was rolled back: user 2's coupon only, one off the stock.
    assert_eq!(campaign_rows(&mut conn, campaign.id), (4, vec![2]));
}

/// A campaign of 2 whose facts `issuer` has cached and 1 coupon left (user 9's issued), the
/// sightings taken then (a zero read of another call, before the test's call reads the stock),
/// and a holder into which [`AT_NEXT_ATTEMPT`] — armed here — puts another program's
/// connection that locks the stock row and keeps it: every attempt after the aborted one is
/// refused there.
fn stock_row_locked_at_the_next_attempt(
    url: &str,
    conn: &mut MysqlConnection,
    issuer: &CouponIssuer,
    name: &str,
) -> (i64, super::cache::Sightings, StockHolder) {
    let campaign_id = open_campaign(conn, issuer, name, 2).id;
    if let Err(e) = issuer.issue(conn, 9, campaign_id) {
        panic!("a first issue: {e}");
    }
    let before = issuer.sightings(campaign_id);
    let holder = StockHolder::default();
    let (other_url, kept) = (url.to_owned(), holder.0.clone());
    AT_NEXT_ATTEMPT.with(|next| {
        *next.borrow_mut() = Some(Box::new(move || {
            let Ok(mut other) = MysqlConnection::establish(&other_url) else {
                panic!("another program");
            };
            let locked = diesel::connection::SimpleConnection::batch_execute(
                &mut other,
                &format!("BEGIN; SELECT id FROM fcfs_coupon WHERE id = {campaign_id} FOR UPDATE"),
            );
            assert!(locked.is_ok(), "the other program's lock: {locked:?}");
            *lock(&kept) = Some(other);
        }));
    });
    (campaign_id, before, holder)
}

/// Another program's connection holding a stock row (see
/// [`stock_row_locked_at_the_next_attempt`]); its transaction rolled back when dropped.
#[derive(Default)]
struct StockHolder(std::sync::Arc<std::sync::Mutex<Option<MysqlConnection>>>);

impl Drop for StockHolder {
    fn drop(&mut self) {
        if let Some(mut other) = lock(&self.0).take() {
            let ended = diesel::connection::SimpleConnection::batch_execute(&mut other, "ROLLBACK");
            assert!(ended.is_ok() || std::thread::panicking(), "{ended:?}");
        }
    }
}

/// A policy of 4 attempts within 500 ms.
fn four_attempts() -> crate::TxnPolicy {
    crate::TxnPolicy::default().with_retry(crate::RetryPolicy {
        max_attempts: 4,
        deadline: std::time::Duration::from_millis(500),
        ..crate::RetryPolicy::default()
    })
}

/// A batch attempt that saw the stock above zero and was then retried (on Galera: its refusal
/// turned into a deadlock) counts as a sighting of that stock even when the call's last attempt
/// saw nothing (here: refused at the stock row, which another program holds): a zero read of
/// another call taken before must not mark the campaign sold out afterwards. Before the fix
/// each attempt forgot the one before, and the stale zero marked it, with a coupon in stock.
#[test]
fn a_retried_batch_attempt_that_saw_stock_is_a_sighting() {
    let (url, mut conn) = crate::util::test_database("unit_coupon_retried_sighting");
    let issuer =
        CouponIssuer::with_policy(four_attempts()).with_sold_out_ttl(std::time::Duration::MAX);
    // Attempt 1 sees stock 1 for users 5 and 6, needs their holders and is aborted; before
    // attempt 2 another program locks the stock row.
    let (campaign_id, before, holder) =
        stock_row_locked_at_the_next_attempt(&url, &mut conn, &issuer, "retried sighting");
    ABORT_WHEN_HOLDERS_NEEDED.with(|armed| *armed.borrow_mut() = true);
    let answer = issuer.issue_many(&mut conn, campaign_id, &[5, 6]);
    let contended = |e: &Error| matches!(e, Error::Contended { .. });
    let refused = match &answer {
        Err(e) => contended(e),
        Ok(answers) => answers.iter().all(|a| a.as_ref().is_err_and(contended)),
    };
    assert!(refused, "{answer:?}");
    issuer.mark_sold_out(campaign_id, before);
    let marked = issuer.known_sold_out(campaign_id);
    drop(holder);
    assert!(!marked, "a stale zero marked the campaign sold out");
    // Nothing of the batch was applied: user 9's coupon only, one left.
    assert_eq!(campaign_rows(&mut conn, campaign_id), (1, vec![9]));
}

/// The single issue's twin of [`a_retried_batch_attempt_that_saw_stock_is_a_sighting`]: an
/// issue attempt that saw the stock above zero and was then retried counts as a sighting even
/// when the call's last attempt saw nothing (refused at the stock row, which another program
/// holds). Before the fix a stale zero read of another call marked the campaign sold out.
#[test]
fn a_retried_issue_attempt_that_saw_stock_is_a_sighting() {
    let (url, mut conn) = crate::util::test_database("unit_coupon_retried_issue_sighting");
    let issuer =
        CouponIssuer::with_policy(four_attempts()).with_sold_out_ttl(std::time::Duration::MAX);
    let (campaign_id, before, holder) =
        stock_row_locked_at_the_next_attempt(&url, &mut conn, &issuer, "retried issue sighting");
    ABORT_AFTER_THE_STOCK.with(|armed| *armed.borrow_mut() = true);
    let answer = issuer.issue(&mut conn, 5, campaign_id);
    issuer.mark_sold_out(campaign_id, before);
    let marked = issuer.known_sold_out(campaign_id);
    drop(holder);
    assert!(matches!(answer, Err(Error::Contended { .. })), "{answer:?}");
    assert!(!marked, "a stale zero marked the campaign sold out");
    assert_eq!(campaign_rows(&mut conn, campaign_id), (1, vec![9]));
}

/// A campaign's stock left, and the users holding its coupons (in user order).
fn campaign_rows(conn: &mut MysqlConnection, campaign_id: i64) -> (i32, Vec<i64>) {
    use crate::schema::{fcfs_coupon, user_coupon};
    let Ok(stock) = fcfs_coupon::table
        .find(campaign_id)
        .select(fcfs_coupon::stock_quantity)
        .first::<i32>(conn)
    else {
        panic!("the campaign's stock");
    };
    let Ok(users) = user_coupon::table
        .filter(user_coupon::fcfs_coupon_id.eq(campaign_id))
        .select(user_coupon::user_id)
        .order(user_coupon::user_id)
        .load::<i64>(conn)
    else {
        panic!("the campaign's coupons");
    };
    (stock, users)
}

/// A campaign of `quantity` coupons of a new fixed-discount template `name`, open now.
fn open_campaign(
    conn: &mut MysqlConnection,
    issuer: &CouponIssuer,
    name: &str,
    quantity: u32,
) -> crate::Campaign {
    let now = chrono::Utc::now().naive_utc();
    let Ok(coupon) = issuer.create_coupon(
        conn,
        &crate::NewCoupon {
            name,
            discount: Discount::Fixed(Decimal::ONE),
            valid_from: now - chrono::Duration::hours(1),
            valid_until: now + chrono::Duration::days(7),
        },
    ) else {
        panic!("a coupon template");
    };
    let Ok(campaign) = issuer.create_campaign(
        conn,
        &crate::NewCampaign {
            coupon_id: coupon.id,
            quantity,
            issue_starts_at: now - chrono::Duration::minutes(1),
            issue_ends_at: now + chrono::Duration::hours(1),
        },
    ) else {
        panic!("a campaign");
    };
    campaign
}

/// Something a test runs from inside a call.
type Write = Box<dyn FnOnce()>;

thread_local! {
    /// Armed by a test: run as the `n`-th attempt of this thread's next calls begins (counted
    /// down by every attempt, single issue or batch).
    static AT_ATTEMPT: RefCell<Option<(u32, Write)>> = const { RefCell::new(None) };
}

/// The hook where a batch attempt begins.
pub(super) fn attempt_begins() {
    if let Some(write) = AT_THIS_ATTEMPT.with(|this| this.borrow_mut().take()) {
        write();
    }
    let due = AT_ATTEMPT.with(|armed| {
        let mut armed = armed.borrow_mut();
        match armed.as_mut() {
            Some((1, _)) => armed.take().map(|(_, run)| run),
            Some((n, _)) => {
                *n -= 1;
                None
            }
            None => None,
        }
    });
    if let Some(run) = due {
        run();
    }
}

/// A batch whose INSERT met a holder among its users and whose connection was then lost
/// before it could read which user holds the coupon (a node failure: it applied nothing)
/// answers every user not found holding `OutcomeUnknown` — some user holds it, maybe from an
/// earlier call of the same request — with the node failure behind it, so that a router's
/// combiner runs those requests again, as their single calls run again after the failure.
/// Before the fix the node failure was not kept: a routed combiner answered them
/// `OutcomeUnknown`.
#[test]
fn a_batch_that_lost_its_connection_before_reading_its_holders_keeps_the_node_failure() {
    let name = "unit_coupon_unknown_holders_lost";
    let (url, mut conn) = crate::util::test_database(name);
    let issuer = CouponIssuer::new();
    let campaign_id = open_campaign(&mut conn, &issuer, name, 10).id;
    if let Err(e) = issuer.issue(&mut conn, 2, campaign_id) {
        panic!("a first issue: {e}");
    }
    let (mut batch_conn, id) = connection_with_id(&url);
    // The first attempt's INSERT is refused by the unique index (user 2 holds the coupon);
    // the second, which reads the holders first, loses its connection as it begins.
    AT_ATTEMPT.with(|armed| {
        *armed.borrow_mut() = Some((2, Box::new(move || kill_connection(&url, id))));
    });
    let answers = match issuer.issue_many(&mut batch_conn, campaign_id, &[1, 2, 3]) {
        Ok(answers) => answers,
        Err(e) => panic!("answered per user: {e:?}"),
    };
    AT_ATTEMPT.with(|armed| armed.borrow_mut().take());
    for answer in &answers {
        match answer {
            Err(unknown) if unknown.is_outcome_unknown() => assert!(
                unknown.node_failure_behind().is_some(),
                "the node failure is kept: {unknown:?}"
            ),
            other => panic!("OutcomeUnknown for every user not found holding: {other:?}"),
        }
    }
    // Nothing was applied by the batch.
    let Ok(held) =
        diesel::sql_query("SELECT COUNT(*) AS n FROM user_coupon").get_result::<Count>(&mut conn)
    else {
        panic!("count");
    };
    assert_eq!(held.n, 1, "only the first issue's coupon");
}

#[derive(diesel::QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

/// An attempt that set a flag for the batch's decision and was then retried by the runner (on
/// Galera: a body's refusal turned into a deadlock because the node had aborted the
/// transaction) must not pass the flag on to the next attempt: here the next attempt meets a
/// holder (a duplicate key), and the batch must take it as one — the campaign's later batches
/// read their holders first — not as the first attempt's "holders needed". Before the fix the
/// flag stayed set and the duplicate was never recorded.
#[test]
fn a_retried_batch_attempt_does_not_inherit_the_flags_of_the_one_before() {
    let (url, mut conn) = crate::util::test_database("unit_coupon_attempt_flags");
    let issuer = CouponIssuer::new();
    let campaign = open_campaign(&mut conn, &issuer, "flags", 1);
    let (campaign_id, coupon_id) = (campaign.id, campaign.coupon_id);
    // Stock 1, users 1 and 2: the first attempt refuses user 2 for the stock without knowing
    // whether it holds the coupon ("holders needed"), and is aborted. Before the next attempt
    // another program issues user 1 a coupon.
    ABORT_WHEN_HOLDERS_NEEDED.with(|armed| *armed.borrow_mut() = true);
    let other_url = url.clone();
    AT_NEXT_ATTEMPT.with(|next| {
        *next.borrow_mut() = Some(Box::new(move || {
            let Ok(mut other) = MysqlConnection::establish(&other_url) else {
                panic!("another program");
            };
            let inserted = diesel::insert_into(crate::schema::user_coupon::table)
                .values((
                    crate::schema::user_coupon::user_id.eq(1_i64),
                    crate::schema::user_coupon::coupon_id.eq(coupon_id),
                    crate::schema::user_coupon::fcfs_coupon_id.eq(campaign_id),
                ))
                .execute(&mut other);
            assert_eq!(inserted.ok(), Some(1), "the other program's coupon");
        }));
    });
    let Ok(answers) = issuer.issue_many(&mut conn, campaign_id, &[1, 2]) else {
        panic!("answered per request");
    };
    assert!(
        matches!(answers[0], Err(Error::AlreadyIssued { user_id: 1, .. })),
        "{answers:?}"
    );
    assert!(
        matches!(&answers[1], Ok(issued) if issued.user_id == 2),
        "{answers:?}"
    );
    assert!(
        lock(&issuer.repeat_askers).contains(&campaign_id),
        "the batch met a holder: the campaign's batches read their holders first"
    );
    // User 1's coupon is the other program's (it took no stock); user 2's the batch's.
    assert_eq!(campaign_rows(&mut conn, campaign_id), (0, vec![1, 2]));
}

#[test]
fn discounts() {
    let d = Decimal::new;
    assert_eq!(Discount::Fixed(d(5, 0)).apply_to(d(3, 0)), d(3, 0));
    assert_eq!(Discount::Fixed(d(5, 0)).apply_to(d(30, 0)), d(5, 0));
    let pct = Discount::Percent {
        percent: d(15, 0),
        cap: Some(d(10, 0)),
    };
    assert_eq!(pct.apply_to(d(40, 0)), d(6, 0));
    assert_eq!(pct.apply_to(d(100, 0)), d(10, 0));
    let odd = Discount::Percent {
        percent: d(333, 1),
        cap: None,
    };
    assert_eq!(odd.apply_to(d(1, 0)), d(3330, 4));
    // Rounded down exactly, also for totals of more decimals than 28 digits keep through a
    // product (before: rounded to 28 digits first, up across the 4th place: 0.0001).
    let total = Decimal::from_i128_with_scale(33_333_333_333_333_333_333_333_333, 24);
    let thirty = Discount::Percent {
        percent: d(30, 0),
        cap: None,
    };
    assert_eq!(thirty.apply_to(total), d(99_999, 4));
    let tiny = Decimal::from_i128_with_scale(99_999_999_999_999_999_999_999_999, 28);
    let one = Discount::Percent {
        percent: d(1, 0),
        cap: None,
    };
    assert_eq!(one.apply_to(tiny), d(0, 4));
    assert_eq!(thirty.apply_to(d(3_333_399, 7)), d(1000, 4));
    assert!(Discount::Percent {
        percent: d(101, 0),
        cap: None
    }
    .validate()
    .is_err());
    assert!(Discount::Fixed(d(0, 0)).validate().is_err());
}

/// Finding 10e: `apply_to` never panics, whatever the discount and total, and the discount
/// stays between zero and the total.
#[test]
fn finding_10e_apply_to_never_panics() {
    let extremes = [
        Decimal::MAX,
        Decimal::MIN,
        Decimal::ZERO,
        Decimal::ONE,
        Decimal::NEGATIVE_ONE,
        Decimal::ONE_HUNDRED,
        Decimal::new(1, 28),
        Decimal::new(-1, 28),
        Decimal::new(999_999_999, 4),
        Decimal::MAX / Decimal::ONE_HUNDRED,
        Decimal::new(333_333, 4),
    ];
    let mut discounts = Vec::new();
    for &value in &extremes {
        discounts.push(Discount::Fixed(value));
        discounts.push(Discount::Percent {
            percent: value,
            cap: None,
        });
        for &cap in &extremes {
            discounts.push(Discount::Percent {
                percent: value,
                cap: Some(cap),
            });
        }
    }
    for discount in &discounts {
        for &total in &extremes {
            let off = discount.apply_to(total);
            assert!(
                off >= Decimal::ZERO && off <= total.max(Decimal::ZERO),
                "{discount:?} on {total}: {off}"
            );
        }
    }
    let full = Discount::Percent {
        percent: Decimal::ONE_HUNDRED,
        cap: None,
    };
    assert_eq!(full.apply_to(Decimal::MAX), Decimal::MAX);
    let half = Discount::Percent {
        percent: Decimal::new(50, 0),
        cap: None,
    };
    let off = half.apply_to(Decimal::MAX);
    assert!(
        off > Decimal::MAX / Decimal::new(3, 0) && off < Decimal::MAX,
        "{off}"
    );
}

#[test]
fn quantity_bounds() {
    assert!(positive_quantity("quantity", 0).is_err());
    assert!(positive_quantity("quantity", u32::MAX).is_err());
    assert_eq!(positive_quantity("quantity", 500).ok(), Some(500));
}

/// A sold-out mark dates from the read of the zero stock (the sightings taken before it), not
/// from when the call got to set it: a call slower than the TTL after its read (a COMMIT held
/// back) leaves no mark that outlives the TTL of the read. Before the fix the mark was dated
/// when it was set, so a restock made elsewhere after the read could go unseen for the TTL
/// plus the call's remaining time.
#[test]
fn a_sold_out_mark_dates_from_the_read_of_the_zero() {
    use std::time::Duration;
    let short = super::CouponIssuer::new().with_sold_out_ttl(Duration::from_millis(200));
    let seen = short.sightings(1);
    // The rest of the call took longer than the TTL.
    std::thread::sleep(Duration::from_millis(250));
    short.mark_sold_out(1, seen);
    assert!(!short.known_sold_out(1), "a mark older than its TTL");
    let long = super::CouponIssuer::new().with_sold_out_ttl(Duration::from_secs(600));
    let seen = long.sightings(1);
    long.mark_sold_out(1, seen);
    assert!(long.known_sold_out(1), "a fresh mark");
}

thread_local! {
    /// Armed by a test: run once as the next attempt of this thread returns a marker error (a
    /// flag for the call's next round: stale facts, holders needed, the stock runs out).
    static BEFORE_MARKER: RefCell<Option<Write>> = const { RefCell::new(None) };
}

/// The hook where an attempt is about to return a marker error.
pub(super) fn before_marker() {
    if let Some(run) = BEFORE_MARKER.with(|armed| armed.borrow_mut().take()) {
        run();
    }
}

/// An attempt that returned a marker error (stale facts, holders needed, the stock runs out)
/// whose ROLLBACK then failed, past the call's deadline (as when the watchdog cuts it), is
/// answered by that failure: the connection is broken, nothing was applied — the call does
/// not go round again to answer `Timeout`, which would let the caller keep a broken
/// connection. Before the fix each flag sent the call round again on any error.
#[test]
fn an_attempt_whose_rollback_failed_after_its_marker_answers_the_broken_connection() {
    use crate::Deadline;
    use std::time::{Duration, Instant};
    for case in [
        "issue stale",
        "batch stale",
        "holders needed",
        "stock runs out",
    ] {
        let name = format!("unit_coupon_marker_{}", case.replace(' ', "_"));
        let (url, mut conn) = crate::util::test_database(&name);
        let issuer = CouponIssuer::new();
        let campaign_id = open_campaign(&mut conn, &issuer, &name, 2).id;
        // One coupon to user 9 (the facts are cached), and user 9 asked again by a batch: the
        // campaign's batches read their holders first from then on.
        if let Err(e) = issuer.issue(&mut conn, 9, campaign_id) {
            panic!("{case}: a first issue: {e}");
        }
        if case == "stock runs out" {
            let again = issuer.issue_many(&mut conn, campaign_id, &[9]);
            assert!(
                matches!(again.as_deref(), Ok([Err(Error::AlreadyIssued { .. })])),
                "{case}: {again:?}"
            );
        }
        if case.ends_with("stale") {
            // The window changed by SQL: the cached facts are stale.
            let Ok(1) = diesel::sql_query(
                "UPDATE fcfs_coupon SET issue_ends_at = issue_ends_at + INTERVAL 1 MINUTE \
                 WHERE id = ?",
            )
            .bind::<diesel::sql_types::BigInt, _>(campaign_id)
            .execute(&mut conn) else {
                panic!("{case}: the window moved");
            };
        }
        let (mut call_conn, id) = connection_with_id(&url);
        let budget = Duration::from_millis(400);
        let deadline = Deadline::after(budget);
        let past = Instant::now() + budget + Duration::from_millis(50);
        let killer_url = url.clone();
        BEFORE_MARKER.with(|armed| {
            *armed.borrow_mut() = Some(Box::new(move || {
                std::thread::sleep(past.saturating_duration_since(Instant::now()));
                kill_connection(&killer_url, id);
            }));
        });
        let answer = if case == "issue stale" {
            issuer
                .issue_by(&mut call_conn, 1, campaign_id, deadline)
                .map(|_| ())
        } else {
            issuer
                .issue_many_by(&mut call_conn, campaign_id, &[1, 2, 3], deadline)
                .map(|_| ())
        };
        let hooked = BEFORE_MARKER
            .with(|armed| armed.borrow_mut().take())
            .is_none();
        assert!(hooked, "{case}: the attempt returned no marker");
        assert!(
            matches!(answer, Err(Error::ConnectionBroken { .. })),
            "{case}: {answer:?}"
        );
        assert_eq!(
            campaign_rows(&mut conn, campaign_id),
            (1, vec![9]),
            "{case}: nothing applied"
        );
    }
}

/// A new connection to `url` and its server-side id.
fn connection_with_id(url: &str) -> (MysqlConnection, i64) {
    let Ok(mut conn) = MysqlConnection::establish(url) else {
        panic!("connect");
    };
    let Ok(id) = diesel::select(diesel::dsl::sql::<diesel::sql_types::BigInt>(
        "CONNECTION_ID()",
    ))
    .get_result::<i64>(&mut conn) else {
        panic!("the connection's id");
    };
    (conn, id)
}

/// `KILL CONNECTION id`, sent from a connection of its own to `url`.
fn kill_connection(url: &str, id: i64) {
    let Ok(mut killer) = MysqlConnection::establish(url) else {
        panic!("connect");
    };
    if let Err(e) = diesel::connection::SimpleConnection::batch_execute(
        &mut killer,
        &format!("KILL CONNECTION {id}"),
    ) {
        panic!("kill: {e}");
    }
}
