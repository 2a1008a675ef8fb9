//! The sync actor's pure core: which outbox records go out next, in which frame encoding,
//! and what is kept for backfill — for every sync mode. No I/O: the actor scans
//! the outbox when [`SyncCore::scans`] asks, hands the records to [`SyncCore::fill`], sends
//! what [`SyncCore::next_frame`] and [`SyncCore::poll_summaries`] build, and applies the
//! hub's acknowledgements with [`SyncCore::acked`].
//!
//! # Lanes and cursors
//!
//! Each priority class has a *live* lane, read from the outbox in sequence order behind the
//! class's live cursor. Normal and bulk also have a *backfill* lane: records the live lane
//! has dealt with — at or behind its cursor and no longer waiting in its buffer — that are
//! neither in flight nor acknowledged are *held*: the deadband skipped them (delta), they
//! were summarized (summary), they were left behind when store-and-forward ended, or the
//! connection that carried them dropped. (Records read into the live buffer and not sent
//! yet are not held: the live lane sends them. Counting them as held sent them twice.)
//! Backfill reads held records again from the oldest (when `[sync] backfill` is on). What
//! it reads depends on the mode and on the link class ([`SyncCore::set_link`]; with
//! `[sync] mode = "auto"` the class picks the mode, a pinned mode may meet any class):
//!
//! - in full and full + zstd modes, and in delta and summary modes on a fiber or broadband
//!   link, everything held, through the bulk share of the weighted drain
//!   ([`DrainScheduler`]): fresh data keeps its priority, held data goes as bulk;
//! - in delta and summary modes on a mobile, satellite or intermittent link, only the
//!   *backlog*: what an outage, a lost connection or an earlier summary period left behind
//!   (up to a mark moved by [`SyncCore::set_mode`] and [`SyncCore::disconnected`]), and
//!   gently — one frame in flight at a time, only while no live record waits — so alarms
//!   and live data keep the link. What the current mode itself holds back (deadband skips,
//!   summarized samples) waits for a fiber or broadband link: a mobile or satellite link is
//!   not asked to carry the raw stream after all;
//! - in store-and-forward, nothing.
//!
//! # Modes
//!
//! | mode | control, critical | normal, bulk |
//! |------|-------------------|--------------|
//! | full | raw frames | raw frames; backfill of all held |
//! | full_zstd | zstd frames | zstd frames; backfill of all held |
//! | delta | delta frames, unfiltered | deadband, then delta frames; skipped records held; backlog backfilled gently (fiber, broadband: all held) |
//! | summary | zstd frames (alarms pass through) | aggregated per window; summary frames; all held; backlog backfilled gently (fiber, broadband: all held) |
//! | store_and_forward | zstd frames while a connection is up | nothing |
//!
//! Store-and-forward is what an intermittent link gets: normal and bulk wait in the outbox,
//! but whenever a connection is up between outages control and critical records still go
//! out (an alarm does not wait for the link to be declared stable).
//!
//! Leaving store-and-forward moves the normal and bulk live cursors to the end of the
//! outbox (when backfill is on): what piled up during the outage is backfilled as bulk and
//! fresh data goes first. Control and critical records are never held: after an outage
//! they drain at their own priority.
//!
//! # Invariants
//!
//! - A record leaves the outbox only when the hub acknowledges it ([`SyncCore::acked`]):
//!   held, summarized or lost-in-flight records are still there and will be sent.
//! - Summary frames acknowledge nothing and are never resent.
//! - A record is sent again only when the connection that carried it dropped before the hub
//!   acknowledged it; such resends are counted ([`CoreStats::resent`]).
//! - After [`SyncCore::disconnected`] nothing is in flight, the deadband forgets what it
//!   sent (frames since the last acknowledgement may be lost), control and critical are
//!   read again from their oldest record and normal and bulk records in flight become held.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use outpost_protocols::encoding::deadband::DeadbandError;
use outpost_protocols::encoding::summary::SummaryConfigError;
use outpost_protocols::encoding::{
    DeadbandConfig, DeadbandFilter, StreamSummary, SummaryAggregator, SummaryConfig,
    applies_deadband, encoding_for,
};
use outpost_protocols::frame::{Ack, DataFrame, Encoding};
use outpost_runtime::config::GatewayId;
use outpost_runtime::model::{LinkClass, Priority, Sample, SyncMode};
use outpost_runtime::storage::Seq;

use crate::drain::{DEFAULT_WEIGHTS, DrainScheduler};

