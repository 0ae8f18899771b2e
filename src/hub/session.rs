//! One subscriber's socket loop: reads client messages, writes events, runs the timers (ping,
//! pong timeout, cursor messages, the slow rule) and closes with a [`CloseReason`].
//!
//! The reader half runs in its own small task and reports what it read over a 16-slot
//! channel; the writer half is buffered, so events that are ready together leave in one
//! syscall, and a replay page's ready frames go out as they are. Delivery order and position
//! belong to the [`EventStream`]; what bytes an event becomes, to the [`Encoding`].

use super::close::CloseReason;
use super::encode::{Encoding, MAX_HEAD};
use super::inbound::{self, Counted, FrameReader};
use super::liveness::{self, within, Watched};
use super::slow::{Progress, SlowWatch};
use super::stream::{EventStream, Frames, Gap, GapCause, Next, Replay, Start, StreamMetrics};
use super::Hub;
use crate::event::{Event, EventKind};
use crate::metrics::Wire;
use crate::options::{Filter, Kinds, MessageError, OptionsError, SubscribeOptions};
use fastwebsockets::{Frame, OpCode, Payload};
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;

/// Client messages larger than this close the connection with 1009 (v1 documents 10 MB).
pub const MAX_CLIENT_MESSAGE_BYTES: usize = 10_000_000;
/// Per-subscriber write buffer (memory per subscriber, allocated when its session starts: part
/// of the ~13–20 KiB an idle subscriber costs, README's sizing).
const WRITE_BUFFER: usize = 16 * 1024;
/// Most events written before the buffer is flushed, when more are ready at once.
const WRITE_BATCH: usize = 256;
/// How often the slow rule looks at a subscriber reading the log. A live subscriber wakes only
/// for its events and its own deadlines (ping, pong timeout, cursor message), so 10,000 idle
/// subscribers cost no wake-ups between pings.
const TICK: Duration = Duration::from_secs(1);
/// Pings a client may send per second before it is closed with 1008: each costs a pong
/// write, and a flood of them made the server spend a core answering (measured,
/// `benches/hostile.rs`). Keep-alive clients send one every few seconds.
const MAX_PINGS_PER_SECOND: u32 = 50;
/// Messages the server ignores (pongs, v1 binary messages, text that is not an
/// `options_update`) a client may send per second before it is closed with 1008: each costs a
/// wake-up and a parse, and while they keep coming the session loop handles them first.
const MAX_IGNORED_PER_SECOND: u32 = 50;
/// Small fragments (frames of a fragmented message, payload under [`SMALL_FRAME`]) a client
/// may send per second before it is closed with 1008. Each costs a read and a count, and a
/// fragmented message of empty frames never ends (it never nears 10 MB) nor is a message the
/// other limits see; whole messages and pings have limits of their own, larger fragments are
/// bounded by their bytes. Libraries fragment in kilobytes (Go's gorilla: 4 KiB), if at all.
const MAX_SMALL_FRAGMENTS_PER_SECOND: u32 = 500;
/// Small fragments one message may have before the client is closed with 1008, beyond one per
/// [`SMALL_FRAME`] bytes it has so far: below the rate above, a message of empty frames would
/// still never end (each costing a read and a count). A library's fragments are all large but
/// the last; a client writing a message in small pieces of data stays within it.
const MAX_SMALL_FRAGMENTS_PER_MESSAGE: usize = 64;
/// What counts as a small fragment.
const SMALL_FRAME: usize = 256;
/// At shutdown, how often a subscriber looks whether its stream has passed the log's last event.
const SHUTDOWN_LOOK: Duration = Duration::from_millis(10);
/// What the reader half has read and the session not yet handled, in messages.
const CONTROL_QUEUE: usize = 16;
/// How long a close frame may take to leave before the socket is simply dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Client messages larger than this are parsed and validated on a blocking thread: a 10 MB
/// `options_update` takes tens of milliseconds, which a runtime thread must not spend.
const PARSE_INLINE_BYTES: usize = 64 * 1024;

pub type Upgraded = TokioIo<hyper::upgrade::Upgraded>;
type ReadHalf = tokio::io::ReadHalf<Upgraded>;

/// The writer half: frames formatted by fastwebsockets (`Frame::fmt_head`), written through
/// one buffer, so events ready together leave in one syscall — and bytes already framed (a
/// replay page's) are written as they are, which fastwebsockets' own writer cannot do.
struct FrameWriter {
    io: tokio::io::BufWriter<Watched<tokio::io::WriteHalf<Upgraded>>>,
    /// A frame's write was abandoned part way (shutdown, a failure): nothing more may follow
    /// it, a close frame included, or the client would read it as the rest of that frame.
    torn: bool,
}

impl FrameWriter {
    async fn frame(&mut self, mut frame: Frame<'_>) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        let mut head = [0u8; MAX_HEAD];
        let n = frame.fmt_head(&mut head);
        self.torn = true;
        self.io.write_all(&head[..n]).await?;
        self.io.write_all(&frame.payload).await?;
        self.torn = false;
        Ok(())
    }

    async fn framed(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        self.torn = true;
        self.io.write_all(bytes).await?;
        self.torn = false;
        Ok(())
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        self.io.flush().await
    }

    /// When a write last found the socket full (the client is behind what we sent it).
    fn backed_up_at(&self) -> Option<Instant> {
        self.io.get_ref().backed_up_at()
    }
}

/// Whether the reader half reports that the kernel gave up on the connection. The kernel tells
/// one reader of the socket why (`TimedOut`); when the reader took it, a write waiting at the
/// time failed with a plain error and the connection's end is still counted as a write timeout.
async fn reader_saw_a_stall(ctl: &mut mpsc::Receiver<Control>) -> bool {
    let verdict = async {
        while let Some(c) = ctl.recv().await {
            match c {
                Control::Stalled => return true,
                Control::Close
                | Control::ReadError(_)
                | Control::Protocol(_)
                | Control::TooBig
                | Control::OverBudget
                | Control::FrameFlood => return false,
                _ => {}
            }
        }
        false
    };
    tokio::time::timeout(Duration::from_millis(100), verdict).await.unwrap_or(false)
}

