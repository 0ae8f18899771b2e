//! Admission and fairness: the subscriber cap, per-IP connection cap, per-IP event rate (one
//! token bucket shared by all of an IP's connections, as Jetstream v1), the memory filters may
//! hold (all of them, and one IP's), and the client IP, taken from `X-Forwarded-For` only when
//! the peer is a trusted proxy.
//!
//! "Per IP" means per IPv4 address, and per IPv6 prefix (`--ipv6-prefix`, /64 by default): an
//! IPv6 client is usually handed a whole /64 and can rotate through it. Operators exempt their
//! own replicas (and other trusted consumers) from the per-IP limits with `--unlimited-clients`.

use dashmap::DashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Admission and fairness settings (`contrail serve` flags; see `config/contrail.example.toml`).
#[derive(clap::Args, Debug, Clone, serde::Serialize)]
pub struct LimitsConfig {
    /// Most subscribers at once; also the most connections all clients together may hold
    /// still in plain HTTP (not yet upgraded) on the public listener, the last sixteenth of
    /// them (at most 256) kept for unlimited clients and trusted proxies.
    #[arg(long, env = "CONTRAIL_MAX_SUBSCRIBERS", default_value = "10000")]
    pub max_subscribers: usize,
    /// Most subscribers from one client IP; also the most connections it may hold still in
    /// plain HTTP (not yet upgraded to a websocket) on the public listener.
    #[arg(long, env = "CONTRAIL_MAX_CONNECTIONS_PER_IP", default_value = "64")]
    pub max_connections_per_ip: usize,
    /// Events per second per client IP, shared by its connections (0: unlimited).
    #[arg(long, env = "CONTRAIL_MAX_EVENTS_PER_SECOND_PER_IP", default_value = "5000")]
    pub max_events_per_second_per_ip: u64,
    /// Proxies whose X-Forwarded-For is believed (addresses or CIDR blocks, comma-separated).
    #[arg(long, env = "CONTRAIL_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<IpNet>,
    /// IPv6 clients are limited per prefix of this length (one /64 is one client).
    #[arg(long, env = "CONTRAIL_IPV6_PREFIX", default_value = "64")]
    pub ipv6_prefix: u8,
    /// Most subscribers all the clients of one IPv6 /48 may hold together, and most
    /// connections still in plain HTTP (a /48 holds 65,536 /64 clients). Default: a quarter of
    /// --max-subscribers, never less than --max-connections-per-ip; 0: no such limit.
    #[arg(long = "max-connections-per-ipv6-48", env = "CONTRAIL_MAX_CONNECTIONS_PER_IPV6_48")]
    pub max_connections_per_ipv6_48: Option<usize>,
    /// Clients exempt from the per-IP connection and event-rate limits (addresses or CIDR
    /// blocks, comma-separated): your own replicas catching up, trusted internal consumers.
    #[arg(long, env = "CONTRAIL_UNLIMITED_CLIENTS", value_delimiter = ',')]
    pub unlimited_clients: Vec<IpNet>,
    /// New TCP connections per second per client IP on the public listener, counted at accept
    /// before any parsing (0: unlimited). Trusted proxies and unlimited clients are exempt.
    #[arg(long, env = "CONTRAIL_MAX_CONNECTS_PER_SECOND_PER_IP", default_value = "100")]
    pub max_connects_per_second_per_ip: u64,
    /// Memory all subscribers' filters may hold together: their wantedDids and
    /// wantedCollections (v1 allows 10,000 DIDs of up to 2,048 characters, ~20 MB a filter),
    /// with the copies the live index keeps of the DIDs or of the collections.
    /// One client IP may hold a quarter of it. A subscribe request past it is refused with a
    /// 503, an options_update with a 1013 close (0: unlimited; else at least 64KiB).
    #[arg(long, env = "CONTRAIL_MAX_FILTER_BYTES", default_value = "1GiB", value_parser = crate::units::parse_size)]
    pub max_filter_bytes: u64,
    /// Memory all subscribers' incoming messages may hold together while they arrive and wait
    /// to be handled (an `options_update` may be 10 MB), beyond the first 64 KiB of each
    /// connection, which is always allowed. One client IP may hold a quarter of it. A
    /// connection whose message would take it past that is closed with 1013 (0: unlimited).
    #[arg(long, env = "CONTRAIL_MAX_CLIENT_MESSAGE_BYTES", default_value = "256MiB", value_parser = crate::units::parse_size)]
    pub max_client_message_bytes: u64,
}

impl LimitsConfig {
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.max_subscribers == 0 || self.max_connections_per_ip == 0 {
            return Err(("max-subscribers", "max-subscribers and max-connections-per-ip must be more than 0".into()));
        }
        if !(32..=128).contains(&self.ipv6_prefix) {
            return Err(("ipv6-prefix", "must be between 32 and 128".into()));
        }
        if self.max_filter_bytes > 1 << 40 {
            return Err(("max-filter-bytes", "must be at most 1TiB".into()));
        }
        // A quarter per client, so 16 KiB here (~70 DIDs): less is a mistake (a value meant in
        // MB, say, refuses every filtered subscribe at run time).
        if (1..64 << 10).contains(&self.max_filter_bytes) {
            return Err(("max-filter-bytes", "must be 0 (unlimited) or at least 64KiB".into()));
        }
        if self.max_client_message_bytes > 1 << 40 {
            return Err(("max-client-message-bytes", "must be at most 1TiB".into()));
        }
        // Taken 64 KiB at a time, a quarter per client: less, and no message over 64 KiB fits.
        if (1..1 << 20).contains(&self.max_client_message_bytes) {
            return Err(("max-client-message-bytes", "must be 0 (unlimited) or at least 1MiB".into()));
        }
        Ok(())
    }
}

/// An address or CIDR block (`10.0.0.0/8`, `::1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for IpNet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a.trim().parse().map_err(|_| format!("bad address {s:?}"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p.parse::<u8>().ok().filter(|&n| n <= max).ok_or_else(|| format!("bad prefix in {s:?}"))?,
            None => max,
        };
        Ok(IpNet { addr, prefix })
    }
}

impl std::fmt::Display for IpNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl serde::Serialize for IpNet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl IpNet {
    /// Whether the block is every address of a family: `0.0.0.0/0`, `::/0`, or every IPv4
    /// address as IPv4-mapped IPv6 (`::ffff:0:0/96`; [`IpNet::contains`] takes either form).
    pub fn is_everything(&self) -> bool {
        let mapped_v4 = IpAddr::V6(std::net::Ipv4Addr::UNSPECIFIED.to_ipv6_mapped());
        self.prefix == 0 || (self.addr.is_ipv6() && self.prefix <= 96 && self.contains_exactly(mapped_v4))
    }

    /// Whether `ip` is in the block. An IPv4 address and its IPv4-mapped IPv6 form (what a
    /// dual-stack listener sees of an IPv4 peer) are one address: either form matches a block
    /// written in either (`10.0.0.0/8`, `::ffff:10.0.0.0/104`, `::/0`).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let v4 = ip.to_canonical();
        let v6 = match v4 {
            IpAddr::V4(a) => IpAddr::V6(a.to_ipv6_mapped()),
            other => other,
        };
        self.contains_exactly(v4) || self.contains_exactly(v6)
    }

    fn contains_exactly(&self, ip: IpAddr) -> bool {
        let (a, b, bits) = match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => (u32::from(a) as u128, u32::from(b) as u128, 32),
            (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), 128),
            _ => return false,
        };
        if self.prefix == 0 {
            return true;
        }
        let shift = bits - self.prefix as u32;
        (a >> shift) == (b >> shift)
    }
}

