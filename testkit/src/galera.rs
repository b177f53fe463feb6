//! A throwaway MariaDB Galera cluster on loopback, for tests of what
//! lockstock does when the database is a synchronous multi-primary cluster
//! (certification conflicts, node crashes, stalls, state transfers).
//!
//! [`GaleraCluster::start`] creates a directory `lockstock-galera-<pid>-<n>`
//! under the system temp directory with one data directory per node
//! (`node0`, `node1`, ...), initialises `node0` with `mariadb-install-db`,
//! bootstraps the cluster on it (`--wsrep-new-cluster`) and then starts the
//! other nodes, which join with a full state transfer (SST, `rsync`). It
//! returns when every node reports `wsrep_ready = ON`,
//! `wsrep_local_state_comment = Synced` and `wsrep_cluster_size = n` (about
//! 10 s for three nodes on a 2-core machine).
//!
//! Every node listens on 127.0.0.1 only, on four free ports picked at start
//! (see [`NodePorts`]): the client port, group communication
//! (`gmcast.listen_addr`), incremental state transfer (`ist.recv_addr`) and
//! full state transfer (`wsrep_sst_receive_address`). Clients can also use
//! the Unix socket `mysqld.sock` in the node's data directory. The nodes are
//! kept small: 32 MiB buffer pool, 16 MiB redo log, 32 MiB gcache,
//! performance_schema off. When the owning process runs as root the servers
//! run as the `mysql` user (the data directories are chowned to it), because
//! the rsync SST script refuses to work otherwise.
//!
//! Per node you can [`kill`](GaleraCluster::kill) (SIGKILL, a crash),
//! [`stop`](GaleraCluster::stop) (a clean leave), [`restart`](GaleraCluster::restart)
//! (rejoin, with an incremental state transfer when the gcache still holds
//! the missed write sets), [`pause`](GaleraCluster::pause) (SIGSTOP: the node
//! stalls, the others evict it after `evs.suspect_timeout`, 5 s by default)
//! and [`resume`](GaleraCluster::resume) (SIGCONT), and read its
//! [`status`](GaleraCluster::status).
//!
//! # Cleanup
//!
//! The same guarantees as the [`Sandbox`](crate::sandbox::Sandbox):
//! dropping the cluster SIGKILLs every node (with its process group, which
//! holds the state-transfer helpers such as the rsync daemon; paused nodes
//! included) and removes the directory. A watchdog shell process follows the
//! owning process and does the same when `Drop` never runs (SIGKILL, Ctrl-C,
//! `std::process::exit`, a `static`): it kills every process whose command
//! line mentions the cluster directory and removes it.
//!
//! # Requirements
//!
//! `mariadbd` and `mariadb-install-db` as for the sandbox, the Galera 4
//! provider (`LOCKSTOCK_GALERA_PROVIDER`, else
//! `/usr/lib/galera/libgalera_smm.so` or the other usual places) and
//! `rsync` plus MariaDB's `wsrep_sst_rsync` script on `PATH`. On
//! Debian/Ubuntu: `apt-get install mariadb-server galera-4 rsync`.
//!
//! # Example
//!
//! ```no_run
//! use diesel::prelude::*;
//! use lockstock_testkit::galera::GaleraCluster;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut cluster = GaleraCluster::start(3)?;
//! let urls = cluster.create_database("example")?; // one URL per node
//! let mut conn = MysqlConnection::establish(&urls[0])?;
//! diesel::sql_query("CREATE TABLE t (id INT PRIMARY KEY) ENGINE=InnoDB").execute(&mut conn)?;
//! diesel::sql_query("INSERT INTO t VALUES (1)").execute(&mut conn)?;
//!
//! // Read it on another node; `wsrep_sync_wait` makes the read causal.
//! let mut other = MysqlConnection::establish(&cluster.url(1, "example"))?;
//! diesel::sql_query("SET SESSION wsrep_sync_wait = 1").execute(&mut other)?;
//!
//! // Crash node 2 and bring it back; `restart` waits until it is Synced.
//! cluster.kill(2)?;
//! cluster.restart(2)?;
//! assert_eq!(cluster.status(2)?.state_comment, "Synced");
//! # Ok(())
//! # }
//! ```

use std::collections::HashSet;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, PoisonError};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use diesel::connection::SimpleConnection;
use diesel::sql_types::Text;
use diesel::{Connection, MysqlConnection, QueryableByName, RunQueryDsl};

use crate::sandbox::{
    create_database_on, find_install_db, find_mariadbd, flag, io_err, is_root, kill_and_reap,
    make_private_dir_for, percent_encode, read_tail, remove_watched_dir, request_shutdown,
    run_install_db, search_path, server_command, spawn_detached, spawn_watchdog_script,
    validate_database_name, wait_stopped, wait_timeout, write_atomically, SandboxError, ERROR_LOG,
    FAILED_TEST_LOG_BYTES, SOCKET_NAME, STOP_TIMEOUT,
};

/// Number of nodes of [`GaleraCluster::builder`]'s default cluster.
pub const DEFAULT_NODES: usize = 3;
/// Most nodes a cluster may have here.
const MAX_NODES: usize = 9;
/// How long [`GaleraBuilder::start`] waits for the whole cluster by default.
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// How long [`GaleraCluster::restart`] waits for the node to be Synced.
const RESTART_TIMEOUT: Duration = Duration::from_secs(90);
/// Poll interval while waiting for nodes.
const POLL: Duration = Duration::from_millis(100);

/// How long nodes that are a majority of the cluster may stay together in a non-Primary
/// component before a [`StuckMajority`] bootstraps them: Galera forms the Primary component
/// within a second of the view that makes it possible.
pub const STUCK_MAJORITY: Duration = Duration::from_secs(5);

const GRASTATE: &str = "grastate.dat";
/// User the servers run as when we are root.
const SERVER_USER: &str = "mysql";

/// Ports handed out by this process (they are only probed, not held).
static PORTS_GIVEN: Mutex<Option<PortCursor>> = Mutex::new(None);

