//! Single-writer routing over a MariaDB Galera cluster, with failover.
//!
//! A [`Router`] is built from the URLs of the cluster's nodes and holds an r2d2 pool per node.
//! It sends every lockstock write — single calls through [`Router::write`], combined batches
//! through [`Combining::routed`](crate::combine::Combining::routed) — to ONE node at a time, the
//! *writer*, and moves to another node when the writer dies, freezes or leaves the Primary
//! component. Reads ([`Router::read`]) go to any healthy node, causally.
//!
//! ```no_run
//! # fn main() -> Result<(), lockstock::Error> {
//! use lockstock::route::Router;
//! use lockstock::{BalanceLedger, Deadline};
//! use rust_decimal::Decimal;
//! use std::time::Duration;
//!
//! let router = Router::builder([
//!     "mysql://app@db1/shop",
//!     "mysql://app@db2/shop",
//!     "mysql://app@db3/shop",
//! ])
//! .pool_size(8)
//! .build()?;
//! let ledger = BalanceLedger::new();
//! let deadline = Deadline::after(Duration::from_secs(3));
//! let entry = router.write(deadline, |conn, deadline| {
//!     ledger.deduct_by(conn, 42, Decimal::new(250, 2), "order-981", deadline)
//! })?;
//! let balance = router.read(deadline, |conn, _| ledger.balance(conn, 42))?;
//! # let _ = (entry, balance);
//! # Ok(())
//! # }
//! ```
//!
//! # Why one writer
//!
//! Galera accepts writes on every node, but lockstock does not support that: the published
//! Jepsen analysis of MariaDB Galera Cluster (2026) found lost updates and stale reads in
//! healthy clusters and lost commits on crashes when writes are spread over nodes (MariaDB
//! issues MDEV-38974, MDEV-38976, MDEV-38977, MDEV-38999), and an independent lockstock workload
//! with writes on three nodes once committed half a refund (a journal entry without its balance
//! update) and left calls hanging on brute-force-aborted connections. With all writes on one
//! node none of this was seen: the node's own InnoDB locks serialise lockstock's hot rows, and
//! certification has nothing to resolve. Spreading writes also costs throughput (every conflict
//! is a rollback, certified cluster-wide). So: one writer, the others for reads and failover.
//!
//! # All routers agree: the designated-writer row
//!
//! Every process has its own router, and two routers that picked different writers would make
//! the cluster multi-writer again. So the choice is kept in the database: the table
//! `designated_writer` (migration `2026-11-28-000004_designated_writer`) holds one row with the
//! writer's `@@wsrep_node_name`, an epoch and when it changed. A router adopts the node the row
//! names while that node is healthy; a router that finds the row naming another node than its
//! writer (every health interval, and after a failure) follows the row; a router that finds
//! the named node unhealthy moves the row to a healthy node with a compare-and-set on the epoch
//! sent through that node — of two routers that race, Galera commits exactly one. Before a new
//! writer takes writes, the router reads the row on it with `wsrep_sync_wait = 1`, so the node
//! has applied everything the cluster committed first. See the `election` module for the steps.
//!
//! Every router of a cluster must list every node, and two URLs must never reach the same node:
//! [`RouterBuilder::build`] refuses URLs that reach nodes of the same name
//! ([`Error::InvalidInput`]). Migrations must have run (the row must exist).
//!
//! # Health
//!
//! One probe thread per node asks, every [`health_interval`](RouterBuilder::health_interval),
//! for `@@wsrep_node_name` and `wsrep_ready`, `wsrep_cluster_status` and
//! `wsrep_local_state_comment` (information_schema.GLOBAL_STATUS); a node is healthy when they
//! are `ON`, `Primary` and `Synced`. It also reads `@@global.read_only`: a node that runs
//! `read_only` takes reads but is never elected writer, and a writer found read-only — by its
//! probe, or by a write it refused (1290: nothing applied) — is replaced, the refused write
//! running again on the new writer. A node is down from the moment a call on it fails with a
//! node failure (below), a probe finds it otherwise, or a probe has been hanging on it for longer
//! than the probe timeout. A lost or broken connection alone may be that connection's (a
//! `KILL`), and a call cut off at its deadline ([`Error::ServerUnresponsive`]) may have met a
//! statement slower than the deadline on a healthy node: either makes the node *suspect* —
//! calls wait while the node's probe, woken at once, checks it on a connection of its own, and
//! only a failed probe (or none answering within the probe timeout) takes the node down. A cut
//! call (also a COMMIT cut off: `OutcomeUnknown`) also replaces the node's pools (their
//! connections may all be dead), and a second cut of a call that started after the first was
//! cut — calls in flight together met the same stall — takes the node down whatever its probe
//! says (its statements hang), unless a call started after the first cut was answered. A node
//! that is down stays down until a probe finds it healthy again — and one a call (or the
//! coordinator) took down, until the coordinator has also run once since (at most two probe
//! timeouts), so the writer moves first wherever another node can take it: a probe that
//! answers at once (a status read, while the node's statements hang) does not hand the node
//! its writer back. A node whose probe finds it healthy after finding it down gets fresh
//! pools, before calls are sent to it again: a connection its pool began while the node was
//! gone is retried by r2d2 in the background, and would hold the pool's slot while the node is
//! back (retries are at most half the probe timeout apart, where r2d2's default is 15 s). The
//! coordinator never marks a node down because no pooled connection came in time (nothing was
//! sent): it goes on without that node for the rest of the election. The probe timeout is the [`probe_policy`](RouterBuilder::probe_policy)'s
//! deadline plus its [`unresponsive_grace`](crate::TxnPolicy::unresponsive_grace).
//! [`Router::stats`] shows the writer, the epoch, the failovers and each node's health.
//!
//! # What a caller sees
//!
//! [`Router::write`] runs the caller's closure on a connection to the writer with the caller's
//! [`Deadline`], and bounds it by that deadline whatever the closure calls: a lockstock call
//! without a deadline parameter (`balance`, `audit`, `hold`, ...) runs by the earlier of its
//! own policy's and the router's ([`TxnRunner::deadline`](crate::TxnRunner::deadline)), so it
//! ends by the router's deadline as any call ends by its own; what else blocks past it (a
//! statement of the closure's own, a server that stops answering) is cut by the router's
//! watchdog at that deadline plus grace (any other socket the closure blocks on then is shut
//! down too: keep closures to the connection). After the closure the router asks the
//! connection whether it was left inside a transaction (one cached statement, without a causal
//! wait; not once the deadline has passed): such a connection — or one that cannot be asked —
//! is discarded, never handed to the next closure, whose statements (and lockstock's key
//! lookups) would run in that transaction. The closure must be a lockstock call with an idempotency key (or otherwise
//! safe to run again): the router runs it again after a *node failure*, an answer that says nothing
//! was applied and the node is to blame —
//! [`Error::ServerUnresponsive`], [`Error::ConnectionBroken`], a lost connection before COMMIT
//! ([`ServerErrorKind::ConnectionLost`]), a node
//! outside the Primary component ([`NodeNotReady`](crate::ServerErrorKind::NodeNotReady), 1047),
//! a node that is not the designated writer ([`Error::NotDesignatedWriter`]), a session that does
//! not replicate ([`Error::NotReplicated`]: the connection is discarded and the probe, which reads
//! the node's `wsrep_on`, decides) or no pooled connection to be had: one the node refused
//! takes it down; none within the probe timeout, no connect refused, makes it suspect (a pool
//! whose every connection stays in use is only waited on), and a second such checkout in a row
//! (started after the first gave up, no connection handed out between them) takes it down —
//! its new connections hang, whatever its probe's kept connection answers (only calls whose
//! deadline is longer than the probe timeout count: a shorter one answers `Timeout`, blaming
//! no node). The node is marked
//! down (or suspect, as above), the router waits (within the deadline) for the coordinator to fail over
//! — or for the probe to clear the node — and runs the call again. Everything else comes back as it is: results, domain refusals
//! ([`Error::InsufficientBalance`], [`Error::SoldOut`], ...), [`Error::Contended`], and
//! [`Error::OutcomeUnknown`] — a COMMIT whose answer was lost may have been applied (so may a
//! request refused now whose key, maybe recorded by an earlier call, could not be looked up),
//! so the router does not decide: retry with the same idempotency key (through the router: it
//! finds the committed entry and answers with it, or applies the change once). Where the
//! connection or the node failed under it, the node is blamed all the same (suspect or down,
//! as for a node failure), so the retry goes to a writer that answers. When the deadline
//! passes while no writer is available, the call answers the last node failure it saw, or
//! [`Error::Timeout`] if it never got to send anything; both mean nothing was applied.
//!
//! - **kill -9 of the writer**: calls in flight get a lost connection (before COMMIT: run again
//!   on the new writer; during COMMIT: `OutcomeUnknown`). The probes see connections refused;
//!   the row moves to a surviving node once the cluster evicted the dead one (after
//!   `evs.suspect_timeout`), and calls continue there, each within its deadline.
//! - **SIGSTOP of the writer** (a frozen node, a partition): calls in flight get no answer at
//!   all; lockstock's watchdog (Linux; see the [`txn`](crate::txn) module) shuts their
//!   connections down at their deadline plus `unresponsive_grace` and answers
//!   [`Error::ServerUnresponsive`] (nothing committed), or
//!   `OutcomeUnknown` for a COMMIT in flight — by then the deadline has passed, so those calls
//!   are not run again: the caller retries with the same key. The probe of the frozen node
//!   times out, the coordinator fails over, and new calls go to the new writer.
//! - **The writer leaves the Primary component** (it lost quorum): it answers 1047 at once;
//!   calls run again on a node of the Primary component, if the router can reach one.
//!
//! A node that comes back (restart with IST, SIGCONT) is healthy again once Synced, and takes
//! reads; writes stay where the row points: the router does not fail back.
//!
//! # Reads
//!
//! [`Router::read`] runs the closure on any healthy node, in turn, on connections with
//! `wsrep_sync_wait = 1` ([`ReadConsistency::Causal`], the default): each read transaction's
//! `START TRANSACTION` waits until the node applied every write the cluster committed before,
//! so a read never misses an acknowledged write. [`ReadConsistency::Writer`] reads on the
//! writer this router knows instead, without the wait (it sees every write committed through
//! it, but until this router follows a writer that another process moved, not those committed
//! on the new one). Reads are run again after a node failure, like writes.
//!
//! # Routing outside the process
//!
//! If a proxy routes for you, give lockstock one URL (the proxy) and configure the proxy with
//! the same rule — one writer, failover only when it is down:
//! - **MaxScale**: the `readwritesplit` router with a `galeramon` monitor, which picks ONE
//!   master (keep `root_node_as_master` / `disable_master_failback=true` so it does not move
//!   back); route lockstock's transactions to the master (they are all writes or read-only
//!   snapshots; `causal_reads` for the rest).
//! - **ProxySQL**: a writer hostgroup with `mysql_galera_hostgroups.max_writers = 1`
//!   (`writer_is_also_reader` as you like) and the backup writers in the backup hostgroup.
//! - **HAProxy**: one backend server active and the others `backup`, with a health check that
//!   requires `wsrep_local_state_comment = Synced` (clustercheck), and
//!   `on-marked-down shutdown-sessions`.
//!
//! A proxy has no designated-writer row: several proxy instances must agree by configuration
//! (one proxy, or the same ordered list and no failback). Connections through a proxy that
//! fails over are lost like the node's: the same typed answers reach the caller, without the
//! router's re-run.