/// What the reader half reports.
enum Control {
    /// A whole text message; a large one carries the connection's one large-message permit.
    /// Its bytes count against the connection's budget until it is dropped.
    Text(Vec<u8>, Option<OwnedSemaphorePermit>, Counted),
    Ping(Vec<u8>),
    /// A binary message (its bytes are not kept).
    Binary,
    Heard,
    Close,
    TooBig,
    /// The message arriving would take client messages' memory past its budget.
    OverBudget,
    /// More small fragments in a second than [`MAX_SMALL_FRAGMENTS_PER_SECOND`].
    FrameFlood,
    /// The kernel closed the connection for lack of progress (`TCP_USER_TIMEOUT`).
    Stalled,
    /// A frame no client may send, or out of place; what was wrong.
    Protocol(&'static str),
    ReadError(String),
}

/// Large client messages parsed at once in the whole process, one per core: a parse of 10 MB
/// is tens of milliseconds of CPU and holds what it builds, so many connections releasing
/// their large messages together wait their turn instead of taking every blocking thread.
fn large_parses() -> &'static Arc<Semaphore> {
    static PERMITS: std::sync::OnceLock<Arc<Semaphore>> = std::sync::OnceLock::new();
    PERMITS.get_or_init(|| Arc::new(Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get()))))
}

/// Reads frames, reassembles fragmented messages up to [`MAX_CLIENT_MESSAGE_BYTES`] in total,
/// and reports them. Messages over [`PARSE_INLINE_BYTES`] are handed on one at a time per
/// connection (`large`), so a client cannot queue sixteen 10 MB messages (and are parsed a
/// few at a time in the process: [`large_parses`]). Every message's bytes count against the
/// connection's budget until the session has handled it (see `inbound`).
async fn read_loop(mut rx: FrameReader<ReadHalf>, tx: mpsc::Sender<Control>, large: Arc<Semaphore>) {
    // A fragmented message in progress: its opcode, its bytes (text) or nothing (binary), its
    // length, and the bytes counted for it.
    let mut partial: Option<(OpCode, Vec<u8>, usize, Counted)> = None;
    // Small fragments read in the second that started at `fragments_since`.
    let (mut fragments, mut fragments_since) = (0, Instant::now());
    // Small fragments of the message in progress.
    let mut small_in_message = 0;
    loop {
        if partial.is_none() {
            small_in_message = 0;
        }
        // A frame taking its message past the limit is refused from its header.
        let so_far = partial.as_ref().map_or(0, |(_, _, len, _)| *len);
        let room = MAX_CLIENT_MESSAGE_BYTES - so_far;
        let read = rx.read(room).await;
        let small_fragment = matches!(&read, Ok((f, _))
            if f.payload.len() < SMALL_FRAME && (!f.fin || f.opcode == OpCode::Continuation));
        if small_fragment {
            small_in_message += 1;
            if small_in_message > MAX_SMALL_FRAGMENTS_PER_MESSAGE + so_far / SMALL_FRAME
                || !per_second(&mut fragments, &mut fragments_since, MAX_SMALL_FRAGMENTS_PER_SECOND)
            {
                let _ = tx.send(Control::FrameFlood).await;
                return;
            }
        }
        let msg = match read {
            Err(inbound::ReadError::TooBig) => Control::TooBig,
            Err(inbound::ReadError::OverBudget) => Control::OverBudget,
            // The kernel gave up on the connection: what we sent went unacknowledged, or the
            // client's window stayed shut, for `--write-timeout` (see `within`).
            Err(inbound::ReadError::Io(e)) if e.kind() == std::io::ErrorKind::TimedOut => Control::Stalled,
            Err(inbound::ReadError::Protocol(what)) => Control::Protocol(what),
            Err(e) => Control::ReadError(e.to_string()),
            Ok((f, counted)) => match f.opcode {
                OpCode::Text | OpCode::Binary if partial.is_some() => {
                    Control::Protocol("a new message inside a fragmented one")
                }
                OpCode::Text | OpCode::Binary if !f.fin => {
                    let len = f.payload.len();
                    partial = Some(if f.opcode == OpCode::Text {
                        (f.opcode, f.payload, len, counted)
                    } else {
                        // A binary message's bytes are not kept (nor counted once read).
                        (f.opcode, Vec::new(), len, Counted::none(counted))
                    });
                    continue;
                }
                OpCode::Text => Control::Text(f.payload, None, counted),
                OpCode::Continuation => match partial.as_mut() {
                    None => Control::Protocol("a continuation frame without a message"),
                    Some((op, bytes, len, message)) => {
                        *len += f.payload.len();
                        if *op == OpCode::Text {
                            // (Its capacity may run to twice what is counted while it grows.)
                            bytes.extend_from_slice(&f.payload);
                            message.absorb(counted);
                        }
                        if !f.fin {
                            continue;
                        }
                        match partial.take() {
                            Some((OpCode::Text, mut bytes, _, counted)) => {
                                if bytes.capacity() > bytes.len() + inbound::FREE_BYTES {
                                    // Grown by doubling: what is handed on is what is counted.
                                    bytes.shrink_to_fit();
                                }
                                Control::Text(bytes, None, counted)
                            }
                            _ => Control::Binary,
                        }
                    }
                },
                OpCode::Ping => Control::Ping(f.payload),
                OpCode::Close => Control::Close,
                OpCode::Binary => Control::Binary,
                // Pongs show the peer is alive.
                _ => Control::Heard,
            },
        };
        let msg = match msg {
            Control::Text(t, None, counted) if t.len() > PARSE_INLINE_BYTES => {
                let Ok(permit) = large.clone().acquire_owned().await else { return };
                Control::Text(t, Some(permit), counted)
            }
            other => other,
        };
        let last = matches!(
            msg,
            Control::Close
                | Control::TooBig
                | Control::OverBudget
                | Control::Stalled
                | Control::ReadError(_)
                | Control::Protocol(_)
        );
        let discard = match msg {
            Control::Protocol(_) => Some(DISCARD_AFTER_PROTOCOL_ERROR),
            Control::TooBig | Control::OverBudget => Some(DISCARD_AFTER_REFUSED_MESSAGE),
            _ => None,
        };
        if tx.send(msg).await.is_err() || last {
            if let Some(max) = discard {
                // The rest of the bad or refused frame, and what came after it, is not read as
                // frames; read and dropped while the close goes out (unread bytes at the
                // socket's close make the kernel reset the connection, and the client lose
                // the close frame). A message in progress goes first (its memory and its
                // budget). The session may take up to CLOSE_TIMEOUT to write the close, then
                // lingers as long.
                drop(partial.take());
                let _ = tokio::time::timeout(2 * CLOSE_TIMEOUT, rx.discard(max)).await;
            }
            return;
        }
    }
}

