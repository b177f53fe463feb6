//! Contention report: one hot coupon campaign and one hot account under 1 to 256 concurrent
//! clients, five strategies (see `lockstock_testkit::strategies`), against the throwaway
//! MariaDB (or `DATABASE_URL`). Prints markdown tables, the uncontended latency of the library
//! against hand-written Diesel, and then, in the same run:
//!
//! * **the floor** (`Harness::floor`) of every combining cell: one connection writing, per
//!   transaction, exactly the rows a combined batch of the cell's mean size writes (one
//!   multi-row INSERT, one UPDATE of the hot row, COMMIT), nothing else — and combining/floor;
//!   at 64 clients in five rounds (the matrix's pair and four more after it), whose median
//!   ratio the final line gives;
//! * **across processes**: 1, 2 and 4 application processes × 64 / P clients on one hot
//!   coupon and one hot account, each process with its own combiner and pool, in five
//!   interleaved rounds whose order turns each round (1, 2, 4; 2, 4, 1; 4, 1, 2; ...: a drift of the
//!   machine's speed falls on every count in turn); each count's median run is reported, and
//!   4proc/1proc is the median of the rounds' own ratios (each 4-process run against the
//!   1-process run of its round), with their range; then the same at 256 clients in all, 1 ×
//!   256 against 4 × 64 (no floors), where a process's batch is not bound by its 16 clients.
//!   The report
//!   re-executes itself as the worker processes (configured through `LOCKSTOCK_REPORT_WORKER_*`
//!   environment variables; a worker prints its run on stdout), starts them together and checks
//!   the hot row from the database once all are done;
//! * **the Redis gate** (`Harness::redis_gate`), where `redis-server` is installed (`make
//!   report` installs it; otherwise the row is skipped): `DECR` on a throwaway Redis as the
//!   stock gate plus one INSERT per granted request, at every client count next to combining,
//!   and a sell-out run, with over- and under-issue counted.
//!
//! After the rounds it measures the floor at each process count's mean batch: a process's
//! batch holds only its own clients' requests (at most 64 / P), and floor(4 processes' batch)
//! / floor(1 process's batch) is what the server itself loses at the smaller batch, with no
//! client, lock or process around it.
//!
//! It writes an SVG chart to `target/contention.svg` (throughput against clients per domain, the
//! floor as a dotted line; and a panel across processes: each hot row's median run at 1, 2 and
//! 4 processes, with the floor at each run's batch dotted, and dashed its median runs at 1 and 4
//! processes with 256 clients in all) and ends with
//!
//! `contention-processes-256-clients: coupon 4proc/1proc=<p> ledger 4proc/1proc=<q> stock-row-wait-in-server 4proc/1proc=<v>`
//!
//! `contention-processes-floor: coupon floor(4proc batch)/floor(1proc batch)=<c> ledger floor(4proc batch)/floor(1proc batch)=<d>`
//!
//! `contention-processes-stock-row-wait-in-server: coupon 4proc/1proc=<w>`
//!
//! `contention-processes: coupon 4proc/1proc=<r> ledger 4proc/1proc=<s>`
//!
//! `contention: coupon combining/seed=<x> ledger combining/seed=<y> coupon combining/floor=<a> ledger combining/floor=<b> clients=64`
//!
//! (ratios of successful requests per second at 64 clients; the floor's at the cell's batch
//! size). Every cell, floor, process run and gate run is checked against the database
//! afterwards; the exit status is non-zero if an invariant does not hold.
//!
//! ```text
//! cargo run --release --example contention_report              # quick: ~2 min
//! cargo run --release --example contention_report -- --full    # 1..256 clients, longer cells
//! cargo run --release --example contention_report -- --galera  # 3-node Galera: ~3 min
//! ```
//!
//! # `--galera` (`make report-galera`)
//!
//! Starts a throwaway 3-node MariaDB Galera cluster on loopback
//! (`lockstock_testkit::GaleraCluster`, removed when the report ends), creates the database with
//! lockstock's migrations through node 0 and measures on it:
//!
//! * **Cells** ([`Harness::on_cluster`]): per-request (the library's `CouponIssuer::issue` /
//!   `BalanceLedger::deduct`, `seed(lib)` above) vs combining, at 1, 16 and 64 clients, on one
//!   hot campaign and one hot account, in two topologies: *one writer* (every client's
//!   connection, and combining's pool, on node 0) and *spread* (client `i` on node `i % 3`;
//!   combining runs one combiner with its own pool per node, like three application processes).
//!   Every cell is checked through node 0 with `wsrep_sync_wait = 1` and reports the cluster's
//!   certification failures and brute-force aborts (`wsrep_local_cert_failures`,
//!   `wsrep_local_bf_aborts`, summed over the nodes) and the errors callers saw.
//! * **Multi-writer, measured**: the mixed workload with its history checker
//!   (`lockstock_testkit::workload`), 16 clients for 15 s each, on a database of its own per
//!   topology: one writer; spread over the 3 nodes; spread with `wsrep_sync_wait = 1` (set once
//!   per connection in the `before_attempt` hook). Reported: operations and successes per
//!   second, conflicts, the answers callers got, calls slower than 5 s and every violation
//!   `workload::verify` finds.
//!
//! A call on a Galera node can hang for ever when the server never answers (issue 11); the
//! report does not: a client still running some seconds after its time (cells: the harness's
//! `STUCK_GRACE`; workload: 10 s) is counted as *stuck* and left behind. A stuck cell client's
//! call in flight is in doubt for the checks; a stuck workload client's history is lost, so
//! `verify` skips its keys and coupon users (`workload::verify_partial`).
//!
//! Markdown tables ("Galera: hot coupon", "Galera: hot account", "Galera: mixed workload"),
//! then the line
//!
//! `contention-galera: one-writer combining/per-request=<x> spread/one-writer(combining)=<y> clients=64`
//!
//! where each ratio is of successful requests per second at 64 clients, the geometric mean of
//! the two domains. The exit status is non-zero if an invariant does not hold with one writer;
//! violations with writes spread over the nodes are findings, printed but not failing.
//!
//! [`Harness::on_cluster`]: lockstock_testkit::strategies::Harness::on_cluster

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use lockstock::combine::CombinerStats;
use lockstock::StockRowWait;
use lockstock_testkit::redis::RedisServer;
use lockstock_testkit::strategies::{
    mean_us, percentile_us, BoxError, CellConfig, CellResult, Domain, Floor, Gate, Harness, Run,
    Single, Strategy, Uncontended,
};

/// Requests a time-limited cell may start at most (the campaign's stock).
const CELL_REQUEST_CAP: u64 = 2_000_000;
/// The client count of the final line.
const RATIO_CLIENTS: usize = 64;
/// Clients in all of the second measurement across processes: 64 a process at 4 processes,
/// so that a process's batch is not bound by its 16 clients as at [`RATIO_CLIENTS`].
const WIDE_CLIENTS: usize = 256;
/// Process counts of the measurement at [`WIDE_CLIENTS`].
const WIDE_PROCESSES: [usize; 2] = [1, 4];

struct Options {
    full: bool,
    galera: bool,
    /// Only the runs across processes (and their final line).
    processes_only: bool,
    clients: Vec<usize>,
    cell_time: Duration,
    single_rounds: usize,
    single_per_round: usize,
}

impl Options {
    fn parse() -> Result<Self, BoxError> {
        let mut full = false;
        let mut galera = false;
        let mut processes_only = false;
        for arg in std::env::args().skip(1) {
            match arg.as_str() {
                "--full" => full = true,
                "--quick" => full = false,
                "--galera" => galera = true,
                "--processes" => processes_only = true,
                "-h" | "--help" => {
                    println!(
                        "usage: contention_report [--quick | --full | --galera | --processes]\n  \
                         --quick   1, 16, 64, 256 clients, 1.5 s per cell (default)\n  \
                         --full    1, 16, 64, 256 clients, 5 s per cell, more latency samples\n  \
                         --galera  a throwaway 3-node Galera cluster: per-request vs combining \
                         at 1, 16, 64 clients, one writer vs spread, and the mixed workload \
                         (about 3 minutes)\n  \
                         --processes  only the runs across processes (1, 2, 4 processes x \
                         64 / P clients; 1 x 256 and 4 x 64) and the floors at their batches \
                         (about 2.5 minutes)"
                    );
                    std::process::exit(0);
                }
                other => return Err(format!("unknown argument {other:?} (try --help)").into()),
            }
        }
        Ok(if full {
            Self {
                full,
                galera,
                processes_only,
                clients: vec![1, 16, 64, 256],
                cell_time: Duration::from_secs(5),
                single_rounds: 10,
                single_per_round: 200,
            }
        } else {
            Self {
                full,
                galera,
                processes_only,
                clients: vec![1, 16, 64, 256],
                cell_time: Duration::from_millis(1500),
                single_rounds: 4,
                single_per_round: 100,
            }
        })
    }
}

