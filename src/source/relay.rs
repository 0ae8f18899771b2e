//! The relay reader: one websocket client to a relay's `com.atproto.sync.subscribeRepos`.
//!
//! - Resumes with `?cursor=<last persisted seq>`; relays replay that seq again (rainbow's
//!   cursor is inclusive), so frames at or below it are skipped ([`SeqTracker`]).
//! - Reconnects with exponential backoff and jitter ([`Backoff`]) after any failure, and when
//!   no frame has moved the stream on for the idle timeout (silence, or only junk, seq-less
//!   frames or repeats): a quiet relay never kills the process.
//! - The websocket layer allows 32 MiB messages; the protocol's 5 MB limit is applied by the
//!   transcoder, so an oversized frame is counted and skipped by seq rather than closing the
//!   connection and replaying the same frame forever. A message past 32 MiB ends the
//!   connection before its seq is known: after a few in a row at one position, the cursor
//!   skips past it ([`SeqTracker::unreadable`]).
//! - Error frames (`FutureCursor`, `ConsumerTooSlow`) and `#info OutdatedCursor` are logged at
//!   a bounded rate and counted; seq gaps are counted.
//! - The frame handed on after frames that may be missing (a seq jump, a frame skipped for its
//!   seq, a relay reset, a live start) says so (`IngestFrame::after_gap`): the verification
//!   stage then lets repos that moved unseen anchor again rather than break their chains.
//!
//! Frames are transcoded here (the reader is one task, far faster than the firehose) and handed
//! to the sequencer with their seq.

use super::backoff::{Backoff, Pauses};
use super::seq::{SeqDecision, SeqTracker, FAR_BELOW_RUN};
use super::wsclient::{self, ClientError, WsUrl};
use super::Readiness;
use crate::metrics::{Metrics, RelayErrorKind};
use crate::rate_limited_log::RateLimitedLog;
use crate::sequencer::{IngestFrame, IngestSender};
use crate::transcode::{DropReason, FrameType, Transcoder};
use crate::units::{parse_duration, parse_size, ser_duration};
use fastwebsockets::OpCode;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The relay settings (`contrail serve` flags; see `config/contrail.example.toml`).
#[derive(clap::Args, Debug, Clone, serde::Serialize)]
pub struct RelayConfig {
    /// Relay to read: a base URL (wss://bsky.network) or the full subscribeRepos URL.
    #[arg(long, env = "CONTRAIL_RELAY_URL", default_value = "wss://bsky.network", value_parser = WsUrl::parse)]
    pub relay_url: WsUrl,
    /// Relay frames larger than this are counted and skipped (the protocol's limit is 5 MB).
    #[arg(long, env = "CONTRAIL_MAX_FRAME_BYTES", default_value = "5000000", value_parser = parse_size)]
    pub max_frame_bytes: u64,
    /// Reconnect to the relay when no frame moves the stream on for this long (text,
    /// malformed or seq-less frames, and a frame sent again, do not count).
    #[arg(long, env = "CONTRAIL_RELAY_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub relay_idle_timeout: Duration,
    /// First reconnect delay; doubles up to --relay-backoff-max.
    #[arg(long, env = "CONTRAIL_RELAY_BACKOFF_MIN", default_value = "1s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub relay_backoff_min: Duration,
    /// Longest reconnect delay.
    #[arg(long, env = "CONTRAIL_RELAY_BACKOFF_MAX", default_value = "60s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub relay_backoff_max: Duration,
    /// Each step of connecting to a relay or upstream (TCP, TLS, websocket upgrade, an HTTP
    /// GET) must finish within this, or the attempt fails and is retried with backoff.
    #[arg(long, env = "CONTRAIL_CONNECT_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub connect_timeout: Duration,
    /// After a reconnect, a first seq more than this far below our cursor means the relay
    /// reset its seq space (we follow it); closer below is a fan-out daemon a little behind
    /// (its repeats are skipped as duplicates). In the middle of a connection, 100 frames in a
    /// row this far below are a reset too. Reading a PDS (or one relay that replays exactly
    /// from the cursor), set 1: a PDS wiped or restored from a backup restarts far less than
    /// the default below our cursor, and its new events would be skipped as duplicates.
    #[arg(long, env = "CONTRAIL_RELAY_RESET_THRESHOLD", default_value = "1000000")]
    pub relay_reset_threshold: u64,
}

