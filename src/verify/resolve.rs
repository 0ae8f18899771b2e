//! DID → signing key, for verification: `did:plc` from a PLC directory (`--plc-url`),
//! `did:web` from `https://<host>/.well-known/did.json`.
//!
//! - A bounded in-memory cache in front of the store's (`dids` column family), so a restart
//!   does not resolve the whole network again. Entries are kept for `--did-cache-ttl`, and
//!   dropped on the repo's `#identity` event (a prompt to re-resolve) and — at most once per
//!   [`REFRESH_AFTER_FAILURE`] per DID — when a signature fails (the key may have rotated).
//! - One request per DID at a time (concurrent asks share it), at most
//!   `--did-resolve-concurrency` requests in flight, each bounded by `--did-resolve-timeout`
//!   end to end (connect, TLS, response, a 64 KiB body).
//! - `contrail_did_resolutions_total{result}`, `contrail_did_resolve_seconds`,
//!   `contrail_did_cache_entries`.

use crate::log::Log;
use crate::metrics::ResolveResult;
use crate::source::wsclient::{self, ClientError, WsUrl};
use contrail_core::verify::keys::{atproto_key, KeyHistory, PublicKey};
use dashmap::DashMap;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{OnceCell, Semaphore};

/// A DID is re-resolved after a signature failure at most this often (a flood of forged
/// commits must not become a flood of directory requests).
pub const REFRESH_AFTER_FAILURE: Duration = Duration::from_secs(600);

/// Why a DID gave no key.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ResolveError {
    #[error("DID not found")]
    NotFound,
    #[error("DID document: {0}")]
    BadDocument(String),
    #[error("resolving: {0}")]
    Fetch(String),
    /// The directory answered with another status than a document or not-found (429 for its
    /// rate limit, a 5xx): an answer, remembered as long as the others, not asked again soon.
    #[error("resolving: the directory answered {0}")]
    Refused(String),
    #[error("resolving timed out")]
    Timeout,
    #[error("no request slot free before the deadline")]
    Busy,
    #[error("unsupported DID method")]
    Unsupported,
    /// Not waited for any longer: the verification queue was full behind it (the request goes
    /// on). Never returned by the resolver.
    #[error("its key took over a second with the verification queue full behind it")]
    GivenUp,
}

impl ResolveError {
    /// How long the failure is answered from memory: an answer ([`NEGATIVE_TTL`]: a 429 or a
    /// 5xx too, so a directory that rate-limits or fails is not asked sooner), or, for a
    /// directory that did not answer in time or at all, [`TRANSIENT_NEGATIVE_TTL`] (a hiccup
    /// of seconds must not leave its DIDs unresolved for a minute).
    pub fn remembered_for(&self) -> Duration {
        match self {
            ResolveError::NotFound
            | ResolveError::BadDocument(_)
            | ResolveError::Unsupported
            | ResolveError::Refused(_) => NEGATIVE_TTL,
            ResolveError::Fetch(_) | ResolveError::Timeout | ResolveError::Busy | ResolveError::GivenUp => {
                TRANSIENT_NEGATIVE_TTL
            }
        }
    }

    fn result(&self) -> ResolveResult {
        match self {
            ResolveError::NotFound => ResolveResult::NotFound,
            ResolveError::BadDocument(_) => ResolveResult::BadDocument,
            ResolveError::Fetch(_) | ResolveError::Refused(_) => ResolveResult::Error,
            ResolveError::Timeout => ResolveResult::Timeout,
            ResolveError::Busy => ResolveResult::Busy,
            ResolveError::Unsupported => ResolveResult::Unsupported,
            ResolveError::GivenUp => ResolveResult::Timeout,
        }
    }
}

#[derive(Clone)]
struct Cached {
    key: PublicKey,
    /// When it was fetched (unix µs: it is also stored).
    fetched_us: u64,
    /// The number of the request that fetched it ([`Resolver::requests_begun`]), in this
    /// process; 0 when read from the store. A count, not a clock: a clock may step.
    request: u64,
}

/// The resolver's settings.
#[derive(Debug, Clone)]
pub struct ResolverOptions {
    /// Base URL of the PLC directory (`https://plc.directory`).
    pub plc_url: String,
    pub timeout: Duration,
    pub concurrency: usize,
    pub cache_entries: usize,
    pub ttl: Duration,
    /// Tests only: fetch `did:web` documents over plain HTTP.
    pub did_web_http: bool,
}