fn main() -> ExitCode {
    if std::env::var_os(processes::WORKER_ENV).is_some() {
        return processes::worker();
    }
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
    if options.galera {
        return galera::run();
    }
    let started = Instant::now();
    let mut harness = Harness::new("lockstock_contention_report")?;
    if options.processes_only {
        let runs = processes::measure(&mut harness, options.cell_time, RATIO_SHAPES)?;
        let mut violations = Vec::new();
        let floors = process_floors(&mut harness, &runs, options.cell_time, &mut violations)?;
        print_processes(&runs, &floors);
        let wide = processes::measure(&mut harness, options.cell_time, WIDE_SHAPES)?;
        print_wide(&wide);
        let mut clean = violations.is_empty();
        for violation in &violations {
            eprintln!("INVARIANT VIOLATION: {violation}");
        }
        for run in runs.iter().chain(&wide) {
            for violation in &run.violations {
                clean = false;
                eprintln!(
                    "INVARIANT VIOLATION: {} {} processes: {violation}",
                    run.row.name(),
                    run.processes
                );
            }
        }
        print_process_lines(&runs, &floors, &wide);
        return Ok(clean);
    }
    let version = harness.server_version()?;
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let machine = format!("{cores} cores, server {version}");
    let load_at_start = load_average();
    println!("# lockstock contention report\n");
    println!("server settings: {}\n", harness.server_settings()?);
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

    // The matrix, and the floor right after each combining cell (the same load on the machine).
    let mut results: Vec<CellResult> = Vec::new();
    let mut floors: Vec<(usize, Floor)> = Vec::new();
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
                let what = format!("{:<10} {clients:>3} clients", strategy.name());
                let result = checked_cell(&mut harness, &config, &what, &mut violations)?;
                if strategy == Strategy::Combining {
                    floors.push(floor(&mut harness, &options, &result, &mut violations)?);
                }
                results.push(result);
            }
        }
        print_table(domain, &results);
    }

    // combining/floor at RATIO_CLIENTS: the matrix's pair and more pairs after it; the final
    // line gives the median ratio (one cell of a few seconds varies by a fifth between runs).
    let floor_rounds = floor_rounds(&mut harness, &options, &results, &floors, &mut violations)?;
    print_floors(&results, &floors, &floor_rounds);

    // Across processes: 64 clients in all, then 256.
    let runs = processes::measure(&mut harness, options.cell_time, RATIO_SHAPES)?;
    let wide = processes::measure(&mut harness, options.cell_time, WIDE_SHAPES)?;
    for run in runs.iter().chain(&wide) {
        violations.extend(
            run.violations
                .iter()
                .map(|v| format!("{} {} processes: {v}", run.row.name(), run.processes)),
        );
    }
    let process_floors = process_floors(&mut harness, &runs, options.cell_time, &mut violations)?;
    print_processes(&runs, &process_floors);
    print_wide(&wide);

    // The Redis gate: optional — a gate that cannot run (Redis did not start, say) is
    // reported, and the rest of the report stands.
    if let Err(error) = redis_gate(&mut harness, &options, &results, &mut violations) {
        println!("redis gate failed: {error}\n");
        eprintln!("  redis gate: failed: {error}");
    }

    let chart = chart_svg(
        &results,
        &floors,
        (&runs, &process_floors, &wide),
        &options.clients,
        &machine,
    );
    let path = chart_path();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&path, chart)?;
    println!("chart: {}\n", path.display());
    println!(
        "elapsed: {:.0} s; load average (1 min, /proc/loadavg) at the start {load_at_start}, at \
         the end {} — the floor and combining share whatever else the machine runs\n",
        started.elapsed().as_secs_f64(),
        load_average()
    );

    if !violations.is_empty() {
        eprintln!("INVARIANT VIOLATIONS:");
        for violation in &violations {
            eprintln!("  {violation}");
        }
    }
    print_process_lines(&runs, &process_floors, &wide);
    println!(
        "contention: coupon combining/seed={} ledger combining/seed={} coupon \
         combining/floor={} ledger combining/floor={} clients={RATIO_CLIENTS}",
        ratio(&results, Domain::Coupon),
        ratio(&results, Domain::Ledger),
        floor_ratio(&floor_rounds, Domain::Coupon),
        floor_ratio(&floor_rounds, Domain::Ledger)
    );
    Ok(violations.is_empty())
}

/// The 1-minute load average (`/proc/loadavg`), or `n/a`.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "n/a".to_string())
}

/// The mean batch of a combining cell, rounded (at least 1).
fn mean_batch(r: &CellResult) -> usize {
    rounded_mean(r.batches)
}

/// The mean batch of combiner statistics, rounded (at least 1).
fn rounded_mean(stats: Option<CombinerStats>) -> usize {
    stats.map_or(1, |b| (mean_of(b).round() as usize).max(1))
}

/// The floor ([`Harness::floor`]) of combining cell `r`, at its mean batch size, for as long as
/// a cell; with the cell's client count.
fn floor(
    harness: &mut Harness,
    options: &Options,
    r: &CellResult,
    violations: &mut Vec<String>,
) -> Result<(usize, Floor), BoxError> {
    let what = format!("{:>3} clients", r.clients);
    let floor = measured_floor(
        harness,
        (r.domain, mean_batch(r)),
        options.cell_time,
        &what,
        violations,
    )?;
    Ok((r.clients, floor))
}

/// A matrix cell ([`Harness::run_cell`]), its line on stderr and its violations recorded
/// (`what`: which cell of the domain's).
fn checked_cell(
    harness: &mut Harness,
    config: &CellConfig,
    what: &str,
    violations: &mut Vec<String>,
) -> Result<CellResult, BoxError> {
    let result = harness.run_cell(config)?;
    let domain = config.domain.name();
    eprintln!(
        "  {domain:<6} {what}: {:>9.0}/s ({} ok, {} errors)",
        result.throughput(),
        result.ok,
        result.errors
    );
    violations.extend(
        result
            .violations
            .iter()
            .map(|v| format!("{domain} {what}: {v}")),
    );
    Ok(result)
}

/// The floor ([`Harness::floor`]) of `(domain, batch)` for `time`, its line on stderr and its
/// violations recorded (`what`: whose batch it is).
fn measured_floor(
    harness: &mut Harness,
    (domain, batch): (Domain, usize),
    time: Duration,
    what: &str,
    violations: &mut Vec<String>,
) -> Result<Floor, BoxError> {
    let floor = harness.floor(domain, batch, time)?;
    let name = domain.name();
    eprintln!(
        "  {name:<6} floor      {what}: {:>9.0} rows/s (batch {})",
        floor.rows_per_second(),
        floor.batch
    );
    violations.extend(
        floor
            .violations
            .iter()
            .map(|v| format!("{name} floor at {what}: {v}")),
    );
    Ok(floor)
}

fn floor_of(floors: &[(usize, Floor)], domain: Domain, clients: usize) -> Option<&Floor> {
    floors
        .iter()
        .find(|(c, f)| *c == clients && f.domain == domain)
        .map(|(_, f)| f)
}

/// Rounds of (combining cell, its floor) at [`RATIO_CLIENTS`] clients: the matrix's and
/// `FLOOR_ROUNDS - 1` more right after the matrix, the domains interleaved. Five: one 1.5 s
/// cell, or its floor, moves by a fifth between runs on a 2-core machine, and a median of three
/// moved the final line by as much.
const FLOOR_ROUNDS: usize = 5;

/// One round's combining/floor at [`RATIO_CLIENTS`] clients.
struct FloorRound {
    domain: Domain,
    combining: f64,
    floor: f64,
    batch: usize,
}

impl FloorRound {
    fn of(domain: Domain, combining: f64, floor: &Floor) -> Self {
        Self {
            domain,
            combining,
            floor: floor.rows_per_second(),
            batch: floor.batch,
        }
    }

    fn ratio(&self) -> f64 {
        self.combining / self.floor.max(1e-9)
    }
}

/// The matrix's combining/floor pair at [`RATIO_CLIENTS`] clients and [`FLOOR_ROUNDS`] - 1 more
/// (a combining cell, then its floor at the cell's mean batch), every cell and floor checked as
/// in the matrix. None where the matrix has no such cell.
fn floor_rounds(
    harness: &mut Harness,
    options: &Options,
    results: &[CellResult],
    floors: &[(usize, Floor)],
    violations: &mut Vec<String>,
) -> Result<Vec<FloorRound>, BoxError> {
    let mut rounds = Vec::new();
    for domain in Domain::ALL {
        let cell = results.iter().find(|r| {
            r.domain == domain && r.strategy == Strategy::Combining && r.clients == RATIO_CLIENTS
        });
        if let (Some(cell), Some(floor)) = (cell, floor_of(floors, domain, RATIO_CLIENTS)) {
            rounds.push(FloorRound::of(domain, cell.throughput(), floor));
        }
    }
    if rounds.is_empty() {
        return Ok(rounds);
    }
    for round in 1..FLOOR_ROUNDS {
        for domain in Domain::ALL {
            let config = CellConfig {
                domain,
                strategy: Strategy::Combining,
                clients: RATIO_CLIENTS,
                max_requests: CELL_REQUEST_CAP,
                max_time: Some(options.cell_time),
            };
            let what = format!("combining  {RATIO_CLIENTS} clients, round {}", round + 1);
            let result = checked_cell(harness, &config, &what, violations)?;
            let (_, floor) = floor(harness, options, &result, violations)?;
            rounds.push(FloorRound::of(domain, result.throughput(), &floor));
        }
    }
    Ok(rounds)
}

fn print_floors(results: &[CellResult], floors: &[(usize, Floor)], rounds: &[FloorRound]) {
    println!(
        "## Combining against the floor
"
    );
    println!(
        "The floor: one connection writing, per transaction, exactly the rows a combined batch \
         writes (one multi-row INSERT of N user_coupon rows or N deduct journal rows, one UPDATE \
         of the hot row, COMMIT; SERIALIZABLE), no locking read, no per-request answers, for as \
         long as a cell, right after the combining cell; N = that cell's mean batch. Its rows \
         are checked like a cell's.\n"
    );
    println!("| hot row | clients | combining ok/s | mean batch N | floor rows/s at N | combining/floor |");
    println!("|---|---:|---:|---:|---:|---:|");
    for r in results.iter().filter(|r| r.strategy == Strategy::Combining) {
        if let Some(floor) = floor_of(floors, r.domain, r.clients) {
            println!(
                "| {} | {} | {:.0} | {} | {:.0} | {:.2} |",
                r.domain.name(),
                r.clients,
                r.throughput(),
                floor.batch,
                floor.rows_per_second(),
                r.throughput() / floor.rows_per_second().max(1e-9)
            );
        }
    }
    println!();
    if rounds.is_empty() {
        return;
    }
    println!(
        "At {RATIO_CLIENTS} clients, {FLOOR_ROUNDS} rounds of (combining cell, its floor): the \
         matrix's and {} more right after it, the hot rows interleaved. The final line's \
         combining/floor is the median round's ratio.\n",
        FLOOR_ROUNDS - 1
    );
    println!("| hot row | round | combining ok/s | floor rows/s (batch) | combining/floor |");
    println!("|---|---:|---:|---:|---:|");
    for domain in Domain::ALL {
        for (i, r) in rounds.iter().filter(|r| r.domain == domain).enumerate() {
            println!(
                "| {} | {} | {:.0} | {:.0} ({}) | {:.2} |",
                domain.name(),
                i + 1,
                r.combining,
                r.floor,
                r.batch,
                r.ratio()
            );
        }
    }
    println!();
}

