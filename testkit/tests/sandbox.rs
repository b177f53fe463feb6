//! Integration tests for `lockstock_testkit::sandbox` against a real MariaDB server.

use std::error::Error;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::sql_types::Integer;
use lockstock_testkit::sandbox::{database_url, Sandbox, SandboxError};

mod common;
use common::{
    assert_named_for_this_process, is_child, process_alive, process_state, report_and_hang,
    report_of_killed_child, running_threads, wait_until, Count, TestResult,
};

const CHILD_ENV: &str = "LOCKSTOCK_SANDBOX_CHILD";
const CHILD_TEST: &str = "child_starts_sandbox_and_sleeps";

fn select_one(url: &str) -> Result<i32, Box<dyn Error>> {
    let mut conn = MysqlConnection::establish(url)?;
    Ok(diesel::select(diesel::dsl::sql::<Integer>("1")).get_result(&mut conn)?)
}

#[test]
fn start_create_database_and_query() -> TestResult {
    let started = Instant::now();
    let sandbox = Sandbox::start()?;
    eprintln!("Sandbox::start took {:?}", started.elapsed());

    let pid = sandbox.pid().ok_or("no pid after start")?;
    assert!(process_alive(pid));
    assert!(sandbox.data_dir().is_dir());
    assert!(sandbox.socket_path().starts_with(sandbox.data_dir()));
    assert!(sandbox.socket_path().as_os_str().len() < 100);
    assert_named_for_this_process(sandbox.data_dir(), "lockstock-sandbox")?;

    let url = sandbox.create_database("sbx_basic")?;
    assert_eq!(url, sandbox.url("sbx_basic"));
    assert!(url.starts_with("mysql://root@localhost/sbx_basic?unix_socket="));
    assert_eq!(select_one(&url)?, 1);
    // Idempotent.
    assert_eq!(sandbox.create_database("sbx_basic")?, url);

    let mut conn = MysqlConnection::establish(&url)?;
    let rows: Vec<Count> = diesel::sql_query(
        "SELECT COUNT(*) AS n FROM information_schema.schemata \
         WHERE schema_name = 'sbx_basic' AND default_character_set_name = 'utf8mb4'",
    )
    .load(&mut conn)?;
    assert_eq!(rows.first().map(|r| r.n), Some(1));

    for bad in [
        "",
        "bad-name",
        "x`; DROP DATABASE mysql; --",
        &"a".repeat(65),
    ] {
        assert!(
            matches!(
                sandbox.create_database(bad),
                Err(SandboxError::InvalidDatabaseName { .. })
            ),
            "{bad:?} accepted"
        );
    }
    Ok(())
}

#[test]
fn kill_then_restart_keeps_committed_data() -> TestResult {
    let mut sandbox = Sandbox::start()?;
    let url = sandbox.create_database("sbx_crash")?;
    {
        let mut conn = MysqlConnection::establish(&url)?;
        diesel::sql_query("CREATE TABLE t (id INT PRIMARY KEY, v INT NOT NULL) ENGINE=InnoDB")
            .execute(&mut conn)?;
        conn.transaction(|conn| {
            diesel::sql_query("INSERT INTO t VALUES (1, 10), (2, 20)").execute(conn)?;
            Ok::<_, diesel::result::Error>(())
        })?;
        diesel::sql_query("UPDATE t SET v = v + 1 WHERE id = 2").execute(&mut conn)?;
    }
    let old_pid = sandbox.pid().ok_or("no pid")?;

    sandbox.kill()?;
    assert_eq!(sandbox.pid(), None);
    assert!(!process_alive(old_pid));
    assert!(sandbox.data_dir().is_dir(), "kill must keep the data dir");
    assert!(MysqlConnection::establish(&url).is_err());
    assert!(matches!(sandbox.kill(), Err(SandboxError::NotRunning)));
    assert!(matches!(
        sandbox.create_database("sbx_other"),
        Err(SandboxError::NotRunning)
    ));

    let started = Instant::now();
    sandbox.restart()?;
    eprintln!("restart after kill took {:?}", started.elapsed());
    let new_pid = sandbox.pid().ok_or("no pid after restart")?;
    assert_ne!(new_pid, old_pid);

    let mut conn = MysqlConnection::establish(&url)?;
    let rows: Vec<Count> =
        diesel::sql_query("SELECT CAST(SUM(v) AS SIGNED) AS n FROM t").load(&mut conn)?;
    assert_eq!(rows.first().map(|r| r.n), Some(31));
    Ok(())
}

