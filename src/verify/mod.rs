//! Sync 1.1 verification in the service (`--verify off|signature|full`): a stage between the
//! relay reader and the sequencer. The checks themselves are the pure core's
//! (`contrail_core::verify`); this module resolves keys, keeps each repo's chain state and
//! applies the failure policy.
//!
//! - Frames pass through in order. Each commit's key is looked up when the frame arrives: a
//!   cached key checks at once; an uncached one is resolved in the background while later
//!   frames queue behind it (up to `--verify-queue` frames and the ingest queue's bytes), so
//!   one slow DID holds the stream at most `--did-resolve-timeout`, and many new DIDs resolve
//!   concurrently.
//! - `signature`: the commit's signature against the repo's `#atproto` key. `full`: also the
//!   inversion proof, and the chain — `since` and `prevData` continue the repo's last verified
//!   commit, whose state is stored with the events it admits (one write batch).
//! - Failures are counted by reason (`contrail_verify_failures_total{reason}`) and logged at a
//!   bounded rate; `--on-verify-failure drop` (default) drops the frame's events, `pass` keeps
//!   them. A repo whose DID cannot be resolved in time is a `resolve` failure, decided by
//!   `--on-resolve-failure` (default `pass`: the directory being slow is not evidence of a
//!   forgery; its events go on unverified and are counted).
//! - A chain break (a commit that does not continue the last one) marks the repo
//!   desynchronized; its next verified commit, or a `#sync`, anchors it again. So does a commit
//!   that was not verified (unresolved, or failed for another reason): it may be the repo's
//!   real next commit. A commit whose rev is not newer than the last (a replay) is a chain
//!   failure too. Only a commit that continues a verified one is marked `full`: an anchoring
//!   commit's `prevData` is unsigned and continues nothing, so its op list is not proven.
//! - Where repos may have moved on unseen, a new chain epoch starts ([`Epochs`]): after a gap
//!   the relay reader knows of (a seq jump, a relay reset, a live start), a commit that does
//!   not continue a state from before it anchors its repo again instead of failing as a chain
//!   break; after a run without chain checks, every repo's next commit anchors it again.
//! - A signature failure re-resolves the DID once (at most every ten minutes per DID), in case
//!   the key rotated; other failures meanwhile take its answer. An `#identity` event forgets
//!   the cached key; a commit checked before an `#identity` in front of it was applied is
//!   checked once more (the key may be the one it replaced), whether it failed or passed.

pub mod resolve;

use crate::log::Log;
use crate::metrics::{Metrics, Outcome};
use crate::rate_limited_log::RateLimitedLog;
use crate::sequencer::{IngestFrame, IngestReceiver, IngestSender};
use crate::units::{parse_duration, ser_duration};
use contrail_core::event::Verification;
use contrail_core::verify::{self, ChainLink, Checked, Failure, Level, PublicKey, Reason, RepoFrame, RepoState};
use resolve::{ResolveError, Resolver, ResolverOptions};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::OwnedSemaphorePermit;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// `--verify`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VerifyMode {
    Off,
    Signature,
    Full,
}

impl VerifyMode {
    pub fn level(self) -> Level {
        match self {
            VerifyMode::Off => Level::Off,
            VerifyMode::Signature => Level::Signature,
            VerifyMode::Full => Level::Full,
        }
    }
}

/// `--on-verify-failure`, `--on-resolve-failure`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    Drop,
    Pass,
}

/// The verification settings (`contrail serve` flags).
#[derive(clap::Args, Debug, Clone, serde::Serialize)]
pub struct VerifyConfig {
    /// Verify commits: off; signature (each commit's signature against its repo's DID key); or
    /// full (also the Sync 1.1 MST proof and each repo's chain of commits)
    #[arg(long, env = "CONTRAIL_VERIFY", value_enum, default_value = "off")]
    pub verify: VerifyMode,
    /// An event that fails verification (signature, proof, chain, malformed): drop it or pass
    /// it on; counted either way
    #[arg(long, env = "CONTRAIL_ON_VERIFY_FAILURE", value_enum, default_value = "drop")]
    pub on_verify_failure: OnFailure,
    /// An event whose repo's DID cannot be resolved within --did-resolve-timeout: pass it on
    /// unverified, or drop it; counted either way
    #[arg(long, env = "CONTRAIL_ON_RESOLVE_FAILURE", value_enum, default_value = "pass")]
    pub on_resolve_failure: OnFailure,
    /// The PLC directory did:plc documents are read from
    #[arg(long, env = "CONTRAIL_PLC_URL", default_value = "https://plc.directory")]
    pub plc_url: String,
    /// Longest wait for one DID document (connect, TLS, response)
    #[arg(long, env = "CONTRAIL_DID_RESOLVE_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub did_resolve_timeout: Duration,
    /// DID documents fetched at once, at most (and `did:web` documents a quarter as many more,
    /// apart: hosts that stall cannot take the directory's slots)
    #[arg(long, env = "CONTRAIL_DID_RESOLVE_CONCURRENCY", default_value = "32")]
    pub did_resolve_concurrency: usize,
    /// Signing keys kept in memory, ~300 bytes each (the store keeps every one it resolved)
    #[arg(long, env = "CONTRAIL_DID_CACHE_ENTRIES", default_value = "200000")]
    pub did_cache_entries: usize,
    /// A resolved key is used this long before it is resolved again (an #identity event, or a
    /// signature failure, refreshes it sooner)
    #[arg(long, env = "CONTRAIL_DID_CACHE_TTL", default_value = "24h", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub did_cache_ttl: Duration,
    /// Frames that may wait behind one whose DID is being resolved
    #[arg(long, env = "CONTRAIL_VERIFY_QUEUE", default_value = "4096")]
    pub verify_queue: usize,
    /// A repo's chain state is deleted (by compaction) once its last verified commit's rev is
    /// this old: its next commit anchors anew (marked `signature`). 0s: kept for ever. Stored
    /// keys are deleted once older than --did-cache-ttl (they are never used past it).
    #[arg(long, env = "CONTRAIL_VERIFY_STATE_TTL", default_value = "30d", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub verify_state_ttl: Duration,
    /// Tests only: fetch did:web documents over plain HTTP.
    #[arg(long, env = "CONTRAIL_DID_WEB_HTTP", hide = true)]
    #[serde(skip)]
    pub did_web_http: bool,
}