/// What the reader drops after a protocol error, at most, while the close frame goes out.
const DISCARD_AFTER_PROTOCOL_ERROR: usize = 64 * 1024;

/// What it drops after a message refused for its size or the memory budget: the rest of a
/// message a client library sent whole (up to the 10 MB limit and a little more), so that the
/// client reads the 1009 or 1013 rather than a reset. Read into no buffer, and bounded in time
/// as after a protocol error (in practice by the session's linger: the reader stops with it).
const DISCARD_AFTER_REFUSED_MESSAGE: usize = 12 << 20;

/// A filter's bytes that cost one `options_update` token ([`update_cost`]).
const UPDATE_BYTES_PER_TOKEN: usize = 64 << 10;

/// Seconds of `--max-options-updates-per-second` a connection banks, and the most one update
/// costs: a first large filter (as after `requireHello`), or a change of one now and then,
/// waits for nothing, and no update waits longer than this.
const UPDATE_BURST_SECONDS: f64 = 10.0;

/// What an `options_update` of `message_bytes` from `old` to `new` costs of
/// `--max-options-updates-per-second`: one token per 64 KiB of the message and of the two
/// filters as the filter budget counts them, at least one and at most `most`. Reading and
/// parsing it, building the filter, and taking the old one out of the live index and putting
/// the new one in cost ~17 ms of CPU for 10,000 DIDs each (such a filter counts ~2.2 MB, so
/// ~75 tokens): a client sending two large filters in turn cost ten of those a second per
/// connection, and now one every ~7 s; the message counts too, for one that parses to a small
/// filter (a DID repeated). An update waiting for its tokens is applied when they come, while
/// events flow under the old filter ([`Session::pending`]).
fn update_cost(message_bytes: usize, old: &Filter, new: &Filter, most: f64) -> f64 {
    let bytes = message_bytes + super::dispatch::filter_bytes(old) + super::dispatch::filter_bytes(new);
    (bytes as f64 / UPDATE_BYTES_PER_TOKEN as f64).clamp(1.0, most.max(1.0))
}

/// Counts one more in the second that started at `since` (a new second starts the count
/// again); whether the count is still within `max`.
fn per_second(count: &mut u32, since: &mut Instant, max: u32) -> bool {
    let now = Instant::now();
    if now.duration_since(*since) >= Duration::from_secs(1) {
        (*count, *since) = (0, now);
    }
    *count += 1;
    *count <= max
}

/// Parses and validates a client text message: `Ok(None)` for a type we ignore, the
/// accepted update, or the close reason and its text. O(message size) (DESIGN.md invariant 10).
fn parse_client_message(t: &[u8]) -> Result<Option<crate::options::Update>, (CloseReason, String)> {
    let text = std::str::from_utf8(t)
        .map_err(|e| (CloseReason::BadMessage, format!("failed to parse subscriber message: {e}")))?;
    crate::options::parse_client_message(text).map_err(|e| match e {
        MessageError::Json(text) => (CloseReason::BadMessage, text),
        MessageError::Options(OptionsError(text)) => (CloseReason::InvalidOptions, text),
    })
}

/// What a handshake accepted: everything a session needs to start.
pub struct Subscription {
    pub wire: Wire,
    pub filter: Filter,
    /// 0: no limit (v1: the JSON's length; v2: the whole message's).
    pub max_message_size: u64,
    /// Compress with this dictionary; `None`: plain text frames.
    pub dictionary: Option<Arc<super::compress::Dictionary>>,
    /// v1 only: cursor messages every this many seconds.
    pub inform_cursor_seconds: Option<u64>,
    /// v1 only: deliver nothing until an `options_update` arrives.
    pub require_hello: bool,
    /// v1: the cursor, judged at the start; v2 decides in its handshake ([`Self::start`]).
    pub cursor: Option<i64>,
    /// Where to start, when the handshake already decided it.
    pub start: Option<Start>,
    /// Messages sent before the first event (v2's `#info OutdatedCursor`).
    pub preface: Vec<Vec<u8>>,
    /// v1 only: each event carries `"verification":"…"`.
    pub include_verification: bool,
}

impl Subscription {
    /// A v1 `/subscribe` subscription.
    pub fn v1(opts: SubscribeOptions, dictionary: Option<Arc<super::compress::Dictionary>>) -> Self {
        Subscription {
            wire: Wire::V1,
            filter: opts.filter,
            max_message_size: opts.max_message_size,
            dictionary,
            inform_cursor_seconds: opts.inform_cursor_seconds,
            require_hello: opts.require_hello,
            cursor: opts.cursor,
            start: None,
            preface: Vec::new(),
            include_verification: opts.include_verification,
        }
    }
}

struct Session {
    hub: Arc<Hub>,
    /// The hub's shutdown, as a token of the session's own: every check of a token locks it, and
    /// the hub's one would be a lock all sessions share on every turn of their loops.
    shutdown: tokio_util::sync::CancellationToken,
    /// The hub's `stop_writes`, likewise: what ends a write under way (at shutdown, once what
    /// the log holds had its time to go out; see [`Session::send_what_is_stored`]).
    stop_writes: tokio_util::sync::CancellationToken,
    tx: FrameWriter,
    /// What the socket has shown (see `liveness`).
    progress: Arc<liveness::Progress>,
    filter: Arc<Filter>,
    /// The wire, the dictionary, the verification field and the size cap.
    encoding: Encoding,
    inform: Option<Duration>,
    next_inform: Instant,
    /// Set once delivery starts (after the hello, when `requireHello`).
    /// Declared before `slot`, so dropped first: what the stream owes the client's rate is paid
    /// while the slot still keeps the client's entry (and so its bucket).
    stream: Option<EventStream>,
    slot: super::limits::Slot,
    last_heard: Instant,
    /// Pings answered in the second that started at `pings_since` (see [`MAX_PINGS_PER_SECOND`]).
    pings: u32,
    pings_since: Instant,
    /// Messages ignored in the second that started at `ignored_since` ([`MAX_IGNORED_PER_SECOND`]).
    ignored: u32,
    ignored_since: Instant,
    last_ping: Instant,
    /// When the write buffer last went to the socket (for `--write-linger`).
    last_flush: Instant,
    /// Frames written to the buffer since the last flush.
    unflushed: bool,
    /// The `time_us` of the oldest live event written since the last flush
    /// (`contrail_hub_live_delay_seconds`).
    oldest_unflushed_live: Option<u64>,
    slow: SlowWatch,
    /// A close frame went out already (a refusal with its own text).
    close_sent: bool,
    /// Sending what is stored at shutdown ([`Session::send_what_is_stored`]).
    stopping: bool,
    /// Until when the client's address owes event-rate tokens ([`Session::take_tokens`]): no
    /// event goes out before it, while the timers, client messages and shutdown are heard.
    paced_until: Option<Instant>,
    /// Paces `options_update` messages.
    updates: super::limits::TokenBucket,
    /// An accepted `options_update` waiting for its tokens. Meanwhile the stream goes on under
    /// the old filter, and no other client message is read (the reader stops, so the client's
    /// writes back up; the pong deadline is not judged).
    pending: Option<PendingUpdate>,
    /// Per-event counters, resolved once (a label lookup per event would cost a hash and a
    /// lock on the fan-out hot path).
    events_sent: prometheus::IntCounter,
    bytes_sent: prometheus::IntCounter,
}

