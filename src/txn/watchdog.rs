//! The watchdog: a call returns by its deadline even when the server never answers.
//!
//! Diesel's `MysqlConnection` sets no client read or write timeout and keeps its `MYSQL*`
//! handle private, so a server that stops answering (a frozen process, a partitioned host, a
//! Galera node that brute-force aborted the transaction and waits for the next command) leaves
//! the calling thread in libmariadb's `poll(fd, 1, -1)` for ever.
//!
//! [`Guard::arm`] registers the calling thread (its kernel thread id) with one process-wide
//! watchdog thread, due at a moment (the call's deadline plus
//! [`TxnPolicy::unresponsive_grace`](super::TxnPolicy::unresponsive_grace)); dropping the guard
//! disarms it. Arming is a push under a mutex (the watchdog is woken only when the new entry is
//! due before the moment it plans to wake at), so a call that returns in time costs no system
//! call beyond the mutex and no round trip.
//!
//! When an entry comes due, the watchdog reads `/proc/self/task/<tid>/syscall` (proc(5): the
//! system call number the thread is blocked in, then its argument registers). For `poll` /
//! `ppoll` on one descriptor — also a `poll` that a stop of the process (SIGSTOP and SIGCONT,
//! Ctrl-Z and `fg`, a cgroup freeze, a debugger attaching) interrupted, which the kernel resumes
//! as `restart_syscall` with `poll`'s registers in place — it reads the `struct pollfd` at the first argument
//! through `/proc/self/mem` (never a raw pointer: the memory belongs to the blocked thread; not
//! `process_vm_readv`, which hardened seccomp profiles refuse, except where `/proc/self/mem`
//! cannot be opened); for `read`, `recvfrom`, `recvmsg`, `write`, `sendto` and `sendmsg` the first
//! argument is the descriptor. A descriptor that `fstat` confirms is a socket — and is not one
//! of the standard streams the process started with (under a service manager they may be
//! sockets; recorded before `main` by an `.init_array` entry, so a database connection that
//! took a freed number 0, 1 or 2 is not mistaken for one), nor a socket numbered 0, 1 or 2 that
//! the thread is writing to (one put in place of a standard stream later, a journal stream:
//! libmariadb waits to receive, and sends without blocking) — is `shutdown(SHUT_RDWR)`: libmariadb's poll returns, the statement fails with "Lost
//! connection" (2013), and the server rolls back an open transaction when it sees the socket
//! closed. A thread that is not blocked in one of those calls (running, sleeping in a backoff,
//! waiting for a lock) is looked at again every [`HUNT`] until its guard is dropped — also once
//! a socket of it was shut down: past its moment, a call is cut wherever it blocks next (a pool
//! checkout pings one idle connection after another, each on its own socket).
//!
//! Descriptor reuse: the watchdog identifies and shuts the socket down while it holds the
//! schedule mutex, and disarming takes the same mutex, so the guarded call is still inside the
//! guarded region. lockstock's own statements never close their connection while armed; a
//! pool checkout does (r2d2 drops a connection whose ping failed, inside `get`), so there a
//! socket could in principle be closed and its number reused by another thread between the
//! watchdog's read of the blocked call and its shutdown — only if the server answered in those
//! microseconds, past the call's deadline + grace.
//!
//! Past its moment a call is cut wherever it blocks on a socket, whatever the socket: inside a
//! pool checkout that includes r2d2's error handler, which logs through the `log` crate on the
//! calling thread — a logger that blocks on a network socket there, past the deadline + grace,
//! would have that socket shut down.
//!
//! Linux only (x86_64 and aarch64 system call numbers). On other targets arming does nothing
//! and no thread is started: a call on a silent server waits as long as the server does. So it
//! does in a process that cannot read its own threads' `/proc` files (not dumpable and not
//! root): [`watchdog_available`] tells.

use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How often a due entry whose thread is not blocked on a socket is looked at again.
const HUNT: Duration = Duration::from_millis(10);
/// ... and once a socket of it was shut down: a pool checkout past its deadline pings one
/// idle connection after another, and each is cut only when it is found blocked — every
/// [`HUNT`] would add 10 ms per idle connection of a large pool. While at most
/// [`HUNT_FIRED_MAX`] calls are looked at so (each look reads `/proc` under the schedule's
/// lock, which every call takes to arm and disarm).
const HUNT_FIRED: Duration = Duration::from_millis(1);
const HUNT_FIRED_MAX: usize = 8;
/// How long the watchdog sleeps past an emptied schedule before it waits for work unbounded:
/// arms in between (the common case under load) need not wake it.
const IDLE: Duration = Duration::from_secs(1);