impl VerifyConfig {
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.verify == VerifyMode::Off {
            return Ok(());
        }
        if !(self.plc_url.starts_with("https://") || self.plc_url.starts_with("http://")) {
            return Err(("plc-url", format!("must be an http(s) URL: {}", self.plc_url)));
        }
        if self.did_cache_ttl < Duration::from_secs(60) {
            // Shorter, nearly every commit would wait for a DID document from the network.
            return Err(("did-cache-ttl", "must be at least 1m".into()));
        }
        if self.did_resolve_timeout.is_zero() {
            return Err(("did-resolve-timeout", "must be more than 0".into()));
        }
        if self.did_resolve_concurrency == 0 {
            return Err(("did-resolve-concurrency", "must be at least 1".into()));
        }
        if self.verify_queue == 0 {
            return Err(("verify-queue", "must be at least 1".into()));
        }
        Ok(())
    }

    pub fn resolver_options(&self) -> ResolverOptions {
        ResolverOptions {
            plc_url: self.plc_url.clone(),
            timeout: self.did_resolve_timeout,
            concurrency: self.did_resolve_concurrency,
            cache_entries: self.did_cache_entries,
            ttl: self.did_cache_ttl,
            did_web_http: self.did_web_http,
        }
    }
}

/// A repo's stored chain state: its last verified commit, whether the chain broke since, and
/// the epoch it was written in ([`start_epoch`]).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Chain {
    state: RepoState,
    desynchronized: bool,
    epoch: u64,
}

/// In a stored chain's first byte: an epoch follows (states written before epochs are epoch 0).
const WITH_EPOCH: u8 = 2;

impl Chain {
    fn encode(&self) -> Vec<u8> {
        // Epoch 0 in the older form, which a binary from before epochs still reads.
        let mut v = vec![self.desynchronized as u8 | if self.epoch > 0 { WITH_EPOCH } else { 0 }];
        if self.epoch > 0 {
            v.extend_from_slice(&self.epoch.to_be_bytes());
        }
        v.extend_from_slice(&self.state.encode());
        v
    }

    fn decode(v: &[u8]) -> Option<Chain> {
        let (&flag, mut rest) = v.split_first()?;
        let mut epoch = 0;
        if flag & WITH_EPOCH != 0 {
            epoch = u64::from_be_bytes(rest.get(..8)?.try_into().ok()?);
            rest = &rest[8..];
        }
        Some(Chain { state: RepoState::decode(rest)?, desynchronized: flag & 1 == 1, epoch })
    }
}

impl VerifyConfig {
    /// How the store lets the verification state age out (whatever the mode: state left by an
    /// earlier run ages too).
    pub fn state_expiry(&self) -> crate::log::rocks::StateExpiry {
        use crate::log::rocks::Expiry;
        crate::log::rocks::StateExpiry {
            repos: (!self.verify_state_ttl.is_zero())
                .then_some(Expiry { time_of: chain_time_us, keep_us: self.verify_state_ttl.as_micros() as u64 }),
            dids: Some(Expiry { time_of: resolve::entry_time_us, keep_us: self.did_cache_ttl.as_micros() as u64 }),
        }
    }
}

/// When a stored chain state's last verified commit was made (its rev's time): what it ages by.
fn chain_time_us(value: &[u8]) -> Option<u64> {
    contrail_core::syntax::tid_to_unix_us(&Chain::decode(value)?.state.rev)
}

/// Runs `f`, a store call that may wait (a read from disk; a write queued behind the
/// sequencer's fsync or a write stall), telling the runtime first so this worker's other tasks
/// move to another thread meanwhile (DESIGN.md invariant 10). Outside a multi-threaded
/// runtime it just runs `f`.
pub(crate) fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// The repos column's entry (not a DID) saying the current chain epoch and whether the last
/// run checked chains: `[epoch, u64 big-endian][1: full]`.
const EPOCH_KEY: &str = "#chains";

/// The repos column's entry saying the first epoch of the current stretch of runs that checked
/// chains, and the epoch it was written in: `[first, u64 big-endian][epoch, u64 big-endian]`.
/// A binary from before it moves only [`EPOCH_KEY`]; an entry whose epoch is not
/// [`EPOCH_KEY`]'s was left behind by such a run, and the current epoch is taken as the first.
const CHECKED_SINCE_KEY: &str = "#chains-checked-since";

/// Chain epochs. Within the current one, a commit that does not continue its repo's chain
/// state is a chain break. A new epoch starts wherever repos may have moved on unseen.
///
/// - After a gap the relay reader knows of ([`Stage::start_new_epoch`]): subscribers did not
///   see what the repo did in it either. A commit that does not continue a state from before
///   anchors its repo again (`signature`) instead of failing as a chain break (which dropped
///   one commit of every repo that moved in the gap); one that continues it is still `full`.
/// - With the first `full` run after one that did not check chains (`off`, `signature`; a
///   replica): its commits reached subscribers unchecked, so a commit continuing a state from
///   before it is not `full` (a repo restored from a backup continues an old state, but not
///   what subscribers were sent). States from before [`Epochs::checked_since`] anchor their
///   repo's next commit, whatever it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Epochs {
    pub current: u64,
    /// The epoch since which every run checked chains.
    pub checked_since: u64,
}

/// Records this run's `--verify` mode at start (whatever it is) and returns the chain epochs:
/// the first `full` run after one that did not check chains starts a new epoch, from which
/// chains are checked. A log from before epochs counts as last run without chain checks.
pub fn start_epoch(log: &Log, mode: VerifyMode) -> Result<Epochs, crate::log::LogError> {
    let stored = log.repo_state(EPOCH_KEY)?;
    let (old_epoch, was_full) = match &stored {
        Some(v) if v.len() == 9 => (u64::from_be_bytes(v[..8].try_into().expect("8 bytes")), v[8] == 1),
        // Not recorded: a new log, or one from before epochs, whose runs may have been `off`.
        // Taken as not full: at worst each repo's next commit anchors (`signature`, not `full`).
        _ => (0, false),
    };
    let stored_since = log.repo_state(CHECKED_SINCE_KEY)?;
    let old_since = match &stored_since {
        Some(v) if v.len() == 16 && v[8..] == old_epoch.to_be_bytes() => {
            u64::from_be_bytes(v[..8].try_into().expect("8 bytes"))
        }
        // Not recorded, or left behind by a binary that moved the epoch without it.
        _ => old_epoch,
    };
    let full = mode == VerifyMode::Full;
    let epochs = if full && !was_full {
        Epochs { current: old_epoch + 1, checked_since: old_epoch + 1 }
    } else {
        Epochs { current: old_epoch, checked_since: old_since }
    };
    let entries = epoch_entries(epochs, full);
    if stored.as_ref() != Some(&entries[0].1) || stored_since.as_ref() != Some(&entries[1].1) {
        log.append_with_states(&[], None, &entries)?;
    }
    Ok(epochs)
}