/// An `options_update` waiting for its tokens ([`Session::pending`]).
struct PendingUpdate {
    update: crate::options::Update,
    /// When its tokens are there.
    due: Instant,
    /// Its message's bytes stay counted, and a large one keeps the connection's one
    /// large-message permit, until it is applied: the parsed filter is not in the filter
    /// budget before then, and the reader must not take another large message meanwhile.
    _permit: Option<OwnedSemaphorePermit>,
    _held: Counted,
}

/// What the main loop does next.
enum Step {
    Shutdown,
    Control(Option<Control>),
    Tick,
    Deliver(Option<Next>),
    /// The event-rate tokens owed are paid: events may go out again.
    Paid,
}

/// Runs one subscriber until its connection ends.
pub async fn run(hub: Arc<Hub>, ws: fastwebsockets::WebSocket<Upgraded>, sub: Subscription, slot: super::limits::Slot) {
    // Nothing was read through `ws` yet (it is fresh from the upgrade): its stream is whole.
    let (r, w) = tokio::io::split(ws.into_inner());
    let rx = FrameReader::new(r, inbound::Counter::new(slot.message_bytes()));
    let w = Watched::new(w).counting_writes(hub.metrics.socket_writes.clone());
    let progress = w.progress();
    let tx = FrameWriter { io: tokio::io::BufWriter::with_capacity(WRITE_BUFFER, w), torn: false };
    // Small: the reader waits when the writer is busy, which is the back-pressure we want.
    let (ctl_tx, mut ctl) = mpsc::channel(CONTROL_QUEUE);
    let _reader = AbortOnDropHandle::new(tokio::spawn(read_loop(rx, ctl_tx, Arc::new(Semaphore::new(1)))));
    let labels = [sub.wire.as_str(), crate::metrics::Compression::of(sub.dictionary.is_some()).as_str()];
    let m = &hub.metrics;
    m.subscribers.with_label_values(&labels).inc();
    let now = Instant::now();
    let mut s = Session {
        hub: hub.clone(),
        shutdown: hub.shutdown.child_token(),
        stop_writes: hub.stop_writes.child_token(),
        tx,
        progress,
        filter: Arc::new(sub.filter),
        encoding: Encoding {
            wire: sub.wire,
            dictionary: sub.dictionary,
            include_verification: sub.include_verification,
            max_size: sub.max_message_size,
        },
        inform: sub.inform_cursor_seconds.map(Duration::from_secs),
        next_inform: now,
        stream: None,
        slot,
        last_heard: now,
        pings: 0,
        pings_since: now,
        ignored: 0,
        ignored_since: now,
        last_ping: now,
        last_flush: now,
        unflushed: false,
        oldest_unflushed_live: None,
        slow: SlowWatch::new(hub.config.slow_rule(), now),
        close_sent: false,
        stopping: false,
        paced_until: None,
        updates: {
            let rate = hub.config.max_options_updates_per_second as f64;
            super::limits::TokenBucket::with_burst(rate, rate * UPDATE_BURST_SECONDS)
        },
        pending: None,
        events_sent: m.events_sent.with_label_values(&labels),
        bytes_sent: m.bytes_sent.with_label_values(&labels),
    };
    let start = (sub.cursor, sub.start);
    let reason = s.serve(&mut ctl, start, sub.require_hello, sub.preface).await;
    let last_seen = s.stream.as_mut().map(EventStream::last_seen);
    let close_sent = s.close_sent;
    drop(s);
    m.subscribers.with_label_values(&labels).dec();
    m.closes.with_label_values(&[reason.as_str()]).inc();
    tracing::debug!(reason = reason.as_str(), last_seen, "subscriber closed");
    if close_sent {
        // Linger: read what the client still sends (its close reply, the rest of a flood) for
        // a moment before the socket goes (the reader's half keeps it open until `_reader`
        // drops). Closing with unread bytes makes the kernel reset the connection, and the
        // client would lose the close frame just sent.
        // A client still sending messages (not pings) after our close is not listening: a
        // second of its flood would cost a second of reading (measured with 10 MB messages,
        // `benches/hostile.rs`), so lingering stops at the first message over 64 KiB.
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            while let Some(c) = ctl.recv().await {
                match c {
                    Control::Close
                    | Control::ReadError(_)
                    | Control::Protocol(_)
                    | Control::Stalled
                    | Control::TooBig
                    | Control::OverBudget
                    | Control::FrameFlood
                    | Control::Binary => break,
                    Control::Text(t, ..) if t.len() > PARSE_INLINE_BYTES => break,
                    _ => {}
                }
            }
        })
        .await;
    }
}

