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
//!   over twice: the cursor is saved on the way out — except from a server that stamps the ops
//!   of a commit alike (Jetstream v2's `/subscribe`; [`Event::may_share_time`]): a `time_us` is
//!   saved only once a later event shows no more can come at it, so the ops at the last one are
//!   handed over again rather than the rest of their commit lost (a run resumed at a cursor
//!   takes every event at it for a repeat);
//! - a handler's error or panic ends the run with the cursor before its event (and before the
//!   events stamped alike with it);
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
    /// The handler panicked; the saved cursor is before its event.
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

/// How far a run's handed-over work reaches, as a cursor that is safe to save: every event at or
/// before it is finished (the parallel runner adds its unfinished work on top).
///
/// Jetstream v2's `/subscribe` stamps every op of a commit with its frame's `time_us`, and a run
/// resumed from a stored cursor takes every event at the cursor for a repeat: saving the
/// `time_us` of an op, when more ops at it may still come, would lose them if a later one
/// failed or the run stopped before them. From such a server (known by the `cursor` field it
/// adds to every event, [`Event::may_share_time`]), an event's `time_us` is saved once it is
/// whole (a later event came, or a cursor message or a gap passed it); until then, the
/// position just before it, so the ops at it are handed over again rather than lost.
#[derive(Debug)]
struct Reach {
    /// The newest position handed over: an event's `time_us`, a cursor message's, a gap's end.
    last: Option<u64>,
    /// No more events can come at `last`.
    whole: bool,
}

impl Reach {
    fn new(saved: Option<u64>) -> Self {
        Reach { last: saved, whole: true }
    }

    /// An event at `t` is next: every event before it has come.
    fn arriving(&mut self, t: u64) {
        if self.last.is_some_and(|l| l < t) {
            self.whole = true;
        }
    }

    /// The event at `t` was handed over (finished, for the serial runner); `shares_time`: more
    /// events may come at `t` ([`Event::may_share_time`]).
    fn handed(&mut self, t: u64, shares_time: bool) {
        self.last = Some(t);
        self.whole = !shares_time;
    }

    /// A cursor message or a gap moved the position to `t`: everything up to it has come.
    fn passed(&mut self, t: u64) {
        self.last = Some(self.last.map_or(t, |l| l.max(t)));
        self.whole = true;
    }

    /// What may be saved now.
    fn safe(&self) -> Option<u64> {
        let t = self.last?;
        if self.whole {
            Some(t)
        } else {
            // Every event before `t` has come and been handed over. (0 is no cursor.)
            t.checked_sub(1).filter(|&p| p > 0)
        }
    }
}

/// Runs `f`, turning a panic inside it into an error, so that a run can save what it finished
/// before it reports the panic.
async fn catch_panic<F: Future>(f: F) -> Result<F::Output, String> {
    let mut f = std::pin::pin!(f);
    std::future::poll_fn(|cx| match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f.as_mut().poll(cx))) {
        Ok(std::task::Poll::Ready(v)) => std::task::Poll::Ready(Ok(v)),
        Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
        Err(p) => std::task::Poll::Ready(Err(panic_message(p))),
    })
    .await
}

/// A panic's message, when it has one.
fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_default()
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
    let mut reach = Reach::new(saver.saved);
    tokio::pin!(shutdown);
    let result = loop {
        let due = saver.due(reach.safe());
        let message = tokio::select! {
            biased;
            _ = &mut shutdown => break Ok(()),
            m = sub.next() => m,
            // Nothing new for the interval: what was finished is saved now.
            _ = sleep_until(due), if due.is_some() => {
                saver.now(reach.safe()).map_err(ProcessError::Store)?;
                continue;
            }
        };
        match message {
            Ok(Message::Event(e)) => {
                let t = e.time_us();
                reach.arriving(t);
                let shares_time = e.may_share_time();
                // (The call itself inside too: a handler may panic before it returns a future.)
                let failed = match catch_panic(async { handler(e).await }).await {
                    Ok(Ok(())) => None,
                    Ok(Err(err)) => Some(ProcessError::Handler(err)),
                    Err(panic) => Some(ProcessError::HandlerPanicked(panic)),
                };
                if let Some(failed) = failed {
                    // The cursor stays before the event that failed (and any stamped alike
                    // with it): the next run hands it over again.
                    saver.now(reach.safe()).map_err(ProcessError::Store)?;
                    return Err(failed);
                }
                reach.handed(t, shares_time);
            }
            // Past a gap too: its events cannot be had again (the subscription logged it).
            Ok(Message::Cursor(t) | Message::Gap { through_us: t, .. }) => reach.passed(t),
            Err(e) => break Err(ProcessError::Subscription(e)),
        }
        if let Err(e) = saver.maybe(reach.safe()) {
            return Err(ProcessError::Store(e));
        }
    };
    saver.now(reach.safe()).map_err(ProcessError::Store)?;
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
    let mut reach = Reach::new(saver.saved);
    let mut next_id = 0u64;
    // The oldest unfinished event's position before it, else what the run reached.
    let safe_position = |reached: Option<u64>| -> Option<u64> {
        let f = lock(&in_flight);
        match f.entries.first_key_value() {
            Some((_, before)) => *before,
            None => reached,
        }
    };
    tokio::pin!(shutdown);
    let mut result = Ok(());
    // An event read, waiting for room in its worker's queue: reading waits meanwhile. A
    // worker's error or panic, or shutdown, ends the wait with the event not handed over (its
    // entry in `in_flight` holds the cursor before it).
    let mut waiting: Option<(usize, u64, Event)> = None;
    loop {
        let safe = safe_position(reach.safe());
        let due = saver.due(safe);
        // Work dispatched and not finished holds the position back: wait for it too.
        let held_back = due.is_none() && saver.due(reach.safe()).is_some();
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
                reach.handed(e.time_us(), e.may_share_time());
                room.send((id, e));
                None
            }
            m = sub.next(), if waiting.is_none() => Some(m),
            // Nothing new for the interval: what was finished is saved now.
            _ = sleep_until(due), if due.is_some() => {
                // What is finished by now: workers may have finished more while this waited.
                if let Err(e) = saver.now(safe_position(reach.safe())) {
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
                reach.arriving(e.time_us());
                lock(&in_flight).entries.insert(id, reach.safe());
                waiting = Some((worker, id, e));
                continue;
            }
            Some(Ok(Message::Cursor(t) | Message::Gap { through_us: t, .. })) => reach.passed(t),
            Some(Err(e)) => {
                result = Err(ProcessError::Subscription(e));
                break;
            }
        }
        if let Err(e) = saver.maybe(safe_position(reach.safe())) {
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
                result = Err(ProcessError::HandlerPanicked(panic_message(e.into_panic())));
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
    // Unfinished work (a failed or panicked handler's event, one not handed over at shutdown)
    // holds the cursor before it; with none, the run's work is all finished.
    let unfinished = lock(&in_flight).entries.first_key_value().map(|(_, before)| *before);
    saver.now(unfinished.unwrap_or_else(|| reach.safe())).map_err(ProcessError::Store)?;
    result
}

fn lock(m: &Mutex<InFlight>) -> std::sync::MutexGuard<'_, InFlight> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// FNV-1a of a DID: a fixed hash, so a repo goes to the same worker in every run.
fn repo_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}
