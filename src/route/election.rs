//! The designated-writer row and the coordinator thread that keeps this router on the node it
//! names.
//!
//! Every tick (the health interval), or at once when a caller waits for a writer:
//! 1. With a healthy writer: one causal read of the row on it. If the row still names it,
//!    nothing changes; if it names another node (another router failed over), this router
//!    drops its writer and goes on with 2.
//! 2. Without one: read the row causally on the first healthy node (each node tried gets its
//!    share of what is left of the round; one that gives no connection in time is skipped for
//!    the rest of the election, not marked down). If it names a healthy node, that node is the
//!    target. Otherwise the first node still healthy and not suspect claims the row:
//!    `UPDATE designated_writer SET node_name = @@wsrep_node_name, epoch = epoch + 1 ...
//!    WHERE id = 1 AND epoch = <read>` sent through that node itself. Of two routers that race,
//!    Galera's certification commits one UPDATE and aborts the other (1213, retried by the
//!    runner, which then matches no row): the loser reads the row again and follows it.
//! 3. Adopt the target only after one more causal read ON the target (`wsrep_sync_wait = 1`
//!    makes its `START TRANSACTION` wait until the node applied everything the cluster
//!    committed before) that still names it. Only then do writes go there.
//!
//! All of it runs through the probe policy's [`TxnRunner`](crate::TxnRunner) and deadline, on
//! the nodes' pools; callers never do this I/O, they only wait (by their deadline) for a
//! writer.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use diesel::mysql::MysqlConnection;
use diesel::prelude::*;
use diesel::sql_types::Text;

use super::{checkout, checkout_within, give_back, Shared, Use};
use crate::error::{Error, Result, ServerErrorKind};
use crate::schema::designated_writer as row;
use crate::txn::Deadline;
use crate::util::now;

/// The key of the one row.
const ROW_ID: i8 = 1;

/// Elections tried per tick before waiting for the next one.
const ROUNDS: usize = 4;

/// What the row says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Designated {
    pub(super) name: String,
    pub(super) epoch: i64,
}

/// The coordinator: keeps this router's writer in line with the row until the router is
/// dropped.
pub(super) fn coordinate(shared: Arc<Shared>) {
    while !shared.stopped.load(Ordering::Relaxed) {
        let tick = {
            let mut state = shared.lock();
            state.elect = false;
            state.ticks_started += 1;
            state.ticks_started
        };
        maintain(&shared);
        // A node held down since before this tick started may take calls again (if its probe
        // says so): the coordinator has had its chance to move the writer away from it.
        shared.lock().ticks_done = tick;
        shared.changed.notify_all();
        // The next tick, or earlier when a caller asks; never more often than every 20 ms.
        std::thread::sleep(Duration::from_millis(20));
        let mut state = shared.lock();
        let deadline = Deadline::after(shared.interval);
        while !state.elect && !deadline.is_expired() && !shared.stopped.load(Ordering::Relaxed) {
            state = shared.wait(state, deadline.remaining());
        }
    }
}

/// One tick: confirm the writer, or find one.
fn maintain(shared: &Shared) {
    let deadline = Deadline::after(shared.probe.policy().retry.deadline);
    let (writer, name) = {
        let state = shared.lock();
        match state.writer {
            Some(w) if state.writable(w, shared.probe_timeout) => {
                (Some(w), state.nodes[w].name.clone())
            }
            _ => (None, None),
        }
    };
    if let (Some(writer), Some(name)) = (writer, name) {
        match read(shared, writer, deadline, deadline.remaining()) {
            Ok(Some(row)) if row.name == name => {
                shared.lock().epoch = row.epoch;
                return;
            }
            // Another router moved the writer: follow the row.
            Ok(_) => shared.lock().writer = None,
            // A writer whose pool gave no connection in time (callers hold them all) is not
            // marked down: it stays adopted unless something else clears it.
            Err(error) => {
                blame(shared, writer, &error);
            }
        }
    }
    elect(shared, deadline);
}