/// The client's address: the peer, or — when the peer is a trusted proxy — the right-most
/// `X-Forwarded-For` entry that is not itself a trusted proxy.
pub fn client_ip(peer: SocketAddr, forwarded_for: Option<&str>, trusted: &[IpNet]) -> IpAddr {
    let peer_ip = peer.ip().to_canonical();
    let is_trusted = |ip: IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(peer_ip) {
        return peer_ip;
    }
    let Some(xff) = forwarded_for else { return peer_ip };
    for part in xff.rsplit(',') {
        match forwarded_address(part) {
            Some(ip) if is_trusted(ip) => continue,
            Some(ip) => return ip.to_canonical(),
            None => break,
        }
    }
    peer_ip
}

/// One `X-Forwarded-For` entry's address. Besides the bare form, some proxies write a port,
/// and IPv6 in brackets (`192.0.2.7:5678`, `[2001:db8::1]`, `[2001:db8::1]:443`); unread,
/// every client behind such a proxy took the proxy's own address and shared its quota.
fn forwarded_address(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(addr) = entry.parse::<SocketAddr>() {
        return Some(addr.ip());
    }
    let inner = entry.strip_prefix('[')?.strip_suffix(']')?;
    inner.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6)
}

/// A token bucket: `rate` tokens per second, up to `burst` banked.
pub struct TokenBucket {
    rate: f64,
    /// The most tokens banked (a new bucket holds them).
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    /// `rate` a second, one second's worth banked.
    pub fn new(rate: f64) -> Self {
        Self::with_burst(rate, rate)
    }

    /// `rate` a second, `burst` banked.
    pub fn with_burst(rate: f64, burst: f64) -> Self {
        TokenBucket { rate, burst, state: Mutex::new((burst, Instant::now())) }
    }

    /// The most tokens banked.
    pub fn burst(&self) -> f64 {
        self.burst
    }

    /// Tokens per second.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Whether it has refilled to its burst: the same as a new bucket.
    pub fn is_full(&self) -> bool {
        let (tokens, at) = *self.state.lock().unwrap_or_else(|p| p.into_inner());
        tokens + at.elapsed().as_secs_f64() * self.rate >= self.burst
    }

    /// Takes one token; returns how long to wait first (zero when one was available).
    pub fn take(&self) -> Duration {
        self.take_n(1.0)
    }

    /// Takes `n` tokens at once (a replay page's frames); returns how long to wait first. The
    /// balance may go below zero: later takers wait it out too.
    pub fn take_n(&self, n: f64) -> Duration {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let (tokens, at) = *s;
        let tokens = (tokens + now.duration_since(at).as_secs_f64() * self.rate).min(self.burst) - n;
        *s = (tokens, now);
        if tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-tokens / self.rate)
        }
    }
}

/// The accept-time gate: a token bucket of new connections per client key (an IPv4 address,
/// an IPv6 prefix), `rate` a second with `rate` banked. A client opening and closing
/// connections in a loop, or sending oversized upgrades, made the server spend 1–1.6 cores
/// parsing and refusing (measured, RELIABILITY.md); past its rate it now costs one accept.
/// It also counts each client's connections still speaking plain HTTP (not yet upgraded to a
/// websocket, which [`Admission`] then counts): at most `--max-connections-per-ip` at once, so
/// slow readers of large responses, or clients that never finish a request head, cannot pile
/// up connections (the rate bounds how fast they come, `MAX_PLAIN_HTTP` how long each lives).
/// All clients together, exempt ones included, hold at most `--max-subscribers` such
/// connections: many keys (IPv6 prefixes, a botnet, everything behind a trusted proxy) are
/// bounded too.
pub struct ConnectGate {
    /// New connections a second per client; 0: not paced.
    rate: f64,
    max_open: usize,
    ipv6_prefix: u8,
    exempt: Vec<IpNet>,
    buckets: DashMap<IpAddr, (f64, Instant)>,
    /// Connections per client key still in plain HTTP.
    open: DashMap<IpAddr, usize>,
    /// The same per IPv6 site.
    open_per_site: SiteCounts,
    /// All connections still in plain HTTP, and their cap.
    open_total: std::sync::atomic::AtomicUsize,
    max_open_total: usize,
    /// Whether exempt clients count toward `max_open_total` (the metrics listener's do not: a
    /// stranger filling it must not lock out the scraper).
    exempt_in_total: bool,
    refused: prometheus::IntCounter,
    refused_open: prometheus::IntCounter,
    /// When idle buckets were last dropped (at most once a second: a full pass is not cheap).
    pruned: Mutex<Instant>,
    /// Says when new clients go unpaced (more keys than [`CONNECT_GATE_KEYS`] within a second).
    warn: crate::rate_limited_log::RateLimitedLog,
}

/// The metrics listener's connections at once, and from one client (see
/// [`ConnectGate::for_metrics`]).
pub const METRICS_MAX_OPEN: usize = 64;
pub const METRICS_MAX_OPEN_PER_IP: usize = 8;

/// Buckets kept before idle ones are dropped (a full bucket is the same as no bucket).
const CONNECT_GATE_KEYS: usize = 65_536;

/// A connection the gate let in, counted until it is dropped (at its upgrade or its end).
pub struct OpenConnection {
    gate: Arc<ConnectGate>,
    /// `None`: an exempt client, not counted.
    key: Option<IpAddr>,
    /// Its IPv6 site, counted.
    site: Option<IpAddr>,
    /// Counted in the gate's total.
    in_total: bool,
}

impl OpenConnection {
    /// The key its client is limited under (`None`: an exempt client).
    pub fn client_key(&self) -> Option<IpAddr> {
        self.key
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        if self.in_total {
            self.gate.open_total.fetch_sub(1, Ordering::SeqCst);
        }
        if let Some(site) = self.site {
            self.gate.open_per_site.release(site);
        }
        let Some(key) = self.key else { return };
        if let Some(mut n) = self.gate.open.get_mut(&key) {
            *n = n.saturating_sub(1);
        }
        self.gate.open.remove_if(&key, |_, n| *n == 0);
    }
}

impl ConnectGate {
    /// `refused`: counts connections refused for their rate; `refused_open`: for the number
    /// a client holds open.
    pub fn new(
        limits: &LimitsConfig,
        refused: prometheus::IntCounter,
        refused_open: prometheus::IntCounter,
    ) -> Arc<ConnectGate> {
        let mut exempt = limits.unlimited_clients.clone();
        // Behind a proxy every client has the proxy's address at accept.
        exempt.extend(limits.trusted_proxies.iter().copied());
        Arc::new(ConnectGate {
            rate: limits.max_connects_per_second_per_ip as f64,
            max_open: limits.max_connections_per_ip,
            ipv6_prefix: limits.ipv6_prefix,
            exempt,
            buckets: DashMap::new(),
            open: DashMap::new(),
            open_per_site: SiteCounts::new(site_cap(limits)),
            open_total: std::sync::atomic::AtomicUsize::new(0),
            max_open_total: limits.max_subscribers,
            exempt_in_total: true,
            refused,
            refused_open,
            pruned: Mutex::new(Instant::now()),
            warn: crate::rate_limited_log::RateLimitedLog::new(Duration::from_secs(60)),
        })
    }