mod election;
mod health;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::mysql::MysqlConnection;
use diesel::r2d2::{ConnectionManager, CustomizeConnection, Pool};

pub use health::NodeHealth;
use health::State;

use crate::combine::{checkout, checkout_within, give_back, names_connect_error, MysqlPool};
use crate::error::{Error, Result, ServerErrorKind};
use crate::txn::{Deadline, SessionSettings, TxnPolicy, TxnRunner};

/// Pool size per node by default.
pub const DEFAULT_POOL_SIZE: u32 = 8;
/// The largest pool size per node ([`RouterBuilder::pool_size`]): r2d2 reserves room for a
/// pool's whole size up front (and again at every reaping), so a size of billions would take
/// terabytes — the process would abort.
pub const MAX_POOL_SIZE: u32 = 10_000;
/// The shortest deadline a router's probe or session policy may have
/// ([`RouterBuilder::probe_policy`], [`RouterBuilder::session_policy`]): below it, a probe,
/// an election or a new connection's settings could not send their first statement in time.
pub const MIN_POLICY_DEADLINE: Duration = Duration::from_millis(10);
/// Health-check interval by default.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_millis(500);
/// The deadline of the router's own probes and elections by default.
pub const DEFAULT_PROBE_DEADLINE: Duration = Duration::from_secs(2);

