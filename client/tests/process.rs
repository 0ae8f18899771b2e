//! The runners' promises, checked on random streams: per-repo order, every event handled once
//! per run, and a saved cursor that never passes unfinished work (asserted inside the store's
//! `save`, at the moment of saving).

use contrail_client::{
    process, process_parallel, CursorStore, Event, Message, ProcessError, ProcessOptions, Subscription,
};
use proptest::prelude::*;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

fn event(did: u8, time_us: u64) -> Event {
    Event::from_json(format!(
        r#"{{"did":"did:plc:repo{did}","time_us":{time_us},"kind":"commit","commit":{{"rev":"r{time_us}","operation":"create","collection":"app.bsky.feed.like","rkey":"k{time_us}","record":{{}}}}}}"#
    ))
    .unwrap()
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
    times: BTreeSet<u64>,
    last_per_repo: HashMap<String, u64>,
    out_of_order: Vec<String>,
}

struct CheckingStore {
    finished: Arc<Mutex<Finished>>,
    /// Every position that exists in the stream (events and cursor messages).
    all_events: Arc<Vec<u64>>,
    saves: Arc<Mutex<Vec<u64>>>,
    violations: Arc<Mutex<Vec<String>>>,
}

impl CursorStore for CheckingStore {
    fn load(&self) -> std::io::Result<Option<u64>> {
        Ok(None)
    }

    fn save(&mut self, cursor: u64) -> std::io::Result<()> {
        let f = self.finished.lock().unwrap();
        for &t in self.all_events.iter().filter(|&&t| t <= cursor) {
            if !f.times.contains(&t) {
                self.violations.lock().unwrap().push(format!("saved {cursor} while {t} was unfinished"));
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

/// A stream: (repo, delay ms) per event, with a cursor message after some.
fn stream() -> impl Strategy<Value = Vec<(u8, u8, bool)>> {
    prop::collection::vec((0u8..6, 0u8..3, prop::bool::weighted(0.1)), 1..120)
}

async fn run_case(
    items: Vec<(u8, u8, bool)>,
    workers: Option<usize>,
    fail_at: Option<usize>,
) -> Result<(), TestCaseError> {
    let (tx, rx) = mpsc::channel(8);
    let mut all = Vec::new();
    let mut delays = HashMap::new();
    let mut msgs = Vec::new();
    for (i, &(repo, delay, cursor_after)) in items.iter().enumerate() {
        let t = 1_000 + 10 * i as u64;
        all.push(t);
        delays.insert(t, delay as u64);
        msgs.push(Message::Event(event(repo, t)));
        if cursor_after {
            msgs.push(Message::Cursor(t + 5));
        }
    }
    let fail_time = fail_at.map(|i| all[i % all.len()]);
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
    let handler = move |e: Event| {
        let finished = f2.clone();
        let delay = delays[&e.time_us()];
        to_str(async move {
            if Some(e.time_us()) == fail_time {
                return Err(TestCaseError::fail("boom"));
            }
            tokio::time::sleep(Duration::from_millis(delay)).await;
            let mut f = finished.lock().unwrap();
            let t = e.time_us();
            if let Some(&prev) = f.last_per_repo.get(e.did()) {
                if prev >= t {
                    f.out_of_order.push(format!("{} at {t} after {prev}", e.did()));
                }
            }
            f.last_per_repo.insert(e.did().to_string(), t);
            prop_assert!(f.times.insert(t), "{t} handled twice");
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
    match fail_time {
        None => {
            prop_assert!(
                matches!(result, Err(ProcessError::Subscription(contrail_client::Error::Ended))),
                "{result:?}"
            );
            prop_assert_eq!(f.times.len(), all.len(), "not every event was handled");
            // The last save covers everything.
            let last = *saves.lock().unwrap().last().unwrap();
            prop_assert!(last >= *all.last().unwrap());
        }
        Some(t) => {
            prop_assert!(matches!(result, Err(ProcessError::Handler(_))), "{result:?}");
            prop_assert!(!f.times.contains(&t));
            prop_assert!(saves.lock().unwrap().iter().all(|&s| s < t), "a save passed the failed event");
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
    tokio::time::sleep(Duration::from_millis(1_500)).await;
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