/// The median round's combining/floor of `domain` at [`RATIO_CLIENTS`] clients (the lower
/// middle one of an even number).
fn floor_ratio(rounds: &[FloorRound], domain: Domain) -> String {
    let mut ratios: Vec<f64> = rounds
        .iter()
        .filter(|r| r.domain == domain && r.floor > 0.0)
        .map(FloorRound::ratio)
        .collect();
    ratios.sort_by(f64::total_cmp);
    match ratios.get(ratios.len().saturating_sub(1) / 2) {
        Some(median) => format!("{median:.2}"),
        None => "n/a".to_string(),
    }
}

/// The floor ([`Harness::floor`]) at the mean batch of each process count's median run: what
/// one connection writes at that batch size with nothing around it. A process's batch holds
/// only its own clients' requests, so the floor at 4 processes' batch over the floor at one
/// process's is the server's own loss at the smaller batch. Keyed by (hot row, processes).
fn process_floors(
    harness: &mut Harness,
    runs: &[processes::ProcessRun],
    time: Duration,
    violations: &mut Vec<String>,
) -> Result<Vec<(HotRow, usize, Floor)>, BoxError> {
    let mut floors = Vec::new();
    for row in HotRow::ALL {
        for count in processes::PROCESSES {
            let Some(run) = processes::median(runs, row, count) else {
                continue;
            };
            let what = format!("{count} processes' batch");
            let batch = rounded_mean(Some(run.batches));
            let floor = measured_floor(harness, (row.domain, batch), time, &what, violations)?;
            floors.push((row, count, floor));
        }
    }
    Ok(floors)
}

/// A hot row the runs across processes measure: its domain, and how a coupon batch waits for
/// a stock row another process holds ([`StockRowWait`]; the ledger has none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HotRow {
    domain: Domain,
    wait: StockRowWait,
}

impl HotRow {
    /// The coupon polling (the default), the coupon waiting in the server, the ledger.
    const ALL: [HotRow; 3] = [
        HotRow {
            domain: Domain::Coupon,
            wait: StockRowWait::Poll,
        },
        HotRow {
            domain: Domain::Coupon,
            wait: StockRowWait::InServer,
        },
        HotRow {
            domain: Domain::Ledger,
            wait: StockRowWait::Poll,
        },
    ];

    /// The default coupon and ledger: the final line's.
    fn of(domain: Domain) -> Self {
        Self {
            domain,
            wait: StockRowWait::Poll,
        }
    }

    fn name(self) -> &'static str {
        match (self.domain, self.wait) {
            (Domain::Coupon, StockRowWait::InServer) => "coupon, waits in server",
            (domain, _) => domain.name(),
        }
    }

    /// How a worker is told (`poll` or `server`).
    fn wait_word(self) -> &'static str {
        match self.wait {
            StockRowWait::InServer => "server",
            _ => "poll",
        }
    }
}

fn print_processes(runs: &[processes::ProcessRun], floors: &[(HotRow, usize, Floor)]) {
    println!("## Across processes\n");
    println!(
        "P application processes (the report re-executed as workers) x {RATIO_CLIENTS}/P \
         clients on one hot row, each process with its own combiner and pool of \
         min(clients, 8); throughput = all successes / (last process's end - first process's \
         start); checked from the database once every process is done. {} interleaved rounds, \
         their order turned each round (1, 2, 4; 2, 4, 1; 4, 1, 2; ...); each row is the round with \
         the median throughput, its vs-1-process against 1 process's median; per round, each \
         run against the 1-process run of its round (sorted; the final line's 4proc/1proc is \
         their median). A process's batch holds only its own clients' requests, so it can hold \
         no more than {RATIO_CLIENTS}/P: the floor at the median run's mean batch (measured \
         after all rounds, one connection, as in the floor table) over the floor at 1 \
         process's batch is what the server itself loses at that batch size (several \
         processes can pass it a little: their transactions overlap where one connection's \
         cannot, e.g. a COMMIT's log flush with the next holder's statements). \"coupon, waits \
         in server\": the same coupon with `CouponIssuer::with_stock_row_wait(StockRowWait::InServer)` \
         (a batch refused the stock row by another process waits for it in the server instead \
         of polling: opt-in, see its docs).\n",
        processes::ROUNDS
    );
    println!(
        "| hot row | processes x clients | ok/s | p50 ms | p99 ms | batches, mean | errors | vs 1 process | vs 1 process per round | ok/s per round | floor rows/s at the mean batch | floor / 1 process's floor | notes |"
    );
    println!("|---|---|---:|---:|---:|---|---|---:|---|---|---:|---:|---|");
    for run in processes::medians(runs) {
        let one = processes::median(runs, run.row, 1).map_or(0.0, |r| r.run.throughput());
        let (per_round, rounds) = round_columns(runs, run.row, run.processes);
        let b = run.batches;
        let mean = mean_of(b);
        let errors = run_errors(&run.run);
        let (floor, of_one) = match process_floor(floors, run.row, run.processes) {
            Some(f) => (
                format!("{:.0} ({})", f.rows_per_second(), f.batch),
                floor_ratio_of(floors, run.row, run.processes),
            ),
            None => ("n/a".to_string(), "n/a".to_string()),
        };
        println!(
            "| {} | {} x {} | {:.0} | {:.2} | {:.2} | {}, {mean:.1} | {errors} | {:.2} | {} | {} | {floor} | {of_one} | {} |",
            run.row.name(),
            run.processes,
            RATIO_CLIENTS / run.processes,
            run.run.throughput(),
            run.run.percentile_ms(50.0),
            run.run.percentile_ms(99.0),
            b.batches,
            run.run.throughput() / one.max(1e-9),
            per_round,
            rounds,
            violations_note(&run.violations)
        );
    }
    println!();
}

fn process_floor(floors: &[(HotRow, usize, Floor)], row: HotRow, count: usize) -> Option<&Floor> {
    floors
        .iter()
        .find(|(r, c, _)| *r == row && *c == count)
        .map(|(_, _, f)| f)
}

/// The floor at `count` processes' mean batch over the floor at 1 process's, for `row`.
fn floor_ratio_of(floors: &[(HotRow, usize, Floor)], row: HotRow, count: usize) -> String {
    match (
        process_floor(floors, row, count).map(Floor::rows_per_second),
        process_floor(floors, row, 1).map(Floor::rows_per_second),
    ) {
        (Some(many), Some(one)) if one > 0.0 => format!("{:.2}", many / one),
        _ => "n/a".to_string(),
    }
}

/// The measurement across processes at [`RATIO_CLIENTS`] in all (the issue's), and the one at
/// [`WIDE_CLIENTS`].
const RATIO_SHAPES: (usize, &[usize]) = (RATIO_CLIENTS, &processes::PROCESSES);
const WIDE_SHAPES: (usize, &[usize]) = (WIDE_CLIENTS, &WIDE_PROCESSES);

/// The mean batch of `stats` (0 without batches).
fn mean_of(stats: CombinerStats) -> f64 {
    if stats.batches == 0 {
        0.0
    } else {
        stats.requests as f64 / stats.batches as f64
    }
}

/// The columns of `row` at `count` processes across rounds: each round's ratio to the
/// 1-process run of its round (sorted), and each round's throughput, joined by ` / `.
fn round_columns(runs: &[processes::ProcessRun], row: HotRow, count: usize) -> (String, String) {
    let ratios: Vec<String> = processes::round_ratios(runs, row, count)
        .iter()
        .map(|r| format!("{r:.2}"))
        .collect();
    let throughputs: Vec<String> = runs
        .iter()
        .filter(|r| r.row == row && r.processes == count)
        .map(|r| format!("{:.0}", r.run.throughput()))
        .collect();
    (ratios.join(" / "), throughputs.join(" / "))
}

/// A table's notes for a run's invariant violations (empty without).
fn violations_note(violations: &[String]) -> String {
    if violations.is_empty() {
        String::new()
    } else {
        format!("INVARIANT VIOLATED: {}", violations.join("; "))
    }
}

/// The runs at [`WIDE_CLIENTS`] in all: 1 and 4 processes, each hot row's median run and the
/// rounds' own ratios.
fn print_wide(runs: &[processes::ProcessRun]) {
    println!("## Across processes, {WIDE_CLIENTS} clients in all\n");
    println!(
        "As above with {WIDE_CLIENTS} clients in all: 1 x {WIDE_CLIENTS} against 4 x {}, so \
         that each of 4 processes has as many clients as the single process has above. A \
         process's batch holds at most its own clients: at {RATIO_CLIENTS} clients in all, 4 \
         processes' batches hold at most {} against about {} in one process; here about {} \
         against about {}. No floors.\n",
        WIDE_CLIENTS / 4,
        RATIO_CLIENTS / 4,
        RATIO_CLIENTS / 2,
        WIDE_CLIENTS / 4,
        WIDE_CLIENTS / 2
    );
    println!(
        "| hot row | processes x clients | ok/s | p50 ms | p99 ms | batches, mean | errors | vs 1 process per round | ok/s per round | notes |"
    );
    println!("|---|---|---:|---:|---:|---:|---|---|---|---|");
    for row in HotRow::ALL {
        for count in WIDE_PROCESSES {
            let Some(run) = processes::median(runs, row, count) else {
                continue;
            };
            let (per_round, throughputs) = round_columns(runs, row, count);
            let b = run.batches;
            let mean = mean_of(b);
            println!(
                "| {} | {count} x {} | {:.0} | {:.2} | {:.2} | {}, {mean:.1} | {} | {} | {} | {} |",
                row.name(),
                WIDE_CLIENTS / count,
                run.run.throughput(),
                run.run.percentile_ms(50.0),
                run.run.percentile_ms(99.0),
                b.batches,
                run_errors(&run.run),
                per_round,
                throughputs,
                violations_note(&run.violations)
            );
        }
    }
    println!();
}

/// The line at [`WIDE_CLIENTS`] in all, the floors' line, the opt-in coupon's line and the
/// `contention-processes:` line (the defaults').
fn print_process_lines(
    runs: &[processes::ProcessRun],
    floors: &[(HotRow, usize, Floor)],
    wide: &[processes::ProcessRun],
) {
    let (coupon, ledger) = (HotRow::of(Domain::Coupon), HotRow::of(Domain::Ledger));
    let waiting = HotRow {
        domain: Domain::Coupon,
        wait: StockRowWait::InServer,
    };
    println!(
        "contention-processes-{WIDE_CLIENTS}-clients: coupon 4proc/1proc={} ledger \
         4proc/1proc={} stock-row-wait-in-server 4proc/1proc={}",
        process_ratio(wide, coupon),
        process_ratio(wide, ledger),
        process_ratio(wide, waiting)
    );
    println!(
        "contention-processes-floor: coupon floor(4proc batch)/floor(1proc batch)={} ledger \
         floor(4proc batch)/floor(1proc batch)={}",
        floor_ratio_of(floors, coupon, 4),
        floor_ratio_of(floors, ledger, 4)
    );
    println!(
        "contention-processes-stock-row-wait-in-server: coupon 4proc/1proc={}",
        process_ratio(runs, waiting)
    );
    println!(
        "contention-processes: coupon 4proc/1proc={} ledger 4proc/1proc={}",
        process_ratio(runs, coupon),
        process_ratio(runs, ledger)
    );
}