#[test]
fn stop_then_restart() -> TestResult {
    let mut sandbox = Sandbox::start()?;
    let url = sandbox.create_database("sbx_stop")?;
    let old_pid = sandbox.pid().ok_or("no pid")?;

    let started = Instant::now();
    sandbox.stop()?;
    eprintln!("stop took {:?}", started.elapsed());
    assert_eq!(sandbox.pid(), None);
    assert!(!process_alive(old_pid));
    let log = std::fs::read_to_string(sandbox.data_dir().join("error.log"))?;
    assert!(
        log.contains("Shutdown complete"),
        "not a clean shutdown:\n{log}"
    );
    assert!(matches!(sandbox.stop(), Err(SandboxError::NotRunning)));

    sandbox.restart()?;
    assert_eq!(select_one(&url)?, 1);

    // Restarting a running server stops it first.
    let pid = sandbox.pid().ok_or("no pid")?;
    sandbox.restart()?;
    assert_ne!(sandbox.pid(), Some(pid));
    assert!(!process_alive(pid));
    assert_eq!(select_one(&url)?, 1);
    Ok(())
}

#[test]
fn drop_kills_server_and_removes_data_dir() -> TestResult {
    let sandbox = Sandbox::start()?;
    let pid = sandbox.pid().ok_or("no pid")?;
    let dir = sandbox.data_dir().to_path_buf();
    drop(sandbox);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "server {pid} still exists"
    );
    assert!(!dir.exists(), "{} still exists", dir.display());
    Ok(())
}

#[test]
fn pause_freezes_the_server_until_resumed_and_stop_resumes_first() -> TestResult {
    let mut sandbox = Sandbox::start()?;
    let url = sandbox.create_database("sbx_pause")?;
    let pid = sandbox.pid().ok_or("no pid")?;
    let mut conn = MysqlConnection::establish(&url)?;

    sandbox.pause()?;
    assert!(sandbox.is_paused());
    assert_eq!(process_state(pid), Some('T'), "server {pid} not stopped");
    // A new database on the paused server is refused at once (before: its connection waited
    // for a greeting for ever).
    let created = std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel();
        let sandbox = &sandbox;
        s.spawn(move || {
            let _ = tx.send(sandbox.create_database("sbx_paused"));
        });
        let answer = rx.recv_timeout(Duration::from_secs(5));
        if answer.is_err() {
            // Let the hung connection go, so that the scope ends and the test fails.
            let _ = std::process::Command::new("kill")
                .args(["-CONT", &pid.to_string()])
                .status();
        }
        answer
    });
    assert!(
        matches!(created, Ok(Err(SandboxError::Paused))),
        "{created:?}"
    );
    // A query on the paused server gets no answer until the server is resumed.
    let (tx, rx) = std::sync::mpsc::channel();
    let query = std::thread::spawn(move || {
        let one: QueryResult<i32> =
            diesel::select(diesel::dsl::sql::<Integer>("1")).get_result(&mut conn);
        let _ = tx.send(one.is_ok());
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(500)).is_err(),
        "a paused server answered"
    );
    sandbox.resume()?;
    assert!(!sandbox.is_paused());
    assert!(
        rx.recv_timeout(Duration::from_secs(10))?,
        "the query failed after resume"
    );
    query.join().map_err(|_| "query thread panicked")?;

    // Stopping a paused server resumes it first: a clean shutdown, no stopped leftover.
    sandbox.pause()?;
    sandbox.stop()?;
    assert!(!sandbox.is_paused());
    assert!(!process_alive(pid));
    let log = std::fs::read_to_string(sandbox.data_dir().join("error.log"))?;
    assert!(
        log.contains("Shutdown complete"),
        "not a clean shutdown:\n{log}"
    );
    assert!(matches!(sandbox.pause(), Err(SandboxError::NotRunning)));

    // Dropping a paused sandbox leaves neither the server nor its directory behind.
    sandbox.restart()?;
    let pid = sandbox.pid().ok_or("no pid")?;
    let dir = sandbox.data_dir().to_path_buf();
    sandbox.pause()?;
    drop(sandbox);
    assert!(!process_alive(pid), "paused server {pid} still exists");
    assert!(!dir.exists(), "{} still exists", dir.display());
    Ok(())
}