/// The smallest seq distance `--relay-reset-threshold` may take as a relay reset: 1, for a
/// PDS or a single relay that replays exactly from the cursor (no fan-out daemon behind it).
pub const MIN_RELAY_RESET_THRESHOLD: u64 = 1;
/// The largest (bsky.network's seqs are ~2·10¹⁰; a new space starts near 0).
pub const MAX_RELAY_RESET_THRESHOLD: u64 = 1_000_000_000;

impl RelayConfig {
    /// Checks clap cannot express; the error names the key.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.max_frame_bytes < 1024 || self.max_frame_bytes > 32 << 20 {
            return Err(("max-frame-bytes", "must be between 1 KiB and 32 MiB".into()));
        }
        if self.relay_idle_timeout < Duration::from_secs(1) {
            return Err(("relay-idle-timeout", "must be at least 1s".into()));
        }
        if self.relay_backoff_min.is_zero() || self.relay_backoff_max < self.relay_backoff_min {
            return Err(("relay-backoff-max", "must be at least relay-backoff-min, which must be more than 0".into()));
        }
        if self.connect_timeout < Duration::from_millis(100) {
            return Err(("connect-timeout", "must be at least 100ms".into()));
        }
        if self.relay_reset_threshold < MIN_RELAY_RESET_THRESHOLD {
            // 0: every repeat of our cursor would be a reset, and stored twice.
            return Err(("relay-reset-threshold", format!("must be at least {MIN_RELAY_RESET_THRESHOLD}")));
        }
        if self.relay_reset_threshold > MAX_RELAY_RESET_THRESHOLD {
            // Higher, a relay that restarted its seq space would never be taken for one: every
            // frame a duplicate, ingest stopped without an error.
            return Err(("relay-reset-threshold", format!("must be at most {MAX_RELAY_RESET_THRESHOLD}")));
        }
        Ok(())
    }
}

/// Why a relay session ended.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("{0}")]
    Connect(#[from] ClientError),
    #[error("reading: {0}")]
    Read(fastwebsockets::WebSocketError),
    #[error("the relay sent {0}")]
    Message(wsclient::ReassemblyError),
    #[error("no frame moving the stream on for {0:?}")]
    Idle(Duration),
    #[error("the relay closed the connection")]
    Closed,
    #[error("the sequencer stopped")]
    SequencerStopped,
    #[error("the relay refused our cursor, then went on above it at seq {0}: asking for it again")]
    AskAgain(i64),
    #[error("the relay's new seq space is asked for again from seq {0} (its start was over the memory kept aside)")]
    Refetch(i64),
}

impl RelayError {
    /// A message larger than the websocket layer reads: the connection ended before its seq
    /// was known.
    fn unreadable(&self) -> bool {
        matches!(
            self,
            RelayError::Read(fastwebsockets::WebSocketError::FrameTooLarge)
                | RelayError::Message(wsclient::ReassemblyError::TooBig(_))
        )
    }

    /// The `contrail_relay_errors_total` label, for the failures that count as errors.
    pub fn label(&self) -> Option<RelayErrorKind> {
        match self {
            RelayError::Connect(_) => Some(RelayErrorKind::Connect),
            RelayError::Read(_) | RelayError::Message(_) => Some(RelayErrorKind::Read),
            RelayError::Idle(_) => Some(RelayErrorKind::IdleTimeout),
            RelayError::Closed | RelayError::SequencerStopped | RelayError::AskAgain(_) | RelayError::Refetch(_) => {
                None
            }
        }
    }
}

/// Frames kept aside far below our cursor hold at most about this many bytes (beyond, they are
/// skipped; a run is followed only at [`FAR_BELOW_RUN`] frames). Memory: this, once, for the one
/// relay connection.
const FAR_BELOW_MAX_BYTES: usize = 16 << 20;