/// The [`EPOCH_KEY`] and [`CHECKED_SINCE_KEY`] entries for `epochs`.
fn epoch_entries(epochs: Epochs, full: bool) -> [(String, Vec<u8>); 2] {
    let mut epoch = epochs.current.to_be_bytes().to_vec();
    epoch.push(full as u8);
    let mut since = epochs.checked_since.to_be_bytes().to_vec();
    since.extend_from_slice(&epochs.current.to_be_bytes());
    [(EPOCH_KEY.to_string(), epoch), (CHECKED_SINCE_KEY.to_string(), since)]
}

/// Chain states this stage moved, in front of the store: a repo's state is read here before
/// its last write has reached the store. Bounded, least recently moved first out — a repo
/// leaves only after [`CHAINS_IN_MEMORY`] other moves, long after its write was stored (at
/// most a few thousand frames are between this stage and the log).
struct Chains {
    /// DID → (state, the generation of its last move).
    map: HashMap<String, (Chain, u64)>,
    /// Moves in order, `(DID, generation)`; stale entries (moved again since) are skipped.
    order: VecDeque<(String, u64)>,
    generation: u64,
}

const CHAINS_IN_MEMORY: usize = 200_000;

impl Chains {
    fn new() -> Chains {
        Chains { map: HashMap::new(), order: VecDeque::new(), generation: 0 }
    }

    /// The repo's last state; an unreadable store is an error (our own store failing), never
    /// "a new repo". A state from before `checked_since` is desynchronized: the repo may have
    /// moved on unchecked.
    fn get(&self, did: &str, log: &Log, checked_since: u64) -> Result<Option<Chain>, crate::log::LogError> {
        let chain = match self.map.get(did) {
            Some((c, _)) => Some(c.clone()),
            None => blocking(|| log.repo_state(did))?.and_then(|v| Chain::decode(&v)),
        };
        Ok(chain.map(|mut c| {
            c.desynchronized |= c.epoch < checked_since;
            c
        }))
    }

    fn put(&mut self, did: &str, chain: Chain, frame: &mut IngestFrame) {
        frame.repo_states.push((did.to_string(), chain.encode()));
        self.generation += 1;
        self.map.insert(did.to_string(), (chain, self.generation));
        self.order.push_back((did.to_string(), self.generation));
        while self.map.len() > CHAINS_IN_MEMORY {
            let Some((old, generation)) = self.order.pop_front() else { break };
            if self.map.get(&old).is_some_and(|(_, g)| *g == generation) {
                self.map.remove(&old);
            }
        }
        if self.order.len() > 2 * CHAINS_IN_MEMORY {
            let map = &self.map;
            self.order.retain(|(d, g)| map.get(d).is_some_and(|(_, current)| current == g));
        }
    }
}

/// What a worker found out about a frame, off the in-order path: the repo and the stateless
/// checks (signature, proof). The chain is checked in order, in [`Stage::process`].
struct Prepared {
    did: String,
    /// `None` for a `#sync`.
    link: Option<ChainLink>,
    result: Result<Checked, Problem>,
    /// Its signature checked only against a key the repo rotated away from (a catch-up across
    /// a rotation): whoever holds that key now may not be the repo, so never `full`.
    former_key: bool,
}

enum Problem {
    Failed(Failure),
    Unresolved(ResolveError),
}

/// A frame's verification work, started when it arrives.
enum Work {
    /// Nothing to verify (no raw frame, or a frame that carries no commit).
    None,
    Running(JoinHandle<Result<Option<Box<Prepared>>, Failure>>),
    Done(Result<Option<Box<Prepared>>, Failure>),
}

struct Pending {
    frame: IngestFrame,
    /// The frame's share of the ingest queue's byte budget, held until it is passed on.
    _permit: OwnedSemaphorePermit,
    work: Work,
    /// [`Resolver::forgets`] when its work started, and whether it was started again.
    forgets: u64,
    checked_again: Option<CheckedAgain>,
    /// [`Resolver::forgets`] when it was queued: never more than `forgets`, and never less
    /// along the queue, so the front's is the least of all.
    queued_at: u64,
    /// Shared with its work: whether it waits for its repo's key.
    wait: Arc<KeyWait>,
}

/// Where a frame's work stands, shared between it and the stage (one lock, so that the stage
/// gives up only a wait still going on, and the task sees it): what it waits for over the
/// network, since when, and whether the stage stopped waiting for it.
#[derive(Default)]
struct KeyWait(std::sync::Mutex<WaitState>);

#[derive(Default)]
struct WaitState {
    waiting: Option<(Waiting, tokio::time::Instant)>,
    given_up: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Waiting {
    /// The repo's key: given up, the frame is unresolved.
    Key,
    /// A newer key or the repo's former keys, after its signature failed against the one it
    /// had: given up, the signature failed.
    AfterSignatureFailure,
}

impl KeyWait {
    fn lock(&self) -> std::sync::MutexGuard<'_, WaitState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn since(&self) -> Option<tokio::time::Instant> {
        self.lock().waiting.map(|(_, t)| t)
    }

    fn begin(&self, what: Waiting) {
        self.lock().waiting = Some((what, tokio::time::Instant::now()));
    }

    /// The wait is over; false if the stage gave it up (nobody waits for the frame's result).
    fn end(&self) -> bool {
        let mut s = self.lock();
        s.waiting = None;
        !s.given_up
    }

    /// Gives up a wait that has gone on for `patience`: what it waited for.
    fn give_up(&self, patience: Duration) -> Option<Waiting> {
        let mut s = self.lock();
        let (what, since) = s.waiting?;
        (since.elapsed() >= patience).then(|| {
            s.given_up = true;
            what
        })
    }
}

/// What a frame's first check said, when it ran against a key an `#identity` in front of it
/// may have replaced and was started again ([`Pending::checked_before_a_forget`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum CheckedAgain {
    /// Its signature failed: the new key may sign it.
    AfterFailure,
    /// It passed: the key that signs it may be one the repo no longer holds.
    AfterPass,
}

