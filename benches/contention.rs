//! Throughput on one hot row under contention (criterion).
//!
//! Groups:
//! * `hot_coupon` / `hot_account`: strategies {seed, seed_lib, wait, cond, combining} (see
//!   `lockstock_testkit::strategies`) × clients {1, 16, 64, 256}. One iteration = a fresh
//!   campaign (or account), `clients` threads with a connection each (combining: sharing a
//!   combiner over a pool) doing a fixed number of requests; the measured time is the wall
//!   time of those requests only. The invariants are checked from the database after every
//!   iteration (panics on a violation).
//! * `uncontended`: one client, sequential: `CouponIssuer::issue` and `BalanceLedger::deduct`
//!   against hand-written Diesel transactions with the same statements.
//!
//! `cargo bench --bench contention` runs the full matrix (a few minutes on 2 cores). Under
//! `cargo test --all-targets` (no `--bench` argument) criterion runs every routine once; a tiny
//! configuration keeps that to a few seconds.

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use lockstock_testkit::strategies::{CellConfig, Domain, Harness, Single, Strategy, Uncontended};

struct Plan {
    clients: &'static [usize],
    strategies: &'static [Strategy],
    /// Room for the `uncontended` group's issues.
    single_capacity: u64,
    smoke: bool,
}

impl Plan {
    fn bench() -> Self {
        Self {
            clients: &[1, 16, 64, 256],
            strategies: &Strategy::ALL,
            single_capacity: 2_000_000,
            smoke: false,
        }
    }

    /// `cargo test --all-targets`: every routine runs once; keep it small.
    fn smoke() -> Self {
        Self {
            clients: &[1, 4],
            strategies: &Strategy::ALL,
            single_capacity: 1_000,
            smoke: true,
        }
    }

    /// Requests per iteration: enough for a steady state, scaled to each strategy's speed
    /// (per-request NOWAIT at 256 clients manages a few hundred per second).
    fn requests(&self, strategy: Strategy, clients: usize) -> u64 {
        let clients = clients as u64;
        if self.smoke {
            return 8;
        }
        match strategy {
            Strategy::Seed | Strategy::SeedLib => (clients).max(256),
            Strategy::Wait | Strategy::Cond => (clients * 8).max(512),
            Strategy::Combining => (clients * 32).max(256),
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let benchmarking = args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--test");
    let plan = if benchmarking {
        Plan::bench()
    } else {
        Plan::smoke()
    };
    let database = if plan.smoke {
        "lockstock_contention_smoke"
    } else {
        "lockstock_contention_bench"
    };
    let mut harness = Harness::new(database).expect("create the benchmark database");
    let mut criterion = Criterion::default()
        .configure_from_args()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));

    for domain in Domain::ALL {
        let name = match domain {
            Domain::Coupon => "hot_coupon",
            Domain::Ledger => "hot_account",
        };
        let mut group = criterion.benchmark_group(name);
        group.sampling_mode(SamplingMode::Flat);
        for &clients in plan.clients {
            for &strategy in plan.strategies {
                let requests = plan.requests(strategy, clients);
                group.throughput(Throughput::Elements(requests));
                let id = BenchmarkId::new(strategy.id(), clients);
                group.bench_function(id, |b| {
                    b.iter_custom(|iters| {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            let cell = harness
                                .run_cell(&CellConfig {
                                    domain,
                                    strategy,
                                    clients,
                                    max_requests: requests,
                                    max_time: None,
                                })
                                .expect("run a cell");
                            assert!(
                                cell.violations.is_empty(),
                                "{name} {strategy} {clients} clients: invariants violated: {:?}",
                                cell.violations
                            );
                            if cell.errors > 0 {
                                eprintln!(
                                    "note: {name} {strategy} {clients} clients: {} of {} requests \
                                     failed: {:?}",
                                    cell.errors, cell.attempted, cell.errors_by_kind
                                );
                            }
                            total += cell.wall;
                        }
                        total
                    });
                });
            }
        }
        group.finish();
    }

    let mut single =
        Uncontended::new(&mut harness, plan.single_capacity).expect("uncontended setup");
    {
        let mut group = criterion.benchmark_group("uncontended");
        group
            .sample_size(20)
            .measurement_time(Duration::from_secs(3));
        group.throughput(Throughput::Elements(1));
        for op in Single::ALL {
            group.bench_function(op.name(), |b| {
                b.iter(|| {
                    single
                        .once(op)
                        .unwrap_or_else(|e| panic!("{}: {e}", op.name()))
                });
            });
        }
        group.finish();
    }
    let violations = single.check().expect("check the uncontended run");
    assert!(
        violations.is_empty(),
        "uncontended: invariants violated: {violations:?}"
    );
    criterion.final_summary();
}
