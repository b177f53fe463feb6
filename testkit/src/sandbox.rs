//! A throwaway MariaDB server for examples, tests and benchmarks (MySQL 8 ships no
//! `mysql_install_db`: not supported).
//!
//! [`Sandbox::start`] creates a fresh data directory under the system temp
//! directory (`lockstock-sandbox-<pid>-<n>`), initialises it with
//! `mariadb-install-db`, starts `mariadbd` on a Unix socket inside that
//! directory (no TCP port is opened) and waits until it accepts connections.
//! Dropping the [`Sandbox`] kills the server and removes the directory.
//!
//! Cleanup also happens when the owning process never runs `Drop` (it was
//! killed, interrupted with Ctrl-C, or the sandbox lives in a `static` such as
//! [`Sandbox::shared`]): every sandbox has a small watchdog shell process that
//! waits for the owning process to disappear, then kills the server and
//! removes the data directory.
//!
//! [`database_url`] is the usual entry point for examples and tests: it uses
//! the server named by the `DATABASE_URL` environment variable when that is
//! set, and the process-wide shared sandbox otherwise.
//!
//! Binaries are looked up in `LOCKSTOCK_MARIADBD` / `LOCKSTOCK_INSTALL_DB`
//! (if set), then `/usr/sbin/mariadbd` and `/usr/bin/mariadb-install-db`,
//! then `mariadbd`/`mysqld` and `mariadb-install-db`/`mysql_install_db` on
//! `PATH`. On Debian/Ubuntu: `apt-get install mariadb-server`.
//!
//! # Example
//!
//! ```no_run
//! use diesel::prelude::*;
//! use lockstock_testkit::sandbox::{database_url, Sandbox};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // A private server, removed again when `sandbox` is dropped.
//! let mut sandbox = Sandbox::start()?;
//! let url = sandbox.create_database("example")?;
//! let mut conn = MysqlConnection::establish(&url)?;
//! diesel::sql_query("CREATE TABLE t (id INT PRIMARY KEY) ENGINE=InnoDB").execute(&mut conn)?;
//! diesel::sql_query("INSERT INTO t VALUES (1)").execute(&mut conn)?;
//! drop(conn);
//!
//! // Simulate a crash and recover on the same data directory.
//! sandbox.kill()?;
//! sandbox.restart()?;
//!
//! // Or: `$DATABASE_URL` if set, else the shared per-process sandbox.
//! let url = database_url("my_test")?;
//! let _conn = MysqlConnection::establish(&url)?;
//! # Ok(())
//! # }
//! ```

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::thread::sleep;
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::{Connection, MysqlConnection};

/// How long [`Sandbox::start`] waits for a freshly installed server.
const FIRST_START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long [`Sandbox::restart`] waits (crash recovery can take a while).
const RESTART_TIMEOUT: Duration = Duration::from_secs(60);
/// How long [`Sandbox::stop`] waits for a graceful shutdown before SIGKILL.
pub(crate) const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Poll interval while waiting for the server to come up or go away.
const POLL: Duration = Duration::from_millis(20);

pub(crate) const SOCKET_NAME: &str = "mysqld.sock";
pub(crate) const ERROR_LOG: &str = "error.log";
pub(crate) const PID_FILE: &str = "mysqld.pid";
/// File the watchdog reads to find the current server pid.
const SERVER_PID_FILE: &str = "server.pid.lockstock";
/// `sun_path` is 108 bytes on Linux (104 on macOS); stay well below.
pub(crate) const MAX_SOCKET_PATH: usize = 100;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Watchdog run by `/bin/sh -c`; `$1` = owning process id, `$2` = data dir (the body of
/// [`spawn_watchdog_script`]).
///
/// Collects into `$pids` the server whose pid is in `$2/server.pid.lockstock` plus any process
/// whose argv contains `--datadir=$2`, and SIGKILLs them.
const WATCHDOG_SCRIPT: &str = r#"
p=$(cat "$dir/server.pid.lockstock" 2>/dev/null)
case "$p" in
  ''|*[!0-9]*) ;;
  *)
    if [ -d /proc/self ]; then
      if tr '\000' '\n' < "/proc/$p/cmdline" 2>/dev/null | grep -qxF -e "--datadir=$dir"; then
        pids=$p
      fi
    else
      pids=$p
    fi
    ;;
esac
add_argv_matches x "--datadir=$dir"
for q in $pids; do kill -9 "$q" 2>/dev/null; done
"#;