    /// The metrics listener's gate: not paced (a scraper, or a test, may poll as often as it
    /// likes), but at most [`METRICS_MAX_OPEN`] connections at once, [`METRICS_MAX_OPEN_PER_IP`]
    /// from one client; `--unlimited-clients` (the scraper) are held to neither, and not
    /// counted, so strangers filling it do not lock the scraper out.
    /// Without it, connections that never finish a request head held a task and a buffer each
    /// for up to the head timeout, as many as a client could open.
    pub fn for_metrics(limits: &LimitsConfig, refused: prometheus::IntCounter) -> Arc<ConnectGate> {
        let mut limits = limits.clone();
        limits.max_connects_per_second_per_ip = 0;
        limits.max_subscribers = METRICS_MAX_OPEN;
        limits.max_connections_per_ip = METRICS_MAX_OPEN_PER_IP;
        limits.max_connections_per_ipv6_48 = Some(METRICS_MAX_OPEN_PER_IP);
        // Nothing here reads X-Forwarded-For: a proxy is one client.
        limits.trusted_proxies.clear();
        let gate = ConnectGate::new(&limits, refused.clone(), refused);
        let mut gate = Arc::into_inner(gate).expect("just made");
        // `--unlimited-clients` (list the scraper there) are not counted at all.
        gate.exempt_in_total = false;
        Arc::new(gate)
    }

    /// The new connection from `peer`, counted while it speaks plain HTTP; `None` when it is
    /// refused (its client is past its rate, or holds its most such connections).
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Option<OpenConnection> {
        // A dual-stack listener sees IPv4 clients as `::ffff:a.b.c.d`.
        let peer = peer.to_canonical();
        let exempt = self.exempt.iter().any(|n| n.contains(peer));
        if !exempt && self.rate > 0.0 && !self.paced(peer) {
            return None;
        }
        if exempt && !self.exempt_in_total {
            return Some(OpenConnection { gate: self.clone(), key: None, site: None, in_total: false });
        }
        // The total first, never raised past its cap (a refusal must not refuse others). The
        // last sixteenth of it (at most 256) is for exempt clients alone: strangers holding
        // connections that never finish a request head must not lock out the load balancer's
        // probes, the scraper's `/status` or the proxy every client comes through. (The
        // metrics gate does not count exempt clients at all.)
        let cap = match exempt || !self.exempt_in_total {
            true => self.max_open_total,
            false => self.max_open_total - (self.max_open_total / 16).min(256),
        };
        let room = |n: usize| (n < cap).then_some(n + 1);
        if self.open_total.fetch_update(Ordering::SeqCst, Ordering::SeqCst, room).is_err() {
            self.refused_open.inc();
            return None;
        }
        // From here the ticket gives the total back, whatever happens.
        let mut ticket = OpenConnection { gate: self.clone(), key: None, site: None, in_total: true };
        if exempt {
            return Some(ticket);
        }
        let key = client_key(peer, self.ipv6_prefix);
        match self.open_per_site.take_for(key, self.ipv6_prefix) {
            Ok(site) => ticket.site = site,
            Err(()) => {
                self.refused_open.inc();
                return None;
            }
        }
        let mut open = self.open.entry(key).or_insert(0);
        if *open >= self.max_open {
            drop(open);
            self.refused_open.inc();
            return None;
        }
        *open += 1;
        ticket.key = Some(key);
        Some(ticket)
    }

    /// Whether `peer` is within its rate of new connections (taking one).
    fn paced(&self, peer: IpAddr) -> bool {
        let now = Instant::now();
        if self.buckets.len() > CONNECT_GATE_KEYS {
            let mut pruned = self.pruned.lock().unwrap_or_else(|p| p.into_inner());
            if now.duration_since(*pruned) >= Duration::from_secs(1) {
                *pruned = now;
                // A bucket idle for a second is full again: the same as no bucket.
                self.buckets.retain(|_, (_, at)| now.duration_since(*at) < Duration::from_secs(1));
            } else if !self.buckets.contains_key(&client_key(peer, self.ipv6_prefix)) {
                // More keys than that within a second (an address-rotating attacker): new ones
                // are not paced until the next prune, rather than refused (which locked every
                // new client out while the rotation went on). Their connections still count
                // against their client's, their IPv6 /48's and all clients' caps on open
                // connections in plain HTTP; each costs more than a refusal (a task, its
                // request read), within those caps.
                drop(pruned);
                self.warn.warn("connect_gate_full", || {
                    format!("more than {CONNECT_GATE_KEYS} clients connecting within a second: new ones are not paced until the next prune")
                });
                return true;
            }
        }
        let key = client_key(peer, self.ipv6_prefix);
        let mut b = self.buckets.entry(key).or_insert((self.rate, now));
        let (tokens, at) = *b;
        let tokens = (tokens + now.duration_since(at).as_secs_f64() * self.rate).min(self.rate);
        if tokens >= 1.0 {
            *b = (tokens - 1.0, now);
            true
        } else {
            *b = (tokens, now);
            drop(b);
            self.refused.inc();
            false
        }
    }
}

pub struct Admission {
    max_subscribers: usize,
    max_per_ip: usize,
    rate_per_ip: u64,
    ipv6_prefix: u8,
    unlimited: Vec<IpNet>,
    total: AtomicUsize,
    /// Per client key (an IPv4 address, an IPv6 prefix).
    per_ip: DashMap<IpAddr, PerIp>,
    /// When entries kept only for a bucket refilling were last dropped (see [`PerIp::unused`]).
    pruned: Mutex<Instant>,
    /// Subscribers per IPv6 site.
    per_site: SiteCounts,
    /// `--max-filter-bytes`, and what connections' filters hold now.
    filters: Budget,
    /// `--max-client-message-bytes`, and what client messages hold now.
    messages: Budget,
}

/// One memory budget shared by all connections, a quarter of it per client key.
struct Budget {
    /// 0: unlimited (still counted).
    max: usize,
    held: AtomicUsize,
    /// Its gauge, moved by the same amounts as `held`.
    gauge: prometheus::IntGauge,
    /// Which of [`PerIp`]'s counts is this budget's.
    per_ip: fn(&mut PerIp) -> &mut usize,
}

/// One client key's connections, what they hold of each budget, and its shared event bucket.
#[derive(Default)]
struct PerIp {
    connections: usize,
    filter_bytes: usize,
    message_bytes: usize,
    bucket: Option<Arc<TokenBucket>>,
}

impl PerIp {
    /// Nothing of the client's is left: its entry may go. Its event rate must be full again
    /// first: a client that closes its last connection and opens another would otherwise get
    /// a full bucket each time (v1 kept every address's limiter for ever).
    fn unused(&self) -> bool {
        self.connections == 0
            && self.filter_bytes == 0
            && self.message_bytes == 0
            && self.bucket.as_ref().is_none_or(|b| b.is_full())
    }
}

/// An IPv6 site: the usual end-site allocation (RFC 6177; many ISPs give a /56, tunnel brokers a
/// free /48). All of a site's client keys together may hold at most [`site_cap`] subscribers,
/// and as many connections still in plain HTTP: one site's 65,536 /64s would otherwise fill
/// `--max-subscribers` by themselves, each within its per-IP limit.
pub const IPV6_SITE_PREFIX: u8 = 48;

