//! The relay stream position: decides, for each frame's seq, whether it is new, a duplicate
//! of something already persisted, the start of a relay whose seq space was reset, or not a
//! believable seq at all. Pure, and every step is checked arithmetic: the seq comes from the
//! wire.
//!
//! - Relays replay from `?cursor=` inclusively, and public relays are fan-out daemons that can
//!   be a little behind, so the first frames after a reconnect may repeat what we have: those
//!   are duplicates, skipped (no duplicates, DESIGN.md invariant 2).
//! - Only a first frame *far* below our position (more than the reset threshold) means the
//!   relay lost its history and restarted lower: then we follow it (spec/firehose.md §1.4).
//! - A relay that refused our cursor as in its future (a `FutureCursor` error frame) is asked
//!   again with it, in case that was one lagging instance behind a load balancer; after
//!   [`MAX_CURSOR_REFUSALS`] refusals in a row (its seq space restarted below us) it is asked
//!   without one, live, and its first frame is judged by the rule above. What the relay sent
//!   in its new space before that connection is not asked for: whether it repeats events we
//!   hold under other seqs cannot be told. A first frame *above* our position on that live
//!   connection says the relay can serve our cursor after all (the refusals came from a lagging
//!   instance): it is asked again with it ([`SeqDecision::AskAgain`], at most
//!   [`MAX_ASK_AGAIN`] times in a row) rather than taking the frames in between as a gap.
//! - Frames far below our position in the middle of a connection (a fan-out daemon whose
//!   upstream restarted lower, without closing our connection) are kept aside
//!   ([`SeqDecision::FarBelow`]); once a run of them is long enough to be a new seq space
//!   rather than stray frames, the caller follows it from the run's first frame
//!   ([`SeqTracker::follow`]): it hands on the frames it kept, or, when some went at its memory
//!   bound, asks the relay for the run again from its first seq. Before, every one was skipped
//!   as a duplicate for as long as the relay kept sending, so the idle timeout never came.
//! - A relay whose next frame after our cursor cannot be read at all (a message over the
//!   websocket layer's 32 MiB: the connection ends before its seq is known) would be asked for
//!   the same cursor, and send the same frame, for ever. After [`MAX_UNREADABLE`] such
//!   connections in a row, the cursor asked for moves past our position one seq more each time
//!   (then doubling) until a frame after it arrives ([`SeqTracker::unreadable`]); what was
//!   skipped with the unreadable frame is counted as a gap.
//! - A seq ≤ 0 is invalid. A seq that jumps more than [`MAX_UNCONFIRMED_JUMP`] ahead is held
//!   until the next frame confirms it (one bogus seq ahead must not make the real frames up to
//!   it look like duplicates: they would be skipped, and lost, and a huge one would wedge
//!   ingest); if the next frame continues the old space instead, the held one is invalid.
//!   A source that stays quiet after a real jump (a PDS read directly) never sends that next
//!   frame: when the connection after the one that ended holding it, asking for our cursor,
//!   sends the held seq first above our position, it is held again, and taken if nothing
//!   follows it for the idle timeout ([`SeqTracker::release_quiet_held`]). Taken at once
//!   there, a bogus seq a replaying relay keeps in front of the real frames would have made
//!   them all duplicates.

/// A forward jump larger than this must be confirmed by the next frame. Relays' seqs are
/// dense, so a real jump this large is rare (and then waits one frame); a bogus one accepted
/// at once would make every real frame up to it a "duplicate", skipped for good.
pub const MAX_UNCONFIRMED_JUMP: i64 = 1_000;

/// A forward jump no confirmation makes believable within one frame: the next frame must not
/// be further than this past a held one. Days of firehose traffic are well under it; a corrupt
/// seq usually is not.
pub const MAX_SEQ_JUMP: i64 = 1_000_000_000;

/// Frames in a row far below our position, in one connection, that are a new seq space.
pub const FAR_BELOW_RUN: u32 = 100;

/// `FutureCursor` refusals in a row after which the relay is asked without a cursor.
pub const MAX_CURSOR_REFUSALS: u32 = 3;