/// Watchdog run by `/bin/sh -c`; `$1` = owning process id, `$2` = cluster dir (the body of
/// [`spawn_watchdog_script`]).
///
/// Collects into `$pids` the servers whose pids are in `$2/node*.pid.lockstock` and every
/// process whose argv mentions `$2/` (the servers and their SST scripts and rsync daemons),
/// and SIGKILLs each with its process group. (`kill -s KILL -- -pgid`: Debian's `/bin/sh`,
/// dash, refuses `kill -9 -- -pgid` as "Illegal number" and killed no group.)
const WATCHDOG_SCRIPT: &str = r#"
for f in "$dir"/node*.pid.lockstock; do
  p=$(cat "$f" 2>/dev/null)
  case "$p" in
    ''|*[!0-9]*) continue ;;
  esac
  if [ -d /proc/self ]; then
    if tr '\000' '\n' < "/proc/$p/cmdline" 2>/dev/null | grep -qF -e "$dir/"; then
      pids="$pids $p"
    fi
  else
    pids="$pids $p"
  fi
done
add_argv_matches "" "$dir/"
for q in $pids; do
  kill -s KILL -- "-$q" 2>/dev/null
  kill -s KILL "$q" 2>/dev/null
done
"#;

/// Errors of [`GaleraCluster`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GaleraError {
    /// What the cluster shares with the sandbox: a missing `mariadbd` or
    /// `mariadb-install-db`, I/O, `mariadb-install-db` failures, SQL and
    /// connection errors, invalid database names.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    /// The Galera provider library or a tool the rsync state transfer needs
    /// was not found.
    #[error(
        "cannot find {name}: install galera-4 and rsync (Debian/Ubuntu: \
         `apt-get install galera-4 rsync`) or set LOCKSTOCK_GALERA_PROVIDER"
    )]
    Missing {
        /// What was looked for.
        name: String,
    },
    /// The servers must run as `mysql` when we are root, but there is no such user.
    #[error("running as root, but there is no `mysql` user to run the Galera nodes as")]
    NoServerUser,
    /// [`GaleraBuilder::nodes`] outside `1..=9`.
    #[error("a Galera cluster here has 1 to 9 nodes, not {nodes}")]
    InvalidNodeCount {
        /// The rejected count.
        nodes: usize,
    },
    /// A node index `>=` the number of nodes.
    #[error("no node {node}: the cluster has {nodes} nodes")]
    NoSuchNode {
        /// The rejected index.
        node: usize,
        /// Number of nodes.
        nodes: usize,
    },
    /// The operation needs a running node, but it was killed or stopped.
    #[error("node {node} is not running")]
    NodeNotRunning {
        /// The node.
        node: usize,
    },
    /// The operation would hang on a paused (SIGSTOPped) node; resume it first.
    #[error("node {node} is paused")]
    NodePaused {
        /// The node.
        node: usize,
    },
    /// A node's server exited while we were waiting for it.
    #[error("node {node} exited ({status}); error log tail:\n{log_tail}")]
    NodeExited {
        /// The node.
        node: usize,
        /// Its exit status.
        status: String,
        /// Tail of its error log.
        log_tail: String,
    },
    /// A node was not Synced (ready, Primary, expected cluster size) in time.
    #[error(
        "node {node} not synced within {waited:?} (last status: {last}); error log tail:\n{log_tail}"
    )]
    Timeout {
        /// The node.
        node: usize,
        /// How long we waited.
        waited: Duration,
        /// Its last status, or the last error getting it.
        last: String,
        /// Tail of its error log.
        log_tail: String,
    },
    /// Sending a signal to a node failed.
    #[error("cannot send SIG{signal} to node {node}: {message}")]
    Signal {
        /// The node.
        node: usize,
        /// The signal name (`STOP`, `CONT`, `KILL`).
        signal: &'static str,
        /// What `kill` said.
        message: String,
    },
}

fn gio_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> GaleraError {
    let f = io_err(context);
    move |source| GaleraError::Sandbox(f(source))
}

/// The loopback ports of one node (all on 127.0.0.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodePorts {
    /// MariaDB client protocol (`--port`).
    pub client: u16,
    /// Group communication (`gmcast.listen_addr`); the cluster address lists these.
    pub gcomm: u16,
    /// Incremental state transfer (`ist.recv_addr`).
    pub ist: u16,
    /// Full state transfer, the rsync daemon of a joiner (`wsrep_sst_receive_address`).
    pub sst: u16,
}

/// What a node says about itself (`SHOW GLOBAL STATUS LIKE 'wsrep%'`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    /// `wsrep_ready = ON`: the node accepts queries.
    pub ready: bool,
    /// `wsrep_local_state_comment`: `Synced`, `Donor/Desynced`, `Joining`, `Joined`, ...
    pub state_comment: String,
    /// `wsrep_cluster_size`: members of the node's current view.
    pub cluster_size: u64,
    /// `wsrep_cluster_status`: `Primary`, `non-Primary` or `Disconnected`.
    pub cluster_status: String,
    /// `wsrep_cluster_conf_id`: the number of the Primary view the node is in (the same on
    /// every member of one Primary component; a node resumed after a pause reports its old
    /// view's number until it notices it was evicted). `u64::MAX` outside a Primary component.
    pub conf_id: u64,
}

impl NodeStatus {
    /// Ready, Synced and in the Primary component.
    pub fn is_synced(&self) -> bool {
        self.ready && self.state_comment == "Synced" && self.cluster_status == "Primary"
    }
}

/// Nodes that see each other, are a majority of the cluster and still stay outside the
/// Primary component: Galera failed to agree on a view change (its log says "no install
/// message received"), which happens on a loaded machine with
/// [`fast_eviction`](GaleraBuilder::fast_eviction)'s short timeouts, and it does not form the
/// Primary component by itself. [`watch`](Self::watch) bootstraps them (`pc.bootstrap=YES` on
/// the first) once they have stayed so for [`STUCK_MAJORITY`]. That is safe only where no
/// other component can be Primary: every node of a [`GaleraCluster`] is this process's, and
/// the ones outside `nodes` must be stopped, paused or cut off
/// ([`wait_cluster_synced`](GaleraCluster::wait_cluster_synced) watches the live nodes; a test
/// that kills or pauses a node watches the others).
#[derive(Debug, Default)]
pub struct StuckMajority {
    since: Option<Instant>,
}