pub struct Resolver {
    opts: ResolverOptions,
    plc: WsUrl,
    log: Arc<Log>,
    cache: Mutex<Lru>,
    inflight: DashMap<String, Arc<InflightCell>>,
    permits: Semaphore,
    /// `did:web` documents' own slots (a quarter of them, at least one): anyone can run a host
    /// that holds its request to the timeout, under as many names as they like, and such hosts
    /// must not take the directory's slots from every `did:plc` repo.
    web_permits: Semaphore,
    /// When a DID was last re-resolved after a signature failure.
    refreshed: Mutex<HashMap<String, Instant>>,
    /// Keys forgotten (`#identity` events) since the start: a check that failed against a key
    /// looked up before one may have used a key its repo had just replaced.
    forgets: std::sync::atomic::AtomicU64,
    /// Requests for a key begun since the start ([`Self::requests_begun`]).
    requests: std::sync::atomic::AtomicU64,
    /// Held by [`Resolver::forget`] while it drops a key, and by whoever keeps an answer (a
    /// resolve's, or a key read from the store) while it checks that no forget came since: a
    /// forget cannot fall between that check and the keeping, which would keep the replaced key.
    settling: Mutex<()>,
    /// Recent failures, answered from here for [`ResolveError::remembered_for`]: a repo whose
    /// DID does not resolve must not cost a request per commit.
    failed: Mutex<HashMap<String, (Instant, ResolveError)>>,
    /// `did:plc` key histories (their audit logs), each fetched at most once per
    /// [`REFRESH_AFTER_FAILURE`] (concurrent asks share the request), kept that long; `None`:
    /// the log could not be had.
    histories: DashMap<String, (Instant, Arc<HistoryCell>)>,
    /// Until when `histories` is taken as full without pruning it again.
    histories_full_until: Mutex<Option<Instant>>,
    results: Vec<prometheus::IntCounter>,
    /// Audit logs fetched: had, not had; and not fetched (too many repos' asked for lately).
    histories_fetched: [prometheus::IntCounter; 3],
    seconds: prometheus::Histogram,
    entries: prometheus::IntGauge,
}

/// Insertion-ordered bounded map (the oldest entry goes first).
///
/// Each insertion has a generation, in the map and in `order`: a name in `order` whose
/// generation is not the map's is stale (forgotten, or inserted again since) and evicts nothing
/// (it used to evict the fresh entry of a DID forgotten and resolved again).
#[derive(Default)]
struct Lru {
    map: HashMap<String, (Cached, u64)>,
    order: VecDeque<(String, u64)>,
    generation: u64,
}

impl Lru {
    fn get(&self, did: &str) -> Option<&Cached> {
        self.map.get(did).map(|(c, _)| c)
    }

    fn insert(&mut self, did: &str, c: Cached, cap: usize) {
        self.generation += 1;
        self.map.insert(did.to_string(), (c, self.generation));
        self.order.push_back((did.to_string(), self.generation));
        while self.map.len() > cap.max(1) {
            let Some((old, generation)) = self.order.pop_front() else { break };
            if self.map.get(&old).is_some_and(|(_, g)| *g == generation) {
                self.map.remove(&old);
            }
        }
        // Stale names pile up in `order`; compact when they dominate.
        if self.order.len() > 2 * self.map.len() + 1024 {
            let map = &self.map;
            self.order.retain(|(d, g)| map.get(d).is_some_and(|(_, current)| current == g));
        }
    }
}

/// What the store holds per DID: fetched-at (unix µs, big-endian) and the key as `did:key`.
fn encode_entry(c: &Cached) -> Vec<u8> {
    let mut v = c.fetched_us.to_be_bytes().to_vec();
    v.extend_from_slice(c.key.to_did_key().as_bytes());
    v
}

/// When a stored entry was fetched (unix µs): what it ages by.
pub fn entry_time_us(v: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(v.get(..8)?.try_into().ok()?))
}

