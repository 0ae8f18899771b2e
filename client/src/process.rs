//! Running a handler over a subscription with the cursor kept in a [`CursorStore`].
//!
//! **The guarantee, precisely.** The saved cursor only ever covers finished work: when it says
//! `C`, the handler has returned `Ok` for every event with position ≤ `C` (the parallel runner
//! included: its saved cursor never passes an event still being handled). So:
//! - every event is handed to the handler **at least once** across restarts, crashes and
//!   failovers (a handler error stops the run before the cursor passes the event) — every event
//!   a host of the subscription's list still holds when the consumer comes to it (a host out
//!   of reach is waited for a stale timeout): a range none of them holds any more (retention)
//!   is a [`Message::Gap`], logged by the subscription, and the cursor moves past it (with
//!   [`crate::Failover::Rewind`], one ending within the rewind after a switch of host is only
//!   logged: see [`crate::subscription`]);
//! - after a clean stop (the shutdown future, or the subscription ending) nothing is handed
//!   over twice: the cursor is saved on the way out;
//! - after a crash (kill -9, power loss), the events finished after the last save — at most
//!   one save interval's worth (1 s by default) — are handed over again. A handler that is
//!   idempotent (an upsert keyed by DID + collection + rkey, for instance) therefore gets
//!   **exactly-once effects**; for exactly-once without idempotence, store the cursor in the
//!   same transaction as the handler's own writes and save every event
//!   (`save_interval(Duration::ZERO)`) — or keep the cursor yourself and start from it.
//!
//! Within one run nothing is handed over twice (the subscription drops the inclusive repeat
//! and, with [`crate::Failover::Rewind`], events already delivered).

use crate::cursor::CursorStore;
use crate::event::Event;
use crate::subscription::{Message, Subscription};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Why a run ended early.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProcessError<E> {
    /// The handler failed; the saved cursor is before the event it failed on.
    #[error("the handler failed: {0}")]
    Handler(E),
    /// The cursor could not be saved (the run stops rather than process work it cannot record).
    #[error("saving the cursor: {0}")]
    Store(std::io::Error),
    /// The subscription ended with an error (see [`crate::Error::is_retryable`]).
    #[error("{0}")]
    Subscription(crate::Error),
    /// A parallel worker's handler panicked; the saved cursor is before its event.
    #[error("a handler panicked: {0}")]
    HandlerPanicked(String),
}

/// How often the cursor is saved.
#[derive(Debug, Clone, Copy)]
pub struct ProcessOptions {
    /// Save at most this often (and always at the end). Zero: after every event.
    pub save_interval: Duration,
    /// Events queued per parallel worker before the dispatcher waits (back-pressure).
    pub queue_per_worker: usize,
}

impl Default for ProcessOptions {
    fn default() -> Self {
        ProcessOptions { save_interval: Duration::from_secs(1), queue_per_worker: 64 }
    }
}

/// Saves a position when it moved and the interval has passed.
struct Saver<S> {
    store: S,
    saved: Option<u64>,
    last_save: Instant,
    every: Duration,
}

impl<S: CursorStore> Saver<S> {
    fn new(store: S, every: Duration) -> std::io::Result<Self> {
        let saved = store.load()?;
        Ok(Saver { store, saved, last_save: Instant::now(), every })
    }

    /// When `position` is to be saved, if it is ahead of what is saved: the interval after the
    /// last save. A quiet stream still gets its finished work saved then.
    fn due(&self, position: Option<u64>) -> Option<tokio::time::Instant> {
        let ahead = position.is_some_and(|p| self.saved.is_none_or(|s| p > s));
        // (An interval too long to add means "at the end only".)
        let at = self.last_save.checked_add(self.every)?;
        ahead.then(|| tokio::time::Instant::from_std(at))
    }

    fn maybe(&mut self, position: Option<u64>) -> std::io::Result<()> {
        if self.last_save.elapsed() >= self.every {
            self.now(position)?;
        }
        Ok(())
    }

    fn now(&mut self, position: Option<u64>) -> std::io::Result<()> {
        match position {
            // Only forward: after a rewind onto another host, positions may dip below the
            // saved one for a moment; the saved one stays until they pass it. The interval
            // counts from a save: one held back by unfinished work is made as soon as the work
            // is done, not an interval later.
            Some(p) if self.saved.is_none_or(|s| p > s) => {
                self.store.save(p)?;
                self.saved = Some(p);
                self.last_save = Instant::now();
            }
            _ => {}
        }
        Ok(())
    }
}