impl Pending {
    /// What its check said if it ran against a key looked up before an `#identity` event of
    /// its repo in front of it was applied (checks run ahead of the in-order apply): the key
    /// may be the one that event replaced, so it is checked again, once — a failure may pass
    /// with the new key, and a pass may be a signature by a key the repo rotated away from
    /// (`signature` at best then, never `full`, or a failure if made after the rotation).
    fn checked_before_a_forget(&self, forgotten: &HashMap<String, u64>) -> Option<CheckedAgain> {
        let Work::Done(Ok(Some(p))) = &self.work else { return None };
        if self.checked_again.is_some() || forgotten.get(&p.did).is_none_or(|at| *at <= self.forgets) {
            return None;
        }
        match p.result {
            Ok(_) => Some(CheckedAgain::AfterPass),
            Err(Problem::Failed(Failure::Signature)) => Some(CheckedAgain::AfterFailure),
            Err(_) => None,
        }
    }
}

/// The checks that need no state: run for each frame on the runtime's workers, so both cores
/// verify while the frames still leave in order. What can be checked without the key comes
/// first (a malformed frame costs no directory request); after a signature failure the key is
/// resolved again once, in case it rotated (at most every ten minutes per DID).
async fn prepare(
    raw: bytes::Bytes,
    resolver: Arc<Resolver>,
    level: Level,
    seconds: prometheus::Histogram,
    wait: Arc<KeyWait>,
) -> Result<Option<Box<Prepared>>, Failure> {
    let Some(parsed) = verify::read_frame(&raw)? else { return Ok(None) };
    let (did, link) = match &parsed {
        RepoFrame::Commit(c) => (c.repo.to_string(), Some(c.link())),
        RepoFrame::Sync(s) => (s.did.to_string(), None),
    };
    let prepared =
        |result, former_key| Ok(Some(Box::new(Prepared { did: did.clone(), link: link.clone(), result, former_key })));
    if let Err(f) = verify::precheck(&parsed) {
        return prepared(Err(Problem::Failed(f)), false);
    }
    // Given up, the frame has gone on without this task's answer: the lookup's answer is
    // cached (or its failure remembered) for the repo's next frames; checking this one would
    // be work for nobody.
    wait.begin(Waiting::Key);
    let asked = resolver.requests_begun();
    let key = resolver.key(&did).await;
    if !wait.end() {
        return Ok(None);
    }
    let key = match key {
        Ok(k) => k,
        Err(e) => return prepared(Err(Problem::Unresolved(e)), false),
    };
    let started = Instant::now();
    let mut checked = check(&parsed, &key, level);
    seconds.observe(started.elapsed().as_secs_f64());
    if checked == Err(Failure::Signature) {
        wait.begin(Waiting::AfterSignatureFailure);
        let new_key = resolver.refresh_after_failure(&did, &key, asked).await;
        if !wait.end() {
            return Ok(None);
        }
        if let Some(new_key) = new_key {
            checked = check(&parsed, &new_key, level);
        }
    }
    let mut former_key = false;
    if let (Err(Failure::Signature), RepoFrame::Commit(c)) = (&checked, &parsed) {
        // Signed with a key the repo rotated away from lately? (A catch-up across a rotation
        // meets commits older than the repo's current key.) Chosen by the commit's signed rev.
        wait.begin(Waiting::AfterSignatureFailure);
        let history = resolver.key_history(&did).await;
        if !wait.end() {
            return Ok(None);
        }
        if let (Some(made), Some(history)) = (rev_time_us(c.rev), history) {
            let lately = crate::clock::now_us() as i64 - FORMER_KEY_WINDOW.as_micros() as i64;
            for former in history.former_keys_at(made, REV_CLOCK_SKEW.as_micros() as i64, lately) {
                checked = check(&parsed, former, level);
                if checked.is_ok() {
                    former_key = true;
                    break;
                }
            }
        }
    }
    prepared(checked.map_err(Problem::Failed), former_key)
}

/// A key a repo rotated away from signs its commits for this long after (a relay's backfill
/// is a few days at most): long enough to catch up across the rotation, not for ever (a key is
/// often rotated because it leaked). Under `full`, the repo's first commit with its new key
/// closes the window too (the rev must move forward).
const FORMER_KEY_WINDOW: Duration = Duration::from_secs(72 * 3600);

/// How far ahead of the directory's clock a PDS's may run: a commit made just before a
/// rotation may carry a rev a little after it.
const REV_CLOCK_SKEW: Duration = Duration::from_secs(300);

/// When a commit was made, by its rev (a TID; signed).
fn rev_time_us(rev: &str) -> Option<i64> {
    contrail_core::syntax::tid_to_unix_us(rev).map(|t| t as i64)
}

/// How far past this clock a rev may be to move a repo's chain. A rev only moves forward, so
/// one from far ahead (a PDS clock bug, a stolen key; `jzzzzzzzzzzzz` is the year 2255) would
/// have every later commit refused as "not after" it, for good: the state ages by the rev's
/// time too. The indigo relay refuses revs 5 minutes ahead; an hour leaves room for this clock
/// being behind.
const FUTURE_REV_TOLERANCE: Duration = Duration::from_secs(3600);

fn rev_far_ahead(rev: &str) -> bool {
    rev_time_us(rev).is_some_and(|t| t > crate::clock::now_us() as i64 + FUTURE_REV_TOLERANCE.as_micros() as i64)
}

fn check(parsed: &RepoFrame<'_>, key: &PublicKey, level: Level) -> Result<Checked, Failure> {
    match parsed {
        RepoFrame::Commit(c) => verify::check_commit(c, key, level),
        RepoFrame::Sync(s) => verify::check_sync(s, key).map(|state| Checked { state, proven: false }),
    }
}

/// The verification stage.
pub struct Stage {
    cfg: VerifyConfig,
    level: Level,
    /// A commit that does not continue a chain state of an earlier epoch anchors its repo
    /// again; it is not a chain break ([`Epochs`]).
    epochs: Epochs,
    resolver: Arc<Resolver>,
    log: Arc<Log>,
    metrics: Arc<Metrics>,
    chains: Chains,
    /// A repo's chain state that could not be read while applying the frame in hand.
    unreadable: Option<crate::log::LogError>,
    warn: RateLimitedLog,
    /// DIDs whose key an `#identity` event made forget, with [`Resolver::forgets`] just after:
    /// a pending frame of theirs whose check started before is checked again.
    forgotten: HashMap<String, u64>,
}