/// 4proc/1proc of `row`: the median of the rounds' own ratios.
fn process_ratio(runs: &[processes::ProcessRun], row: HotRow) -> String {
    let ratios = processes::round_ratios(runs, row, 4);
    match ratios.get(ratios.len().saturating_sub(1) / 2) {
        Some(median) => format!("{median:.2}"),
        None => "n/a".to_string(),
    }
}

/// Stock and requests of the Redis gate's sell-out run.
const SELL_OUT_STOCK: u64 = 5_000;

/// The Redis gate ([`Harness::redis_gate`]) at every client count, next to combining, and one
/// sell-out run (twice the stock in requests), if `redis-server` is installed.
fn redis_gate(
    harness: &mut Harness,
    options: &Options,
    results: &[CellResult],
    violations: &mut Vec<String>,
) -> Result<(), BoxError> {
    println!("## Redis gate vs combining (hot coupon)\n");
    if !RedisServer::installed() {
        println!("skipped: redis-server is not installed (`make report` installs it).\n");
        eprintln!("  redis gate: skipped (no redis-server)");
        return Ok(());
    }
    let server = RedisServer::start()?;
    let mut gates = Vec::new();
    for &clients in &options.clients {
        let limits = (CELL_REQUEST_CAP, Some(options.cell_time));
        let gate = harness.redis_gate(&server, clients, CELL_REQUEST_CAP, limits)?;
        eprintln!(
            "  coupon redis gate {clients:>3} clients: {:>9.0}/s ({} ok, {} errors)",
            gate.run.throughput(),
            gate.run.ok_ids.len(),
            gate.run.error_count()
        );
        gates.push(gate);
    }
    let sell_out = harness.redis_gate(
        &server,
        RATIO_CLIENTS,
        SELL_OUT_STOCK,
        (2 * SELL_OUT_STOCK, None),
    )?;
    drop(server);
    println!(
        "Redis `DECR` on the campaign's stock key as the gate (below zero: `INCR` back, sold \
         out), then one autocommit INSERT of the user_coupon row into MariaDB per granted \
         request (`INCR` back if it fails); a throwaway redis-server without persistence on a \
         Unix socket (MariaDB is reached through its socket too). Same clients, one MariaDB and \
         one Redis connection each. Checked: rows == successes, no user twice, ids handed out \
         == rows, and Redis's remaining stock + rows == stock (over-issue: more; under-issue: \
         less, a grant lost between DECR and INSERT). Sell-out: {} requests for a stock of \
         {SELL_OUT_STOCK}, {RATIO_CLIENTS} clients.\n",
        2 * SELL_OUT_STOCK
    );
    println!(
        "| clients | strategy | ok/s | p50 ms | p99 ms | errors | over-issued | under-issued | notes |"
    );
    println!("|---:|---|---:|---:|---:|---|---:|---:|---|");
    let gate_row = |label: &str, gate: &Gate| {
        println!(
            "| {} | {label} | {:.0} | {:.2} | {:.2} | {} | {} | {} | {} rows, {} left in Redis, \
             stock {} {} |",
            gate.clients,
            gate.run.throughput(),
            gate.run.percentile_ms(50.0),
            gate.run.percentile_ms(99.0),
            run_errors(&gate.run),
            gate.over_issued,
            gate.under_issued,
            gate.rows,
            gate.remaining,
            gate.stock,
            violations_note(&gate.violations)
        );
    };
    for gate in &gates {
        gate_row("redis gate", gate);
        if let Some(r) = results.iter().find(|r| {
            r.domain == Domain::Coupon
                && r.strategy == Strategy::Combining
                && r.clients == gate.clients
        }) {
            println!(
                "| {} | combining | {:.0} | {:.2} | {:.2} | {} | 0 | 0 | checked in the matrix |",
                r.clients,
                r.throughput(),
                r.percentile_ms(50.0),
                r.percentile_ms(99.0),
                errors_cell(r)
            );
        }
    }
    gate_row("redis gate, sell-out", &sell_out);
    println!();
    for gate in gates.iter().chain([&sell_out]) {
        violations.extend(
            gate.violations
                .iter()
                .map(|v| format!("redis gate {} clients: {v}", gate.clients)),
        );
    }
    Ok(())
}

/// The errors of a run for a table: `0`, or the count and the kinds.
fn run_errors(run: &Run) -> String {
    if run.error_count() == 0 {
        return "0".to_string();
    }
    let kinds: Vec<String> = run
        .errors_by_kind()
        .iter()
        .map(|(kind, n)| format!("{kind} {n}"))
        .collect();
    format!("{} ({})", run.error_count(), kinds.join(", "))
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
    // Interleaved call by call, in a new random order each time, so drift (other load, buffer
    // pool, log, the switch between tables and connections) hits all six alike: in blocks of
    // one op, or in a fixed order, an op measured up to 1.8x slower than the same op elsewhere.
    let mut rng = lockstock_testkit::rng::Rng::new(lockstock_testkit::rng::seed(
        "contention_report uncontended order",
    ));
    let mut order: Vec<usize> = (0..stats.len()).collect();
    for _ in 0..options.single_rounds * options.single_per_round {
        for i in (1..order.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            order.swap(i, j);
        }
        for &index in &order {
            let entry = &mut stats[index];
            let t = Instant::now();
            single.once(entry.op)?;
            let micros = t.elapsed().as_micros();
            entry
                .samples
                .push(u32::try_from(micros).unwrap_or(u32::MAX));
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
         call sets utf8mb4 results first, saves the caller's session variables in its first SET \
         and restores them after COMMIT (two more prepared statements).\n"
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
        let errors = errors_cell(r);
        let notes = notes_cell(r);
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
            notes
        );
    }
    println!();
}

/// The notes of a cell for a table: combining's batches, violated invariants.
fn notes_cell(r: &CellResult) -> String {
    let mut notes = String::new();
    if let Some(b) = r.batches {
        let mean = mean_of(b);
        let _ = write!(
            notes,
            "{} batches, mean {mean:.1}, max {}",
            b.batches, b.largest_batch
        );
    }
    let _ = write!(notes, " {}", violations_note(&r.violations));
    notes.trim().to_string()
}

/// The errors of a cell for a table: `0`, or the count and the kinds (`12 (Timeout 10, ...)`).
fn errors_cell(r: &CellResult) -> String {
    if r.errors == 0 {
        "0".to_string()
    } else {
        let kinds: Vec<String> = r
            .errors_by_kind
            .iter()
            .map(|(kind, n)| format!("{kind} {n}"))
            .collect();
        format!("{} ({})", r.errors, kinds.join(", "))
    }
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
// SVG chart: one panel per domain, throughput against clients, log-log, one line per strategy;
// a third panel across processes, throughput against processes, one line per hot row
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

/// A panel's plot area in the chart, and its top.
const PLOT_W: f64 = 340.0;
const PLOT_H: f64 = 340.0;
const TOP: f64 = 90.0;

/// The floor's line in the chart.
const FLOOR_COLOR: &str = "#333333";

fn si(value: f64) -> String {
    if value >= 1e6 {
        format!("{}M", value / 1e6)
    } else if value >= 1e3 {
        format!("{}k", value / 1e3)
    } else {
        format!("{value}")
    }
}

/// The chart's process rounds: the runs at [`RATIO_CLIENTS`] in all, the floors at their
/// batches and the runs at [`WIDE_CLIENTS`] in all.
type ProcessData<'a> = (
    &'a [processes::ProcessRun],
    &'a [(HotRow, usize, Floor)],
    &'a [processes::ProcessRun],
);

fn chart_svg(
    results: &[CellResult],
    floors: &[(usize, Floor)],
    (runs, process_floors, wide): ProcessData<'_>,
    clients: &[usize],
    machine: &str,
) -> String {
    const WIDTH: f64 = 1440.0;
    const HEIGHT: f64 = 560.0;
    const GAP: f64 = 130.0;
    let positive: Vec<f64> = results
        .iter()
        .map(CellResult::throughput)
        .chain(floors.iter().map(|(_, f)| f.rows_per_second()))
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
        let left = 90.0 + panel as f64 * (PLOT_W + GAP);
        let x_of = |c: usize| left + (c.max(1) as f64).log2() / max_clients.log2() * PLOT_W;
        let y_of = |t: f64| {
            let v = t.max(10f64.powf(dec_lo)).log10();
            TOP + PLOT_H - (v - dec_lo) / (dec_hi - dec_lo) * PLOT_H
        };
        let mut y_ticks = Vec::new();
        let mut decade = dec_lo;
        while decade <= dec_hi + 1e-9 {
            y_ticks.push((y_of(10f64.powf(decade)), si(10f64.powf(decade))));
            decade += 1.0;
        }
        let x_ticks: Vec<(f64, String)> =
            clients.iter().map(|&c| (x_of(c), c.to_string())).collect();
        panel_axes(
            &mut svg,
            left,
            domain.title(),
            ("clients (log scale)", &x_ticks),
            ("requests/s (log scale)", &y_ticks),
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
            let line: Vec<(f64, f64)> = points.iter().map(|&(x, y, _)| (x, y)).collect();
            polyline(&mut svg, &line, stroke, 2.0, dash);
            for &(x, y, t) in &points {
                let title = format!("{} {}: {t:.0}/s", strategy.name(), domain.name());
                circle(&mut svg, (x, y), stroke, &title);
            }
        }
        // The floor at each combining cell's mean batch size.
        let points: Vec<(f64, f64, &Floor, usize)> = floors
            .iter()
            .filter(|(_, f)| f.domain == *domain)
            .map(|(c, f)| (x_of(*c), y_of(f.rows_per_second()), f, *c))
            .collect();
        if !points.is_empty() {
            let line: Vec<(f64, f64)> = points.iter().map(|&(x, y, _, _)| (x, y)).collect();
            polyline(&mut svg, &line, FLOOR_COLOR, 2.0, "2 3");
            for (x, y, f, c) in &points {
                let _ = writeln!(
                    svg,
                    r#"<rect x="{:.1}" y="{:.1}" width="6" height="6" fill="{FLOOR_COLOR}"><title>floor {}, {c} clients (batch {}): {:.0} rows/s</title></rect>"#,
                    x - 3.0,
                    y - 3.0,
                    domain.name(),
                    f.batch,
                    f.rows_per_second()
                );
            }
        }
    }
    if !runs.is_empty() {
        let left = 90.0 + Domain::ALL.len() as f64 * (PLOT_W + GAP);
        process_panel(&mut svg, (runs, process_floors, wide), left);
    }
    // Legend.
    let legend_y = HEIGHT - 40.0;
    let mut x = WIDTH / 2.0 - 420.0;
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
    let _ = writeln!(
        svg,
        r#"<line x1="{x:.1}" y1="{legend_y:.1}" x2="{:.1}" y2="{legend_y:.1}" stroke="{FLOOR_COLOR}" stroke-width="3" stroke-dasharray="2 3"/><text x="{:.1}" y="{:.1}">{}</text>"#,
        x + 28.0,
        x + 34.0,
        legend_y + 4.0,
        escape("floor (a batch's rows, nothing else)")
    );
    svg.push_str("</svg>\n");
    svg
}

