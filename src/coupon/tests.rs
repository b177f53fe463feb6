use super::types::{positive_quantity, Discount};
use rust_decimal::Decimal;

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