/// What one IPv6 site may hold: `--max-connections-per-ipv6-48`, by default a quarter of
/// `--max-subscribers` (as a client may hold a quarter of each memory budget), never less
/// than one client may; `None`: no limit.
pub fn site_cap(limits: &LimitsConfig) -> Option<usize> {
    match limits.max_connections_per_ipv6_48 {
        Some(0) => None,
        Some(n) => Some(n),
        None => Some((limits.max_subscribers / 4).max(limits.max_connections_per_ip)),
    }
}

/// The IPv6 site of a client key cut to `prefix` bits, when the site is wider than the key
/// (`None` for IPv4, and for keys already as wide as a site).
pub fn site_key(key: IpAddr, prefix: u8) -> Option<IpAddr> {
    match key {
        IpAddr::V6(_) if prefix > IPV6_SITE_PREFIX => Some(client_key(key, IPV6_SITE_PREFIX)),
        _ => None,
    }
}

/// Counts per IPv6 site ([`IPV6_SITE_PREFIX`]) up to a cap; entries go with their last count.
struct SiteCounts {
    /// `None`: sites are not limited (nor counted).
    cap: Option<usize>,
    counts: DashMap<IpAddr, usize>,
}

impl SiteCounts {
    fn new(cap: Option<usize>) -> Self {
        SiteCounts { cap, counts: DashMap::new() }
    }

    /// The site of client key `key` counted one more: `Ok(None)` when sites are not counted,
    /// or the key is no narrower than a site; `Err` (nothing counted) at the site's cap.
    fn take_for(&self, key: IpAddr, ipv6_prefix: u8) -> Result<Option<IpAddr>, ()> {
        let (Some(_), Some(site)) = (self.cap, site_key(key, ipv6_prefix)) else { return Ok(None) };
        if self.take(site) {
            Ok(Some(site))
        } else {
            Err(())
        }
    }

    /// Counts one more for `site`; false (nothing counted) at its cap.
    fn take(&self, site: IpAddr) -> bool {
        let cap = self.cap.unwrap_or(usize::MAX);
        let mut n = self.counts.entry(site).or_insert(0);
        if *n >= cap {
            drop(n);
            self.counts.remove_if(&site, |_, n| *n == 0);
            return false;
        }
        *n += 1;
        true
    }

    fn release(&self, site: IpAddr) {
        self.counts.remove_if_mut(&site, |_, n| {
            *n = n.saturating_sub(1);
            *n == 0
        });
    }
}

/// The key a client is limited under: IPv4 addresses as they are (and IPv4-mapped IPv6 as
/// IPv4), IPv6 addresses cut to `prefix` bits.
pub fn client_key(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6);
                let mask = if prefix == 0 { 0 } else { u128::MAX << (128 - prefix.min(128) as u32) };
                IpAddr::V6((bits & mask).into())
            }
        },
    }
}

/// Why a subscriber, or its filter, was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    TooManySubscribers,
    TooManyFromIp,
    /// The client's IPv6 site ([`IPV6_SITE_PREFIX`]) holds its [`site_cap`] already.
    TooManyFromSite,
    /// Its filter would take the filters' memory past `--max-filter-bytes`, or its IP's share.
    FilterBudget,
}

/// Held for the life of a connection; releases its slots and its filter's bytes on drop.
pub struct Slot {
    admission: Arc<Admission>,
    /// The per-IP key held, if the client is limited per IP.
    key: Option<IpAddr>,
    /// Its IPv6 site, counted.
    site: Option<IpAddr>,
    pub bucket: Option<Arc<TokenBucket>>,
    /// The bytes of the filter this connection holds, counted in the budgets.
    filter_bytes: usize,
}

impl Admission {
    /// `gauges`: what filters hold, what client messages hold.
    pub fn new(limits: &LimitsConfig, gauges: [prometheus::IntGauge; 2]) -> Arc<Self> {
        let [filter_gauge, message_gauge] = gauges;
        Arc::new(Admission {
            max_subscribers: limits.max_subscribers,
            max_per_ip: limits.max_connections_per_ip,
            rate_per_ip: limits.max_events_per_second_per_ip,
            ipv6_prefix: limits.ipv6_prefix,
            unlimited: limits.unlimited_clients.clone(),
            total: AtomicUsize::new(0),
            per_ip: DashMap::new(),
            pruned: Mutex::new(Instant::now()),
            per_site: SiteCounts::new(site_cap(limits)),
            filters: Budget {
                max: limits.max_filter_bytes as usize,
                held: AtomicUsize::new(0),
                gauge: filter_gauge,
                per_ip: |p| &mut p.filter_bytes,
            },
            messages: Budget {
                max: limits.max_client_message_bytes as usize,
                held: AtomicUsize::new(0),
                gauge: message_gauge,
                per_ip: |p| &mut p.message_bytes,
            },
        })
    }

    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Refused> {
        // Never raised past the cap, not even for a moment: a refusal must not refuse others.
        let room = |n: usize| (n < self.max_subscribers).then_some(n + 1);
        if self.total.fetch_update(Ordering::SeqCst, Ordering::SeqCst, room).is_err() {
            return Err(Refused::TooManySubscribers);
        }
        if self.unlimited.iter().any(|n| n.contains(ip)) {
            return Ok(Slot { admission: self.clone(), key: None, site: None, bucket: None, filter_bytes: 0 });
        }
        let ip = client_key(ip, self.ipv6_prefix);
        self.prune();
        let Ok(site) = self.per_site.take_for(ip, self.ipv6_prefix) else {
            self.total.fetch_sub(1, Ordering::SeqCst);
            return Err(Refused::TooManyFromSite);
        };
        let mut entry = self.per_ip.entry(ip).or_default();
        if entry.bucket.is_none() && self.rate_per_ip > 0 {
            entry.bucket = Some(Arc::new(TokenBucket::new(self.rate_per_ip as f64)));
        }
        if entry.connections >= self.max_per_ip {
            drop(entry);
            if let Some(site) = site {
                self.per_site.release(site);
            }
            self.total.fetch_sub(1, Ordering::SeqCst);
            return Err(Refused::TooManyFromIp);
        }
        entry.connections += 1;
        let bucket = entry.bucket.clone();
        Ok(Slot { admission: self.clone(), key: Some(ip), site, bucket, filter_bytes: 0 })
    }

    pub fn connected(&self) -> usize {
        self.total.load(Ordering::SeqCst)
    }

    /// What connections' filters hold now.
    pub fn filter_bytes(&self) -> usize {
        self.filters.held.load(Ordering::SeqCst)
    }

    /// What client messages hold now.
    pub fn message_bytes(&self) -> usize {
        self.messages.held.load(Ordering::SeqCst)
    }

    /// Drops the entries of clients gone whose buckets have refilled, at most once a second,
    /// once there are as many entries as there can be subscribers (entries of clients gone
    /// stay only while their buckets refill: at most a second, plus any debt at their rate).
    fn prune(&self) {
        if self.per_ip.len() < self.max_subscribers {
            return;
        }
        // Another admit pruning now: no need to wait for it.
        let Ok(mut pruned) = self.pruned.try_lock() else { return };
        if pruned.elapsed() >= Duration::from_secs(1) {
            *pruned = Instant::now();
            self.per_ip.retain(|_, v| !v.unused());
        }
    }