impl StuckMajority {
    /// Looks at `nodes` once: stuck (a majority of `cluster`, each outside the Primary
    /// component in a view of exactly `nodes.len()` members) since the first such look for
    /// [`STUCK_MAJORITY`], they are bootstrapped; whether they were. A failed bootstrap is
    /// tried again after another [`STUCK_MAJORITY`].
    pub fn watch(&mut self, cluster: &GaleraCluster, nodes: &[usize]) -> bool {
        let stuck = nodes.len() * 2 > cluster.nodes()
            && nodes.iter().all(|&node| {
                cluster.status(node).is_ok_and(|status| {
                    status.cluster_status != "Primary" && status.cluster_size == nodes.len() as u64
                })
            });
        if !stuck {
            self.since = None;
            return false;
        }
        let since = *self.since.get_or_insert_with(Instant::now);
        if since.elapsed() < STUCK_MAJORITY {
            return false;
        }
        eprintln!(
            "galera: nodes {nodes:?} see each other but stayed non-Primary for {:?}; \
             bootstrapping a Primary component on node {}",
            since.elapsed(),
            nodes[0]
        );
        self.since = None;
        cluster.bootstrap_primary(nodes[0]).is_ok()
    }
}

#[derive(QueryableByName)]
struct StatusRow {
    #[diesel(sql_type = Text, column_name = "Variable_name")]
    name: String,
    #[diesel(sql_type = Text, column_name = "Value")]
    value: String,
}

#[derive(QueryableByName)]
struct CountRow {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

#[derive(Debug)]
struct Node {
    dir: PathBuf,
    socket: PathBuf,
    ports: NodePorts,
    server: Option<Child>,
    paused: bool,
}

/// Configures and starts a [`GaleraCluster`]; see [`GaleraCluster::builder`].
#[derive(Debug, Clone)]
pub struct GaleraBuilder {
    nodes: usize,
    provider_options: Vec<String>,
    server_args: Vec<OsString>,
    timeout: Duration,
}

impl Default for GaleraBuilder {
    fn default() -> Self {
        GaleraBuilder {
            nodes: DEFAULT_NODES,
            provider_options: Vec::new(),
            server_args: Vec::new(),
            timeout: START_TIMEOUT,
        }
    }
}

impl GaleraBuilder {
    /// Number of nodes, 1 to 9 (default 3).
    pub fn nodes(mut self, nodes: usize) -> Self {
        self.nodes = nodes;
        self
    }

    /// Appends `option` (`key=value`) to `wsrep_provider_options`, e.g.
    /// `evs.suspect_timeout=PT2S` to evict a paused node sooner.
    pub fn provider_option(mut self, option: impl Into<String>) -> Self {
        self.provider_options.push(option.into());
        self
    }

    /// Provider options that make the cluster evict a silent (paused, isolated) node within
    /// about 2-3 s instead of 5-15 s: `evs.keepalive_period=PT0.5S`,
    /// `evs.suspect_timeout=PT1.5S`, `evs.inactive_timeout=PT3S`,
    /// `evs.inactive_check_period=PT0.5S`. For fault tests that must stay short.
    pub fn fast_eviction(self) -> Self {
        self.provider_option("evs.keepalive_period=PT0.5S")
            .provider_option("evs.suspect_timeout=PT1.5S")
            .provider_option("evs.inactive_timeout=PT3S")
            .provider_option("evs.inactive_check_period=PT0.5S")
    }

    /// Appends a server option (e.g. `--wsrep-slave-threads=2`) to every node.
    pub fn server_arg(mut self, arg: impl Into<OsString>) -> Self {
        self.server_args.push(arg.into());
        self
    }

    /// How long [`start`](Self::start) waits for the cluster (default 90 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Creates the directories, bootstraps node 0, starts the others and
    /// waits until every node is ready, Synced and sees all `n` members.
    ///
    /// A start in which a node's server exits, or the cluster is not Synced in time, is tried
    /// once more from scratch (new directories and ports) after its error is printed to
    /// stderr: on a loaded machine a joiner's state transfer occasionally fails.
    pub fn start(self) -> Result<GaleraCluster, GaleraError> {
        match self.start_once() {
            Err(error @ (GaleraError::NodeExited { .. } | GaleraError::Timeout { .. })) => {
                eprintln!(
                    "lockstock-testkit: a Galera cluster did not start, trying once more: {error}"
                );
                self.start_once()
            }
            started => started,
        }
    }

    fn start_once(&self) -> Result<GaleraCluster, GaleraError> {
        if !(1..=MAX_NODES).contains(&self.nodes) {
            return Err(GaleraError::InvalidNodeCount { nodes: self.nodes });
        }
        let mariadbd = find_mariadbd()?;
        let install_db = find_install_db()?;
        let provider = find_provider()?;
        for tool in ["wsrep_sst_rsync", "rsync"] {
            if search_path(tool.as_ref()).is_none() {
                return Err(GaleraError::Missing {
                    name: format!("`{tool}` on PATH"),
                });
            }
        }
        let owner = if is_root() {
            Some(server_user_ids()?)
        } else {
            None
        };
        let dir = make_dir(owner.is_some())?;
        if owner.is_some() {
            // Private to root (0700) but for `mysql`, which runs the nodes: it may pass through
            // to the node directories it owns (0711: it cannot list this one).
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o711))
                .map_err(gio_err(format!("cannot open {} to mysql", dir.display())))?;
        }
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "lockstock-galera".into());
        // From here on, Drop removes the directory if anything fails.
        let mut cluster = GaleraCluster {
            dir,
            name,
            mariadbd,
            provider,
            run_as_mysql: owner.is_some(),
            provider_options: self.provider_options.clone(),
            server_args: self.server_args.clone(),
            nodes: Vec::new(),
            watchdog: None,
        };
        cluster.watchdog = Some(spawn_watchdog_script(
            WATCHDOG_SCRIPT,
            "lockstock-galera-watchdog",
            &cluster.dir,
        )?);
        let ports = free_ports(4 * self.nodes)?;
        for (i, p) in ports.chunks_exact(4).enumerate() {
            let dir = cluster.dir.join(format!("node{i}"));
            // Its owner's only (the socket inside lets in `root` without a password).
            std::os::unix::fs::DirBuilderExt::mode(&mut fs::DirBuilder::new(), 0o700)
                .create(&dir)
                .map_err(gio_err(format!("cannot create {}", dir.display())))?;
            if let Some((uid, gid)) = owner {
                std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
                    .map_err(gio_err(format!("cannot chown {} to mysql", dir.display())))?;
            }
            cluster.nodes.push(Node {
                socket: dir.join(SOCKET_NAME),
                dir,
                ports: NodePorts {
                    client: p[0],
                    gcomm: p[1],
                    ist: p[2],
                    sst: p[3],
                },
                server: None,
                paused: false,
            });
        }
        let started = Instant::now();
        run_install_db(
            &install_db,
            &cluster.nodes[0].dir,
            cluster.run_as_mysql.then_some(SERVER_USER),
        )?;
        cluster.spawn_server(0, true)?;
        cluster.wait_synced_inner(0, Some(1), self.timeout, false)?;
        for node in 1..self.nodes {
            cluster.spawn_server(node, false)?;
        }
        for node in 0..self.nodes {
            let left = self.timeout.saturating_sub(started.elapsed());
            cluster.wait_synced_inner(node, Some(self.nodes), left, true)?;
        }
        Ok(cluster)
    }
}