/// Times in a row a live connection after refusals is dropped to ask for our cursor again
/// ([`SeqDecision::AskAgain`]); past them the frames in between are taken as a gap, so a relay
/// whose every cursor request reaches a lagging instance cannot stop ingest.
pub const MAX_ASK_AGAIN: u32 = 3;

/// Connections in a row ending on a message too large to read, at one position, before the
/// cursor skips ahead ([`SeqTracker::unreadable`]).
pub const MAX_UNREADABLE: u32 = 3;

/// How far [`SeqTracker::unreadable`] moves the cursor one seq at a time before doubling.
pub const LINEAR_SKIPS: i64 = 64;

/// What to do with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqDecision {
    /// New: hand it on. `gap` when it skipped ahead of `last + 1`. `release_held`: a frame
    /// held before it was confirmed by this one; hand the held one on first.
    Accept { gap: bool, release_held: bool },
    /// Already persisted (at or below our position): skip it.
    Duplicate,
    /// Far below our position in the middle of a connection: keep it aside. `run`: how many
    /// in a row now (this one included); the caller follows the run ([`SeqTracker::follow`])
    /// once it is long enough, or drops it as duplicates when another decision comes.
    FarBelow { run: u32 },
    /// Far below our position, but not above the run's last frame: a repeat inside the run,
    /// skipped (the run goes on).
    RunRepeat,
    /// The relay cannot serve our cursor (a new, lower seq space): follow it from this frame.
    Reset { from: i64 },
    /// A jump ahead of more than [`MAX_UNCONFIRMED_JUMP`]: keep the frame aside until the next
    /// one says whether it was real.
    Hold,
    /// Not a believable seq: count it and skip the frame.
    Invalid,
    /// The first frame of a live connection made after our cursor was refused is above our
    /// position: the relay holds what follows our cursor. Drop the frame and the connection,
    /// and connect again asking for the cursor ([`SeqTracker::cursor`] gives it again).
    AskAgain,
}

#[derive(Debug, Clone)]
pub struct SeqTracker {
    /// Newest seq handed on (0: none yet).
    last: i64,
    /// No frame with a seq has been seen on this connection yet.
    first_of_session: bool,
    /// A first frame more than this below `last` is a relay reset.
    reset_threshold: i64,
    /// The seq of a frame held after a jump ahead.
    held: Option<i64>,
    /// The held seq is a `held_before` sent again first above our position: the relay says
    /// nothing lies between, and a quiet idle timeout after it confirms it.
    held_replayed: bool,
    /// A seq held when the last connection ended: if the next connection that asks for our
    /// cursor sends it first above our position, the relay itself says nothing lies between.
    held_before: Option<i64>,
    /// A `held_before` seq that another frame came before: it was bogus (the caller counts it).
    refuted_before: Option<i64>,
    /// `FutureCursor` refusals since the last frame; from [`MAX_CURSOR_REFUSALS`], connect
    /// without a cursor.
    cursor_refusals: u32,
    /// Frames in a row, in this connection, far below `last`, and the newest of them.
    far_below: u32,
    /// The first seq of the current (or last) run far below.
    run_first: i64,
    run_last: i64,
    /// This connection was made without a cursor because ours was refused.
    live_after_refusals: bool,
    /// [`SeqDecision::AskAgain`]s since a connection asking for our cursor was served.
    asked_again: u32,
    /// Connections in a row that ended on an unreadable message at this position.
    unreadable: u32,
    /// How far past our position the cursor asked for is (0: at it).
    skip: i64,
}

impl SeqTracker {
    /// Starts at `last`, the newest persisted seq (0: none, start live).
    pub fn new(last: i64, reset_threshold: i64) -> Self {
        SeqTracker {
            last: last.max(0),
            first_of_session: true,
            reset_threshold: reset_threshold.max(0),
            held: None,
            held_replayed: false,
            held_before: None,
            refuted_before: None,
            cursor_refusals: 0,
            far_below: 0,
            run_first: 0,
            run_last: 0,
            live_after_refusals: false,
            asked_again: 0,
            unreadable: 0,
            skip: 0,
        }
    }

