//! Integration tests for `lockstock_testkit::galera` against real MariaDB Galera nodes.
//!
//! Every test starts its own cluster; they run in parallel, so keep them few.

use std::error::Error;
use std::time::{Duration, Instant};

use diesel::prelude::*;
use lockstock_testkit::galera::{GaleraCluster, GaleraError};

mod common;
use common::{
    assert_named_for_this_process, is_child, process_alive, process_state, report_and_hang,
    report_of_killed_child, running_threads, wait_until, Count, TestResult,
};

const CHILD_ENV: &str = "LOCKSTOCK_GALERA_CHILD";
const CHILD_TEST: &str = "galera_child_starts_cluster_and_sleeps";

/// `SELECT COUNT(*)`-like query on a fresh connection with causal reads.
fn count(url: &str, query: &str) -> Result<i64, Box<dyn Error>> {
    let mut conn = MysqlConnection::establish(url)?;
    diesel::sql_query("SET SESSION wsrep_sync_wait = 1").execute(&mut conn)?;
    let rows: Vec<Count> = diesel::sql_query(query).load(&mut conn)?;
    Ok(rows.first().map_or(-1, |r| r.n))
}

fn exec(url: &str, statement: &str) -> Result<usize, Box<dyn Error>> {
    let mut conn = MysqlConnection::establish(url)?;
    Ok(diesel::sql_query(statement).execute(&mut conn)?)
}

/// Processes (not zombies) whose command line mentions `dir`.
fn processes_on(dir: &std::path::Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmdline).contains(&format!("{needle}/")) && process_alive(pid) {
            found.push(pid);
        }
    }
    found
}

#[test]
fn galera_start_write_on_one_node_read_on_the_others() -> TestResult {
    let started = Instant::now();
    let cluster = GaleraCluster::start(3)?;
    eprintln!("GaleraCluster::start(3) took {:?}", started.elapsed());

    assert_eq!(cluster.nodes(), 3);
    assert_named_for_this_process(cluster.dir(), "lockstock-galera")?;
    let mut ports = Vec::new();
    for node in 0..3 {
        let status = cluster.status(node)?;
        assert!(status.is_synced(), "node {node}: {status:?}");
        assert_eq!(status.cluster_size, 3);
        assert!(process_alive(cluster.pid(node).ok_or("no pid")?));
        assert!(cluster.data_dir(node).starts_with(cluster.dir()));
        assert!(cluster.socket_path(node).as_os_str().len() < 100);
        let p = cluster.ports(node);
        ports.extend([p.client, p.gcomm, p.ist, p.sst]);
    }
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 12, "ports must be distinct");
    assert!(cluster.cluster_address().starts_with("gcomm://127.0.0.1:"));
    assert!(matches!(
        cluster.status(3),
        Err(GaleraError::NoSuchNode { node: 3, nodes: 3 })
    ));

    let urls = cluster.create_database("gal_basic")?;
    assert_eq!(urls.len(), 3);
    assert_eq!(urls[2], cluster.url(2, "gal_basic"));
    exec(
        &urls[0],
        "CREATE TABLE t (id INT PRIMARY KEY AUTO_INCREMENT, v INT NOT NULL) ENGINE=InnoDB",
    )?;
    exec(&urls[0], "INSERT INTO t (v) VALUES (1), (2), (3)")?;
    for (node, url) in urls.iter().enumerate().skip(1) {
        assert_eq!(count(url, "SELECT CAST(SUM(v) AS SIGNED) AS n FROM t")?, 6);
        // Also over TCP.
        assert_eq!(
            count(
                &cluster.tcp_url(node, "gal_basic"),
                "SELECT COUNT(*) AS n FROM t"
            )?,
            3
        );
    }
    // Writes on any node (multi-primary).
    exec(
        &cluster.tcp_url(2, "gal_basic"),
        "INSERT INTO t (v) VALUES (4)",
    )?;
    assert_eq!(count(&urls[1], "SELECT COUNT(*) AS n FROM t")?, 4);
    Ok(())
}