/// A throwaway MariaDB Galera cluster on loopback; see the
/// [module documentation](self).
///
/// Nodes are numbered from 0. Dropping the cluster kills every node and
/// deletes its directory.
#[derive(Debug)]
pub struct GaleraCluster {
    dir: PathBuf,
    name: String,
    mariadbd: PathBuf,
    provider: PathBuf,
    run_as_mysql: bool,
    provider_options: Vec<String>,
    server_args: Vec<OsString>,
    nodes: Vec<Node>,
    watchdog: Option<Child>,
}

impl GaleraCluster {
    /// Starts a cluster of `nodes` nodes (1 to 9; 3 is the usual choice)
    /// with the default settings; see [`GaleraBuilder::start`].
    pub fn start(nodes: usize) -> Result<GaleraCluster, GaleraError> {
        GaleraBuilder::default().nodes(nodes).start()
    }

    /// A builder for a cluster with other settings (provider options, server
    /// options, start timeout).
    pub fn builder() -> GaleraBuilder {
        GaleraBuilder::default()
    }

    /// Number of nodes (running or not).
    pub fn nodes(&self) -> usize {
        self.nodes.len()
    }

    /// The cluster directory `lockstock-galera-<pid>-<n>`, which holds the
    /// data directories `node0`, `node1`, ...
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cluster name (`wsrep_cluster_name`), the directory's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `gcomm://127.0.0.1:<gcomm port>,...` of all nodes.
    pub fn cluster_address(&self) -> String {
        let peers: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.ports.gcomm))
            .collect();
        format!("gcomm://{}", peers.join(","))
    }

    /// Diesel URL for `database` on `node` over its Unix socket:
    /// `mysql://root@localhost/{database}?unix_socket={socket}`.
    /// An empty `database` gives a URL without a default database.
    ///
    /// # Panics
    ///
    /// If `node >= self.nodes()`.
    pub fn url(&self, node: usize, database: &str) -> String {
        format!(
            "mysql://root@localhost/{database}?unix_socket={}",
            percent_encode(self.nodes[node].socket.as_os_str())
        )
    }

    /// Diesel URL for `database` on `node` over TCP:
    /// `mysql://root@127.0.0.1:{client port}/{database}`.
    ///
    /// # Panics
    ///
    /// If `node >= self.nodes()`.
    pub fn tcp_url(&self, node: usize, database: &str) -> String {
        format!(
            "mysql://root@127.0.0.1:{}/{database}",
            self.nodes[node].ports.client
        )
    }

    /// The ports of `node`.
    ///
    /// # Panics
    ///
    /// If `node >= self.nodes()`.
    pub fn ports(&self, node: usize) -> NodePorts {
        self.nodes[node].ports
    }

    /// The data directory of `node` (also holds its socket and `error.log`).
    ///
    /// # Panics
    ///
    /// If `node >= self.nodes()`.
    pub fn data_dir(&self, node: usize) -> &Path {
        &self.nodes[node].dir
    }

    /// Path of `node`'s Unix socket.
    ///
    /// # Panics
    ///
    /// If `node >= self.nodes()`.
    pub fn socket_path(&self, node: usize) -> &Path {
        &self.nodes[node].socket
    }

    /// Process id of `node`'s server; `None` after [`kill`](Self::kill) or
    /// [`stop`](Self::stop), or for a node index out of range.
    pub fn pid(&self, node: usize) -> Option<u32> {
        self.nodes.get(node)?.server.as_ref().map(Child::id)
    }

    /// Whether `node` is paused with [`pause`](Self::pause).
    pub fn is_paused(&self, node: usize) -> bool {
        self.nodes.get(node).is_some_and(|n| n.paused)
    }

    /// Runs ``CREATE DATABASE IF NOT EXISTS `name` `` (utf8mb4) on the first
    /// running, unpaused node, waits until every running, unpaused node has
    /// it and returns one [`url`](Self::url) per node (index = node).
    ///
    /// `name` must match `[A-Za-z0-9_]{1,64}`.
    pub fn create_database(&self, name: &str) -> Result<Vec<String>, GaleraError> {
        validate_database_name(name)?;
        let live: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].server.is_some() && !self.nodes[i].paused)
            .collect();
        let first = *live
            .first()
            .ok_or(GaleraError::NodeNotRunning { node: 0 })?;
        let mut conn =
            MysqlConnection::establish(&self.url(first, "")).map_err(SandboxError::from)?;
        create_database_on(&mut conn, name)?;
        for &node in &live[1..] {
            let mut conn =
                MysqlConnection::establish(&self.url(node, "")).map_err(SandboxError::from)?;
            // A causal read: waits until the node applied the CREATE.
            sql(&mut conn, "SET SESSION wsrep_sync_wait = 1")?;
            let rows: Vec<CountRow> = diesel::sql_query(
                "SELECT COUNT(*) AS n FROM information_schema.schemata WHERE schema_name = ?",
            )
            .bind::<Text, _>(name)
            .load(&mut conn)
            .map_err(|source| SandboxError::Sql {
                context: format!("checking for database {name} on node {node}"),
                source,
            })?;
            if rows.first().map(|r| r.n) != Some(1) {
                return Err(SandboxError::Sql {
                    context: format!("database {name} did not replicate to node {node}"),
                    source: diesel::result::Error::NotFound,
                }
                .into());
            }
        }
        Ok((0..self.nodes.len()).map(|i| self.url(i, name)).collect())
    }

    /// `node`'s `wsrep_ready`, `wsrep_local_state_comment`,
    /// `wsrep_cluster_size` and `wsrep_cluster_status`.
    ///
    /// Fails with [`GaleraError::NodePaused`] for a paused node (a connection
    /// would hang) and with a connection error while a joining node is still
    /// receiving its state transfer.
    pub fn status(&self, node: usize) -> Result<NodeStatus, GaleraError> {
        self.running(node)?;
        let mut conn =
            MysqlConnection::establish(&self.url(node, "")).map_err(SandboxError::from)?;
        query_status(&mut conn)
    }

    /// Waits up to `timeout` until `node` is ready, Synced and in the
    /// Primary component; returns its status.
    ///
    /// Right after [`resume`](Self::resume) a node still reports its state
    /// from before the pause; use [`wait_cluster_synced`](Self::wait_cluster_synced)
    /// to wait until it has noticed that it was evicted and rejoined.
    pub fn wait_synced(
        &mut self,
        node: usize,
        timeout: Duration,
    ) -> Result<NodeStatus, GaleraError> {
        self.wait_synced_inner(node, None, timeout, false)
    }

    /// Waits up to `timeout` until every running, unpaused node is ready,
    /// Synced, in the Primary component and sees exactly the running,
    /// unpaused nodes (`wsrep_cluster_size`), all in one view (the same
    /// `wsrep_cluster_conf_id`), and they say so twice in a row, 100 ms
    /// apart. Returns the statuses by node index (`None` for stopped, killed
    /// and paused nodes).
    ///
    /// Use it after [`kill`](Self::kill) (until the others evicted the dead
    /// node), after [`resume`](Self::resume) (until the node rejoined) or
    /// after a test's own fault injection. A node resumed after a pause
    /// reports the view it was paused in until it notices its eviction; the
    /// common view number keeps that stale report from counting.
    ///
    /// Live nodes that are a majority of the cluster and see each other but
    /// stay non-Primary are bootstrapped into a Primary component (see
    /// [`StuckMajority`]): the others, paused or stopped, cannot form one.
    pub fn wait_cluster_synced(
        &mut self,
        timeout: Duration,
    ) -> Result<Vec<Option<NodeStatus>>, GaleraError> {
        let started = Instant::now();
        let mut previous: Option<Vec<Option<NodeStatus>>> = None;
        let mut stuck = StuckMajority::default();
        loop {
            let live: Vec<usize> = (0..self.nodes.len())
                .filter(|&i| self.nodes[i].server.is_some() && !self.nodes[i].paused)
                .collect();
            let mut statuses: Vec<Option<NodeStatus>> = vec![None; self.nodes.len()];
            let mut view = None;
            let mut waiting = None;
            for &node in &live {
                self.check_exited(node)?;
                match self.status(node) {
                    Ok(status)
                        if status.is_synced()
                            && status.cluster_size == live.len() as u64
                            && *view.get_or_insert(status.conf_id) == status.conf_id =>
                    {
                        statuses[node] = Some(status);
                    }
                    Ok(status) => {
                        waiting = Some((node, format!("{status:?}")));
                        break;
                    }
                    Err(e) => {
                        waiting = Some((node, e.to_string()));
                        break;
                    }
                }
            }
            let Some((node, last)) = waiting else {
                if previous.as_ref() == Some(&statuses) {
                    return Ok(statuses);
                }
                previous = Some(statuses);
                stuck = StuckMajority::default();
                sleep(POLL);
                continue;
            };
            previous = None;
            stuck.watch(self, &live);
            if started.elapsed() >= timeout {
                return Err(GaleraError::Timeout {
                    node,
                    waited: started.elapsed(),
                    last: format!("{last}; waiting for {} synced nodes", live.len()),
                    log_tail: self.log_tail(node, 6000),
                });
            }
            sleep(POLL);
        }
    }

    /// `SET GLOBAL wsrep_provider_options = 'pc.bootstrap=YES'` on `node`: its component
    /// becomes the Primary one (see [`StuckMajority`]).
    fn bootstrap_primary(&self, node: usize) -> Result<(), GaleraError> {
        self.running(node)?;
        let mut conn =
            MysqlConnection::establish(&self.url(node, "")).map_err(SandboxError::from)?;
        sql(
            &mut conn,
            "SET GLOBAL wsrep_provider_options = 'pc.bootstrap=YES'",
        )?;
        Ok(())
    }

    /// Kills `node` with SIGKILL (with its state-transfer helpers) and waits
    /// for it, keeping its data directory: a crash. The other nodes notice
    /// and continue without it. Use [`restart`](Self::restart) to bring it back.
    pub fn kill(&mut self, node: usize) -> Result<(), GaleraError> {
        self.running(node).or_else(|e| match e {
            GaleraError::NodePaused { .. } => Ok(()),
            e => Err(e),
        })?;
        let n = &mut self.nodes[node];
        let Some(mut child) = n.server.take() else {
            return Err(GaleraError::NodeNotRunning { node });
        };
        let _ = signal_group("KILL", child.id());
        if let Err(source) = child.kill() {
            // Already reaped is fine; anything else is an error.
            if child.try_wait().ok().flatten().is_none() {
                n.server = Some(child);
                return Err(GaleraError::Sandbox(SandboxError::Io {
                    context: format!("cannot kill node {node}"),
                    source,
                }));
            }
        }
        child
            .wait()
            .map_err(gio_err(format!("cannot wait for killed node {node}")))?;
        n.paused = false;
        Ok(())
    }

    /// Shuts `node` down cleanly (SQL `SHUTDOWN`, falling back to SIGTERM;
    /// a paused node is resumed first); after 30 s it is killed. The node
    /// leaves the cluster gracefully.
    pub fn stop(&mut self, node: usize) -> Result<(), GaleraError> {
        if self.is_paused(node) {
            self.resume(node)?;
        }
        self.running(node)?;
        let url = self.url(node, "");
        let n = &mut self.nodes[node];
        let Some(child) = n.server.as_mut() else {
            return Err(GaleraError::NodeNotRunning { node });
        };
        let exited = child
            .try_wait()
            .map_err(gio_err("cannot check a node's status"))?;
        if exited.is_none() {
            if !request_shutdown(&url) {
                let _ = signal_pid("TERM", child.id());
            }
            if wait_timeout(child, STOP_TIMEOUT)?.is_none() {
                let _ = signal_group("KILL", child.id());
                let _ = child.kill();
                child
                    .wait()
                    .map_err(gio_err(format!("cannot wait for node {node}")))?;
            }
        }
        // No group kill after the server was reaped: its pid may be reused.
        n.server = None;
        Ok(())
    }

    /// Starts `node` again on its data directory (stopping it first if it
    /// runs) and waits up to 90 s until it is Synced. It rejoins the running
    /// nodes, with an incremental state transfer when their gcache still
    /// holds what it missed (a full one otherwise). If no other node runs,
    /// it bootstraps a new Primary component from its own data.
    pub fn restart(&mut self, node: usize) -> Result<NodeStatus, GaleraError> {
        self.check_node(node)?;
        if self.nodes[node].server.is_some() {
            self.stop(node)?;
        }
        let others = (0..self.nodes.len()).any(|i| i != node && self.nodes[i].server.is_some());
        if !others {
            mark_safe_to_bootstrap(&self.nodes[node].dir.join(GRASTATE))?;
        }
        self.spawn_server(node, !others)?;
        self.wait_synced_inner(node, None, RESTART_TIMEOUT, false)
    }

    /// Stops `node` with SIGSTOP (its whole process group): the server
    /// neither answers clients nor the cluster. The other nodes stall
    /// until they evict it after `evs.suspect_timeout` (5 s by default), then
    /// continue without it. Connections to a paused node hang, so
    /// [`status`](Self::status) refuses it.
    ///
    /// It returns once every thread of the node's server has stopped (SIGSTOP is delivered
    /// asynchronously).
    pub fn pause(&mut self, node: usize) -> Result<(), GaleraError> {
        self.running(node)?;
        self.signal_paused(node, "STOP", true)?;
        let pid = self.nodes[node]
            .server
            .as_ref()
            .map(Child::id)
            .ok_or(GaleraError::NodeNotRunning { node })?;
        wait_stopped(pid, STOP_TIMEOUT).map_err(gio_err(format!(
            "node {node}'s server {pid} did not stop on SIGSTOP"
        )))
    }

    /// Continues a [`pause`](Self::pause)d node with SIGCONT. It does not
    /// wait: if the others evicted it meanwhile it rejoins on its own (use
    /// [`wait_synced`](Self::wait_synced)).
    pub fn resume(&mut self, node: usize) -> Result<(), GaleraError> {
        self.check_node(node)?;
        self.signal_paused(node, "CONT", false)
    }

    /// Sends `signal` to node `node`'s process group and records it as `paused` (or not).
    fn signal_paused(
        &mut self,
        node: usize,
        signal: &'static str,
        paused: bool,
    ) -> Result<(), GaleraError> {
        let n = &mut self.nodes[node];
        let pid = n
            .server
            .as_ref()
            .map(Child::id)
            .ok_or(GaleraError::NodeNotRunning { node })?;
        signal_group(signal, pid).map_err(|message| GaleraError::Signal {
            node,
            signal,
            message,
        })?;
        n.paused = paused;
        Ok(())
    }

    /// The last `max` bytes of `node`'s error log.
    ///
    /// # Panics
    ///
    /// If `node >= self.nodes()`.
    pub fn log_tail(&self, node: usize, max: u64) -> String {
        read_tail(&self.nodes[node].dir.join(ERROR_LOG), max)
    }

    fn check_node(&self, node: usize) -> Result<(), GaleraError> {
        if node < self.nodes.len() {
            Ok(())
        } else {
            Err(GaleraError::NoSuchNode {
                node,
                nodes: self.nodes.len(),
            })
        }
    }

    fn running(&self, node: usize) -> Result<(), GaleraError> {
        self.check_node(node)?;
        let n = &self.nodes[node];
        if n.server.is_none() {
            Err(GaleraError::NodeNotRunning { node })
        } else if n.paused {
            Err(GaleraError::NodePaused { node })
        } else {
            Ok(())
        }
    }

    fn spawn_server(&mut self, node: usize, bootstrap: bool) -> Result<(), GaleraError> {
        let address = self.cluster_address();
        let n = &self.nodes[node];
        // Leftovers of a killed server.
        let mut lock = n.socket.clone().into_os_string();
        lock.push(".lock");
        let _ = fs::remove_file(&n.socket);
        let _ = fs::remove_file(lock);

        let mut provider_options = format!(
            "gmcast.listen_addr=tcp://127.0.0.1:{};ist.recv_addr=127.0.0.1:{};gcache.size=32M",
            n.ports.gcomm, n.ports.ist
        );
        for option in &self.provider_options {
            let _ = write!(provider_options, ";{option}");
        }
        let mut cmd = server_command(&self.mariadbd, &n.dir, &n.socket);
        cmd.arg("--bind-address=127.0.0.1")
            .arg(format!("--port={}", n.ports.client))
            .args([
                "--skip-name-resolve",
                "--lc-messages=en_US",
                "--character-set-server=utf8mb4",
                "--collation-server=utf8mb4_unicode_ci",
                "--innodb-buffer-pool-size=32M",
                "--innodb-log-file-size=16M",
                "--performance-schema=OFF",
                "--max-connections=300",
                "--binlog-format=ROW",
                "--innodb-autoinc-lock-mode=2",
                "--default-storage-engine=InnoDB",
                "--wsrep-on=ON",
                "--wsrep-sst-method=rsync",
                "--wsrep-node-address=127.0.0.1",
            ])
            .arg(flag("--wsrep-provider=", self.provider.as_os_str()))
            .arg(format!("--wsrep-cluster-address={address}"))
            .arg(format!("--wsrep-cluster-name={}", self.name))
            .arg(format!("--wsrep-node-name=node{node}"))
            .arg(format!(
                "--wsrep-sst-receive-address=127.0.0.1:{}",
                n.ports.sst
            ))
            .arg(format!("--wsrep-provider-options={provider_options}"))
            .args(&self.server_args);
        if self.run_as_mysql {
            cmd.arg(format!("--user={SERVER_USER}"));
        }
        if bootstrap {
            cmd.arg("--wsrep-new-cluster");
        }
        let child = spawn_detached(&mut cmd)
            .map_err(gio_err(format!("cannot start {}", self.mariadbd.display())))?;
        let pid = child.id();
        self.nodes[node].server = Some(child);
        self.nodes[node].paused = false;
        write_atomically(
            &self.dir.join(format!("node{node}.pid.lockstock")),
            format!("{pid}\n").as_bytes(),
        )?;
        Ok(())
    }

    /// `NodeExited` (and forgets the server) if `node`'s server has exited.
    fn check_exited(&mut self, node: usize) -> Result<(), GaleraError> {
        let n = &mut self.nodes[node];
        let Some(child) = n.server.as_mut() else {
            return Err(GaleraError::NodeNotRunning { node });
        };
        if let Some(status) = child
            .try_wait()
            .map_err(gio_err("cannot check a node's status"))?
        {
            n.server = None;
            n.paused = false;
            return Err(GaleraError::NodeExited {
                node,
                status: status.to_string(),
                log_tail: self.log_tail(node, 6000),
            });
        }
        Ok(())
    }

    /// Waits until `node` is synced (and, if given, sees `size` members). `starting`: the
    /// cluster is being started, so any node's server that exits ends the wait (with that
    /// node's log) — not only `node`'s.
    fn wait_synced_inner(
        &mut self,
        node: usize,
        size: Option<usize>,
        timeout: Duration,
        starting: bool,
    ) -> Result<NodeStatus, GaleraError> {
        self.running(node)?;
        let started = Instant::now();
        loop {
            if starting {
                for other in 0..self.nodes.len() {
                    self.check_exited(other)?;
                }
            }
            self.check_exited(node)?;
            let last = match self.status(node) {
                Ok(status) => {
                    let size_ok = size.is_none_or(|s| status.cluster_size == s as u64);
                    if status.is_synced() && size_ok {
                        return Ok(status);
                    }
                    format!("{status:?}")
                }
                Err(e) => e.to_string(),
            };
            if started.elapsed() >= timeout {
                return Err(GaleraError::Timeout {
                    node,
                    waited: started.elapsed(),
                    last,
                    log_tail: self.log_tail(node, 6000),
                });
            }
            sleep(POLL);
        }
    }
}