/// What every watchdog script does first: waits until the owner `$1` is gone (or a zombie),
/// with `alive` and `add_argv_matches` (adds to `$pids` every other process with an argument
/// that matches `$2` by `grep -F` plus the flags `$1`) for the body.
const WATCHDOG_PROLOGUE: &str = r#"
owner=$1
dir=$2
alive() {
  kill -0 "$1" 2>/dev/null || return 1
  if [ -r "/proc/$1/stat" ] && read -r st < "/proc/$1/stat" 2>/dev/null; then
    st=${st##*') '}
    case "$st" in Z*|X*) return 1 ;; esac
  fi
  return 0
}
add_argv_matches() {
  [ -d /proc/self ] || return 0
  for f in $(grep -lzs"$1"F -e "$2" /proc/[0-9]*/cmdline 2>/dev/null); do
    q=${f#/proc/}
    q=${q%/cmdline}
    [ "$q" = "$$" ] || pids="$pids $q"
  done
}
while alive "$owner"; do sleep 0.2; done
pids=
"#;

/// What every watchdog script does last: waits (up to 10 s) for the processes in `$pids` to
/// die, then removes the directory `$2`.
const WATCHDOG_EPILOGUE: &str = r#"
i=0
while [ $i -lt 200 ]; do
  any=
  for q in $pids; do alive "$q" && any=1; done
  [ -z "$any" ] && break
  sleep 0.05
  i=$((i+1))
done
rm -rf "$dir"
"#;

/// Errors while starting/stopping the sandbox server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SandboxError {
    /// A required server binary (`mariadbd`, `mariadb-install-db`) was not found.
    #[error(
        "cannot find `{name}`: install mariadb-server (Debian/Ubuntu: \
         `apt-get install mariadb-server`) or set LOCKSTOCK_MARIADBD / LOCKSTOCK_INSTALL_DB"
    )]
    BinaryNotFound {
        /// The binary (or the path from the environment override) that was looked for.
        name: String,
    },
    /// A filesystem or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// `mariadb-install-db` exited unsuccessfully.
    #[error("mariadb-install-db failed ({status}); output:\n{log}")]
    InstallDb {
        /// Exit status of the installer.
        status: String,
        /// Tail of the installer's combined stdout/stderr.
        log: String,
    },
    /// The server did not accept connections in time.
    #[error(
        "sandbox server did not accept connections within {waited:?}; error log tail:\n{log_tail}"
    )]
    StartTimeout {
        /// How long we waited.
        waited: Duration,
        /// Tail of the server's error log.
        log_tail: String,
    },
    /// The server process exited while we were waiting for it to come up.
    #[error("sandbox server exited during startup ({status}); error log tail:\n{log_tail}")]
    ServerExited {
        /// Exit status of the server process.
        status: String,
        /// Tail of the server's error log.
        log_tail: String,
    },
    /// An SQL statement issued by the sandbox failed.
    #[error("{context}: {source}")]
    Sql {
        /// The statement or action that failed.
        context: String,
        /// The underlying Diesel error.
        #[source]
        source: diesel::result::Error,
    },
    /// Connecting to the server failed.
    #[error("cannot connect to the database server: {0}")]
    Connection(#[from] diesel::ConnectionError),
    /// The operation needs a running server, but it was killed or stopped.
    #[error("the sandbox server is not running")]
    NotRunning,
    /// The operation would hang on a [`pause`](Sandbox::pause)d server (a new connection
    /// waits for a greeting that never comes); resume it first.
    #[error("the sandbox server is paused")]
    Paused,
    /// A database name outside `[A-Za-z0-9_]{1,64}` was given.
    #[error("invalid database name {name:?}: expected 1 to 64 characters from [A-Za-z0-9_]")]
    InvalidDatabaseName {
        /// The rejected name.
        name: String,
    },
    /// [`Sandbox::shared`] failed to start the shared server (on this or an earlier call).
    #[error("the shared sandbox failed to start: {message}")]
    SharedStartFailed {
        /// The original start error, with its sources.
        message: String,
    },
}

/// Waits until every thread of process `pid` is stopped (or dead) — at most `within`.
///
/// A signal that stops a process is delivered asynchronously: `kill` returns once it is
/// queued, one thread takes it and the others stop as each of them next runs.
pub(crate) fn wait_stopped(pid: u32, within: Duration) -> std::io::Result<()> {
    let tasks = PathBuf::from(format!("/proc/{pid}/task"));
    let started = Instant::now();
    loop {
        let mut running = 0_usize;
        for task in fs::read_dir(&tasks)? {
            // A thread that exited meanwhile is not running.
            let Ok(stat) = fs::read_to_string(task?.path().join("stat")) else {
                continue;
            };
            // `pid (comm) S ...`: the state follows the last `)` (comm may hold one).
            let state = stat
                .rfind(')')
                .and_then(|end| stat.get(end + 1..))
                .and_then(|rest| rest.trim_start().chars().next());
            if !matches!(state, Some('T' | 't' | 'Z' | 'X')) {
                running += 1;
            }
        }
        if running == 0 {
            return Ok(());
        }
        if started.elapsed() >= within {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("{running} thread(s) still running after {within:?}"),
            ));
        }
        sleep(Duration::from_micros(200));
    }
}

pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> SandboxError {
    let context = context.into();
    move |source| SandboxError::Io { context, source }
}

/// A throwaway MariaDB server on a private data directory and Unix socket.
///
/// See the [module documentation](self) for an overview. The server runs as
/// a child process; dropping the `Sandbox` kills it and deletes the data
/// directory. `Sandbox` is `Send + Sync`; the mutating methods
/// ([`kill`](Self::kill), [`stop`](Self::stop), [`restart`](Self::restart))
/// need `&mut self`.
#[derive(Debug)]
pub struct Sandbox {
    dir: PathBuf,
    socket: PathBuf,
    mariadbd: PathBuf,
    server: Option<Child>,
    watchdog: Option<Child>,
    /// The server was stopped with [`pause`](Self::pause) and not yet resumed.
    paused: bool,
    /// More server options ([`start_with`](Self::start_with)).
    options: Vec<String>,
}

impl Sandbox {
    /// Creates a fresh temporary data directory, initialises it with
    /// `mariadb-install-db`, starts `mariadbd` and waits (up to 15 s) until
    /// a connection succeeds.
    pub fn start() -> Result<Sandbox, SandboxError> {
        Self::start_with(&[])
    }

    /// [`start`](Self::start) with more server options (`--name=value`), e.g. a setting a test
    /// needs that the shared sandbox does not have.
    pub fn start_with(options: &[&str]) -> Result<Sandbox, SandboxError> {
        let mariadbd = find_mariadbd()?;
        let install_db = find_install_db()?;
        let dir = make_dir()?;
        let socket = dir.join(SOCKET_NAME);
        // From here on, Drop removes the directory if anything fails.
        let mut sandbox = Sandbox {
            dir,
            socket,
            mariadbd,
            server: None,
            watchdog: None,
            paused: false,
            options: options.iter().map(|o| (*o).to_owned()).collect(),
        };
        sandbox.watchdog = Some(spawn_watchdog(&sandbox.dir)?);
        run_install_db(&install_db, &sandbox.dir, is_root().then_some("root"))?;
        sandbox.spawn_server()?;
        sandbox.wait_ready(FIRST_START_TIMEOUT)?;
        Ok(sandbox)
    }