    /// Takes `more` bytes of `budget` for a connection of client `key`; false, taking nothing,
    /// when that would pass the budget or the client's quarter of it.
    fn take(&self, budget: &Budget, key: Option<&IpAddr>, more: usize) -> bool {
        let max = if budget.max == 0 { usize::MAX } else { budget.max };
        // The client's share, under its entry's lock, then the total, which is never raised
        // past the budget (a refusal must not refuse others meanwhile). A client whose last
        // connection ended may still have a message arriving (the reader lingers after a
        // close): its entry comes back for it, and goes once nothing of the client's is left.
        let mut entry = key.map(|k| self.per_ip.entry(*k).or_default());
        let fits = |total: usize| total.checked_add(more).filter(|t| *t <= max);
        let taken = entry.as_mut().is_none_or(|e| (budget.per_ip)(e).saturating_add(more) <= max / 4)
            && budget.held.fetch_update(Ordering::SeqCst, Ordering::SeqCst, fits).is_ok();
        if let (true, Some(e)) = (taken, entry.as_mut()) {
            *(budget.per_ip)(e) += more;
        }
        drop(entry);
        if taken {
            budget.gauge.add(more as i64);
        } else if let Some(k) = key {
            // (An entry made for a refused take holds nothing.)
            self.per_ip.remove_if(k, |_, v| v.unused());
        }
        taken
    }

    fn release(&self, budget: &Budget, key: Option<&IpAddr>, bytes: usize) {
        if bytes == 0 {
            return;
        }
        budget.held.fetch_sub(bytes, Ordering::SeqCst);
        budget.gauge.sub(bytes as i64);
        let Some(key) = key else { return };
        if let Some(mut entry) = self.per_ip.get_mut(key) {
            let held = (budget.per_ip)(&mut entry);
            *held = held.saturating_sub(bytes);
        }
        // A message's bytes may outlive its connection's slot (the reader lingers after the
        // close): the entry stays until they are given back too.
        self.per_ip.remove_if(key, |_, v| v.unused());
    }
}

impl Slot {
    /// The key this connection is limited under (`None`: an unlimited client).
    pub fn client_key(&self) -> Option<IpAddr> {
        self.key
    }

    /// Counts `bytes` (the new filter's [`super::dispatch::filter_bytes`]) for this
    /// connection's filter in place of what its last one held; refused, holding what it held,
    /// when that would take all filters past `--max-filter-bytes` or this client's past a
    /// quarter of it. A smaller filter is always taken.
    pub fn hold_filter(&mut self, bytes: usize) -> Result<(), Refused> {
        let a = &self.admission;
        let Some(more) = bytes.checked_sub(self.filter_bytes).filter(|m| *m > 0) else {
            a.release(&a.filters, self.key.as_ref(), self.filter_bytes - bytes);
            self.filter_bytes = bytes;
            return Ok(());
        };
        if !a.take(&a.filters, self.key.as_ref(), more) {
            return Err(Refused::FilterBudget);
        }
        self.filter_bytes = bytes;
        Ok(())
    }

    /// A hold on client messages' memory for this connection, holding nothing yet.
    pub fn message_bytes(&self) -> MessageBytes {
        MessageBytes { admission: self.admission.clone(), key: self.key, bytes: 0 }
    }
}

/// Bytes of client messages held against `--max-client-message-bytes` (and the client's share
/// of it); given back when dropped.
pub struct MessageBytes {
    admission: Arc<Admission>,
    key: Option<IpAddr>,
    bytes: usize,
}

impl MessageBytes {
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Holds `more` bytes beyond what it holds; false, holding what it held, past the budget
    /// or the client's share of it.
    #[must_use]
    pub fn grow(&mut self, more: usize) -> bool {
        let a = &self.admission;
        let taken = a.take(&a.messages, self.key.as_ref(), more);
        if taken {
            self.bytes += more;
        }
        taken
    }

    /// Gives back what it holds beyond `bytes`.
    pub fn shrink_to(&mut self, bytes: usize) {
        if let Some(extra) = self.bytes.checked_sub(bytes).filter(|e| *e > 0) {
            self.admission.release(&self.admission.messages, self.key.as_ref(), extra);
            self.bytes = bytes;
        }
    }
}

