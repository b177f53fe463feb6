//! What the router knows about its nodes: one probe thread per node asks the node who it is and
//! whether it replicates and is ready, Primary and Synced; a call that fails on a node marks it
//! down until a probe started afterwards succeeds and the coordinator has run once since (see
//! [`State::mark_failed`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::connection::Connection;
use diesel::mysql::MysqlConnection;
use diesel::sql_types::Text;
use diesel::{QueryableByName, RunQueryDsl};

use super::Shared;
use crate::error::{Error, ServerError, ServerErrorKind};
use crate::txn::{apply_session_settings, Deadline, TxnPolicy};

/// The probe: the node's name and the three status values that make it healthy, in one round
/// trip on a connection of its own (no causal wait — also where the node's global
/// `wsrep_sync_wait` asks for one: it must answer on a lagging node, and during a stall that
/// another node's pause causes, too). A missing status is the empty string — `SPACE(0)`, not a
/// `''` literal, which a server's `sql_mode` with EMPTY_STRING_IS_NULL reads as NULL.
const PROBE_SQL: &str = "SET STATEMENT wsrep_sync_wait = 0 FOR \
     SELECT CAST(@@wsrep_node_name AS CHAR) AS name, \
     CAST(@@global.wsrep_on AS SIGNED) AS replicating, \
     CAST(CAST(@@global.read_only AS CHAR) NOT IN ('0', 'OFF') AS SIGNED) AS read_only, \
     CAST(@@global.wsrep_reject_queries AS CHAR) AS reject_queries, \
     CAST(COALESCE((SELECT variable_value FROM information_schema.GLOBAL_STATUS \
       WHERE variable_name = 'WSREP_READY'), SPACE(0)) AS CHAR) AS ready, \
     CAST(COALESCE((SELECT variable_value FROM information_schema.GLOBAL_STATUS \
       WHERE variable_name = 'WSREP_CLUSTER_STATUS'), SPACE(0)) AS CHAR) AS cluster_status, \
     CAST(COALESCE((SELECT variable_value FROM information_schema.GLOBAL_STATUS \
       WHERE variable_name = 'WSREP_LOCAL_STATE_COMMENT'), SPACE(0)) AS CHAR) AS local_state";

#[derive(QueryableByName)]
struct ProbeRow {
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    replicating: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    read_only: i64,
    /// `wsrep_reject_queries`: `NONE`, or `ALL` / `ALL_KILL` on a node an operator drains (it
    /// answers every statement but the probe's with 1047).
    #[diesel(sql_type = Text)]
    reject_queries: String,
    #[diesel(sql_type = Text)]
    ready: String,
    #[diesel(sql_type = Text)]
    cluster_status: String,
    #[diesel(sql_type = Text)]
    local_state: String,
}

impl ProbeRow {
    /// Replicating (`wsrep_on` globally), taking queries (`wsrep_reject_queries = NONE`),
    /// ready, in the Primary component and Synced.
    fn healthy(&self) -> bool {
        self.replicating != 0
            && self.reject_queries.eq_ignore_ascii_case("NONE")
            && self.ready.eq_ignore_ascii_case("ON")
            && self.cluster_status == "Primary"
            && self.local_state == "Synced"
    }
}

/// The health of one node as the router sees it (a part of [`RouterStats`](super::RouterStats)).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct NodeHealth {
    /// Its `@@wsrep_node_name`, once a probe reached it.
    pub name: Option<String>,
    /// Whether the router sends calls to it: the last probe found it replicating (`wsrep_on`
    /// globally), taking queries (`wsrep_reject_queries = NONE`: not drained by an operator),
    /// `wsrep_ready = ON`, `wsrep_cluster_status = Primary` and
    /// `wsrep_local_state_comment = Synced`, no call failed on it since (nor lost its
    /// connection to it: calls wait for its probe meanwhile), no probe has been
    /// hanging on it for longer than the probe timeout, no other URL of the router reaches a
    /// node of the same name — and, after a call (or the router's coordinator) took it down, the
    /// coordinator has run once since, or twice the probe timeout has passed (so that a probe
    /// answering at once does not hand the node back before the writer could move).
    pub healthy: bool,
    /// `wsrep_ready` of the last answered probe.
    pub ready: bool,
    /// The node runs `read_only` (the last answered probe's `@@global.read_only`, or a write
    /// refused with 1290 since): it takes reads while healthy, but is never the writer — a
    /// writer found read-only is replaced, and the refused write runs on the new one.
    pub read_only: bool,
    /// `wsrep_cluster_status` of the last answered probe (`Primary`, `non-Primary`, ...).
    pub cluster_status: String,
    /// `wsrep_local_state_comment` of the last answered probe (`Synced`, `Donor/Desynced`, ...).
    pub local_state: String,
    /// Why it is not healthy, if a probe or a call failed on it.
    pub last_error: Option<String>,
}