/// One armed call.
#[derive(Debug)]
struct Entry {
    id: u64,
    /// The kernel id of the guarded thread.
    tid: i64,
    /// When it is looked at next: its moment, then (past it) every [`HUNT`] or [`HUNT_FIRED`].
    due: Instant,
    /// The watchdog shut down a socket this call was blocked on (the thread's innermost call
    /// then).
    fired: bool,
    /// The watchdog shut down a socket a call nested *inside* this one was blocked on, by that
    /// call's earlier moment: perhaps another connection's, not this call's.
    nested_fired: bool,
}

#[derive(Debug, Default)]
struct Schedule {
    entries: Vec<Entry>,
    next_id: u64,
    /// When the watchdog plans to wake; `None`: not started, or waiting unbounded.
    wake: Option<Instant>,
    started: bool,
}

#[derive(Debug)]
struct Watchdog {
    /// The process this watchdog (its schedule and its thread) belongs to.
    pid: u32,
    /// Its thread could not be started the last time it was tried (the process at its thread
    /// limit, say): nothing is cut until a later call starts it.
    spawn_failed: std::sync::atomic::AtomicBool,
    schedule: Mutex<Schedule>,
    changed: Condvar,
}

/// This process's watchdog. A process forked without exec inherits its parent's (schedule,
/// "started" flag, perhaps its lock held by a thread of the parent at the fork) but not its
/// thread: it makes one of its own, with its own lock and thread, the first time it arms one
/// (the parent's is left as it was, never used again here).
fn watchdog() -> &'static Watchdog {
    static CURRENT: AtomicPtr<Watchdog> = AtomicPtr::new(std::ptr::null_mut());
    let pid = std::process::id();
    let current = CURRENT.load(Ordering::Acquire);
    // SAFETY: every pointer stored in CURRENT comes from `Box::leak` and is never freed.
    if let Some(dog) = unsafe { current.as_ref() } {
        if dog.pid == pid {
            return dog;
        }
    }
    let fresh: &'static mut Watchdog = Box::leak(Box::new(Watchdog {
        pid,
        spawn_failed: std::sync::atomic::AtomicBool::new(false),
        schedule: Mutex::new(Schedule::default()),
        changed: Condvar::new(),
    }));
    let fresh: *mut Watchdog = fresh;
    match CURRENT.compare_exchange(current, fresh, Ordering::AcqRel, Ordering::Acquire) {
        // SAFETY: leaked above, never freed.
        Ok(_) => unsafe { &*fresh },
        Err(winner) => {
            // Another thread of this process made it first: ours was never seen by anyone.
            // SAFETY: `fresh` came from `Box::leak` just above and was never shared.
            drop(unsafe { Box::from_raw(fresh) });
            // SAFETY: as above for every pointer stored in CURRENT.
            match unsafe { winner.as_ref() } {
                Some(dog) if dog.pid == pid => dog,
                // Only a process that forked again meanwhile: ask once more.
                _ => watchdog(),
            }
        }
    }
}