impl Drop for GaleraCluster {
    fn drop(&mut self) {
        // SIGKILL also ends stopped (paused) processes; the group holds the
        // SST script and its rsync daemon.
        for n in &mut self.nodes {
            if let Some(server) = &n.server {
                let _ = signal_group("KILL", server.id());
            }
        }
        for n in &mut self.nodes {
            kill_and_reap(n.server.take());
        }
        if std::thread::panicking() {
            // The test failed: what the nodes said (their recovery, certification failures,
            // corruption they found) is gone with the directory otherwise.
            for (node, n) in self.nodes.iter().enumerate() {
                eprintln!(
                    "lockstock-testkit: Galera node {node}'s error log ({}), last {} bytes:\n{}",
                    n.dir.join(ERROR_LOG).display(),
                    FAILED_TEST_LOG_BYTES,
                    self.log_tail(node, FAILED_TEST_LOG_BYTES)
                );
            }
        }
        remove_watched_dir(&self.dir, self.watchdog.take());
    }
}

fn sql(conn: &mut MysqlConnection, statement: &str) -> Result<(), GaleraError> {
    conn.batch_execute(statement).map_err(|source| {
        SandboxError::Sql {
            context: statement.into(),
            source,
        }
        .into()
    })
}

fn query_status(conn: &mut MysqlConnection) -> Result<NodeStatus, GaleraError> {
    let statement = "SHOW GLOBAL STATUS WHERE Variable_name IN \
         ('wsrep_ready', 'wsrep_local_state_comment', 'wsrep_cluster_size', 'wsrep_cluster_status', \
          'wsrep_cluster_conf_id')";
    let rows: Vec<StatusRow> =
        diesel::sql_query(statement)
            .load(conn)
            .map_err(|source| SandboxError::Sql {
                context: statement.into(),
                source,
            })?;
    let mut status = NodeStatus {
        ready: false,
        state_comment: String::new(),
        cluster_size: 0,
        cluster_status: String::new(),
        conf_id: u64::MAX,
    };
    for row in rows {
        match row.name.to_ascii_lowercase().as_str() {
            "wsrep_ready" => status.ready = row.value.eq_ignore_ascii_case("ON"),
            "wsrep_local_state_comment" => status.state_comment = row.value,
            "wsrep_cluster_size" => status.cluster_size = row.value.trim().parse().unwrap_or(0),
            "wsrep_cluster_status" => status.cluster_status = row.value,
            // -1 (unsigned: u64::MAX) outside a Primary component.
            "wsrep_cluster_conf_id" => {
                status.conf_id = row.value.trim().parse().unwrap_or(u64::MAX);
            }
            _ => {}
        }
    }
    Ok(status)
}