/// `pause` returns once the server answers nothing more: every one of its threads is stopped
/// (SIGSTOP is delivered asynchronously; a server under load answered a whole transaction
/// after `pause` had returned when it only sent the signal).
#[test]
fn pause_returns_once_every_thread_has_stopped() -> TestResult {
    let mut sandbox = Sandbox::start()?;
    let url = sandbox.create_database("sbx_pause_stops")?;
    let pid = sandbox.pid().ok_or("no pid")?;
    // Clients querying without a pause keep the server's threads running.
    let answers = std::sync::Arc::new(AtomicU64::new(0));
    let done = std::sync::Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (url, answers, done) = (url.clone(), answers.clone(), done.clone());
            std::thread::spawn(move || -> Result<(), String> {
                let mut conn = MysqlConnection::establish(&url).map_err(|e| e.to_string())?;
                while !done.load(Ordering::Relaxed) {
                    diesel::select(diesel::dsl::sql::<Integer>("1"))
                        .get_result::<i32>(&mut conn)
                        .map_err(|e| e.to_string())?;
                    answers.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();
    for round in 0..20 {
        std::thread::sleep(Duration::from_millis(20));
        sandbox.pause()?;
        let running = running_threads(pid);
        let at_pause = answers.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(50));
        // Each client may count the one answer it read before the pause.
        let later = answers.load(Ordering::Relaxed) - at_pause;
        sandbox.resume()?;
        assert!(
            running.is_empty(),
            "round {round}: threads still running after pause: {running:?}"
        );
        assert!(
            later <= 4,
            "round {round}: {later} answers after pause returned"
        );
    }
    done.store(true, Ordering::Relaxed);
    for client in clients {
        client.join().map_err(|_| "client panicked")??;
    }
    assert!(
        answers.load(Ordering::Relaxed) > 0,
        "no client was answered"
    );
    Ok(())
}

#[test]
fn database_url_uses_shared_sandbox_by_default() -> TestResult {
    let url = database_url("sbx_shared")?;
    assert_eq!(select_one(&url)?, 1);
    assert!(matches!(
        database_url("no-dashes"),
        Err(SandboxError::InvalidDatabaseName { .. })
    ));
    if std::env::var_os("DATABASE_URL").is_some_and(|v| !v.is_empty()) {
        eprintln!("DATABASE_URL is set; not checking the shared sandbox");
        return Ok(());
    }
    let shared = Sandbox::shared()?;
    assert_eq!(url, shared.url("sbx_shared"));
    assert!(std::ptr::eq(shared, Sandbox::shared()?));
    assert_eq!(database_url("sbx_shared")?, url);
    Ok(())
}

/// Run only as a child of `interrupted_process_leaves_nothing_behind`.
#[test]
fn child_starts_sandbox_and_sleeps() -> TestResult {
    if !is_child(CHILD_ENV) {
        return Ok(());
    }
    let sandbox = Sandbox::start()?;
    let pid = sandbox.pid().ok_or("no pid")?;
    let dir = sandbox.data_dir().to_path_buf();
    report_and_hang(sandbox, &[pid], &dir, Duration::from_secs(60))
}

#[test]
fn interrupted_process_leaves_nothing_behind() -> TestResult {
    let Some((pids, dir)) = report_of_killed_child(CHILD_TEST, CHILD_ENV, Duration::from_secs(30))?
    else {
        return Ok(());
    };
    let [pid] = pids[..] else {
        return Err(format!("one server pid expected: {pids:?}").into());
    };
    assert!(dir.is_dir() || !process_alive(pid));

    let took = wait_until(Duration::from_secs(5), || {
        !process_alive(pid) && !dir.exists()
    });
    assert!(
        took.is_some(),
        "after 5 s: server alive={} dir exists={}",
        process_alive(pid),
        dir.exists()
    );
    eprintln!("watchdog cleaned up {:?} after the kill", took);
    Ok(())
}

const PANIC_CHILD_ENV: &str = "LOCKSTOCK_SANDBOX_PANIC_CHILD";
const PANIC_CHILD_TEST: &str = "child_panics_with_a_sandbox";

/// In the child process only: a test that fails while its sandbox is alive.
#[test]
fn child_panics_with_a_sandbox() -> TestResult {
    if !is_child(PANIC_CHILD_ENV) {
        return Ok(());
    }
    let sandbox = Sandbox::start()?;
    assert!(sandbox
        .error_log_tail(4000)
        .contains("ready for connections"));
    panic!("the child test fails with its sandbox alive");
}

/// A test that fails with a sandbox alive shows the server's error log (its InnoDB messages),
/// which is removed with the sandbox's directory right after.
#[test]
fn a_failing_test_prints_its_sandbox_servers_error_log() -> TestResult {
    if is_child(PANIC_CHILD_ENV) {
        return Ok(());
    }
    let output = std::process::Command::new(std::env::current_exe()?)
        .args([
            "--exact",
            PANIC_CHILD_TEST,
            "--nocapture",
            "--test-threads=1",
        ])
        .env(PANIC_CHILD_ENV, "1")
        .stdin(std::process::Stdio::null())
        .output()?;
    assert!(!output.status.success(), "the child test fails");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("the sandbox server's error log")
            && stderr.contains("ready for connections"),
        "{stderr}"
    );
    Ok(())
}