/// A panel's title, frame, grid lines with their labels (`(position, label)`) and axis titles.
fn panel_axes(
    svg: &mut String,
    left: f64,
    title: &str,
    (x_title, x_ticks): (&str, &[(f64, String)]),
    (y_title, y_ticks): (&str, &[(f64, String)]),
) {
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle" font-size="14" font-weight="bold">{}</text>"#,
        left + PLOT_W / 2.0,
        TOP - 12.0,
        escape(title)
    );
    let _ = writeln!(
        svg,
        r##"<rect x="{left}" y="{TOP}" width="{PLOT_W}" height="{PLOT_H}" fill="none" stroke="#333"/>"##
    );
    for (y, label) in y_ticks {
        let _ = writeln!(
            svg,
            r##"<line x1="{left}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            left + PLOT_W,
            left - 6.0,
            y + 4.0,
            escape(label)
        );
    }
    for (x, label) in x_ticks {
        let _ = writeln!(
            svg,
            r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#eee"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            TOP + PLOT_H,
            TOP + PLOT_H + 18.0,
            escape(label)
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="13">{}</text>"#,
        left + PLOT_W / 2.0,
        TOP + PLOT_H + 40.0,
        escape(x_title)
    );
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="13" transform="rotate(-90 {:.1} {:.1})">{}</text>"#,
        left - 55.0,
        TOP + PLOT_H / 2.0,
        left - 55.0,
        TOP + PLOT_H / 2.0,
        escape(y_title)
    );
}

/// The colour of a hot row in the chart's panel across processes.
fn row_color(row: HotRow) -> &'static str {
    match (row.domain, row.wait) {
        (Domain::Coupon, StockRowWait::InServer) => "#17becf",
        (Domain::Coupon, _) => "#9467bd",
        (Domain::Ledger, _) => "#8c564b",
    }
}

/// The chart's third panel: each hot row's median run at 1, 2 and 4 processes x 64 / P
/// clients (solid), the floor at each run's mean batch (dotted, same colour) and the median
/// runs at 1 and 4 processes x 256 / P clients (dashed, hollow points), on a linear scale from
/// zero (the ratios between the points are what it shows).
fn process_panel(svg: &mut String, (runs, floors, wide): ProcessData<'_>, left: f64) {
    const STEP: f64 = 10_000.0;
    let highest = processes::medians(runs)
        .chain(processes::medians(wide))
        .map(|r| r.run.throughput())
        .chain(floors.iter().map(|(_, _, f)| f.rows_per_second()))
        .fold(STEP, f64::max);
    let top = (highest / STEP).ceil() * STEP;
    let y_of = |t: f64| TOP + PLOT_H - t.clamp(0.0, top) / top * PLOT_H;
    let most = processes::PROCESSES
        .iter()
        .copied()
        .max()
        .unwrap_or(1)
        .max(2) as f64;
    let x_of = |p: usize| left + 20.0 + (p.max(1) as f64).log2() / most.log2() * (PLOT_W - 40.0);
    let mut y_ticks = Vec::new();
    let mut tick = 0.0;
    while tick <= top + 1e-9 {
        y_ticks.push((y_of(tick), si(tick)));
        tick += STEP;
    }
    let x_ticks: Vec<(f64, String)> = processes::PROCESSES
        .iter()
        .map(|&p| (x_of(p), format!("{p} x {}", RATIO_CLIENTS / p)))
        .collect();
    panel_axes(
        svg,
        left,
        &format!("across processes, {RATIO_CLIENTS} (and {WIDE_CLIENTS}) clients in all"),
        ("processes x clients (median of the rounds)", &x_ticks),
        ("requests/s (linear)", &y_ticks),
    );
    for (n, row) in HotRow::ALL.iter().enumerate() {
        let stroke = row_color(*row);
        // In process order: `median` per count, ascending; solid with filled points at
        // `RATIO_CLIENTS` in all, dashed with rings at `WIDE_CLIENTS`.
        let medians = median_line(
            svg,
            (runs, *row),
            (&processes::PROCESSES, RATIO_CLIENTS),
            (&x_of, &y_of),
            (stroke, 2.0, ""),
        );
        let at_batch: Vec<(f64, f64)> = medians
            .iter()
            .filter_map(|r| process_floor(floors, *row, r.processes).map(|f| (r.processes, f)))
            .map(|(p, f)| (x_of(p), y_of(f.rows_per_second())))
            .collect();
        polyline(svg, &at_batch, stroke, 1.5, "2 3");
        median_line(
            svg,
            (wide, *row),
            (&WIDE_PROCESSES, WIDE_CLIENTS),
            (&x_of, &y_of),
            (stroke, 1.5, "8 4"),
        );
        // The panel's own legend, in its lower left corner.
        let y = TOP + PLOT_H - 32.0 - 16.0 * (HotRow::ALL.len() - 1 - n) as f64;
        let _ = writeln!(
            svg,
            r#"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{stroke}" stroke-width="3"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            left + 10.0,
            left + 32.0,
            left + 38.0,
            y + 4.0,
            escape(row.name())
        );
    }
    let y = TOP + PLOT_H - 14.0;
    let _ = writeln!(
        svg,
        r##"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#555" stroke-width="1.5" stroke-dasharray="8 4"/><text x="{:.1}" y="{:.1}">{}</text>"##,
        left + 10.0,
        left + 32.0,
        left + 38.0,
        y + 4.0,
        escape(&format!(
            "{WIDE_CLIENTS} clients in all (1 x {WIDE_CLIENTS}, 4 x {})",
            WIDE_CLIENTS / 4
        ))
    );
}

/// The median runs of `row` in `runs` at each of `counts` processes (of `clients` in all, in
/// ascending order), drawn at `x_of(processes)`, `y_of(throughput)` as a line `width` wide,
/// dashed by `dash`, with a point each — filled on a solid line, a ring on a dashed one; the
/// runs drawn.
fn median_line<'a>(
    svg: &mut String,
    (runs, row): (&'a [processes::ProcessRun], HotRow),
    (counts, clients): (&[usize], usize),
    (x_of, y_of): (&dyn Fn(usize) -> f64, &dyn Fn(f64) -> f64),
    (stroke, width, dash): (&str, f64, &str),
) -> Vec<&'a processes::ProcessRun> {
    let medians: Vec<&processes::ProcessRun> = counts
        .iter()
        .filter_map(|&count| processes::median(runs, row, count))
        .collect();
    let points: Vec<(f64, f64)> = medians
        .iter()
        .map(|r| (x_of(r.processes), y_of(r.run.throughput())))
        .collect();
    polyline(svg, &points, stroke, width, dash);
    for (r, point) in medians.iter().zip(points) {
        let title = format!(
            "{} {} x {}: {:.0}/s",
            row.name(),
            r.processes,
            clients / r.processes,
            r.run.throughput()
        );
        if dash.is_empty() {
            circle(svg, point, stroke, &title);
        } else {
            ring(svg, point, stroke, &title);
        }
    }
    medians
}

/// A line `width` wide through `points` (none for no points), dashed by `dash` (solid: "").
fn polyline(svg: &mut String, points: &[(f64, f64)], stroke: &str, width: f64, dash: &str) {
    if points.is_empty() {
        return;
    }
    let path: Vec<String> = points
        .iter()
        .map(|(x, y)| format!("{x:.1},{y:.1}"))
        .collect();
    let _ = writeln!(
        svg,
        r#"<polyline points="{}" fill="none" stroke="{stroke}" stroke-width="{width}"{}/>"#,
        path.join(" "),
        dash_attr(dash)
    );
}

/// A data point at `(x, y)`, with `title` as its hover text.
fn circle(svg: &mut String, (x, y): (f64, f64), fill: &str, title: &str) {
    let _ = writeln!(
        svg,
        r#"<circle cx="{x:.1}" cy="{y:.1}" r="3.5" fill="{fill}"><title>{}</title></circle>"#,
        escape(title)
    );
}

/// A hollow data point at `(x, y)`: a `stroke` ring, with `title` as its hover text.
fn ring(svg: &mut String, (x, y): (f64, f64), stroke: &str, title: &str) {
    let _ = writeln!(
        svg,
        r##"<circle cx="{x:.1}" cy="{y:.1}" r="3.5" fill="#ffffff" stroke="{stroke}" stroke-width="1.5"><title>{}</title></circle>"##,
        escape(title)
    );
}