    /// The process-wide shared sandbox, started on first use.
    ///
    /// It is never dropped; its watchdog removes it after the process exits.
    /// If starting it failed, every call returns
    /// [`SandboxError::SharedStartFailed`] with the original message.
    pub fn shared() -> Result<&'static Sandbox, SandboxError> {
        static SHARED: OnceLock<Result<Sandbox, String>> = OnceLock::new();
        match SHARED.get_or_init(|| Sandbox::start().map_err(|e| e.to_string())) {
            Ok(sandbox) => Ok(sandbox),
            Err(message) => Err(SandboxError::SharedStartFailed {
                message: message.clone(),
            }),
        }
    }

    /// Diesel URL for `database` on this server:
    /// `mysql://root@localhost/{database}?unix_socket={socket}`.
    ///
    /// An empty `database` gives a URL without a default database.
    pub fn url(&self, database: &str) -> String {
        format!(
            "mysql://root@localhost/{database}?unix_socket={}",
            percent_encode(self.socket.as_os_str())
        )
    }

    /// Runs ``CREATE DATABASE IF NOT EXISTS `name` `` (utf8mb4, utf8mb4_unicode_ci)
    /// and returns [`url(name)`](Self::url).
    ///
    /// `name` must match `[A-Za-z0-9_]{1,64}`. Fails with [`SandboxError::Paused`] on a
    /// paused server (a connection would hang).
    pub fn create_database(&self, name: &str) -> Result<String, SandboxError> {
        validate_database_name(name)?;
        if self.server.is_none() {
            return Err(SandboxError::NotRunning);
        }
        if self.paused {
            return Err(SandboxError::Paused);
        }
        let mut conn = MysqlConnection::establish(&self.url(""))?;
        create_database_on(&mut conn, name)?;
        Ok(self.url(name))
    }

    /// Process id of the running server, `None` after [`kill`](Self::kill) or
    /// [`stop`](Self::stop).
    pub fn pid(&self) -> Option<u32> {
        self.server.as_ref().map(Child::id)
    }

    /// The sandbox directory: MariaDB data directory, socket, `error.log`.
    pub fn data_dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the server's Unix socket.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// The last `max_bytes` of the server's error log (its InnoDB messages: recovery after a
    /// kill, corruption it found). Also printed to stderr when a sandbox is dropped while its
    /// thread panics (a failing test), before its directory is removed.
    pub fn error_log_tail(&self, max_bytes: u64) -> String {
        read_tail(&self.dir.join(ERROR_LOG), max_bytes)
    }

    /// Freezes the server with SIGSTOP: it keeps its connections open but answers nothing
    /// (a hung or unreachable server; new connections hang in their handshake). Undo with
    /// [`resume`](Self::resume); [`stop`](Self::stop), [`kill`](Self::kill),
    /// [`restart`](Self::restart) and dropping the sandbox resume a paused server first.
    ///
    /// It returns once every thread of the server has stopped: SIGSTOP is delivered
    /// asynchronously (one thread takes it and stops the others as each next runs), so a
    /// server on a busy machine could otherwise answer a few more statements after `pause`.
    pub fn pause(&mut self) -> Result<(), SandboxError> {
        self.signal(libc::SIGSTOP, "cannot pause (SIGSTOP) the sandbox server")?;
        self.paused = true;
        let pid = self.pid().ok_or(SandboxError::NotRunning)?;
        wait_stopped(pid, STOP_TIMEOUT).map_err(io_err(format!(
            "sandbox server {pid} did not stop on SIGSTOP"
        )))
    }

    /// Continues a [`pause`](Self::pause)d server with SIGCONT (a no-op on a running one).
    pub fn resume(&mut self) -> Result<(), SandboxError> {
        self.signal(libc::SIGCONT, "cannot resume (SIGCONT) the sandbox server")?;
        self.paused = false;
        Ok(())
    }

    /// Whether the server is [`pause`](Self::pause)d.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Sends `signal` to the running server.
    fn signal(&self, signal: libc::c_int, context: &str) -> Result<(), SandboxError> {
        let child = self.server.as_ref().ok_or(SandboxError::NotRunning)?;
        let pid = libc::pid_t::try_from(child.id()).map_err(|_| SandboxError::NotRunning)?;
        // SAFETY: kill has no memory effects; the pid is our unreaped child, so it is not reused.
        if unsafe { libc::kill(pid, signal) } == 0 {
            Ok(())
        } else {
            Err(io_err(context)(std::io::Error::last_os_error()))
        }
    }

    /// Resumes the server if it is paused (errors ignored: it may be gone already).
    fn unpause(&mut self) {
        if self.paused {
            let _ = self.resume();
        }
    }

    /// Kills the server with SIGKILL and waits for it, keeping the data
    /// directory: simulates a crash. Use [`restart`](Self::restart) to recover.
    pub fn kill(&mut self) -> Result<(), SandboxError> {
        self.unpause();
        let mut child = self.server.take().ok_or(SandboxError::NotRunning)?;
        self.paused = false;
        if let Err(source) = child.kill() {
            self.server = Some(child);
            return Err(SandboxError::Io {
                context: "cannot kill the sandbox server".into(),
                source,
            });
        }
        child
            .wait()
            .map_err(io_err("cannot wait for the killed sandbox server"))?;
        Ok(())
    }

    /// Shuts the server down gracefully (SQL `SHUTDOWN`, falling back to
    /// SIGTERM) and waits for it to exit; after 30 s it is killed.
    pub fn stop(&mut self) -> Result<(), SandboxError> {
        self.unpause();
        let url = self.url("");
        let child = self.server.as_mut().ok_or(SandboxError::NotRunning)?;
        let exited = child
            .try_wait()
            .map_err(io_err("cannot check the sandbox server status"))?;
        if exited.is_none() {
            if !request_shutdown(&url) {
                // Best effort; if this fails too we fall back to SIGKILL below.
                let _ = inherit_no_descriptors(&mut Command::new("/bin/sh"))
                    .args(["-c", "kill -TERM \"$1\"", "sh"])
                    .arg(child.id().to_string())
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
            if wait_timeout(child, STOP_TIMEOUT)?.is_none() {
                child.kill().map_err(io_err(
                    "cannot kill the sandbox server after a stop timeout",
                ))?;
                child
                    .wait()
                    .map_err(io_err("cannot wait for the sandbox server"))?;
            }
        }
        self.server = None;
        self.paused = false;
        Ok(())
    }

    /// Starts `mariadbd` again on the same data directory (stopping it first
    /// if it is still running) and waits up to 60 s until it accepts
    /// connections; after [`kill`](Self::kill) this includes crash recovery.
    pub fn restart(&mut self) -> Result<(), SandboxError> {
        if self.server.is_some() {
            self.stop()?;
        }
        self.spawn_server()?;
        self.wait_ready(RESTART_TIMEOUT)
    }

    fn spawn_server(&mut self) -> Result<(), SandboxError> {
        // Leftovers of a killed server; it would otherwise refuse to start if
        // the pid in the lock file had been reused.
        let mut lock = self.socket.clone().into_os_string();
        lock.push(".lock");
        let _ = fs::remove_file(&self.socket);
        let _ = fs::remove_file(lock);

        let mut cmd = server_command(&self.mariadbd, &self.dir, &self.socket);
        cmd.args([
            "--skip-networking",
            "--lc-messages=en_US",
            "--character-set-server=utf8mb4",
            "--collation-server=utf8mb4_unicode_ci",
            "--innodb-buffer-pool-size=128M",
            "--max-connections=600",
            "--skip-log-bin",
            "--innodb-flush-log-at-trx-commit=1",
        ]);
        cmd.args(&self.options);
        if is_root() {
            cmd.arg("--user=root");
        }
        let child = spawn_detached(&mut cmd)
            .map_err(io_err(format!("cannot start {}", self.mariadbd.display())))?;
        let pid = child.id();
        self.server = Some(child);
        write_atomically(
            &self.dir.join(SERVER_PID_FILE),
            format!("{pid}\n").as_bytes(),
        )
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), SandboxError> {
        let url = self.url("");
        let started = Instant::now();
        loop {
            let child = self.server.as_mut().ok_or(SandboxError::NotRunning)?;
            if let Some(status) = child
                .try_wait()
                .map_err(io_err("cannot check the sandbox server status"))?
            {
                self.server = None;
                return Err(SandboxError::ServerExited {
                    status: status.to_string(),
                    log_tail: self.log_tail(),
                });
            }
            if MysqlConnection::establish(&url).is_ok() {
                return Ok(());
            }
            if started.elapsed() >= timeout {
                // Leave a defined state: not running.
                let _ = self.kill();
                return Err(SandboxError::StartTimeout {
                    waited: started.elapsed(),
                    log_tail: self.log_tail(),
                });
            }
            sleep(POLL);
        }
    }

    fn log_tail(&self) -> String {
        self.error_log_tail(4000)
    }
}

/// How much of a server's error log a sandbox (or each Galera node) dropped by a failing test
/// prints.
pub(crate) const FAILED_TEST_LOG_BYTES: u64 = 8000;

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.unpause();
        kill_and_reap(self.server.take());
        if std::thread::panicking() {
            // The test failed: what the server said (its recovery, corruption it found) is
            // gone with the directory otherwise.
            eprintln!(
                "lockstock-testkit: the sandbox server's error log ({}), last {} bytes:\n{}",
                self.dir.join(ERROR_LOG).display(),
                FAILED_TEST_LOG_BYTES,
                self.error_log_tail(FAILED_TEST_LOG_BYTES)
            );
        }
        remove_watched_dir(&self.dir, self.watchdog.take());
    }
}

