//! Quickstart: charge, deduct, refund, transfer, a checkout with a hold (hold -> capture, and a
//! cancelled order released), and issue, redeem, restore and restock coupons against a
//! throwaway MariaDB (or `DATABASE_URL`), printing what happened.
//!
//! `cargo run --example quickstart`

use chrono::{Duration, Utc};
use diesel::{Connection, MysqlConnection};
use lockstock::{BalanceLedger, CouponIssuer, Discount, Error, NewCampaign, NewCoupon};
use rust_decimal::Decimal;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = lockstock_testkit::sandbox::database_url("lockstock_quickstart")?;
    let mut conn = MysqlConnection::establish(&url)?;
    lockstock::run_migrations(&mut conn)?;
    let run = Utc::now().timestamp_micros();

    let ledger = BalanceLedger::new();
    let alice = 1;
    let bob = 2;
    let topup = ledger.charge(
        &mut conn,
        alice,
        Decimal::new(10_000, 0),
        &format!("topup-{run}"),
    )?;
    println!(
        "charge   alice +10000      -> entry {} balance {}",
        topup.id, topup.balance_after
    );
    let (price, order_key) = (Decimal::new(3_500, 0), format!("order-{run}"));
    let order = ledger.deduct(&mut conn, alice, price, &order_key)?;
    println!(
        "deduct   alice -3500       -> entry {} balance {}",
        order.id, order.balance_after
    );
    let again = ledger.deduct(&mut conn, alice, price, &order_key)?;
    println!(
        "retry    same key          -> entry {} (the same entry: nothing applied twice)",
        again.id
    );
    match ledger.deduct(
        &mut conn,
        alice,
        Decimal::new(1_000_000, 0),
        &format!("big-{run}"),
    ) {
        Err(Error::InsufficientBalance {
            available,
            requested,
            ..
        }) => {
            println!("deduct   alice -{requested}  -> refused: only {available} available, nothing written")
        }
        other => println!("deduct   alice -1000000    -> unexpected {other:?}"),
    }
    let refund = ledger.refund(
        &mut conn,
        order.id,
        Decimal::new(500, 0),
        &format!("refund-{run}"),
    )?;
    println!(
        "refund   +500 of {}      -> entry {} balance {}",
        order.id, refund.id, refund.balance_after
    );
    let gift = ledger.transfer(
        &mut conn,
        alice,
        bob,
        Decimal::new(1_000, 0),
        &format!("gift-{run}"),
    )?;
    println!(
        "transfer alice -> bob 1000 -> alice {} bob {}",
        gift.debit.balance_after, gift.credit.balance_after
    );
    // Checkout: reserve the order's points, capture what the payment finally charged.
    let expires_at = Utc::now().naive_utc() + Duration::minutes(15);
    let hold = ledger.hold(
        &mut conn,
        alice,
        Decimal::new(2_000, 0),
        &format!("checkout-{run}"),
        expires_at,
    )?;
    let held = ledger.balance(&mut conn, alice)?;
    println!(
        "hold     alice 2000        -> hold {}: posted {} held {} available {}",
        hold.id, held.balance, held.held, held.available
    );
    let paid = ledger.capture(
        &mut conn,
        hold.id,
        Decimal::new(1_800, 0),
        &format!("paid-{run}"),
    )?;
    println!(
        "capture  1800 of hold {}  -> entry {} balance {} (the other 200 released)",
        hold.id, paid.id, paid.balance_after
    );
    // A second order is cancelled before payment: its hold is released, nothing posted.
    let cancelled = ledger.hold(
        &mut conn,
        alice,
        Decimal::new(500, 0),
        &format!("checkout-2-{run}"),
        expires_at,
    )?;
    ledger.release(&mut conn, cancelled.id, &format!("cancel-{run}"))?;
    let after = ledger.balance(&mut conn, alice)?;
    println!(
        "release  hold {} (cancelled) -> posted {} held {} available {}",
        cancelled.id, after.balance, after.held, after.available
    );
    for user in [alice, bob] {
        let report = ledger.audit(&mut conn, user)?;
        println!(
            "audit    user {user}: balance {} = journal sum {} over {} entries",
            report.balance, report.journal_sum, report.entries
        );
    }

    let issuer = CouponIssuer::new();
    let now = Utc::now().naive_utc();
    let coupon = issuer.create_coupon(
        &mut conn,
        &NewCoupon {
            name: "10% off, at most 2000",
            discount: Discount::Percent {
                percent: Decimal::new(10, 0),
                cap: Some(Decimal::new(2_000, 0)),
            },
            valid_from: now - Duration::minutes(1),
            valid_until: now + Duration::days(30),
        },
    )?;
    let campaign = issuer.create_campaign(
        &mut conn,
        &NewCampaign {
            coupon_id: coupon.id,
            quantity: 1,
            issue_starts_at: now - Duration::minutes(1),
            issue_ends_at: now + Duration::hours(1),
        },
    )?;
    let issued = issuer.issue(&mut conn, alice, campaign.id)?;
    println!(
        "issue    alice             -> coupon {} ({} left)",
        issued.id,
        issuer.remaining(&mut conn, campaign.id)?
    );
    match issuer.issue(&mut conn, bob, campaign.id) {
        Err(Error::SoldOut { .. }) => println!("issue    bob               -> sold out"),
        other => println!("issue    bob               -> unexpected {other:?}"),
    }
    let used = issuer.redeem(&mut conn, issued.id, &format!("order-{run}"))?;
    println!(
        "redeem   coupon {} on {}  -> {:?}, takes {} off a 30000 order",
        used.id,
        used.order_ref.as_deref().unwrap_or_default(),
        used.status,
        coupon.discount.apply_to(Decimal::new(30_000, 0))
    );
    // The order is cancelled: only the order that used the coupon can give it back, so a
    // repeated cancel never frees a later order's coupon.
    let back = issuer.restore(&mut conn, issued.id, &format!("order-{run}"))?;
    println!(
        "restore  coupon {} (order cancelled) -> {:?}",
        back.id, back.status
    );
    let key = format!("restock-{run}");
    let more = issuer.restock(&mut conn, campaign.id, 10, &key)?;
    let again = issuer.restock(&mut conn, campaign.id, 10, &key)?;
    println!(
        "restock  +10, retried with the same key -> {} left, then {} (applied once)",
        more.stock_quantity, again.stock_quantity
    );
    match issuer.issue(&mut conn, bob, campaign.id) {
        Ok(c) => println!("issue    bob               -> coupon {}", c.id),
        other => println!("issue    bob               -> unexpected {other:?}"),
    }
    Ok(())
}
