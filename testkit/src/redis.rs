//! A throwaway Redis server and a minimal synchronous client, for the contention report's
//! Redis-gate row (`DECR` as the stock gate, one INSERT per granted request into MariaDB).
//!
//! [`RedisServer::start`] runs `redis-server` (from the system packages, or
//! `LOCKSTOCK_REDIS_SERVER`) with no persistence (`save ""`, `appendonly no`), no TCP port and a
//! Unix socket in a private directory `lockstock-redis-*` — like the MariaDB sandbox, which the
//! report reaches through its socket too. The server is killed and the directory removed when
//! the value is dropped, and a watchdog process does both if this process dies first.
//!
//! [`RedisConnection`] speaks RESP2 over the socket: commands go out as arrays of bulk strings
//! (the arguments are never interpreted: no injection), replies are read fully; every read and
//! write has a timeout.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::sandbox::{
    find_binary, io_err, kill_and_reap, make_private_dir, remove_watched_dir, spawn_detached,
    spawn_watchdog_script, write_atomically, SandboxError,
};

/// The socket, relative to the server's directory.
const SOCKET_NAME: &str = "redis.sock";
/// File the watchdog reads to find the server's pid.
const PID_FILE: &str = "redis.pid.lockstock";
/// How long a start may take.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Every read and write of a connection.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest bulk string a reply may announce: Redis's own limit (`proto-max-bulk-len`'s
/// default). A longer length is a protocol error, not an allocation.
const MAX_BULK: usize = 512 * 1024 * 1024;
/// The longest reply line (a status, an error, a length): longer is a protocol error.
const MAX_LINE: u64 = 64 * 1024;
/// How deep arrays may nest in a reply: deeper is a protocol error (each level is a call).
const MAX_DEPTH: usize = 64;
/// What a bulk string's buffer reserves before its bytes arrive.
const BULK_RESERVE: usize = 64 * 1024;

/// Watchdog body (see `sandbox::spawn_watchdog_script`): kills the process whose pid is in
/// `$dir/redis.pid.lockstock` if it is this server — its working directory is `$dir` (it runs
/// with `--dir $dir`). Not its name (a `LOCKSTOCK_REDIS_SERVER` binary may have another, e.g.
/// `redis-server-7` or `valkey-server`) nor its command line (Redis rewrites it); a pid reused
/// by another process meanwhile has another working directory.
const WATCHDOG_SCRIPT: &str = r#"
p=$(cat "$dir/redis.pid.lockstock" 2>/dev/null)
case "$p" in
  ''|*[!0-9]*) ;;
  *)
    if [ "$(readlink "/proc/$p/cwd" 2>/dev/null)" = "$(cd "$dir" 2>/dev/null && pwd -P)" ]; then
      pids=$p
      kill -9 "$p" 2>/dev/null
    fi
    ;;
esac
"#;

/// Errors of the Redis server or a connection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RedisError {
    /// Finding the binary, creating the directory or starting the watchdog failed.
    #[error(transparent)]
    Setup(#[from] SandboxError),
    /// The server did not answer on its socket in time.
    #[error("redis-server did not start within {timeout:?}: {detail}")]
    Start {
        /// How long it was given.
        timeout: Duration,
        /// The last connection error, or the server's exit status.
        detail: String,
    },
    /// Reading or writing the socket failed (a timeout included).
    #[error("redis connection: {0}")]
    Io(#[from] std::io::Error),
    /// The server answered something that is not RESP, or not the reply expected.
    #[error("redis protocol: {0}")]
    Protocol(String),
    /// The server answered with an error reply.
    #[error("redis error reply: {0}")]
    Server(String),
}

/// A reply of the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+OK` and other simple strings.
    Simple(String),
    /// `:n`.
    Integer(i64),
    /// `$n ...`; `None` for the null bulk string (`$-1`).
    Bulk(Option<Vec<u8>>),
    /// `*n ...`; `None` for the null array.
    Array(Option<Vec<Reply>>),
}

/// A throwaway `redis-server` on a Unix socket; killed and removed on drop.
pub struct RedisServer {
    server: Option<Child>,
    watchdog: Option<Child>,
    dir: PathBuf,
    socket: PathBuf,
}

