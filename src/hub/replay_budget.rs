//! The memory replay pages in subscribers' hands may hold (`--replay-held-bytes`). Each
//! subscriber reading the log holds one page (~1 MB; at most [`PAGE_RESERVE`]) while it writes
//! it, so thousands of replayers at distinct places, or clients that stop reading mid-replay,
//! could otherwise take gigabytes.
//!
//! How: before a stream fetches a page (which may build one) it reserves room for the largest
//! page, from its client's share (a quarter: one address cannot take it all), then from the
//! whole budget. Waiting for room holds no page (a queued reservation keeps its place in line,
//! and its client's share once it has it). When the page comes, the stream keeps the page's
//! size of its reservation and gives back the rest. The whole budget counts a page once, for
//! as long as any stream holds it; each client's share counts the pages its own streams hold,
//! so a stream that joins a page another client took (one that then stops reading) pays for it
//! from its own share, and the client that took it stops paying once its streams let it go.
//! Pieces rendered again from a page's scan after a filter change are held within that page's
//! share (their own frames, at most 64 frames and ~64 KiB of JSON, are not counted).

use super::replay_pages::{Page, PAGE_MAX_BYTES};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, Weak};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The most a page can count ([`Page::counted_bytes`]): its values (at most
/// [`PAGE_MAX_BYTES`], or a single larger event, which counts as this much), its frames (no
/// larger than the values, plus headers), its frame and item lists. What a stream reserves
/// before it fetches a page.
pub const PAGE_RESERVE: usize = 2 * PAGE_MAX_BYTES + (512 << 10);

/// The budget's unit: permits are counted in KiB (a semaphore takes at most `u32` at once).
const UNIT: usize = 1024;

fn units(bytes: usize) -> usize {
    bytes.div_ceil(UNIT)
}

/// The memory the pages in streams' hands hold together, and each client's share of it.
pub struct ReplayBudget {
    whole: Arc<Semaphore>,
    /// Sizes in units: the whole budget, and a client's share of it.
    whole_units: usize,
    client_units: usize,
    /// Each client's share, while any of its streams holds it.
    clients: Mutex<HashMap<IpAddr, Weak<Semaphore>>>,
    /// The pages in hand, by address: how many holds count in each, and its share.
    held: Mutex<HashMap<usize, Held>>,
    /// `contrail_hub_replay_held_bytes`: what held pages count.
    gauge: prometheus::IntGauge,
    /// `contrail_hub_replay_held_waits_total`: reservations that had to wait.
    waits: prometheus::IntCounter,
}

/// A page in hand: the holds counting in it, its share of the whole budget, the bytes it
/// counts in the gauge (its size, even past its share), and the page (so that its address is
/// not reused while it is counted).
struct Held {
    holds: usize,
    /// Given back when the entry goes.
    _whole: OwnedSemaphorePermit,
    bytes: i64,
    _page: Arc<Page>,
    /// The clients whose streams hold it (by their share's address): how many holds, and
    /// the page's charge to that share, given back when the client's last hold goes.
    clients: HashMap<usize, (usize, OwnedSemaphorePermit)>,
}

impl Held {
    /// One more hold by `client`: charged to its share with `charge` if it has none yet
    /// here (else `charge` goes back).
    fn add(&mut self, client: Option<usize>, charge: Option<OwnedSemaphorePermit>) {
        self.holds += 1;
        if let Some(client) = client {
            match self.clients.entry(client) {
                std::collections::hash_map::Entry::Occupied(mut e) => e.get_mut().0 += 1,
                std::collections::hash_map::Entry::Vacant(e) => {
                    if let Some(charge) = charge {
                        e.insert((1, charge));
                    }
                }
            }
        }
    }
}

/// The key of a client's share in [`Held::clients`].
fn share_key(share: &Arc<Semaphore>) -> usize {
    Arc::as_ptr(share) as usize
}

/// Room reserved for a page, or a held page's share of it: permits from the whole budget and
/// from the client's share.
pub struct Share {
    whole: OwnedSemaphorePermit,
    client: Option<OwnedSemaphorePermit>,
}

impl Share {
    /// Splits `n` units off (at most what each part has).
    fn split(&mut self, n: usize) -> Share {
        let cut = |p: &mut OwnedSemaphorePermit| {
            let n = n.min(p.num_permits());
            p.split(n).expect("at most what the permit has")
        };
        Share { whole: cut(&mut self.whole), client: self.client.as_mut().map(cut) }
    }

    /// More room, if there is some now (never waits): `n` units from the whole budget and the
    /// client's share, or none.
    fn try_grow(&mut self, whole: &Arc<Semaphore>, n: usize) -> bool {
        let Ok(more) = whole.clone().try_acquire_many_owned(n as u32) else { return false };
        let client = match &self.client {
            Some(c) => match c.semaphore().clone().try_acquire_many_owned(n as u32) {
                Ok(p) => Some(p),
                Err(_) => return false,
            },
            None => None,
        };
        self.whole.merge(more);
        if let (Some(mine), Some(more)) = (self.client.as_mut(), client) {
            mine.merge(more);
        }
        true
    }
}

/// Room for a page from `semaphore` of `size` units (all of it if that is less); a wait is
/// counted in `waits` unless `waited` says this reservation waited already.
async fn take(
    semaphore: Arc<Semaphore>,
    size: usize,
    waits: &prometheus::IntCounter,
    waited: &mut bool,
) -> OwnedSemaphorePermit {
    let n = units(PAGE_RESERVE).min(size) as u32;
    match semaphore.clone().try_acquire_many_owned(n) {
        Ok(p) => p,
        Err(_) => {
            if !std::mem::replace(waited, true) {
                waits.inc();
            }
            semaphore.acquire_many_owned(n).await.expect("the budget is never closed")
        }
    }
}

/// A stream's client: its share of the budget (`None`: an unlimited client, only the whole
/// budget applies).
#[derive(Clone)]
pub struct Client(Option<Arc<Semaphore>>);

impl ReplayBudget {
    pub fn new(max_bytes: usize, gauge: prometheus::IntGauge, waits: prometheus::IntCounter) -> Arc<ReplayBudget> {
        let whole_units = (max_bytes / UNIT).clamp(1, Semaphore::MAX_PERMITS);
        Arc::new(ReplayBudget {
            whole: Arc::new(Semaphore::new(whole_units)),
            whole_units,
            client_units: (whole_units / 4).max(1),
            clients: Mutex::default(),
            held: Mutex::default(),
            gauge,
            waits,
        })
    }

    /// The share of the client limited under `key` (`None`: an unlimited client).
    pub fn client(&self, key: Option<IpAddr>) -> Client {
        let Some(key) = key else { return Client(None) };
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(share) = clients.get(&key).and_then(Weak::upgrade) {
            return Client(Some(share));
        }
        // Entries of clients gone are dropped as the map grows.
        if clients.len() >= 64 && clients.len().is_power_of_two() {
            clients.retain(|_, s| s.strong_count() > 0);
        }
        let share = Arc::new(Semaphore::new(self.client_units));
        clients.insert(key, Arc::downgrade(&share));
        Client(Some(share))
    }

    /// Reserves room for one page ([`PAGE_RESERVE`], or all there is when the budget is
    /// smaller), first from the client's share, then from the whole; each waits its turn.
    /// Cancel-safe, but a dropped wait loses its place: keep the future.
    pub fn reserve(self: &Arc<Self>, client: &Client) -> impl std::future::Future<Output = Share> + Send + 'static {
        let (me, client) = (self.clone(), client.0.clone());
        async move {
            let mut waited = false;
            let client = match client {
                Some(c) => Some(take(c, me.client_units, &me.waits, &mut waited).await),
                None => None,
            };
            let whole = take(me.whole.clone(), me.whole_units, &me.waits, &mut waited).await;
            Share { whole, client }
        }
    }

    /// Takes `page` in a stream's hand with the room reserved for it: it keeps the page's
    /// size of its client's share, and of the whole budget unless another stream holds the
    /// page already. A page larger than the reservation (one event over [`PAGE_MAX_BYTES`]:
    /// not from a relay, whose blocks are at most 2 MB) takes more room if there is some now;
    /// else it goes past the budget (shown in the gauge) rather than wait with the page in
    /// memory.
    pub fn hold(self: &Arc<Self>, page: Arc<Page>, mut reserved: Share) -> PageHold {
        let address = Arc::as_ptr(&page) as usize;
        let need = units(page.counted_bytes()).max(1);
        let mut share = reserved.split(need);
        let short = need.saturating_sub(share.whole.num_permits());
        if short > 0 {
            share.try_grow(&self.whole, short);
        }
        let Share { whole, client: charge } = share;
        let client = charge.as_ref().map(|c| share_key(c.semaphore()));
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let entry = held.entry(address).or_insert_with(|| {
            let bytes = (need * UNIT) as i64;
            self.gauge.add(bytes);
            Held { holds: 0, _whole: whole, bytes, _page: page.clone(), clients: HashMap::new() }
        });
        entry.add(client, charge);
        drop(held);
        // What the page does not use goes back (and the whole budget's share when the page was
        // counted already, the client's when its streams hold the page already).
        drop(reserved);
        PageHold { page, address, budget: self.clone(), client }
    }

    /// Takes `page` in a stream's hand with no room reserved, if another stream holds it and
    /// `client`'s streams hold it too or its share has room for it now (else the stream
    /// reserves, and waits its turn).
    pub fn join(self: &Arc<Self>, page: &Arc<Page>, client: &Client) -> Option<PageHold> {
        let address = Arc::as_ptr(page) as usize;
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let entry = held.get_mut(&address)?;
        let key = client.0.as_ref().map(share_key);
        let charge = match &client.0 {
            Some(share) if !entry.clients.contains_key(&share_key(share)) => {
                // (At most the whole share: a page larger than it is held past it, as `hold`.)
                let need = units(page.counted_bytes()).clamp(1, self.client_units) as u32;
                Some(share.clone().try_acquire_many_owned(need).ok()?)
            }
            _ => None,
        };
        entry.add(key, charge);
        Some(PageHold { page: page.clone(), address, budget: self.clone(), client: key })
    }

    /// One hold by `client` on the page at `address` went.
    fn release(&self, address: usize, client: Option<usize>) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let Some(h) = held.get_mut(&address) else { return };
        h.holds -= 1;
        let mut charge = None;
        if let Some(std::collections::hash_map::Entry::Occupied(mut e)) = client.map(|c| h.clients.entry(c)) {
            e.get_mut().0 -= 1;
            if e.get().0 == 0 {
                charge = Some(e.remove());
            }
        }
        let gone = if h.holds == 0 { held.remove(&address) } else { None };
        drop(held);
        drop(charge);
        if let Some(gone) = gone {
            self.gauge.sub(gone.bytes);
        }
    }
}