/// The link class whose sync mode is `mode` (the core's link until it is told).
fn class_of(mode: SyncMode) -> LinkClass {
    match mode {
        SyncMode::Full => LinkClass::Fiber,
        SyncMode::FullZstd => LinkClass::Broadband,
        SyncMode::Delta => LinkClass::Mobile,
        SyncMode::Summary => LinkClass::Satellite,
        SyncMode::StoreAndForward => LinkClass::Intermittent,
    }
}

/// Most summaries per summary frame.
pub const SUMMARIES_PER_FRAME: usize = 1_000;

/// Where records come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lane {
    /// Fresh records of a class, behind its live cursor.
    Live(Priority),
    /// Held records of normal or bulk, behind the live cursor.
    Backfill(Priority),
}

impl Lane {
    fn index(self) -> usize {
        match self {
            Lane::Live(p) => p as usize,
            Lane::Backfill(Priority::Bulk) => 5,
            Lane::Backfill(_) => 4,
        }
    }

    /// The outbox class the lane reads.
    pub fn class(self) -> Priority {
        match self {
            Lane::Live(p) | Lane::Backfill(p) => p,
        }
    }

    /// A label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Lane::Live(_) => "live",
            Lane::Backfill(_) => "backfill",
        }
    }
}

/// What the backfill lanes read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backfill {
    /// Everything held, through the bulk share of the drain.
    All,
    /// Only the backlog (up to the backlog mark), one frame at a time while no live record
    /// waits.
    Backlog,
    /// Nothing.
    Off,
}

const BACKFILL: [Lane; 2] = [
    Lane::Backfill(Priority::Normal),
    Lane::Backfill(Priority::Bulk),
];

/// Settings of the core.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub gateway_id: GatewayId,
    /// Most samples per frame.
    pub max_frame_samples: usize,
    /// Most samples in flight (sent, unacknowledged).
    pub window: usize,
    /// Whether held records are backfilled in full modes.
    pub backfill: bool,
    pub deadband: DeadbandConfig,
    pub summary: SummaryConfig,
    /// How long after a window ends its summary waits for late samples.
    pub summary_lateness_ns: i64,
}

/// A configuration the core cannot use.
#[derive(Debug, thiserror::Error)]
pub enum CoreConfigError {
    #[error(transparent)]
    Deadband(#[from] DeadbandError),
    #[error(transparent)]
    Summary(#[from] SummaryConfigError),
}

/// An outbox read the core wants: up to `limit` records of `lane.class()` after `after`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanRequest {
    pub lane: Lane,
    pub after: Option<Seq>,
    pub limit: usize,
}

/// A data frame to send. Call [`SyncCore::commit`] once it is sent, or
/// [`SyncCore::abandon`] if it cannot be encoded.
#[derive(Debug)]
pub struct Outgoing {
    pub frame: DataFrame,
    pub lane: Lane,
    /// The sequences the frame carries (what the hub will acknowledge).
    pub seqs: Vec<Seq>,
}

/// Counts since the core was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CoreStats {
    /// Records the deadband skipped (held for backfill).
    pub deadband_skipped: u64,
    /// Records aggregated into summaries (held for backfill).
    pub summarized: u64,
    /// Summaries emitted.
    pub summaries: u64,
    /// Records sent from the backfill lanes.
    pub backfilled: u64,
    /// Records sent again that were sent before: in flight on this connection, or in
    /// flight on an earlier one when it dropped (as far as the core remembers; see
    /// [`SyncCore::commit`]).
    pub resent: u64,
}

#[derive(Debug, Clone, Copy)]
struct InFlightEntry {
    class: Priority,
    /// This record's share of its frame's encoded bytes.
    bytes: u64,
    /// Sent from a backfill lane.
    backfill: bool,
}