/// Reads the relay and hands transcoded frames to the sequencer.
pub struct Reader {
    cfg: RelayConfig,
    metrics: Arc<Metrics>,
    tx: IngestSender,
    seq: SeqTracker,
    /// A frame whose seq jumped ahead, until the next frame confirms or refutes it.
    held: Option<(IngestFrame, Drops)>,
    /// Frames far below our cursor in this connection, in a row: a new seq space once there
    /// are enough of them ([`super::seq::SeqDecision::FarBelow`]).
    far_below: KeptAside,
    /// The highest seq this connection has sent: a frame above it moves the stream on (the
    /// idle timeout's measure). A relay sending one frame, or a loop of frames, again and again
    /// does not; a relay behind us catching up does, and so does a run in a new, lower seq
    /// space as it grows (from there on, the followed space's frames are measured).
    highest_seq: i64,
    /// The highest seq of this connection's frames far below our position (a run in a new
    /// space grows above it; a relay looping over one low frame does not).
    highest_far_below: i64,
    /// `contrail_relay_frames_total` per frame type, resolved once (not a label lookup per frame).
    frames_by_type: Vec<prometheus::IntCounter>,
    transcoder: Transcoder,
    log: RateLimitedLog,
    /// Hand each frame's bytes on with its events (for the verification stage).
    keep_raw: bool,
    /// Frames may be missing before the next frame handed on ([`IngestFrame::after_gap`]).
    gap_before_next: bool,
    /// Whether the relay has been reached, and the last error (for `/ready`).
    pub readiness: Arc<Readiness>,
}

impl Reader {
    pub fn new(cfg: RelayConfig, start_seq: Option<i64>, metrics: Arc<Metrics>, tx: IngestSender) -> Self {
        let transcoder = Transcoder::new(cfg.max_frame_bytes as usize);
        let reset_threshold = cfg.relay_reset_threshold.min(i64::MAX as u64) as i64;
        let frames_by_type =
            FrameType::ALL.iter().map(|t| metrics.relay_frames.with_label_values(&[t.as_str()])).collect();
        Reader {
            cfg,
            metrics,
            tx,
            seq: SeqTracker::new(start_seq.unwrap_or(0), reset_threshold),
            held: None,
            far_below: KeptAside::default(),
            highest_seq: 0,
            highest_far_below: 0,
            frames_by_type,
            transcoder,
            log: RateLimitedLog::new(Duration::from_secs(10)),
            keep_raw: false,
            // Starting live (no cursor, or one for another relay): whatever the log holds was
            // followed by frames this reader will never see.
            gap_before_next: start_seq.is_none(),
            readiness: Arc::default(),
        }
    }

    /// Passes each frame's bytes on with its events, for the verification stage.
    pub fn with_raw_frames(mut self, keep: bool) -> Self {
        self.keep_raw = keep;
        self
    }

