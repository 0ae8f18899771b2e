//! The runners' promises, checked on random streams: per-repo order, every event handled once
//! per run, and a saved cursor that never passes unfinished work (asserted inside the store's
//! `save`, at the moment of saving), also where events are stamped alike (Jetstream v2's
//! `/subscribe` gives every op of a commit one `time_us`): a cursor at a `time_us` claims every
//! event at it.

use contrail_client::{
    process, process_parallel, CursorStore, Event, Message, ProcessError, ProcessOptions, Subscription,
};
use proptest::prelude::*;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

fn event(did: u8, time_us: u64) -> Event {
    event_from(did, time_us, 0, false)
}

/// The `n`th op of a commit stamped `time_us`, from a server that stamps every op of a commit
/// alike (Jetstream v2's `/subscribe`, which adds its own `cursor` to every event).
fn op(did: u8, time_us: u64, n: usize) -> Event {
    event_from(did, time_us, n, true)
}

fn event_from(did: u8, time_us: u64, n: usize, v2_server: bool) -> Event {
    let cursor = if v2_server { format!(r#""cursor":{time_us}{n},"#) } else { String::new() };
    Event::from_json(format!(
        r#"{{"did":"did:plc:repo{did}","time_us":{time_us},{cursor}"kind":"commit","commit":{{"rev":"r{time_us}","operation":"create","collection":"app.bsky.feed.like","rkey":"k{time_us}x{n}","record":{{}}}}}}"#
    ))
    .unwrap()
}

/// An event's identity in these tests: its `time_us` and its place among the ops stamped alike.
fn identity(e: &Event) -> (u64, String) {
    (e.time_us(), e.rkey().unwrap_or_default().to_string())
}

/// A subscription that has these `(repo, time_us)` events waiting and stays open while the
/// returned sender is kept.
async fn open_subscription(
    events: impl IntoIterator<Item = (u8, u64)>,
) -> (mpsc::Sender<Result<Message, contrail_client::Error>>, Subscription) {
    let (tx, rx) = mpsc::channel(64);
    for (repo, t) in events {
        tx.send(Ok(Message::Event(event(repo, t)))).await.unwrap();
    }
    (tx, Subscription::from_channel(rx))
}

/// What the handler has finished, shared with the store that checks it.
#[derive(Default)]
struct Finished {
    events: BTreeSet<(u64, String)>,
    /// Each repo's last event handled, by its place in the stream.
    last_per_repo: HashMap<String, usize>,
    out_of_order: Vec<String>,
}

struct CheckingStore {
    finished: Arc<Mutex<Finished>>,
    /// Every event of the stream.
    all_events: Arc<Vec<(u64, String)>>,
    saves: Arc<Mutex<Vec<u64>>>,
    violations: Arc<Mutex<Vec<String>>>,
}

impl CursorStore for CheckingStore {
    fn load(&self) -> std::io::Result<Option<u64>> {
        Ok(None)
    }

    fn save(&mut self, cursor: u64) -> std::io::Result<()> {
        let f = self.finished.lock().unwrap();
        for e in self.all_events.iter().filter(|e| e.0 <= cursor) {
            if !f.events.contains(e) {
                self.violations.lock().unwrap().push(format!("saved {cursor} while {e:?} was unfinished"));
            }
        }
        let mut saves = self.saves.lock().unwrap();
        if saves.last().is_some_and(|&s| s >= cursor) {
            self.violations.lock().unwrap().push(format!("saved {cursor} after {:?}", saves.last()));
        }
        saves.push(cursor);
        Ok(())
    }
}

/// A stream: (repo, delay ms, a cursor message after it, stamped alike with the one before) per
/// event. (A server that sends cursor messages stamps every event uniquely.)
fn stream() -> impl Strategy<Value = Vec<(u8, u8, bool, bool)>> {
    prop::collection::vec((0u8..6, 0u8..3, prop::bool::weighted(0.1), prop::bool::weighted(0.3)), 1..120)
}

async fn run_case(
    items: Vec<(u8, u8, bool, bool)>,
    workers: Option<usize>,
    fail_at: Option<usize>,
) -> Result<(), TestCaseError> {
    let (tx, rx) = mpsc::channel(8);
    let mut all = Vec::new();
    let mut delays = HashMap::new();
    let mut msgs = Vec::new();
    // Events stamped alike make the stream one from a server that stamps alike.
    let mut stamps = Vec::new();
    let (mut t, mut n, mut cursor_before) = (1_000u64, 0usize, false);
    for (i, &(_, _, cursor_after, alike)) in items.iter().enumerate() {
        if i > 0 && alike && !cursor_before {
            n += 1;
        } else {
            (t, n) = (1_000 + 10 * i as u64, 0);
        }
        stamps.push((t, n));
        cursor_before = cursor_after;
    }
    let any_alike = stamps.iter().any(|&(_, n)| n > 0);
    for (&(repo, delay, cursor_after, _), &(t, n)) in items.iter().zip(&stamps) {
        let e = event_from(repo, t, n, any_alike);
        all.push(identity(&e));
        delays.insert(identity(&e), delay as u64);
        msgs.push(Message::Event(e));
        if cursor_after {
            msgs.push(Message::Cursor(t + 5));
        }
    }
    let fail_event = fail_at.map(|i| all[i % all.len()].clone());
    let order: HashMap<(u64, String), usize> = all.iter().cloned().enumerate().map(|(i, e)| (e, i)).collect();
    let all = Arc::new(all);
    let finished = Arc::new(Mutex::new(Finished::default()));
    let store = CheckingStore {
        finished: finished.clone(),
        all_events: all.clone(),
        saves: Arc::default(),
        violations: Arc::default(),
    };
    let (saves, violations) = (store.saves.clone(), store.violations.clone());
    let feeder = tokio::spawn(async move {
        for m in msgs {
            if tx.send(Ok(m)).await.is_err() {
                return;
            }
        }
        // The stream ends: the run ends with the subscription's error.
        let _ = tx.send(Err(contrail_client::Error::Ended)).await;
    });
    let sub = Subscription::from_channel(rx);
    let opts = ProcessOptions { save_interval: Duration::ZERO, queue_per_worker: 3 };
    let f2 = finished.clone();
    let fail = fail_event.clone();
    let handler = move |e: Event| {
        let finished = f2.clone();
        let delay = delays[&identity(&e)];
        let fails = fail.as_ref() == Some(&identity(&e));
        let place = order[&identity(&e)];
        to_str(async move {
            if fails {
                return Err(TestCaseError::fail("boom"));
            }
            tokio::time::sleep(Duration::from_millis(delay)).await;
            let mut f = finished.lock().unwrap();
            // (By place in the stream: ops stamped alike have an order too.)
            if let Some(&prev) = f.last_per_repo.get(e.did()) {
                if prev >= place {
                    f.out_of_order.push(format!("{} at event {place} after {prev}", e.did()));
                }
            }
            f.last_per_repo.insert(e.did().to_string(), place);
            prop_assert!(f.events.insert(identity(&e)), "{:?} handled twice", identity(&e));
            Ok(())
        })
    };
    let never = std::future::pending::<()>();
    let result = match workers {
        Some(n) => process_parallel(sub, store, opts, n, handler, never).await,
        None => process(sub, store, opts, handler, never).await,
    };
    feeder.abort();
    let f = finished.lock().unwrap();
    prop_assert!(violations.lock().unwrap().is_empty(), "{:?}", violations.lock().unwrap());
    prop_assert!(f.out_of_order.is_empty(), "{:?}", f.out_of_order);
    match fail_event {
        None => {
            prop_assert!(
                matches!(result, Err(ProcessError::Subscription(contrail_client::Error::Ended))),
                "{result:?}"
            );
            prop_assert_eq!(f.events.len(), all.len(), "not every event was handled");
            // The last save covers everything (from a server that stamps events alike, all but
            // the last `time_us`, which may have more events to come).
            let last = saves.lock().unwrap().last().copied().unwrap_or(0);
            prop_assert!(last >= all.last().unwrap().0 - u64::from(any_alike), "{last}");
        }
        Some(failed) => {
            prop_assert!(matches!(result, Err(ProcessError::Handler(_))), "{result:?}");
            prop_assert!(!f.events.contains(&failed));
            let t = failed.0;
            prop_assert!(saves.lock().unwrap().iter().all(|&s| s < t), "a save claimed the failed event's time_us {t}");
        }
    }
    Ok(())
}

/// The handler's `Result<(), TestCaseError>` as `Result<(), String>` (a failed assertion inside
/// counts as a handler failure, and fails the case).
async fn to_str(f: impl std::future::Future<Output = Result<(), TestCaseError>>) -> Result<(), String> {
    f.await.map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_parallel_handler_ends_the_run_with_an_error_and_the_cursor_before_it() {
    let (tx, sub) = open_subscription((1..=5u64).map(|t| (t as u8, t))).await;
    // The stream then stays quiet: the panic alone must end the run.
    let store = contrail_client::MemoryCursorStore::default();
    let handler = |e: Event| async move {
        if e.time_us() == 3 {
            panic!("handler bug at 3");
        }
        Ok::<(), String>(())
    };
    let opts = ProcessOptions { save_interval: Duration::ZERO, queue_per_worker: 2 };
    let run = process_parallel(sub, store.clone(), opts, 2, handler, std::future::pending());
    let result = tokio::time::timeout(Duration::from_secs(10), run).await.expect("the run ends after the panic");
    assert!(matches!(&result, Err(ProcessError::HandlerPanicked(m)) if m.contains("handler bug at 3")), "{result:?}");
    assert!(store.get().is_none_or(|c| c < 3), "the cursor passed the event whose handler panicked: {:?}", store.get());
    drop(tx);
}

/// The serial runner, like the parallel one: a handler's panic ends the run with an error, and
/// what was finished before it is saved (the events before it are not handed over again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_ends_the_serial_run_with_an_error_and_saves_what_it_finished() {
    let (tx, sub) = open_subscription((1..=5u64).map(|t| (t as u8, t))).await;
    let store = contrail_client::MemoryCursorStore::default();
    let handler = |e: Event| async move {
        if e.time_us() == 3 {
            panic!("handler bug at 3");
        }
        Ok::<(), String>(())
    };
    // Saved only at the end: what the end saves is what is checked.
    let opts = ProcessOptions { save_interval: Duration::from_secs(3600), ..ProcessOptions::default() };
    let result = process(sub, store.clone(), opts, handler, std::future::pending()).await;
    assert!(matches!(&result, Err(ProcessError::HandlerPanicked(m)) if m.contains("handler bug at 3")), "{result:?}");
    assert_eq!(store.get(), Some(2));
    drop(tx);
    // The same when the handler panics before it returns its future.
    let (tx, sub) = open_subscription((1..=5u64).map(|t| (t as u8, t))).await;
    let store = contrail_client::MemoryCursorStore::default();
    let handler = |e: Event| {
        assert_ne!(e.time_us(), 3, "handler bug at 3");
        async move { Ok::<(), String>(()) }
    };
    let result = process(sub, store.clone(), opts, handler, std::future::pending()).await;
    assert!(matches!(&result, Err(ProcessError::HandlerPanicked(m)) if m.contains("handler bug at 3")), "{result:?}");
    assert_eq!(store.get(), Some(2));
    drop(tx);
}

/// Ops of one commit stamped alike, the second failing: the saved cursor stays before their
/// `time_us` (a run resumed at it would take both for repeats), so the next run hands both
/// over again; the same for a stop right after the first. Both runners.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_between_ops_stamped_alike_leaves_the_cursor_before_them() {
    for workers in [None, Some(2)] {
        let (tx, rx) = mpsc::channel(16);
        // One repo: one worker, in order (the event after the failed one is not taken).
        for e in [op(1, 10, 0), op(1, 10, 1), op(1, 20, 0), op(1, 30, 0), op(1, 30, 1)] {
            tx.send(Ok(Message::Event(e))).await.unwrap();
        }
        let store = contrail_client::MemoryCursorStore::default();
        let handler = |e: Event| async move {
            if identity(&e) == (30, "k30x1".to_string()) {
                return Err("the second op at 30 fails".to_string());
            }
            Ok(())
        };
        let opts = ProcessOptions { save_interval: Duration::ZERO, ..ProcessOptions::default() };
        let sub = Subscription::from_channel(rx);
        let result = match workers {
            None => process(sub, store.clone(), opts, handler, std::future::pending()).await,
            Some(n) => process_parallel(sub, store.clone(), opts, n, handler, std::future::pending()).await,
        };
        assert!(matches!(result, Err(ProcessError::Handler(_))), "{workers:?}: {result:?}");
        assert_eq!(store.get(), Some(29), "{workers:?}");
        drop(tx);
    }
    // A stop (the stream ends) right after the first op at 40.
    for workers in [None, Some(2)] {
        let (tx, rx) = mpsc::channel(16);
        for e in [op(1, 10, 0), op(2, 40, 0)] {
            tx.send(Ok(Message::Event(e))).await.unwrap();
        }
        tx.send(Err(contrail_client::Error::Ended)).await.unwrap();
        let store = contrail_client::MemoryCursorStore::default();
        let handler = |_: Event| async move { Ok::<(), String>(()) };
        let opts = ProcessOptions { save_interval: Duration::ZERO, ..ProcessOptions::default() };
        let sub = Subscription::from_channel(rx);
        let result = match workers {
            None => process(sub, store.clone(), opts, handler, std::future::pending()).await,
            Some(n) => process_parallel(sub, store.clone(), opts, n, handler, std::future::pending()).await,
        };
        assert!(matches!(result, Err(ProcessError::Subscription(_))), "{workers:?}: {result:?}");
        assert_eq!(store.get(), Some(39), "{workers:?}");
    }
}

/// A stream that goes quiet after a burst (a sparse filter, or a server without cursor
/// messages): the finished burst is saved within the interval, not only at the next message,
/// so a crash then hands over at most one interval's worth again. Both runners; for the
/// parallel one, what workers finish after the last message is saved too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_stream_still_gets_its_finished_work_saved() {
    for workers in [None, Some(3)] {
        let (tx, sub) = open_subscription((1..=5u64).map(|t| (t as u8, t))).await;
        let store = contrail_client::MemoryCursorStore::default();
        let handler = |_: Event| async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok::<(), String>(())
        };
        let opts = ProcessOptions { save_interval: Duration::from_millis(200), queue_per_worker: 2 };
        let run: std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>> = match workers {
            None => Box::pin(process(sub, store.clone(), opts, handler, std::future::pending())),
            Some(n) => Box::pin(process_parallel(sub, store.clone(), opts, n, handler, std::future::pending())),
        };
        let run = tokio::spawn(run);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while store.get() != Some(5) {
            assert!(std::time::Instant::now() < deadline, "{workers:?}: saved {:?} on a quiet stream", store.get());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!run.is_finished(), "the stream is still open");
        run.abort();
        drop(tx);
    }
}