impl Watchdog {
    /// The schedule; a panic elsewhere while it was held left it consistent (every change is a
    /// single push, removal or flag), so a poisoned lock is taken as it is.
    fn lock(&self) -> MutexGuard<'_, Schedule> {
        self.schedule
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn run(&self) {
        let mut schedule = self.lock();
        let mut was_empty = false;
        loop {
            let now = Instant::now();
            let mut next: Option<Instant> = None;
            let quick = schedule.entries.iter().filter(|e| e.fired).count() <= HUNT_FIRED_MAX;
            for i in 0..schedule.entries.len() {
                // A fired entry stays watched: the call may block again on another socket
                // (r2d2 pings the next idle connection after the first failed its ping).
                let entry = &schedule.entries[i];
                if entry.due > now {
                    next = Some(next.map_or(entry.due, |n| n.min(entry.due)));
                    continue;
                }
                let tid = entry.tid;
                let mut fired = entry.fired;
                if sys::shut_blocked_socket(tid) {
                    // The socket is the one the thread blocked on: its innermost call's (the
                    // guard armed last on the thread: guards nest, armed and dropped in one
                    // stack frame), whichever call's moment came. That call learns it was cut;
                    // the calls it is nested in learn only that a nested call was — the socket
                    // may be another connection's (a lockstock call on a second connection
                    // inside a body), and their own call goes on until it blocks past its own
                    // moment.
                    let innermost = schedule
                        .entries
                        .iter()
                        .filter(|e| e.tid == tid)
                        .map(|e| e.id)
                        .max();
                    for other in schedule.entries.iter_mut().filter(|e| e.tid == tid) {
                        if Some(other.id) == innermost {
                            other.fired = true;
                        } else {
                            other.nested_fired = true;
                        }
                    }
                    fired = true;
                }
                // Looked at again until disarmed, whether or not it blocked on a socket now —
                // each entry at its own pace: a call overdue but not blocked on a socket (an
                // exhausted pool's wait) is not looked at every HUNT_FIRED for another's sake.
                let again = now + if fired && quick { HUNT_FIRED } else { HUNT };
                schedule.entries[i].due = again;
                next = Some(next.map_or(again, |n| n.min(again)));
            }
            let empty = schedule.entries.is_empty();
            let until = match next {
                Some(at) => Some(at),
                None if empty && was_empty => None,
                None => Some(now + IDLE),
            };
            was_empty = empty;
            // Outside the schedule's lock (a log writer may block): once, the first time a
            // due call could not be looked at.
            #[cfg(feature = "tracing")]
            if sys::first_denial() {
                drop(schedule);
                tracing::warn!(
                    "lockstock: this process cannot read /proc/self/task/<tid>/syscall (not \
                     dumpable and not root?): an overdue call on a server that stops answering \
                     cannot be cut at its deadline (see lockstock::txn::watchdog_available)"
                );
                schedule = self.lock();
                // Calls armed meanwhile may be due before `until`: look again.
                continue;
            }
            schedule.wake = until;
            schedule = match until {
                None => self
                    .changed
                    .wait(schedule)
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
                Some(at) => {
                    self.changed
                        .wait_timeout(schedule, at.saturating_duration_since(Instant::now()))
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .0
                }
            };
        }
    }
}

/// Whether the watchdog can cut a call on a server that stops answering in this process, now:
/// on Linux (x86_64, aarch64) where the process can read what its threads are blocked in
/// (`/proc/self/task/<tid>/syscall`). Not in a process that is not dumpable — one that called
/// `prctl(PR_SET_DUMPABLE, 0)`, changed its user or group ids (a daemon dropping root) while
/// `fs.suid_dumpable` is not 1, or was started from a setuid or file-capability binary —
/// unless it runs as root: its `/proc` files are root's then; nor while its thread could not
/// be started (the process at its thread limit: the next call tries again). Where this is
/// `false`, a call on a silent server waits as long as the server does, whatever its
/// deadline. Check it at
/// start-up, after dropping privileges (`prctl(PR_SET_DUMPABLE, 1)` afterwards makes it `true`
/// again). With the `tracing` feature the watchdog logs a warning the first time it cannot
/// look at an overdue call.
pub fn watchdog_available() -> bool {
    sys::SUPPORTED
        && sys::can_see_blocked_calls()
        && !watchdog().spawn_failed.load(Ordering::Relaxed)
}

/// What the watchdog shut down during a guarded call ([`Guard::disarm`]).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Cut {
    /// A socket the call itself was blocked on (past its moment).
    pub(crate) own: bool,
    /// A socket a call nested inside it was blocked on (past that call's earlier moment): the
    /// same connection's or another's.
    pub(crate) nested: bool,
}

/// An armed watchdog entry for the calling thread; dropping it disarms.
#[derive(Debug)]
pub(crate) struct Guard {
    /// `None` where the watchdog is not supported (nothing was armed).
    id: Option<u64>,
    /// The watchdog it was armed with (this process's at the time).
    dog: Option<&'static Watchdog>,
}

