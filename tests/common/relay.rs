//! A fake relay speaking the real `com.atproto.sync.subscribeRepos` wire on 127.0.0.1:0:
//! websocket binary frames, `?cursor=` replay (inclusive, like the public relays), new frames
//! pushed while connected, and faults on demand.

use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Payload};
use http_body_util::Full;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What one connection does differently: a per-connection fault plan, consumed in order.
#[derive(Default, Clone, Debug)]
pub struct ConnFault {
    /// Close the connection (without a close frame) after sending this many frames.
    pub drop_after: Option<usize>,
    /// Start this many seqs below the requested cursor (a fan-out daemon that is behind).
    pub start_behind: Option<i64>,
    /// Send one binary message in 1 MiB fragments that never end (up to 256 MiB, so a reader
    /// without a limit fails the test rather than the machine), then drop the connection.
    pub endless_fragments: bool,
    /// Refuse a cursor with a `FutureCursor` error frame and a close (a lagging instance behind
    /// a load balancer), whatever the frames held.
    pub refuse_cursor: bool,
    /// Without a cursor, start at the first frame with this seq or above (a relay's live edge)
    /// instead of the oldest.
    pub live_from: Option<i64>,
    /// Send the first frame this many times more before going on (a fan-out daemon repeating
    /// the cursor's frame).
    pub repeat_first: usize,
}

impl ConnFault {
    pub fn drop_after(n: usize) -> ConnFault {
        ConnFault { drop_after: Some(n), ..ConnFault::default() }
    }
}

#[derive(Default, Clone)]
pub struct Faults {
    /// Close the next connection after sending this many frames (one-shot; see also
    /// [`FakeRelay::plan`]).
    pub drop_after: Option<usize>,
    /// Send nothing at all on the next connections (a silent upstream).
    pub silent: bool,
    /// Pause between frames (after every `burst` frames, when `burst` > 1).
    pub frame_interval: Option<Duration>,
    pub burst: usize,
    /// Answer a cursor above the newest frame held with a `FutureCursor` error frame and a
    /// close, as the TypeScript PDS does.
    pub refuse_future_cursor: bool,
    /// Send the frames as text (JSON event lines, standing in for a Contrail upstream; their
    /// "seq" is their `time_us`).
    pub text: bool,
    /// Close a connection (with a close frame) once it has had nothing to send for this long
    /// (a proxy's idle timeout in front of a quiet source).
    pub close_when_quiet: Option<Duration>,
}

#[derive(Default)]
struct State {
    frames: Mutex<Vec<(i64, Vec<u8>)>>,
    faults: Mutex<Faults>,
    plan: Mutex<std::collections::VecDeque<ConnFault>>,
    connections: AtomicUsize,
    cursors: Mutex<Vec<Option<i64>>>,
    /// Bytes of endless fragments the readers took.
    fragment_bytes: AtomicUsize,
    /// Moves on each [`FakeRelay::restart_seq_space`]: open connections go on from the first frame.
    space: AtomicUsize,
    /// Serve a Contrail's `/status` (for a replica's upstream reader), with a clock this far
    /// from this machine's ([`FakeRelay::serve_status`]).
    status_clock_offset_us: Mutex<Option<i64>>,
    /// Upgrade (or dictionary) requests answered with a status instead
    /// ([`FakeRelay::refuse_next`]), in order.
    refusals: Mutex<std::collections::VecDeque<Refusal>>,
    /// When each upgrade or dictionary request came, refused or not.
    attempts: Mutex<Vec<std::time::Instant>>,
}

/// An HTTP answer to an upgrade request: a status, a `Retry-After` in seconds, a body.
#[derive(Clone, Debug)]
pub struct Refusal {
    pub status: u16,
    pub retry_after_secs: Option<u64>,
    pub body: String,
}

pub struct FakeRelay {
    pub addr: SocketAddr,
    state: Arc<State>,
    _task: tokio::task::JoinHandle<()>,
}

