//! The `/subscribe` hub: Jetstream v1's wire, without v1's bugs, plus cursor messages.
//!
//! Every subscriber is one cursor walking one ordered sequence (DESIGN.md invariant 4): it
//! reads the log from its cursor, then the broadcast ring; when the ring has moved past it, it
//! reads the log again. The only rule is "send the next event with `time_us` > last seen".
//! The ring receiver is created before the first log read, and events reach the ring only
//! after they are persisted, so log ∪ ring covers every event: no gap, no duplicate, no
//! reordering. No subscriber has a queue of its own: a slow one simply reads the log.
//!
//! The v1 contract, one bullet per behaviour, with the test that pins it
//! (`tests/subscribe.rs` unless named otherwise):
//! - Query: `wantedCollections` (repeated, ≤ 100, NSIDs or `prefix.*`), `wantedDids`
//!   (repeated, ≤ 10,000 unique, strict syntax), `cursor` (unix µs, inclusive; future = live;
//!   older than the log = from the oldest event), `compress=true` or a `Socket-Encoding`
//!   header containing `zstd`, `requireHello=true`, `maxMessageSizeBytes` — `query_errors_are_400s`,
//!   `filters_select_events`, `hub::options` unit tests.
//! - Bad input is an HTTP 400 with v1's plain-text reason before the upgrade —
//!   `query_errors_are_400s`.
//! - Identity and account events bypass `wantedCollections`, not `wantedDids` —
//!   `filters_select_events`.
//! - `options_update` replaces the filters and the size cap; invalid → close 1008 with the
//!   reason; bad JSON → 1007; unknown types ignored; messages over 10 MB → 1009 —
//!   `options_update_replaces_filters`, `bad_client_messages_close_with_codes`.
//! - `requireHello` holds all delivery until the first valid `options_update`; nothing is
//!   buffered before it — `require_hello_holds_delivery`.
//! - Text frames carry JSON; with compression, Binary frames each carry one independent zstd
//!   frame, built once per event and shared — `compressed_frames_decode_with_the_dictionary`,
//!   `tests/third_party.rs`.
//! - Replay → live with no gap, duplicate or reordering under ingest —
//!   `handoff_under_ingest_is_exact`.
//! - Ping every 30 s; a peer that answers nothing is closed after the pong timeout; a write
//!   that cannot finish in the write timeout closes the subscriber — `dead_peer_is_closed`.
//!
//! Beyond v1 (opt-in, so strict v1 clients never see them): `informCursorSeconds=N` sends
//! `{"kind":"cursor","time_us":T}` every N s, T being the last event this stream has passed
//! (delivered or filtered out) — `cursor_messages_report_progress`.
//!
//! Deliberate differences from v1 are listed in the README's compatibility section.

pub mod compress;
pub mod limits;
pub mod options;

use crate::app::Shared;
use crate::event::{view_value, Event};
use crate::server::{text, Body};
use compress::Dictionary;
use fastwebsockets::{FragmentCollectorRead, Frame, OpCode, Payload, WebSocketError};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use limits::{client_ip, Admission, IpNet, Refused, Slot};
use options::{ClientMessage, Filter, OptionsError, OptionsUpdate, SubscribeOptions};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Client messages larger than this close the connection with 1009 (v1 documents 10 MB).
pub const MAX_CLIENT_MESSAGE_BYTES: usize = 10_000_000;
/// Events read from the log per batch: large enough to amortise the read, small enough
/// (~1 MB) to keep a replaying subscriber's memory flat.
const REPLAY_BATCH: usize = 1024;
/// Per-subscriber write buffer (memory per subscriber, allocated on first write).
const WRITE_BUFFER: usize = 16 * 1024;
/// Most events written before the buffer is flushed, when more are ready at once.
const WRITE_BATCH: usize = 256;
/// How often timers (ping, cursor messages, slow check) are looked at: 1 s keeps 10,000 idle
/// subscribers at 10,000 wake-ups a second, and every timer here counts in seconds.
const TICK: Duration = Duration::from_secs(1);

/// Timing and policy knobs, from the configuration.
#[derive(Debug, Clone)]
pub struct HubOptions {
    pub ping_interval: Duration,
    /// Close a subscriber we have heard nothing from (not even a pong) for this long.
    pub pong_timeout: Duration,
    /// Close a subscriber when one frame cannot be written for this long.
    pub write_timeout: Duration,
    /// A subscriber reading the log, further behind the newest event than `slow_behind` and
    /// passing fewer than `slow_min_rate` events/s over `slow_window`, is closed.
    pub slow_window: Duration,
    pub slow_min_rate: f64,
    pub slow_behind: Duration,
    pub trusted_proxies: Vec<IpNet>,
}