    /// The newest seq handed on (0: none).
    pub fn last(&self) -> i64 {
        self.last
    }

    /// The cursor to resume from, if any.
    pub fn cursor(&self) -> Option<i64> {
        (self.last > 0 && self.cursor_refusals < MAX_CURSOR_REFUSALS).then_some(self.last.saturating_add(self.skip))
    }

    /// A connection ended on a message too large to read before any frame moved our position.
    /// From the [`MAX_UNREADABLE`]th in a row, the next cursor skips past our position: one seq
    /// more each time up to [`LINEAR_SKIPS`], then twice as far. Relays' seqs are dense, so the
    /// unreadable frame is usually the next seq (a relay that replays inclusively needs one
    /// more); one seq at a time also gets past a fan-out daemon that starts a little behind any
    /// cursor without passing readable frames. Returns how far the next cursor is past our
    /// position.
    pub fn unreadable(&mut self) -> i64 {
        if self.last == 0 {
            return 0; // live: the next connection starts elsewhere anyway
        }
        self.unreadable = self.unreadable.saturating_add(1);
        if self.unreadable >= MAX_UNREADABLE {
            self.skip =
                if self.skip < LINEAR_SKIPS { self.skip + 1 } else { self.skip.saturating_mul(2).min(MAX_SEQ_JUMP) };
        }
        self.skip
    }

    /// The relay said our cursor is in its future. After [`MAX_CURSOR_REFUSALS`] in a row the
    /// next connections ask for none, until a frame with a seq arrives (asking again would be
    /// refused again, forever).
    pub fn cursor_refused(&mut self) {
        self.cursor_refusals = self.cursor_refusals.saturating_add(1);
    }

    /// The first seq of the current (or last) run of [`SeqDecision::FarBelow`] frames.
    pub fn run_first(&self) -> i64 {
        self.run_first
    }

    /// Follows a new seq space from `seq`: the last of a run of [`SeqDecision::FarBelow`]
    /// frames the caller now hands on, or the seq before the run's first when it asks the
    /// relay for the run again.
    pub fn follow(&mut self, seq: i64) {
        self.last = seq;
        // A seq held from the old space is no longer confirmed by a quiet relay: the next frame
        // in the new space refutes it.
        self.held_replayed = false;
        self.far_below = 0;
        (self.unreadable, self.skip) = (0, 0);
    }

    /// A new connection begins (a frame held on the old one is gone with it; its seq is kept,
    /// for the next connection to confirm).
    pub fn new_session(&mut self) {
        self.first_of_session = true;
        self.held_before = self.held.take().or(self.held_before);
        self.held_replayed = false;
        self.far_below = 0;
        self.live_after_refusals = self.last > 0 && self.cursor_refusals >= MAX_CURSOR_REFUSALS;
    }

    /// A seq held when a connection ended that the next connection refuted (another frame came
    /// first above our position), once.
    pub fn take_refuted_before(&mut self) -> Option<i64> {
        self.refuted_before.take()
    }

    /// The seq of the frame being held, if one is.
    pub fn held(&self) -> Option<i64> {
        self.held
    }

    /// A seq is held that this connection sent first again above our position
    /// ([`Self::release_quiet_held`] would take it).
    pub fn held_again(&self) -> bool {
        self.held.is_some() && self.held_replayed
    }

    /// The connection has been idle (nothing moved the stream on) for the idle timeout while
    /// holding a seq it sent first above our position, as the connection before it did: the
    /// relay twice says nothing lies between, and nothing has come after it. It is taken (the
    /// caller hands the held frame on, after a gap); returns its seq.
    pub fn release_quiet_held(&mut self) -> Option<i64> {
        let seq = self.held.filter(|_| self.held_replayed)?;
        self.held = None;
        self.held_replayed = false;
        self.last = seq;
        (self.unreadable, self.skip, self.far_below) = (0, 0, 0);
        Some(seq)
    }

