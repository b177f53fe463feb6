//! Shared by the sandbox and galera tests: reading processes from `/proc`, polling, and running
//! this test binary's own "child" test in a child process that is then killed.

use std::error::Error;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread::sleep;
use std::time::{Duration, Instant};

use diesel::QueryableByName;

pub type TestResult = Result<(), Box<dyn Error>>;

/// One `COUNT(*) AS n`.
#[derive(QueryableByName)]
pub struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub n: i64,
}

/// The process state letter from `/proc/<pid>/stat`; `None` if gone.
pub fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.chars().next()
}

/// The threads of `pid` that are neither stopped nor dead: `(thread id, state)`.
pub fn running_threads(pid: u32) -> Vec<(String, char)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| {
            let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
            let state = stat.rsplit_once(") ")?.1.chars().next()?;
            let tid = task.file_name().to_string_lossy().into_owned();
            (!matches!(state, 'T' | 't' | 'Z' | 'X')).then_some((tid, state))
        })
        .collect()
}

/// True if `pid` exists and is not a zombie (an orphaned, killed server may stay a zombie until
/// init reaps it).
pub fn process_alive(pid: u32) -> bool {
    !matches!(process_state(pid), Some('Z') | Some('X') | None)
}

/// Polls `done` every 20 ms for up to `timeout`; how long it took, `None` if it never held.
pub fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> Option<Duration> {
    let started = Instant::now();
    loop {
        if done() {
            return Some(started.elapsed());
        }
        if started.elapsed() > timeout {
            return None;
        }
        sleep(Duration::from_millis(20));
    }
}

/// The line a child test prints: `pids=<pid>,<pid>,... dir=<dir>`.
const REPORT: &str = "CHILD REPORT pids=";

/// Whether this process is a child that a parent test started with `child_env` set.
pub fn is_child(child_env: &str) -> bool {
    std::env::var_os(child_env).is_some()
}

/// What a killed child reported: its servers' pids and their directory.
pub type ChildReport = (Vec<u32>, PathBuf);

/// In the child: forgets `owner` (its `Drop` must never run: only the watchdog may clean up),
/// reports the server `pids` and their `dir` to the parent, then sleeps `hang` (until the parent
/// kills it).
pub fn report_and_hang<T>(owner: T, pids: &[u32], dir: &Path, hang: Duration) -> TestResult {
    std::mem::forget(owner);
    let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
    println!("{REPORT}{} dir={}", pids.join(","), dir.display());
    sleep(hang);
    Ok(())
}

/// Runs test `child_test` of this binary in a child process (with `child_env` set), waits up to
/// `timeout` for its [`report_and_hang`], then SIGKILLs it (no `Drop` runs) and returns the
/// pids and the directory it reported; `None` in the child itself (the parent test has nothing
/// to do there).
pub fn report_of_killed_child(
    child_test: &str,
    child_env: &str,
    timeout: Duration,
) -> Result<Option<ChildReport>, Box<dyn Error>> {
    if is_child(child_env) {
        return Ok(None);
    }
    let marker = REPORT;
    let mut child =
        lockstock_testkit::inherit_no_descriptors(&mut Command::new(std::env::current_exe()?))
            .args(["--exact", child_test, "--nocapture", "--test-threads=1"])
            .env(child_env, "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
    let stdout = child.stdout.take().ok_or("no child stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // The harness prints "test <name> ... " on the same line first.
            if let Some(at) = line.find(marker) {
                let _ = tx.send(line[at + marker.len()..].to_string());
                return;
            }
        }
    });
    let line = rx.recv_timeout(timeout);
    child.kill()?; // SIGKILL: no Drop runs.
    child.wait()?;
    let line = line.map_err(|_| "the child did not report")?;
    let (pids, dir) = line.split_once(" dir=").ok_or("bad child report")?;
    let pids = pids.split(',').map(str::parse).collect::<Result<_, _>>()?;
    Ok(Some((pids, PathBuf::from(dir))))
}

/// `dir` is named `<prefix>-<this process's pid>-<n>`, as the cleanup checks expect.
pub fn assert_named_for_this_process(dir: &Path, prefix: &str) -> TestResult {
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or("bad dir name")?;
    let expected = format!("{prefix}-{}-", std::process::id());
    assert!(
        name.starts_with(&expected),
        "{name} does not start with {expected}"
    );
    Ok(())
}