/// A page in a stream's hand. A hold keeps its page's share of the whole budget (or, for a
/// piece rendered from a page's scan, that page's) until the last hold on it goes, and its
/// charge to the stream's client's share until that client's last hold on it goes.
pub struct PageHold {
    page: Arc<Page>,
    /// The address of the page whose share this hold counts in, and the budget.
    address: usize,
    budget: Arc<ReplayBudget>,
    /// The stream's client's share (its key; `None`: an unlimited client).
    client: Option<usize>,
}

impl PageHold {
    pub fn page(&self) -> &Arc<Page> {
        &self.page
    }

    /// A piece rendered again from this page's scan, held within this page's share (the
    /// scan it keeps alive is what the share counts).
    pub fn piece(&self, piece: Page) -> PageHold {
        // This hold keeps the entry while it lives.
        if let Some(h) = self.budget.held.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&self.address) {
            h.add(self.client, None);
        }
        PageHold { page: Arc::new(piece), address: self.address, budget: self.budget.clone(), client: self.client }
    }
}

impl std::ops::Deref for PageHold {
    type Target = Page;
    fn deref(&self) -> &Page {
        &self.page
    }
}

impl Drop for PageHold {
    fn drop(&mut self) {
        self.budget.release(self.address, self.client);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::encode::Encoding;
    use crate::hub::replay_pages::REPLAY_BATCH;
    use crate::log::{memory::MemoryLog, Log};
    use crate::options::Filter;
    use std::time::Duration;

    fn new_budget(max_bytes: usize) -> (Arc<ReplayBudget>, prometheus::IntGauge, prometheus::IntCounter) {
        let gauge = prometheus::IntGauge::new("held", "h").unwrap();
        let waits = prometheus::IntCounter::new("waits", "h").unwrap();
        (ReplayBudget::new(max_bytes, gauge.clone(), waits.clone()), gauge, waits)
    }

    /// An identity event at `time_us` with `pad` bytes of padding.
    fn padded(time_us: u64, pad: usize) -> crate::event::Event {
        use crate::event::{Event, EventKind};
        let did = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa";
        let mut out = Vec::new();
        Event::begin(&mut out, did, EventKind::Identity);
        out.extend_from_slice(format!(",\"identity\":{{\"pad\":\"{}\"}}}}", "x".repeat(pad)).as_bytes());
        let mut e = Event::from_parts(out, EventKind::Identity, did.len(), 0..0);
        e.stamp(time_us);
        e
    }

    /// Pages of `REPLAY_BATCH` events of ~1 KB each, the log starting at `time_us` 1.
    fn pages(n: usize) -> Vec<Arc<Page>> {
        let log = Log::memory(MemoryLog::new(1 << 30));
        let events: Vec<crate::event::Event> = (0..n * REPLAY_BATCH).map(|i| padded(1 + i as u64, 1000)).collect();
        log.append(&events, None).unwrap();
        let at = |i: usize| 1 + (i * REPLAY_BATCH) as u64;
        let build = |i| Page::build(&log, at(i), REPLAY_BATCH, &Filter::default(), &Encoding::plain_v1()).unwrap();
        (0..n).map(|i| Arc::new(build(i))).collect()
    }

    fn counted(p: &Page) -> i64 {
        (units(p.counted_bytes()) * UNIT) as i64
    }

    #[tokio::test]
    async fn a_page_in_hand_counts_once_and_a_reservation_waits_holding_nothing() {
        let p = pages(3);
        let size = p[0].counted_bytes();
        assert!(size < PAGE_RESERVE / 2, "pages of ~2 MB: {size}");
        // Room for one reservation and a page beside it, not two reservations.
        let (budget, gauge, waits) = new_budget(PAGE_RESERVE + size + size / 2);
        let me = budget.client(None);
        let a = budget.hold(p[0].clone(), budget.reserve(&me).await);
        let b = budget.hold(p[0].clone(), budget.reserve(&me).await);
        assert_eq!(gauge.get(), counted(&p[0]), "two streams, one page, counted once");
        assert_eq!(budget.whole.available_permits(), budget.whole_units - units(size));
        // A piece of its scan is held within its share.
        let piece = a.piece(p[0].raw().rest(p[0].from + 10, (64, 64 << 10), &Filter::default(), &Encoding::plain_v1()));
        drop((a, b));
        assert_eq!(gauge.get(), counted(&p[0]), "the piece keeps the page's share");
        let c = budget.hold(p[1].clone(), budget.reserve(&me).await);
        // No room for another reservation: it waits, holding nothing, until a page goes.
        let mut next = Box::pin(budget.reserve(&me));
        assert!(tokio::time::timeout(Duration::from_millis(50), &mut next).await.is_err());
        drop(piece);
        assert_eq!(gauge.get(), counted(&p[1]));
        let reserved = tokio::time::timeout(Duration::from_secs(5), next).await.expect("room was made");
        assert_eq!(waits.get(), 1);
        let d = budget.hold(p[2].clone(), reserved);
        drop((c, d));
        assert_eq!((gauge.get(), budget.whole.available_permits()), (0, budget.whole_units));
        // A reservation given up holds nothing.
        let full = budget.reserve(&me).await;
        assert!(tokio::time::timeout(Duration::from_millis(20), budget.reserve(&me)).await.is_err());
        drop(full);
        assert_eq!(budget.whole.available_permits(), budget.whole_units);
    }

    #[tokio::test]
    async fn one_client_holds_at_most_a_quarter_and_others_go_on() {
        let p = pages(2);
        // A quarter is room for two pages' reservations.
        let (budget, gauge, _) = new_budget(8 * PAGE_RESERVE);
        let ip = |s: &str| Some(s.parse().unwrap());
        let (one, other) = (budget.client(ip("192.0.2.1")), budget.client(ip("192.0.2.2")));
        let (first, second) = (budget.reserve(&one).await, budget.reserve(&one).await);
        assert!(tokio::time::timeout(Duration::from_millis(50), budget.reserve(&one)).await.is_err(), "a quarter each");
        let theirs = budget.hold(p[0].clone(), budget.reserve(&other).await);
        // A page counts once in the whole budget, and in the share of every client whose
        // streams hold it.
        let mine = budget.hold(p[1].clone(), first);
        drop(second);
        let joined = budget.hold(p[0].clone(), budget.reserve(&one).await);
        assert_eq!(gauge.get(), counted(&p[0]) + counted(&p[1]));
        let (size0, size1) = (units(p[0].counted_bytes()), units(p[1].counted_bytes()));
        assert_eq!(budget.whole.available_permits(), budget.whole_units - size0 - size1);
        let left = |c: &Client| c.0.as_ref().unwrap().available_permits();
        assert_eq!(left(&one), budget.client_units - size1 - size0);
        // Once per client however many of its streams hold the page.
        let again = budget.join(&p[0], &one).expect("held by one already");
        assert_eq!(left(&one), budget.client_units - size1 - size0);
        drop(again);
        // The client that took a page stops paying for it once its streams let it go, though
        // another's stream (one that stopped reading, say) still holds it.
        drop(theirs);
        assert_eq!(left(&other), budget.client_units);
        assert_eq!(gauge.get(), counted(&p[0]) + counted(&p[1]));
        // Joining without a reservation takes the joiner's share too, when it has room now.
        let also = budget.join(&p[0], &other).expect("held, and room");
        assert_eq!(left(&other), budget.client_units - size0);
        drop((mine, joined, also));
        assert_eq!(gauge.get(), 0);
        assert_eq!((left(&one), left(&other)), (budget.client_units, budget.client_units));
        assert_eq!(budget.whole.available_permits(), budget.whole_units);
        // A client whose share has no room does not join (it reserves, and waits its turn).
        let first = budget.hold(p[0].clone(), budget.reserve(&other).await);
        let full = (budget.reserve(&one).await, budget.reserve(&one).await);
        assert!(budget.join(&p[0], &one).is_none());
        drop(full);
        assert!(budget.join(&p[0], &one).is_some());
        drop(first);
        let same = budget.client(ip("192.0.2.1"));
        assert!(Arc::ptr_eq(one.0.as_ref().unwrap(), same.0.as_ref().unwrap()), "one share per client");
        // A budget smaller than a page reserves all of it; the gauge shows the page's size.
        let (small, gauge, _) = new_budget(p[0].counted_bytes() / 4);
        let held = small.hold(p[0].clone(), small.reserve(&small.client(None)).await);
        assert_eq!((small.whole.available_permits(), gauge.get()), (0, counted(&p[0])));
        drop(held);
        assert_eq!((small.whole.available_permits(), gauge.get()), (small.whole_units, 0));
    }

    #[tokio::test]
    async fn a_page_of_one_event_larger_than_the_reservation_takes_more_room_if_there_is_some() {
        // One 9 MB event: a page of its own, over twice the reservation with its frame.
        let log = Log::memory(MemoryLog::new(1 << 30));
        log.append(&[padded(1, 9 << 20)], None).unwrap();
        let page = Arc::new(Page::build(&log, 1, REPLAY_BATCH, &Filter::default(), &Encoding::plain_v1()).unwrap());
        let need = units(page.counted_bytes());
        assert!(need > units(PAGE_RESERVE));
        // With room: the share grows to the page's size, in the whole budget and the client's.
        let (roomy, gauge, _) = new_budget(8 * need * UNIT);
        let client = roomy.client(Some("192.0.2.1".parse().unwrap()));
        let held = roomy.hold(page.clone(), roomy.reserve(&client).await);
        assert_eq!(roomy.whole.available_permits(), roomy.whole_units - need);
        assert_eq!(client.0.as_ref().unwrap().available_permits(), roomy.client_units - need);
        assert_eq!(gauge.get(), counted(&page));
        drop(held);
        assert_eq!((roomy.whole.available_permits(), gauge.get()), (roomy.whole_units, 0));
        // Without: it keeps its reservation and goes past the budget, which the gauge shows.
        let (tight, gauge, _) = new_budget(need * UNIT * 3 / 4);
        let held = tight.hold(page.clone(), tight.reserve(&tight.client(None)).await);
        assert_eq!(tight.whole.available_permits(), tight.whole_units - units(PAGE_RESERVE));
        assert_eq!(gauge.get(), counted(&page));
        drop(held);
        assert_eq!((tight.whole.available_permits(), gauge.get()), (tight.whole_units, 0));
    }
}