impl Stage {
    pub fn new(cfg: VerifyConfig, log: Arc<Log>, metrics: Arc<Metrics>, epochs: Epochs) -> anyhow::Result<Stage> {
        let resolver = Arc::new(Resolver::new(cfg.resolver_options(), log.clone(), &metrics)?);
        Ok(Stage {
            epochs,
            level: cfg.verify.level(),
            cfg,
            resolver,
            log,
            metrics,
            chains: Chains::new(),
            unreadable: None,
            warn: RateLimitedLog::new(Duration::from_secs(10)),
            forgotten: HashMap::new(),
        })
    }

    /// Passes frames from `rx` to `tx`, verified, in order, until `rx` ends or `cancel`
    /// fires. Frames still waiting then are not passed on: their relay seq was not stored, so
    /// the relay sends them again after a restart. An error when the store cannot be read (a
    /// repo's chain state): our own store failing stops ingest (DESIGN.md invariant 6); the
    /// frame is not passed on, so the relay sends it again after a restart.
    pub async fn run(
        mut self,
        mut rx: IngestReceiver,
        tx: IngestSender,
        cancel: CancellationToken,
    ) -> anyhow::Result<()> {
        let mut pending: VecDeque<Pending> = VecDeque::new();
        // The ingest queue's bytes the pending frames hold.
        let mut held_bytes = 0usize;
        let mut closed = false;
        loop {
            while pending.front().is_some_and(|p| !matches!(p.work, Work::Running(_))) {
                if self.check_again(pending.front_mut().expect("front exists")) {
                    break;
                }
                let p = pending.pop_front().expect("front exists");
                held_bytes -= p._permit.num_permits();
                let forgets = self.resolver.forgets();
                let frame = match self.process(p.frame, p.work).await {
                    Ok(frame) => frame,
                    Err(e) => {
                        for p in &pending {
                            if let Work::Running(h) = &p.work {
                                h.abort();
                            }
                        }
                        return Err(anyhow::Error::new(e).context("reading a repo's chain state"));
                    }
                };
                if self.resolver.forgets() != forgets {
                    // An #identity: the checks of its repo's frames behind it start again together.
                    for p in pending.iter_mut() {
                        self.check_again(p);
                    }
                }
                if tx.send(frame).await.is_err() {
                    return Ok(());
                }
            }
            // Nothing pending started before these forgets any more.
            if !self.forgotten.is_empty() {
                let oldest = pending.front().map_or(u64::MAX, |p| p.queued_at);
                self.forgotten.retain(|_, at| *at > oldest);
            }
            if closed && pending.is_empty() {
                return Ok(());
            }
            let room = !closed && pending.len() < self.cfg.verify_queue;
            // A full queue (its frames, or half the ingest queue's bytes) behind a front that
            // waits over the network (for its repo's key, or a newer one after its signature
            // failed) waits no longer than FULL_QUEUE_PATIENCE from the wait's start; then the
            // front goes on as unresolved, or as a signature failure. Looked at again every
            // tenth of a second while the front is at other work (its checks, on a busy CPU).
            let full = !room || held_bytes >= rx.max_bytes() / 2;
            let patience = pending.front().filter(|p| full && !closed && matches!(p.work, Work::Running(_))).map(|p| {
                p.wait.since().map_or_else(
                    || tokio::time::Instant::now() + Duration::from_millis(100),
                    |since| since + FULL_QUEUE_PATIENCE,
                )
            });
            tokio::select! {
                biased;
                _ = cancel.cancelled() => {
                    for p in &pending {
                        if let Work::Running(h) = &p.work {
                            h.abort();
                        }
                    }
                    return Ok(());
                }
                done = wait_front(&mut pending) => {
                    if let Some(p) = pending.front_mut() {
                        p.work = Work::Done(done);
                    }
                }
                _ = tokio::time::sleep_until(patience.unwrap_or_else(tokio::time::Instant::now)), if patience.is_some() => {
                    if let Some(p) = pending.front_mut() {
                        if matches!(p.work, Work::Running(_)) {
                            // Its lookup goes on (the task, detached): its answer is cached, or
                            // its failure remembered, for the repo's next frames. A frame whose
                            // signature failed already (a check started again after an
                            // #identity too) goes on as failed, not unresolved; one that passed
                            // with the key an #identity then replaced goes on as unresolved,
                            // whatever its second check was waiting for.
                            if let Some(what) = p.wait.give_up(FULL_QUEUE_PATIENCE) {
                                let problem = match (what, p.checked_again) {
                                    (_, Some(CheckedAgain::AfterPass)) | (Waiting::Key, None) => {
                                        Problem::Unresolved(ResolveError::GivenUp)
                                    }
                                    _ => Problem::Failed(Failure::Signature),
                                };
                                p.work = given_up(&p.frame, problem);
                            }
                        }
                    }
                }
                next = rx.recv(), if room => match next {
                    Some((frame, permit)) => {
                        let forgets = self.resolver.forgets();
                        let (work, wait) = match &frame.raw {
                            Some(raw) => self.start(raw.clone()),
                            None => (Work::None, Arc::default()),
                        };
                        held_bytes += permit.num_permits();
                        pending.push_back(Pending {
                            frame,
                            _permit: permit,
                            work,
                            forgets,
                            checked_again: None,
                            queued_at: forgets,
                            wait,
                        });
                    }
                    None => closed = true,
                },
            }
        }
    }

    /// Starts `p`'s checks again if they ran before an `#identity` of its repo was applied;
    /// whether it did.
    fn check_again(&self, p: &mut Pending) -> bool {
        let Some(earlier) = p.checked_before_a_forget(&self.forgotten) else { return false };
        let Some(raw) = &p.frame.raw else { return false };
        (p.work, p.wait) = self.start(raw.clone());
        (p.forgets, p.checked_again) = (self.resolver.forgets(), Some(earlier));
        true
    }

    /// Starts a frame's stateless checks.
    fn start(&self, raw: bytes::Bytes) -> (Work, Arc<KeyWait>) {
        let wait = Arc::new(KeyWait::default());
        let work = Work::Running(tokio::spawn(prepare(
            raw,
            self.resolver.clone(),
            self.level,
            self.metrics.verify_seconds.clone(),
            wait.clone(),
        )));
        (work, wait)
    }