/// A node held down after a failure is held at most this many probe timeouts (the tick in
/// progress, then one started after the failure).
const HOLD_TIMEOUTS: u32 = 2;

/// The router's record of one node.
#[derive(Debug, Default)]
pub(super) struct Probe {
    pub(super) name: Option<String>,
    ready: bool,
    /// `@@global.read_only` as the last probe found it, or a write refused for it since.
    pub(super) read_only: bool,
    /// When a write was last refused because the node runs `read_only`: a probe that started
    /// before it (and may have read the variable before it was set) does not clear the flag.
    read_only_at: Option<Instant>,
    cluster_status: String,
    local_state: String,
    /// The last probe answered and found the node healthy, and no call failed since.
    ok: bool,
    error: Option<String>,
    /// When the probe in flight started.
    running_since: Option<Instant>,
    /// When a call last failed on the node.
    failed_at: Option<Instant>,
    /// A call (or the coordinator) took the node down: it stays down, whatever its probe says,
    /// until the coordinator has finished a tick numbered this or later (one that started
    /// after the failure), so the writer moves first where another node can take it.
    held_until_tick: Option<u64>,
    /// A call lost its connection to the node (one connection killed, or the node gone): calls
    /// wait for the next probe, which starts at once, to tell which (see
    /// [`State::suspect`]).
    suspect_since: Option<Instant>,
    /// Why the node's last claim of the writer's row was refused for a reason that is not the
    /// node's failure (a missing privilege, say): the node stays up and takes reads; cleared
    /// once it is adopted as the writer.
    pub(super) claim_refused: Option<String>,
}

/// The longest node name the designated-writer row can hold (`node_name VARCHAR(255)`): a node
/// whose `wsrep_node_name` is longer (or empty) is never the writer (it takes reads).
pub(super) const LONGEST_WRITER_NAME: usize = 255;

/// Whether the designated-writer row can name a node called `name`.
fn nameable(name: &str) -> bool {
    // Empty: the designated-writer row's "none designated" — a node of no name would match it,
    // and writes would pass the check on every node.
    !name.is_empty() && name.chars().count() <= LONGEST_WRITER_NAME
}

/// Everything the router's threads and callers share, under one mutex.
#[derive(Debug, Default)]
pub(super) struct State {
    pub(super) nodes: Vec<Probe>,
    /// The node this router writes to, adopted from the designated-writer row.
    pub(super) writer: Option<usize>,
    /// The last writer this router adopted (kept while `writer` is `None` during a failover).
    pub(super) last_writer: Option<usize>,
    /// The epoch of the designated-writer row this router last confirmed.
    pub(super) epoch: i64,
    /// Times this router's writer moved to another node.
    pub(super) failovers: u64,
    /// A caller waits for a writer: the coordinator runs now instead of at its next tick.
    pub(super) elect: bool,
    /// The coordinator's ticks started, and the number of the last one finished.
    pub(super) ticks_started: u64,
    pub(super) ticks_done: u64,
}

impl Probe {
    /// Whether a probe has answered (with a name or an error).
    pub(super) fn answered(&self) -> bool {
        self.name.is_some() || self.error.is_some()
    }
}

impl State {
    /// Whether calls may go to `node` now (see [`NodeHealth::healthy`]).
    pub(super) fn healthy(&self, node: usize, probe_timeout: Duration) -> bool {
        let Some(p) = self.nodes.get(node) else {
            return false;
        };
        let stuck = p
            .running_since
            .is_some_and(|since| since.elapsed() > probe_timeout);
        let unresolved = p
            .suspect_since
            .is_some_and(|since| since.elapsed() > probe_timeout);
        p.ok && !stuck
            && !unresolved
            && !self.held(node, probe_timeout)
            && p.name.is_some()
            && !self.duplicate_name(node)
    }