/// `mariadbd` without option files, on data directory `dir` (also its tmpdir, its pid file and
/// error log) and socket `socket`.
pub(crate) fn server_command(mariadbd: &Path, dir: &Path, socket: &Path) -> Command {
    let mut cmd = Command::new(mariadbd);
    cmd.arg("--no-defaults")
        .arg(flag("--datadir=", dir.as_os_str()))
        // A private tmpdir: a starting server deletes every `#sql*` file
        // in its tmpdir, i.e. the temporary tables of other servers
        // sharing it (this broke concurrent sandboxes on /tmp).
        .arg(flag("--tmpdir=", dir.as_os_str()))
        .arg(flag("--socket=", socket.as_os_str()))
        .arg(flag("--pid-file=", dir.join(PID_FILE).as_os_str()))
        .arg(flag("--log-error=", dir.join(ERROR_LOG).as_os_str()));
    cmd
}

/// Asks the server at `url` to shut down (SQL `SHUTDOWN`); whether it took the request.
pub(crate) fn request_shutdown(url: &str) -> bool {
    match MysqlConnection::establish(url) {
        Ok(mut conn) => conn.batch_execute("SHUTDOWN").is_ok(),
        Err(_) => false,
    }
}

/// Kills and reaps `child`, if any (errors ignored: it may be gone already).
pub(crate) fn kill_and_reap(child: Option<Child>) {
    if let Some(mut child) = child {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Removes `dir`, then ends its `watchdog`: last, so that the watchdog still covers us if we die
/// in between.
pub(crate) fn remove_watched_dir(dir: &Path, watchdog: Option<Child>) {
    let _ = fs::remove_dir_all(dir);
    kill_and_reap(watchdog);
}

/// Where examples, tests and benches get a database named `name`.
///
/// If the environment variable `DATABASE_URL` is set, connects to that
/// server (ignoring any database in its path), runs
/// ``CREATE DATABASE IF NOT EXISTS `name` `` and returns the URL with the
/// path replaced by `name`. Otherwise uses
/// [`Sandbox::shared()`](Sandbox::shared)`?.`[`create_database(name)`](Sandbox::create_database).
///
/// `name` must match `[A-Za-z0-9_]{1,64}`.
pub fn database_url(name: &str) -> Result<String, SandboxError> {
    validate_database_name(name)?;
    match std::env::var("DATABASE_URL") {
        Ok(url) if !url.trim().is_empty() => {
            let (server_url, database_url) = replace_database(url.trim(), name)?;
            let mut conn = MysqlConnection::establish(&server_url)?;
            create_database_on(&mut conn, name)?;
            Ok(database_url)
        }
        _ => Sandbox::shared()?.create_database(name),
    }
}

/// Runs `mariadb-install-db` on `dir` (`--user=<user>` if given).
pub(crate) fn run_install_db(
    install_db: &Path,
    dir: &Path,
    user: Option<&str>,
) -> Result<(), SandboxError> {
    run_install_db_within(install_db, dir, user, INSTALL_TIMEOUT)
}

/// [`run_install_db`], killed (with every process it started) after `timeout`.
fn run_install_db_within(
    install_db: &Path,
    dir: &Path,
    user: Option<&str>,
    timeout: Duration,
) -> Result<(), SandboxError> {
    let mut cmd = Command::new(install_db);
    cmd.arg("--no-defaults")
        .arg(flag("--datadir=", dir.as_os_str()))
        // Passed on to the bootstrap server; see `Sandbox::spawn_server`.
        .arg(flag("--tmpdir=", dir.as_os_str()))
        .arg("--auth-root-authentication-method=normal")
        .arg("--skip-test-db");
    if let Some(user) = user {
        cmd.arg(format!("--user={user}"));
    }
    // Without the test's descriptors (its database connections), in a process group of its
    // own with the bootstrap server it starts, and bounded: the whole group is killed once
    // `timeout` has passed.
    inherit_no_descriptors(&mut cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(io_err(format!("cannot run {}", install_db.display())))?;
    let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut text);
            }
            String::from_utf8_lossy(&text).into_owned()
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
    );
    let waited = wait_timeout(&mut child, timeout);
    // Whatever the installer did, nothing it started outlives it (a process left holding its
    // output would keep the reads below waiting): its whole group is killed — also after it
    // exited (the group's id stays taken while any of its processes lives).
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill only sends a signal, to the process group the child leads.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
    if !matches!(waited, Ok(Some(_))) {
        let _ = child.wait();
    }
    let mut log = stdout.join().unwrap_or_default();
    log.push_str(&stderr.join().unwrap_or_default());
    let status = match waited? {
        Some(status) if status.success() => return Ok(()),
        Some(status) => status.to_string(),
        None => format!("killed: not finished after {timeout:?}"),
    };
    Err(SandboxError::InstallDb {
        status,
        log: tail(&log, 8000),
    })
}