    /// Applies a frame's checks in order, or an error when a repo's chain state cannot be read.
    async fn process(&mut self, frame: IngestFrame, work: Work) -> Result<IngestFrame, crate::log::LogError> {
        let frame = self.apply(frame, work).await;
        match self.unreadable.take() {
            Some(e) => Err(e),
            None => Ok(frame),
        }
    }

    /// The repo's chain state; `None` when the store cannot be read (kept in `unreadable`:
    /// [`Self::process`] then fails, whatever this frame's verdict would have been).
    fn chain(&mut self, did: &str) -> Option<Option<Chain>> {
        match self.chains.get(did, &self.log, self.epochs.checked_since) {
            Ok(chain) => Some(chain),
            Err(e) => {
                self.unreadable.get_or_insert(e);
                None
            }
        }
    }

    async fn apply(&mut self, mut frame: IngestFrame, work: Work) -> IngestFrame {
        if frame.after_gap && self.level == Level::Full {
            self.start_new_epoch(&mut frame);
        }
        let Some(raw) = frame.raw.take() else { return frame };
        let prepared = match work {
            Work::Done(Ok(Some(p))) => p,
            Work::Done(Ok(None)) | Work::None => {
                // An #identity frame may announce a new key: read from the frame, so one the
                // transcoder dropped (an unreadable `time`, a handle too long) does too.
                if let Some(did) = verify::identity_did(&raw) {
                    self.resolver.forget(did);
                    self.forgotten.insert(did.to_string(), self.resolver.forgets());
                }
                return frame;
            }
            Work::Done(Err(f)) => {
                // Unreadable as a commit, it may still be the repo's real next one (one the
                // transcoder took, or an oversized one the relay passed): the repo's next
                // commit anchors again rather than failing as a chain break.
                match verify::frame_repo(&raw) {
                    Some(did) => {
                        if self.lose_track(did, &mut frame) {
                            self.fail(&mut frame, did, f);
                        }
                    }
                    None => self.fail(&mut frame, "?", f),
                }
                return frame;
            }
            Work::Running(_) => unreachable!("only finished work is processed"),
        };
        let Prepared { did, link, result, former_key } = *prepared;
        let checked = match result {
            Ok(c) => c,
            Err(Problem::Unresolved(e)) => {
                // A commit or #sync not checked may be the repo's real next one (a #sync: its
                // new state): the repo's next commit anchors again.
                if self.lose_track(&did, &mut frame) {
                    self.unresolved(&mut frame, &did, &e);
                }
                return frame;
            }
            Err(Problem::Failed(f)) => {
                // A commit or #sync that failed may still be the repo's real next one (checked
                // against a key its `#identity` had just replaced, given up at a full queue):
                // the repo's next commit anchors again rather than failing as a chain break.
                // A forgery costs that commit its `full` mark, no more.
                if self.lose_track(&did, &mut frame) {
                    self.fail(&mut frame, &did, f);
                }
                return frame;
            }
        };
        match link {
            Some(link) => {
                if self.level == Level::Full {
                    let Some(last) = self.chain(&did) else { return frame };
                    // Only a commit that continues a verified one has its op list proven
                    // complete: `prevData` is not signed, so on a repo's first commit (or the
                    // first after a break) a relay could drop an op and recompute it.
                    let mut continues = last.as_ref().is_some_and(|l| !l.desynchronized);
                    if rev_far_ahead(&link.rev) {
                        // It may be the repo's real next commit (a PDS clock ahead): the one
                        // after it anchors again rather than breaking a chain.
                        if self.lose_track(&did, &mut frame) {
                            self.fail(&mut frame, &did, Failure::Chain("rev more than an hour ahead of this clock"));
                        }
                        return frame;
                    }
                    if let Some(l) = &last {
                        if link.rev <= l.state.rev {
                            // A replay of an older commit: refused, and the chain stays where it
                            // is (it must not move a repo backwards, desynchronized or not).
                            self.fail(&mut frame, &did, Failure::Chain("rev not after the repo's last"));
                            return frame;
                        }
                        if !l.desynchronized {
                            if let Err(f) = verify::check_chain(Some(&l.state), &link) {
                                self.metrics.verify_desynchronized.inc();
                                if l.epoch < self.epochs.current {
                                    // The repo moved on while we could not see it (a gap, a
                                    // run without chain checks): this commit anchors it again.
                                    continues = false;
                                } else {
                                    let state = l.state.clone();
                                    self.chains.put(
                                        &did,
                                        Chain { state, desynchronized: true, epoch: self.epochs.current },
                                        &mut frame,
                                    );
                                    self.fail(&mut frame, &did, f);
                                    return frame;
                                }
                            }
                        }
                    }
                    // Continues the chain, anchors a new repo, or re-anchors a desynchronized one.
                    // A commit the transcoder dropped part or all of moves the repo on, but what
                    // subscribers saw of it is not all of it: the next commit anchors again. So
                    // does the one after a commit only a former key signs: that may be whoever
                    // holds a leaked key, and the repo's real next commit, not continuing it,
                    // must not be dropped as a break in the chain.
                    let desynchronized = frame.incomplete || former_key;
                    if desynchronized && continues {
                        self.metrics.verify_desynchronized.inc();
                    }
                    self.chains.put(
                        &did,
                        Chain { state: checked.state, desynchronized, epoch: self.epochs.current },
                        &mut frame,
                    );
                    if !continues || frame.incomplete {
                        self.outcome(Outcome::Verified);
                        mark_events(&mut frame, Verification::Signature);
                        return frame;
                    }
                }
                self.outcome(Outcome::Verified);
                let full = checked.proven && !former_key;
                mark_events(&mut frame, if full { Verification::Full } else { Verification::Signature });
            }
            None => {
                let state = checked.state;
                if self.level == Level::Full && rev_far_ahead(&state.rev) {
                    if self.lose_track(&did, &mut frame) {
                        self.fail(&mut frame, &did, Failure::Chain("rev more than an hour ahead of this clock"));
                    }
                    return frame;
                }
                if self.level == Level::Full {
                    let Some(last) = self.chain(&did) else { return frame };
                    let newer = |l: &Chain| state.rev > l.state.rev;
                    if last.as_ref().is_none_or(newer) {
                        // "This is the repo now": the chain continues from here. A sync no
                        // newer than what we know changes nothing; one the transcoder dropped
                        // was not seen by subscribers, so the next commit anchors again.
                        let desynchronized = frame.incomplete;
                        if desynchronized && last.as_ref().is_some_and(|l| !l.desynchronized) {
                            self.metrics.verify_desynchronized.inc();
                        }
                        self.chains.put(&did, Chain { state, desynchronized, epoch: self.epochs.current }, &mut frame);
                    }
                }
                self.outcome(Outcome::Verified);
                // A sync is a signed commit alone: its signature is all there is.
                mark_events(&mut frame, Verification::Signature);
            }
        }
        frame
    }

