//! `contrail tail`: a terminal client built on the client crate. Each event goes to stdout on
//! its own line exactly as the server sent it; connection progress, a periodic count and
//! errors go to stderr. On Ctrl-C (or a closed stdout, as with `| head`) it stops and says
//! which `--cursor` resumes where it left off.

use crate::config::TailArgs;
use contrail_client::{Failover, Filters, Message, Subscription, Wire};
use std::io::Write;
use std::time::{Duration, Instant};

/// How often the running count goes to stderr.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);
/// Output is buffered and flushed at least this often (and when idle), so a pipe gets lines
/// promptly without a write per event.
const FLUSH_EVERY: Duration = Duration::from_millis(100);

pub async fn run(args: TailArgs) -> anyhow::Result<()> {
    let failover = args.rewind.map_or(Failover::ExactCursor, Failover::Rewind);
    let mut sub = Subscription::builder(args.urls)
        .filters(Filters { collections: args.collections, dids: args.dids })
        .cursor(args.cursor)
        .compress(args.compress)
        .include_sync(args.include_sync)
        .failover(failover)
        .wire(if args.wire == "v2" { Wire::V2 } else { Wire::V1 })
        .start()?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(1 << 16, stdout.lock());
    let (mut events, mut position) = (0u64, args.cursor);
    // Everything up to here is on stdout: the position at the last flush that went out. The
    // resume cursor is never past it, so a full disk or a failing pipe loses nothing on resume.
    let mut written_to = args.cursor;
    let mut write_failed = false;
    let mut flush = tokio::time::interval(FLUSH_EVERY);
    let mut last_progress = Instant::now();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let outcome: anyhow::Result<()> = loop {
        let message = tokio::select! {
            _ = &mut ctrl_c => break Ok(()),
            _ = flush.tick() => {
                if let Err(e) = out.flush() {
                    write_failed = true;
                    break closed_stdout(e);
                }
                written_to = position;
                continue;
            }
            m = sub.next() => m,
        };
        match message {
            Ok(Message::Event(e)) => {
                position = Some(e.time_us());
                events += 1;
                let written = out.write_all(e.json().as_bytes()).and_then(|()| out.write_all(b"\n"));
                if let Err(e) = written {
                    write_failed = true;
                    break closed_stdout(e);
                }
            }
            Ok(Message::Gap { after_us, through_us }) => {
                position = Some(through_us);
                eprintln!(
                    "contrail tail: the server no longer held the events after {after_us} through {through_us}; going on after them"
                );
            }
            // A cursor message, or a message kind of a later client version: a position.
            Ok(m) => position = Some(m.time_us()),
            Err(e) => break Err(e.into()),
        }
        if last_progress.elapsed() >= PROGRESS_EVERY {
            last_progress = Instant::now();
            let s = sub.stats();
            eprintln!(
                "contrail tail: {events} events, cursor {}, {} connection(s)",
                position.map_or("-".into(), |p| p.to_string()),
                s.connections.load(std::sync::atomic::Ordering::Relaxed)
            );
        }
    };
    let all_out = !write_failed && out.flush().is_ok();
    match if all_out { position } else { written_to } {
        Some(p) => eprintln!("contrail tail: {events} events; resume with --cursor {p}"),
        None if !all_out => eprintln!("contrail tail: {events} events, none written out; start again as you did"),
        None => {}
    }
    outcome
}

/// A reader that went away (`| head`) ends the tail quietly; other write errors are errors.
fn closed_stdout(e: std::io::Error) -> anyhow::Result<()> {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        Ok(())
    } else {
        Err(anyhow::Error::new(e).context("writing to stdout"))
    }
}