/// Whether `url` is one Diesel's MySQL connection can be made with, as far as its form goes: a
/// `mysql://` URL with a host, or with a `unix_socket` parameter. (What the server then says
/// — a user, a password, a database — is the probes' to find out.)
fn is_mysql_url(url: &str) -> bool {
    url::Url::parse(url).is_ok_and(|parsed| {
        parsed.scheme() == "mysql"
            && (parsed.host_str().is_some_and(|host| !host.is_empty())
                || parsed.query_pairs().any(|(key, _)| key == "unix_socket"))
    })
}

/// Where [`Router::read`] reads.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadConsistency {
    /// Any healthy node, with `wsrep_sync_wait = 1`: every read sees every write committed
    /// before it started, on whichever node.
    #[default]
    Causal,
    /// The writer this router knows, without a causal wait: it has applied every write that
    /// was committed through it. Not a causal read: after another process's router moved the
    /// writer, this router follows at its next health tick, and until then it reads on the old
    /// writer, whose copy may not have applied a write acknowledged on the new one. Likewise
    /// right after this router moved the writer itself: a write that was already under way on
    /// the old writer may commit there after the move, and the new writer may not have applied
    /// it yet when the same caller reads. Use [`Causal`](Self::Causal) where a read must see
    /// every acknowledged write.
    Writer,
}

/// Configures a [`Router`]; see [`Router::builder`].
#[derive(Debug, Clone)]
pub struct RouterBuilder {
    urls: Vec<String>,
    pool_size: u32,
    health_interval: Duration,
    read_consistency: ReadConsistency,
    probe_policy: TxnPolicy,
    session_policy: TxnPolicy,
}

impl RouterBuilder {
    /// Up to `size` connections per node for writes, and as many for reads (at least 1, at
    /// most [`MAX_POOL_SIZE`]; default [`DEFAULT_POOL_SIZE`]). Connections are opened when
    /// first needed.
    #[must_use]
    pub fn pool_size(mut self, size: u32) -> Self {
        self.pool_size = size;
        self
    }

    /// How often each node is probed and the writer confirmed (default
    /// [`DEFAULT_HEALTH_INTERVAL`]).
    #[must_use]
    pub fn health_interval(mut self, interval: Duration) -> Self {
        self.health_interval = interval;
        self
    }

    /// Where reads go (default [`ReadConsistency::Causal`]).
    #[must_use]
    pub fn read_consistency(mut self, consistency: ReadConsistency) -> Self {
        self.read_consistency = consistency;
        self
    }

    /// The policy of the router's own probes, row reads and failover claims: its deadline
    /// bounds each election, and deadline plus `unresponsive_grace` is the probe timeout after
    /// which a node whose probe has not answered counts as down (default: the default policy
    /// with a [`DEFAULT_PROBE_DEADLINE`] deadline; at least [`MIN_POLICY_DEADLINE`]). Its
    /// [`designated_writer_only`](TxnPolicy::designated_writer_only) is ignored: the claims that
    /// move the designated-writer row run on a node the row does not name yet.
    #[must_use]
    pub fn probe_policy(mut self, policy: TxnPolicy) -> Self {
        self.probe_policy = policy;
        self
    }

    /// The session settings every pooled connection gets ([`SessionSettings`]); give the policy
    /// of the ledger and issuer that use the router, so their calls send no settings (default:
    /// [`TxnPolicy::default`]; its deadline, within which a new connection gets them, at least
    /// [`MIN_POLICY_DEADLINE`]).
    #[must_use]
    pub fn session_policy(mut self, policy: TxnPolicy) -> Self {
        self.session_policy = policy;
        self
    }