pub struct Hub {
    pub dictionary: Arc<Dictionary>,
    pub admission: Arc<Admission>,
    /// Cancelled at shutdown: every subscriber closes with 1001.
    pub shutdown: CancellationToken,
    /// Every subscriber task, so shutdown can wait for them.
    pub tasks: TaskTracker,
    pub opts: HubOptions,
}

/// Close reasons, as metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    ClientClosed,
    Shutdown,
    TooSlow,
    PingTimeout,
    WriteTimeout,
    WriteError,
    ReadError,
    InvalidOptions,
    BadMessage,
    MessageTooBig,
    Internal,
}

impl CloseReason {
    pub const ALL: [CloseReason; 11] = [
        CloseReason::ClientClosed,
        CloseReason::Shutdown,
        CloseReason::TooSlow,
        CloseReason::PingTimeout,
        CloseReason::WriteTimeout,
        CloseReason::WriteError,
        CloseReason::ReadError,
        CloseReason::InvalidOptions,
        CloseReason::BadMessage,
        CloseReason::MessageTooBig,
        CloseReason::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::ClientClosed => "client_closed",
            CloseReason::Shutdown => "shutdown",
            CloseReason::TooSlow => "too_slow",
            CloseReason::PingTimeout => "ping_timeout",
            CloseReason::WriteTimeout => "write_timeout",
            CloseReason::WriteError => "write_error",
            CloseReason::ReadError => "read_error",
            CloseReason::InvalidOptions => "invalid_options",
            CloseReason::BadMessage => "bad_message",
            CloseReason::MessageTooBig => "message_too_big",
            CloseReason::Internal => "internal",
        }
    }
}

/// `GET /subscribe`: validate everything, then upgrade.
pub async fn subscribe(shared: Arc<Shared>, mut req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    let m = &shared.metrics;
    let hub = &shared.hub;
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let opts = match SubscribeOptions::from_query(req.uri().query().unwrap_or(""), header("socket-encoding").as_deref())
    {
        Ok(o) => o,
        Err(OptionsError(reason)) => {
            m.rejected_requests.with_label_values(&["bad_request"]).inc();
            return text(StatusCode::BAD_REQUEST, reason);
        }
    };
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        m.rejected_requests.with_label_values(&["not_websocket"]).inc();
        return text(
            StatusCode::BAD_REQUEST,
            "websocket upgrade required: connect to /subscribe with a websocket client\n",
        );
    }
    if hub.shutdown.is_cancelled() {
        return text(StatusCode::SERVICE_UNAVAILABLE, "server shutting down\n");
    }
    let ip = client_ip(peer, header("x-forwarded-for").as_deref(), &hub.opts.trusted_proxies);
    let slot = match hub.admission.admit(ip) {
        Ok(s) => s,
        Err(Refused::TooManySubscribers) => {
            m.rejected_requests.with_label_values(&["too_many_subscribers"]).inc();
            return text(StatusCode::SERVICE_UNAVAILABLE, "too many subscribers; try another instance or later\n");
        }
        Err(Refused::TooManyFromIp) => {
            m.rejected_requests.with_label_values(&["too_many_from_ip"]).inc();
            return text(StatusCode::TOO_MANY_REQUESTS, "too many connections from this address\n");
        }
    };
    let (response, upgrade) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(x) => x,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("bad websocket handshake: {e}\n")),
    };
    let task_shared = shared.clone();
    hub.tasks.spawn(async move {
        match upgrade.await {
            Ok(ws) => Subscriber::run(task_shared, ws, opts, slot).await,
            Err(e) => tracing::debug!(error = %e, "websocket upgrade failed"),
        }
    });
    response.map(|b| b.boxed())
}

type Upgraded = TokioIo<hyper::upgrade::Upgraded>;
/// Writes go through a buffer: events that are ready together leave in one syscall.
type WsWrite = fastwebsockets::WebSocketWrite<tokio::io::BufWriter<tokio::io::WriteHalf<Upgraded>>>;
type WsRead = FragmentCollectorRead<tokio::io::ReadHalf<Upgraded>>;