/// The quiet stream's timed save takes what is finished when it fires, not when it was armed:
/// a slow event and a quick one of another repo, both done long before the interval ends, are
/// both saved then (not an interval later, as "after 1" was).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_save_takes_what_finished_while_it_waited() {
    let (tx, sub) = open_subscription([(1u8, 1u64), (1, 2), (2, 3)]).await;
    let store = contrail_client::MemoryCursorStore::default();
    let handler = |e: Event| async move {
        if e.time_us() == 2 {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        Ok::<(), String>(())
    };
    let opts = ProcessOptions { save_interval: Duration::from_secs(1), queue_per_worker: 2 };
    let run = tokio::spawn(process_parallel(sub, store.clone(), opts, 2, handler, std::future::pending()));
    // Nothing is saved before the first interval: the first save seen is the timed one.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while store.get().is_none() {
        assert!(std::time::Instant::now() < deadline, "no timed save");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(store.get(), Some(3), "everything finished by 0.3 s is saved at the 1 s save");
    run.abort();
    drop(tx);
}

/// A caller that gives up on a parallel run while it finishes its queue (a timeout around a
/// shutdown) stops its handlers: none keeps running unwatched after the run is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parallel_run_given_up_while_finishing_stops_its_handlers() {
    let (tx, sub) = open_subscription((1..=10u64).map(|t| (1, t))).await;
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let handler = {
        let calls = calls.clone();
        move |_: Event| {
            let calls = calls.clone();
            async move {
                calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
                Ok::<(), String>(())
            }
        }
    };
    let opts = ProcessOptions { save_interval: Duration::from_secs(1), queue_per_worker: 16 };
    let store = contrail_client::MemoryCursorStore::default();
    let shutdown = tokio::time::sleep(Duration::from_millis(50));
    let run = process_parallel(sub, store, opts, 2, handler, shutdown);
    assert!(tokio::time::timeout(Duration::from_millis(250), run).await.is_err(), "the queue takes a second");
    let after = calls.load(std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), after, "handlers ran on after the run was dropped");
    drop(tx);
}

