//! Contention report: one hot coupon campaign and one hot account under 1 to 256 concurrent
//! clients, five strategies (see `lockstock_testkit::strategies`), against the throwaway
//! MariaDB (or `DATABASE_URL`). Prints markdown tables, the uncontended latency of the library
//! against hand-written Diesel, writes an SVG chart to `target/contention.svg`, and ends with
//!
//! `contention: coupon combining/seed=<ratio> ledger combining/seed=<ratio> clients=64`
//!
//! Every cell is checked against the database afterwards; the exit status is non-zero if an
//! invariant does not hold.
//!
//! ```text
//! cargo run --release --example contention_report            # quick: ~1-2 min
//! cargo run --release --example contention_report -- --full  # 1..256 clients, longer cells
//! ```

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use lockstock_testkit::strategies::{
    mean_us, percentile_us, BoxError, CellConfig, CellResult, Domain, Harness, Single, Strategy,
    Uncontended,
};

/// Requests a time-limited cell may start at most (the campaign's stock).
const CELL_REQUEST_CAP: u64 = 2_000_000;
/// The client count of the final line.
const RATIO_CLIENTS: usize = 64;

struct Options {
    full: bool,
    clients: Vec<usize>,
    cell_time: Duration,
    single_rounds: usize,
    single_per_round: usize,
}