/// What the reader half reports.
enum Control {
    Text(Vec<u8>),
    Ping(Vec<u8>),
    Heard,
    Close,
    TooBig,
    ReadError(String),
}

/// Aborts the reader task when the subscriber ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn read_loop(mut rx: WsRead, tx: mpsc::Sender<Control>) {
    loop {
        // Auto-pong and auto-close are off: control frames come back here and the writer
        // answers them, so the send function is never called.
        let frame = rx.read_frame(&mut |_: Frame<'_>| async { Ok::<(), std::io::Error>(()) }).await;
        let msg = match frame {
            Ok(f) => match f.opcode {
                OpCode::Text => Control::Text(f.payload.to_vec()),
                OpCode::Ping => Control::Ping(f.payload.to_vec()),
                OpCode::Close => Control::Close,
                // Binary messages are ignored, as in v1; they still show the peer is alive.
                _ => Control::Heard,
            },
            Err(WebSocketError::FrameTooLarge) => Control::TooBig,
            Err(e) => Control::ReadError(e.to_string()),
        };
        let last = matches!(msg, Control::Close | Control::TooBig | Control::ReadError(_));
        if tx.send(msg).await.is_err() || last {
            return;
        }
    }
}

/// A batch read from the log for one subscriber: the events its filter wants, and the last
/// `time_us` scanned (`None` when the log had nothing at or after the start).
struct LogBatch {
    events: Vec<Arc<Event>>,
    scanned: usize,
    scanned_until: Option<u64>,
}

fn read_log(shared: &Shared, from: u64, filter: &Filter) -> Result<LogBatch, crate::store::StoreError> {
    let mut events = Vec::new();
    let mut last = None;
    let mut corrupt = false;
    let scanned = shared.store.scan(from, REPLAY_BATCH, |t, v| {
        last = Some(t);
        match view_value(v) {
            Some(view) => {
                if filter.matches(view.kind, view.did, view.collection) {
                    match Event::decode_value(t, v) {
                        Some(e) => events.push(Arc::new(e)),
                        None => corrupt = true,
                    }
                }
            }
            None => corrupt = true,
        }
        !corrupt
    })?;
    if corrupt {
        return Err(crate::store::StoreError::Corrupt("event value"));
    }
    Ok(LogBatch { events, scanned, scanned_until: last })
}

struct Subscriber {
    shared: Arc<Shared>,
    tx: WsWrite,
    filter: Filter,
    max_size: u64,
    compress: bool,
    inform: Option<Duration>,
    next_inform: Instant,
    /// The stream position: every event up to here was delivered or filtered out.
    last_seen: u64,
    ring: Option<broadcast::Receiver<Arc<Event>>>,
    /// Reading the ring (true) or the log (false).
    live: bool,
    buffer: VecDeque<Arc<Event>>,
    buffer_until: u64,
    fetch: Option<tokio::task::JoinHandle<Result<LogBatch, crate::store::StoreError>>>,
    slot: Slot,
    last_heard: Instant,
    last_ping: Instant,
    passed: u64,
    window: (Instant, u64),
    /// Per-event counters, resolved once (a label lookup per event would cost a hash and a
    /// lock on the fan-out hot path).
    events_sent: prometheus::IntCounter,
    bytes_sent: prometheus::IntCounter,
}

/// What the main loop does next.
enum Step {
    Shutdown,
    Control(Option<Control>),
    Tick,
    Deliver(Option<Arc<Event>>),
}