impl Guard {
    /// Arms the watchdog for the calling thread, due at `due`.
    pub(crate) fn arm(due: Instant) -> Guard {
        if !sys::SUPPORTED {
            return Guard {
                id: None,
                dog: None,
            };
        }
        let dog = watchdog();
        let tid = sys::current_tid();
        let mut schedule = dog.lock();
        let id = schedule.next_id;
        schedule.next_id += 1;
        schedule.entries.push(Entry {
            id,
            tid,
            due,
            fired: false,
            nested_fired: false,
        });
        if !schedule.started {
            schedule.started = true;
            let spawned = std::thread::Builder::new()
                .name("lockstock-watchdog".into())
                .spawn(move || dog.run());
            // Without a thread nothing is ever shut down: calls behave as without the watchdog
            // (and `watchdog_available` says so) until a later call starts it.
            if spawned.is_err() {
                schedule.started = false;
            }
            dog.spawn_failed.store(spawned.is_err(), Ordering::Relaxed);
        }
        if match schedule.wake {
            Some(wake) => due < wake,
            None => true,
        } {
            schedule.wake = Some(due);
            dog.changed.notify_one();
        }
        Guard {
            id: Some(id),
            dog: Some(dog),
        }
    }

    /// Whether the watchdog shut a socket of this call down (so far).
    pub(crate) fn fired(&self) -> bool {
        let (Some(id), Some(dog)) = (self.id, self.dog) else {
            return false;
        };
        dog.lock().entries.iter().any(|e| e.id == id && e.fired)
    }

    /// Disarms, and says whether the watchdog shut a socket of this call down — and whether
    /// it shut down one of a call nested in this one. Once this returned, it never will.
    pub(crate) fn disarm(mut self) -> Cut {
        self.remove()
    }

    /// Removes the entry (once); what had been cut.
    fn remove(&mut self) -> Cut {
        let (Some(id), Some(dog)) = (self.id.take(), self.dog) else {
            return Cut::default();
        };
        let mut schedule = dog.lock();
        match schedule.entries.iter().position(|e| e.id == id) {
            Some(at) => {
                let entry = schedule.entries.swap_remove(at);
                Cut {
                    own: entry.fired,
                    nested: entry.nested_fired,
                }
            }
            None => Cut::default(),
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.remove();
    }
}

#[cfg(target_os = "linux")]
mod sys {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    /// The watchdog can find and shut down the socket a thread is blocked on.
    pub(super) const SUPPORTED: bool = cfg!(any(target_arch = "x86_64", target_arch = "aarch64"));

    /// System call numbers the watchdog recognises.
    #[cfg(target_arch = "x86_64")]
    mod nr {
        pub(super) const POLL: Option<i64> = Some(7);
        pub(super) const PPOLL: i64 = 271;
        /// `restart_syscall`: a `poll` interrupted by a stop (SIGSTOP / SIGCONT, a debugger
        /// attaching, a cgroup freeze) resumes as it, with `poll`'s arguments still in place.
        pub(super) const RESTART: Option<i64> = Some(219);
        /// read, recvfrom, recvmsg: the first argument is the fd.
        pub(super) const FD_RECEIVE: [i64; 3] = [0, 45, 47];
        /// write, sendto, sendmsg: the first argument is the fd.
        pub(super) const FD_SEND: [i64; 3] = [1, 44, 46];
    }
    #[cfg(target_arch = "aarch64")]
    mod nr {
        pub(super) const POLL: Option<i64> = None;
        pub(super) const PPOLL: i64 = 73;
        /// `restart_syscall` (an interrupted `ppoll` restarts as `ppoll` here; harmless).
        pub(super) const RESTART: Option<i64> = Some(128);
        pub(super) const FD_RECEIVE: [i64; 3] = [63, 207, 212];
        pub(super) const FD_SEND: [i64; 3] = [64, 206, 211];
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    mod nr {
        pub(super) const POLL: Option<i64> = None;
        pub(super) const PPOLL: i64 = -1;
        pub(super) const RESTART: Option<i64> = None;
        pub(super) const FD_RECEIVE: [i64; 0] = [];
        pub(super) const FD_SEND: [i64; 0] = [];
    }

    /// The kernel id of the calling thread.
    pub(super) fn current_tid() -> i64 {
        // SAFETY: gettid has no arguments and cannot fail.
        i64::from(unsafe { libc::gettid() })
    }