    /// Whether `node` may be the writer: healthy, not `read_only`, and of a name the
    /// designated-writer row can hold.
    pub(super) fn writable(&self, node: usize, probe_timeout: Duration) -> bool {
        self.healthy(node, probe_timeout)
            && self
                .nodes
                .get(node)
                .is_some_and(|p| !p.read_only && p.name.as_deref().is_some_and(nameable))
    }

    /// A write on `node` was refused because the node runs `read_only`: it is no longer the
    /// writer (the coordinator elects another one now); it keeps taking reads.
    pub(super) fn mark_read_only(&mut self, node: usize) {
        if let Some(p) = self.nodes.get_mut(node) {
            p.read_only = true;
            p.read_only_at = Some(Instant::now());
        }
        if self.writer == Some(node) {
            self.writer = None;
            self.elect = true;
        }
    }

    /// Whether `node` is held down after a failure until the coordinator has run once since
    /// (see [`mark_failed`](Self::mark_failed)) — at most [`HOLD_TIMEOUTS`] probe timeouts: a
    /// tick lasts at most one (its deadline, cut at the grace), but without the watchdog (off
    /// Linux) a tick on a frozen node never ends, and the hold must not outlast it.
    fn held(&self, node: usize, probe_timeout: Duration) -> bool {
        self.nodes.get(node).is_some_and(|p| {
            p.held_until_tick.is_some_and(|tick| self.ticks_done < tick)
                && p.failed_at
                    .is_some_and(|at| at.elapsed() < probe_timeout.saturating_mul(HOLD_TIMEOUTS))
        })
    }

    /// Whether calls should wait before using `node`: a call lost its connection to it and no
    /// probe has answered since. After the probe timeout the suspicion makes the node
    /// unhealthy ([`healthy`](Self::healthy)), so a probe that hangs leads to a failover.
    pub(super) fn suspect(&self, node: usize) -> bool {
        self.nodes
            .get(node)
            .is_some_and(|p| p.suspect_since.is_some())
    }

    /// Records that a call lost its connection to `node`: not a failover yet — the node's
    /// probe (woken now) decides, on a connection of its own.
    pub(super) fn mark_suspect(&mut self, node: usize) {
        if let Some(p) = self.nodes.get_mut(node) {
            p.suspect_since.get_or_insert_with(Instant::now);
        }
    }

    /// Whether another node of this router has the same name as `node`.
    pub(super) fn duplicate_name(&self, node: usize) -> bool {
        let name = &self.nodes[node].name;
        name.is_some()
            && self
                .nodes
                .iter()
                .enumerate()
                .any(|(i, p)| i != node && p.name == *name)
    }

    /// The healthy nodes, in the order of the router's URLs.
    pub(super) fn healthy_nodes(&self, probe_timeout: Duration) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.healthy(i, probe_timeout))
            .collect()
    }

    /// The node whose name is `name`, if this router knows one.
    pub(super) fn node_named(&self, name: &str) -> Option<usize> {
        self.nodes
            .iter()
            .position(|p| p.name.as_deref() == Some(name))
    }

    /// A call (or the coordinator) found `node` failing: no longer the writer, and down until
    /// a probe that starts afterwards succeeds and the coordinator has finished a tick that
    /// started afterwards. The probe alone does not bring it back: it may answer while the
    /// node's calls fail or hang (calls cut off in a row: see `Shared::cut`), and were it to
    /// answer before the coordinator looked, the coordinator would adopt the node again.
    pub(super) fn mark_failed(&mut self, node: usize, error: &Error) {
        let next_tick = self.ticks_started + 1;
        if let Some(p) = self.nodes.get_mut(node) {
            p.held_until_tick = Some(next_tick);
            p.ok = false;
            p.error = Some(with_sources(error));
            p.failed_at = Some(Instant::now());
        }
        if self.writer == Some(node) {
            self.writer = None;
        }
    }

    pub(super) fn health(&self, node: usize, probe_timeout: Duration) -> NodeHealth {
        let p = &self.nodes[node];
        // A suspect node gets no calls until its probe answers: not reported healthy meanwhile.
        let healthy = self.healthy(node, probe_timeout) && !self.suspect(node);
        NodeHealth {
            name: p.name.clone(),
            healthy,
            ready: p.ready,
            read_only: p.read_only,
            cluster_status: p.cluster_status.clone(),
            local_state: p.local_state.clone(),
            last_error: if self.duplicate_name(node) {
                Some("another URL of the router reaches a node of the same name".into())
            } else if healthy && p.name.as_deref().is_some_and(|name| !nameable(name)) {
                Some(format!(
                    "its wsrep_node_name is empty or longer than {LONGEST_WRITER_NAME} \
                     characters: the designated_writer row cannot name it, so it is never the \
                     writer"
                ))
            } else if healthy {
                // A failure kept while the node was held down is over.
                p.claim_refused.clone()
            } else if self.suspect(node) && p.error.is_none() {
                Some("a call lost its connection to it; calls wait for its probe".into())
            } else {
                p.error.clone()
            },
        }
    }
}