#[test]
fn galera_kill_node_then_restart_rejoins_with_missed_rows() -> TestResult {
    let mut cluster = GaleraCluster::start(3)?;
    let urls = cluster.create_database("gal_crash")?;
    exec(
        &urls[1],
        "CREATE TABLE t (id INT PRIMARY KEY, v INT NOT NULL) ENGINE=InnoDB",
    )?;
    exec(&urls[1], "INSERT INTO t VALUES (1, 10)")?;
    // Node 0 has applied both (a causal read) before it dies: killed while it was still
    // applying the CREATE TABLE, it once came back Synced without the table (a CI run on a
    // loaded machine: the server kept the position and lost the half-done DDL), which is the
    // server's recovery, not the missed rows this test is about.
    assert_eq!(
        count(&urls[0], "SELECT CAST(SUM(v) AS SIGNED) AS n FROM t")?,
        10
    );

    // Crash node 0, the one that bootstrapped the cluster.
    let old_pid = cluster.pid(0).ok_or("no pid")?;
    cluster.kill(0)?;
    assert_eq!(cluster.pid(0), None);
    assert!(!process_alive(old_pid));
    assert!(cluster.data_dir(0).is_dir());
    assert!(matches!(
        cluster.kill(0),
        Err(GaleraError::NodeNotRunning { node: 0 })
    ));
    assert!(matches!(
        cluster.status(0),
        Err(GaleraError::NodeNotRunning { node: 0 })
    ));

    // The others go on without it.
    let started = Instant::now();
    exec(&urls[1], "INSERT INTO t VALUES (2, 20)")?;
    exec(&urls[2], "INSERT INTO t VALUES (3, 30)")?;
    eprintln!("writes while node 0 was dead took {:?}", started.elapsed());
    let status = cluster.wait_synced(1, Duration::from_secs(30))?;
    eprintln!("node 1 after the kill: {status:?}");

    let started = Instant::now();
    let status = cluster.restart(0)?;
    eprintln!("restart(0) after kill took {:?}", started.elapsed());
    assert!(status.is_synced());
    assert_eq!(status.cluster_size, 3);
    assert_ne!(cluster.pid(0), Some(old_pid));
    assert_eq!(
        count(&urls[0], "SELECT CAST(SUM(v) AS SIGNED) AS n FROM t")?,
        60
    );
    let log = cluster.log_tail(0, 200_000);
    let ist = log.contains("IST received") || log.contains("Receiving IST");
    eprintln!(
        "node 0 rejoined with {}",
        if ist { "IST" } else { "a full SST" }
    );

    // A clean stop and restart of node 2.
    exec(&urls[0], "INSERT INTO t VALUES (4, 40)")?;
    let started = Instant::now();
    cluster.stop(2)?;
    eprintln!("stop(2) took {:?}", started.elapsed());
    exec(&urls[0], "INSERT INTO t VALUES (5, 50)")?;
    cluster.restart(2)?;
    assert_eq!(
        count(&urls[2], "SELECT CAST(SUM(v) AS SIGNED) AS n FROM t")?,
        150
    );
    let log = cluster.log_tail(2, 200_000);
    assert!(
        log.contains("IST received") || log.contains("Receiving IST"),
        "node 2 did not rejoin with IST:\n{}",
        cluster.log_tail(2, 6000)
    );
    Ok(())
}