    /// Runs until `cancel` fires (or the sequencer is gone).
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut backoff = Backoff::new(self.cfg.relay_backoff_min, self.cfg.relay_backoff_max);
        let mut pauses = Pauses::new(self.cfg.relay_backoff_max);
        let mut first = true;
        loop {
            if !first {
                self.metrics.relay_reconnects.inc();
            }
            first = false;
            let started_at = self.seq.last();
            let ended = tokio::select! {
                _ = cancel.cancelled() => {
                    // Stopped (shutdown, or the store failed): not connected, whatever happens next.
                    self.metrics.relay_connected.set(0);
                    return;
                }
                r = self.session() => r,
            };
            self.metrics.relay_connected.set(0);
            if let Some(kind) = ended.label() {
                self.metrics.relay_error(kind);
            }
            self.readiness.set_error(ended.to_string());
            if self.tx.is_closed() || matches!(ended, RelayError::SequencerStopped) {
                return;
            }
            // Progress, or a relay that just showed it is reachable and ahead of our cursor
            // (it is asked for the cursor again at once, not after a growing wait).
            if self.seq.last() != started_at || matches!(ended, RelayError::AskAgain(_)) {
                backoff.reset();
            } else if ended.unreadable() {
                let skip = self.seq.unreadable();
                if skip == 1 {
                    // Counted once per frame passed over (its read errors are counted already).
                    self.metrics.drop_reason(DropReason::FrameTooLarge);
                }
                if skip > 0 {
                    tracing::error!(
                        last_seq = started_at,
                        next_cursor = started_at.saturating_add(skip),
                        "the relay's next frame cannot be read (over the websocket limit), again: skipping past it"
                    );
                }
                if (1..=super::seq::LINEAR_SKIPS).contains(&skip) {
                    // One seq at a time at once; past that (a relay whose every message is
                    // too large), the usual growing wait.
                    backoff.reset();
                }
            }
            // A refusal's Retry-After, up to --relay-backoff-max.
            if let RelayError::Connect(e) = &ended {
                pauses.asked(0, e.retry_after());
            }
            let wait = backoff.next_wait().max(pauses.left(0));
            tracing::warn!(error = %ended, retry_in_ms = wait.as_millis() as u64, "relay connection ended");
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One connection, until it fails.
    async fn session(&mut self) -> RelayError {
        let cursor = self.seq.cursor();
        let url = &self.cfg.relay_url;
        tracing::info!(host = %url.host, cursor, "connecting to relay");
        let mut ws = match wsclient::connect(url, url.target(cursor), self.cfg.connect_timeout).await {
            Ok(ws) => ws,
            Err(e) => return e.into(),
        };
        self.readiness.set_reached();
        self.seq.new_session();
        self.held = None;
        self.far_below.skip(&self.metrics, &self.log);
        self.highest_seq = 0;
        self.highest_far_below = 0;
        self.metrics.relay_connected.set(1);
        tracing::info!(host = %url.host, cursor, "relay connected");
        let mut pieces = wsclient::Reassembler::new(wsclient::MAX_WS_MESSAGE_BYTES);
        // Only frames whose seq moves on keep the connection: a peer sending text, malformed or
        // seq-less frames without end (a broken proxy), or one frame again and again, is as
        // dead as a silent one.
        let mut idle_at = tokio::time::Instant::now() + self.cfg.relay_idle_timeout;
        loop {
            let frame = match tokio::time::timeout_at(idle_at, ws.read_frame()).await {
                Err(_) => {
                    // A jump held again, with nothing after it for the idle timeout, is taken
                    // (the connection still ends: the read the timeout abandoned may have been
                    // half done).
                    if let Err(e) = self.release_quiet_held().await {
                        return e;
                    }
                    return RelayError::Idle(self.cfg.relay_idle_timeout);
                }
                Ok(Err(e)) => return self.ended_quiet(idle_at, RelayError::Read(e)).await,
                Ok(Ok(f)) => f,
            };
            let (opcode, payload) = match pieces.push(frame.opcode, frame.fin, &frame.payload) {
                Ok(wsclient::Assembled::Partial) => continue,
                Ok(wsclient::Assembled::Message(opcode, payload)) => (opcode, payload),
                Err(e) => return RelayError::Message(e),
            };
            match opcode {
                OpCode::Binary => {
                    let position = self.seq.last();
                    let held_again = self.seq.held_again();
                    match self.handle(payload).await {
                        Ok(keep) => {
                            let now = tokio::time::Instant::now();
                            // (A jump sent first again: the quiet that confirms it counts from
                            // it, not from what came before it.)
                            if keep || (!held_again && self.seq.held_again()) {
                                idle_at = now + self.cfg.relay_idle_timeout;
                            }
                            // Readiness wants our position to move: a stopped relay that sends
                            // our cursor's frame again on each connection (an inclusive
                            // replay) keeps this connection a while, not the region ready.
                            if self.seq.last() != position {
                                self.readiness.moved_on(now.into_std());
                            }
                        }
                        Err(e) => return e,
                    }
                }
                OpCode::Close => return self.ended_quiet(idle_at, RelayError::Closed).await,
                OpCode::Text => {
                    // Not part of the protocol: counted as malformed, skipped.
                    self.frames_by_type[FrameType::Malformed as usize].inc();
                    self.metrics.drop_reason(DropReason::BadHeader);
                }
                _ => {}
            }
        }
    }

    /// Handles one binary message; whether it moved the stream on (a believable seq above the
    /// previous frame's).
    async fn handle(&mut self, payload: &[u8]) -> Result<bool, RelayError> {
        let m = &self.metrics;
        m.relay_bytes.inc_by(payload.len() as u64);
        let (mut events, mut drops) = (Vec::new(), Vec::new());
        let info = self.transcoder.transcode(payload, &mut events, &mut drops);
        self.frames_by_type[info.frame_type as usize].inc();
        drops.extend(info.dropped);
        match info.frame_type {
            FrameType::Error => {
                let name = info.name.clone().unwrap_or_default();
                let kind = match name.as_str() {
                    "FutureCursor" => RelayErrorKind::FutureCursor,
                    "ConsumerTooSlow" => RelayErrorKind::ConsumerTooSlow,
                    _ => RelayErrorKind::Other,
                };
                m.relay_error(kind);
                if kind == RelayErrorKind::FutureCursor {
                    // Our cursor is above this relay's seq space: one lagging instance, or a
                    // relay that restarted lower. After a few refusals in a row the next
                    // connection is live, and its first frame decides (the reset rule).
                    self.seq.cursor_refused();
                }
                let message = info.message.clone().unwrap_or_default();
                let last = self.seq.last();
                self.log.error("relay_error_frame", || {
                    format!("relay sent an error frame: {name} {message} (last seq {last})")
                });
            }
            FrameType::Info => {
                let (name, message) = (info.name.clone().unwrap_or_default(), info.message.clone().unwrap_or_default());
                self.log.warn("relay_info", || format!("relay info: {name} {message}"));
            }
            _ => {}
        }
        let Some(seq) = info.seq else {
            self.count_drops(&drops, None);
            return Ok(false);
        };
        let cursor = self.seq.last();
        let held_seq = self.seq.held();
        let decision = self.seq.observe(seq);
        if let Some(bogus) = self.seq.take_refuted_before() {
            // Held when the last connection ended; this connection sent another frame first.
            // (Its commit, if any, is not stored: a gap for its repo.)
            self.gap_before_next = true;
            m.drop_reason(DropReason::BadSeq);
            self.log
                .warn("bad_seq", || format!("dropped a frame with seq {bogus}: it jumped ahead and was not confirmed"));
        }
        if decision == SeqDecision::Invalid {
            // Says nothing about a held frame: it stays held for the next frame to judge.
            // (Its commit, if any, is not stored: a gap for its repo.)
            self.gap_before_next = true;
            m.drop_reason(DropReason::BadSeq);
            self.log.warn("bad_seq", || format!("dropped a frame with seq {seq}"));
            return Ok(false);
        }
        let moved_on = match decision {
            // A run in a new, lower space grew.
            SeqDecision::FarBelow { .. } => {
                let grew = seq > self.highest_far_below;
                self.highest_far_below = self.highest_far_below.max(seq);
                grew
            }
            // A repeat inside the run; a jump ahead not confirmed yet (it may be bogus: the
            // frames after it must still count).
            SeqDecision::RunRepeat | SeqDecision::Hold => false,
            // A repeat of the held frame: no more than the held frame itself.
            SeqDecision::Duplicate if held_seq == Some(seq) => false,
            _ => seq > self.highest_seq,
        };
        if moved_on && !matches!(decision, SeqDecision::FarBelow { .. }) {
            self.highest_seq = seq;
        }
        let raw = self.keep_raw.then(|| bytes::Bytes::copy_from_slice(payload));
        let incomplete = !drops.is_empty();
        let frame = IngestFrame {
            seq: Some(seq),
            relay_time_us: info.relay_time_us,
            events,
            raw,
            incomplete,
            ..Default::default()
        };
        // The frame held before this one: still held (this one said nothing about it), released
        // with this one, or refuted.
        let held = if held_seq.is_some() && self.seq.held() == held_seq { None } else { self.held.take() };
        if held.is_some() && !matches!(decision, SeqDecision::Accept { release_held: true, .. }) {
            // The jump ahead was not confirmed: that frame's seq was bogus (and its commit, if
            // any, is not stored: a gap for its repo).
            self.gap_before_next = true;
            m.drop_reason(DropReason::BadSeq);
            self.log.warn("bad_seq", || {
                format!("dropped a frame whose seq jumped ahead and was not confirmed, after seq {cursor}")
            });
        }
        if !matches!(decision, SeqDecision::FarBelow { .. } | SeqDecision::RunRepeat) {
            // A run far below that did not go on: stray frames, skipped.
            self.far_below.skip(&self.metrics, &self.log);
        }
        match decision {
            SeqDecision::Invalid => unreachable!("handled above"),
            // The events between our cursor and this frame are the relay's to send: the next
            // connection asks for them (the run loop reconnects).
            SeqDecision::AskAgain => return Err(RelayError::AskAgain(seq)),
            SeqDecision::Duplicate | SeqDecision::RunRepeat => {
                m.relay_duplicates.inc();
                return Ok(moved_on);
            }
            SeqDecision::FarBelow { run } => {
                self.far_below.push(frame, drops);
                if run < FAR_BELOW_RUN {
                    return Ok(moved_on);
                }
                // A new seq space in the middle of the connection (a fan-out daemon whose
                // upstream restarted lower): follow it from the run's first frame.
                let KeptAside { frames, dropped, .. } = std::mem::take(&mut self.far_below);
                m.relay_error(RelayErrorKind::SeqReset);
                let first = self.seq.run_first();
                if dropped > 0 && first > 1 {
                    // Some of the run went at the memory bound: the relay is asked for the run
                    // again, from its first seq (it holds its new space's recent frames).
                    self.seq.follow(first - 1);
                    self.gap_before_next = true; // the old space's frames after our cursor
                    let kept = frames.len();
                    self.log.error("seq_reset_run", || {
                        format!(
                            "relay seq far below our cursor {cursor} for a run of frames: treating it as a relay reset from seq {first}; {dropped} of them went at the memory bound, so the {kept} kept are discarded too and the relay is asked again from there"
                        )
                    });
                    return Err(RelayError::Refetch(first));
                }
                self.seq.follow(seq);
                self.highest_seq = seq;
                self.gap_before_next = true; // the old space's frames after our cursor
                let n = frames.len();
                self.log.error("seq_reset_run", || {
                    format!(
                        "relay seq far below our cursor {cursor} for a run of frames: treating it as a relay reset, from seq {first} ({n} frames kept aside)"
                    )
                });
                if dropped > 0 {
                    // A new space from seq 1: no cursor asks for it from its start.
                    m.relay_seq_gaps.inc();
                    self.log.error("seq_reset_run_lost", || {
                        format!("{dropped} frames at the start of the relay's new seq space were over the memory kept aside and are lost")
                    });
                }
                for (f, drops) in frames {
                    self.hand_on(f, &drops).await?;
                }
                return Ok(moved_on);
            }
            SeqDecision::Hold => {
                self.held = Some((frame, drops));
                return Ok(moved_on);
            }
            SeqDecision::Reset { from } => {
                m.relay_error(RelayErrorKind::SeqReset);
                self.gap_before_next = true; // the old space's frames after our cursor
                tracing::error!(
                    cursor,
                    first_seq = from,
                    "relay seq far below our cursor on reconnect: treating it as a relay reset"
                );
            }
            SeqDecision::Accept { gap, release_held } => {
                if let (true, Some((h, h_drops))) = (release_held, held) {
                    m.relay_seq_gaps.inc(); // the jump itself
                    self.gap_before_next = true;
                    self.hand_on(h, &h_drops).await?;
                }
                if gap {
                    self.metrics.relay_seq_gaps.inc();
                    self.gap_before_next = true;
                }
            }
        }
        self.hand_on(frame, &drops).await?;
        Ok(moved_on)
    }

    /// A connection that ends (`ended`) having moved nothing on for at least half the idle
    /// timeout: a proxy in front of a quiet source may close idle connections as soon as the
    /// reader's own timeout would, and a jump held again would then wait for the source's next
    /// frame (hours, on a quiet PDS). Taken as the idle timeout takes it.
    async fn ended_quiet(&mut self, idle_at: tokio::time::Instant, ended: RelayError) -> RelayError {
        let quiet_enough = tokio::time::Instant::now() + self.cfg.relay_idle_timeout / 2 >= idle_at;
        if quiet_enough {
            if let Err(e) = self.release_quiet_held().await {
                return e;
            }
        }
        ended
    }

    /// Hands on the frame held after a jump ahead if the relay has confirmed it by sending it
    /// first above our position on two connections and nothing after it since
    /// ([`SeqTracker::release_quiet_held`]).
    async fn release_quiet_held(&mut self) -> Result<(), RelayError> {
        let Some(seq) = self.seq.release_quiet_held() else { return Ok(()) };
        let Some((frame, drops)) = self.held.take() else { return Ok(()) };
        tracing::info!(seq, "a seq that jumped ahead was sent first again and nothing followed it: taken");
        self.metrics.relay_seq_gaps.inc(); // the jump itself
        self.gap_before_next = true;
        self.readiness.moved_on(std::time::Instant::now());
        self.hand_on(frame, &drops).await
    }

    /// Counts a frame's drops and hands it to the sequencer, saying whether frames may be
    /// missing before it.
    async fn hand_on(&mut self, mut frame: IngestFrame, drops: &[DropReason]) -> Result<(), RelayError> {
        self.count_drops(drops, frame.seq);
        frame.after_gap = std::mem::take(&mut self.gap_before_next);
        self.tx.send(frame).await.map_err(|_| RelayError::SequencerStopped)
    }

    /// Counts what a frame's transcoding dropped, once the frame is known to be new (handed on,
    /// or without a seq): a frame the relay sends again after a reconnect, skipped as a
    /// duplicate, is not counted again.
    fn count_drops(&self, drops: &[DropReason], seq: Option<i64>) {
        for d in drops {
            self.metrics.drop_reason(*d);
            if !d.is_benign() && *d != DropReason::ErrorFrame {
                self.log.warn(d.as_str(), || format!("dropped {} (seq {seq:?})", d.as_str()));
            }
        }
    }
}

/// What a frame's transcoding dropped (the whole frame's reason, or its ops'): counted when
/// the frame is handed on, not when it is skipped as a repeat or a bad seq.
type Drops = Vec<DropReason>;

/// Frames far below our cursor kept aside in one connection, at most [`FAR_BELOW_MAX_BYTES`]:
/// past it they go (a few huge stray frames are not a new seq space) and are only counted; if
/// the run turns out to be a new seq space, the relay is asked for it again.
#[derive(Default)]
struct KeptAside {
    frames: Vec<(IngestFrame, Drops)>,
    bytes: usize,
    /// Frames of this run dropped at the memory bound.
    dropped: usize,
}

impl KeptAside {
    fn push(&mut self, frame: IngestFrame, drops: Drops) {
        self.bytes += frame.bytes();
        self.frames.push((frame, drops));
        if self.bytes > FAR_BELOW_MAX_BYTES {
            self.dropped += self.frames.len();
            (self.frames, self.bytes) = (Vec::new(), 0);
        }
    }

    /// Skips the run: counted as duplicates, and said (a run cut short by a connection's end
    /// may have been the start of a new seq space).
    fn skip(&mut self, metrics: &Metrics, log: &RateLimitedLog) {
        let run = std::mem::take(self);
        let n = run.frames.len() + run.dropped;
        if n > 0 {
            metrics.relay_duplicates.inc_by(n as u64);
            log.warn("far_below_skipped", || {
                format!("skipped {n} frames far below our cursor (not a run long enough to follow)")
            });
        }
    }
}