/// The loop of `node`'s probe thread: probe, record, sleep the interval; until the router is
/// dropped. A probe that hangs (a frozen node) keeps this thread only; the node counts as
/// unhealthy once the probe has run longer than the probe timeout, and the watchdog cuts it
/// off then (its connection is dropped and the next probe connects afresh): a connection whose
/// server side is gone without a word (a half-open TCP connection) would otherwise keep the
/// probe — and the node down — for ever.
pub(super) fn probe_loop(shared: Arc<Shared>, node: usize) {
    let mut conn: Option<MysqlConnection> = None;
    let policy = shared.probe.policy();
    // The last probe's verdict, once there is one.
    let mut was_ok: Option<bool> = None;
    while !shared.stopped.load(Ordering::Relaxed) {
        let started = Instant::now();
        shared.lock().nodes[node].running_since = Some(started);
        let deadline = Deadline::after(policy.retry.deadline);
        let (answer, cut) = crate::txn::watched(deadline, policy.unresponsive_grace, |_| {
            probe(&mut conn, &shared.nodes[node].url, &shared.session_policy)
        });
        let answer = if cut {
            Err(format!(
                "no answer within the probe timeout ({:?})",
                shared.probe_timeout
            ))
        } else {
            answer
        };
        if answer.is_err() {
            conn = None;
        }
        // Back after a probe found it down: its calls start on fresh pools, replaced before the
        // node is published healthy (a call that took the old pool then would meet what the
        // renewal is for). A connection that a pool began while the node was gone is retried by
        // r2d2 in the background, holding the pool's slot meanwhile; the node's calls would
        // wait for it (a short deadline answers `Timeout`; a longer one makes the node suspect
        // with a pool error, and a second such wait in a row takes it down).
        if was_ok == Some(false) && answer.as_ref().is_ok_and(ProbeRow::healthy) {
            shared.renew_pools(node);
        }
        {
            let mut state = shared.lock();
            let held = state.held(node, shared.probe_timeout);
            let p = &mut state.nodes[node];
            p.running_since = None;
            // A call that failed on the node after this probe started overrules it.
            let overruled = p.failed_at.is_some_and(|at| at >= started);
            // A probe that started after a suspicion settles it, either way.
            if p.suspect_since.is_some_and(|since| since <= started) {
                p.suspect_since = None;
            }
            match answer {
                Ok(row) => {
                    p.ready = row.ready.eq_ignore_ascii_case("ON");
                    p.read_only =
                        row.read_only != 0 || p.read_only_at.is_some_and(|at| at >= started);
                    let replicating = row.replicating != 0;
                    let healthy = row.healthy();
                    p.ok = healthy && !overruled;
                    let kept = p.error.take();
                    p.error = (!healthy).then(|| {
                        format!(
                            "wsrep_on = {}, wsrep_reject_queries = {}, wsrep_ready = {}, \
                             wsrep_cluster_status = {}, wsrep_local_state_comment = {}",
                            if replicating { "ON" } else { "OFF" },
                            row.reject_queries,
                            row.ready,
                            row.cluster_status,
                            row.local_state
                        )
                    });
                    if overruled {
                        p.error = p.error.take().or_else(|| Some("a call failed".into()));
                    }
                    // Held down: the failure that took the node down stays its last error.
                    if held {
                        p.error = p.error.take().or(kept);
                    }
                    p.name = Some(row.name);
                    p.cluster_status = row.cluster_status;
                    p.local_state = row.local_state;
                }
                Err(error) => {
                    p.ok = false;
                    p.error = Some(error);
                }
            }
            if !state.writable(node, shared.probe_timeout) && state.writer == Some(node) {
                state.writer = None;
                state.elect = true;
            }
            was_ok = Some(state.nodes[node].ok);
        }
        shared.changed.notify_all();
        // Sleep the interval, or less: a suspicion wakes the probe at once.
        let until = Deadline::after(shared.interval);
        let mut state = shared.lock();
        while !until.is_expired() && !shared.stopped.load(Ordering::Relaxed) && !state.suspect(node)
        {
            state = shared.wait(state, until.remaining());
        }
    }
}