/// `kill -s SIG -- -pid` (the process group led by `pid`).
fn signal_group(signal: &str, pid: u32) -> Result<(), String> {
    send_signal(signal, &format!("-{pid}"))
}

fn signal_pid(signal: &str, pid: u32) -> Result<(), String> {
    send_signal(signal, &pid.to_string())
}

fn send_signal(signal: &str, target: &str) -> Result<(), String> {
    let output = crate::inherit_no_descriptors(&mut Command::new("/bin/sh"))
        .args(["-c", "kill -s \"$1\" -- \"$2\"", "sh", signal, target])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("cannot run /bin/sh: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).trim().to_string())
    }
}

/// Sets `safe_to_bootstrap: 1` in `grastate.dat` (after a crash of the
/// last node Galera refuses to bootstrap from it otherwise).
fn mark_safe_to_bootstrap(path: &Path) -> Result<(), GaleraError> {
    let Ok(text) = fs::read_to_string(path) else {
        return Ok(());
    };
    if !text.contains("safe_to_bootstrap: 0") {
        return Ok(());
    }
    let text = text.replace("safe_to_bootstrap: 0", "safe_to_bootstrap: 1");
    // Rewrite in place to keep the file's owner (the server user).
    fs::write(path, text).map_err(gio_err(format!("cannot write {}", path.display())))
}