/// Hands each event to `handler`, one at a time, in order, saving the cursor as described in
/// the module doc, until `shutdown` completes (the event in hand is finished first), the
/// handler fails, or the subscription ends with an error.
pub async fn process<S, H, F, E>(
    mut sub: Subscription,
    store: S,
    opts: ProcessOptions,
    mut handler: H,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ProcessError<E>>
where
    S: CursorStore,
    H: FnMut(Event) -> F,
    F: Future<Output = Result<(), E>>,
{
    let mut saver = Saver::new(store, opts.save_interval).map_err(ProcessError::Store)?;
    let mut position = saver.saved;
    tokio::pin!(shutdown);
    let result = loop {
        let due = saver.due(position);
        let message = tokio::select! {
            biased;
            _ = &mut shutdown => break Ok(()),
            m = sub.next() => m,
            // Nothing new for the interval: what was finished is saved now.
            _ = sleep_until(due), if due.is_some() => {
                saver.now(position).map_err(ProcessError::Store)?;
                continue;
            }
        };
        match message {
            Ok(Message::Event(e)) => {
                let t = e.time_us();
                if let Err(err) = handler(e).await {
                    break Err(ProcessError::Handler(err));
                }
                position = Some(t);
            }
            // Past a gap too: its events cannot be had again (the subscription logged it).
            Ok(Message::Cursor(t) | Message::Gap { through_us: t, .. }) => position = Some(t),
            Err(e) => break Err(ProcessError::Subscription(e)),
        }
        if let Err(e) = saver.maybe(position) {
            return Err(ProcessError::Store(e));
        }
    };
    saver.now(position).map_err(ProcessError::Store)?;
    result
}

/// Sleeps until `at` (`None`: never; the select arm is off then anyway).
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Work handed to the parallel workers and not finished yet, by dispatch order; each entry
/// holds the position reached before it was dispatched. The saved cursor is the oldest
/// entry's, so it never passes unfinished work.
#[derive(Default)]
struct InFlight {
    entries: BTreeMap<u64, Option<u64>>,
    failed: bool,
}

/// The worker tasks. Dropped before they were joined (the caller gave up on the run, or it
/// stopped on an error), it stops them: no handler keeps running, out of the run's order,
/// once `process_parallel` has returned.
struct Workers {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    in_flight: Arc<Mutex<InFlight>>,
}

impl Drop for Workers {
    fn drop(&mut self) {
        if !self.tasks.is_empty() {
            lock(&self.in_flight).failed = true;
            for t in &self.tasks {
                t.abort();
            }
        }
    }
}

/// Marks the run failed if a handler panics (the worker's task unwinds through it), and wakes
/// the dispatcher, which may be waiting on a quiet subscription.
struct PanicGuard(Arc<Mutex<InFlight>>, Arc<tokio::sync::Notify>);

impl Drop for PanicGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            lock(&self.0).failed = true;
            self.1.notify_one();
        }
    }
}