fn decode_entry(v: &[u8]) -> Option<Cached> {
    let fetched_us = u64::from_be_bytes(v.get(..8)?.try_into().ok()?);
    let key = PublicKey::from_did_key(std::str::from_utf8(&v[8..]).ok()?).ok()?;
    Some(Cached { key, fetched_us, request: 0 })
}

/// How long a failed resolution is remembered: an answer that the DID does not resolve.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(60);

/// How long a resolution the directory did not answer (in time) is remembered.
pub const TRANSIENT_NEGATIVE_TTL: Duration = Duration::from_secs(5);

/// Failures remembered at most (a stream of made-up DIDs must not grow the map).
const MAX_REMEMBERED_FAILURES: usize = 100_000;

/// Largest DID document accepted (real ones are ~1 KiB).
const MAX_DOC_BYTES: usize = 64 << 10;

/// A request for a DID's key, shared by everyone asking while it is made.
type InflightCell = OnceCell<Result<PublicKey, ResolveError>>;

/// A DID's key history once fetched (`None`: the audit log could not be had).
type HistoryCell = OnceCell<Option<Arc<KeyHistory>>>;

/// Largest PLC audit log accepted (~1 KiB per operation; an account with many handle changes
/// has tens of them).
const MAX_AUDIT_LOG_BYTES: usize = 1 << 20;

/// Key histories kept at most (past it, the expired ones go, or all of them).
const MAX_HISTORIES: usize = 10_000;

impl Resolver {
    pub fn new(opts: ResolverOptions, log: Arc<Log>, metrics: &crate::metrics::Metrics) -> anyhow::Result<Resolver> {
        let ws = opts
            .plc_url
            .replacen("https://", "wss://", 1)
            .replacen("http://", "ws://", 1)
            .trim_end_matches('/')
            .to_string();
        let plc = WsUrl::parse_with_path(&ws, "").map_err(|e| anyhow::anyhow!("plc-url: {e}"))?;
        Ok(Resolver {
            permits: Semaphore::new(opts.concurrency.max(1)),
            web_permits: Semaphore::new((opts.concurrency / 4).max(1)),
            results: ResolveResult::ALL
                .iter()
                .map(|r| metrics.did_resolutions.with_label_values(&[r.as_str()]))
                .collect(),
            histories_fetched: ["ok", "error", "busy"].map(|r| metrics.did_key_histories.with_label_values(&[r])),
            seconds: metrics.did_resolve_seconds.clone(),
            entries: metrics.did_cache_entries.clone(),
            opts,
            plc,
            log,
            cache: Mutex::default(),
            inflight: DashMap::new(),
            refreshed: Mutex::default(),
            forgets: Default::default(),
            requests: Default::default(),
            settling: Mutex::default(),
            failed: Mutex::default(),
            histories: DashMap::new(),
            histories_full_until: Mutex::default(),
        })
    }

    fn fresh(&self, c: &Cached) -> bool {
        crate::clock::now_us().saturating_sub(c.fetched_us) < self.opts.ttl.as_micros() as u64
    }

    /// The key, if cached and fresh (memory, then the store). Never waits on the network.
    pub fn cached(&self, did: &str) -> Option<PublicKey> {
        if let Some(c) = self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(did) {
            if self.fresh(c) {
                return Some(c.key.clone());
            }
        }
        let forgets = self.forgets();
        let stored = super::blocking(|| self.log.did_entry(did)).ok().flatten().and_then(|v| decode_entry(&v))?;
        if !self.fresh(&stored) {
            return None;
        }
        let key = stored.key.clone();
        // Not kept if a key was forgotten since the read (it may be this one, read before the
        // forget deleted it): the next ask reads the store again. Nor over a newer one (a
        // resolve's, kept since the read). Off the runtime's workers: a forget may hold the
        // lock across a store write.
        if self.forgets() != forgets {
            return Some(key);
        }
        super::blocking(|| {
            let _settling = self.settling.lock().unwrap_or_else(|p| p.into_inner());
            if self.forgets() == forgets {
                let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                if cache.get(did).is_none_or(|c| c.fetched_us < stored.fetched_us) {
                    cache.insert(did, stored, self.opts.cache_entries);
                    self.entries.set(cache.map.len() as i64);
                }
            }
        });
        Some(key)
    }