    /// Decides about a frame with `seq`, and moves the position when it is accepted. A frame
    /// held before this call and no longer held after it (see [`Self::held`]) without being
    /// released is to be dropped (the caller counts it as invalid).
    pub fn observe(&mut self, seq: i64) -> SeqDecision {
        if seq <= 0 {
            return SeqDecision::Invalid;
        }
        let first = std::mem::take(&mut self.first_of_session);
        let live_after_refusals = std::mem::take(&mut self.live_after_refusals);
        self.cursor_refusals = 0;
        if first && !live_after_refusals {
            // A connection that asked for our cursor was served.
            self.asked_again = 0;
        }
        if first && live_after_refusals && seq > self.last.saturating_add(1) && self.asked_again < MAX_ASK_AGAIN {
            self.asked_again += 1;
            return SeqDecision::AskAgain;
        }
        if let Some(held) = self.held {
            // A frame above our position decides: continuing from the held seq confirms it;
            // one between our position and it (the old space goes on) says it was bogus. A
            // repeat, or a frame at or below our position, says nothing: it stays held.
            if seq > held && seq - held <= MAX_SEQ_JUMP {
                self.held = None;
                self.held_replayed = false;
                self.last = seq;
                (self.unreadable, self.skip, self.far_below) = (0, 0, 0);
                return SeqDecision::Accept { gap: seq > held + 1, release_held: true };
            }
            if seq == held {
                self.far_below = 0;
                return SeqDecision::Duplicate;
            }
            if seq > self.last {
                self.held = None;
                self.held_replayed = false;
            }
        }
        if seq > self.last && !live_after_refusals {
            // The first frame above our position on a connection that asked for our cursor:
            // if it is the seq held when the last connection ended, the relay says nothing lies
            // between. It is held again all the same: a relay whose history keeps a bogus seq
            // in front of the real frames sends it first too, and the real frames that follow
            // refute it. Nothing following it for the idle timeout confirms it
            // (`release_quiet_held`). Within MAX_SEQ_JUMP, as a confirmed jump must be.
            if let Some(before) = self.held_before.take() {
                if before == seq && seq - self.last <= MAX_SEQ_JUMP {
                    self.held = Some(seq);
                    self.held_replayed = true;
                    self.far_below = 0;
                    return SeqDecision::Hold;
                }
                self.refuted_before = Some(before);
            }
        }
        let far_below = self.last > 0 && seq < self.last.saturating_sub(self.reset_threshold);
        if first && far_below {
            // We asked for `cursor=last` and the relay starts far below it: it cannot serve
            // our cursor (a new relay instance with a new seq space). Taking its stream from
            // here is the only way forward; skipping "duplicates" would stall ingest.
            self.last = seq;
            (self.unreadable, self.skip) = (0, 0);
            return SeqDecision::Reset { from: seq };
        }
        if far_below {
            if self.far_below > 0 && seq <= self.run_last {
                return SeqDecision::RunRepeat;
            }
            if self.far_below == 0 {
                self.run_first = seq;
            }
            self.far_below = self.far_below.saturating_add(1);
            self.run_last = seq;
            return SeqDecision::FarBelow { run: self.far_below };
        }
        self.far_below = 0;
        if seq <= self.last {
            return SeqDecision::Duplicate;
        }
        if self.last > 0 && seq - self.last > MAX_UNCONFIRMED_JUMP {
            self.held = Some(seq);
            self.held_replayed = false;
            return SeqDecision::Hold;
        }
        let gap = self.last > 0 && seq > self.last + 1;
        self.last = seq;
        (self.unreadable, self.skip) = (0, 0);
        SeqDecision::Accept { gap, release_held: false }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACCEPT: SeqDecision = SeqDecision::Accept { gap: false, release_held: false };
    const ACCEPT_GAP: SeqDecision = SeqDecision::Accept { gap: true, release_held: false };

    #[test]
    fn duplicates_gaps_and_resets() {
        let mut t = SeqTracker::new(10, 5);
        assert_eq!(t.cursor(), Some(10));
        assert_eq!(t.observe(10), SeqDecision::Duplicate, "the inclusive cursor's repeat");
        assert_eq!(t.observe(11), ACCEPT);
        assert_eq!(t.observe(11), SeqDecision::Duplicate);
        assert_eq!(t.observe(15), SeqDecision::Accept { gap: true, release_held: false });
        assert_eq!(t.last(), 15);
        t.new_session();
        assert_eq!(t.observe(3), SeqDecision::Reset { from: 3 });
        assert_eq!(t.observe(4), ACCEPT);
        assert_eq!(SeqTracker::new(0, 5).cursor(), None);
        assert_eq!(SeqTracker::new(0, 5).observe(7), ACCEPT);
    }

    #[test]
    fn a_relay_above_our_refused_cursor_is_asked_for_it_again_a_few_times() {
        let refused_then_live = |t: &mut SeqTracker| {
            for _ in 0..MAX_CURSOR_REFUSALS {
                t.cursor_refused();
            }
            assert_eq!(t.cursor(), None);
            t.new_session();
        };
        let mut t = SeqTracker::new(50_000, 10_000);
        // The refusals came from a lagging instance; the live connection reached one that holds
        // what follows our cursor: ask for it, do not take seqs 50,001..50,079 as a gap.
        refused_then_live(&mut t);
        assert_eq!(t.observe(50_080), SeqDecision::AskAgain);
        assert_eq!((t.last(), t.cursor()), (50_000, Some(50_000)));
        t.new_session();
        assert_eq!(t.observe(50_000), SeqDecision::Duplicate, "served from the cursor");
        assert_eq!(t.observe(50_001), ACCEPT);
        // The next frame after our position is no gap: taken.
        refused_then_live(&mut t);
        assert_eq!(t.observe(50_002), ACCEPT);
        // Only the first frame of such a connection decides.
        refused_then_live(&mut t);
        assert_eq!(t.observe(50_002), SeqDecision::Duplicate);
        assert_eq!(t.observe(50_100), SeqDecision::Accept { gap: true, release_held: false });
        // A relay whose every cursor request meets a lagging instance: after MAX_ASK_AGAIN in
        // a row, the gap is taken rather than stopping ingest.
        let mut t = SeqTracker::new(50_000, 10_000);
        for i in 0..MAX_ASK_AGAIN {
            refused_then_live(&mut t);
            assert_eq!(t.observe(50_080 + i as i64), SeqDecision::AskAgain);
        }
        refused_then_live(&mut t);
        assert_eq!(t.observe(50_090), SeqDecision::Accept { gap: true, release_held: false });
        // A connection that asked for our cursor and was served starts the count again.
        let mut t = SeqTracker::new(50_000, 10_000);
        refused_then_live(&mut t);
        assert_eq!(t.observe(50_080), SeqDecision::AskAgain);
        t.new_session();
        assert_eq!(t.observe(50_001), ACCEPT);
        for i in 0..MAX_ASK_AGAIN {
            refused_then_live(&mut t);
            assert_eq!(t.observe(50_080 + i as i64), SeqDecision::AskAgain);
        }
        // Without refusals a live connection (a fresh start) takes what comes.
        let mut t = SeqTracker::new(0, 10_000);
        t.new_session();
        assert_eq!(t.observe(123_456), ACCEPT);
    }

    #[test]
    fn a_cursor_refused_again_and_again_is_not_asked_for_until_a_frame_comes() {
        let mut t = SeqTracker::new(50_000, 10_000);
        for _ in 1..MAX_CURSOR_REFUSALS {
            t.cursor_refused();
            assert_eq!(t.cursor(), Some(50_000), "asked again: it may have been one lagging instance");
        }
        t.cursor_refused();
        assert_eq!(t.cursor(), None, "live, not the cursor refused {MAX_CURSOR_REFUSALS} times");
        t.new_session();
        assert_eq!(t.cursor(), None, "still, after a connection that gave no frame");
        assert_eq!(t.observe(0), SeqDecision::Invalid);
        assert_eq!(t.cursor(), None, "a frame without a believable seq says nothing");
        // A relay far behind us: the reset rule follows it.
        assert_eq!(t.observe(7), SeqDecision::Reset { from: 7 });
        assert_eq!(t.cursor(), Some(7));
        // One a little behind (a lagging instance): duplicates until it passes us.
        let mut t = SeqTracker::new(50_000, 10_000);
        for _ in 0..MAX_CURSOR_REFUSALS {
            t.cursor_refused();
        }
        t.new_session();
        assert_eq!(t.observe(49_990), SeqDecision::Duplicate);
        assert_eq!(t.cursor(), Some(50_000));
        assert_eq!(t.observe(50_001), ACCEPT);
        // A frame between refusals starts the count again.
        let mut t = SeqTracker::new(50_000, 10_000);
        t.cursor_refused();
        t.cursor_refused();
        assert_eq!(t.observe(50_001), ACCEPT);
        t.cursor_refused();
        assert_eq!(t.cursor(), Some(50_001));
    }

    #[test]
    fn frames_far_below_in_one_connection_are_kept_aside_until_the_caller_follows_them() {
        let mut t = SeqTracker::new(50_000, 10_000);
        assert_eq!(t.observe(50_001), ACCEPT);
        // Stray frames far below, then the stream goes on: the run ends, the position stays.
        assert_eq!(t.observe(1), SeqDecision::FarBelow { run: 1 });
        assert_eq!(t.observe(2), SeqDecision::FarBelow { run: 2 });
        assert_eq!(t.observe(50_002), ACCEPT);
        assert_eq!(t.observe(3), SeqDecision::FarBelow { run: 1 }, "a new run");
        // A repeat inside the run (an inclusive resume upstream) is skipped; the run goes on.
        assert_eq!(t.observe(3), SeqDecision::RunRepeat);
        assert_eq!(t.observe(2), SeqDecision::RunRepeat);
        // A run the caller takes for a new space: it follows, and the space goes on.
        for seq in 4..=(FAR_BELOW_RUN as i64 + 2) {
            assert_eq!(t.observe(seq), SeqDecision::FarBelow { run: (seq - 2) as u32 });
        }
        t.follow(FAR_BELOW_RUN as i64 + 2);
        assert_eq!((t.last(), t.observe(FAR_BELOW_RUN as i64 + 3)), (FAR_BELOW_RUN as i64 + 2, ACCEPT));
        // A run is broken by any other decision, a held seq's confirmation too: a run counted
        // across it would be followed after fewer than FAR_BELOW_RUN frames in a row.
        let mut t = SeqTracker::new(50_000, 10_000);
        assert_eq!(t.observe(50_001), ACCEPT);
        assert_eq!(t.observe(1), SeqDecision::FarBelow { run: 1 });
        assert_eq!(t.observe(60_000), SeqDecision::Hold);
        assert_eq!(t.observe(2), SeqDecision::FarBelow { run: 1 }, "the hold was a decision");
        assert_eq!(t.observe(60_001), SeqDecision::Accept { gap: false, release_held: true });
        assert_eq!(t.observe(3), SeqDecision::FarBelow { run: 1 }, "a new run");
        // Frames a little below (a daemon catching up) are duplicates, never a run.
        let mut t = SeqTracker::new(50_000, 10_000);
        for _ in 0..1_000 {
            assert_eq!(t.observe(49_000), SeqDecision::Duplicate);
        }
    }

    #[test]
    fn a_fan_out_daemon_a_little_behind_is_not_a_reset() {
        let mut t = SeqTracker::new(31_527_015_322, 1_000_000);
        t.new_session();
        for seq in 31_527_014_900..=31_527_015_322 {
            assert_eq!(t.observe(seq), SeqDecision::Duplicate, "{seq}");
        }
        assert_eq!(t.observe(31_527_015_323), ACCEPT);
        t.new_session();
        assert_eq!(t.observe(20), SeqDecision::Reset { from: 20 }, "far below: a new seq space");
    }

    #[test]
    fn a_frame_that_cannot_be_read_is_skipped_after_a_few_tries() {
        let mut t = SeqTracker::new(100, 1_000_000);
        for _ in 1..MAX_UNREADABLE {
            assert_eq!(t.unreadable(), 0);
            assert_eq!(t.cursor(), Some(100), "asked again: it may have been the network");
        }
        // Relays replaying inclusively send seq 101 again for cursor=101: one more.
        let skips: Vec<i64> = (0..8).map(|_| t.unreadable()).collect();
        assert_eq!(skips, [1, 2, 3, 4, 5, 6, 7, 8]);
        for _ in 8..LINEAR_SKIPS {
            t.unreadable();
        }
        assert_eq!((t.unreadable(), t.unreadable()), (2 * LINEAR_SKIPS, 4 * LINEAR_SKIPS), "then doubling");
        assert_eq!(t.cursor(), Some(100 + 4 * LINEAR_SKIPS));
        // The first frame after it is taken (the seqs skipped are a gap), and all is reset.
        let next = 101 + 4 * LINEAR_SKIPS;
        assert_eq!(t.observe(next), SeqDecision::Accept { gap: true, release_held: false });
        assert_eq!(t.cursor(), Some(next));
        assert_eq!(t.unreadable(), 0, "counted again from one");
        // Live (no position): nothing to skip from.
        assert_eq!(SeqTracker::new(0, 10_000).unreadable(), 0);
        // Following a new seq space asks for it from where it is followed, not past it.
        let mut t = SeqTracker::new(50_000, 10_000);
        for _ in 0..7 {
            t.unreadable();
        }
        t.follow(999);
        assert_eq!(t.cursor(), Some(999));
    }

    /// A real jump on a quiet source: nothing follows the held frame, the connection ends (idle),
    /// and the next one, asking for our cursor, sends it first above our position: the relay
    /// says nothing lies between. It is held again, and taken when nothing follows it for the
    /// idle timeout (it used to be held again on every connection until the source sent
    /// something else, maybe hours later; then taken at once, which a bogus seq a replaying
    /// relay keeps in front of the real frames got too).
    #[test]
    fn a_held_seq_sent_first_again_after_our_cursor_is_taken_once_quiet() {
        let mut t = SeqTracker::new(100, 1_000_000);
        assert_eq!(t.observe(5_000), SeqDecision::Hold);
        assert_eq!(t.release_quiet_held(), None, "held once: a quiet connection proves nothing");
        t.new_session();
        assert_eq!(t.held(), None);
        assert_eq!(t.observe(100), SeqDecision::Duplicate, "the inclusive cursor's repeat");
        assert_eq!(t.observe(5_000), SeqDecision::Hold);
        assert_eq!(t.observe(5_000), SeqDecision::Duplicate, "a repeat of it says nothing");
        assert_eq!(t.release_quiet_held(), Some(5_000));
        assert_eq!((t.last(), t.cursor(), t.held()), (5_000, Some(5_000), None));
        assert_eq!(t.release_quiet_held(), None);
        assert_eq!(t.observe(5_001), ACCEPT);
        // Sent first again and followed by the next seq: confirmed as any held seq is.
        let mut t = SeqTracker::new(100, 1_000_000);
        assert_eq!(t.observe(5_000), SeqDecision::Hold);
        t.new_session();
        assert_eq!(t.observe(5_000), SeqDecision::Hold);
        assert_eq!(t.observe(5_001), SeqDecision::Accept { gap: false, release_held: true });
        // Sent first again and followed by the real frames below it (a replaying relay that
        // keeps a bogus seq in front of them): refuted, and the real frames are taken.
        let mut t = SeqTracker::new(100, 1_000_000);
        assert_eq!(t.observe(5_000), SeqDecision::Hold);
        t.new_session();
        assert_eq!(t.observe(100), SeqDecision::Duplicate);
        assert_eq!(t.observe(5_000), SeqDecision::Hold);
        assert_eq!(t.observe(101), ACCEPT);
        assert_eq!((t.held(), t.release_quiet_held(), t.last()), (None, None, 101));
        // Not when something else comes first above our position: that is judged as ever, and
        // the held seq is known for bogus (the caller counts it).
        let mut t = SeqTracker::new(100, 1_000_000);
        assert_eq!(t.observe(5_000), SeqDecision::Hold);
        t.new_session();
        assert_eq!(t.observe(101), ACCEPT);
        assert_eq!((t.take_refuted_before(), t.take_refuted_before()), (Some(5_000), None));
        assert_eq!(t.observe(5_000), SeqDecision::Hold);
        assert_eq!(t.release_quiet_held(), None, "held on this connection only");
        // A connection that ends before sending anything keeps the held seq for the next, and
        // one that ends holding it again (not quiet long enough) too.
        t.new_session();
        t.new_session();
        assert_eq!(t.observe(5_000), SeqDecision::Hold);
        t.new_session();
        assert_eq!(t.observe(5_000), SeqDecision::Hold);
        assert_eq!(t.release_quiet_held(), Some(5_000));
        // Held again, then a new, lower seq space followed on the same connection: the old
        // space's seq is not taken when that goes quiet (its cursor would be in the relay's
        // future).
        let mut t = SeqTracker::new(100_000, 1_000);
        assert_eq!(t.observe(105_000), SeqDecision::Hold);
        t.new_session();
        assert_eq!(t.observe(105_000), SeqDecision::Hold);
        t.follow(50);
        assert_eq!(t.release_quiet_held(), None);
        assert_eq!(t.observe(51), ACCEPT);
        assert_eq!((t.held(), t.last()), (None, 51));
    }

    #[test]
    fn seqs_from_the_wire_cannot_panic_or_wedge() {
        let mut t = SeqTracker::new(100, 1_000_000);
        assert_eq!(t.observe(0), SeqDecision::Invalid);
        assert_eq!(t.observe(-5), SeqDecision::Invalid);
        assert_eq!(t.observe(i64::MIN), SeqDecision::Invalid);
        // One corrupt huge seq is held, then dropped when the stream goes on normally.
        assert_eq!(t.observe(i64::MAX), SeqDecision::Hold);
        assert_eq!(t.observe(101), ACCEPT);
        assert_eq!(t.held(), None);
        assert_eq!(t.last(), 101);
        // An invalid seq between a held frame and its confirmation changes nothing.
        assert_eq!(t.observe(5_000_000_000), SeqDecision::Hold);
        assert_eq!(t.observe(0), SeqDecision::Invalid);
        assert_eq!(t.held(), Some(5_000_000_000));
        assert_eq!(t.observe(5_000_000_001), SeqDecision::Accept { gap: false, release_held: true });
        // A real move to a far higher seq space is confirmed by the next frame: nothing lost.
        assert_eq!(t.observe(20_000_000_000), SeqDecision::Hold);
        assert_eq!(t.observe(20_000_000_001), SeqDecision::Accept { gap: false, release_held: true });
        assert_eq!(t.last(), 20_000_000_001);
        // A bogus seq a little ahead (under the reset threshold) is held too: accepted, it
        // made the real frames up to it duplicates, skipped for good.
        let mut t = SeqTracker::new(100, 1_000_000);
        assert_eq!(t.observe(100 + MAX_UNCONFIRMED_JUMP), ACCEPT_GAP);
        assert_eq!(t.observe(1_000 + 2 * MAX_UNCONFIRMED_JUMP), SeqDecision::Hold);
        assert_eq!(t.observe(101 + MAX_UNCONFIRMED_JUMP), ACCEPT);
        assert_eq!(t.observe(500_000), SeqDecision::Hold);
        assert_eq!(t.observe(102 + MAX_UNCONFIRMED_JUMP), ACCEPT);
        // A repeat of the held frame, or a frame at or below our position, says nothing about
        // it: it stays held until a frame above our position decides.
        let mut t = SeqTracker::new(100, 1_000_000);
        assert_eq!(t.observe(5_000), SeqDecision::Hold);
        assert_eq!(t.observe(5_000), SeqDecision::Duplicate);
        assert_eq!(t.observe(50), SeqDecision::Duplicate);
        assert_eq!(t.held(), Some(5_000));
        assert_eq!(t.observe(5_001), SeqDecision::Accept { gap: false, release_held: true });
        // Extremes never overflow.
        let mut t = SeqTracker::new(i64::MAX, i64::MAX);
        assert_eq!(t.observe(i64::MAX), SeqDecision::Duplicate);
        assert_eq!(t.observe(1), SeqDecision::Duplicate);
    }
}