/// How long `mariadb-install-db` may take (about a second on an idle machine).
const INSTALL_TIMEOUT: Duration = Duration::from_secs(120);

/// The server binary (`LOCKSTOCK_MARIADBD`, `/usr/sbin/mariadbd`, `PATH`, ...).
pub(crate) fn find_mariadbd() -> Result<PathBuf, SandboxError> {
    find_binary(
        "LOCKSTOCK_MARIADBD",
        &["/usr/sbin/mariadbd"],
        &["mariadbd", "mysqld"],
        &[
            "/usr/sbin/mysqld",
            "/usr/libexec/mariadbd",
            "/usr/libexec/mysqld",
        ],
    )
}

/// The installer (`LOCKSTOCK_INSTALL_DB`, `/usr/bin/mariadb-install-db`, `PATH`).
pub(crate) fn find_install_db() -> Result<PathBuf, SandboxError> {
    find_binary(
        "LOCKSTOCK_INSTALL_DB",
        &["/usr/bin/mariadb-install-db"],
        &["mariadb-install-db", "mysql_install_db"],
        &[],
    )
}

pub(crate) fn create_database_on(
    conn: &mut MysqlConnection,
    name: &str,
) -> Result<(), SandboxError> {
    let sql = format!(
        "CREATE DATABASE IF NOT EXISTS `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
    );
    conn.batch_execute(&sql)
        .map_err(|source| SandboxError::Sql {
            context: sql,
            source,
        })
}

pub(crate) fn validate_database_name(name: &str) -> Result<(), SandboxError> {
    let ok = (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(SandboxError::InvalidDatabaseName { name: name.into() })
    }
}

/// Splits `url` into (server URL without database, URL with database `name`).
fn replace_database(url: &str, name: &str) -> Result<(String, String), SandboxError> {
    let invalid = || {
        SandboxError::Connection(diesel::ConnectionError::InvalidConnectionUrl(format!(
            "DATABASE_URL is not a `mysql://[user[:password]@]host[:port][/database][?options]` URL: {url}"
        )))
    };
    let scheme_end = url.find("://").ok_or_else(invalid)? + 3;
    let authority_len = url[scheme_end..]
        .find(['/', '?', '#'])
        .unwrap_or(url.len() - scheme_end);
    let prefix = &url[..scheme_end + authority_len];
    let rest = &url[scheme_end + authority_len..];
    let rest = rest.split('#').next().unwrap_or("");
    let query = rest.find('?').map_or("", |i| &rest[i..]);
    Ok((
        format!("{prefix}/{query}"),
        format!("{prefix}/{name}{query}"),
    ))
}

pub(crate) fn flag(name: &str, value: &OsStr) -> OsString {
    let mut s = OsString::from(name);
    s.push(value);
    s
}