impl Options {
    fn parse() -> Result<Self, BoxError> {
        let mut full = false;
        for arg in std::env::args().skip(1) {
            match arg.as_str() {
                "--full" => full = true,
                "--quick" => full = false,
                "-h" | "--help" => {
                    println!(
                        "usage: contention_report [--quick | --full]\n  \
                         --quick  1, 16, 64, 256 clients, 1.5 s per cell (default)\n  \
                         --full   1, 16, 64, 256 clients, 5 s per cell, more latency samples"
                    );
                    std::process::exit(0);
                }
                other => return Err(format!("unknown argument {other:?} (try --help)").into()),
            }
        }
        Ok(if full {
            Self {
                full,
                clients: vec![1, 16, 64, 256],
                cell_time: Duration::from_secs(5),
                single_rounds: 10,
                single_per_round: 200,
            }
        } else {
            Self {
                full,
                clients: vec![1, 16, 64, 256],
                cell_time: Duration::from_millis(1500),
                single_rounds: 4,
                single_per_round: 100,
            }
        })
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("contention_report: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Runs everything; `Ok(false)` if an invariant was violated.
fn run() -> Result<bool, BoxError> {
    let options = Options::parse()?;
    let started = Instant::now();
    let mut harness = Harness::new("lockstock_contention_report")?;
    let version = harness.server_version()?;
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let machine = format!("{cores} cores, server {version}");
    println!("# lockstock contention report\n");
    println!(
        "{machine}; {} mode: {:.1} s per cell, clients {:?}, one thread (and connection) per \
         client; combining uses a pool of min(clients, 8).\n",
        if options.full { "full" } else { "quick" },
        options.cell_time.as_secs_f64(),
        options.clients
    );
    let mut violations: Vec<String> = Vec::new();

    // Uncontended latency.
    let singles = uncontended(&mut harness, &options, &mut violations)?;
    print_uncontended(&singles);

    // The matrix.
    let mut results: Vec<CellResult> = Vec::new();
    for domain in Domain::ALL {
        for &clients in &options.clients {
            for strategy in Strategy::ALL {
                let config = CellConfig {
                    domain,
                    strategy,
                    clients,
                    max_requests: CELL_REQUEST_CAP,
                    max_time: Some(options.cell_time),
                };
                let result = harness.run_cell(&config)?;
                eprintln!(
                    "  {:<6} {:<10} {:>3} clients: {:>9.0}/s ({} ok, {} errors)",
                    domain.name(),
                    strategy.name(),
                    clients,
                    result.throughput(),
                    result.ok,
                    result.errors
                );
                for violation in &result.violations {
                    violations.push(format!(
                        "{} {} {} clients: {violation}",
                        domain.name(),
                        strategy.name(),
                        clients
                    ));
                }
                results.push(result);
            }
        }
        print_table(domain, &results);
    }

    let chart = chart_svg(&results, &options.clients, &machine);
    let path = chart_path();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&path, chart)?;
    println!("chart: {}\n", path.display());
    println!("elapsed: {:.0} s\n", started.elapsed().as_secs_f64());

    if !violations.is_empty() {
        eprintln!("INVARIANT VIOLATIONS:");
        for violation in &violations {
            eprintln!("  {violation}");
        }
    }
    println!(
        "contention: coupon combining/seed={} ledger combining/seed={} clients={RATIO_CLIENTS}",
        ratio(&results, Domain::Coupon),
        ratio(&results, Domain::Ledger)
    );
    Ok(violations.is_empty())
}

struct SingleStats {
    op: Single,
    samples: Vec<u32>,
}

fn uncontended(
    harness: &mut Harness,
    options: &Options,
    violations: &mut Vec<String>,
) -> Result<Vec<SingleStats>, BoxError> {
    let warmup = 30;
    // Room for every op as if each issued (half of them do).
    let capacity =
        ((options.single_rounds * options.single_per_round + warmup) * Single::ALL.len()) as u64;
    let mut single = Uncontended::new(harness, capacity)?;
    for op in Single::ALL {
        for _ in 0..warmup {
            single.once(op)?;
        }
    }
    let mut stats: Vec<SingleStats> = Single::ALL
        .iter()
        .map(|&op| SingleStats {
            op,
            samples: Vec::new(),
        })
        .collect();
    // Interleaved rounds, so drift (other load, buffer pool, log) hits all six alike.
    for _ in 0..options.single_rounds {
        for entry in stats.iter_mut() {
            for _ in 0..options.single_per_round {
                let t = Instant::now();
                single.once(entry.op)?;
                let micros = t.elapsed().as_micros();
                entry
                    .samples
                    .push(u32::try_from(micros).unwrap_or(u32::MAX));
            }
        }
    }
    for entry in stats.iter_mut() {
        entry.samples.sort_unstable();
    }
    violations.extend(single.check()?);
    Ok(stats)
}

fn print_uncontended(stats: &[SingleStats]) {
    println!("## Uncontended latency (1 client, sequential)\n");
    println!("| call | n | mean ms | p50 ms | p99 ms |");
    println!("|---|---:|---:|---:|---:|");
    for s in stats {
        println!(
            "| {} | {} | {:.3} | {:.3} | {:.3} |",
            s.op.name(),
            s.samples.len(),
            mean_us(&s.samples) / 1000.0,
            percentile_us(&s.samples, 50.0) / 1000.0,
            percentile_us(&s.samples, 99.0) / 1000.0
        );
    }
    println!(
        "\nlib: on a connection carrying lockstock's session settings (no session statements); \
         lib-own: on the caller's own connection (plain `MysqlConnection::establish`), where a \
         call saves the caller's session variables in its first SET and restores them after \
         COMMIT (one more prepared statement).\n"
    );
    let find = |op: Single| stats.iter().find(|s| s.op == op);
    for (name, lib, hand) in [
        ("CouponIssuer::issue", Single::IssueLib, Single::IssueHand),
        (
            "CouponIssuer::issue, lib, own connection (session restored)",
            Single::IssueOwn,
            Single::IssueHand,
        ),
        (
            "BalanceLedger::deduct",
            Single::DeductLib,
            Single::DeductHand,
        ),
        (
            "BalanceLedger::deduct, lib, own connection (session restored)",
            Single::DeductOwn,
            Single::DeductHand,
        ),
    ] {
        if let (Some(lib), Some(hand)) = (find(lib), find(hand)) {
            let mean = mean_us(&lib.samples) / mean_us(&hand.samples).max(1e-9);
            let p50 =
                percentile_us(&lib.samples, 50.0) / percentile_us(&hand.samples, 50.0).max(1e-9);
            println!(
                "- {name} / hand-written: mean {mean:.2}x, p50 {p50:.2}x (goal <= 1.2x){}",
                if mean <= 1.2 { "" } else { " — ABOVE GOAL" }
            );
        }
    }
    println!();
}

fn print_table(domain: Domain, results: &[CellResult]) {
    println!("## {}\n", domain.title());
    println!(
        "| strategy | clients | requests | ok | throughput/s | p50 ms | p99 ms | refusals/success | errors | notes |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---|---|");
    for r in results.iter().filter(|r| r.domain == domain) {
        let refusals = r
            .refusals_per_success()
            .map_or_else(|| "n/a".to_string(), |v| format!("{v:.2}"));
        let errors = if r.errors == 0 {
            "0".to_string()
        } else {
            let kinds: Vec<String> = r
                .errors_by_kind
                .iter()
                .map(|(kind, n)| format!("{kind} {n}"))
                .collect();
            format!("{} ({})", r.errors, kinds.join(", "))
        };
        let mut notes = String::new();
        if let Some(b) = r.batches {
            let mean = if b.batches == 0 {
                0.0
            } else {
                b.requests as f64 / b.batches as f64
            };
            let _ = write!(
                notes,
                "{} batches, mean {mean:.1}, max {}",
                b.batches, b.largest_batch
            );
        }
        if !r.violations.is_empty() {
            let _ = write!(notes, " INVARIANT VIOLATED: {}", r.violations.join("; "));
        }
        println!(
            "| {} | {} | {} | {} | {:.0} | {:.2} | {:.2} | {} | {} | {} |",
            r.strategy.name(),
            r.clients,
            r.attempted,
            r.ok,
            r.throughput(),
            r.percentile_ms(50.0),
            r.percentile_ms(99.0),
            refusals,
            errors,
            notes.trim()
        );
    }
    println!();
}

fn throughput_of(results: &[CellResult], domain: Domain, strategy: Strategy) -> Option<f64> {
    results
        .iter()
        .find(|r| r.domain == domain && r.strategy == strategy && r.clients == RATIO_CLIENTS)
        .map(CellResult::throughput)
}

fn ratio(results: &[CellResult], domain: Domain) -> String {
    match (
        throughput_of(results, domain, Strategy::Combining),
        throughput_of(results, domain, Strategy::Seed),
    ) {
        (Some(combining), Some(seed)) if seed > 0.0 => format!("{:.1}", combining / seed),
        (Some(_), Some(_)) => "inf".to_string(),
        _ => "n/a".to_string(),
    }
}

fn chart_path() -> PathBuf {
    let target = match std::env::var_os("CARGO_TARGET_DIR").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"),
    };
    target.join("contention.svg")
}

// ---------------------------------------------------------------------------------------------
// SVG chart: one panel per domain, throughput against clients, log-log, one line per strategy
// ---------------------------------------------------------------------------------------------

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn color(strategy: Strategy) -> (&'static str, &'static str) {
    match strategy {
        Strategy::Seed => ("#d62728", ""),
        Strategy::SeedLib => ("#ff7f0e", "6 4"),
        Strategy::Wait => ("#1f77b4", ""),
        Strategy::Cond => ("#2ca02c", ""),
        Strategy::Combining => ("#9467bd", ""),
    }
}

fn si(value: f64) -> String {
    if value >= 1e6 {
        format!("{}M", value / 1e6)
    } else if value >= 1e3 {
        format!("{}k", value / 1e3)
    } else {
        format!("{value}")
    }
}

fn chart_svg(results: &[CellResult], clients: &[usize], machine: &str) -> String {
    const WIDTH: f64 = 1100.0;
    const HEIGHT: f64 = 560.0;
    const PLOT_W: f64 = 420.0;
    const PLOT_H: f64 = 340.0;
    const TOP: f64 = 90.0;
    let positive: Vec<f64> = results
        .iter()
        .map(CellResult::throughput)
        .filter(|t| *t > 0.0)
        .collect();
    let lo = positive
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min)
        .max(1.0);
    let hi = positive.iter().copied().fold(1.0, f64::max);
    let (dec_lo, dec_hi) = (
        lo.log10().floor(),
        hi.log10().ceil().max(lo.log10().floor() + 1.0),
    );
    let max_clients = clients.iter().copied().max().unwrap_or(1).max(2) as f64;

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        svg,
        r##"<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="#ffffff"/>"##
    );
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="28" text-anchor="middle" font-size="17" font-weight="bold">{}</text>"#,
        WIDTH / 2.0,
        escape("lockstock: throughput under contention on one hot row")
    );
    let _ = writeln!(
        svg,
        r##"<text x="{}" y="50" text-anchor="middle" font-size="13" fill="#444">{}</text>"##,
        WIDTH / 2.0,
        escape(&format!(
            "{machine}; one thread + connection per client; successful requests per second"
        ))
    );

    for (panel, domain) in Domain::ALL.iter().enumerate() {
        let left = 90.0 + panel as f64 * (PLOT_W + 130.0);
        let x_of = |c: usize| left + (c.max(1) as f64).log2() / max_clients.log2() * PLOT_W;
        let y_of = |t: f64| {
            let v = t.max(10f64.powf(dec_lo)).log10();
            TOP + PLOT_H - (v - dec_lo) / (dec_hi - dec_lo) * PLOT_H
        };
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle" font-size="14" font-weight="bold">{}</text>"#,
            left + PLOT_W / 2.0,
            TOP - 12.0,
            escape(domain.title())
        );
        let _ = writeln!(
            svg,
            r##"<rect x="{left}" y="{TOP}" width="{PLOT_W}" height="{PLOT_H}" fill="none" stroke="#333"/>"##
        );
        // Decades.
        let mut decade = dec_lo;
        while decade <= dec_hi + 1e-9 {
            let y = y_of(10f64.powf(decade));
            let _ = writeln!(
                svg,
                r##"<line x1="{left}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                left + PLOT_W,
                left - 6.0,
                y + 4.0,
                si(10f64.powf(decade))
            );
            decade += 1.0;
        }
        for &c in clients {
            let x = x_of(c);
            let _ = writeln!(
                svg,
                r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#eee"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{c}</text>"##,
                TOP + PLOT_H,
                TOP + PLOT_H + 18.0
            );
        }
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="13">clients (log scale)</text>"#,
            left + PLOT_W / 2.0,
            TOP + PLOT_H + 40.0
        );
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="13" transform="rotate(-90 {:.1} {:.1})">requests/s (log scale)</text>"#,
            left - 55.0,
            TOP + PLOT_H / 2.0,
            left - 55.0,
            TOP + PLOT_H / 2.0
        );
        for strategy in Strategy::ALL {
            let (stroke, dash) = color(strategy);
            let points: Vec<(f64, f64, f64)> = clients
                .iter()
                .filter_map(|&c| {
                    results
                        .iter()
                        .find(|r| r.domain == *domain && r.strategy == strategy && r.clients == c)
                        .map(|r| (x_of(c), y_of(r.throughput()), r.throughput()))
                })
                .collect();
            if points.is_empty() {
                continue;
            }
            let path: Vec<String> = points
                .iter()
                .map(|(x, y, _)| format!("{x:.1},{y:.1}"))
                .collect();
            let dash_attr = dash_attr(dash);
            let _ = writeln!(
                svg,
                r#"<polyline points="{}" fill="none" stroke="{stroke}" stroke-width="2"{dash_attr}/>"#,
                path.join(" ")
            );
            for (x, y, t) in &points {
                let _ = writeln!(
                    svg,
                    r#"<circle cx="{x:.1}" cy="{y:.1}" r="3.5" fill="{stroke}"><title>{} {}: {:.0}/s</title></circle>"#,
                    escape(strategy.name()),
                    domain.name(),
                    t
                );
            }
        }
    }
    // Legend.
    let legend_y = HEIGHT - 40.0;
    let mut x = WIDTH / 2.0 - 300.0;
    for strategy in Strategy::ALL {
        let (stroke, dash) = color(strategy);
        let dash_attr = dash_attr(dash);
        let _ = writeln!(
            svg,
            r#"<line x1="{x:.1}" y1="{legend_y:.1}" x2="{:.1}" y2="{legend_y:.1}" stroke="{stroke}" stroke-width="3"{dash_attr}/><text x="{:.1}" y="{:.1}">{}</text>"#,
            x + 28.0,
            x + 34.0,
            legend_y + 4.0,
            escape(strategy.name())
        );
        x += 120.0;
    }
    svg.push_str("</svg>\n");
    svg
}

/// The SVG attribute of a dash pattern (none for a solid line).
fn dash_attr(dash: &str) -> String {
    if dash.is_empty() {
        String::new()
    } else {
        format!(r#" stroke-dasharray="{dash}""#)
    }
}