    /// Whether this process may read what its threads are blocked in (its own thread's file
    /// stands for all: they share the owner and the mode).
    pub(super) fn can_see_blocked_calls() -> bool {
        std::fs::File::open(format!("/proc/self/task/{}/syscall", current_tid())).is_ok()
    }

    /// If thread `tid` of this process is blocked on a socket, shuts the socket down and says
    /// so. Runs with the schedule locked (see the module docs).
    pub(super) fn shut_blocked_socket(tid: i64) -> bool {
        let Some((fd, sending)) = blocked_fd(tid) else {
            return false;
        };
        // Never the process's standard streams: under a service manager they may be sockets
        // (a log writer blocked on them is not a database call). A socket that took a number
        // among them later (the process started with one closed) is cut only where it waits
        // to receive, as a database call waits (libmariadb sends without blocking and polls):
        // one put there as a standard stream after the start (a journal stream) and blocked
        // in a write is a log writer's.
        if !is_socket(fd) || is_standard_stream(fd) || (sending && fd <= 2) {
            return false;
        }
        // SAFETY: shutdown on a descriptor number is memory-safe; the socket belongs to the
        // guarded call, which cannot close it while the schedule is locked.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) == 0 }
    }

    /// Set the first time the watchdog may not read a thread's `syscall` file.
    static DENIED: AtomicBool = AtomicBool::new(false);
    /// ... and taken by the watchdog's warning.
    static DENIAL_TOLD: AtomicBool = AtomicBool::new(false);

    /// Whether a read was denied and nobody was told yet (then the caller tells).
    #[cfg_attr(not(feature = "tracing"), allow(dead_code))]
    pub(super) fn first_denial() -> bool {
        DENIED.load(Ordering::Relaxed) && !DENIAL_TOLD.swap(true, Ordering::Relaxed)
    }

    /// The descriptor thread `tid` is blocked on, from `/proc/self/task/<tid>/syscall`, and
    /// whether it is blocked sending on it (`write`, `sendto`, `sendmsg`).
    fn blocked_fd(tid: i64) -> Option<(i32, bool)> {
        let text = match std::fs::read_to_string(format!("/proc/self/task/{tid}/syscall")) {
            Ok(text) => text,
            Err(e) => {
                if e.kind() == std::io::ErrorKind::PermissionDenied {
                    DENIED.store(true, Ordering::Relaxed);
                }
                return None;
            }
        };
        let mut fields = text.split_whitespace();
        // "running", or a negative number while not in a system call.
        let number: i64 = fields.next()?.parse().ok()?;
        let mut args = fields.map(|f| u64::from_str_radix(f.trim_start_matches("0x"), 16).ok());
        let arg0 = args.next()??;
        let arg1 = args.next()??;
        // A restarted call keeps the registers of the call it restarts: for anything but a
        // `poll` of one descriptor, the checks below find no socket.
        if Some(number) == nr::POLL || number == nr::PPOLL || Some(number) == nr::RESTART {
            if arg1 != 1 {
                return None;
            }
            read_pollfd(arg0).map(|fd| (fd, false))
        } else if nr::FD_RECEIVE.contains(&number) {
            i32::try_from(arg0).ok().map(|fd| (fd, false))
        } else if nr::FD_SEND.contains(&number) {
            i32::try_from(arg0).ok().map(|fd| (fd, true))
        } else {
            None
        }
    }

    /// The `fd` of the `struct pollfd` at `address` in this process (a failed read, e.g. an
    /// address gone, is `None`): read with `pread` on `/proc/self/mem`, which every Linux
    /// allows a process on itself; only where that cannot be opened with `process_vm_readv`,
    /// which seccomp profiles without the debugging system calls refuse (or answer by killing
    /// the process: systemd's `@system-service` without `SystemCallErrorNumber=`).
    fn read_pollfd(address: u64) -> Option<i32> {
        use std::os::unix::fs::FileExt;
        let mut bytes = [0_u8; std::mem::size_of::<libc::pollfd>()];
        match std::fs::File::open("/proc/self/mem") {
            Ok(memory) => memory.read_exact_at(&mut bytes, address).ok()?,
            Err(_) => {
                let local = libc::iovec {
                    iov_base: bytes.as_mut_ptr().cast(),
                    iov_len: bytes.len(),
                };
                let remote = libc::iovec {
                    iov_base: usize::try_from(address).ok()? as *mut libc::c_void,
                    iov_len: bytes.len(),
                };
                // SAFETY: the kernel writes at most `bytes.len()` bytes into `bytes`, which we
                // own; the remote address is only read by the kernel, which checks it.
                let read =
                    unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
                (usize::try_from(read).ok() == Some(bytes.len())).then_some(())?;
            }
        }
        // `struct pollfd` begins with its `int fd`, in the machine's byte order.
        let fd = i32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        (fd >= 0).then_some(fd)
    }