pub(crate) fn percent_encode(value: &OsStr) -> String {
    let mut out = String::new();
    for &b in value.as_bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub(crate) fn is_root() -> bool {
    match fs::metadata("/proc/self") {
        Ok(meta) => meta.uid() == 0,
        Err(_) => std::env::var("USER").is_ok_and(|u| u == "root"),
    }
}

pub(crate) fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

pub(crate) fn search_path(name: &OsStr) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

pub(crate) fn find_binary(
    env: &str,
    defaults: &[&str],
    on_path: &[&str],
    fallbacks: &[&str],
) -> Result<PathBuf, SandboxError> {
    if let Some(value) = std::env::var_os(env).filter(|v| !v.is_empty()) {
        let path = PathBuf::from(&value);
        if is_executable(&path) {
            return Ok(path);
        }
        if path.components().count() == 1 {
            if let Some(found) = search_path(&value) {
                return Ok(found);
            }
        }
        return Err(SandboxError::BinaryNotFound {
            name: format!("{} (from {env})", path.display()),
        });
    }
    let found = defaults
        .iter()
        .map(PathBuf::from)
        .find(|p| is_executable(p))
        .or_else(|| {
            on_path
                .iter()
                .find_map(|name| search_path(OsStr::new(name)))
        })
        .or_else(|| {
            fallbacks
                .iter()
                .map(PathBuf::from)
                .find(|p| is_executable(p))
        });
    found.ok_or_else(|| SandboxError::BinaryNotFound {
        name: on_path.first().copied().unwrap_or(env).to_string(),
    })
}

fn make_dir() -> Result<PathBuf, SandboxError> {
    make_private_dir("sandbox", Path::new(SOCKET_NAME))
}

/// A new, empty directory `lockstock-<kind>-<pid>-<n>` in the temporary directory, or in `/tmp`
/// when the longest socket path below it (`socket`, relative to it) would be too long.
pub(crate) fn make_private_dir(kind: &str, socket: &Path) -> Result<PathBuf, SandboxError> {
    make_private_dir_for(kind, socket, false)
}

/// [`make_private_dir`]; with `others_enter`, in a directory every user may pass through (a
/// root-owned cluster whose servers run as `mysql` must reach their node directories).
pub(crate) fn make_private_dir_for(
    kind: &str,
    socket: &Path,
    others_enter: bool,
) -> Result<PathBuf, SandboxError> {
    let name = format!(
        "lockstock-{kind}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let mut base = std::env::temp_dir();
    if base.is_relative() {
        if let Ok(cwd) = std::env::current_dir() {
            base = cwd.join(base);
        }
    }
    base = private_dir_base(base, &Path::new(&name).join(socket), others_enter);
    fs::create_dir_all(&base).map_err(io_err(format!("cannot create {}", base.display())))?;
    // Made here, by this call, readable by its owner only: never an existing path (another
    // user's, a live server's of another PID namespace sharing /tmp, or one planted there),
    // which is never removed either — a name taken goes on to the next number.
    let mut name = name;
    for _ in 0..PRIVATE_DIR_TRIES {
        let dir = base.join(&name);
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                name = format!(
                    "lockstock-{kind}-{}-{}",
                    std::process::id(),
                    COUNTER.fetch_add(1, Ordering::Relaxed)
                );
            }
            Err(e) => return Err(io_err(format!("cannot create {}", dir.display()))(e)),
        }
    }
    Err(io_err(format!(
        "no free lockstock-{kind}-{}-<n> name in {} after {PRIVATE_DIR_TRIES} tries",
        std::process::id(),
        base.display()
    ))(std::io::Error::from(
        std::io::ErrorKind::AlreadyExists,
    )))
}

/// Where [`make_private_dir_for`] makes a directory whose deepest socket is `inside` it: the
/// temporary directory `temp`, or `/tmp` where a socket path there would be too long, or (with
/// `others_enter`) where another user could not pass through `temp` or a directory above it
/// (`TMPDIR` under root's 0700 home: `mariadb-install-db --user=mysql` failed with "Permission
/// denied" and every Galera test with it).
fn private_dir_base(temp: PathBuf, inside: &Path, others_enter: bool) -> PathBuf {
    let too_long = temp.join(inside).as_os_str().len() >= MAX_SOCKET_PATH;
    let closed = || {
        temp.ancestors().any(|dir| {
            fs::metadata(dir).map_or(true, |meta| meta.permissions().mode() & 0o001 == 0)
        })
    };
    if too_long || (others_enter && closed()) {
        PathBuf::from("/tmp")
    } else {
        temp
    }
}

/// How many names [`make_private_dir`] tries before it gives up.
const PRIVATE_DIR_TRIES: u32 = 1_000;

fn spawn_watchdog(dir: &Path) -> Result<Child, SandboxError> {
    spawn_watchdog_script(WATCHDOG_SCRIPT, "lockstock-sandbox-watchdog", dir)
}

/// Starts `/bin/sh -c script name <our pid> dir` in its own process group, where the script is
/// [`WATCHDOG_PROLOGUE`], then `body` (which collects into `$pids` what to kill, and kills
/// it), then [`WATCHDOG_EPILOGUE`].
pub(crate) fn spawn_watchdog_script(
    body: &str,
    name: &str,
    dir: &Path,
) -> Result<Child, SandboxError> {
    spawn_watchdog_script_of(body, name, dir, std::process::id())
}

/// [`spawn_watchdog_script`] for the owner `owner` (a test's stand-in for this process).
pub(crate) fn spawn_watchdog_script_of(
    body: &str,
    name: &str,
    dir: &Path,
    owner: u32,
) -> Result<Child, SandboxError> {
    let mut sh = Command::new("/bin/sh");
    sh.arg("-c")
        .arg(format!("{WATCHDOG_PROLOGUE}{body}{WATCHDOG_EPILOGUE}"))
        .arg(name)
        .arg(owner.to_string())
        .arg(dir);
    spawn_detached(&mut sh).map_err(io_err(format!("cannot start the {name} (/bin/sh)")))
}

/// Spawns `cmd` in a process group of its own, with no stdin, stdout or stderr, and none of
/// the calling process's other descriptors: libmariadb opens its sockets without
/// close-on-exec, so a server or watchdog shell started by a test would otherwise hold copies
/// of the test's database connections — a connection the test closes would stay open on the
/// server (with its locks and its transaction) for as long as that child lives.
pub(crate) fn spawn_detached(cmd: &mut Command) -> std::io::Result<Child> {
    inherit_no_descriptors(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0),
    )
    .spawn()
}

/// Makes the process `cmd` starts inherit no descriptor of the calling process but its stdin,
/// stdout and stderr (as `cmd` sets them up). libmariadb opens its sockets without
/// close-on-exec: a test that starts a process (a worker, a server) while it or a test beside
/// it holds database connections would otherwise give the child copies of them, and a
/// connection the test closes would stay open on the server — its transaction and locks with
/// it — for as long as the child lives. Every process the testkit starts is started so.
pub fn inherit_no_descriptors(cmd: &mut Command) -> &mut Command {
    // SAFETY: runs in the forked child before exec and makes only async-signal-safe system
    // calls (close_range, getrlimit, fcntl); it allocates nothing and touches no lock.
    unsafe {
        cmd.pre_exec(|| {
            close_on_exec_from(3);
            Ok(())
        })
    }
}

/// Marks every descriptor from `first` on close-on-exec (in a forked child, before exec).
/// `close_range(CLOSE_RANGE_CLOEXEC)` (Linux 5.11); on an older kernel, `fcntl` on each
/// descriptor below the soft limit on open files.
fn close_on_exec_from(first: libc::c_int) {
    let Ok(from) = libc::c_uint::try_from(first) else {
        return;
    };
    // SAFETY: close_range only changes descriptor flags of the calling process.
    let done = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            from,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    } == 0;
    if done {
        return;
    }
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only the struct it is given.
    let max = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        libc::c_int::try_from(limit.rlim_cur.min(65_536)).unwrap_or(1_024)
    } else {
        1_024
    };
    for fd in first..max {
        // SAFETY: fcntl on a descriptor that may not exist fails with EBADF and does nothing.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 {
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
    }
}