impl RedisServer {
    /// Whether a `redis-server` binary is installed (`LOCKSTOCK_REDIS_SERVER`,
    /// `/usr/bin/redis-server` or `PATH`).
    pub fn installed() -> bool {
        find_redis_server().is_ok()
    }

    /// Starts a server with no persistence on a socket of its own and waits until it answers
    /// `PING`.
    pub fn start() -> Result<Self, RedisError> {
        Self::start_with(&find_redis_server()?)
    }

    /// [`start`](Self::start) with the server binary `binary`.
    fn start_with(binary: &Path) -> Result<Self, RedisError> {
        let dir = make_private_dir("redis", Path::new(SOCKET_NAME))?;
        let socket = dir.join(SOCKET_NAME);
        let mut server = Self {
            server: None,
            watchdog: None,
            dir,
            socket,
        };
        server.watchdog = Some(spawn_watchdog_script(
            WATCHDOG_SCRIPT,
            "lockstock-redis-watchdog",
            &server.dir,
        )?);
        let mut cmd = Command::new(binary);
        cmd.arg("--port")
            .arg("0")
            .arg("--unixsocket")
            .arg(&server.socket)
            .arg("--unixsocketperm")
            .arg("700")
            .arg("--save")
            .arg("")
            .arg("--appendonly")
            .arg("no")
            .arg("--dir")
            .arg(&server.dir)
            .arg("--logfile")
            .arg(server.dir.join("redis.log"))
            .arg("--databases")
            .arg("1");
        let child = spawn_detached(&mut cmd)
            .map_err(io_err(format!("cannot start {}", binary.display())))?;
        let pid = child.id();
        server.server = Some(child);
        write_atomically(&server.dir.join(PID_FILE), pid.to_string().as_bytes())?;
        server.wait_ready()?;
        Ok(server)
    }

    /// The server's Unix socket.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// A new connection.
    pub fn connect(&self) -> Result<RedisConnection, RedisError> {
        RedisConnection::open(&self.socket)
    }

