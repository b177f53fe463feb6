//! Several OS processes against one server: the test binary re-executes itself as 4 worker
//! processes (`--exact processes::worker_process`, configured through environment variables),
//! each running 8 clients of the shared workload (`lockstock_testkit::workload`) against the
//! parent's database. The parent then checks the combined history and every invariant from the
//! database.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lockstock_testkit::fixtures::fresh_database;
use lockstock_testkit::rng::seed;
use lockstock_testkit::workload::{self, Client, Record, Setup, Summary};

const PROCESSES: usize = 4;
const CLIENTS_PER_PROCESS: usize = 8;
/// The worker test's full name in the `it` test binary (for `--exact`).
const WORKER_TEST: &str = "processes::worker_process";
/// Set in a worker: the database URL it must use (it never starts a sandbox of its own).
const URL_ENV: &str = "LOCKSTOCK_WORKER_URL";
const INDEX_ENV: &str = "LOCKSTOCK_WORKER_INDEX";
const SEED_ENV: &str = "LOCKSTOCK_WORKER_SEED";
const MILLIS_ENV: &str = "LOCKSTOCK_WORKER_MILLIS";
const ACCOUNTS_ENV: &str = "LOCKSTOCK_WORKER_ACCOUNTS";
const CAMPAIGNS_ENV: &str = "LOCKSTOCK_WORKER_CAMPAIGNS";
const OUT_ENV: &str = "LOCKSTOCK_WORKER_OUT";

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("worker without {name}"))
}

fn millis_since_epoch() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

/// The worker: runs only as a child of `four_processes_keep_the_invariants`.
#[test]
fn worker_process() {
    let Ok(url) = std::env::var(URL_ENV) else {
        return;
    };
    let index: usize = env(INDEX_ENV).parse().expect("index");
    let seed: u64 = env(SEED_ENV).parse().expect("seed");
    let run_for = Duration::from_millis(env(MILLIS_ENV).parse().expect("millis"));
    let setup = Setup {
        accounts: env(ACCOUNTS_ENV).parse().expect("accounts"),
        campaigns: env(CAMPAIGNS_ENV)
            .split(',')
            .map(|c| c.parse().expect("campaign"))
            .collect(),
    };
    let started = millis_since_epoch();
    let stop = AtomicBool::new(false);
    let records: Vec<Record> = std::thread::scope(|s| {
        let clients: Vec<_> = (0..CLIENTS_PER_PROCESS)
            .map(|n| {
                let number = index * CLIENTS_PER_PROCESS + n;
                let client = Client::new(
                    &url,
                    format!("p{index}c{n}"),
                    number,
                    &setup,
                    seed.wrapping_add(number as u64 + 1),
                    &workload::ErrorTexts::default(),
                );
                let stop = &stop;
                s.spawn(move || workload::run_client(&client, stop, &mut |_| true))
            })
            .collect();
        std::thread::sleep(run_for);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        clients
            .into_iter()
            .flat_map(|h| h.join().expect("client"))
            .collect()
    });
    let ended = millis_since_epoch();
    let mut out = std::fs::File::create(env(OUT_ENV)).expect("history file");
    writeln!(out, "# {} {started} {ended}", std::process::id()).expect("write");
    for record in &records {
        writeln!(out, "{record}").expect("write");
    }
}

/// Removes the worker's history files, also when the test fails.
struct Files(Vec<PathBuf>);

impl Drop for Files {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[test]
fn four_processes_keep_the_invariants() {
    let _storm = lockstock_testkit::fixtures::storm();
    if std::env::var_os(URL_ENV).is_some() {
        return;
    }
    let test = "four_processes_keep_the_invariants";
    let seed = seed(test);
    let (url, mut conn) = fresh_database("processes");
    let setup = workload::setup(&mut conn, 16, 3, 1_000);
    let campaigns: Vec<String> = setup.campaigns.iter().map(i64::to_string).collect();
    let files = Files(
        (0..PROCESSES)
            .map(|i| {
                std::env::temp_dir().join(format!(
                    "lockstock-worker-{}-{i}.history",
                    std::process::id()
                ))
            })
            .collect(),
    );
    // `LOCKSTOCK_SOAK_SECS` makes this a soak too.
    let run_for = std::env::var("LOCKSTOCK_SOAK_SECS")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .map_or(Duration::from_secs(4), Duration::from_secs);
    let exe = std::env::current_exe().expect("test binary");
    let started = Instant::now();
    let mut children: Vec<_> = files
        .0
        .iter()
        .enumerate()
        .map(|(i, out)| {
            lockstock_testkit::inherit_no_descriptors(&mut Command::new(&exe))
                .args(["--exact", WORKER_TEST, "--nocapture", "--test-threads=1"])
                .env(URL_ENV, &url)
                // Anything that would reach for a database goes to the parent's server.
                .env("DATABASE_URL", &url)
                .env(INDEX_ENV, i.to_string())
                .env(SEED_ENV, seed.wrapping_add(1_000 * i as u64).to_string())
                .env(MILLIS_ENV, run_for.as_millis().to_string())
                .env(ACCOUNTS_ENV, setup.accounts.to_string())
                .env(CAMPAIGNS_ENV, campaigns.join(","))
                .env(OUT_ENV, out)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("spawn a worker process")
        })
        .collect();
    let deadline = Instant::now() + run_for + Duration::from_secs(180);
    for child in &mut children {
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                assert!(status.success(), "worker failed: {status}");
                break;
            }
            if Instant::now() > deadline {
                for child in &mut children {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                panic!("workers did not finish in time");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let mut records: Vec<Record> = Vec::new();
    let mut windows: Vec<(u32, u128, u128)> = Vec::new();
    for path in &files.0 {
        let text = std::fs::read_to_string(path).expect("history of a worker");
        for line in text.lines() {
            if let Some(header) = line.strip_prefix("# ") {
                let fields: Vec<&str> = header.split(' ').collect();
                windows.push((
                    fields[0].parse().expect("pid"),
                    fields[1].parse().expect("start"),
                    fields[2].parse().expect("end"),
                ));
            } else {
                records.push(line.parse().expect("record"));
            }
        }
    }
    assert_eq!(windows.len(), PROCESSES, "a worker wrote no history");
    let mut pids: Vec<u32> = windows.iter().map(|w| w.0).collect();
    pids.sort_unstable();
    pids.dedup();
    assert_eq!(pids.len(), PROCESSES, "workers were not separate processes");
    assert!(!pids.contains(&std::process::id()));
    let latest_start = windows.iter().map(|w| w.1).max().unwrap_or(0);
    let earliest_end = windows.iter().map(|w| w.2).min().unwrap_or(0);
    assert!(
        latest_start < earliest_end,
        "the worker processes did not overlap: {windows:?}"
    );
    let summary = Summary::of(&records);
    eprintln!(
        "{test}: {PROCESSES} processes x {CLIENTS_PER_PROCESS} clients, {:?}, {:.1} s all running \
         at once; {summary}",
        started.elapsed(),
        (earliest_end - latest_start) as f64 / 1000.0
    );
    let violations = workload::verify(&mut conn, &setup, &records);
    for violation in violations.iter().take(30) {
        eprintln!("{test}: VIOLATION {violation}");
    }
    assert!(violations.is_empty(), "{} violations", violations.len());
    assert!(summary.ok > 0 && summary.unexpected == 0, "{summary}");
    eprintln!("{test}: violations found: 0");
}