/// The core; see the module documentation.
#[derive(Debug)]
pub struct SyncCore {
    cfg: CoreConfig,
    mode: SyncMode,
    /// The link class, as the link monitor last said.
    link: LinkClass,
    in_flight: BTreeMap<Seq, InFlightEntry>,
    /// Sequences that were in flight when a connection dropped and have not been sent
    /// since (the hub may have them): sending one again is a resend. At most
    /// [`SyncCore::lost_limit`], the oldest forgotten first.
    lost: BTreeSet<Seq>,
    /// Live cursor per class: the highest sequence read for live sending.
    live: [Option<Seq>; 4],
    /// Backfill cursor of normal (index 2) and bulk (3).
    back: [Option<Seq>; 4],
    /// Whether the backfill lane of a class may have held records.
    back_pending: [bool; 4],
    /// Delta and summary modes backfill held records up to this mark only (the backlog of
    /// an outage, a lost connection or a summary period); `None`: no backlog.
    backlog_end: [Option<Seq>; 4],
    /// Records of backfill frames in flight.
    backfill_in_flight: usize,
    /// Read and not yet sent, per lane (see [`Lane::index`]).
    lanes: [VecDeque<(Seq, Sample)>; 6],
    drain: DrainScheduler,
    deadband: DeadbandFilter,
    /// Summary aggregators of normal (index 0) and bulk (1).
    summary: [SummaryAggregator; 2],
    /// Summaries of windows reopened by late samples, waiting for the next poll.
    late: Vec<StreamSummary>,
    stats: CoreStats,
}

impl SyncCore {
    /// A core in `mode` with nothing read yet, on the link class of `mode` until
    /// [`SyncCore::set_link`] says otherwise.
    pub fn new(cfg: CoreConfig, mode: SyncMode) -> Result<SyncCore, CoreConfigError> {
        let deadband = DeadbandFilter::new(&cfg.deadband)?;
        let summary = [
            SummaryAggregator::new(&cfg.summary)?,
            SummaryAggregator::new(&cfg.summary)?,
        ];
        let quantum = (cfg.max_frame_samples / 4).max(1) as u32;
        Ok(SyncCore {
            mode,
            link: class_of(mode),
            in_flight: BTreeMap::new(),
            lost: BTreeSet::new(),
            live: [None; 4],
            back: [None; 4],
            back_pending: [false; 4],
            backlog_end: [None; 4],
            backfill_in_flight: 0,
            lanes: Default::default(),
            drain: DrainScheduler::new(DEFAULT_WEIGHTS, quantum),
            deadband,
            summary,
            late: Vec::new(),
            stats: CoreStats::default(),
            cfg,
        })
    }

    pub fn mode(&self) -> SyncMode {
        self.mode
    }

    pub fn stats(&self) -> CoreStats {
        self.stats
    }

    /// Samples sent and not yet acknowledged.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Whether the window is full.
    pub fn window_full(&self) -> bool {
        self.in_flight.len() >= self.cfg.window
    }

    /// Whether held records may be waiting for backfill in this mode.
    pub fn backfill_pending(&self) -> bool {
        BACKFILL
            .iter()
            .any(|l| self.backfill_wanted(l.class() as usize))
    }

    /// Whether the backfill lane of class `c` has something to read now.
    fn backfill_wanted(&self, c: usize) -> bool {
        match self.backfill_policy() {
            Backfill::All => self.back_pending[c],
            Backfill::Backlog => self.backlog_end[c].is_some(),
            Backfill::Off => false,
        }
    }

    /// What the backfill lanes read in this mode on this link: see the module
    /// documentation. Full modes send everything anyway; delta and summary on a link with
    /// room to spare (fiber, broadband: pinned there, or not yet re-classified) send what
    /// they held back too; on a slow one only the backlog.
    fn backfill_policy(&self) -> Backfill {
        if !self.cfg.backfill {
            return Backfill::Off;
        }
        match self.mode {
            SyncMode::Full | SyncMode::FullZstd => Backfill::All,
            SyncMode::Delta | SyncMode::Summary => match self.link {
                LinkClass::Fiber | LinkClass::Broadband => Backfill::All,
                LinkClass::Mobile | LinkClass::Satellite | LinkClass::Intermittent => {
                    Backfill::Backlog
                }
            },
            SyncMode::StoreAndForward => Backfill::Off,
        }
    }

    /// The link class now (from the link monitor): with a pinned mode it decides what
    /// delta and summary modes backfill.
    pub fn set_link(&mut self, class: LinkClass) {
        let before = self.backfill_policy();
        self.link = class;
        if self.backfill_policy() != before {
            self.restart_backfill();
        }
    }

    /// A fresh backfill pass from the oldest held record.
    fn restart_backfill(&mut self) {
        let all = self.backfill_policy() == Backfill::All;
        for lane in BACKFILL {
            let c = lane.class() as usize;
            self.lanes[lane.index()].clear();
            self.back[c] = None;
            if all {
                self.back_pending[c] = true;
            }
        }
    }