/// Like [`process`], with `workers` tasks handling events concurrently: events of one repo
/// (DID) always go to the same worker, in order; different repos run in parallel. When every
/// worker's queue is full, reading waits (back-pressure to the server). On shutdown the
/// queued events are finished first; on a handler error the others stop taking work and the
/// cursor stays before the failed event.
pub async fn process_parallel<S, H, F, E>(
    mut sub: Subscription,
    store: S,
    opts: ProcessOptions,
    workers: usize,
    handler: H,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ProcessError<E>>
where
    S: CursorStore,
    H: Fn(Event) -> F + Send + Sync + 'static,
    F: Future<Output = Result<(), E>> + Send + 'static,
    E: Send + 'static,
{
    let workers = workers.max(1);
    let mut saver = Saver::new(store, opts.save_interval).map_err(ProcessError::Store)?;
    let handler = Arc::new(handler);
    let in_flight = Arc::new(Mutex::new(InFlight::default()));
    let (err_tx, mut err_rx) = mpsc::channel::<E>(1);
    let panicked = Arc::new(tokio::sync::Notify::new());
    // Signalled as workers finish events: the position that may be saved moves.
    let finished = Arc::new(tokio::sync::Notify::new());
    let mut queues = Vec::with_capacity(workers);
    let mut tasks = Workers { tasks: Vec::with_capacity(workers), in_flight: in_flight.clone() };
    for _ in 0..workers {
        let (tx, mut rx) = mpsc::channel::<(u64, Event)>(opts.queue_per_worker.max(1));
        queues.push(tx);
        let (handler, in_flight, err_tx, panicked, finished) =
            (handler.clone(), in_flight.clone(), err_tx.clone(), panicked.clone(), finished.clone());
        tasks.tasks.push(tokio::spawn(async move {
            let _guard = PanicGuard(in_flight.clone(), panicked);
            while let Some((id, event)) = rx.recv().await {
                if lock(&in_flight).failed {
                    return; // another worker failed: take no more work
                }
                match handler(event).await {
                    Ok(()) => {
                        lock(&in_flight).entries.remove(&id);
                        finished.notify_one();
                    }
                    Err(e) => {
                        lock(&in_flight).failed = true;
                        let _ = err_tx.try_send(e);
                        return;
                    }
                }
            }
        }));
    }
    drop(err_tx);
    let mut position = saver.saved;
    let mut next_id = 0u64;
    let safe_position = |position: Option<u64>| -> Option<u64> {
        let f = lock(&in_flight);
        match f.entries.first_key_value() {
            Some((_, before)) => *before,
            None => position,
        }
    };
    tokio::pin!(shutdown);
    let mut result = Ok(());
    // An event read, waiting for room in its worker's queue: reading waits meanwhile. A
    // worker's error or panic, or shutdown, ends the wait with the event not handed over (its
    // entry in `in_flight` holds the cursor before it).
    let mut waiting: Option<(usize, u64, Event)> = None;
    loop {
        let safe = safe_position(position);
        let due = saver.due(safe);
        // Work dispatched and not finished holds the position back: wait for it too.
        let held_back = due.is_none() && saver.due(position).is_some();
        let waiting_for = waiting.as_ref().map_or(0, |w| w.0);
        let message = tokio::select! {
            biased;
            e = err_rx.recv() => {
                if let Some(e) = e {
                    result = Err(ProcessError::Handler(e));
                }
                break;
            }
            _ = &mut shutdown => break,
            _ = panicked.notified() => break, // the join below reports it
            room = queues[waiting_for].reserve(), if waiting.is_some() => {
                let Ok(room) = room else { break }; // the worker has stopped after a failure; its error is on the way
                let (_, id, e) = waiting.take().expect("a wait for room has an event");
                position = Some(e.time_us());
                room.send((id, e));
                None
            }
            m = sub.next(), if waiting.is_none() => Some(m),
            // Nothing new for the interval: what was finished is saved now.
            _ = sleep_until(due), if due.is_some() => {
                // What is finished by now: workers may have finished more while this waited.
                if let Err(e) = saver.now(safe_position(position)) {
                    lock(&in_flight).failed = true;
                    return Err(ProcessError::Store(e));
                }
                continue;
            }
            _ = finished.notified(), if held_back => continue,
        };
        match message {
            None => {}
            Some(Ok(Message::Event(e))) => {
                let worker = (repo_hash(e.did()) % workers as u64) as usize;
                let id = next_id;
                next_id += 1;
                lock(&in_flight).entries.insert(id, position);
                waiting = Some((worker, id, e));
                continue;
            }
            Some(Ok(Message::Cursor(t) | Message::Gap { through_us: t, .. })) => position = Some(t),
            Some(Err(e)) => {
                result = Err(ProcessError::Subscription(e));
                break;
            }
        }
        if let Err(e) = saver.maybe(safe_position(position)) {
            lock(&in_flight).failed = true;
            return Err(ProcessError::Store(e));
        }
    }
    // Finish what is queued (unless a worker failed: then the others stop taking work). Each
    // task leaves the list once it has ended: if the caller gives up on the run meanwhile, the
    // ones still running are stopped (`Workers::drop`), not left running unwatched.
    drop(queues);
    while let Some(t) = tasks.tasks.first_mut() {
        let joined = t.await;
        tasks.tasks.remove(0);
        if let Err(e) = joined {
            if e.is_panic() && !matches!(result, Err(ProcessError::Handler(_))) {
                let p = e.into_panic();
                let what =
                    p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned());
                result = Err(ProcessError::HandlerPanicked(what.unwrap_or_default()));
            }
        }
    }
    // A handler's failure is what the caller must hear about, even when the stream ended or
    // shutdown came while it was in hand.
    if !matches!(result, Err(ProcessError::Handler(_))) {
        if let Ok(e) = err_rx.try_recv() {
            result = Err(ProcessError::Handler(e));
        }
    }
    saver.now(safe_position(position)).map_err(ProcessError::Store)?;
    result
}

fn lock(m: &Mutex<InFlight>) -> std::sync::MutexGuard<'_, InFlight> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// FNV-1a of a DID: a fixed hash, so a repo goes to the same worker in every run.
fn repo_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}
