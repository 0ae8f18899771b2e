//! Live dispatch by index (`hub::dispatch`): the dispatcher thread's time per event with many
//! live subscribers whose `wantedDids` match nothing, by the size of their DID lists, measured
//! through the real ring (events sent, then waited for until dispatched). Small lists (5 DIDs)
//! are the baseline in the same run: with every filter indexed by DID, the cost per event should
//! not grow with the lists' size. `cargo bench --bench dispatch`.

use contrail::event::{Event, EventKind};
use contrail::hub::dispatch::{Dispatcher, Registration};
use contrail::options::Filter;
use contrail::sequencer::Published;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Events per measured round.
const EVENTS: u64 = 1_000;

fn event(t: u64) -> Published {
    let did = "did:plc:nobodynobodynobodynobody";
    let mut out = Vec::new();
    Event::begin(&mut out, did, EventKind::Commit);
    out.extend_from_slice(b",\"commit\":{\"collection\":\"");
    let at = out.len();
    out.extend_from_slice(b"app.bsky.feed.post\"}}");
    let mut e = Event::from_parts(out, EventKind::Commit, did.len(), at..at + "app.bsky.feed.post".len());
    e.stamp(t);
    Published::Event(Arc::new(e))
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("dispatch");
    group.throughput(Throughput::Elements(EVENTS));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));
    for (subscribers, dids) in [(10_000usize, 5usize), (10_000, 101), (2_000, 1_000)] {
        let (ring, _) = tokio::sync::broadcast::channel(4096);
        let log = contrail::log::Log::memory(contrail::log::memory::MemoryLog::new(1 << 20));
        let m = contrail::metrics::Metrics::new();
        let d = Dispatcher::start(&ring, log.tip(), 1 << 30, m.live_queue_overflows.clone()).unwrap();
        let started = Instant::now();
        let registrations: Vec<Registration> = (0..subscribers)
            .map(|s| {
                let list: Vec<String> = (0..dids).map(|i| format!("did:plc:{s:0>8}{i:0>16}")).collect();
                d.register(Arc::new(Filter::new(&[], &list).unwrap()), 0).0
            })
            .collect();
        eprintln!("{subscribers} subscribers of {dids} DIDs registered in {:?}", started.elapsed());
        let mut t = d.dispatched_up_to() + 1;
        group.bench_function(format!("{subscribers}_subscribers_of_{dids}_dids"), |b| {
            b.iter_custom(|rounds| {
                let started = Instant::now();
                for _ in 0..rounds {
                    for _ in 0..EVENTS {
                        while ring.len() > 3_000 {
                            std::thread::yield_now();
                        }
                        let _ = ring.send(event(t));
                        t += 1;
                    }
                    while d.dispatched_up_to() < t - 1 {
                        std::thread::yield_now();
                    }
                }
                started.elapsed()
            })
        });
        drop(registrations);
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