impl Subscriber {
    async fn run(shared: Arc<Shared>, ws: fastwebsockets::WebSocket<Upgraded>, opts: SubscribeOptions, slot: Slot) {
        let (mut rx, tx) = ws.split(|io| {
            let (r, w) = tokio::io::split(io);
            (r, tokio::io::BufWriter::with_capacity(WRITE_BUFFER, w))
        });
        rx.set_auto_pong(false);
        rx.set_auto_close(false);
        // fastwebsockets refuses a frame of exactly its limit; 10 MB itself is allowed.
        rx.set_max_message_size(MAX_CLIENT_MESSAGE_BYTES + 1);
        // Small: the reader waits when the writer is busy, which is the back-pressure we want.
        let (ctl_tx, mut ctl) = mpsc::channel(16);
        let _reader = AbortOnDrop(tokio::spawn(read_loop(FragmentCollectorRead::new(rx), ctl_tx)));
        let label = if opts.compress { "zstd" } else { "none" };
        shared.metrics.subscribers.with_label_values(&[label]).inc();
        let now = Instant::now();
        let mut s = Subscriber {
            shared: shared.clone(),
            tx,
            filter: opts.filter,
            max_size: opts.max_message_size,
            compress: opts.compress,
            inform: opts.inform_cursor_seconds.map(Duration::from_secs),
            next_inform: now,
            last_seen: 0,
            ring: None,
            live: false,
            buffer: VecDeque::new(),
            buffer_until: 0,
            fetch: None,
            slot,
            last_heard: now,
            last_ping: now,
            passed: 0,
            window: (now, 0),
            events_sent: shared.metrics.events_sent.with_label_values(&[label]),
            bytes_sent: shared.metrics.bytes_sent.with_label_values(&[label]),
        };
        let reason = s.serve(&mut ctl, opts.cursor, opts.require_hello).await;
        if !s.live && s.ring.is_some() {
            shared.metrics.lagging_subscribers.dec();
        }
        shared.metrics.subscribers.with_label_values(&[label]).dec();
        shared.metrics.closes.with_label_values(&[reason.as_str()]).inc();
        tracing::debug!(reason = reason.as_str(), last_seen = s.last_seen, "subscriber closed");
    }