    fn is_socket(fd: i32) -> bool {
        identity(fd).is_some_and(|(mode, _, _)| mode & libc::S_IFMT == libc::S_IFSOCK)
    }

    /// What `fstat` says `fd` is: its mode, device and inode (`None`: not open).
    fn identity(fd: i32) -> Option<(libc::mode_t, u64, u64)> {
        // SAFETY: an all-zero `stat` is a valid value, and fstat writes only into it.
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat on any descriptor number is memory-safe; it fails for a closed one.
        let ok = unsafe { libc::fstat(fd, &mut stat) } == 0;
        #[allow(clippy::useless_conversion)] // `dev_t` and `ino_t` are `u64` on most targets.
        ok.then(|| (stat.st_mode, u64::from(stat.st_dev), u64::from(stat.st_ino)))
    }

    /// The device and inode of descriptors 0, 1 and 2 as the process started (0 where one was
    /// closed: no socket has inode 0), recorded before `main` by [`RECORD_STANDARD_STREAMS`].
    static STANDARD_STREAMS: [(AtomicU64, AtomicU64); 3] = [
        (AtomicU64::new(0), AtomicU64::new(0)),
        (AtomicU64::new(0), AtomicU64::new(0)),
        (AtomicU64::new(0), AtomicU64::new(0)),
    ];
    /// Whether [`STANDARD_STREAMS`] was recorded.
    static RECORDED: AtomicBool = AtomicBool::new(false);

    /// Run by the C runtime as the program starts (an `.init_array` entry), before `main` and
    /// any thread: what descriptors 0, 1 and 2 are then are the process's standard streams.
    extern "C" fn record_standard_streams() {
        for (fd, (dev, ino)) in (0..).zip(&STANDARD_STREAMS) {
            if let Some((_, device, inode)) = identity(fd) {
                dev.store(device, Ordering::Relaxed);
                ino.store(inode, Ordering::Relaxed);
            }
        }
        RECORDED.store(true, Ordering::Release);
    }

    #[used]
    #[link_section = ".init_array"]
    static RECORD_STANDARD_STREAMS: extern "C" fn() = record_standard_streams;

    /// Whether `fd` is one of the standard streams the process started with (still the same
    /// file): never shut down. Where the start could not be recorded, every number up to 2.
    fn is_standard_stream(fd: i32) -> bool {
        // Referenced here so that the linker keeps the `.init_array` entry with this code.
        let _ = std::hint::black_box(&RECORD_STANDARD_STREAMS);
        let Some(stream) = usize::try_from(fd)
            .ok()
            .and_then(|i| STANDARD_STREAMS.get(i))
        else {
            return false;
        };
        if !RECORDED.load(Ordering::Acquire) {
            return true;
        }
        identity(fd).is_some_and(|(_, device, inode)| {
            inode != 0
                && device == stream.0.load(Ordering::Relaxed)
                && inode == stream.1.load(Ordering::Relaxed)
        })
    }
}

#[cfg(not(target_os = "linux"))]
mod sys {
    /// Finding the socket a thread is blocked on is implemented for Linux only.
    pub(super) const SUPPORTED: bool = false;

    /// No thread ids are needed: nothing is ever armed.
    pub(super) fn current_tid() -> i64 {
        0
    }

    /// Finding the socket a thread is blocked on is implemented for Linux only.
    pub(super) fn shut_blocked_socket(_tid: i64) -> bool {
        false
    }

    /// Nothing is ever armed.
    pub(super) fn can_see_blocked_calls() -> bool {
        false
    }

    /// Nothing is ever read.
    #[cfg_attr(not(feature = "tracing"), allow(dead_code))]
    pub(super) fn first_denial() -> bool {
        false
    }
}