impl Drop for MessageBytes {
    fn drop(&mut self) {
        self.shrink_to(0);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.admission.release(&self.admission.filters, self.key.as_ref(), self.filter_bytes);
        self.admission.total.fetch_sub(1, Ordering::SeqCst);
        if let Some(site) = self.site {
            self.admission.per_site.release(site);
        }
        // Entries go away with their last connection (v1's map grew forever).
        if let Some(key) = &self.key {
            self.admission.per_ip.remove_if_mut(key, |_, v| {
                v.connections -= 1;
                v.unused()
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ip_trusts_only_configured_proxies() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let proxy: SocketAddr = "10.1.2.3:5000".parse().unwrap();
        let direct: SocketAddr = "203.0.113.9:5000".parse().unwrap();
        assert_eq!(client_ip(proxy, Some("198.51.100.7, 10.9.9.9"), &trusted).to_string(), "198.51.100.7");
        assert_eq!(client_ip(direct, Some("198.51.100.7"), &trusted).to_string(), "203.0.113.9");
        assert_eq!(client_ip(proxy, None, &trusted).to_string(), "10.1.2.3");
        // A dual-stack listener sees an IPv4 proxy as `::ffff:a.b.c.d`: still the proxy.
        let mapped: SocketAddr = "[::ffff:10.1.2.3]:5000".parse().unwrap();
        assert_eq!(client_ip(mapped, Some("198.51.100.7"), &trusted).to_string(), "198.51.100.7");
        assert_eq!(client_ip(mapped, None, &trusted).to_string(), "10.1.2.3");
        assert_eq!(client_ip(proxy, Some("::ffff:198.51.100.7"), &trusted).to_string(), "198.51.100.7");
        // A block written in the mapped form still takes the IPv4 peer.
        for block in ["::ffff:10.0.0.0/104", "::ffff:10.1.2.3"] {
            let trusted: Vec<IpNet> = vec![block.parse().unwrap()];
            for peer in [proxy, mapped] {
                assert_eq!(client_ip(peer, Some("198.51.100.7"), &trusted).to_string(), "198.51.100.7", "{block}");
            }
        }
        // All of IPv4 (or of IPv6, which holds its mapped form) trusted: the proxies' own
        // addresses are all that is left, and the peer is the client.
        for block in ["::ffff:0:0/96", "::/0"] {
            let trusted: Vec<IpNet> = vec![block.parse().unwrap()];
            assert_eq!(client_ip(mapped, Some("198.51.100.7"), &trusted).to_string(), "10.1.2.3", "{block}");
        }
    }

    #[test]
    fn forwarded_for_entries_may_carry_a_port_or_brackets() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let proxy: SocketAddr = "10.1.2.3:5000".parse().unwrap();
        for (xff, client) in [
            ("198.51.100.7:5678", "198.51.100.7"),
            ("[2001:db8::1]", "2001:db8::1"),
            ("[2001:db8::1]:443", "2001:db8::1"),
            (" 198.51.100.7:5678 , 10.9.9.9:80", "198.51.100.7"),
            ("198.51.100.7, [::ffff:10.9.9.9]:80", "198.51.100.7"),
            ("[::ffff:198.51.100.7]:1", "198.51.100.7"),
        ] {
            assert_eq!(client_ip(proxy, Some(xff), &trusted).to_string(), client, "{xff}");
        }
        // Not an address: the walk stops there, and the proxy is the client.
        for xff in ["[198.51.100.7]", "198.51.100.7:port", "[2001:db8::1", "unknown", "_hidden"] {
            assert_eq!(client_ip(proxy, Some(xff), &trusted).to_string(), "10.1.2.3", "{xff}");
        }
    }

    #[test]
    fn the_metrics_gate_does_not_count_the_scraper() {
        let mut l = limits(10, 1, 0);
        l.trusted_proxies = vec!["192.0.2.0/24".parse().unwrap()];
        let counter = || prometheus::IntCounter::new("x", "x").unwrap();
        let gate = ConnectGate::for_metrics(&l, counter());
        // Strangers fill it: 8 addresses, 8 connections each.
        let held: Vec<_> = (0..METRICS_MAX_OPEN)
            .map(|i| gate.admit(format!("198.51.100.{}", i / METRICS_MAX_OPEN_PER_IP).parse().unwrap()).unwrap())
            .collect();
        assert!(gate.admit("198.51.100.200".parse().unwrap()).is_none());
        // The scraper (unlimited: 10.0.0.0/8) still gets in, as often as it likes.
        let scrapes: Vec<_> = (0..100).map(|_| gate.admit("10.0.0.9".parse().unwrap()).unwrap()).collect();
        drop(scrapes);
        // A trusted proxy is one client here (nothing reads X-Forwarded-For).
        drop(held);
        let proxy: Vec<_> =
            (0..METRICS_MAX_OPEN_PER_IP).map(|_| gate.admit("192.0.2.1".parse().unwrap()).unwrap()).collect();
        assert!(gate.admit("192.0.2.1".parse().unwrap()).is_none());
        drop(proxy);
        assert_eq!(gate.open_total.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn unlimited_clients_are_known_on_a_dual_stack_listener() {
        let (a, _) = admission(&limits(10, 1, 0));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        // Unlimited (10.0.0.0/8): more connections than the per-IP limit of one.
        let slots: Vec<Slot> = (0..3).map(|_| a.admit(mapped).unwrap()).collect();
        assert!(slots.iter().all(|s| s.client_key().is_none()));
    }

    #[test]
    fn one_ipv6_site_holds_at_most_a_quarter_of_the_subscribers() {
        // 16 subscribers, 2 per client: a site (/48) may hold 4, whatever its /64s.
        let (a, _) = admission(&limits(16, 2, 0));
        let at = |s: &str| -> IpAddr { s.parse().unwrap() };
        let mut slots = Vec::new();
        for net in 1..=4 {
            slots.push(a.admit(at(&format!("2001:db8:0:{net}::1"))).unwrap());
        }
        assert_eq!(a.admit(at("2001:db8:0:5::1")).err(), Some(Refused::TooManyFromSite));
        assert_eq!(a.admit(at("2001:db8:0:1::2")).err(), Some(Refused::TooManyFromSite));
        // Another site, and IPv4 clients, are not held back by it.
        slots.push(a.admit(at("2001:db8:1::1")).unwrap());
        for _ in 0..2 {
            slots.push(a.admit(at("192.0.2.1")).unwrap());
        }
        // A refusal took nothing; a connection's end gives its site's place back.
        assert_eq!(a.connected(), 7);
        slots.remove(0);
        let again = a.admit(at("2001:db8:0:9::1")).unwrap();
        // A client over its own limit gives back the site place it took first.
        let (b, _) = admission(&limits(16, 1, 0));
        let first = b.admit(at("2001:db8:0:1::1")).unwrap();
        for _ in 0..5 {
            assert_eq!(b.admit(at("2001:db8:0:1::2")).err(), Some(Refused::TooManyFromIp));
        }
        let others: Vec<Slot> = (2..=4).map(|n| b.admit(at(&format!("2001:db8:0:{n}::1"))).unwrap()).collect();
        assert_eq!(b.admit(at("2001:db8:0:5::1")).err(), Some(Refused::TooManyFromSite));
        drop((first, others, again, slots));
        assert_eq!((a.connected(), a.per_site.counts.len(), b.per_site.counts.len()), (0, 0, 0));
        // Clients limited per /48 or wider already are not counted again.
        let mut wide = limits(16, 8, 0);
        wide.ipv6_prefix = 48;
        let (c, _) = admission(&wide);
        let held: Vec<Slot> = (0..8).map(|n| c.admit(at(&format!("2001:db8:0:{n}::1"))).unwrap()).collect();
        assert_eq!((held.len(), c.per_site.counts.len()), (8, 0));
        // Set by hand, or off.
        let mut set = limits(16, 2, 0);
        set.max_connections_per_ipv6_48 = Some(1);
        let (d, _) = admission(&set);
        let _one = d.admit(at("2001:db8:0:1::1")).unwrap();
        assert_eq!(d.admit(at("2001:db8:0:2::1")).err(), Some(Refused::TooManyFromSite));
        set.max_connections_per_ipv6_48 = Some(0);
        let (e, _) = admission(&set);
        let many: Vec<Slot> = (1..=8).map(|n| e.admit(at(&format!("2001:db8:0:{n}::1"))).unwrap()).collect();
        assert_eq!((many.len(), e.per_site.counts.len()), (8, 0));
        // The plain-HTTP connections of a site are held to the same share.
        let refused_open = prometheus::IntCounter::new("o", "o").unwrap();
        let gate =
            ConnectGate::new(&limits(16, 2, 0), prometheus::IntCounter::new("r", "r").unwrap(), refused_open.clone());
        let open: Vec<OpenConnection> =
            (1..=4).map(|n| gate.admit(at(&format!("2001:db8:0:{n}::1"))).unwrap()).collect();
        assert!(gate.admit(at("2001:db8:0:5::1")).is_none());
        assert!(gate.admit(at("2001:db8:1::1")).is_some());
        assert_eq!(refused_open.get(), 1);
        drop(open);
        assert_eq!(gate.open_per_site.counts.len(), 0);
        assert!(gate.admit(at("2001:db8:0:5::1")).is_some());
    }

    fn limits(max_subscribers: usize, max_per_ip: usize, rate: u64) -> LimitsConfig {
        LimitsConfig {
            max_subscribers,
            max_connections_per_ip: max_per_ip,
            max_events_per_second_per_ip: rate,
            trusted_proxies: vec![],
            ipv6_prefix: 64,
            max_connections_per_ipv6_48: None,
            unlimited_clients: vec!["10.0.0.0/8".parse().unwrap()],
            max_connects_per_second_per_ip: 0,
            max_filter_bytes: 0,
            max_client_message_bytes: 0,
        }
    }

    fn admission(limits: &LimitsConfig) -> (Arc<Admission>, prometheus::IntGauge) {
        let (a, [filters, _]) = admission_and_gauges(limits);
        (a, filters)
    }

    /// The admission, and its gauges of what filters and client messages hold.
    fn admission_and_gauges(limits: &LimitsConfig) -> (Arc<Admission>, [prometheus::IntGauge; 2]) {
        let gauges = ["filter_bytes", "message_bytes"].map(|n| prometheus::IntGauge::new(n, "h").unwrap());
        (Admission::new(limits, gauges.clone()), gauges)
    }

    #[test]
    fn client_messages_share_a_memory_budget_and_one_ip_a_quarter_of_it() {
        let mut l = limits(100, 100, 0);
        l.max_client_message_bytes = 4000;
        l.max_filter_bytes = 4000;
        let (a, [filters, messages]) = admission_and_gauges(&l);
        let from = |s: &str| a.admit(s.parse().unwrap()).unwrap();
        let (one, two) = (from("192.0.2.1"), from("192.0.2.1"));
        let mut first = one.message_bytes();
        assert!(first.grow(600));
        let mut second = two.message_bytes();
        assert!(!second.grow(401), "past the IP's quarter");
        assert!(second.grow(400));
        // The budgets are separate: the IP's filter share is untouched.
        let mut filter_of_one = from("192.0.2.1");
        filter_of_one.hold_filter(1000).unwrap();
        assert_eq!((a.message_bytes(), messages.get(), filters.get()), (1000, 1000, 1000));
        // Bytes given back are the client's to take again.
        assert!(!second.grow(1), "the IP's quarter is full");
        first.shrink_to(100);
        assert_eq!(first.bytes(), 100);
        assert!(second.grow(500));
        first.shrink_to(0);
        assert_eq!(a.message_bytes(), 900);
        // Others and an exempt client fill the total; past it nobody gets more.
        let others: Vec<Slot> = (2..5).map(|i| from(&format!("192.0.2.{i}"))).collect();
        let mut held: Vec<MessageBytes> = others.iter().map(|s| s.message_bytes()).collect();
        for h in &mut held {
            assert!(h.grow(1000));
        }
        let exempt = from("10.0.0.1");
        let mut big = exempt.message_bytes();
        assert!(!big.grow(101), "past the total");
        assert!(big.grow(100));
        assert_eq!((a.message_bytes(), messages.get()), (4000, 4000));
        // A hold outliving its connection's slot keeps counting in its client's share, and
        // gives its bytes back all the same.
        drop((one, two, filter_of_one));
        let client: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(a.per_ip.get(&client).map(|e| (e.connections, e.message_bytes)), Some((0, 900)));
        let again = from("192.0.2.1");
        assert!(!again.message_bytes().grow(101), "the share still counts the lingering hold");
        drop((second, again));
        assert!(a.per_ip.get(&client).is_none());
        // A hold whose client has no connection left (a message still arriving after the
        // close) counts in a share of its own again; a refused take leaves no entry behind.
        let mut orphan = from("192.0.2.9").message_bytes();
        let late: IpAddr = "192.0.2.9".parse().unwrap();
        assert!(a.per_ip.get(&late).is_none());
        assert!(!orphan.grow(1001), "past the quarter");
        assert!(a.per_ip.get(&late).is_none());
        assert!(orphan.grow(600));
        assert!(!orphan.grow(401), "the share counts it");
        drop(orphan);
        assert!(a.per_ip.get(&late).is_none());
        drop((held, big, others, exempt));
        assert_eq!((a.message_bytes(), messages.get(), filters.get()), (0, 0, 0));
        assert!(a.per_ip.is_empty());
    }

    /// A client's event rate outlives its last connection until it has refilled: closing every
    /// connection and opening another does not bring a full bucket.
    #[test]
    fn a_client_s_rate_outlives_its_connections_until_it_refills() {
        let a = admission(&limits(2, 10, 1_000)).0;
        let client: IpAddr = "192.0.2.1".parse().unwrap();
        let slot = a.admit(client).unwrap();
        let bucket = slot.bucket.clone().unwrap();
        assert!(bucket.is_full());
        assert!(!bucket.take_n(5_000.0).is_zero(), "4 seconds in debt");
        drop(slot);
        let again = a.admit(client).unwrap();
        assert!(Arc::ptr_eq(again.bucket.as_ref().unwrap(), &bucket), "the same bucket, still in debt");
        drop(again);
        // Entries kept only for a bucket refilling go once it has (pruned past max_subscribers).
        let full: Vec<Slot> = ["192.0.2.2", "192.0.2.3"].iter().map(|c| a.admit(c.parse().unwrap()).unwrap()).collect();
        drop(full);
        assert_eq!(a.per_ip.len(), 1, "the others' full buckets went with their connections");
        *a.per_ip.get_mut(&client).unwrap().bucket.as_ref().unwrap().state.lock().unwrap() = (1_000.0, Instant::now());
        *a.pruned.lock().unwrap() = Instant::now() - Duration::from_secs(2);
        let _other = a.admit("192.0.2.4".parse().unwrap()).unwrap();
        let _another = a.admit("192.0.2.5".parse().unwrap()).unwrap();
        assert!(a.per_ip.get(&client).is_none(), "refilled: pruned");
    }

    #[test]
    fn filters_share_a_memory_budget_and_one_ip_a_quarter_of_it() {
        let mut l = limits(100, 100, 0);
        l.max_filter_bytes = 4000;
        let (a, gauge) = admission(&l);
        let from = |s: &str| a.admit(s.parse().unwrap()).unwrap();
        let mut first = from("192.0.2.1");
        first.hold_filter(900).unwrap();
        let mut second = from("192.0.2.1");
        assert_eq!(second.hold_filter(200), Err(Refused::FilterBudget), "past the IP's quarter");
        second.hold_filter(100).unwrap();
        // A larger filter for the same connection counts only what it adds.
        first.hold_filter(900).unwrap();
        assert_eq!(a.filter_bytes(), 1000);
        // Three more clients take the rest; an exempt one counts in the total too.
        let mut others: Vec<Slot> = (2..5).map(|i| from(&format!("192.0.2.{i}"))).collect();
        for s in &mut others {
            s.hold_filter(900).unwrap();
        }
        let mut exempt = from("10.0.0.1");
        assert_eq!(exempt.hold_filter(400), Err(Refused::FilterBudget), "past the total");
        exempt.hold_filter(300).unwrap();
        assert_eq!((a.filter_bytes(), gauge.get()), (4000, 4000));
        // A refused filter leaves what the connection held; a smaller one is always taken.
        assert_eq!(first.hold_filter(950), Err(Refused::FilterBudget));
        first.hold_filter(10).unwrap();
        assert_eq!(a.filter_bytes(), 3110);
        second.hold_filter(990).unwrap();
        // Closing gives a connection's bytes back, to the total and to its IP.
        drop((first, second, exempt));
        assert_eq!((a.filter_bytes(), gauge.get()), (2700, 2700));
        let mut again = from("192.0.2.1");
        again.hold_filter(1000).unwrap();
        drop(others);
        drop(again);
        assert_eq!((a.filter_bytes(), gauge.get()), (0, 0));
        assert!(a.per_ip.is_empty());
        // 0: unlimited, still counted.
        let (u, gauge) = admission(&limits(10, 10, 0));
        let mut s = u.admit("192.0.2.1".parse().unwrap()).unwrap();
        s.hold_filter(1 << 40).unwrap();
        assert_eq!(gauge.get(), 1 << 40);
    }

    #[test]
    fn ipv6_clients_are_limited_per_64_and_exempt_clients_not_at_all() {
        let (a, _) = admission(&limits(100, 2, 10));
        let from = |s: &str| a.admit(s.parse().unwrap());
        let _s1 = from("2001:db8:1:2::1").unwrap();
        let _s2 = from("2001:db8:1:2:ffff::9").unwrap();
        assert_eq!(from("2001:db8:1:2:abcd::1").err(), Some(Refused::TooManyFromIp), "same /64");
        let _other = from("2001:db8:1:3::1").unwrap();
        let _v4a = from("::ffff:192.0.2.1").unwrap();
        let _v4b = from("192.0.2.1").unwrap();
        assert_eq!(from("192.0.2.1").err(), Some(Refused::TooManyFromIp), "mapped v4 is the v4 address");
        let replicas: Vec<Slot> = (0..5).map(|_| from("10.1.1.1").unwrap()).collect();
        assert!(replicas.iter().all(|s| s.bucket.is_none()), "no rate limit for exempt clients");
        assert_eq!(a.connected(), 10);
        drop(replicas);
        assert_eq!(a.connected(), 5);
        assert_eq!(client_key("2001:db8::1".parse().unwrap(), 48).to_string(), "2001:db8::");
    }

    #[test]
    fn per_ip_slots_are_released() {
        let (a, _) = admission(&limits(3, 2, 0));
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let s1 = a.admit(ip).unwrap();
        let _s2 = a.admit(ip).unwrap();
        assert_eq!(a.admit(ip).err(), Some(Refused::TooManyFromIp));
        drop(s1);
        let _s3 = a.admit(ip).unwrap();
        let _s4 = a.admit("127.0.0.2".parse().unwrap()).unwrap();
        assert_eq!(a.admit("127.0.0.3".parse().unwrap()).err(), Some(Refused::TooManySubscribers));
    }

    #[test]
    fn the_connect_gate_paces_new_connections_per_client_and_spares_exempt_ones() {
        let mut l = limits(10, 10, 0);
        l.max_connects_per_second_per_ip = 5;
        l.unlimited_clients = vec!["10.0.0.9".parse().unwrap()];
        l.trusted_proxies = vec!["10.0.0.1".parse().unwrap()];
        let refused = prometheus::IntCounter::new("t", "t").unwrap();
        let gate = ConnectGate::new(&l, refused.clone(), prometheus::IntCounter::new("o", "o").unwrap());
        let a: IpAddr = "192.0.2.7".parse().unwrap();
        let admitted = (0..20).filter(|_| gate.admit(a).is_some()).count();
        assert_eq!(admitted, 5, "the bucket holds one second's worth");
        assert_eq!(refused.get(), 15);
        // Another client, a whole IPv6 /64 as one client, and the exempt ones.
        assert!(gate.admit("192.0.2.8".parse().unwrap()).is_some());
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!((0..10).filter(|i| gate.admit(v6(&format!("2001:db8::{i}"))).is_some()).count(), 5);
        let exempt = |s: &str| (0..100).all(|_| gate.admit(s.parse().unwrap()).is_some());
        assert!(exempt("10.0.0.9") && exempt("10.0.0.1"));
        // The same exempt proxy seen through a dual-stack listener.
        assert!(exempt("::ffff:10.0.0.1"));
        // Tokens come back with time.
        std::thread::sleep(Duration::from_millis(450));
        assert!(gate.admit(a).is_some());
        // Not paced: any number of new connections.
        l.max_connects_per_second_per_ip = 0;
        let gate = ConnectGate::new(&l, refused, prometheus::IntCounter::new("o", "o").unwrap());
        assert!((0..100).all(|_| gate.admit(a).is_some()));
    }

    /// An attacker rotating through more client keys within a second than the gate keeps
    /// buckets for: new clients are let in (not paced) until the next prune, not refused.
    #[test]
    fn an_address_rotating_flood_does_not_lock_new_clients_out() {
        let mut l = limits(10, 10, 0);
        l.max_connects_per_second_per_ip = 5;
        l.max_connections_per_ipv6_48 = Some(usize::MAX);
        let refused = prometheus::IntCounter::new("t", "t").unwrap();
        let gate = ConnectGate::new(&l, refused.clone(), prometheus::IntCounter::new("o", "o").unwrap());
        // One connection from each of CONNECT_GATE_KEYS + 1 /64s, each dropped at once.
        for i in 0..=CONNECT_GATE_KEYS as u32 {
            let (hi, lo) = (i >> 16, i & 0xffff);
            drop(gate.admit(format!("2001:db8:{hi:x}:{lo:x}::1").parse().unwrap()));
        }
        assert_eq!(refused.get(), 0);
        let new: IpAddr = "192.0.2.50".parse().unwrap();
        assert!(gate.admit(new).is_some(), "a new client during the flood");
        assert_eq!(refused.get(), 0);
    }

    #[test]
    fn a_client_holds_at_most_its_connection_limit_in_plain_http() {
        let mut l = limits(20, 3, 0);
        l.max_connects_per_second_per_ip = 0;
        l.unlimited_clients = vec!["10.0.0.9".parse().unwrap()];
        let refused_open = prometheus::IntCounter::new("o", "o").unwrap();
        let gate = ConnectGate::new(&l, prometheus::IntCounter::new("r", "r").unwrap(), refused_open.clone());
        let a: IpAddr = "192.0.2.7".parse().unwrap();
        let mut held: Vec<OpenConnection> = (0..3).map(|_| gate.admit(a).unwrap()).collect();
        assert!(gate.admit(a).is_none(), "a fourth at once");
        assert_eq!(refused_open.get(), 1);
        assert!(gate.admit("192.0.2.8".parse().unwrap()).is_some(), "another client");
        let exempt: Vec<_> = (0..10).map(|_| gate.admit("10.0.0.9".parse().unwrap()).unwrap()).collect();
        // One ends (or is upgraded): room for one more, and only one.
        held.pop();
        held.push(gate.admit(a).unwrap());
        assert!(gate.admit(a).is_none());
        // All gone: nothing kept for the client.
        drop((held, exempt));
        assert!(gate.open.is_empty(), "counts released");
        assert_eq!(gate.open_total.load(Ordering::SeqCst), 0);
        // All clients together, exempt ones too, at most --max-subscribers (20 here); the last
        // sixteenth of it (one here) for exempt clients alone.
        let many: Vec<_> = (0..19u8).map(|i| gate.admit(IpAddr::from([192, 0, 2, 100 + i])).unwrap()).collect();
        assert!(gate.admit("198.51.100.1".parse().unwrap()).is_none(), "a 20th stranger");
        let probe = gate.admit("10.0.0.9".parse().unwrap()).expect("an exempt client gets the room kept for it");
        assert!(gate.admit("10.0.0.9".parse().unwrap()).is_none(), "not past the total");
        drop((many, probe));
        assert!(gate.admit("198.51.100.1".parse().unwrap()).is_some());
        assert_eq!(gate.open_total.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn budgets_too_small_for_one_client_are_refused_at_start() {
        let with = |filter: u64, message: u64| {
            LimitsConfig { max_filter_bytes: filter, max_client_message_bytes: message, ..limits(10, 2, 0) }.validate()
        };
        assert!(with(0, 0).is_ok() && with(64 << 10, 1 << 20).is_ok());
        assert_eq!(with(1000, 0).unwrap_err().0, "max-filter-bytes");
        assert_eq!(with(0, (1 << 20) - 1).unwrap_err().0, "max-client-message-bytes");
        assert!("0.0.0.0/0".parse::<IpNet>().unwrap().is_everything());
        assert!(!"10.0.0.0/8".parse::<IpNet>().unwrap().is_everything());
        assert!("::ffff:0:0/96".parse::<IpNet>().unwrap().is_everything());
        assert!(!"::ffff:10.0.0.0/104".parse::<IpNet>().unwrap().is_everything());
        assert!(!"2001:db8::/32".parse::<IpNet>().unwrap().is_everything());
    }

    #[test]
    fn token_bucket_paces() {
        let b = TokenBucket::new(10.0);
        for _ in 0..10 {
            assert_eq!(b.take(), Duration::ZERO);
        }
        assert!(b.take() > Duration::from_millis(50));
    }
}