    async fn serve(
        &mut self,
        ctl: &mut mpsc::Receiver<Control>,
        cursor: Option<i64>,
        require_hello: bool,
    ) -> CloseReason {
        if require_hello {
            if let Err(r) = self.wait_for_hello(ctl).await {
                return r;
            }
        }
        if let Err(r) = self.start(cursor).await {
            return r;
        }
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let shutdown = self.shared.hub.shutdown.clone();
            let step = tokio::select! {
                biased;
                _ = shutdown.cancelled() => Step::Shutdown,
                c = ctl.recv() => Step::Control(c),
                _ = tick.tick() => Step::Tick,
                e = self.next_event() => Step::Deliver(e),
            };
            let result = match step {
                Step::Shutdown => {
                    self.close(1001, "server shutting down").await;
                    return CloseReason::Shutdown;
                }
                Step::Control(c) => self.control(c).await,
                Step::Tick => self.tick().await,
                Step::Deliver(Some(ev)) => self.deliver_ready(ev).await,
                Step::Deliver(None) => Err(CloseReason::Internal),
            };
            if let Err(r) = result {
                return r;
            }
            if let Err(r) = self.flush().await {
                return r;
            }
        }
    }

    /// Takes the start point: the ring receiver first, then the position in the log.
    async fn start(&mut self, cursor: Option<i64>) -> Result<(), CloseReason> {
        self.ring = Some(self.shared.ring.subscribe());
        let now = crate::sequencer::now_us() as i64;
        match cursor {
            // Inclusive: the event at exactly `cursor` is sent again. Older than the log (or
            // negative) starts at the oldest event.
            Some(c) if c <= now => {
                self.last_seen = (c.max(1) - 1) as u64;
                self.live = false;
                self.shared.metrics.lagging_subscribers.inc();
            }
            // No cursor, or one in the future: live from the newest persisted event.
            _ => {
                let store = self.shared.store.clone();
                let newest = tokio::task::spawn_blocking(move || store.newest_time_us()).await;
                match newest {
                    Ok(Ok(t)) => self.last_seen = t.unwrap_or(0),
                    _ => return Err(CloseReason::Internal),
                }
                self.live = true;
            }
        }
        Ok(())
    }

    async fn wait_for_hello(&mut self, ctl: &mut mpsc::Receiver<Control>) -> Result<(), CloseReason> {
        let shutdown = self.shared.hub.shutdown.clone();
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    self.close(1001, "server shutting down").await;
                    return Err(CloseReason::Shutdown);
                }
                _ = tick.tick() => self.tick().await?,
                c = ctl.recv() => {
                    if let Some(Control::Text(t)) = &c {
                        if let Ok(m) = serde_json::from_slice::<ClientMessage>(t) {
                            if m.kind == "options_update" {
                                self.control(c).await?;
                                return Ok(());
                            }
                        }
                    }
                    self.control(c).await?;
                }
            }
        }
    }

    /// The next event this subscriber should get, from its log batch or the ring. Cancel-safe:
    /// a pending log read is kept in `self.fetch` and picked up again.
    async fn next_event(&mut self) -> Option<Arc<Event>> {
        loop {
            if let Some(ev) = self.buffer.pop_front() {
                return Some(ev);
            }
            if self.buffer_until > self.last_seen {
                // The rest of the batch was filtered out: passed all the same.
                self.last_seen = self.buffer_until;
            }
            if !self.live {
                let handle = self.fetch.get_or_insert_with(|| {
                    let (shared, from, filter) = (self.shared.clone(), self.last_seen + 1, self.filter.clone());
                    tokio::task::spawn_blocking(move || read_log(&shared, from, &filter))
                });
                let result = handle.await;
                self.fetch = None;
                let batch = match result {
                    Ok(Ok(b)) => b,
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "reading the log for a subscriber failed");
                        return None;
                    }
                    Err(_) => return None,
                };
                self.shared.metrics.replay_reads.inc();
                self.passed += batch.scanned as u64;
                match batch.scanned_until {
                    None => {
                        // Caught up with the log: the ring has everything newer.
                        self.live = true;
                        self.shared.metrics.lagging_subscribers.dec();
                    }
                    Some(until) => {
                        self.buffer = batch.events.into();
                        self.buffer_until = until;
                    }
                }
                continue;
            }
            let ring = self.ring.as_mut()?;
            match ring.recv().await {
                Ok(ev) => {
                    if let Some(ev) = self.accept(ev) {
                        return Some(ev);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => self.fall_back_to_log(),
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    /// Delivers `ev` and then whatever else is ready without waiting (up to a batch), so a
    /// burst leaves in few syscalls; the caller flushes.
    async fn deliver_ready(&mut self, ev: Arc<Event>) -> Result<(), CloseReason> {
        self.deliver(ev).await?;
        for _ in 1..WRITE_BATCH {
            match self.next_ready() {
                Some(ev) => self.deliver(ev).await?,
                None => break,
            }
        }
        Ok(())
    }

    /// The next event if one is available right now (from the log batch or the ring).
    fn next_ready(&mut self) -> Option<Arc<Event>> {
        loop {
            if let Some(ev) = self.buffer.pop_front() {
                return Some(ev);
            }
            if !self.live {
                return None; // the next log read happens in next_event
            }
            let r = self.ring.as_mut()?.try_recv();
            match r {
                Ok(ev) => {
                    if let Some(ev) = self.accept(ev) {
                        return Some(ev);
                    }
                }
                Err(broadcast::error::TryRecvError::Lagged(_)) => {
                    self.fall_back_to_log();
                    return None;
                }
                Err(_) => return None,
            }
        }
    }

    /// A ring event: `Some` if this subscriber should get it; otherwise it is passed.
    fn accept(&mut self, ev: Arc<Event>) -> Option<Arc<Event>> {
        if ev.time_us <= self.last_seen {
            return None; // already read from the log
        }
        self.passed += 1;
        if self.filter.matches(ev.kind, ev.did(), ev.collection()) {
            Some(ev)
        } else {
            self.last_seen = ev.time_us;
            None
        }
    }

    /// The ring moved past us: back to the log, from where we are.
    fn fall_back_to_log(&mut self) {
        self.live = false;
        self.shared.metrics.lagging_subscribers.inc();
    }

    async fn flush(&mut self) -> Result<(), CloseReason> {
        match tokio::time::timeout(self.shared.hub.opts.write_timeout, self.tx.flush()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(CloseReason::WriteError),
            Err(_) => Err(CloseReason::WriteTimeout),
        }
    }

    async fn deliver(&mut self, ev: Arc<Event>) -> Result<(), CloseReason> {
        if self.max_size > 0 && ev.json().len() as u64 > self.max_size {
            self.last_seen = ev.time_us;
            return Ok(());
        }
        if let Some(bucket) = &self.slot.bucket {
            let wait = bucket.take();
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
        let frame = if self.compress {
            let dict = &self.shared.hub.dictionary;
            Frame::binary(Payload::Borrowed(ev.compressed(|j| dict.compress(j))))
        } else {
            Frame::text(Payload::Borrowed(ev.json()))
        };
        let len = frame.payload.len() as u64;
        self.write(frame).await?;
        self.last_seen = ev.time_us;
        self.events_sent.inc();
        self.bytes_sent.inc_by(len);
        Ok(())
    }

    async fn write(&mut self, frame: Frame<'_>) -> Result<(), CloseReason> {
        match tokio::time::timeout(self.shared.hub.opts.write_timeout, self.tx.write_frame(frame)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(CloseReason::WriteError),
            Err(_) => Err(CloseReason::WriteTimeout),
        }
    }

    /// Sends a close frame (best effort) with a reason cut to the 123 bytes a close frame holds.
    async fn close(&mut self, code: u16, reason: &str) {
        let mut end = reason.len().min(123);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        let frame = Frame::close(code, &reason.as_bytes()[..end]);
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            self.tx.write_frame(frame).await?;
            self.tx.flush().await
        })
        .await;
    }

    async fn control(&mut self, c: Option<Control>) -> Result<(), CloseReason> {
        self.last_heard = Instant::now();
        match c {
            None | Some(Control::Close) => {
                self.close(1000, "").await;
                Err(CloseReason::ClientClosed)
            }
            Some(Control::ReadError(e)) => {
                tracing::debug!(error = %e, "subscriber read failed");
                Err(CloseReason::ReadError)
            }
            Some(Control::TooBig) => {
                self.close(1009, "message too big").await;
                Err(CloseReason::MessageTooBig)
            }
            Some(Control::Heard) => Ok(()),
            Some(Control::Ping(payload)) => self.write(Frame::pong(Payload::Owned(payload))).await,
            Some(Control::Text(t)) => {
                let msg: ClientMessage = match serde_json::from_slice(&t) {
                    Ok(m) => m,
                    Err(e) => {
                        self.close(1007, &format!("failed to parse subscriber message: {e}")).await;
                        return Err(CloseReason::BadMessage);
                    }
                };
                if msg.kind != "options_update" {
                    return Ok(()); // unknown types are ignored, as in v1
                }
                let payload = msg.payload.as_ref().map(|p| p.get()).unwrap_or("{}");
                let update = match serde_json::from_str::<OptionsUpdate>(payload) {
                    Ok(u) => u,
                    Err(e) => {
                        self.close(1007, &format!("failed to parse options_update payload: {e}")).await;
                        return Err(CloseReason::BadMessage);
                    }
                };
                match update.validate() {
                    Ok(u) => {
                        self.filter = u.filter;
                        self.max_size = u.max_message_size;
                        if let Some(i) = u.inform_cursor_seconds {
                            self.inform = i.map(Duration::from_secs);
                        }
                        // Events already picked with the old filter are picked again.
                        self.buffer.clear();
                        self.buffer_until = 0;
                        if let Some(f) = self.fetch.take() {
                            f.abort();
                        }
                        Ok(())
                    }
                    Err(OptionsError(reason)) => {
                        self.close(1008, &reason).await;
                        Err(CloseReason::InvalidOptions)
                    }
                }
            }
        }
    }

    async fn tick(&mut self) -> Result<(), CloseReason> {
        let now = Instant::now();
        let opts = &self.shared.hub.opts;
        let (pong_timeout, ping_interval, slow_window, slow_behind, slow_min_rate) =
            (opts.pong_timeout, opts.ping_interval, opts.slow_window, opts.slow_behind, opts.slow_min_rate);
        if now.duration_since(self.last_heard) > pong_timeout {
            self.close(1008, "no response to pings").await;
            return Err(CloseReason::PingTimeout);
        }
        if now.duration_since(self.last_ping) >= ping_interval {
            self.last_ping = now;
            self.write(Frame::new(true, OpCode::Ping, None, Payload::Borrowed(b""))).await?;
        }
        if let Some(every) = self.inform {
            if now >= self.next_inform {
                self.next_inform = now + every;
                if self.ring.is_some() {
                    let msg = format!(r#"{{"kind":"cursor","time_us":{}}}"#, self.last_seen);
                    let frame = if self.compress {
                        Frame::binary(Payload::Owned(self.shared.hub.dictionary.compress(msg.as_bytes())))
                    } else {
                        Frame::text(Payload::Owned(msg.into_bytes()))
                    };
                    self.write(frame).await?;
                }
            }
        }
        if now.duration_since(self.window.0) >= slow_window {
            let rate = (self.passed - self.window.1) as f64 / now.duration_since(self.window.0).as_secs_f64();
            let newest = self.shared.metrics.store_newest_time_us.get().max(0) as u64;
            let behind = Duration::from_micros(newest.saturating_sub(self.last_seen));
            if !self.live && behind > slow_behind && rate < slow_min_rate {
                self.close(1008, "consumer too slow").await;
                return Err(CloseReason::TooSlow);
            }
            self.window = (now, self.passed);
        }
        Ok(())
    }
}
