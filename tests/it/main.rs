//! lockstock's integration tests against a real server, as one test binary with a module per
//! component (one binary links diesel and the client library once, and its tests run in
//! parallel threads on one shared throwaway server; every test uses its own database).
//! The shared tooling lives in `lockstock-testkit` (fixtures, rng, workload).
//!
//! `cargo test --test it ledger::` runs one component.

mod combine;
mod coupon;
mod faults;
mod foundation;
mod galera;
mod galera_router;
mod holds;
mod ledger;
mod model;
mod processes;
mod review_coupon;
mod review_ledger;
mod review_runner;
mod silent;