impl Session {
    async fn serve(
        &mut self,
        ctl: &mut mpsc::Receiver<Control>,
        start: (Option<i64>, Option<Start>),
        require_hello: bool,
        preface: Vec<Vec<u8>>,
    ) -> CloseReason {
        let Err(mut reason) = self.serve_until_closed(ctl, start, require_hello, preface).await;
        if reason == CloseReason::WriteError && reader_saw_a_stall(ctl).await {
            reason = CloseReason::WriteTimeout;
        }
        if self.encoding.wire == Wire::V2 && !self.close_sent && !self.tx.torn {
            // v2 says why in an error frame before the socket goes.
            // Resume just after the last event this stream passed (cursors are inclusive).
            let resume = self.stream.as_mut().map_or(0, |s| s.last_seen() + 1);
            let error = match reason {
                CloseReason::TooSlow => Some((
                    "ConsumerTooSlow",
                    format!("reading below the floor rate far behind the tip; reconnect with cursor={resume}"),
                )),
                CloseReason::Internal => Some(("InternalError", "stream read failed; reconnect".to_string())),
                _ => None,
            };
            if let Some((name, text)) = error {
                let _ = self.send_message(contrail_core::v2::error_message(name, &text)).await;
                let _ = self.flush().await;
            }
        }
        if let (Some((code, text)), false) = (reason.frame(), self.close_sent) {
            self.close(code, text).await;
        }
        reason
    }

    async fn serve_until_closed(
        &mut self,
        ctl: &mut mpsc::Receiver<Control>,
        (cursor, start): (Option<i64>, Option<Start>),
        require_hello: bool,
        preface: Vec<Vec<u8>>,
    ) -> Result<std::convert::Infallible, CloseReason> {
        if require_hello {
            self.wait_for_hello(ctl).await?;
        }
        self.start(cursor, start);
        for message in preface {
            self.send_message(message).await?;
        }
        let shutdown = self.shutdown.clone();
        // Registered once, not anew on every turn of the loop.
        let shut = shutdown.cancelled();
        tokio::pin!(shut);
        let mut next_tick = Instant::now() + TICK;
        // One timer, moved only when the deadline does (not registered anew per delivery).
        let timer = tokio::time::sleep_until(self.next_deadline(next_tick));
        tokio::pin!(timer);
        // Replay frames per write: a batch, or a twentieth of a second of a paced client's rate
        // (so a page does not arrive as one burst after a long wait).
        let chunk =
            self.slot.bucket.as_ref().map_or(WRITE_BATCH, |b| ((b.rate() / 20.0) as usize).clamp(1, WRITE_BATCH));
        loop {
            let was_live = self.stream.as_ref().is_some_and(EventStream::is_live);
            let deadline = self.next_deadline(next_tick);
            if timer.deadline() != deadline || timer.is_elapsed() {
                timer.as_mut().reset(deadline);
            }
            let paced_until = self.paced();
            let stream = self.stream.as_mut().expect("started above");
            let step = tokio::select! {
                // The timer before the client's messages: messages that keep coming must not
                // hold back pings, the pong deadline or the slow rule.
                biased;
                _ = &mut shut => Step::Shutdown,
                _ = &mut timer => Step::Tick,
                c = ctl.recv(), if self.pending.is_none() => Step::Control(c),
                _ = tokio::time::sleep_until(paced_until.unwrap_or_else(Instant::now)), if paced_until.is_some() => Step::Paid,
                e = stream.next(chunk), if paced_until.is_none() => Step::Deliver(e),
            };
            match step {
                Step::Shutdown => {
                    self.send_what_is_stored(chunk).await?;
                    // Where the stream got to, for a client that resumes from cursor messages
                    // (its last one may be up to `informCursorSeconds` old). (A write the hub
                    // stopped leaves nothing more to say.)
                    if !self.stop_writes.is_cancelled() && self.send_cursor_message().await.is_ok() {
                        let _ = self.flush().await;
                    }
                    return Err(CloseReason::Shutdown);
                }
                Step::Control(c) => {
                    self.control(c).await?;
                }
                Step::Tick => {
                    self.apply_due()?;
                    // What already waits is heard before the deadlines are judged (a pong in the
                    // channel is an answer); at most a channel's worth, so this stays bounded.
                    for _ in 0..CONTROL_QUEUE {
                        if self.pending.is_some() {
                            break;
                        }
                        let Ok(c) = ctl.try_recv() else { break };
                        self.control(Some(c)).await?;
                    }
                    next_tick = Instant::now() + TICK;
                    self.tick().await?;
                }
                Step::Deliver(Some(Next::Event(ev))) => {
                    self.deliver_ready(ev).await?;
                    self.linger().await?;
                }
                Step::Deliver(Some(Next::Frames(frames))) => self.deliver_frames(frames).await?,
                Step::Deliver(Some(Next::Gap(gap))) => self.tell_gap(gap).await?,
                Step::Deliver(None) => return Err(CloseReason::Internal),
                Step::Paid => {}
            }
            self.flush().await?;
            if let Some(stream) = self.stream.as_ref().filter(|s| was_live && !s.is_live()) {
                // Back to the log: the slow rule's window starts now, not at the last tick
                // (which may be a ping interval ago).
                self.slow.restart(Instant::now(), stream.passed());
            }
        }
    }

    /// At shutdown: the stream goes on until it has passed the log's last event, for at most
    /// the hub's `sending_at_shutdown` ([`super::shutdown_windows`]). The sequencer wrote and
    /// published its last batch before the hub's shutdown, so a live subscriber gets it before
    /// its 1001 (it would otherwise wait in its queue, and reach the client only on its
    /// reconnect); one behind gets a little more of its replay. A client not reading holds this
    /// up only until the hub stops writes.
    async fn send_what_is_stored(&mut self, chunk: usize) -> Result<(), CloseReason> {
        let Some(last) = self.hub.tip.newest() else { return Ok(()) };
        let until = Instant::now() + self.hub.sending_at_shutdown;
        // Not paced by the client's event rate meanwhile: a wait for its tokens is not checked
        // against `until` (all of one address's connections taking a chunk each at once would
        // hold shutdown up for seconds); `until` bounds what goes out unpaced.
        self.stopping = true;
        self.paced_until = None;
        let stop = self.stop_writes.clone();
        loop {
            let stream = self.stream.as_mut().expect("started before the loop");
            if stream.last_seen() >= last {
                return Ok(());
            }
            // A live stream is woken only for events its filter wants: that the dispatcher has
            // passed the last event is seen by looking again (`last_seen`), every few ms.
            let next = tokio::select! {
                biased;
                _ = stop.cancelled() => return Ok(()),
                _ = tokio::time::sleep_until(until) => return Ok(()),
                _ = tokio::time::sleep(SHUTDOWN_LOOK) => continue,
                e = stream.next(chunk) => e,
            };
            match next {
                Some(Next::Event(ev)) => self.deliver_ready(ev).await?,
                Some(Next::Frames(frames)) => self.deliver_frames(frames).await?,
                Some(Next::Gap(gap)) => self.tell_gap(gap).await?,
                None => return Ok(()),
            }
            self.flush().await?;
        }
    }