    /// Starts the router: one probe thread per node and a coordinator thread. Waits for the
    /// first probe of every node (up to the probe timeout; a node that does not answer is just
    /// down) and refuses URLs that reach the same node. Does not wait for a writer: the first
    /// calls wait for it within their deadlines.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for no URLs, a URL that is not a `mysql://` URL with a host (or a
    /// `unix_socket`) — Diesel could never connect with it, and every call would wait for that
    /// node until its deadline —, a URL given twice, two URLs that reach nodes with the same
    /// `wsrep_node_name`, a pool size of 0 or above [`MAX_POOL_SIZE`], a zero health
    /// interval, a probe policy whose deadline is under [`MIN_POLICY_DEADLINE`] (no probe or
    /// election could send anything: no writer would ever be found), or a session policy whose
    /// deadline is under it (its settings, applied to every new connection within that
    /// deadline, could never be);
    /// [`Error::Internal`] when a thread cannot be started.
    pub fn build(self) -> Result<Router> {
        let invalid = |problem| Error::InvalidInput {
            field: "router",
            problem,
        };
        if self.urls.is_empty() {
            return Err(invalid("no node URLs"));
        }
        if !self.urls.iter().all(|url| is_mysql_url(url)) {
            return Err(invalid(
                "a node URL is not a mysql:// URL with a host or a unix_socket",
            ));
        }
        if self.urls.iter().collect::<HashSet<_>>().len() != self.urls.len() {
            return Err(invalid("a node URL is given twice"));
        }
        if self.pool_size == 0 {
            return Err(invalid("the pool size must be at least 1"));
        }
        if self.pool_size > MAX_POOL_SIZE {
            return Err(invalid(
                "the pool size must be at most MAX_POOL_SIZE (10,000)",
            ));
        }
        if self.health_interval.is_zero() {
            return Err(invalid("the health interval must be positive"));
        }
        if self.probe_policy.retry.deadline < MIN_POLICY_DEADLINE {
            // An election's statements run by it: a deadline that passes before the first
            // is sent leaves every node healthy and none ever the writer.
            return Err(invalid(
                "the probe policy's deadline must be at least 10 ms",
            ));
        }
        if self.session_policy.retry.deadline < MIN_POLICY_DEADLINE {
            // Its settings are applied to every new connection within its deadline: none
            // could ever be made, and every probe and call would time out.
            return Err(invalid(
                "the session policy's deadline must be at least 10 ms",
            ));
        }
        let probe_timeout = self
            .probe_policy
            .retry
            .deadline
            .saturating_add(self.probe_policy.unresponsive_grace);
        let nodes = self
            .urls
            .into_iter()
            .map(|url| {
                let pools = Mutex::new(Pools::new(
                    &url,
                    self.pool_size,
                    &self.session_policy,
                    probe_timeout,
                ));
                Node {
                    url,
                    pools,
                    cuts: Mutex::new(Cuts::default()),
                    starved: [Mutex::new(Cuts::default()), Mutex::new(Cuts::default())],
                }
            })
            .collect::<Vec<_>>();
        let state = State {
            nodes: nodes.iter().map(|_| health::Probe::default()).collect(),
            ..State::default()
        };
        let shared = Arc::new(Shared {
            nodes,
            // The router moves the designated-writer row itself: its own claims run on a
            // node the row does not name yet.
            probe: TxnRunner::new(TxnPolicy {
                designated_writer_only: false,
                ..self.probe_policy
            }),
            session_policy: self.session_policy,
            pool_size: self.pool_size,
            interval: self.health_interval,
            probe_timeout,
            read_consistency: self.read_consistency,
            state: Mutex::new(state),
            changed: Condvar::new(),
            stopped: AtomicBool::new(false),
            next_reader: AtomicUsize::new(0),
        });
        let router = Router {
            shared: shared.clone(),
        };
        for node in 0..shared.nodes.len() {
            let shared = shared.clone();
            spawn(format!("lockstock-probe-{node}"), move || {
                health::probe_loop(shared, node)
            })?;
        }
        // The first probe of every node, or the probe timeout.
        let first = Deadline::after(probe_timeout);
        let mut state = shared.lock();
        while !first.is_expired() && state.nodes.iter().any(|p| !p.answered()) {
            state = shared.wait(state, first.remaining());
        }
        let duplicate = (0..state.nodes.len()).any(|node| state.duplicate_name(node));
        drop(state);
        if duplicate {
            return Err(invalid(
                "two URLs reach the same Galera node (the same wsrep_node_name)",
            ));
        }
        let coordinator = shared.clone();
        spawn("lockstock-router".into(), move || {
            election::coordinate(coordinator)
        })?;
        Ok(router)
    }
}

fn spawn(name: String, work: impl FnOnce() + Send + 'static) -> Result<()> {
    std::thread::Builder::new()
        .name(name)
        .spawn(work)
        .map(|_| ())
        .map_err(|e| Error::internal(format!("cannot start a router thread: {e}")))
}

/// What an operator watches: the writer, the epoch, failovers and each node's health (it may
/// gain fields: read them, build none).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RouterStats {
    /// Index (in the router's URL list) of the node writes go to now; `None` during a failover.
    pub writer: Option<usize>,
    /// That node's `wsrep_node_name`.
    pub writer_name: Option<String>,
    /// The epoch of the designated-writer row this router last confirmed.
    pub epoch: i64,
    /// Times this router's writer moved to another node.
    pub failovers: u64,
    /// Per node, in the order of the URLs.
    pub nodes: Vec<NodeHealth>,
}

/// Sends lockstock's writes to one Galera node at a time and fails over; see the
/// [module documentation](self). Share it between threads (an `Arc<Router>`); dropping the last
/// handle stops its threads.
pub struct Router {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        // Under the state's lock: a thread that found the router running under it and is
        // about to wait cannot miss the wake-up (it would sleep a whole interval more).
        let state = self.shared.lock();
        self.shared.stopped.store(true, Ordering::Relaxed);
        self.shared.changed.notify_all();
        drop(state);
    }
}

/// A node's count of cuts (or of starved checkouts), locked.
fn lock_cuts(cuts: &Mutex<Cuts>) -> std::sync::MutexGuard<'_, Cuts> {
    cuts.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What to do after one attempt.
enum Attempt<T> {
    Done(Result<T>),
    /// A node failure: nothing applied; try again on another node.
    NodeFailed(Error),
    /// The pool is busy (every connection in use): try again.
    Busy,
}