/// Shutdown while every worker's queue is full stops the reading at once: what is queued is
/// finished, the event waiting for room is not handed over (the cursor stays before it), and
/// the run does not wait for a handler to make room first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_while_the_queues_are_full_hands_over_nothing_more() {
    let (tx, sub) = open_subscription((1..=10u64).map(|t| (1, t))).await;
    let handled = Arc::new(Mutex::new(Vec::new()));
    let started = Arc::new(tokio::sync::Notify::new());
    let handler = {
        let (handled, started) = (handled.clone(), started.clone());
        move |e: Event| {
            let (handled, started) = (handled.clone(), started.clone());
            async move {
                started.notify_one();
                tokio::time::sleep(Duration::from_secs(1)).await;
                handled.lock().unwrap().push(e.time_us());
                Ok::<(), String>(())
            }
        }
    };
    // One worker with a queue of one: event 1 in its hands, 2 queued, 3 waiting for room
    // when shutdown comes, a while after event 1 was taken.
    let opts = ProcessOptions { save_interval: Duration::from_secs(60), queue_per_worker: 1 };
    let store = contrail_client::MemoryCursorStore::default();
    let shutdown = async move {
        started.notified().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    process_parallel(sub, store.clone(), opts, 1, handler, shutdown).await.unwrap();
    assert_eq!(*handled.lock().unwrap(), vec![1, 2], "what was queued at shutdown, and nothing more");
    assert_eq!(store.get(), Some(2));
    drop(tx);
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_time().build().unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn the_parallel_runner_keeps_repo_order_and_never_saves_past_unfinished_work(items in stream(), workers in 1usize..6) {
        runtime().block_on(run_case(items, Some(workers), None))?;
    }

    #[test]
    fn a_failing_handler_stops_the_parallel_run_before_its_event(items in stream(), workers in 1usize..6, at in 0usize..200) {
        runtime().block_on(run_case(items, Some(workers), Some(at)))?;
    }

    #[test]
    fn the_sequential_runner_saves_only_finished_work(items in stream(), at in prop::option::of(0usize..200)) {
        runtime().block_on(run_case(items, None, at))?;
    }
}