    /// When the timers next need a look: the ping, pong and cursor-message deadlines, and every
    /// [`TICK`] while the stream reads the log (the slow rule).
    fn next_deadline(&self, next_tick: Instant) -> Instant {
        let config = &self.hub.config;
        let mut at = self.last_ping + config.ping_interval;
        // (Not judged while an update waits: a deadline in the past would fire at once, again
        // and again, and hold back the stream.)
        if self.pending.is_none() {
            at = at.min(self.pong_deadline() + TICK);
        }
        if self.inform.is_some() {
            at = at.min(self.next_inform);
        }
        if let Some(p) = &self.pending {
            at = at.min(p.due);
        }
        if !self.stream.as_ref().is_some_and(EventStream::is_live) {
            at = at.min(next_tick);
        }
        at
    }

    /// With `--write-linger`, a live subscriber that was written to less than the linger ago
    /// waits out the rest of it and takes what arrived meanwhile, so busy subscribers get
    /// several events per write; the first event after a quiet spell leaves at once.
    async fn linger(&mut self) -> Result<(), CloseReason> {
        let linger = self.hub.config.write_linger;
        if linger.is_zero() || !self.stream.as_ref().is_some_and(EventStream::is_live) {
            return Ok(());
        }
        let until = self.last_flush + linger;
        if Instant::now() >= until {
            return Ok(());
        }
        tokio::time::sleep_until(until).await;
        // What is ready, up to what a live queue holds: a queue refilling as fast as this
        // drains must not keep control messages and timers waiting.
        for _ in 0..super::dispatch::QUEUE_EVENTS {
            if self.paced().is_some() {
                break;
            }
            match self.stream.as_mut().and_then(EventStream::next_ready) {
                Some(ev) => self.deliver(ev).await?,
                None => break,
            }
        }
        Ok(())
    }

    /// Takes the start point, decided against the log's tip (see [`Start::for_cursor`]).
    fn start(&mut self, cursor: Option<i64>, decided: Option<Start>) {
        let hub = &self.hub;
        let start = decided.unwrap_or_else(|| Start::for_cursor(cursor, hub.tip.newest(), crate::clock::now_us()));
        let metrics = StreamMetrics {
            replay_reads: hub.metrics.replay_reads.clone(),
            lagging: hub.metrics.lagging_subscribers.clone(),
            overtaken: hub.metrics.replay_overtaken.clone(),
            cursor_before_log: hub.metrics.cursors_before_log.clone(),
            holes_told: hub.metrics.holes_told.clone(),
        };
        self.stream = Some(EventStream::new(
            hub.log.clone(),
            &hub.tip,
            hub.dispatcher.clone(),
            Replay {
                pages: hub.replay_pages.clone(),
                budget: hub.replay_budget.clone(),
                client: hub.replay_budget.client(self.slot.client_key()),
                rate: self.slot.bucket.clone(),
            },
            self.filter.clone(),
            self.encoding.clone(),
            start,
            metrics,
        ));
        // The slow rule judges the stream from its start: not the wait for a hello before it.
        self.slow.restart(Instant::now(), 0);
    }

    async fn wait_for_hello(&mut self, ctl: &mut mpsc::Receiver<Control>) -> Result<(), CloseReason> {
        let shutdown = self.shutdown.clone();
        let mut tick = tokio::time::interval(TICK);
        loop {
            let due = self.pending.as_ref().map(|p| p.due);
            let hello = tokio::select! {
                _ = shutdown.cancelled() => return Err(CloseReason::Shutdown),
                _ = tick.tick() => self.tick().await.map(|()| false)?,
                _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => self.apply_due()?,
                c = ctl.recv(), if due.is_none() => self.control(c).await?,
            };
            // Pings and pongs written while waiting must reach the client.
            self.flush().await?;
            if hello {
                return Ok(()); // the hello: an accepted options_update
            }
        }
    }

    /// Delivers `ev` and then whatever else is ready without waiting (up to a batch), so a
    /// burst leaves in few syscalls; the caller flushes.
    async fn deliver_ready(&mut self, ev: Arc<Event>) -> Result<(), CloseReason> {
        self.deliver(ev).await?;
        for _ in 1..WRITE_BATCH {
            if self.paced().is_some() {
                break;
            }
            match self.stream.as_mut().and_then(EventStream::next_ready) {
                Some(ev) => self.deliver(ev).await?,
                None => break,
            }
        }
        Ok(())
    }

    async fn deliver(&mut self, ev: Arc<Event>) -> Result<(), CloseReason> {
        let Some((opcode, payload)) = self.encoding.message(&ev) else {
            // Over the size cap: skipped.
            self.stream.as_mut().expect("delivering after start").advance(ev.time_us);
            return Ok(());
        };
        self.take_tokens(1);
        let len = payload.len() as u64;
        self.write(super::encode::frame(opcode, payload)).await?;
        if let Some(s) = self.stream.as_mut() {
            s.advance(ev.time_us);
            if s.is_live() {
                self.oldest_unflushed_live.get_or_insert(ev.time_us);
            }
        }
        self.events_sent.inc();
        self.bytes_sent.inc_by(len);
        Ok(())
    }

    /// Writes a replay page's frames as they are (rendered once for every replayer with this
    /// filter and encoding).
    async fn deliver_frames(&mut self, frames: Frames) -> Result<(), CloseReason> {
        self.take_tokens(frames.count());
        self.unflushed = true;
        let (limit, len) = self.write_bound(frames.bytes().len());
        within(limit, len, &self.progress, &self.stop_writes, self.tx.framed(frames.bytes())).await?;
        if let Some(s) = self.stream.as_mut() {
            s.advance(frames.through);
        }
        self.events_sent.inc_by(frames.count() as u64);
        self.bytes_sent.inc_by(frames.payload_bytes() as u64);
        Ok(())
    }