/// Finds the node the row names (claiming the row for a healthy node if it names none) and
/// adopts it.
fn elect(shared: &Shared, deadline: Deadline) {
    // Nodes that gave no connection in time during this election: skipped for the rest of it
    // (never blamed for that: see [`blame`]).
    let mut timed_out: Vec<usize> = Vec::new();
    for _ in 0..ROUNDS {
        if deadline.is_expired() || shared.stopped.load(Ordering::Relaxed) {
            return;
        }
        let mut healthy = shared.lock().healthy_nodes(shared.probe_timeout);
        healthy.retain(|node| !timed_out.contains(node));
        // Each node gets its share of what is left of the round: one that cannot give a
        // connection in time does not spend the others' (and a node is never tried, and so
        // never blamed, with the deadline spent).
        let Some(seen) = healthy.iter().enumerate().find_map(|(tried, &node)| {
            let left = u32::try_from(healthy.len() - tried).unwrap_or(u32::MAX);
            if deadline.is_expired() {
                return None;
            }
            let share = deadline.remaining() / left.max(1);
            match read(shared, node, deadline, share) {
                Ok(seen) => Some(seen),
                Err(error) => {
                    if blame(shared, node, &error) {
                        timed_out.push(node);
                    }
                    None
                }
            }
        }) else {
            return;
        };
        let named = {
            let state = shared.lock();
            seen.as_ref()
                .and_then(|row| state.node_named(&row.name))
                .filter(|&node| state.writable(node, shared.probe_timeout))
        };
        // A candidate that is still healthy now (not one taken down or suspected meanwhile)
        // and takes writes (not `read_only`).
        let candidate = {
            let state = shared.lock();
            healthy
                .iter()
                .find(|&&node| state.writable(node, shared.probe_timeout) && !state.suspect(node))
        };
        let target = match (named, candidate) {
            (Some(node), _) => node,
            (None, Some(&candidate)) => {
                match claim(shared, candidate, seen.as_ref().map(|r| r.epoch), deadline) {
                    Ok(true) => candidate,
                    // Another router claimed it first: read it again.
                    Ok(false) => continue,
                    Err(error) => {
                        if blame(shared, candidate, &error) {
                            timed_out.push(candidate);
                        }
                        continue;
                    }
                }
            }
            (None, None) => return,
        };
        // Still the node the row names, and still taking writes.
        let confirms = |row: &Designated| {
            let state = shared.lock();
            Some(&row.name) == state.nodes[target].name.as_ref()
                && state.writable(target, shared.probe_timeout)
        };
        match read(shared, target, deadline, deadline.remaining()) {
            Ok(Some(row)) if confirms(&row) => {
                if adopt(shared, target, row.epoch) {
                    return;
                }
            }
            Ok(_) => continue,
            Err(error) => {
                if blame(shared, target, &error) {
                    timed_out.push(target);
                }
            }
        }
    }
}

/// A failed read or claim on `node`, as a node failure — unless no connection came in time
/// ([`Error::Timeout`], or [`Error::Pool`] when the node's share of the round ran out):
/// callers' calls hold them all, or none could be opened, so nothing was sent, and the node is
/// not marked down for it (its probe decides) — or the read was cut off at its share of the
/// deadline ([`Error::ServerUnresponsive`]: a slow causal read is no dead node) or stopped
/// there by the server ([`Error::Contended`] after a statement timeout: the runner limits
/// statements to the time left), which makes it suspect. Then `true`, and the election goes
/// on without it.
fn blame(shared: &Shared, node: usize, error: &Error) -> bool {
    match error {
        Error::Timeout { .. } | Error::Pool(_) => true,
        // A claim refused by a node that runs `read_only` (before its probe saw it): it takes
        // reads, but not the writer's row.
        Error::Server(source) if source.kind() == ServerErrorKind::ReadOnly => {
            shared.read_only(node);
            true
        }
        Error::Contended { last, .. } if last.kind() == ServerErrorKind::StatementTimeout => {
            shared.suspect(node);
            true
        }
        Error::ServerUnresponsive { .. } => {
            shared.suspect(node);
            true
        }
        // The node's failure (or a claim whose COMMIT's outcome is unknown: its connection
        // failed): down until its probe and the coordinator see it again.
        _ if error.is_node_failure() || error.is_outcome_unknown() => {
            shared.fail(node, error);
            false
        }
        // Refused for what the row or the statement is, not for what the node is — a missing
        // privilege on the row, a refusal of another transaction's lock, a constraint: the
        // node stays up (it takes reads) and is passed over in this election; its health
        // says why. Taking it down would take every node down in turn, each election again.
        _ => {
            trace_event!(node, error = %error, "router: a claim refused on a healthy node");
            if let Some(p) = shared.lock().nodes.get_mut(node) {
                p.claim_refused = Some(format!(
                    "reading or claiming the writer's row failed: {}",
                    super::health::with_sources(error)
                ));
            }
            true
        }
    }
}