    /// The highest sequence of class `c` the live lane has dealt with: sent, skipped by
    /// the deadband or summarized. Its cursor is the highest sequence *read*; what still
    /// waits in its buffer is not held (the live lane sends it), so backfill must stop
    /// before it.
    fn live_decided(&self, c: usize) -> Option<Seq> {
        match self.lanes[c].front() {
            Some((first, _)) => first.checked_sub(1).min(self.live[c]),
            None => self.live[c],
        }
    }

    /// Marks everything up to `upto` of class `c` as backlog for the reduced modes.
    fn mark_backlog(&mut self, c: usize, upto: Option<Seq>) {
        if upto.is_some() {
            self.backlog_end[c] = self.backlog_end[c].max(upto);
            self.back_pending[c] = true;
        }
    }

    /// The outbox reads needed now: lanes that are empty and active in this mode.
    pub fn scans(&self) -> Vec<ScanRequest> {
        let mut out = Vec::new();
        let limit = self.cfg.max_frame_samples.max(1);
        for p in Priority::ALL {
            if self.mode == SyncMode::StoreAndForward && applies_deadband(p) {
                continue; // store-and-forward holds normal and bulk
            }
            let lane = Lane::Live(p);
            if self.lanes[lane.index()].is_empty() {
                out.push(ScanRequest {
                    lane,
                    after: self.live[p as usize],
                    limit,
                });
            }
        }
        for lane in BACKFILL {
            let c = lane.class() as usize;
            if self.backfill_wanted(c) && self.lanes[lane.index()].is_empty() {
                out.push(ScanRequest {
                    lane,
                    after: self.back[c],
                    limit,
                });
            }
        }
        out
    }

    /// The result of `req`: the decoded records (in sequence order) and the highest
    /// sequence the read went through (undecodable records included; `None` when it found
    /// nothing).
    pub fn fill(&mut self, req: &ScanRequest, records: Vec<(Seq, Sample)>, upto: Option<Seq>) {
        let c = req.lane.class() as usize;
        match req.lane {
            Lane::Live(p) => {
                if req.after != self.live[c] {
                    return; // stale: the cursor moved (reconnect or mode change) meanwhile
                }
                if let Some(u) = upto {
                    self.live[c] = Some(u);
                }
                if self.mode == SyncMode::Summary && applies_deadband(p) {
                    let agg = &mut self.summary[usize::from(p == Priority::Bulk)];
                    for (seq, s) in &records {
                        // A summary emitted here covers a window reopened by a late sample.
                        if let Some(done) = agg.push(*seq, s) {
                            self.late.push(done);
                        }
                    }
                    self.stats.summarized += records.len() as u64;
                    if !records.is_empty() {
                        self.back_pending[c] = true;
                    }
                } else {
                    self.lanes[req.lane.index()].extend(records);
                }
            }
            Lane::Backfill(_) => {
                if req.after != self.back[c] {
                    return;
                }
                if !self.backfill_wanted(c) {
                    return; // the mode changed meanwhile
                }
                // Only what the live lane has dealt with (sent, skipped or summarized: not
                // what still waits in its buffer), in delta and summary modes behind the
                // backlog mark too, and not in flight is held.
                let full = self.backfill_policy() == Backfill::All;
                let end = if full {
                    self.live_decided(c)
                } else {
                    self.live_decided(c).min(self.backlog_end[c])
                };
                let caught_up = match (end, upto) {
                    (Some(end), Some(u)) => u >= end,
                    _ => true,
                };
                let held: Vec<(Seq, Sample)> = records
                    .into_iter()
                    .filter(|(s, _)| end.is_some_and(|e| *s <= e))
                    .filter(|(s, _)| !self.in_flight.contains_key(s))
                    .collect();
                if !caught_up {
                    self.back[c] = upto;
                } else if full {
                    self.back[c] = end;
                    if held.is_empty() {
                        self.back_pending[c] = false;
                    }
                } else {
                    // The backlog is read; what the mode holds back waits for a full mode.
                    self.backlog_end[c] = None;
                    self.back[c] = None;
                }
                self.lanes[req.lane.index()].extend(held);
            }
        }
    }