    fn wait_ready(&mut self) -> Result<(), RedisError> {
        let started = Instant::now();
        loop {
            let detail = match self.connect().and_then(|mut c| c.command(&[b"PING"])) {
                Ok(Reply::Simple(pong)) if pong == "PONG" => return Ok(()),
                Ok(other) => format!("PING answered {other:?}"),
                Err(error) => error.to_string(),
            };
            let exited = match self.server.as_mut().map(Child::try_wait) {
                Some(Ok(Some(status))) => Some(status.to_string()),
                _ => None,
            };
            if exited.is_some() || started.elapsed() >= START_TIMEOUT {
                let log = std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default();
                return Err(RedisError::Start {
                    timeout: START_TIMEOUT,
                    detail: format!(
                        "{}; log: {}",
                        exited.map_or(detail, |s| format!("exited with {s}")),
                        log.trim()
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        kill_and_reap(self.server.take());
        remove_watched_dir(&self.dir, self.watchdog.take());
    }
}

fn find_redis_server() -> Result<PathBuf, SandboxError> {
    find_binary(
        "LOCKSTOCK_REDIS_SERVER",
        &["/usr/bin/redis-server"],
        &["redis-server"],
        &[],
    )
}

/// One connection to a Redis server (RESP2, synchronous, one command at a time). After a
/// failure that may leave part of a reply unread (an I/O error or timeout, a reply that is not
/// RESP) every later command fails with [`RedisError::Protocol`] instead of reading that rest
/// as its own reply: open a new connection.
pub struct RedisConnection {
    stream: BufReader<UnixStream>,
    out: Vec<u8>,
    /// A failure may have left part of a reply unread.
    out_of_step: bool,
}

impl RedisConnection {
    /// Connects to the server on Unix socket `socket`.
    pub fn open(socket: &Path) -> Result<Self, RedisError> {
        let stream = UnixStream::connect(socket)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(Self {
            stream: BufReader::new(stream),
            out: Vec::with_capacity(64),
            out_of_step: false,
        })
    }

    /// Sends one command (its name and arguments, each a bulk string) and reads its reply; an
    /// error reply is [`RedisError::Server`] (also one inside an array reply, whose other
    /// elements are read all the same).
    pub fn command(&mut self, args: &[&[u8]]) -> Result<Reply, RedisError> {
        if self.out_of_step {
            return Err(RedisError::Protocol(
                "the connection is out of step after an earlier failure: open a new one".into(),
            ));
        }
        let answer = self.send_and_read(args);
        // Only an error reply is read whole; anything else may leave a reply's rest unread.
        self.out_of_step = matches!(answer, Err(RedisError::Io(_) | RedisError::Protocol(_)));
        answer
    }

    fn send_and_read(&mut self, args: &[&[u8]]) -> Result<Reply, RedisError> {
        self.out.clear();
        self.out
            .extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for arg in args {
            self.out
                .extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            self.out.extend_from_slice(arg);
            self.out.extend_from_slice(b"\r\n");
        }
        self.stream.get_mut().write_all(&self.out)?;
        self.reply(0)
    }

    /// A command whose reply is an integer.
    fn integer(&mut self, args: &[&[u8]]) -> Result<i64, RedisError> {
        match self.command(args)? {
            Reply::Integer(n) => Ok(n),
            other => Err(RedisError::Protocol(format!(
                "expected an integer reply, got {other:?}"
            ))),
        }
    }

    /// `DECR key`: the value after.
    pub fn decr(&mut self, key: &str) -> Result<i64, RedisError> {
        self.integer(&[b"DECR", key.as_bytes()])
    }

    /// `INCR key`: the value after.
    pub fn incr(&mut self, key: &str) -> Result<i64, RedisError> {
        self.integer(&[b"INCR", key.as_bytes()])
    }

    /// `SET key value`.
    pub fn set(&mut self, key: &str, value: i64) -> Result<(), RedisError> {
        match self.command(&[b"SET", key.as_bytes(), value.to_string().as_bytes()])? {
            Reply::Simple(ok) if ok == "OK" => Ok(()),
            other => Err(RedisError::Protocol(format!("SET answered {other:?}"))),
        }
    }

    /// `GET key` as an integer; `None` if the key does not exist.
    pub fn get_integer(&mut self, key: &str) -> Result<Option<i64>, RedisError> {
        match self.command(&[b"GET", key.as_bytes()])? {
            Reply::Bulk(None) => Ok(None),
            Reply::Bulk(Some(bytes)) => std::str::from_utf8(&bytes)
                .ok()
                .and_then(|text| text.parse().ok())
                .map(Some)
                .ok_or_else(|| RedisError::Protocol(format!("GET {key}: not an integer"))),
            other => Err(RedisError::Protocol(format!("GET answered {other:?}"))),
        }
    }

    /// One reply line without its `\r\n`.
    fn line(&mut self) -> Result<String, RedisError> {
        let mut line = Vec::new();
        (&mut self.stream)
            .take(MAX_LINE)
            .read_until(b'\n', &mut line)?;
        if !line.ends_with(b"\r\n") {
            return Err(RedisError::Protocol(
                if u64::try_from(line.len()).is_ok_and(|n| n >= MAX_LINE) {
                    format!("a reply line longer than {MAX_LINE} bytes")
                } else {
                    "connection closed mid-reply".into()
                },
            ));
        }
        line.truncate(line.len() - 2);
        String::from_utf8(line).map_err(|_| RedisError::Protocol("reply is not UTF-8".into()))
    }

    /// One reply, inside `depth` arrays.
    fn reply(&mut self, depth: usize) -> Result<Reply, RedisError> {
        if depth > MAX_DEPTH {
            return Err(RedisError::Protocol(format!(
                "arrays nested more than {MAX_DEPTH} deep"
            )));
        }
        let line = self.line()?;
        // The type byte: a reply whose first character is not one byte (not RESP) has none.
        let (kind, rest) = line
            .split_at_checked(line.len().min(1))
            .unwrap_or(("", line.as_str()));
        let number = || {
            rest.parse::<i64>()
                .map_err(|_| RedisError::Protocol(format!("bad length or integer {line:?}")))
        };
        match kind {
            "+" => Ok(Reply::Simple(rest.to_string())),
            "-" => Err(RedisError::Server(rest.to_string())),
            ":" => Ok(Reply::Integer(number()?)),
            "$" => match usize::try_from(number()?) {
                Err(_) => Ok(Reply::Bulk(None)),
                Ok(len) if len > MAX_BULK => Err(RedisError::Protocol(format!(
                    "a bulk string of {len} bytes (at most {MAX_BULK})"
                ))),
                Ok(len) => {
                    // Read as the bytes arrive: a length announced is not a length sent.
                    let mut bytes = Vec::with_capacity((len + 2).min(BULK_RESERVE));
                    let wanted = u64::try_from(len + 2).unwrap_or(u64::MAX);
                    (&mut self.stream).take(wanted).read_to_end(&mut bytes)?;
                    if bytes.len() != len + 2 || !bytes.ends_with(b"\r\n") {
                        return Err(RedisError::Protocol("bulk string without CRLF".into()));
                    }
                    bytes.truncate(len);
                    Ok(Reply::Bulk(Some(bytes)))
                }
            },
            "*" => match usize::try_from(number()?) {
                Err(_) => Ok(Reply::Array(None)),
                Ok(len) => {
                    let mut items = Vec::with_capacity(len.min(1024));
                    // An element's error reply is read whole: the elements after it are read
                    // too, and the first such error is the answer.
                    let mut refused = None;
                    for _ in 0..len {
                        match self.reply(depth + 1) {
                            Ok(item) => items.push(item),
                            Err(RedisError::Server(text)) => {
                                refused.get_or_insert(text);
                            }
                            Err(other) => return Err(other),
                        }
                    }
                    match refused {
                        Some(text) => Err(RedisError::Server(text)),
                        None => Ok(Reply::Array(Some(items))),
                    }
                }
            },
            _ => Err(RedisError::Protocol(format!("unknown reply {line:?}"))),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn decr_gate_against_a_throwaway_server() {
        if !RedisServer::installed() {
            eprintln!("redis-server is not installed; skipped");
            return;
        }
        let server = RedisServer::start().unwrap();
        let dir = server.socket_path().parent().unwrap().to_path_buf();
        let mut conn = server.connect().unwrap();
        conn.set("stock", 2).unwrap();
        assert_eq!(conn.decr("stock").unwrap(), 1);
        assert_eq!(conn.decr("stock").unwrap(), 0);
        assert_eq!(conn.decr("stock").unwrap(), -1);
        assert_eq!(conn.incr("stock").unwrap(), 0);
        assert_eq!(conn.get_integer("stock").unwrap(), Some(0));
        assert_eq!(conn.get_integer("missing").unwrap(), None);
        // Arguments are bulk strings: a key with spaces and CRLF is one key.
        conn.set("a b\r\nSET x 1", 7).unwrap();
        assert_eq!(conn.get_integer("x").unwrap(), None);
        assert_eq!(conn.get_integer("a b\r\nSET x 1").unwrap(), Some(7));
        assert!(matches!(
            conn.command(&[b"NOSUCHCOMMAND"]),
            Err(RedisError::Server(_))
        ));
        drop(conn);
        drop(server);
        assert!(!dir.exists(), "the server's directory is removed");
    }

    /// The watchdog kills a server whose binary has another name than `redis-server` (a
    /// `LOCKSTOCK_REDIS_SERVER` such as `redis-server-7`) when its owner dies. Before, it
    /// checked the process name and left such a server running (its directory removed).
    #[test]
    fn the_watchdog_kills_a_server_whose_binary_has_another_name() {
        use std::os::unix::process::ExitStatusExt;
        let Ok(real) = find_redis_server() else {
            eprintln!("redis-server is not installed; skipped");
            return;
        };
        let links = SocketDir::new("redis-renamed");
        let renamed = links.0.join("redis-server-7");
        std::os::unix::fs::symlink(&real, &renamed).unwrap();
        let mut server = RedisServer::start_with(&renamed).unwrap();
        let mut owner = Command::new("sleep").arg("600").spawn().unwrap();
        let mut watchdog = crate::sandbox::spawn_watchdog_script_of(
            WATCHDOG_SCRIPT,
            "lockstock-redis-watchdog",
            &server.dir,
            owner.id(),
        )
        .unwrap();
        owner.kill().unwrap();
        owner.wait().unwrap();
        assert!(watchdog.wait().unwrap().success());
        let mut child = server.server.take().unwrap();
        let until = Instant::now() + Duration::from_secs(5);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if Instant::now() >= until {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(
            status.and_then(|s| s.signal()),
            Some(9),
            "the renamed server outlived its owner's watchdog"
        );
    }

    /// A private directory for a test's fake servers' sockets, removed when dropped (also
    /// when the test fails). Not named `lockstock-redis-*`: it holds no server.
    struct SocketDir(PathBuf);

    impl SocketDir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("lockstock-testkit-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for SocketDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A server on `socket` that answers the first command with `reply` (then closes).
    fn answering(socket: &Path, reply: &'static [u8]) -> std::thread::JoinHandle<()> {
        answering_each(socket, vec![reply])
    }

    /// A server on `socket` that answers its commands with `replies`, one each (then closes).
    fn answering_each(socket: &Path, replies: Vec<&'static [u8]>) -> std::thread::JoinHandle<()> {
        let listener = std::os::unix::net::UnixListener::bind(socket).unwrap();
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            for reply in replies {
                let mut request = [0u8; 256];
                if stream.read(&mut request).unwrap_or(0) == 0 {
                    return;
                }
                let _ = stream.write_all(reply);
            }
        })
    }

    /// A connection never reads the rest of an earlier reply as a later command's: an error
    /// inside an array reply is read with the elements after it, and after a reply that is not
    /// RESP the connection refuses further commands. Before, the array's remaining element
    /// (`:5`) answered the next command, and so did the rest after the junk (`:9`).
    #[test]
    fn a_connection_never_answers_with_an_earlier_replys_rest() {
        let dir = SocketDir::new("redis-step");
        let dir = &dir.0;
        let socket = dir.join("array");
        let server = answering_each(&socket, vec![b"*2\r\n-ERR no\r\n:5\r\n", b":7\r\n"]);
        let mut conn = RedisConnection::open(&socket).unwrap();
        let first = conn.command(&[b"X"]);
        assert!(
            matches!(&first, Err(RedisError::Server(e)) if e == "ERR no"),
            "{first:?}"
        );
        assert_eq!(conn.command(&[b"Y"]).unwrap(), Reply::Integer(7));
        server.join().unwrap();

        let socket = dir.join("junk");
        let server = answering_each(&socket, vec![b"?junk\r\n:9\r\n"]);
        let mut conn = RedisConnection::open(&socket).unwrap();
        assert!(matches!(
            conn.command(&[b"X"]),
            Err(RedisError::Protocol(_))
        ));
        let second = conn.command(&[b"Y"]);
        assert!(matches!(second, Err(RedisError::Protocol(_))), "{second:?}");
        drop(conn);
        server.join().unwrap();
    }

    /// A reply that announces more than Redis ever sends is a protocol error, not an attempt to
    /// allocate it (before: a bulk length of 9·10¹⁸ aborted the process on the allocation), and
    /// so are a reply line without end, arrays nested without end (each level a call: the
    /// stack overflowed) and a bulk string shorter than announced (its length is not reserved
    /// up front), and a reply whose first character is not ASCII.
    #[test]
    fn a_reply_beyond_the_protocols_limits_is_a_protocol_error() {
        let dir = SocketDir::new("redis-limits");
        let dir = &dir.0;
        let nested: &'static [u8] = "*1\r\n".repeat(100_000).leak().as_bytes();
        let cases: [(&str, &'static [u8]); 5] = [
            ("bulk", b"$9000000000000000000\r\n"),
            // A first character of two bytes (before: a panic, no char boundary at 1).
            ("multibyte", b"\xc3\xa9\r\n"),
            ("line", &[b'+'; 70 * 1024]),
            ("nested", nested),
            ("short", b"$536870912\r\nab\r\n"),
        ];
        for (name, reply) in cases {
            let socket = dir.join(name);
            let server = answering(&socket, reply);
            let mut conn = RedisConnection::open(&socket).unwrap();
            let answer = conn.get_integer("x");
            assert!(
                matches!(answer, Err(RedisError::Protocol(_))),
                "{name}: {answer:?}"
            );
            // Closed before the server is joined: it may still be writing what was not read.
            drop(conn);
            server.join().unwrap();
        }
    }
}