/// One probe on the node's own connection (made first if there is none). A connection kept
/// from the probe before that was lost meanwhile (its session killed — an operator's `KILL
/// USER` —, an idle connection reset) is that connection's failure, not the node's: the probe
/// asks again at once on a new one, and only what that one meets counts.
fn probe(
    conn: &mut Option<MysqlConnection>,
    url: &str,
    policy: &TxnPolicy,
) -> Result<ProbeRow, String> {
    let ask = |conn: &mut MysqlConnection| {
        diesel::sql_query(PROBE_SQL)
            .get_result::<ProbeRow>(conn)
            .map_err(ServerError::new)
    };
    if let Some(kept) = conn.as_mut() {
        match ask(kept) {
            Err(lost) if lost.kind() == ServerErrorKind::ConnectionLost => *conn = None,
            answer => return answer.map_err(|e| describe(&Error::Server(e))),
        }
    }
    let mut fresh = MysqlConnection::establish(url).map_err(|e| format!("cannot connect: {e}"))?;
    apply_session_settings(&mut fresh, policy).map_err(|e| describe(&e))?;
    ask(conn.insert(fresh)).map_err(|e| describe(&Error::Server(e)))
}

/// `error` with every source below it, as `error: source: its source` — what a node's
/// `last_error` shows, so that it keeps the server's or the pool's reason (a privilege refused,
/// `max_user_connections`), which an error's own text leaves to its sources. A source whose
/// text the line already ends with (a server error and the Diesel error it wraps) is left out.
pub(super) fn with_sources(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(source) = next {
        let part = source.to_string();
        if !part.is_empty() && !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        next = source.source();
    }
    text
}

fn describe(error: &Error) -> String {
    match error.server_error() {
        Some(source) => source.to_string(),
        None => error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error of `text` above `source`.
    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1
                .as_deref()
                .map(|layer| layer as &(dyn std::error::Error + 'static))
        }
    }

    #[test]
    fn a_nodes_error_keeps_the_reasons_its_sources_give() {
        let denied = Layer("UPDATE command denied to user 'r'", None);
        let wrapped = Layer(
            "no pooled connection",
            Some(Box::new(Layer(
                "timed out waiting for connection: UPDATE command denied to user 'r'",
                Some(Box::new(denied)),
            ))),
        );
        assert_eq!(
            with_sources(&wrapped),
            "no pooled connection: timed out waiting for connection: UPDATE command denied to \
             user 'r'"
        );
        let server = Error::Server(crate::ServerError::new(
            diesel::result::Error::QueryBuilderError("Access denied".into()),
        ));
        assert!(
            with_sources(&server).ends_with(": Access denied"),
            "{}",
            with_sources(&server)
        );
        // The server's message once, though the error's own text now carries it too.
        assert_eq!(
            with_sources(&server).matches("Access denied").count(),
            1,
            "{}",
            with_sources(&server)
        );
        assert_eq!(
            with_sources(&Error::NotReplicated),
            Error::NotReplicated.to_string()
        );
    }

    #[test]
    fn a_node_taken_down_is_held_whatever_the_probe_timeout() {
        let mut state = State {
            nodes: vec![Probe::default()],
            ..State::default()
        };
        state.mark_failed(0, &Error::NotReplicated);
        // A probe policy without a deadline (Duration::MAX) overflowed the hold's bound.
        for probe_timeout in [Duration::from_secs(1), Duration::MAX] {
            assert!(state.held(0, probe_timeout));
            assert!(!state.healthy(0, probe_timeout));
        }
        state.ticks_started += 1;
        state.ticks_done = state.ticks_started;
        assert!(!state.held(0, Duration::MAX));
    }

    /// A node of no name is never the writer: the designated-writer row's empty name means
    /// "none designated", which it would match — writes would pass the check on every node.
    /// Before the fix an empty name was nameable.
    #[test]
    fn a_node_of_no_name_or_too_long_a_name_is_never_the_writer() {
        assert!(!nameable(""));
        assert!(nameable("node0"));
        assert!(nameable(&"x".repeat(LONGEST_WRITER_NAME)));
        assert!(!nameable(&"x".repeat(LONGEST_WRITER_NAME + 1)));
    }
}