    /// The next data frame to send, if the window has room and something is waiting. In
    /// delta mode a batch the deadband skips entirely yields no frame: call again until
    /// `None`.
    pub fn next_frame(&mut self) -> Option<Outgoing> {
        loop {
            if self.window_full() {
                return None;
            }
            let room = (self.cfg.window - self.in_flight.len()).min(self.cfg.max_frame_samples);
            let live_waiting = (0..4).any(|i| !self.lanes[i].is_empty());
            // The backlog alone is backfilled one frame at a time, only when no live record
            // waits.
            let backfill_ok = self.backfill_policy() == Backfill::All
                || (!live_waiting && self.backfill_in_flight == 0);
            let waiting = [0, 1, 2, 3].map(|i| {
                !self.lanes[i].is_empty()
                    || (i == 3
                        && backfill_ok
                        && BACKFILL.iter().any(|l| !self.lanes[l.index()].is_empty()))
            });
            let p = self.drain.next(waiting)?;
            let lane = if !self.lanes[p as usize].is_empty() {
                Lane::Live(p)
            } else {
                *BACKFILL
                    .iter()
                    .find(|l| !self.lanes[l.index()].is_empty())?
            };
            let buf = &mut self.lanes[lane.index()];
            let n = room.min(buf.len());
            let batch: Vec<(Seq, Sample)> = buf.drain(..n).collect();
            self.drain.sent(p, batch.len());
            if let Some(out) = self.build(lane, batch) {
                return Some(out);
            }
        }
    }

    fn build(&mut self, lane: Lane, batch: Vec<(Seq, Sample)>) -> Option<Outgoing> {
        let class = lane.class();
        let gw = &self.cfg.gateway_id;
        let encoding = match lane {
            Lane::Backfill(_) => {
                self.stats.backfilled += batch.len() as u64;
                if self.mode == SyncMode::Full {
                    Encoding::Raw
                } else {
                    Encoding::Zstd
                }
            }
            Lane::Live(p) => encoding_for(self.mode, p)?,
        };
        let frame = if encoding == Encoding::Delta && applies_deadband(class) {
            let outcome = self.deadband.filter(batch.iter().map(|(s, x)| (*s, x)));
            if !outcome.skipped.is_empty() {
                self.stats.deadband_skipped += outcome.skipped.len() as u64;
                self.back_pending[class as usize] = true;
            }
            if outcome.send.is_empty() {
                return None;
            }
            DataFrame::from_filtered(
                gw,
                class,
                Encoding::Delta,
                batch.iter().map(|(s, x)| (*s, x)),
                &outcome,
            )
        } else {
            if encoding == Encoding::Summary {
                // Never reached: summary-mode normal and bulk records go to the aggregators.
                return None;
            }
            DataFrame::from_samples(gw, class, encoding, batch.iter().map(|(s, x)| (*s, x)))
        };
        let seqs = frame.samples.iter().map(|s| s.seq).collect();
        Some(Outgoing { frame, lane, seqs })
    }

    /// The frame of `lane` carrying `seqs` was sent as `bytes` bytes: they are in flight.
    /// Call it before the next [`SyncCore::fill`]. A sequence already in flight, or in
    /// flight when an earlier connection dropped (the last [`SyncCore::lost_limit`] of
    /// those), counts as resent ([`CoreStats::resent`]).
    pub fn commit(&mut self, lane: Lane, seqs: &[Seq], bytes: usize) {
        // The frame's bytes spread over its samples, the remainder on the first ones, so
        // that acknowledging all of them gives back exactly the bytes sent.
        let n = seqs.len().max(1) as u64;
        let (share, extra) = (bytes as u64 / n, bytes as u64 % n);
        let class = lane.class();
        let backfill = matches!(lane, Lane::Backfill(_));
        for (i, &s) in seqs.iter().enumerate() {
            let old = self.in_flight.insert(
                s,
                InFlightEntry {
                    class,
                    bytes: share + u64::from((i as u64) < extra),
                    backfill,
                },
            );
            if old.is_some_and(|e| e.backfill) {
                self.backfill_in_flight -= 1;
            }
            let was_lost = self.lost.remove(&s);
            if old.is_some() || was_lost {
                self.stats.resent += 1;
            }
            if backfill {
                self.backfill_in_flight += 1;
            }
        }
    }

    /// The frame of `lane` carrying `seqs` could not be encoded: the (class, sequence)
    /// pairs to drop from the outbox.
    pub fn abandon(&mut self, lane: Lane, seqs: Vec<Seq>) -> Vec<(Priority, Seq)> {
        let class = lane.class();
        seqs.into_iter().map(|s| (class, s)).collect()
    }