#[test]
fn galera_pause_resume_and_drop_cleans_up() -> TestResult {
    let mut cluster = GaleraCluster::builder()
        .nodes(3)
        .provider_option("evs.keepalive_period=PT0.5S")
        .provider_option("evs.suspect_timeout=PT2S")
        .start()?;
    let urls = cluster.create_database("gal_pause")?;
    exec(
        &urls[0],
        "CREATE TABLE t (id INT PRIMARY KEY, v INT NOT NULL) ENGINE=InnoDB",
    )?;

    let pid = cluster.pid(2).ok_or("no pid")?;
    cluster.pause(2)?;
    assert!(cluster.is_paused(2));
    assert_eq!(process_state(pid), Some('T'));
    let running = running_threads(pid);
    assert!(running.is_empty(), "still running after pause: {running:?}");
    assert!(matches!(
        cluster.status(2),
        Err(GaleraError::NodePaused { node: 2 })
    ));
    // The write stalls until the others evict the paused node.
    let started = Instant::now();
    exec(&urls[0], "INSERT INTO t VALUES (1, 10)")?;
    eprintln!("a write with node 2 paused took {:?}", started.elapsed());
    // Nodes 0 and 1 synced in a view of their own (a stuck one bootstrapped: see
    // `wait_cluster_synced`) before node 1 takes a write.
    let started = Instant::now();
    let statuses = cluster.wait_cluster_synced(Duration::from_secs(30))?;
    eprintln!("node 2 evicted after {:?} more", started.elapsed());
    assert!(statuses[..2]
        .iter()
        .all(|s| s.as_ref().is_some_and(|s| s.cluster_size == 2)));
    exec(&urls[1], "INSERT INTO t VALUES (2, 20)")?;

    cluster.resume(2)?;
    assert!(!cluster.is_paused(2));
    assert_eq!(cluster.pid(2), Some(pid));
    // Right after SIGCONT node 2 still reports its old view; wait until it
    // noticed the eviction and rejoined.
    let started = Instant::now();
    let statuses = cluster.wait_cluster_synced(Duration::from_secs(60))?;
    eprintln!(
        "cluster synced {:?} after resume: {:?}",
        started.elapsed(),
        statuses[2]
    );
    assert!(statuses
        .iter()
        .all(|s| s.as_ref().is_some_and(|s| s.cluster_size == 3)));
    assert_eq!(
        count(&urls[2], "SELECT CAST(SUM(v) AS SIGNED) AS n FROM t")?,
        30
    );

    // Live nodes that are a majority but stay non-Primary are bootstrapped. Node 2 weighs as
    // much as nodes 0 and 1 together (2 of 4), so neither side keeps the quorum when it is
    // paused: the state a view change Galera fails to agree on leaves nodes 0 and 1 in.
    exec(
        &urls[2],
        "SET GLOBAL wsrep_provider_options = 'pc.weight=2'",
    )?;
    cluster.pause(2)?;
    let stuck = wait_until(Duration::from_secs(30), || {
        cluster
            .status(0)
            .is_ok_and(|s| s.cluster_size == 2 && s.cluster_status == "non-Primary")
    });
    assert!(stuck.is_some(), "nodes 0 and 1 did not lose the quorum");
    let started = Instant::now();
    let statuses = cluster.wait_cluster_synced(Duration::from_secs(60))?;
    eprintln!(
        "nodes 0 and 1 Primary again {:?} later: {statuses:?}",
        started.elapsed()
    );
    assert!(statuses[2].is_none());
    let (first, second) = (
        statuses[0].as_ref().ok_or("node 0")?,
        statuses[1].as_ref().ok_or("node 1")?,
    );
    assert!(first.is_synced() && second.is_synced());
    assert_eq!((first.cluster_size, second.cluster_size), (2, 2));
    assert_eq!(first.conf_id, second.conf_id);
    exec(&urls[1], "INSERT INTO t VALUES (3, 30)")?;
    cluster.resume(2)?;
    cluster.wait_cluster_synced(Duration::from_secs(60))?;
    assert_eq!(
        count(&urls[2], "SELECT CAST(SUM(v) AS SIGNED) AS n FROM t")?,
        60
    );

    // Dropping a cluster with a paused node leaves nothing behind.
    cluster.pause(1)?;
    let pids: Vec<u32> = (0..3).filter_map(|n| cluster.pid(n)).collect();
    let dir = cluster.dir().to_path_buf();
    drop(cluster);
    for pid in pids {
        assert!(!process_alive(pid), "server {pid} still alive");
    }
    assert!(!dir.exists(), "{} still exists", dir.display());
    assert_eq!(processes_on(&dir), Vec::<u32>::new());
    Ok(())
}

/// Run only as a child of `galera_interrupted_owner_leaves_nothing_behind`.
#[test]
fn galera_child_starts_cluster_and_sleeps() -> TestResult {
    if !is_child(CHILD_ENV) {
        return Ok(());
    }
    let mut cluster = GaleraCluster::start(2)?;
    cluster.pause(1)?;
    let pids: Vec<u32> = (0..2).filter_map(|n| cluster.pid(n)).collect();
    let dir = cluster.dir().to_path_buf();
    report_and_hang(cluster, &pids, &dir, Duration::from_secs(120))
}

#[test]
fn galera_interrupted_owner_leaves_nothing_behind() -> TestResult {
    let Some((pids, dir)) = report_of_killed_child(CHILD_TEST, CHILD_ENV, Duration::from_secs(90))?
    else {
        return Ok(());
    };
    assert_eq!(pids.len(), 2);

    let took = wait_until(Duration::from_secs(10), || {
        pids.iter().all(|&p| !process_alive(p)) && !dir.exists()
    });
    assert!(
        took.is_some(),
        "after 10 s: servers alive={:?} dir exists={}",
        pids.iter().map(|&p| process_alive(p)).collect::<Vec<_>>(),
        dir.exists()
    );
    assert_eq!(processes_on(&dir), Vec::<u32>::new());
    eprintln!("watchdog cleaned up the cluster {took:?} after the kill");
    Ok(())
}

const PANIC_CHILD_ENV: &str = "LOCKSTOCK_GALERA_PANIC_CHILD";
const PANIC_CHILD_TEST: &str = "galera_child_panics_with_a_cluster";

/// In the child process only: a test that fails while its (one-node) cluster is alive.
#[test]
fn galera_child_panics_with_a_cluster() -> TestResult {
    if !is_child(PANIC_CHILD_ENV) {
        return Ok(());
    }
    let cluster = GaleraCluster::start(1)?;
    assert!(cluster.log_tail(0, 8000).contains("ready for connections"));
    panic!("the child test fails with its cluster alive");
}

/// A test that fails with a Galera cluster alive shows each node's error log, which is removed
/// with the cluster's directory right after.
#[test]
fn galera_a_failing_test_prints_its_nodes_error_logs() -> TestResult {
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
        stderr.contains("Galera node 0's error log") && stderr.contains("ready for connections"),
        "{stderr}"
    );
    Ok(())
}
