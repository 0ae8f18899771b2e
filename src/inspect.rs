//! `contrail inspect …`: operator tools that read frames or the log and print JSON lines.
//! Their output formats are interfaces (scripts parse them): change them only additively.

use crate::clock::{now_us, Stamper};
use crate::framefile;
use crate::transcode::{DropReason, FrameType, Transcoder};
use std::collections::BTreeMap;
use std::io::Write;

/// Counts kept while transcoding a frame file.
#[derive(Default, Debug)]
pub struct FramesSummary {
    pub frames: BTreeMap<&'static str, u64>,
    pub events: BTreeMap<&'static str, u64>,
    pub drops: BTreeMap<DropReason, u64>,
}

/// Bytes of frames per unit of work handed to a transcoding thread. Small enough that the
/// workers start soon after the first read and finish together at the end (on a 16 MB file,
/// 1 MiB blocks left one core idle for a sixteenth of the run at each end: 128 KiB is 1.2×
/// faster there, and no slower on a 160 MB file; BENCHMARKS.md).
const BLOCK_BYTES: usize = 128 << 10;

/// One block's transcoding, before stamping (which must happen in order).
struct Chunk {
    index: usize,
    events: Vec<crate::event::Event>,
    frame_types: Vec<FrameType>,
    drops: Vec<DropReason>,
}

/// `contrail inspect frames FILE`: one v1 event per line on `out`, `time_us` stamped by the
/// server's rule; the summary is returned for stderr. A reader thread reads (and
/// decompresses) the file a block of whole frames at a time; `threads` workers transcode the
/// blocks (frames are independent); this thread puts them back in order, stamps and writes.
/// Memory stays bounded whatever the file's size.
pub fn frames(
    path: &std::path::Path,
    max_frame_bytes: usize,
    threads: Option<usize>,
    out: &mut impl Write,
) -> anyhow::Result<FramesSummary> {
    let mut blocks = framefile::Blocks::open(path, BLOCK_BYTES, max_frame_bytes)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = threads.unwrap_or(cores).clamp(1, 64);
    let mut stamper = Stamper::default();
    let mut summary = FramesSummary::default();
    // The total, for a person watching: counting costs a seek per frame, so only then.
    let total = {
        use std::io::IsTerminal;
        std::io::stderr().is_terminal().then(|| framefile::count_frames(path)).flatten()
    };
    let mut progress = crate::progress::Progress::new("frames", total);
    // Blocks waiting for a worker: the reader stays at most this far ahead.
    let (work_tx, work_rx) = std::sync::mpsc::sync_channel::<(usize, framefile::Block)>(workers);
    // Shared by the workers: when the last one is gone (even by a panic), the reader's sends
    // fail instead of blocking forever.
    let work_rx = std::sync::Arc::new(std::sync::Mutex::new(work_rx));
    // Set when writing has failed (a closed pipe): the reader stops, the workers drain.
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let (done_tx, done_rx) = std::sync::mpsc::sync_channel::<Chunk>(2 * workers);
        let stop = &stop;
        let reader = scope.spawn(move || -> anyhow::Result<()> {
            let mut index = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let Some(block) = blocks.next_block()? else { break };
                if work_tx.send((index, block)).is_err() {
                    return Ok(()); // writing failed; the error is reported there
                }
                index += 1;
            }
            Ok(())
        });
        for _ in 0..workers {
            let (done_tx, work_rx) = (done_tx.clone(), work_rx.clone());
            scope.spawn(move || {
                let mut transcoder = Transcoder::new(max_frame_bytes);
                let mut op_drops = Vec::new();
                loop {
                    let next = work_rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    let Ok((index, block)) = next else { return };
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        continue; // drain, so the reader is never stuck sending
                    }
                    let mut c = Chunk { index, events: Vec::new(), frame_types: Vec::new(), drops: Vec::new() };
                    for range in &block.frames {
                        op_drops.clear();
                        let info = transcoder.transcode(&block.data[range.clone()], &mut c.events, &mut op_drops);
                        c.frame_types.push(info.frame_type);
                        c.drops.extend(info.dropped.iter().chain(op_drops.iter()).copied());
                    }
                    // The receiver is gone only when writing failed.
                    if done_tx.send(c).is_err() {
                        stop.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
        drop(done_tx);
        drop(work_rx);
        // Blocks finish out of order; they are written in order.
        let mut pending = BTreeMap::new();
        let mut want = 0;
        for chunk in done_rx {
            pending.insert(chunk.index, chunk);
            while let Some(mut c) = pending.remove(&want) {
                want += 1;
                progress.add(c.frame_types.len() as u64);
                for t in &c.frame_types {
                    *summary.frames.entry(t.as_str()).or_default() += 1;
                }
                for reason in &c.drops {
                    *summary.drops.entry(*reason).or_default() += 1;
                }
                for ev in c.events.iter_mut() {
                    ev.stamp(stamper.next(now_us()));
                    *summary.events.entry(ev.kind.as_str()).or_default() += 1;
                    let written = out.write_all(ev.json()).and_then(|()| out.write_all(b"\n"));
                    if let Err(e) = written {
                        stop.store(true, std::sync::atomic::Ordering::Relaxed);
                        return Err(e.into());
                    }
                }
            }
        }
        reader.join().map_err(|_| anyhow::anyhow!("the reading thread panicked"))??;
        anyhow::ensure!(pending.is_empty(), "a transcoding thread stopped early");
        Ok(())
    })?;
    progress.finish();
    debug_assert!(FrameType::ALL.len() == 8);
    Ok(summary)
}

impl FramesSummary {
    /// The stderr summary: `frames N: type=count …`, `events N: kind=count …`, `drops N`, then
    /// one `drop <reason> <count>` line per reason seen.
    pub fn render(&self) -> String {
        let line = |name: &str, m: &BTreeMap<&'static str, u64>| {
            let total: u64 = m.values().sum();
            let parts: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!("{name} {total}: {}\n", parts.join(" "))
        };
        let mut s = line("frames", &self.frames) + &line("events", &self.events);
        s += &format!("drops {}\n", self.drops.values().sum::<u64>());
        for (reason, n) in &self.drops {
            s += &format!("drop {} {n}\n", reason.as_str());
        }
        s
    }
}

/// `contrail inspect log`: stored events from `cursor` (inclusive), oldest first, one JSON
/// line each. Opens the log as a RocksDB secondary, so `serve` may be running.
pub fn log(data_dir: &std::path::Path, cursor: u64, limit: u64, out: &mut impl Write) -> anyhow::Result<()> {
    let store = crate::log::rocks::RocksLog::open_secondary(data_dir)?;
    let mut from = cursor;
    let mut left = limit;
    // RocksDB's estimate of the number of events (exact after a compaction).
    let mut progress = crate::progress::Progress::new("events", Some(store.estimated_events().min(limit)));
    while left > 0 {
        let mut last = None;
        let mut err = None;
        let n = store.scan(from, left.min(4096) as usize, |t, v| match crate::event::view_value(v) {
            Some(view) => {
                last = Some(t);
                err = out.write_all(view.json).and_then(|_| out.write_all(b"\n")).err();
                err.is_none()
            }
            None => {
                err = Some(std::io::Error::other(format!("corrupt value at time_us {t}")));
                false
            }
        })?;
        if let Some(e) = err {
            return Err(e.into());
        }
        progress.add(n as u64);
        match last {
            Some(t) if n > 0 => {
                left -= n as u64;
                from = t + 1;
            }
            _ => break,
        }
    }
    progress.finish();
    Ok(())
}