impl Router {
    /// A builder for a router over the nodes at `urls` (Diesel MySQL URLs, one per node, each
    /// node once).
    pub fn builder<I, S>(urls: I) -> RouterBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        RouterBuilder {
            urls: urls.into_iter().map(Into::into).collect(),
            pool_size: DEFAULT_POOL_SIZE,
            health_interval: DEFAULT_HEALTH_INTERVAL,
            read_consistency: ReadConsistency::default(),
            probe_policy: TxnPolicy::default().with_retry(crate::txn::RetryPolicy {
                deadline: DEFAULT_PROBE_DEADLINE,
                ..crate::txn::RetryPolicy::default()
            }),
            session_policy: TxnPolicy::default(),
        }
    }

    /// Runs `call` on a connection to the writer, by `deadline` (passed on to `call`: give it
    /// to the `*_by` methods, e.g. [`BalanceLedger::deduct_by`](crate::BalanceLedger::deduct_by)).
    /// After a node failure that applied nothing, `call` runs again on the new writer, within
    /// the same deadline: it must be safe to repeat (a lockstock call with its idempotency key).
    ///
    /// # Errors
    /// What `call` answers, but for node failures; the last node failure (or
    /// [`Error::Timeout`]) when the deadline passes without a writer. See the module
    /// documentation for what each means.
    pub fn write<T>(
        &self,
        deadline: Deadline,
        mut call: impl FnMut(&mut MysqlConnection, Deadline) -> Result<T>,
    ) -> Result<T> {
        // Inside another lockstock call's body (or closure): by its deadline at the latest.
        let deadline = crate::txn::enclosed(deadline);
        let shared = &self.shared;
        let mut last = None;
        loop {
            let node = shared.wait_for(deadline, last.clone(), |state| {
                state
                    .writer
                    .filter(|&w| state.writable(w, shared.probe_timeout) && !state.suspect(w))
            })?;
            match shared.attempt(node, Use::Write, deadline, &mut call) {
                Attempt::Done(result) => return since_failure(result, last),
                Attempt::NodeFailed(error) => last = Some(error),
                Attempt::Busy => {}
            }
        }
    }

    /// Runs the read `call` on a healthy node (see [`ReadConsistency`]), by `deadline`; runs
    /// it again on another node after a node failure.
    ///
    /// # Errors
    /// As [`write`](Self::write).
    pub fn read<T>(
        &self,
        deadline: Deadline,
        mut call: impl FnMut(&mut MysqlConnection, Deadline) -> Result<T>,
    ) -> Result<T> {
        // Inside another lockstock call's body (or closure): by its deadline at the latest.
        let deadline = crate::txn::enclosed(deadline);
        let shared = &self.shared;
        let (purpose, causal) = match shared.read_consistency {
            ReadConsistency::Causal => (Use::CausalRead, true),
            ReadConsistency::Writer => (Use::Write, false),
        };
        let mut last = None;
        loop {
            let node = shared.wait_for(deadline, last.clone(), |state| {
                if !causal {
                    return state
                        .writer
                        .filter(|&w| state.healthy(w, shared.probe_timeout) && !state.suspect(w));
                }
                let mut healthy = state.healthy_nodes(shared.probe_timeout);
                healthy.retain(|&n| !state.suspect(n));
                let turn = shared.next_reader.fetch_add(1, Ordering::Relaxed);
                healthy.get(turn % healthy.len().max(1)).copied()
            })?;
            match shared.attempt(node, purpose, deadline, &mut call) {
                Attempt::Done(result) => return since_failure(result, last),
                Attempt::NodeFailed(error) => last = Some(error),
                Attempt::Busy => {}
            }
        }
    }

    /// The node writes go to now (index into the URLs), if there is one.
    pub fn writer(&self) -> Option<usize> {
        self.shared.lock().writer
    }

    /// Waits up to `timeout` until the router has a writer; returns its index.
    ///
    /// # Errors
    /// [`Error::Timeout`] when none was adopted in time (no healthy node, or migrations missing).
    pub fn wait_for_writer(&self, timeout: Duration) -> Result<usize> {
        let shared = &self.shared;
        shared.wait_for(Deadline::after(timeout), None, |state| {
            state
                .writer
                .filter(|&w| state.writable(w, shared.probe_timeout))
        })
    }

    /// Number of nodes (URLs).
    pub fn nodes(&self) -> usize {
        self.shared.nodes.len()
    }

    /// The writer, the epoch, failovers and each node's health, now.
    pub fn stats(&self) -> RouterStats {
        let state = self.shared.lock();
        RouterStats {
            writer: state.writer,
            writer_name: state
                .writer
                .and_then(|w| state.nodes.get(w))
                .and_then(|p| p.name.clone()),
            epoch: state.epoch,
            failovers: state.failovers,
            nodes: (0..state.nodes.len())
                .map(|node| state.health(node, self.shared.probe_timeout))
                .collect(),
        }
    }
}

/// A call's answer after the node failures before it: a [`Error::Timeout`] (the deadline
/// passed before the attempt sent anything, say on a busy pool) after an earlier attempt met a
/// node failure answers that failure — [`Error::Timeout`] says only that the deadline passed
/// before anything was committed, not that a node failed.
fn since_failure<T>(result: Result<T>, last: Option<Error>) -> Result<T> {
    match (result, last) {
        (Err(Error::Timeout { .. }), Some(failure)) => Err(failure),
        (result, _) => result,
    }
}

/// Which pool of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Use {
    Write,
    CausalRead,
}

impl Use {
    /// The pool's index in a node's per-pool counts.
    fn index(self) -> usize {
        match self {
            Use::Write => 0,
            Use::CausalRead => 1,
        }
    }
}

struct Node {
    url: String,
    /// Replaced by fresh pools after a node failure, so no connection to a dead server is
    /// handed out again, and when a probe finds the node back (see `health::probe_loop`).
    pools: Mutex<Pools>,
    /// Calls on the node cut off at their deadline (see [`Cuts`]).
    cuts: Mutex<Cuts>,
    /// Checkouts that got no connection in time, and no connect error, while the pool did not
    /// look busy, counted as cuts are (see `Shared::starved`): per pool ([`Use::index`]),
    /// since only a connection the same pool hands out says its new connections come.
    starved: [Mutex<Cuts>; 2],
}