    /// The relay reader knows frames may be missing before `frame` (a seq jump, a frame
    /// skipped for its seq, a relay reset, a live start): any repo may have moved on unseen,
    /// so a commit that does not continue its repo's state from before anchors it again
    /// ([`Epochs`]). The new epoch is stored with the frame: a restart keeps it, and one before
    /// the frame is stored meets the gap again.
    fn start_new_epoch(&mut self, frame: &mut IngestFrame) {
        self.epochs.current += 1;
        frame.repo_states.extend(epoch_entries(self.epochs, true));
        let (seq, epoch) = (frame.seq, self.epochs.current);
        self.warn.warn("chain_epoch", || {
            format!("frames may be missing before seq {seq:?}: chain epoch {epoch}, each repo's next commit that does not continue its chain anchors it again")
        });
    }

    /// A commit of `did` that was not verified (its key unresolved, or a failure other than the
    /// chain's) may still be the repo's real next commit: the next one would then name it in
    /// `since` and fail as a chain break. So the chain is marked broken, and the next verified
    /// commit anchors it again, as after any break. False when the repo's state cannot be
    /// read (the stage then stops: nothing is to be counted for this frame, which is not
    /// stored and comes again after a restart).
    fn lose_track(&mut self, did: &str, frame: &mut IngestFrame) -> bool {
        if self.level != Level::Full {
            return true;
        }
        let Some(last) = self.chain(did) else { return false };
        if let Some(l) = last.filter(|l| !l.desynchronized) {
            self.metrics.verify_desynchronized.inc();
            self.chains.put(did, Chain { state: l.state, desynchronized: true, epoch: self.epochs.current }, frame);
        }
        true
    }

    fn outcome(&self, o: Outcome) {
        self.metrics.verify_commits.with_label_values(&[o.as_str()]).inc();
    }

    fn failure(&self, reason: Reason) {
        self.metrics.verify_failures.with_label_values(&[reason.as_str()]).inc();
    }

    fn drop_events(&self, frame: &mut IngestFrame) {
        self.metrics.verify_dropped_events.inc_by(frame.events.len() as u64);
        frame.events.clear();
    }

    fn fail(&mut self, frame: &mut IngestFrame, did: &str, f: Failure) {
        self.outcome(Outcome::Failed);
        self.failure(f.reason());
        let drop = self.cfg.on_verify_failure == OnFailure::Drop;
        let seq = frame.seq;
        self.warn.warn(f.reason().as_str(), || {
            format!("verification failed for {did} (seq {seq:?}): {f}; {}", if drop { "dropped" } else { "passed" })
        });
        if drop {
            self.drop_events(frame);
        } else {
            mark_events(frame, Verification::Failed);
        }
    }

    fn unresolved(&mut self, frame: &mut IngestFrame, did: &str, e: &ResolveError) {
        self.outcome(Outcome::Unresolved);
        self.failure(Reason::Resolve);
        let drop = self.cfg.on_resolve_failure == OnFailure::Drop;
        let seq = frame.seq;
        self.warn.warn("resolve", || {
            format!(
                "could not resolve {did} (seq {seq:?}): {e}; {}",
                if drop { "dropped" } else { "passed unverified" }
            )
        });
        if drop {
            self.drop_events(frame);
        } else {
            mark_events(frame, Verification::Unresolved);
        }
    }
}

/// How long a front frame at work holds a full queue (see [`Stage::run`]).
const FULL_QUEUE_PATIENCE: Duration = Duration::from_secs(1);

/// The work of a frame whose wait over the network was given up: `problem` (its task passed
/// the frame's own checks, which come first, before it began to wait).
fn given_up(frame: &IngestFrame, problem: Problem) -> Work {
    let Some(raw) = &frame.raw else { return Work::None };
    let parsed = match verify::read_frame(raw) {
        Ok(Some(p)) => p,
        Ok(None) => return Work::Done(Ok(None)),
        Err(f) => return Work::Done(Err(f)),
    };
    let (did, link) = match &parsed {
        RepoFrame::Commit(c) => (c.repo.to_string(), Some(c.link())),
        RepoFrame::Sync(s) => (s.did.to_string(), None),
    };
    let result = Err(problem);
    Work::Done(Ok(Some(Box::new(Prepared { did, link, result, former_key: false }))))
}

/// The front frame's work, once finished; never resolves when it has none running.
async fn wait_front(pending: &mut VecDeque<Pending>) -> Result<Option<Box<Prepared>>, Failure> {
    match pending.front_mut() {
        Some(Pending { work: Work::Running(handle), .. }) => match handle.await {
            Ok(r) => r,
            // A panic in a check is a bug; the frame is counted as malformed, never passed as
            // verified.
            Err(_) => Err(Failure::Malformed("the verification task failed")),
        },
        _ => std::future::pending().await,
    }
}