/// Makes `node` this router's writer — unless it stopped taking writes since it was checked
/// (`false`: a write refused it as read-only meanwhile).
fn adopt(shared: &Shared, node: usize, epoch: i64) -> bool {
    {
        let mut state = shared.lock();
        if !state.writable(node, shared.probe_timeout) {
            return false;
        }
        if state.last_writer.is_some_and(|last| last != node) {
            state.failovers += 1;
        }
        state.writer = Some(node);
        state.last_writer = Some(node);
        state.epoch = epoch;
        // A writer is elected: earlier refused claims (of this election or before) are over.
        for p in &mut state.nodes {
            p.claim_refused = None;
        }
    }
    trace_event!(node, epoch, "router adopted a writer");
    shared.changed.notify_all();
    true
}

/// The row, read causally on `node` (its read pool sets `wsrep_sync_wait = 1`, so the
/// snapshot's `START TRANSACTION` waits until the node applied every earlier commit).
fn read(
    shared: &Shared,
    node: usize,
    deadline: Deadline,
    wait: Duration,
) -> Result<Option<Designated>> {
    let pool = shared.pool(node, Use::CausalRead);
    let grace = shared.probe.policy().unresponsive_grace;
    // The node's share of the round, for the checkout and the read alike.
    let deadline = deadline.min(Deadline::after(wait));
    let mut conn = checkout_within(&pool, deadline, grace, wait)?;
    let row = shared.probe.read_by(&mut conn, deadline, |conn| {
        Ok(row::table
            .find(ROW_ID)
            .select((row::node_name, row::epoch))
            .first::<(String, i64)>(conn)
            .optional()?
            .map(|(name, epoch)| Designated { name, epoch }))
    });
    give_back(&pool, conn);
    row
}

/// The compare-and-set of a failover, sent through `node`: the row names `node` with the next
/// epoch if it still has epoch `seen` (or, if the row is missing, it is created). `false` when
/// another router changed it first.
fn claim(shared: &Shared, node: usize, seen: Option<i64>, deadline: Deadline) -> Result<bool> {
    let pool = shared.pool(node, Use::Write);
    let mut conn = checkout(&pool, deadline, shared.probe.policy().unresponsive_grace)?;
    let claimed = shared
        .probe
        .run_by(&mut conn, deadline, |conn: &mut MysqlConnection| {
            // The name as a value, not `@@wsrep_node_name` in the write: replicated as a
            // statement (a node's `wsrep_forced_binlog_format = STATEMENT`), every node would
            // apply its own name.
            let this_node: String =
                diesel::select(diesel::dsl::sql::<Text>("CAST(@@wsrep_node_name AS CHAR)"))
                    .get_result(conn)?;
            let changed = match seen {
                Some(epoch) => diesel::update(
                    row::table
                        .filter(row::id.eq(ROW_ID))
                        .filter(row::epoch.eq(epoch)),
                )
                .set((
                    row::node_name.eq(this_node.as_str()),
                    row::epoch.eq(row::epoch + 1),
                    row::changed_at.eq(now()),
                ))
                .execute(conn)?,
                None => diesel::insert_into(row::table)
                    .values((
                        row::id.eq(ROW_ID),
                        row::node_name.eq(this_node.as_str()),
                        row::epoch.eq(1),
                        row::changed_at.eq(now()),
                    ))
                    .execute(conn)?,
            };
            Ok(changed == 1)
        });
    give_back(&pool, conn);
    match claimed {
        Err(e) if e.is_duplicate() => Ok(false),
        // The certification loser of a race keeps losing while its node applies the winner.
        Err(Error::Contended { .. }) => Ok(false),
        other => other,
    }
}