/// The SVG attribute of a dash pattern (none for a solid line).
fn dash_attr(dash: &str) -> String {
    if dash.is_empty() {
        String::new()
    } else {
        format!(r#" stroke-dasharray="{dash}""#)
    }
}

// ---------------------------------------------------------------------------------------------
// --galera: a throwaway 3-node Galera cluster
// ---------------------------------------------------------------------------------------------

mod galera {
    use std::fmt::Write as _;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use diesel::connection::{Instrumentation, InstrumentationEvent, SimpleConnection};
    use diesel::prelude::*;
    use lockstock::schema::user_balance;
    use lockstock_testkit::galera::GaleraCluster;
    use lockstock_testkit::strategies::{
        connect_causal, per_second, BoundedThreads, BoxError, CellConfig, CellResult, Conflicts,
        Domain, Harness, Strategy, Topology, STUCK_GRACE,
    };
    use lockstock_testkit::workload::{self, Client, ErrorTexts, Record, Summary};

    use super::{errors_cell, notes_cell, CELL_REQUEST_CAP, RATIO_CLIENTS};

    /// Nodes of the cluster.
    const NODES: usize = 3;
    /// Client counts of the cells.
    const CLIENTS: [usize; 3] = [1, 16, RATIO_CLIENTS];
    /// Per-request (the library's `issue` / `deduct`) and combining.
    const STRATEGIES: [Strategy; 2] = [Strategy::SeedLib, Strategy::Combining];
    /// Time per cell.
    const CELL_TIME: Duration = Duration::from_secs(2);
    /// Clients of the mixed workload.
    const WORKLOAD_CLIENTS: usize = 16;
    /// How long the mixed workload runs per topology.
    const WORKLOAD_TIME: Duration = Duration::from_secs(15);
    /// How long a workload client may take past [`WORKLOAD_TIME`] before it counts as stuck:
    /// its operation in flight then has had more than three calls' deadlines (3 s each).
    const WORKLOAD_GRACE: Duration = Duration::from_secs(10);
    /// A call slower than this is counted.
    const SLOW_CALL: Duration = Duration::from_secs(5);
    /// Accounts, campaigns and their stock of the mixed workload.
    const ACCOUNTS: i64 = 16;
    const CAMPAIGNS: usize = 2;
    const STOCK: u32 = 1_000;

    /// The report's name of a strategy.
    fn strategy_name(strategy: Strategy) -> &'static str {
        match strategy {
            Strategy::SeedLib => "per-request",
            other => other.name(),
        }
    }

    /// How the mixed workload's clients reach the cluster.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Mode {
        /// Every client on node 0.
        OneWriter,
        /// Client `i` on node `i % 3`.
        Spread,
        /// Spread, and every connection sets `wsrep_sync_wait = 1` (causal reads).
        SpreadSyncWait,
    }

    impl Mode {
        const ALL: [Mode; 3] = [Mode::OneWriter, Mode::Spread, Mode::SpreadSyncWait];

        fn name(self) -> &'static str {
            match self {
                Self::OneWriter => "one writer (node 0)",
                Self::Spread => "spread over 3 nodes",
                Self::SpreadSyncWait => "spread, wsrep_sync_wait=1",
            }
        }

        /// Its database.
        fn database(self) -> &'static str {
            match self {
                Self::OneWriter => "lockstock_galera_workload_one",
                Self::Spread => "lockstock_galera_workload_spread",
                Self::SpreadSyncWait => "lockstock_galera_workload_causal",
            }
        }

        fn node_of(self, client: usize) -> usize {
            match self {
                Self::OneWriter => 0,
                Self::Spread | Self::SpreadSyncWait => client % NODES,
            }
        }
    }

    /// Marks a connection that has `wsrep_sync_wait = 1`, in Diesel's instrumentation slot
    /// (wrapping the default instrumentation, which it keeps calling).
    struct SyncWaitMark(Option<Box<dyn Instrumentation>>);

    impl Instrumentation for SyncWaitMark {
        fn on_connection_event(&mut self, event: InstrumentationEvent<'_>) {
            if let Some(inner) = self.0.as_mut() {
                inner.on_connection_event(event);
            }
        }
    }

    /// A workload client's `before_attempt` hook: counts calls slower than [`SLOW_CALL`] (from
    /// one attempt's start to the next one's, or to the client's end), notes when the latest
    /// one started and, with `sync_wait`, sets `wsrep_sync_wait = 1` once on every connection.
    struct CallClock {
        sync_wait: bool,
        /// When the workload started.
        start: Instant,
        last: Option<Instant>,
        slow: u64,
        /// Milliseconds from `start` to the latest call's start (readable while the call hangs).
        latest_call: Arc<AtomicU64>,
    }

    impl CallClock {
        fn before_attempt(&mut self, conn: &mut MysqlConnection) -> bool {
            self.lap();
            let since = self.start.elapsed().as_millis();
            self.latest_call
                .store(u64::try_from(since).unwrap_or(u64::MAX), Ordering::Relaxed);
            if self.sync_wait
                && conn
                    .instrumentation()
                    .downcast_ref::<SyncWaitMark>()
                    .is_none()
            {
                if conn
                    .batch_execute("SET SESSION wsrep_sync_wait = 1")
                    .is_err()
                {
                    return false;
                }
                let default = diesel::connection::get_default_instrumentation();
                conn.set_instrumentation(SyncWaitMark(default));
            }
            true
        }

        fn lap(&mut self) {
            let now = Instant::now();
            if self.last.is_some_and(|last| now - last > SLOW_CALL) {
                self.slow += 1;
            }
            self.last = Some(now);
        }

        /// The slow calls, counting the last one.
        fn finish(mut self) -> u64 {
            self.lap();
            self.slow
        }
    }

    /// What one topology of the mixed workload saw.
    struct WorkloadRun {
        mode: Mode,
        summary: Summary,
        wall: Duration,
        conflicts: Conflicts,
        slow: u64,
        /// Stuck clients: name and when their call in flight started.
        stuck: Vec<(String, Duration)>,
        errors: ErrorTexts,
        violations: Vec<String>,
    }

    /// Runs `--galera`; `Ok(false)` if an invariant was violated with one writer.
    pub(super) fn run() -> Result<bool, BoxError> {
        let started = Instant::now();
        eprintln!("starting a {NODES}-node Galera cluster");
        let mut cluster = GaleraCluster::start(NODES)?;
        let ready = started.elapsed();
        let urls = cluster.create_database("lockstock_galera_report")?;
        let mut harness = Harness::on_cluster(&urls[0], urls.clone())?;
        let version = harness.server_version()?;
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        println!("# lockstock contention report: Galera\n");
        println!(
            "{cores} cores, server {version}; a throwaway {NODES}-node Galera cluster on \
             loopback (ready in {:.0} s). Cells: {:.1} s each, one thread per client; \
             per-request is the library's `CouponIssuer::issue` / `BalanceLedger::deduct` on a \
             connection per client; combining uses a pool of min(clients on the node, 8) per \
             node. One writer: every client on node 0. Spread: client i on node i % {NODES}, \
             one combiner per node. Checks read through node 0 with wsrep_sync_wait=1. Cert \
             failures and BF aborts are wsrep_local_cert_failures and wsrep_local_bf_aborts, \
             summed over the nodes. A client still running {} s after the cell's time is \
             counted as stuck and left behind.\n",
            ready.as_secs_f64(),
            CELL_TIME.as_secs_f64(),
            STUCK_GRACE.as_secs()
        );
        // Violations with one writer fail the report; with writes spread they are findings.
        let (mut failures, mut findings) = (Vec::new(), Vec::new());
        let results = cells(&mut harness, &mut failures, &mut findings)?;
        for domain in Domain::ALL {
            print_cells(domain, &results);
        }

        let seed = lockstock_testkit::rng::seed("contention_report --galera workload");
        let mut runs = Vec::new();
        for mode in Mode::ALL {
            let run = workload(&cluster, &mut harness, mode, seed)?;
            if let Err(e) = cluster.wait_cluster_synced(Duration::from_secs(30)) {
                findings.push(format!(
                    "{}: the cluster is not synced after it: {e}",
                    mode.name()
                ));
            }
            let list = if mode == Mode::OneWriter {
                &mut failures
            } else {
                &mut findings
            };
            list.extend(
                run.violations
                    .iter()
                    .map(|v| format!("workload {}: {v}", mode.name())),
            );
            runs.push(run);
        }
        print_workloads(&runs, seed);

        println!("elapsed: {:.0} s\n", started.elapsed().as_secs_f64());
        for (title, list) in [
            ("INVARIANT VIOLATIONS with one writer", &failures),
            ("Findings with writes spread over the nodes", &findings),
        ] {
            if !list.is_empty() {
                eprintln!("{title}:");
                for violation in list {
                    eprintln!("  {violation}");
                }
            }
        }
        drop(harness);
        drop(cluster);
        println!(
            "contention-galera: one-writer combining/per-request={} \
             spread/one-writer(combining)={} clients={RATIO_CLIENTS}",
            ratio(
                &results,
                (Topology::OneWriter, Strategy::Combining),
                (Topology::OneWriter, Strategy::SeedLib)
            ),
            ratio(
                &results,
                (Topology::Spread, Strategy::Combining),
                (Topology::OneWriter, Strategy::Combining)
            )
        );
        Ok(failures.is_empty())
    }

    /// Every cell: topology × domain × clients × strategy.
    fn cells(
        harness: &mut Harness,
        failures: &mut Vec<String>,
        findings: &mut Vec<String>,
    ) -> Result<Vec<CellResult>, BoxError> {
        let mut results = Vec::new();
        for topology in Topology::ALL {
            harness.set_topology(topology);
            for domain in Domain::ALL {
                for clients in CLIENTS {
                    for strategy in STRATEGIES {
                        let result = harness.run_cell(&CellConfig {
                            domain,
                            strategy,
                            clients,
                            max_requests: CELL_REQUEST_CAP,
                            max_time: Some(CELL_TIME),
                        })?;
                        let name = format!(
                            "{} {} {} {clients} clients",
                            topology.name(),
                            domain.name(),
                            strategy_name(strategy)
                        );
                        eprintln!(
                            "  {name}: {:.0}/s ({} ok, {} errors, {} stuck)",
                            result.throughput(),
                            result.ok,
                            result.errors,
                            result.stuck
                        );
                        let list = match topology {
                            Topology::OneWriter => &mut *failures,
                            Topology::Spread => &mut *findings,
                        };
                        list.extend(result.violations.iter().map(|v| format!("{name}: {v}")));
                        results.push(result);
                    }
                }
            }
        }
        Ok(results)
    }

    fn print_cells(domain: Domain, results: &[CellResult]) {
        println!("## Galera: {}\n", domain.title());
        println!(
            "| topology | strategy | clients | req/s | ok/s | p50 ms | p99 ms | cert failures | \
             BF aborts | stuck | errors | notes |"
        );
        println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|");
        for r in results.iter().filter(|r| r.domain == domain) {
            let conflicts = r.conflicts.unwrap_or_default();
            println!(
                "| {} | {} | {} | {:.0} | {:.0} | {:.2} | {:.2} | {} | {} | {} | {} | {} |",
                r.topology.name(),
                strategy_name(r.strategy),
                r.clients,
                r.request_rate(),
                r.throughput(),
                r.percentile_ms(50.0),
                r.percentile_ms(99.0),
                conflicts.cert_failures,
                conflicts.bf_aborts,
                r.stuck,
                errors_cell(r),
                notes_cell(r)
            );
        }
        println!();
    }

    /// ok/s of the cell `(topology, strategy)` at [`RATIO_CLIENTS`] clients over that of
    /// `base`, as the geometric mean of the two domains.
    fn ratio(
        results: &[CellResult],
        (topology, strategy): (Topology, Strategy),
        base: (Topology, Strategy),
    ) -> String {
        let ok_rate = |domain: Domain, (topology, strategy): (Topology, Strategy)| {
            results
                .iter()
                .find(|r| {
                    r.domain == domain
                        && r.topology == topology
                        && r.strategy == strategy
                        && r.clients == RATIO_CLIENTS
                })
                .map(CellResult::throughput)
        };
        let mut product = 1.0;
        for domain in Domain::ALL {
            match (ok_rate(domain, (topology, strategy)), ok_rate(domain, base)) {
                (Some(value), Some(base)) if base > 0.0 => product *= value / base,
                (Some(_), Some(_)) => return "inf".to_string(),
                _ => return "n/a".to_string(),
            }
        }
        format!("{:.1}", product.powf(1.0 / Domain::ALL.len() as f64))
    }

    /// The mixed workload (`workload::run_client`) in one topology, on a database of its own.
    fn workload(
        cluster: &GaleraCluster,
        harness: &mut Harness,
        mode: Mode,
        seed: u64,
    ) -> Result<WorkloadRun, BoxError> {
        let urls = cluster.create_database(mode.database())?;
        let mut check = connect_causal(&urls[0])?;
        lockstock::run_migrations(&mut check)?;
        let setup = workload::setup(&mut check, ACCOUNTS, CAMPAIGNS, STOCK);
        // Every node has the accounts and campaigns before the clients start.
        for url in &urls {
            user_balance::table
                .count()
                .get_result::<i64>(&mut connect_causal(url)?)?;
        }
        let before = harness.conflicts()?.unwrap_or_default();
        let errors = ErrorTexts::default();
        let stop = Arc::new(AtomicBool::new(false));
        let clients: Vec<Client> = (0..WORKLOAD_CLIENTS)
            .map(|i| {
                let url = &urls[mode.node_of(i)];
                let client_seed = seed.wrapping_add(i as u64);
                Client::new(url, format!("c{i}"), i, &setup, client_seed, &errors)
            })
            .collect();
        eprintln!("  workload {}: {WORKLOAD_CLIENTS} clients", mode.name());
        let start = Instant::now();
        let mut threads = BoundedThreads::new();
        let latest_calls: Vec<Arc<AtomicU64>> = clients.iter().map(|_| Arc::default()).collect();
        for (client, latest_call) in clients.iter().zip(&latest_calls) {
            let (client, stop) = (client.clone(), stop.clone());
            let mut clock = CallClock {
                sync_wait: mode == Mode::SpreadSyncWait,
                start,
                last: None,
                slow: 0,
                latest_call: latest_call.clone(),
            };
            threads.spawn(move || {
                let records =
                    workload::run_client(&client, &stop, &mut |conn| clock.before_attempt(conn));
                (records, clock.finish())
            });
        }
        std::thread::sleep(WORKLOAD_TIME);
        stop.store(true, Ordering::Relaxed);
        let (returned, last) = threads.collect(Some(Instant::now() + WORKLOAD_GRACE))?;
        let wall = last.map_or(Duration::ZERO, |at| at.saturating_duration_since(start));
        let mut records: Vec<Record> = Vec::new();
        let (mut slow, mut missing, mut stuck) = (0, Vec::new(), Vec::new());
        for ((client, result), latest_call) in clients.into_iter().zip(returned).zip(latest_calls) {
            match result {
                Some((history, slow_calls)) => {
                    records.extend(history);
                    slow += slow_calls;
                }
                None => {
                    let since = Duration::from_millis(latest_call.load(Ordering::Relaxed));
                    stuck.push((client.name.clone(), since));
                    missing.push(client);
                }
            }
        }
        let violations = workload::verify_partial(&mut check, &setup, &records, &missing);
        let after = harness.conflicts()?.unwrap_or_default();
        Ok(WorkloadRun {
            mode,
            summary: Summary::of(&records),
            wall,
            conflicts: after.since(before),
            slow,
            stuck,
            errors,
            violations,
        })
    }

    fn print_workloads(runs: &[WorkloadRun], seed: u64) {
        println!("## Galera: mixed workload, multi-writer measured\n");
        println!(
            "`workload::run_client` (deducts, transfers, refunds, charges, coupon issues; every \
             operation retried with its key until it has a definitive answer), \
             {WORKLOAD_CLIENTS} clients, {} s per topology, {ACCOUNTS} accounts, {CAMPAIGNS} \
             campaigns of {STOCK}, LOCKSTOCK_SEED={seed}; then `workload::verify` through node 0 \
             with wsrep_sync_wait=1. A client not back {} s after the stop is counted as stuck; \
             its history is lost, so ops/s and ok/s count the clients that came back, and verify \
             skips the stuck clients' keys and coupon users (every other check, money \
             conservation and the audit included, covers their rows).\n",
            WORKLOAD_TIME.as_secs(),
            WORKLOAD_GRACE.as_secs()
        );
        println!(
            "| topology | ops/s | ok/s | cert failures | BF aborts | contended / unknown / lost \
             answers | unexpected | calls > 5 s | stuck clients | violations |"
        );
        println!("|---|---:|---:|---:|---:|---|---:|---:|---:|---:|");
        for run in runs {
            let s = &run.summary;
            println!(
                "| {} | {:.0} | {:.0} | {} | {} | {} / {} / {} | {} | {} | {} | {} |",
                run.mode.name(),
                per_second(s.ops as u64, run.wall),
                per_second(s.ok as u64, run.wall),
                run.conflicts.cert_failures,
                run.conflicts.bf_aborts,
                s.contended_answers,
                s.unknown_answers,
                s.lost_answers,
                s.unexpected,
                run.slow,
                run.stuck.len(),
                run.violations.len()
            );
        }
        println!();
        for run in runs {
            let mut text = format!("### {}\n\n{}\n", run.mode.name(), run.summary);
            let answered = workload::describe(&run.errors);
            if !answered.is_empty() {
                let _ = write!(text, "\nserver errors answered:\n```\n{answered}```\n");
            }
            if !run.stuck.is_empty() {
                let stuck: Vec<String> = run
                    .stuck
                    .iter()
                    .map(|(name, since)| format!("{name} ({:.1} s)", since.as_secs_f64()))
                    .collect();
                let _ = write!(
                    text,
                    "\nstuck clients, with when their call in flight started (history skipped in \
                     verify): {}\n",
                    stuck.join(", ")
                );
            }
            if run.violations.is_empty() {
                text.push_str("\nverify: no violations\n");
            } else {
                let _ = writeln!(text, "\nverify: {} violations:", run.violations.len());
                for violation in &run.violations {
                    let _ = writeln!(text, "- {violation}");
                }
            }
            println!("{text}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Across processes: the report re-executes itself as worker processes
// ---------------------------------------------------------------------------------------------

mod processes {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Child, ChildStdout, Command, ExitCode, Stdio};
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use lockstock::combine::CombinerStats;
    use lockstock::StockRowWait;
    use lockstock_testkit::strategies::{
        combining_clients_with, combining_pool_size, pool, BoxError, CouponTarget, Domain, Harness,
        Prepared, Run, Target,
    };

    use super::{HotRow, CELL_REQUEST_CAP};

    /// Set in a worker: the database URL (the parent's server; a worker starts none).
    pub(super) const WORKER_ENV: &str = "LOCKSTOCK_REPORT_WORKER_URL";
    /// The hot row: `coupon <campaign> <coupon> <total>` or `ledger <account>`.
    const TARGET_ENV: &str = "LOCKSTOCK_REPORT_WORKER_TARGET";
    /// `<user_base> <clients> <millis> <max_requests>`.
    const RUN_ENV: &str = "LOCKSTOCK_REPORT_WORKER_RUN";
    /// The prefix of the worker's idempotency keys.
    const KEYS_ENV: &str = "LOCKSTOCK_REPORT_WORKER_KEYS";
    /// How the worker's coupon batches wait for a stock row another process holds: `poll` or
    /// `server` ([`HotRow::wait_word`]).
    const WAIT_ENV: &str = "LOCKSTOCK_REPORT_WORKER_WAIT";
    /// Process counts measured; each runs [`RATIO_CLIENTS`](super::RATIO_CLIENTS) / count
    /// clients.
    pub(super) const PROCESSES: [usize; 3] = [1, 2, 4];
    /// Rounds of every (domain, process count), interleaved; the median is compared (five, as
    /// [`super::FLOOR_ROUNDS`]: single rounds' ratios spread over 0.5-0.85 in one run).
    pub(super) const ROUNDS: usize = 5;
    /// Ids and latencies per output line.
    const CHUNK: usize = 1_000;

    /// One (hot row, process count) measurement.
    pub(super) struct ProcessRun {
        pub(super) row: HotRow,
        pub(super) processes: usize,
        /// Which round (0-based) it ran in.
        pub(super) round: usize,
        pub(super) run: Run,
        pub(super) batches: CombinerStats,
        pub(super) violations: Vec<String>,
    }

    fn micros_since_epoch() -> u128 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros())
    }

    fn env(name: &str) -> Result<String, BoxError> {
        std::env::var(name).map_err(|_| format!("worker without {name}").into())
    }

    fn numbers<T: std::str::FromStr>(text: &str) -> Result<Vec<T>, BoxError> {
        text.split_whitespace()
            .map(|word| {
                word.parse()
                    .map_err(|_| format!("not a number: {word:?}").into())
            })
            .collect()
    }

    /// The worker process: one combiner with its own pool, the clients, then its run on stdout.
    pub(super) fn worker() -> ExitCode {
        match work() {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("contention_report worker: {error}");
                ExitCode::FAILURE
            }
        }
    }

    fn work() -> Result<(), BoxError> {
        let url = env(WORKER_ENV)?;
        let target_text = env(TARGET_ENV)?;
        let target = match target_text.split_once(' ') {
            Some(("coupon", rest)) => match numbers::<i64>(rest)?.as_slice() {
                &[campaign_id, coupon_id, total] => Target::Coupon(CouponTarget {
                    campaign_id,
                    coupon_id,
                    total: i32::try_from(total)?,
                }),
                _ => return Err(format!("bad target {target_text:?}").into()),
            },
            Some(("ledger", account)) => Target::Account(account.trim().parse()?),
            _ => return Err(format!("bad target {target_text:?}").into()),
        };
        let domain = match target {
            Target::Coupon(_) => Domain::Coupon,
            Target::Account(_) => Domain::Ledger,
        };
        let &[user_base, clients, millis, max_requests] =
            numbers::<u64>(&env(RUN_ENV)?)?.as_slice()
        else {
            return Err("bad run parameters".into());
        };
        let prepared = Prepared {
            target,
            user_base: i64::try_from(user_base)?,
            key_prefix: env(KEYS_ENV)?,
        };
        let clients = usize::try_from(clients)?;
        let wait = match env(WAIT_ENV)?.as_str() {
            "server" => StockRowWait::InServer,
            "poll" => StockRowWait::Poll,
            other => return Err(format!("bad wait {other:?}").into()),
        };
        let pool = pool(&url, combining_pool_size(clients))?;
        let mut out = std::io::stdout().lock();
        writeln!(out, "ready")?;
        out.flush()?;
        let mut go = String::new();
        std::io::stdin().read_line(&mut go)?;
        if go.trim() != "go" {
            return Err("no start signal".into());
        }
        let start = micros_since_epoch();
        let limits = (max_requests, Some(Duration::from_millis(millis)));
        let (run, stats) =
            combining_clients_with(pool, (domain, wait), &prepared, clients, limits)?;
        let end = start + run.wall.as_micros();
        writeln!(out, "window {start} {end}")?;
        writeln!(
            out,
            "batches {} {} {}",
            stats.batches, stats.requests, stats.largest_batch
        )?;
        writeln!(out, "counts {} {}", run.stuck, run.refusals)?;
        for ids in run.ok_ids.chunks(CHUNK) {
            let ids: Vec<String> = ids.iter().map(i64::to_string).collect();
            writeln!(out, "ok {}", ids.join(" "))?;
        }
        for latencies in run.latencies_us.chunks(CHUNK) {
            let latencies: Vec<String> = latencies.iter().map(u32::to_string).collect();
            writeln!(out, "lat {}", latencies.join(" "))?;
        }
        for (kind, count) in &run.errors {
            writeln!(out, "err {count} {kind}")?;
        }
        writeln!(out, "end")?;
        out.flush()?;
        // Stuck clients' threads may still run: leave without them.
        std::process::exit(0)
    }

    /// A worker started and ready.
    struct Worker {
        child: Child,
        stdout: BufReader<ChildStdout>,
    }

    impl Drop for Worker {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// One worker's output: its run, its window (µs since the epoch) and combiner statistics.
    fn read_worker(worker: &mut Worker) -> Result<(Run, (u128, u128), CombinerStats), BoxError> {
        let mut run = Run::default();
        let (mut window, mut stats, mut ended) = ((0, 0), CombinerStats::default(), false);
        let mut line = String::new();
        loop {
            line.clear();
            if worker.stdout.read_line(&mut line)? == 0 {
                break;
            }
            let (kind, rest) = line
                .trim_end()
                .split_once(' ')
                .unwrap_or((line.trim_end(), ""));
            match kind {
                "window" => match numbers::<u128>(rest)?.as_slice() {
                    &[start, end] => window = (start, end),
                    _ => return Err("bad window line".into()),
                },
                "batches" => match numbers::<u64>(rest)?.as_slice() {
                    &[batches, requests, largest] => {
                        stats.batches = batches;
                        stats.requests = requests;
                        stats.largest_batch = usize::try_from(largest)?;
                    }
                    _ => return Err("bad batches line".into()),
                },
                "counts" => match numbers::<u64>(rest)?.as_slice() {
                    &[stuck, refusals] => (run.stuck, run.refusals) = (stuck, refusals),
                    _ => return Err("bad counts line".into()),
                },
                "ok" => run.ok_ids.extend(numbers::<i64>(rest)?),
                "lat" => run.latencies_us.extend(numbers::<u32>(rest)?),
                "err" => {
                    let (count, what) = rest.split_once(' ').ok_or("bad err line")?;
                    *run.errors.entry(what.to_string()).or_default() += count.parse::<u64>()?;
                }
                "end" => ended = true,
                other => return Err(format!("unexpected worker output {other:?}").into()),
            }
        }
        let status = worker.child.wait()?;
        if !status.success() || !ended {
            return Err(format!("a worker failed ({status})").into());
        }
        Ok((run, window, stats))
    }

    /// Each hot row's median run ([`median`]) at each process count, in that order.
    pub(super) fn medians(runs: &[ProcessRun]) -> impl Iterator<Item = &ProcessRun> + '_ {
        HotRow::ALL.iter().flat_map(move |&row| {
            PROCESSES
                .iter()
                .filter_map(move |&count| median(runs, row, count))
        })
    }

    /// The run of `row` with `processes` processes whose throughput is the median of its
    /// rounds (the lower middle one of an even number).
    pub(super) fn median(
        runs: &[ProcessRun],
        row: HotRow,
        processes: usize,
    ) -> Option<&ProcessRun> {
        let mut of: Vec<&ProcessRun> = runs
            .iter()
            .filter(|r| r.row == row && r.processes == processes)
            .collect();
        of.sort_by(|a, b| a.run.throughput().total_cmp(&b.run.throughput()));
        of.get(of.len().saturating_sub(1) / 2).copied()
    }

    /// Each round's throughput of `row` with `processes` processes over the 1-process run of
    /// the same round, sorted.
    pub(super) fn round_ratios(runs: &[ProcessRun], row: HotRow, processes: usize) -> Vec<f64> {
        let of = |count: usize, round: usize| {
            runs.iter()
                .find(|r| r.row == row && r.processes == count && r.round == round)
                .map(|r| r.run.throughput())
        };
        let mut ratios: Vec<f64> = (0..ROUNDS)
            .filter_map(|round| match (of(processes, round), of(1, round)) {
                (Some(many), Some(one)) if one > 0.0 => Some(many / one),
                _ => None,
            })
            .collect();
        ratios.sort_by(f64::total_cmp);
        ratios
    }

    /// [`ROUNDS`] rounds of every (hot row, process count of `counts`): `processes` workers ×
    /// `total` / `processes` clients on one fresh hot row for `time`, then the checks from the
    /// database.
    pub(super) fn measure(
        harness: &mut Harness,
        time: Duration,
        (total, counts): (usize, &[usize]),
    ) -> Result<Vec<ProcessRun>, BoxError> {
        let exe = std::env::current_exe()?;
        let mut runs = Vec::new();
        for (round, row) in (0..ROUNDS).flat_map(|r| HotRow::ALL.map(|h| (r, h))) {
            let domain = row.domain;
            // The order turns each round: a drift falls on every count in turn.
            let mut order = counts.to_vec();
            order.rotate_left(round % counts.len().max(1));
            for processes in order {
                let clients = total / processes;
                let share = CELL_REQUEST_CAP / processes as u64;
                let prepared = harness.prepare(domain, CELL_REQUEST_CAP)?;
                let target = match prepared.target {
                    Target::Coupon(t) => {
                        format!("coupon {} {} {}", t.campaign_id, t.coupon_id, t.total)
                    }
                    Target::Account(account) => format!("ledger {account}"),
                };
                let mut workers = Vec::new();
                for i in 0..processes {
                    let user_base = prepared.user_base as u64 + i as u64 * share;
                    let mut child =
                        lockstock_testkit::inherit_no_descriptors(&mut Command::new(&exe))
                            .env(WORKER_ENV, harness.url())
                            .env("DATABASE_URL", harness.url())
                            .env(TARGET_ENV, &target)
                            .env(
                                RUN_ENV,
                                format!("{user_base} {clients} {} {share}", time.as_millis()),
                            )
                            .env(KEYS_ENV, format!("{}-p{i}", prepared.key_prefix))
                            .env(WAIT_ENV, row.wait_word())
                            .stdin(Stdio::piped())
                            .stdout(Stdio::piped())
                            .stderr(Stdio::inherit())
                            .spawn()?;
                    let stdout = child.stdout.take().ok_or("no worker stdout")?;
                    workers.push(Worker {
                        child,
                        stdout: BufReader::new(stdout),
                    });
                }
                for worker in &mut workers {
                    let mut ready = String::new();
                    worker.stdout.read_line(&mut ready)?;
                    if ready.trim() != "ready" {
                        return Err("a worker did not get ready".into());
                    }
                }
                for worker in &mut workers {
                    let stdin = worker.child.stdin.as_mut().ok_or("no worker stdin")?;
                    stdin.write_all(b"go\n")?;
                    stdin.flush()?;
                }
                let mut run = Run::default();
                let mut batches = CombinerStats::default();
                let (mut first, mut last) = (u128::MAX, 0);
                for worker in &mut workers {
                    let (one, (start, end), stats) = read_worker(worker)?;
                    run.absorb(one);
                    (first, last) = (first.min(start), last.max(end));
                    batches.batches += stats.batches;
                    batches.requests += stats.requests;
                    batches.largest_batch = batches.largest_batch.max(stats.largest_batch);
                }
                drop(workers);
                run.wall = Duration::from_micros(
                    u64::try_from(last.saturating_sub(first)).unwrap_or(u64::MAX),
                );
                let mut violations = run.consistency(Some(batches));
                violations.extend(harness.check(prepared.target, &run.ok_ids, run.in_doubt())?);
                eprintln!(
                    "  {:<6} {processes} processes x {clients:>3} clients: {:>9.0}/s ({} ok, {} \
                     errors)",
                    row.name(),
                    run.throughput(),
                    run.ok_ids.len(),
                    run.error_count()
                );
                runs.push(ProcessRun {
                    row,
                    processes,
                    round,
                    run,
                    batches,
                    violations,
                });
            }
        }
        Ok(runs)
    }
}