    /// Tells the subscriber of events its stream could not send (the log no longer held
    /// them, or never had them: a hole), before anything after them: v2 in an `#info
    /// OutdatedCursor` (with the range in `afterSeq` and `throughSeq`); v1 only to a client
    /// that asked for cursor messages (a strict v1 client knows no other kinds), as
    /// `{"kind":"gap","after_us":A,"through_us":B}`.
    async fn tell_gap(&mut self, Gap { after, through, cause }: Gap) -> Result<(), CloseReason> {
        let message = match self.encoding.wire {
            Wire::V2 => {
                let why = match cause {
                    GapCause::Deleted => "were deleted before they were sent",
                    GapCause::NeverReceived => "never reached this server (its upstreams lost them)",
                };
                contrail_core::v2::outdated_cursor_message(
                    after,
                    through,
                    &format!("events after seq {after} through seq {through} {why}; continuing after them"),
                )
            }
            Wire::V1 if self.inform.is_some() => {
                format!(r#"{{"kind":"gap","after_us":{after},"through_us":{through}}}"#).into_bytes()
            }
            Wire::V1 => return Ok(()),
        };
        self.send_message(message).await
    }

    /// Takes `n` events' worth of the client IP's event rate, if it has one (not at shutdown:
    /// see [`Session::send_what_is_stored`]). What it owes is waited for after these events,
    /// before the next ([`Session::paced`]), in the session's loop: a wait inside a write step
    /// heard nothing meanwhile, and a live subscriber of one busy address, its queue never
    /// empty, could spend a batch of 256 events there, minutes without a ping, a cursor
    /// message or its shutdown.
    fn take_tokens(&mut self, n: usize) {
        if self.stopping {
            return;
        }
        let wait = self.slot.bucket.as_ref().map_or(Duration::ZERO, |b| b.take_n(n as f64));
        if !wait.is_zero() {
            self.paced_until = Some(Instant::now() + wait);
        }
    }

    /// Until when no event may go out, if the client's address still owes tokens.
    fn paced(&mut self) -> Option<Instant> {
        let until = self.paced_until?;
        if until > Instant::now() {
            return Some(until);
        }
        self.paced_until = None;
        None
    }

    /// Sends a message that is not an event (a cursor message, an info or error frame):
    /// compressed like this subscriber's events.
    async fn send_message(&mut self, message: Vec<u8>) -> Result<(), CloseReason> {
        let frame = match &self.encoding.dictionary {
            Some(dict) => Frame::binary(Payload::Owned(dict.compress(&message))),
            None => Frame::text(Payload::Owned(message)),
        };
        self.write(frame).await
    }

    async fn flush(&mut self) -> Result<(), CloseReason> {
        if !std::mem::take(&mut self.unflushed) {
            return Ok(());
        }
        self.last_flush = Instant::now();
        let (limit, len) = self.write_bound(0);
        within(limit, len, &self.progress, &self.stop_writes, self.tx.flush()).await?;
        if let Some(t) = self.oldest_unflushed_live.take() {
            // Wall clock against wall clock. A `time_us` ahead of the clock (a burst stamped
            // faster than 1 µs apart, a clock stepped back) says nothing: not recorded as 0.
            if let Some(d) = crate::clock::now_us().checked_sub(t) {
                self.hub.metrics.live_delay.observe(d as f64 / 1e6);
            }
        }
        Ok(())
    }

    /// [`within`]'s limit, and the length of a write of `more` bytes after what the buffer
    /// already holds (which goes first).
    fn write_bound(&self, more: usize) -> (Duration, usize) {
        (self.hub.config.write_timeout.max(self.hub.config.slow_window), self.tx.io.buffer().len() + more)
    }

    /// When a client that has sent nothing is closed: `--pong-timeout` after it was last heard
    /// from, or after its connection was last backed up, whichever is later. A client behind on
    /// its reading answers pings late — they wait behind the data it has not read — and while it
    /// is behind, the kernel judges whether it is alive ([`within`]).
    fn pong_deadline(&self) -> Instant {
        let heard = self.last_heard.max(self.tx.backed_up_at().unwrap_or(self.last_heard));
        heard + self.hub.config.pong_timeout
    }

    async fn write(&mut self, frame: Frame<'_>) -> Result<(), CloseReason> {
        self.unflushed = true;
        let (limit, len) = self.write_bound(MAX_HEAD + frame.payload.len());
        within(limit, len, &self.progress, &self.stop_writes, self.tx.frame(frame)).await
    }

    /// Sends a close frame (best effort) with a reason cut to the 123 bytes a close frame holds.
    async fn close(&mut self, code: u16, reason: &str) {
        if self.tx.torn {
            return;
        }
        self.close_sent = true;
        let mut end = reason.len().min(123);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        let frame = Frame::close(code, &reason.as_bytes()[..end]);
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            self.tx.frame(frame).await?;
            self.tx.flush().await
        })
        .await;
    }

    /// Closes with `reason`'s code and a text of our own (the reason a message was refused).
    async fn refuse(&mut self, reason: CloseReason, text: &str) -> CloseReason {
        let (code, _) = reason.frame().expect("refusals have a close frame");
        self.close(code, text).await;
        reason
    }

    /// Handles what the reader half reported; `Ok(true)` when an `options_update` was applied.
    async fn control(&mut self, c: Option<Control>) -> Result<bool, CloseReason> {
        self.last_heard = Instant::now();
        match c {
            None | Some(Control::Close) => Err(CloseReason::ClientClosed),
            Some(Control::ReadError(e)) => {
                tracing::debug!(error = %e, "subscriber read failed");
                Err(CloseReason::ReadError)
            }
            Some(Control::Protocol(what)) => Err(self.refuse(CloseReason::ProtocolError, what).await),
            Some(Control::TooBig) => Err(CloseReason::MessageTooBig),
            Some(Control::OverBudget) => Err(CloseReason::MessageBudget),
            Some(Control::FrameFlood) => Err(CloseReason::MessageFlood),
            Some(Control::Stalled) => Err(CloseReason::WriteTimeout),
            Some(Control::Heard) => self.ignore(),
            // v2 is server-push only: any data frame ends the connection (as v2 does).
            Some(Control::Text(..) | Control::Binary) if self.encoding.wire == Wire::V2 => {
                Err(CloseReason::UnexpectedMessage)
            }
            Some(Control::Binary) => self.ignore(), // as in v1
            Some(Control::Ping(payload)) => {
                if !per_second(&mut self.pings, &mut self.pings_since, MAX_PINGS_PER_SECOND) {
                    return Err(CloseReason::PingFlood);
                }
                self.write(Frame::pong(Payload::Owned(payload))).await.map(|()| false)
            }
            // The permit and the hold go when the message has been handled (applied, for one
            // that waits for its tokens).
            Some(Control::Text(t, large, held)) => {
                let message_bytes = t.len();
                let parsed = if t.len() <= PARSE_INLINE_BYTES {
                    parse_client_message(&t)
                } else {
                    // The process's turn is taken here, not by the reader: only this session
                    // waits for it (a session stuck writing must not hold one).
                    let _turn = large_parses().acquire().await;
                    tokio::task::spawn_blocking(move || parse_client_message(&t))
                        .await
                        .unwrap_or_else(|_| Err((CloseReason::Internal, "internal error".into())))
                };
                match parsed {
                    Ok(None) => self.ignore(), // not an options_update: ignored, as in v1
                    Ok(Some(u)) => {
                        let cost = update_cost(message_bytes, &self.filter, &u.filter, self.updates.burst());
                        let wait = self.updates.take_n(cost);
                        if wait.is_zero() {
                            return self.apply(u);
                        }
                        // Faster than allowed: applied when its tokens are there (the stream
                        // goes on meanwhile); nobody else waits.
                        let due = Instant::now() + wait;
                        self.pending = Some(PendingUpdate { update: u, due, _permit: large, _held: held });
                        Ok(false)
                    }
                    Err((reason, text)) => Err(self.refuse(reason, &text).await),
                }
            }
        }
    }

    /// Applies the waiting update if its tokens are there; whether it did.
    fn apply_due(&mut self) -> Result<bool, CloseReason> {
        match self.pending.take() {
            Some(p) if Instant::now() >= p.due => self.apply(p.update),
            waiting => {
                self.pending = waiting;
                Ok(false)
            }
        }
    }

    /// Applies an accepted `options_update` (`Ok(true)`), or closes when the filter budget
    /// cannot hold its filter.
    fn apply(&mut self, u: crate::options::Update) -> Result<bool, CloseReason> {
        if self.slot.hold_filter(super::dispatch::filter_bytes(&u.filter)).is_err() {
            // Closed with 1013: its old filter stays counted until then.
            return Err(CloseReason::FilterBudget);
        }
        let include_sync = u.include_sync.unwrap_or(self.filter.kinds().contains(EventKind::Sync));
        let kinds = if include_sync { Kinds::ALL } else { Kinds::V1_DEFAULT };
        self.filter = Arc::new(u.filter.with_kinds(kinds));
        self.encoding.max_size = u.max_message_size;
        if let Some(i) = u.inform_cursor_seconds {
            self.inform = i.map(Duration::from_secs);
            // The new interval counts from now, not from the old one's next.
            self.next_inform = Instant::now() + self.inform.unwrap_or_default();
        }
        if let Some(s) = self.stream.as_mut() {
            s.set_filter(self.filter.clone(), self.encoding.clone());
        }
        // Heard: its messages are read again from here.
        self.last_heard = Instant::now();
        Ok(true)
    }

    /// A message the server ignores, counted against [`MAX_IGNORED_PER_SECOND`].
    fn ignore(&mut self) -> Result<bool, CloseReason> {
        if per_second(&mut self.ignored, &mut self.ignored_since, MAX_IGNORED_PER_SECOND) {
            Ok(false)
        } else {
            Err(CloseReason::MessageFlood)
        }
    }

    /// A cursor message (the stream's position, and whether it is live), to a client that
    /// asked for them.
    async fn send_cursor_message(&mut self) -> Result<(), CloseReason> {
        if self.inform.is_none() {
            return Ok(());
        }
        let Some(stream) = self.stream.as_mut() else { return Ok(()) };
        let (t, live) = (stream.last_seen(), stream.caught_up());
        let msg = format!(r#"{{"kind":"cursor","time_us":{t},"live":{live}}}"#);
        self.send_message(msg.into_bytes()).await
    }

    async fn tick(&mut self) -> Result<(), CloseReason> {
        let now = Instant::now();
        let config = &self.hub.config;
        // (Not while an update waits: the client's messages, a pong among them, are not read.)
        if self.pending.is_none() && now > self.pong_deadline() {
            return Err(CloseReason::PingTimeout);
        }
        if now.duration_since(self.last_ping) >= config.ping_interval {
            self.last_ping = now;
            self.write(Frame::new(true, OpCode::Ping, None, Payload::Borrowed(b""))).await?;
        }
        if let Some(every) = self.inform.filter(|_| now >= self.next_inform) {
            self.next_inform = now + every;
            self.send_cursor_message().await?;
        }
        if let Some(stream) = self.stream.as_mut() {
            if let Some(since) = stream.waiting_for_room() {
                // Held back by the server (the replay budget), not by its own reading; past the
                // timeout it is told to come back later rather than wait on, silent.
                if now.duration_since(since) >= self.hub.config.replay_room_timeout {
                    return Err(CloseReason::ReplayBudget);
                }
                self.slow.restart(now, stream.passed());
                return Ok(());
            }
            let newest = self.hub.tip.newest().unwrap_or(0);
            let progress = Progress {
                passed: stream.passed(),
                behind: Duration::from_micros(newest.saturating_sub(stream.last_seen())),
                live: stream.is_live(),
            };
            if self.slow.check(now, progress) {
                return Err(CloseReason::TooSlow);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_update_between_large_filters_costs_in_proportion_to_them() {
        let dids = |tag: char| (0..10_000).map(|i| format!("did:plc:{tag}{i:023}")).collect::<Vec<_>>();
        let filter = |dids: &[String]| Filter::new(&[], dids).unwrap();
        let (empty, one, a, b) = (filter(&[]), filter(&dids('c')[..1]), filter(&dids('a')), filter(&dids('b')));
        // At the default 10 a second.
        let most = 10.0 * UPDATE_BURST_SECONDS;
        assert_eq!(update_cost(100, &empty, &one, most), 1.0, "a small update: one token");
        let first = update_cost(370_000, &empty, &a, most);
        assert!(first > 10.0 && first <= most, "{first}: a first large filter, within the bank");
        // One change between large filters every few seconds, not ten a second.
        let big = update_cost(370_000, &a, &b, most);
        assert!((50.0..most).contains(&big), "{big}: in proportion to the two filters (~4.4 MB)");
        assert_eq!(update_cost(370_000, &a, &b, 10.0), 10.0, "at most the bank");
        // A large message that parses to a small filter (one DID, repeated) costs its size.
        assert_eq!(update_cost(9_000_000, &empty, &one, most), most);
    }
}