fn find_provider() -> Result<PathBuf, GaleraError> {
    if let Some(value) = std::env::var_os("LOCKSTOCK_GALERA_PROVIDER").filter(|v| !v.is_empty()) {
        let path = PathBuf::from(&value);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(GaleraError::Missing {
                name: format!("{} (from LOCKSTOCK_GALERA_PROVIDER)", path.display()),
            })
        };
    }
    [
        "/usr/lib/galera/libgalera_smm.so",
        "/usr/lib/galera-4/libgalera_smm.so",
        "/usr/lib64/galera-4/libgalera_smm.so",
        "/usr/lib64/galera/libgalera_smm.so",
        "/usr/lib/libgalera_smm.so",
        "/usr/local/lib/libgalera_smm.so",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
    .ok_or_else(|| GaleraError::Missing {
        name: "the Galera provider libgalera_smm.so".into(),
    })
}

/// uid and gid of the `mysql` user, from `/etc/passwd`.
fn server_user_ids() -> Result<(u32, u32), GaleraError> {
    let passwd = fs::read_to_string("/etc/passwd").map_err(gio_err("cannot read /etc/passwd"))?;
    passwd
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let _password = fields.next()?;
            let uid = fields.next()?.parse().ok()?;
            let gid = fields.next()?.parse().ok()?;
            (name == SERVER_USER).then_some((uid, gid))
        })
        .next()
        .ok_or(GaleraError::NoServerUser)
}