/// Calls cut off at their deadline in a row that take a node down whatever its probe says (its
/// statements hang although its status read answers).
const CUTS_TO_FAIL: u32 = 2;

/// A node's calls cut off at their deadline. A cut counts only if its call started after the
/// last counted one was cut (calls in flight together met the same stall: one cut), and a call
/// answered that started after it clears the count (the node served it).
#[derive(Debug, Default)]
struct Cuts {
    count: u32,
    last: Option<Instant>,
}

/// What one more cut (or starved checkout) of a call that started at `started` means.
enum Counted {
    /// In flight with the last counted one: the same stall, not counted again.
    Same,
    /// Counted, fewer than [`CUTS_TO_FAIL`] in a row.
    Once,
    /// [`CUTS_TO_FAIL`] in a row (the count starts again).
    InARow,
}

impl Cuts {
    /// Counts one more, from a call that started at `started`.
    fn count(&mut self, started: Instant) -> Counted {
        if self.last.is_some_and(|last| started < last) {
            return Counted::Same;
        }
        self.count += 1;
        self.last = Some(Instant::now());
        if self.count >= CUTS_TO_FAIL {
            *self = Cuts::default();
            return Counted::InARow;
        }
        Counted::Once
    }
}

struct Pools {
    write: MysqlPool,
    read: MysqlPool,
}

impl Pools {
    /// A node's pools. `probe_timeout` bounds how far apart r2d2 retries a connection that
    /// failed to open (half its `connection_timeout`, which lockstock uses for nothing else:
    /// it checks out with `get_timeout`): a retry sleeping while the node is back holds the
    /// pool's slot, and with r2d2's default (30 s) it would sleep up to 15 s.
    fn new(url: &str, size: u32, policy: &TxnPolicy, probe_timeout: Duration) -> Self {
        let retries = probe_timeout.max(Duration::from_millis(100));
        let build = |customizer: Box<dyn CustomizeConnection<_, _>>| {
            Pool::builder()
                .max_size(size)
                .min_idle(Some(0))
                .connection_timeout(retries)
                // A check on checkout would hang on a frozen node without any deadline.
                .test_on_check_out(false)
                .connection_customizer(customizer)
                .build_unchecked(ConnectionManager::<MysqlConnection>::new(url))
        };
        let settings = SessionSettings::new(policy.clone());
        Self {
            write: build(Box::new(NodeSession {
                settings: settings.clone(),
                causal: false,
            })),
            read: build(Box::new(NodeSession {
                settings,
                causal: true,
            })),
        }
    }
}

/// The router's connections: session settings plus `wsrep_dirty_reads = 0` (a node's global
/// `wsrep_dirty_reads = ON`, which new sessions take, lets a node outside the Primary component
/// answer reads from its frozen rows instead of refusing them with 1047, and turns the causal
/// wait off) — for writes `wsrep_sync_wait = 0` (whatever the node's global value) and for
/// causal reads `wsrep_sync_wait = 1` (reads, `SHOW` and `START
/// TRANSACTION` wait until the node applied every earlier commit of the cluster).
#[derive(Debug)]
struct NodeSession {
    settings: SessionSettings,
    causal: bool,
}

impl CustomizeConnection<MysqlConnection, diesel::r2d2::Error> for NodeSession {
    fn on_acquire(&self, conn: &mut MysqlConnection) -> Result<(), diesel::r2d2::Error> {
        self.settings.on_acquire(conn)?;
        // Under the watchdog, as the settings are: a node that stops answering must not keep
        // one of the pool's threads (and its slot) for ever.
        let policy = self.settings.policy();
        let deadline = Deadline::after(policy.retry.deadline);
        // A session that does not replicate (opened while the node's `wsrep_on` was off: it
        // keeps `wsrep_on = 0` after the node's is back) never joins the pool: causal reads
        // would not wait on it, and its writes would be refused for as long as it lived.
        let sql = format!(
            "SET SESSION {}wsrep_dirty_reads = 0, \
             lc_messages = IF({}, @@session.lc_messages, '{}')",
            // Writes never wait causally, whatever the node's global `wsrep_sync_wait` (a
            // cluster set up for read-your-writes): a NOWAIT read would wait for the node to
            // apply the cluster's earlier writes, stalled with it when another node pauses.
            if self.causal {
                "wsrep_sync_wait = 1, "
            } else {
                "wsrep_sync_wait = 0, "
            },
            crate::txn::REPLICATING,
            crate::txn::NOT_REPLICATED_LOCALE
        );
        crate::txn::bounded(conn, deadline, policy.unresponsive_grace, |conn, _| {
            Ok(conn.batch_execute(&sql)?)
        })
        .map_err(|e| {
            // With the server's reason (the pool's error keeps only this text).
            diesel::r2d2::Error::QueryError(diesel::result::Error::QueryBuilderError(
                health::with_sources(&e).into(),
            ))
        })
    }
}