pub(crate) fn write_atomically(path: &Path, contents: &[u8]) -> Result<(), SandboxError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    fs::write(&tmp, contents).map_err(io_err(format!("cannot write {}", tmp.display())))?;
    fs::rename(&tmp, path).map_err(io_err(format!("cannot write {}", path.display())))
}

/// Waits up to `timeout` for `child` to exit.
pub(crate) fn wait_timeout(
    child: &mut Child,
    timeout: Duration,
) -> Result<Option<ExitStatus>, SandboxError> {
    let started = Instant::now();
    loop {
        if let Some(status) = child
            .try_wait()
            .map_err(io_err("cannot check the sandbox server status"))?
        {
            return Ok(Some(status));
        }
        if started.elapsed() >= timeout {
            return Ok(None);
        }
        sleep(POLL);
    }
}

pub(crate) fn read_tail(path: &Path, max: u64) -> String {
    let read = || -> std::io::Result<String> {
        let mut file = fs::File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(max)))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) => text,
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

pub(crate) fn tail(text: &str, max: usize) -> String {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cluster whose servers run as another user (`mysql`) gets its directory where that
    /// user can pass: under a `TMPDIR` inside a 0700 directory (root's home), in /tmp. Before,
    /// it was made there and `mariadb-install-db --user=mysql` failed with "Permission denied".
    #[test]
    #[allow(clippy::expect_used)] // a failed setup is a failed test
    fn a_directory_for_other_users_is_made_where_they_can_pass() {
        use std::os::unix::fs::PermissionsExt;
        let closed =
            std::env::temp_dir().join(format!("lockstock-closed-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&closed);
        fs::create_dir(&closed).expect("a directory");
        fs::set_permissions(&closed, fs::Permissions::from_mode(0o700)).expect("closed");
        let temp = closed.join("tmp");
        fs::create_dir(&temp).expect("a temporary directory inside");
        fs::set_permissions(&temp, fs::Permissions::from_mode(0o1777)).expect("open");
        let inside = Path::new("lockstock-galera-1-0/node9/mysqld.sock");
        // Under a directory others cannot pass: /tmp, for a cluster whose servers run as
        // another user; the temporary directory itself for anyone else.
        let for_others = private_dir_base(temp.clone(), inside, true);
        let own = private_dir_base(temp.clone(), inside, false);
        let open = private_dir_base(std::env::temp_dir(), inside, true);
        let _ = fs::remove_dir_all(&closed);
        assert_eq!(for_others, PathBuf::from("/tmp"));
        assert_eq!(own, temp);
        // /tmp (or wherever TMPDIR is on this machine) stays where others can pass.
        assert!(open == std::env::temp_dir() || open == Path::new("/tmp"));
    }

    /// A private directory is made by the call, readable by its owner only, and never one
    /// that exists: a name taken (here the next two, planted with a file inside) is left as
    /// it is and the next free number is used. Before, an existing directory of the name was
    /// removed (another user's, or a live server's of another PID namespace sharing /tmp)
    /// and the new one made with the umask's mode (0755: every local user could reach the
    /// socket of a server whose `root` has no password).
    #[test]
    fn private_dirs_are_new_and_private() {
        let socket = Path::new("s.sock");
        let base = std::env::temp_dir();
        let next = COUNTER.load(Ordering::Relaxed);
        let planted: Vec<PathBuf> = (next..next + 2)
            .map(|n| {
                let dir = base.join(format!("lockstock-unit-{}-{n}", std::process::id()));
                let planted =
                    fs::create_dir_all(&dir).and_then(|()| fs::write(dir.join("marker"), "kept"));
                assert!(planted.is_ok(), "plant {dir:?}: {planted:?}");
                dir
            })
            .collect();
        let made = make_private_dir("unit", socket);
        let Ok(made) = made else {
            panic!("a private dir: {made:?}");
        };
        let mode = fs::metadata(&made).map_or(0, |m| m.permissions().mode());
        let kept: Vec<bool> = planted.iter().map(|d| d.join("marker").exists()).collect();
        for dir in planted.iter().chain([&made]) {
            let _ = fs::remove_dir_all(dir);
        }
        assert!(!planted.contains(&made), "{made:?} was planted");
        assert_eq!(mode & 0o777, 0o700, "{made:?}");
        assert_eq!(kept, [true, true], "a planted directory was removed");
    }

    #[test]
    fn database_names() {
        assert!(validate_database_name("abc_09_XYZ").is_ok());
        assert!(validate_database_name(&"a".repeat(64)).is_ok());
        for bad in ["", "a-b", "a b", "a`b", "é", &"a".repeat(65)] {
            assert!(
                matches!(
                    validate_database_name(bad),
                    Err(SandboxError::InvalidDatabaseName { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn replace_database_in_urls() {
        let cases = [
            (
                "mysql://root@localhost/old?unix_socket=/s",
                "mysql://root@localhost/?unix_socket=/s",
                "mysql://root@localhost/new?unix_socket=/s",
            ),
            (
                "mysql://u:p@db:3306",
                "mysql://u:p@db:3306/",
                "mysql://u:p@db:3306/new",
            ),
            (
                "mysql://u:p@db:3306/",
                "mysql://u:p@db:3306/",
                "mysql://u:p@db:3306/new",
            ),
            (
                "mysql://localhost?ssl_mode=disabled",
                "mysql://localhost/?ssl_mode=disabled",
                "mysql://localhost/new?ssl_mode=disabled",
            ),
            (
                "mysql://localhost/old#frag",
                "mysql://localhost/",
                "mysql://localhost/new",
            ),
        ];
        for (input, server, db) in cases {
            match replace_database(input, "new") {
                Ok((s, d)) => assert_eq!((s.as_str(), d.as_str()), (server, db), "{input}"),
                Err(e) => panic!("{input}: {e}"),
            }
        }
        assert!(replace_database("localhost/db", "new").is_err());
    }

    /// The descriptors `pid` has open that point where `target` (a link in /proc/self/fd) does.
    fn copies_of(pid: u32, target: &Path) -> usize {
        let Ok(ours) = fs::read_link(target) else {
            panic!("cannot read {}", target.display());
        };
        fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|entries| {
                entries
                    .filter_map(|entry| fs::read_link(entry.ok()?.path()).ok())
                    .filter(|link| *link == ours)
                    .count()
            })
            .unwrap_or(0)
    }

    #[test]
    fn detached_children_inherit_no_descriptors() {
        // A socket without close-on-exec, as libmariadb opens its connections.
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: socketpair writes two descriptors into the array it is given.
        let made =
            unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, fds.as_mut_ptr()) };
        assert_eq!(made, 0, "socketpair: {}", std::io::Error::last_os_error());
        let target = PathBuf::from(format!("/proc/self/fd/{}", fds[0]));
        let mut sleeper = Command::new("sleep");
        sleeper.arg("30");
        let mut child = match spawn_detached(&mut sleeper) {
            Ok(child) => child,
            Err(e) => panic!("cannot start sleep: {e}"),
        };
        // The child has exec'ed once its command line is sleep's.
        let started = Instant::now();
        while fs::read(format!("/proc/{}/cmdline", child.id()))
            .map_or(true, |cmdline| !cmdline.starts_with(b"sleep"))
            && started.elapsed() < Duration::from_secs(10)
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        let copies = copies_of(child.id(), &target);
        let _ = child.kill();
        let _ = child.wait();
        // SAFETY: closes the two descriptors socketpair made, which nothing else uses.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
        assert_eq!(copies, 0, "the child holds the test's socket");
    }

    /// A directory of its own for a test, removed when the test ends (also when it fails).
    struct TestDir(PathBuf);

    impl TestDir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("lockstock-testkit-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            if let Err(e) = fs::create_dir_all(&dir) {
                panic!("cannot create {}: {e}", dir.display());
            }
            Self(dir)
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// An installer script in `dir` that runs `body` (sh).
    fn fake_installer(dir: &TestDir, body: &str) -> PathBuf {
        let script = dir.0.join("install-db");
        let written = fs::write(&script, format!("#!/bin/sh\n{body}\n"))
            .and_then(|()| fs::set_permissions(&script, fs::Permissions::from_mode(0o755)));
        if let Err(e) = written {
            panic!("cannot write {}: {e}", script.display());
        }
        script
    }

    /// `mariadb-install-db` (and the bootstrap server it starts) inherits no descriptor of the
    /// test beside its stdio: a database connection the test (or a test beside it) closes
    /// meanwhile is closed on the server. Before the fix the installer got copies of them.
    #[test]
    fn the_installer_inherits_no_descriptors() {
        let dir = TestDir::new("install-fds");
        let listing = dir.0.join("fds");
        let script = fake_installer(
            &dir,
            &format!(
                "for fd in /proc/$$/fd/*; do readlink \"$fd\"; done > '{}'; exit 1",
                listing.display()
            ),
        );
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: socketpair writes two descriptors into the array it is given.
        let made =
            unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, fds.as_mut_ptr()) };
        assert_eq!(made, 0, "socketpair: {}", std::io::Error::last_os_error());
        let ours = fs::read_link(format!("/proc/self/fd/{}", fds[0]));
        let answer = run_install_db(&script, &dir.0, None);
        // SAFETY: closes the two descriptors socketpair made, which nothing else uses.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
        assert!(
            matches!(answer, Err(SandboxError::InstallDb { .. })),
            "{answer:?}"
        );
        let (Ok(ours), Ok(seen)) = (ours, fs::read_to_string(&listing)) else {
            panic!("the installer's descriptors were not listed");
        };
        let ours = ours.to_string_lossy().into_owned();
        assert!(
            !seen.lines().any(|link| link == ours),
            "the installer holds the test's socket {ours}: {seen}"
        );
    }

    /// An installer that exits leaving a process it started behind (holding its output) does
    /// not keep the start waiting: that process is killed with the installer's group.
    #[test]
    fn an_installer_that_leaves_a_child_behind_does_not_hold_the_start() {
        let dir = TestDir::new("install-left");
        let script = fake_installer(&dir, "sleep 60 & exit 1");
        let started = Instant::now();
        let answer = run_install_db_within(&script, &dir.0, None, Duration::from_secs(30));
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "waited {:?}",
            started.elapsed()
        );
        assert!(
            matches!(answer, Err(SandboxError::InstallDb { .. })),
            "{answer:?}"
        );
    }

    /// An installer that does not finish is killed, with what it started, after its time: a
    /// start never hangs on it. Before the fix the sandbox waited for it without a bound.
    #[test]
    fn an_installer_that_does_not_finish_is_killed_with_its_children() {
        let dir = TestDir::new("install-hang");
        let pid_file = dir.0.join("pid");
        let script = fake_installer(
            &dir,
            &format!("sleep 60 & echo $! > '{}'; wait", pid_file.display()),
        );
        let started = Instant::now();
        let answer = run_install_db_within(&script, &dir.0, None, Duration::from_millis(500));
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "waited {:?}",
            started.elapsed()
        );
        assert!(
            matches!(&answer, Err(SandboxError::InstallDb { status, .. }) if status.contains("killed")),
            "{answer:?}"
        );
        let Some(pid) = fs::read_to_string(&pid_file)
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
        else {
            panic!("the installer's child was not recorded");
        };
        // Gone, or a zombie about to be reaped: not sleeping on.
        let until = Instant::now() + Duration::from_secs(5);
        let running = |pid: u32| {
            fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                stat.rsplit(')')
                    .next()
                    .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
            })
        };
        while running(pid) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!running(pid), "the installer's child {pid} still runs");
    }

    #[test]
    fn socket_paths_are_encoded() {
        assert_eq!(
            percent_encode(OsStr::new("/tmp/a b+c/mysqld.sock")),
            "/tmp/a%20b%2Bc/mysqld.sock"
        );
    }

    #[test]
    fn tails_respect_char_boundaries() {
        assert_eq!(tail("héllo", 4), "llo");
        assert_eq!(tail("abc", 10), "abc");
    }
}