/// The cluster's directory; where the nodes run as `mysql` (`others_enter`), in a directory
/// that user may pass through.
fn make_dir(others_enter: bool) -> Result<PathBuf, GaleraError> {
    let deepest_socket = Path::new("node9").join(SOCKET_NAME);
    Ok(make_private_dir_for(
        "galera",
        &deepest_socket,
        others_enter,
    )?)
}

/// Where the next port probe starts; ports below the ephemeral range so that
/// outgoing connections do not take them between probe and bind.
#[derive(Debug)]
struct PortCursor {
    next: u16,
    low: u16,
    high: u16,
    given: HashSet<u16>,
}

/// `count` distinct loopback ports that were free a moment ago.
fn free_ports(count: usize) -> Result<Vec<u16>, GaleraError> {
    let mut guard = PORTS_GIVEN.lock().unwrap_or_else(PoisonError::into_inner);
    let cursor = guard.get_or_insert_with(|| {
        let (low, high) = port_range();
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos())
            ^ std::process::id().wrapping_mul(2_654_435_761);
        let span = u32::from(high - low);
        PortCursor {
            next: low + (seed % span) as u16,
            low,
            high,
            given: HashSet::new(),
        }
    });
    let mut ports = Vec::with_capacity(count);
    let span = usize::from(cursor.high - cursor.low);
    for _ in 0..span {
        if ports.len() == count {
            break;
        }
        let port = cursor.next;
        cursor.next = if port + 1 >= cursor.high {
            cursor.low
        } else {
            port + 1
        };
        if cursor.given.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            cursor.given.insert(port);
            ports.push(port);
        }
    }
    if ports.len() == count {
        Ok(ports)
    } else {
        Err(GaleraError::Sandbox(SandboxError::Io {
            context: "cannot find free loopback ports".into(),
            source: std::io::Error::new(std::io::ErrorKind::AddrInUse, "no free port"),
        }))
    }
}

/// `[low, high)` to pick ports from: below the kernel's ephemeral range.
fn port_range() -> (u16, u16) {
    let ephemeral_low = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    if ephemeral_low >= 12000 {
        (10000, ephemeral_low)
    } else {
        // An unusual range; fall back to the top of the port space.
        (61000, 65000)
    }
}

#[cfg(test)]
#[allow(clippy::expect_used)] // a failed setup is a failed test
mod tests {
    use super::WATCHDOG_SCRIPT;
    use crate::sandbox::{spawn_detached, spawn_watchdog_script_of};
    use std::process::Command;
    use std::time::{Duration, Instant};

    /// Whether process `pid` is alive (not a zombie).
    fn alive(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            let state = stat.rsplit(") ").next().unwrap_or("");
            !state.starts_with('Z') && !state.starts_with('X')
        })
    }

    /// When its owner is gone, the cluster's watchdog kills each node with its process group —
    /// the helpers a node started (state transfers) whose arguments do not name the cluster's
    /// directory too. Before the fix, `kill -9 -- -pgid` under Debian's `/bin/sh` (dash) was
    /// refused ("Illegal number") and such a helper outlived the cluster.
    #[test]
    fn the_watchdog_kills_a_nodes_process_group() {
        let dir =
            std::env::temp_dir().join(format!("lockstock-watchdog-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).expect("a directory");
        // A node: a process group whose leader names the directory, with a child that does not.
        let child_pid = dir.join("child.pid");
        let node = spawn_detached(
            Command::new("/bin/sh")
                .arg("-c")
                .arg(format!(
                    "sleep 600 & echo $! > '{}'; wait",
                    child_pid.display()
                ))
                .arg(format!("{}/node0", dir.display())),
        )
        .expect("a node");
        std::fs::write(dir.join("node0.pid.lockstock"), node.id().to_string()).expect("pid file");
        let until = Instant::now() + Duration::from_secs(10);
        let helper: u32 = loop {
            if let Some(pid) = std::fs::read_to_string(&child_pid)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                break pid;
            }
            assert!(Instant::now() < until, "the node's helper never started");
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut owner = Command::new("sleep").arg("600").spawn().expect("an owner");
        let mut watchdog = spawn_watchdog_script_of(
            WATCHDOG_SCRIPT,
            "lockstock-galera-watchdog",
            &dir,
            owner.id(),
        )
        .expect("the watchdog");
        owner.kill().expect("the owner ends");
        owner.wait().expect("reaped");
        let status = watchdog.wait().expect("the watchdog ends");
        assert!(status.success(), "{status:?}");
        let mut node = node;
        let _ = node.wait();
        // Killed, it may still be scheduled to die.
        let until = Instant::now() + Duration::from_secs(2);
        while alive(helper) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        let gone = !alive(helper);
        if !gone {
            let _ = Command::new("kill")
                .arg("-9")
                .arg(helper.to_string())
                .status();
        }
        let _ = std::fs::remove_dir_all(&dir);
        assert!(gone, "the node's helper {helper} outlived the cluster");
    }
}