/// The router's shared state and its threads' handles to it.
struct Shared {
    nodes: Vec<Node>,
    probe: TxnRunner,
    session_policy: TxnPolicy,
    pool_size: u32,
    interval: Duration,
    probe_timeout: Duration,
    read_consistency: ReadConsistency,
    state: Mutex<State>,
    changed: Condvar,
    stopped: AtomicBool,
    next_reader: AtomicUsize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, State>, timeout: Duration) -> MutexGuard<'a, State> {
        self.changed
            .wait_timeout(guard, timeout)
            .map(|(guard, _)| guard)
            .unwrap_or_else(|e| e.into_inner().0)
    }

    fn pool(&self, node: usize, purpose: Use) -> MysqlPool {
        let pools = self.nodes[node]
            .pools
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match purpose {
            Use::Write => pools.write.clone(),
            Use::CausalRead => pools.read.clone(),
        }
    }

    /// A node failure on `node`: mark it down (and no writer if it was the writer), wake the
    /// coordinator and replace its pools.
    fn fail(&self, node: usize, error: &Error) {
        trace_event!(node, error = %error, "router: node failure");
        if is_connection_failure(error) {
            // One connection, or the node? Its probe tells, now; calls wait for it.
            self.suspect(node);
            return;
        }
        self.take_down(node, error);
    }

    /// A write on `node` was refused because the node runs `read_only`: not the writer from
    /// here on (the coordinator, woken now, elects one that takes writes); it keeps taking
    /// reads.
    fn read_only(&self, node: usize) {
        trace_event!(node, "router: the node runs read_only");
        self.lock().mark_read_only(node);
        self.changed.notify_all();
    }

    /// Marks `node` suspect: calls wait while its probe, woken at once, checks it.
    fn suspect(&self, node: usize) {
        self.lock().mark_suspect(node);
        self.changed.notify_all();
    }

    /// A call on `node` that started at `started` was cut off at its deadline (`error`). It may
    /// have met a frozen node — whose probe then times out — or only a statement slower than
    /// the deadline on a healthy one: the node is suspect, and its pools are replaced (after a
    /// network fault their connections may all be half-open, each costing a call its
    /// deadline). [`CUTS_TO_FAIL`] cuts in a row take it down whatever its probe says.
    fn cut(&self, node: usize, started: Instant, error: &Error) {
        let counted = lock_cuts(&self.nodes[node].cuts).count(started);
        match counted {
            Counted::Same => {}
            Counted::Once => {
                self.suspect(node);
                self.renew_pools(node);
            }
            Counted::InARow => self.take_down(node, error),
        }
    }

    /// A checkout on `node` that started at `started` got no connection within the probe
    /// timeout, met no connect error, and the pool did not look busy. The node is suspect (its
    /// probe, woken at once, tells whether it answers), and [`CUTS_TO_FAIL`] such checkouts in
    /// a row — each started after the last one counted gave up (waiting together: one), with
    /// no connection handed out between them — take it down whatever its probe says: its new
    /// connections hang (the probe answers on the connection it keeps).
    fn starved(&self, node: usize, purpose: Use, started: Instant, error: &Error) {
        let counted = lock_cuts(&self.nodes[node].starved[purpose.index()]).count(started);
        match counted {
            Counted::InARow => self.take_down(node, error),
            Counted::Same | Counted::Once => self.suspect(node),
        }
    }

    /// A call on `node` that started at `started` was answered: a count of cuts before it is
    /// cleared.
    fn answered(&self, node: usize, started: Instant) {
        let mut cuts = lock_cuts(&self.nodes[node].cuts);
        if cuts.count > 0 && cuts.last.is_some_and(|last| started > last) {
            *cuts = Cuts::default();
        }
    }

    /// Marks `node` down (and no writer if it was), wakes the coordinator, replaces its pools.
    fn take_down(&self, node: usize, error: &Error) {
        // Down from here on: cuts counted before do not carry over to its return.
        *lock_cuts(&self.nodes[node].cuts) = Cuts::default();
        for starved in &self.nodes[node].starved {
            *lock_cuts(starved) = Cuts::default();
        }
        {
            let mut state = self.lock();
            state.mark_failed(node, error);
            state.elect = true;
        }
        self.changed.notify_all();
        self.renew_pools(node);
    }

    /// Replaces `node`'s pools with fresh ones: no pooled connection is handed out again.
    fn renew_pools(&self, node: usize) {
        let fresh = Pools::new(
            &self.nodes[node].url,
            self.pool_size,
            &self.session_policy,
            self.probe_timeout,
        );
        let old = std::mem::replace(
            &mut *self.nodes[node]
                .pools
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
            fresh,
        );
        // Dropped once the lock is given back (its idle connections are closed).
        drop(old);
    }

    /// Waits by `deadline` until `pick` finds a node, asking the coordinator to elect meanwhile.
    /// Past the deadline: `last` (the last node failure), or [`Error::Timeout`].
    fn wait_for(
        &self,
        deadline: Deadline,
        last: Option<Error>,
        mut pick: impl FnMut(&State) -> Option<usize>,
    ) -> Result<usize> {
        let mut state = self.lock();
        loop {
            if let Some(node) = pick(&state) {
                return Ok(node);
            }
            if deadline.is_expired() {
                return Err(last.unwrap_or(Error::Timeout {
                    elapsed: deadline.elapsed(),
                }));
            }
            if !state.elect {
                state.elect = true;
                self.changed.notify_all();
            }
            state = self.wait(state, deadline.remaining());
        }
    }

    /// One run of `call` on `node`.
    fn attempt<T>(
        &self,
        node: usize,
        purpose: Use,
        deadline: Deadline,
        call: &mut impl FnMut(&mut MysqlConnection, Deadline) -> Result<T>,
    ) -> Attempt<T> {
        let pool = self.pool(node, purpose);
        // Leave time for another node if this one cannot give a connection.
        let wait = deadline.remaining().min(self.probe_timeout);
        let grace = self.session_policy.unresponsive_grace;
        let checkout_started = Instant::now();
        let mut conn = match checkout_within(&pool, deadline, grace, wait) {
            Ok(conn) => {
                // The pool hands out connections: its starved checkouts before do not count.
                *lock_cuts(&self.nodes[node].starved[purpose.index()]) = Cuts::default();
                conn
            }
            Err(error @ Error::Timeout { .. }) => return Attempt::Done(Err(error)),
            Err(error) => {
                if matches!(&error, Error::Pool(failed) if names_connect_error(failed)) {
                    // The node refused (or failed) a new connection.
                    self.fail(node, &error);
                    return Attempt::NodeFailed(error);
                }
                let state = pool.state();
                if state.connections >= pool.max_size() && state.idle_connections == 0 {
                    return Attempt::Busy;
                }
                // No connection in time and no connect error: every connection was in use —
                // this sample comes after the wait, so one may just have been given back, or
                // discarded and being replaced — or a new one neither succeeded nor failed (a
                // node that stopped answering, or whose new connections hang while the
                // probe's kept one answers).
                self.starved(node, purpose, checkout_started, &error);
                return Attempt::NodeFailed(error);
            }
        };
        // Bounded by the router's deadline whatever the closure calls: a lockstock call without
        // a deadline parameter runs by the router's (`within_deadline`) when its own policy's
        // is later, and a node that stops answering is cut off at the deadline plus grace.
        let started = Instant::now();
        let served = crate::txn::statements_served(&mut conn);
        // A call answered without a round trip (bad input, a sold-out mark) says nothing of the
        // node: it never clears a count of cuts (the check below is not the call's).
        let mut reached = served.is_none();
        let sent = crate::txn::statements_sent(&mut conn);
        let mut sent_something = sent.is_none();
        let (result, cut) = crate::txn::bounded_telling(&mut conn, deadline, grace, |conn, _| {
            let answer = crate::txn::within_deadline(deadline, || call(conn, deadline));
            reached |= crate::txn::statements_served(conn) != served;
            sent_something |= crate::txn::statements_sent(conn) != sent;
            answer
        });
        // Whether the closure left the connection inside a transaction (of its own: every
        // lockstock call ends its own), or it cannot be told: such a connection never goes
        // back into the pool, which does not test on checkout — a later closure would run in
        // that transaction, and lockstock calls there would take it for their caller's. A
        // closure that sent nothing (no statement at all, answered or not: a batch whose last
        // statement failed ran its first ones) left it as it came (outside one: checked so
        // before). Asked
        // while the deadline allows (one cached statement, after the call's COMMIT; past it
        // nothing more is sent, and the connection is discarded instead), under a watchdog of
        // its own: a node that stops answering then is blamed as for a cut call, and the
        // closure's answer stands.
        let mut check_cut = false;
        if !cut && sent_something {
            let outside = !deadline.is_expired() && {
                let (outside, fired) = crate::txn::watched(deadline, grace, |_| {
                    diesel::RunQueryDsl::get_result::<i64>(
                        crate::statements::NodeInTransaction,
                        &mut conn,
                    )
                    .is_ok_and(|open| open == 0)
                });
                check_cut = fired;
                outside && !fired
            };
            if !outside {
                crate::txn::mark_broken(&mut conn);
            }
        }
        if check_cut {
            let blamed = Error::ServerUnresponsive {
                elapsed: deadline.elapsed(),
            };
            self.cut(node, started, &blamed);
            // Not counted as the node answering below.
            reached = false;
        }
        if cut {
            // Also a COMMIT cut off (`OutcomeUnknown`): the node left a call hanging. (The
            // connection is marked broken: r2d2 discards it.)
            let blamed = match &result {
                Err(error) => error.clone(),
                Ok(_) => Error::ServerUnresponsive {
                    elapsed: deadline.elapsed(),
                },
            };
            self.cut(node, started, &blamed);
        }
        match result {
            // A write refused because the node runs `read_only` (at a write, or at COMMIT:
            // nothing applied, see the runner): the writer moves to a node that takes writes,
            // and the call runs again there. The connection is fine.
            Err(Error::Server(source)) if !cut && source.kind() == ServerErrorKind::ReadOnly => {
                give_back(&pool, conn);
                // The node answered: it serves statements.
                if reached {
                    self.answered(node, started);
                }
                let error = Error::Server(source);
                // A read closure that writes: its answer (the node is fine for reads).
                if purpose != Use::Write {
                    return Attempt::Done(Err(error));
                }
                self.read_only(node);
                if deadline.is_expired() {
                    return Attempt::Done(Err(error));
                }
                Attempt::NodeFailed(error)
            }
            // A COMMIT whose answer was lost, or a refused request whose key could not be
            // looked up, because the connection or the node failed: it may be applied, so it
            // is not run again — but the node is blamed as for a node failure.
            Err(Error::OutcomeUnknown { source })
                if !cut
                    && source.kind() != ServerErrorKind::ReadOnly
                    && Error::Server(source.clone()).is_node_failure() =>
            {
                crate::txn::mark_broken(&mut conn);
                give_back(&pool, conn);
                self.fail(node, &Error::Server(source.clone()));
                Attempt::Done(Err(Error::OutcomeUnknown { source }))
            }
            Err(error) if error.is_node_failure() => {
                if !cut {
                    // Never back into the pool (it does not test on checkout): r2d2 discards a
                    // connection marked broken.
                    crate::txn::mark_broken(&mut conn);
                }
                // A cut connection is marked broken already.
                give_back(&pool, conn);
                if !cut {
                    self.fail(node, &error);
                }
                if deadline.is_expired() {
                    return Attempt::Done(Err(error));
                }
                Attempt::NodeFailed(error)
            }
            result => {
                // A connection found inside a transaction that is not lockstock's (left open
                // on it by a panic on the way, say) never goes back into the pool, which does
                // not test on checkout: every later call on it would be refused so.
                if matches!(result, Err(Error::NestedTransaction)) {
                    crate::txn::mark_broken(&mut conn);
                }
                give_back(&pool, conn);
                if !cut && reached {
                    self.answered(node, started);
                }
                Attempt::Done(result)
            }
        }
    }
}

/// A failure of one connection that may or may not be the node's: a lost connection (a `KILL`,
/// a dead node) or a broken one (a failed ROLLBACK) — but not a node outside the Primary
/// component, which is the node's for sure.
fn is_connection_failure(error: &Error) -> bool {
    match error {
        // The session's `wsrep_on`, or the node's: its probe reads the node's.
        Error::NotReplicated => true,
        Error::ConnectionBroken { source } => source.kind() != ServerErrorKind::NodeNotReady,
        Error::Server(source) => source.kind() == ServerErrorKind::ConnectionLost,
        _ => false,
    }
}