    fn remember(&self, did: &str, c: Cached) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.insert(did, c, self.opts.cache_entries);
        self.entries.set(cache.map.len() as i64);
    }

    /// How many keys were forgotten since the start.
    pub fn forgets(&self) -> u64 {
        self.forgets.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// How many requests for a key were begun since the start: a key fetched by a request
    /// numbered above it was fetched after this was read.
    pub fn requests_begun(&self) -> u64 {
        self.requests.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Forgets a DID's key (its `#identity` event: the document may have changed). A request
    /// for it on its way now is answered but not cached (it may bring the replaced key).
    pub fn forget(&self, did: &str) {
        super::blocking(|| {
            let _settling = self.settling.lock().unwrap_or_else(|p| p.into_inner());
            self.failed.lock().unwrap_or_else(|p| p.into_inner()).remove(did);
            self.inflight.remove(did);
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if cache.map.remove(did).is_some() {
                self.entries.set(cache.map.len() as i64);
            }
            drop(cache);
            let _ = self.log.put_did_entry(did, None);
            // Counted once the key is gone: a store read begun after the count changed cannot
            // see the forgotten key, and one begun before is not kept (`cached`).
            self.forgets.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        });
    }

    /// The key: cached, or resolved (one request per DID however many ask).
    pub async fn key(self: &Arc<Self>, did: &str) -> Result<PublicKey, ResolveError> {
        if let Some(k) = self.cached(did) {
            return Ok(k);
        }
        if let Some((at, e)) = self.failed.lock().unwrap_or_else(|p| p.into_inner()).get(did) {
            if at.elapsed() < e.remembered_for() {
                return Err(e.clone());
            }
        }
        self.fetch_shared(did).await
    }

    /// After a signature failure: a newly resolved key if the DID was not re-resolved within
    /// [`REFRESH_AFTER_FAILURE`] and the key changed; `None` otherwise. When it was (the
    /// commits of a burst after a key rotation fail against the old key together), the answer
    /// of that re-resolve — awaited if it is still on its way — if it is another key: no request.
    ///
    /// Not when the key that failed was fetched by a request begun after the check did (`asked`:
    /// [`Self::requests_begun`] then): asking again would bring the same document. (A forged
    /// commit of a repo not cached cost two requests for it, then one for its key history.)
    /// That counts as the re-resolve. (A request the check joined, begun before it, may have
    /// brought a key its repo replaced meanwhile: that one is asked again.)
    pub async fn refresh_after_failure(
        self: &Arc<Self>,
        did: &str,
        failed: &PublicKey,
        asked: u64,
    ) -> Option<PublicKey> {
        let resolved_for_this_check = {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            cache.get(did).is_some_and(|c| c.key == *failed && c.request > asked)
        };
        // Under the lock, so that a check failing meanwhile finds this re-resolve in flight.
        let cell = {
            let mut r = self.refreshed.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            if r.len() > 100_000 {
                r.retain(|_, t| now.duration_since(*t) < REFRESH_AFTER_FAILURE);
            }
            if resolved_for_this_check {
                r.insert(did.to_string(), now);
                return None;
            }
            if r.get(did).is_some_and(|t| now.duration_since(*t) < REFRESH_AFTER_FAILURE) {
                self.inflight.get(did).map(|cell| cell.clone())
            } else {
                r.insert(did.to_string(), now);
                Some(self.inflight.entry(did.to_string()).or_default().clone())
            }
        };
        let key = match cell {
            Some(cell) => self.answer(did, cell).await.ok(),
            // Re-resolved lately and answered: what it found is cached.
            None => self.cached(did),
        }?;
        (key != *failed).then_some(key)
    }

    /// After a signature failure against the current key: a `did:plc` repo's keys over time,
    /// from its PLC audit log. `None` for other methods, or when the log cannot be had.
    pub async fn key_history(self: &Arc<Self>, did: &str) -> Option<Arc<KeyHistory>> {
        if !did.starts_with("did:plc:") {
            return None;
        }
        let cell = {
            if self.histories.len() >= MAX_HISTORIES && !self.histories.contains_key(did) {
                // Pruned at most once a second while full: not a scan of them all per ask.
                let mut full_until = self.histories_full_until.lock().unwrap_or_else(|p| p.into_inner());
                let now = Instant::now();
                if full_until.is_none_or(|until| now >= until) {
                    self.histories.retain(|_, (at, _)| at.elapsed() < REFRESH_AFTER_FAILURE);
                    *full_until = (self.histories.len() >= MAX_HISTORIES).then(|| now + Duration::from_secs(1));
                }
                if full_until.is_some() {
                    // More repos' histories asked for within ten minutes than are kept: no
                    // more fetched until some age out. (Emptying the map let a flood of forged
                    // commits across many DIDs fetch each one's audit log, up to 1 MiB, again
                    // and again, in the slots the directory's lookups need.)
                    self.histories_fetched[2].inc();
                    return None;
                }
            }
            let mut entry = self.histories.entry(did.to_string()).or_insert_with(|| (Instant::now(), Arc::default()));
            if entry.0.elapsed() >= REFRESH_AFTER_FAILURE {
                *entry = (Instant::now(), Arc::default());
            }
            entry.1.clone()
        };
        cell.get_or_init(|| self.fetch_history(did)).await.clone()
    }

    /// One request for a `did:plc`'s audit log, within the resolver's slots and deadline.
    async fn fetch_history(&self, did: &str) -> Option<Arc<KeyHistory>> {
        let deadline = tokio::time::Instant::now() + self.opts.timeout;
        let Ok(Ok(_permit)) = tokio::time::timeout_at(deadline, self.permits.acquire()).await else {
            self.histories_fetched[1].inc();
            return None;
        };
        let path = format!("{}/{did}/log/audit", self.plc.path.trim_end_matches('/'));
        let fetched = tokio::time::timeout_at(
            deadline,
            wsclient::http_get_at_most(&self.plc, &path, self.opts.timeout, MAX_AUDIT_LOG_BYTES),
        )
        .await;
        let history = match fetched {
            Ok(Ok(body)) => serde_json::from_slice(&body)
                .map_err(|e| e.to_string())
                .and_then(|log| KeyHistory::from_audit_log(did, &log).map_err(|e| e.to_string())),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".to_string()),
        };
        match history {
            Ok(h) => {
                self.histories_fetched[0].inc();
                Some(Arc::new(h))
            }
            Err(e) => {
                self.histories_fetched[1].inc();
                tracing::debug!(did, error = %e, "no PLC audit log");
                None
            }
        }
    }

    async fn fetch_shared(self: &Arc<Self>, did: &str) -> Result<PublicKey, ResolveError> {
        let cell = self.inflight.entry(did.to_string()).or_default().clone();
        self.answer(did, cell).await
    }

    /// The answer of the request in flight in `cell` (made here if nobody is making it).
    async fn answer(&self, did: &str, cell: Arc<InflightCell>) -> Result<PublicKey, ResolveError> {
        let result = cell.get_or_init(|| self.fetch(did, &cell)).await.clone();
        // Gone once answered (the answer is cached, or remembered as a failure).
        self.inflight.remove_if(did, |_, c| Arc::ptr_eq(c, &cell));
        result
    }

    /// One request, within one deadline for waiting for a slot and for the answer; its answer
    /// cached unless the DID was forgotten meanwhile (`cell` no longer the one in flight).
    async fn fetch(&self, did: &str, cell: &Arc<InflightCell>) -> Result<PublicKey, ResolveError> {
        let request = self.requests.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + self.opts.timeout;
        let permits = if did.starts_with("did:web:") { &self.web_permits } else { &self.permits };
        let permit = match tokio::time::timeout_at(deadline, permits.acquire()).await {
            Ok(Ok(p)) => p,
            Ok(Err(_)) => return Err(ResolveError::Fetch("shutting down".into())),
            Err(_) => {
                // Other DIDs held every slot: says nothing about this one, so not remembered.
                self.results[ResolveResult::Busy as usize].inc();
                return Err(ResolveError::Busy);
            }
        };
        let result = match tokio::time::timeout_at(deadline, self.fetch_document(did)).await {
            Ok(Ok(doc)) => atproto_key(did, &doc).map_err(|e| ResolveError::BadDocument(e.to_string())),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ResolveError::Timeout),
        };
        drop(permit);
        self.seconds.observe(started.elapsed().as_secs_f64());
        // Checked and kept under `settling`, off the runtime's workers (the store write).
        super::blocking(|| {
            let _settling = self.settling.lock().unwrap_or_else(|p| p.into_inner());
            let current = self.inflight.get(did).is_some_and(|c| Arc::ptr_eq(&c, cell));
            match &result {
                Ok(_) if !current => self.results[ResolveResult::Ok as usize].inc(),
                Ok(key) => {
                    self.results[ResolveResult::Ok as usize].inc();
                    self.failed.lock().unwrap_or_else(|p| p.into_inner()).remove(did);
                    let c = Cached { key: key.clone(), fetched_us: crate::clock::now_us(), request };
                    let _ = self.log.put_did_entry(did, Some(&encode_entry(&c)));
                    self.remember(did, c);
                }
                Err(e) if !current => self.results[e.result() as usize].inc(),
                Err(e) => {
                    self.results[e.result() as usize].inc();
                    let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
                    if failed.len() >= MAX_REMEMBERED_FAILURES {
                        failed.retain(|_, (at, e)| at.elapsed() < e.remembered_for());
                        if failed.len() >= MAX_REMEMBERED_FAILURES {
                            failed.clear();
                        }
                    }
                    failed.insert(did.to_string(), (Instant::now(), e.clone()));
                }
            }
        });
        result
    }

    async fn fetch_document(&self, did: &str) -> Result<serde_json::Value, ResolveError> {
        let (url, path) = if did.starts_with("did:plc:") {
            (self.plc.clone(), format!("{}/{did}", self.plc.path.trim_end_matches('/')))
        } else if let Some(host) = did.strip_prefix("did:web:") {
            // atproto uses hostname-level did:web only: no path, no port (`%3A`), and no IP
            // literal — a repo must not make this server connect to an address of its choice.
            // (Tests allow a loopback port: --did-web-http.)
            let host = host.replace("%3A", ":").replace("%3a", ":");
            if host.is_empty() || host.contains(['/', '?', '#', '@', '[', ']']) || host.matches(':').count() > 1 {
                return Err(ResolveError::Unsupported);
            }
            let name = host.split(':').next().unwrap_or("");
            if !self.opts.did_web_http && (host.contains(':') || name.parse::<std::net::IpAddr>().is_ok()) {
                return Err(ResolveError::Unsupported);
            }
            let scheme = if self.opts.did_web_http { "ws" } else { "wss" };
            let url =
                WsUrl::parse_with_path(&format!("{scheme}://{host}"), "").map_err(|_| ResolveError::Unsupported)?;
            (url, "/.well-known/did.json".to_string())
        } else {
            return Err(ResolveError::Unsupported);
        };
        // Read no further than the largest document accepted; a did:web host only at a public
        // address (the name is the repo's to choose: it must not reach this machine's network).
        let public_only = did.starts_with("did:web:") && !self.opts.did_web_http;
        let body = if public_only {
            wsclient::http_get_public(&url, &path, self.opts.timeout, MAX_DOC_BYTES).await
        } else {
            wsclient::http_get_at_most(&url, &path, self.opts.timeout, MAX_DOC_BYTES).await
        };
        let body = body.map_err(|e| match e {
            ClientError::Status { status: 404 | 410, .. } => ResolveError::NotFound,
            ClientError::Http(m) if m.contains("length limit") => {
                ResolveError::BadDocument("larger than 64 KiB".into())
            }
            ClientError::Timeout { .. } => ResolveError::Timeout,
            status @ ClientError::Status { .. } => ResolveError::Refused(status.to_string()),
            other => ResolveError::Fetch(other.to_string()),
        })?;
        if body.len() > MAX_DOC_BYTES {
            return Err(ResolveError::BadDocument("larger than 64 KiB".into()));
        }
        serde_json::from_slice(&body).map_err(|e| ResolveError::BadDocument(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_is_remembered_longer_than_a_directory_that_did_not_answer() {
        let answers = [
            ResolveError::NotFound,
            ResolveError::BadDocument("no key".into()),
            ResolveError::Unsupported,
            ResolveError::Refused("429".into()),
        ];
        for e in answers {
            assert_eq!(e.remembered_for(), NEGATIVE_TTL, "{e}");
        }
        for e in
            [ResolveError::Fetch("refused".into()), ResolveError::Timeout, ResolveError::Busy, ResolveError::GivenUp]
        {
            assert_eq!(e.remembered_for(), TRANSIENT_NEGATIVE_TTL, "{e}");
        }
        assert!(TRANSIENT_NEGATIVE_TTL * 10 <= NEGATIVE_TTL);
    }

    #[test]
    fn a_key_forgotten_and_cached_again_is_not_evicted_by_its_old_place() {
        let key = || Cached {
            key: PublicKey::from_k256(*k256::ecdsa::SigningKey::from_slice(&[7; 32]).unwrap().verifying_key()),
            fetched_us: 1,
            request: 0,
        };
        let mut lru = Lru::default();
        lru.insert("a", key(), 2);
        lru.insert("b", key(), 2);
        lru.map.remove("a"); // forgotten (an #identity event)
        lru.insert("a", key(), 2); // resolved again: now the newest
        lru.insert("c", key(), 2); // evicts the oldest: b, not the fresh a
        assert!(lru.get("a").is_some() && lru.get("c").is_some() && lru.get("b").is_none());
    }

    /// Past the key histories kept, none is fetched (until some age out), and those kept are
    /// not fetched again: before, the map was emptied, and each repo's was fetched again.
    #[tokio::test]
    async fn a_flood_of_repos_key_histories_fetches_none_of_them_twice() {
        let log = Arc::new(Log::memory(crate::log::memory::MemoryLog::new(1 << 20)));
        let opts = ResolverOptions {
            plc_url: "http://127.0.0.1:9".into(), // refused: each fetch fails at once
            timeout: Duration::from_secs(1),
            concurrency: 4,
            cache_entries: 16,
            ttl: Duration::from_secs(3600),
            did_web_http: false,
        };
        let metrics = crate::metrics::Metrics::new();
        let r = Arc::new(Resolver::new(opts, log, &metrics).unwrap());
        let did = |i: usize| format!("did:plc:{i:024}");
        let count = |label: &str| metrics.did_key_histories.with_label_values(&[label]).get();
        for i in 0..MAX_HISTORIES {
            assert!(r.key_history(&did(i)).await.is_none());
        }
        assert_eq!(count("error"), MAX_HISTORIES as u64);
        assert!(r.key_history(&did(MAX_HISTORIES)).await.is_none());
        assert_eq!((count("error"), count("busy")), (MAX_HISTORIES as u64, 1), "one more: not fetched");
        assert!(r.key_history(&did(0)).await.is_none());
        assert_eq!((count("error"), count("busy")), (MAX_HISTORIES as u64, 1), "one kept: not fetched again");
    }

    /// A key read from the store just as its DID is forgotten (an `#identity` event) must not
    /// be kept in memory after the forget: the next check would use the replaced key until the
    /// entry ages out. Rounds of the two at once, on two threads.
    #[test]
    fn a_key_read_from_the_store_as_it_is_forgotten_is_not_kept() {
        use std::sync::Barrier;
        let log = Arc::new(Log::memory(crate::log::memory::MemoryLog::new(1 << 20)));
        let opts = ResolverOptions {
            plc_url: "http://127.0.0.1:9".into(),
            timeout: Duration::from_secs(1),
            concurrency: 1,
            cache_entries: 16,
            ttl: Duration::from_secs(3600),
            did_web_http: false,
        };
        let r = Arc::new(Resolver::new(opts, log.clone(), &crate::metrics::Metrics::new()).unwrap());
        let did = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa";
        let key = PublicKey::from_k256(*k256::ecdsa::SigningKey::from_slice(&[7; 32]).unwrap().verifying_key());
        let stored = encode_entry(&Cached { key, fetched_us: crate::clock::now_us(), request: 0 });
        const ROUNDS: usize = 5_000;
        let start = Arc::new(Barrier::new(2));
        let reader = {
            let (r, start) = (r.clone(), start.clone());
            std::thread::spawn(move || {
                for _ in 0..ROUNDS {
                    start.wait();
                    r.cached(did);
                    start.wait();
                }
            })
        };
        for round in 0..ROUNDS {
            log.put_did_entry(did, Some(&stored)).unwrap();
            start.wait();
            r.forget(did);
            start.wait();
            let kept = r.cache.lock().unwrap().get(did).is_some();
            assert!(!kept, "round {round}: the forgotten key is still cached");
        }
        reader.join().unwrap();
    }
}