impl FakeRelay {
    pub async fn start() -> FakeRelay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                        let st = st.clone();
                        async move {
                            let cursor = req
                                .uri()
                                .query()
                                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("cursor=")))
                                .and_then(|c| c.parse::<i64>().ok());
                            let status_clock = *st.status_clock_offset_us.lock().unwrap();
                            if let (Some(offset), "/status") = (status_clock, req.uri().path()) {
                                let newest = st.frames.lock().unwrap().last().map_or(0, |(s, _)| *s);
                                let now = std::time::UNIX_EPOCH.elapsed().unwrap().as_micros() as i64 + offset;
                                let body = format!(r#"{{"log":{{"newest_time_us":{newest}}},"now_us":{now}}}"#);
                                return Ok(hyper::Response::builder()
                                    .status(200)
                                    .body(Full::new(Bytes::from(body)))
                                    .unwrap());
                            }
                            // Also at a Contrail's path, for tests of a replica's upstream reader.
                            let path_ok =
                                ["/xrpc/com.atproto.sync.subscribeRepos", "/subscribe"].contains(&req.uri().path());
                            // A refusal answers the next request for the dictionary or an upgrade.
                            if path_ok || req.uri().path() == "/dictionary" {
                                st.attempts.lock().unwrap().push(std::time::Instant::now());
                                if let Some(r) = st.refusals.lock().unwrap().pop_front() {
                                    let mut resp = hyper::Response::builder().status(r.status);
                                    if let Some(secs) = r.retry_after_secs {
                                        resp = resp.header("retry-after", secs.to_string());
                                    }
                                    return Ok(resp.body(Full::new(Bytes::from(r.body))).unwrap());
                                }
                            }
                            // A Contrail's dictionary, for a replica's compressed link (any
                            // bytes are a raw-content dictionary; frames made without it read
                            // the same with it).
                            if req.uri().path() == "/dictionary" {
                                let body = Full::new(Bytes::from_static(b"a fake upstream's zstd dictionary"));
                                return Ok(hyper::Response::builder().status(200).body(body).unwrap());
                            }
                            if !path_ok {
                                return Ok::<_, std::convert::Infallible>(
                                    hyper::Response::builder().status(404).body(Full::new(Bytes::new())).unwrap(),
                                );
                            }
                            let (resp, fut) = fastwebsockets::upgrade::upgrade(&mut req).unwrap();
                            tokio::spawn(async move {
                                if let Ok(ws) = fut.await {
                                    serve_conn(st, ws, cursor).await;
                                }
                            });
                            Ok(resp.map(|_| Full::new(Bytes::new())))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                        .with_upgrades()
                        .await;
                });
            }
        });
        FakeRelay { addr, state, _task: task }
    }

    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// Appends a frame with its seq (given separately so malformed frames can have one too).
    pub fn push(&self, seq: i64, frame: Vec<u8>) {
        self.state.frames.lock().unwrap().push((seq, frame));
    }

    /// Queues every frame of `gen`, in order.
    pub fn push_all(&self, gen: &[super::frames::GenFrame]) {
        self.state.frames.lock().unwrap().extend(gen.iter().map(|g| (g.seq, g.frame.clone())));
    }

    /// Replaces every frame with `gen`'s, and open connections go on with them from the first
    /// (a fan-out daemon whose upstream restarted with a new, lower seq space, keeping its
    /// subscribers' connections open).
    pub fn restart_seq_space(&self, gen: &[super::frames::GenFrame]) {
        let mut frames = self.state.frames.lock().unwrap();
        *frames = gen.iter().map(|g| (g.seq, g.frame.clone())).collect();
        self.state.space.fetch_add(1, Ordering::SeqCst);
    }

    /// Forgets every frame (a relay restarted without its history).
    pub fn clear(&self) {
        self.state.frames.lock().unwrap().clear();
    }

    /// Answers `/status` as a Contrail upstream does (its newest frame's seq as its newest
    /// `time_us`), with its clock `offset_us` from this machine's.
    pub fn serve_status(&self, offset_us: i64) {
        *self.state.status_clock_offset_us.lock().unwrap() = Some(offset_us);
    }

    pub fn set_faults(&self, f: Faults) {
        *self.state.faults.lock().unwrap() = f;
    }

    /// The next connections' faults, one entry per connection, in order; connections after
    /// the plan runs out behave normally.
    pub fn plan(&self, plan: Vec<ConnFault>) {
        *self.state.plan.lock().unwrap() = plan.into();
    }

    /// Answers the next upgrade or dictionary request with `refusal` (queued after any already
    /// set).
    pub fn refuse_next(&self, refusal: Refusal) {
        self.state.refusals.lock().unwrap().push_back(refusal);
    }

    /// When each upgrade or dictionary request came so far, refused or not.
    pub fn attempts(&self) -> Vec<std::time::Instant> {
        self.state.attempts.lock().unwrap().clone()
    }

    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Waits until more than `before` connections were made (a reader's own connection after a
    /// restart; the seq gauge starts at the stored cursor, so it cannot tell).
    pub fn wait_for_connections_above(&self, before: usize, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        while self.connections() <= before {
            assert!(std::time::Instant::now() < deadline, "no new relay connection");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The `cursor` of every connection so far.
    pub fn cursors(&self) -> Vec<Option<i64>> {
        self.state.cursors.lock().unwrap().clone()
    }

    /// How much of [`ConnFault::endless_fragments`] the readers took.
    pub fn fragment_bytes(&self) -> usize {
        self.state.fragment_bytes.load(Ordering::SeqCst)
    }
}

async fn serve_conn(
    st: Arc<State>,
    ws: fastwebsockets::WebSocket<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>,
    cursor: Option<i64>,
) {
    st.connections.fetch_add(1, Ordering::SeqCst);
    st.cursors.lock().unwrap().push(cursor);
    let mut faults = {
        let mut f = st.faults.lock().unwrap();
        let now = f.clone();
        f.drop_after = None; // one-shot
        now
    };
    let planned = st.plan.lock().unwrap().pop_front().unwrap_or_default();
    if planned.drop_after.is_some() {
        faults.drop_after = planned.drop_after;
    }
    let cursor = match (cursor, planned.start_behind) {
        (Some(c), Some(behind)) => Some(c - behind),
        (c, _) => c,
    };
    let mut ws = fastwebsockets::FragmentCollector::new(ws);
    if planned.endless_fragments {
        let chunk = vec![0xa5u8; 1 << 20];
        let mut opcode = OpCode::Binary;
        while st.fragment_bytes.load(Ordering::SeqCst) < 256 << 20 {
            if ws.write_frame(Frame::new(false, opcode, None, Payload::Borrowed(&chunk))).await.is_err() {
                return;
            }
            st.fragment_bytes.fetch_add(chunk.len(), Ordering::SeqCst);
            opcode = OpCode::Continuation;
        }
        return;
    }
    if faults.silent {
        // Hold the socket open and say nothing until the client gives up.
        while let Ok(f) = ws.read_frame().await {
            if f.opcode == OpCode::Close {
                return;
            }
        }
        return;
    }
    if faults.refuse_future_cursor || planned.refuse_cursor {
        let newest = st.frames.lock().unwrap().last().map_or(0, |(s, _)| *s);
        if cursor.is_some_and(|c| c > newest || planned.refuse_cursor) {
            let _ = ws.write_frame(Frame::binary(Payload::Owned(super::frames::error_frame("FutureCursor")))).await;
            let _ = ws.write_frame(Frame::close(1000, b"")).await;
            return;
        }
    }
    // Inclusive replay, like rainbow: the frame at `cursor` is sent again.
    // The position and the seq space it is in, read together (under the frames' lock, which
    // `restart_seq_space` holds while it moves the space).
    let (mut next, mut space) = {
        let frames = st.frames.lock().unwrap();
        let next = match (cursor, planned.live_from) {
            (Some(c), _) | (None, Some(c)) => frames.iter().position(|(s, _)| *s >= c).unwrap_or(frames.len()),
            (None, None) => 0,
        };
        (next, st.space.load(Ordering::SeqCst))
    };
    let mut sent = 0usize;
    let mut sent_at = tokio::time::Instant::now();
    let mut repeats = planned.repeat_first;
    loop {
        let frame = {
            let frames = st.frames.lock().unwrap();
            let now = st.space.load(Ordering::SeqCst);
            if now != space {
                (space, next) = (now, 0);
            }
            frames.get(next).map(|(_, f)| f.clone())
        };
        match frame {
            Some(f) => {
                if faults.drop_after.is_some_and(|n| sent >= n) {
                    return; // drop the TCP connection without a close frame
                }
                let frame = if faults.text { Frame::text(Payload::Owned(f)) } else { Frame::binary(Payload::Owned(f)) };
                if ws.write_frame(frame).await.is_err() {
                    return;
                }
                if repeats > 0 {
                    repeats -= 1;
                } else {
                    next += 1;
                }
                sent += 1;
                sent_at = tokio::time::Instant::now();
                // Pacing is read live, so a test can slow down or speed up a connection.
                let (interval, burst) = {
                    let f = st.faults.lock().unwrap();
                    (f.frame_interval, f.burst)
                };
                if let Some(d) = interval {
                    if burst <= 1 || sent.is_multiple_of(burst) {
                        tokio::time::sleep(d).await;
                    }
                }
            }
            None => {
                if faults.close_when_quiet.is_some_and(|q| sent_at.elapsed() >= q) {
                    let _ = ws.write_frame(Frame::close(1000, b"idle")).await;
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await
            }
        }
    }
}