    /// Applies an acknowledgement: the (class, sequence) pairs to delete from the outbox
    /// and the frame bytes they account for. Sequences not in flight are ignored.
    pub fn acked(&mut self, ack: &Ack) -> (Vec<(Priority, Seq)>, u64) {
        let mut out = Vec::new();
        let mut bytes = 0u64;
        for r in &ack.ranges {
            let keys: Vec<Seq> = self
                .in_flight
                .range(r.first..=r.last)
                .map(|(s, _)| *s)
                .collect();
            for s in keys {
                if let Some(e) = self.in_flight.remove(&s) {
                    if e.backfill {
                        self.backfill_in_flight -= 1;
                    }
                    bytes += e.bytes;
                    out.push((e.class, s));
                }
            }
        }
        (out, bytes)
    }

    /// Summaries of the windows that closed by `now_ns` (sample time), as frames.
    pub fn poll_summaries(&mut self, now_ns: i64) -> Vec<DataFrame> {
        let watermark = now_ns.saturating_sub(self.cfg.summary_lateness_ns);
        let mut done = std::mem::take(&mut self.late);
        for agg in &mut self.summary {
            done.extend(agg.close_until(watermark));
        }
        self.summary_frames(done)
    }

    fn summary_frames(&mut self, done: Vec<StreamSummary>) -> Vec<DataFrame> {
        self.stats.summaries += done.len() as u64;
        done.chunks(SUMMARIES_PER_FRAME)
            .map(|c| DataFrame::from_summaries(&self.cfg.gateway_id, Priority::Normal, c))
            .collect()
    }

    /// Switches to `mode`; `outbox_end` is the outbox's next sequence (every record below
    /// it is durable). Returns the summaries flushed by leaving summary mode.
    pub fn set_mode(&mut self, mode: SyncMode, outbox_end: Seq) -> Vec<DataFrame> {
        let old = self.mode;
        if old == mode {
            return Vec::new();
        }
        self.mode = mode;
        let mut frames = Vec::new();
        if old == SyncMode::Summary {
            let mut done = std::mem::take(&mut self.late);
            for agg in &mut self.summary {
                done.extend(agg.flush());
            }
            frames = self.summary_frames(done);
        }
        // What was read for the old mode is read again for the new one.
        for p in [Priority::Normal, Priority::Bulk] {
            let lane = Lane::Live(p);
            let buf = std::mem::take(&mut self.lanes[lane.index()]);
            if let Some((first, _)) = buf.front() {
                self.live[p as usize] = first.checked_sub(1);
            }
        }
        if mode == SyncMode::Delta {
            self.deadband.reset();
        }
        if old == SyncMode::StoreAndForward && self.cfg.backfill {
            // What piled up during the outage is backfilled; fresh data goes first.
            for p in [Priority::Normal, Priority::Bulk] {
                let end = outbox_end.checked_sub(1);
                let c = p as usize;
                if end > self.live[c] {
                    self.live[c] = end;
                }
                self.mark_backlog(c, self.live[c]);
            }
        }
        if old == SyncMode::Summary {
            // What the summary period held back is backlog now.
            for p in [Priority::Normal, Priority::Bulk] {
                self.mark_backlog(p as usize, self.live[p as usize]);
            }
        }
        self.restart_backfill();
        frames
    }

    /// How many sequences lost in flight the core remembers to count resends: four
    /// windows (enough for the connections that drop before the backlog is sent again;
    /// records evicted meanwhile are never resent and are forgotten oldest first).
    fn lost_limit(&self) -> usize {
        self.cfg.window.saturating_mul(4).max(1)
    }

    /// The connection is gone: nothing is in flight any more; see the module documentation.
    pub fn disconnected(&mut self) {
        let mut lost: [Option<Seq>; 4] = [None; 4];
        for (seq, e) in std::mem::take(&mut self.in_flight) {
            let c = e.class as usize;
            lost[c] = lost[c].max(Some(seq));
            self.lost.insert(seq);
        }
        while self.lost.len() > self.lost_limit() {
            self.lost.pop_first();
        }
        self.backfill_in_flight = 0;
        for p in [Priority::Normal, Priority::Bulk] {
            let c = p as usize;
            self.mark_backlog(c, lost[c]);
        }
        for p in [Priority::Control, Priority::Critical] {
            self.live[p as usize] = None;
            self.lanes[p as usize].clear();
        }
        // Unsent normal and bulk records read for live sending are read again.
        for p in [Priority::Normal, Priority::Bulk] {
            let buf = std::mem::take(&mut self.lanes[p as usize]);
            if let Some((first, _)) = buf.front() {
                self.live[p as usize] = first.checked_sub(1);
            }
        }
        for lane in BACKFILL {
            self.lanes[lane.index()].clear();
            self.back[lane.class() as usize] = None;
        }
        self.deadband.reset();
    }
}