fn mark_events(frame: &mut IngestFrame, v: Verification) {
    for e in &mut frame.events {
        e.verification = v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::rocks::{RocksLog, RocksOptions};

    /// A rev made at `unix_us`.
    fn rev_at(unix_us: u64) -> String {
        const S32: &[u8] = b"234567abcdefghijklmnopqrstuvwxyz";
        let mut v = unix_us << 10;
        let mut out = [b'2'; 13];
        for c in out.iter_mut().rev() {
            *c = S32[(v % 32) as usize];
            v /= 32;
        }
        String::from_utf8(out.to_vec()).unwrap()
    }

    /// Runs in turn over one log: each `full` run after one without chain checks starts an
    /// epoch from which chains are checked; a gap moves only the current epoch; an entry a
    /// binary from before the first checked epoch left behind is not believed.
    #[test]
    fn chain_epochs_across_runs_and_gaps() {
        let log = Log::memory(crate::log::memory::MemoryLog::new(1 << 20));
        let start = |mode| start_epoch(&log, mode).unwrap();
        let epochs = |current, checked_since| Epochs { current, checked_since };
        assert_eq!(start(VerifyMode::Full), epochs(1, 1), "a new log");
        assert_eq!(start(VerifyMode::Full), epochs(1, 1), "full after full");
        // Two gaps in a full run, stored with their frames.
        log.append_with_states(&[], None, &epoch_entries(epochs(3, 1), true)).unwrap();
        assert_eq!(start(VerifyMode::Full), epochs(3, 1), "gaps start epochs, not checks");
        assert_eq!(start(VerifyMode::Signature), epochs(3, 1));
        assert_eq!(start(VerifyMode::Full), epochs(4, 4), "full after a run without chain checks");
        assert_eq!(start(VerifyMode::Off), epochs(4, 4));
        assert_eq!(start(VerifyMode::Off), epochs(4, 4));
        assert_eq!(start(VerifyMode::Full), epochs(5, 5));
        // A binary from before the first-checked entry moved the epoch alone (an `off` run,
        // then a `full` one): its entry is stale, and nothing before the epoch is believed.
        log.append_with_states(&[], None, &[epoch_entries(epochs(7, 7), true)[0].clone()]).unwrap();
        assert_eq!(start(VerifyMode::Full), epochs(7, 7));
        // A log from before epochs.
        let old = Log::memory(crate::log::memory::MemoryLog::new(1 << 20));
        assert_eq!(start_epoch(&old, VerifyMode::Signature).unwrap(), epochs(0, 0));
        assert_eq!(start_epoch(&old, VerifyMode::Full).unwrap(), epochs(1, 1));
    }

    /// Our own store failing to give a repo's chain state is not a verdict on the repo (it was
    /// a chain failure: under `--on-verify-failure drop` the commit's events were dropped, its
    /// relay seq stored, and ingest went on without them): the stage stops, and the frame is
    /// not passed on (the relay sends it again after a restart).
    #[tokio::test]
    async fn an_unreadable_chain_state_stops_the_stage_instead_of_failing_the_commit() {
        #[derive(clap::Parser)]
        struct Flags {
            #[command(flatten)]
            verify: VerifyConfig,
        }
        use clap::Parser;
        let config = Flags::try_parse_from(["verify", "--verify", "full"]).unwrap().verify;
        let memory = crate::log::memory::MemoryLog::new(1 << 20);
        memory.make_repo_states_unreadable_for_test();
        let metrics = Arc::new(Metrics::new());
        let epochs = Epochs { current: 1, checked_since: 1 };
        let mut stage = Stage::new(config, Arc::new(Log::memory(memory)), metrics.clone(), epochs).unwrap();
        let rev = rev_at(crate::clock::now_us());
        let checked = |did: &str| Prepared {
            did: did.into(),
            link: Some(ChainLink { rev: rev.clone(), since: None, prev_data: Some(vec![1]) }),
            result: Ok(Checked { state: RepoState { rev: rev.clone(), data: vec![2] }, proven: true }),
            former_key: false,
        };
        let frame = || IngestFrame { raw: Some(bytes::Bytes::from_static(b"a frame")), ..Default::default() };
        let got = stage.process(frame(), Work::Done(Ok(Some(Box::new(checked("did:plc:a")))))).await;
        assert!(got.is_err(), "a commit whose repo's state cannot be read");
        // A failed commit's repo loses track of its chain: that reads the state too.
        let failed = Prepared { result: Err(Problem::Failed(Failure::Signature)), ..checked("did:plc:b") };
        let got = stage.process(frame(), Work::Done(Ok(Some(Box::new(failed))))).await;
        assert!(got.is_err(), "a failed commit whose repo's state cannot be read");
        // Nothing counted for frames that are not stored (they come again after a restart).
        for reason in [Reason::Chain, Reason::Signature] {
            assert_eq!(metrics.verify_failures.with_label_values(&[reason.as_str()]).get(), 0, "{reason:?}");
        }
        assert_eq!(metrics.verify_commits.with_label_values(&[Outcome::Failed.as_str()]).get(), 0);
    }

    #[test]
    fn aged_out_verification_state_is_dropped_by_compaction() {
        let day = 24 * 3600 * 1_000_000u64;
        let now = crate::clock::now_us();
        #[derive(clap::Parser)]
        struct Flags {
            #[command(flatten)]
            verify: VerifyConfig,
        }
        use clap::Parser;
        let mut config =
            Flags::try_parse_from(["verify", "--verify-state-ttl", "30d", "--did-cache-ttl", "24h"]).unwrap().verify;
        let dir = tempfile::tempdir().unwrap();
        let opts = RocksOptions { sync_writes: false, state_expiry: config.state_expiry(), ..Default::default() };
        let log = RocksLog::open(dir.path(), opts).unwrap();
        let chain = |rev_us: u64| {
            Chain { state: RepoState { rev: rev_at(rev_us), data: vec![1, 2, 3] }, desynchronized: false, epoch: 2 }
                .encode()
        };
        let states: Vec<(String, Vec<u8>)> = vec![
            ("did:plc:quiet".into(), chain(now - 31 * day)),
            ("did:plc:active".into(), chain(now - 29 * day)),
            // Not a chain state: always kept.
            (EPOCH_KEY.into(), vec![0; 9]),
        ];
        log.append(&[], None, &states, &[], None).unwrap();
        let entry = |fetched_us: u64| {
            let mut v = fetched_us.to_be_bytes().to_vec();
            v.extend_from_slice(b"did:key:zQ3sh");
            v
        };
        log.put_did_entry("did:plc:stale", Some(&entry(now - 2 * day))).unwrap();
        log.put_did_entry("did:plc:fresh", Some(&entry(now - day / 2))).unwrap();
        log.compact_state().unwrap();
        assert!(log.repo_state("did:plc:quiet").unwrap().is_none(), "a repo silent for 31 days");
        assert!(log.repo_state("did:plc:active").unwrap().is_some());
        assert!(log.repo_state(EPOCH_KEY).unwrap().is_some());
        assert!(log.did_entry("did:plc:stale").unwrap().is_none(), "a key older than --did-cache-ttl");
        assert!(log.did_entry("did:plc:fresh").unwrap().is_some());
        drop(log);
        // 0s: chain states are kept for ever.
        config.verify_state_ttl = Duration::ZERO;
        let opts = RocksOptions { sync_writes: false, state_expiry: config.state_expiry(), ..Default::default() };
        let log = RocksLog::open(dir.path(), opts).unwrap();
        log.append(&[], None, &[("did:plc:ancient".into(), chain(now - 3650 * day))], &[], None).unwrap();
        log.compact_state().unwrap();
        assert!(log.repo_state("did:plc:ancient").unwrap().is_some());
    }
}
