//! The read scheduler: what one poll group reads in each poll, adapted to what the device
//! refuses. Pure (time is passed in); the driver sends the reads and reports each outcome.
//!
//! Batching joins points into one request, bridging unused addresses up to `max_gap`. A
//! device answers a read that touches any address it does not map with exception 2
//! ("illegal data address"), and the whole request gets no data: without this scheduler one
//! bad address would blank every point batched with it, on every poll. So when a request of
//! several points answers exception 2, it is split in two halves by address, read at once in
//! the same poll, and each half that answers exception 2 again is split again (a binary
//! search: a request of `k` points costs at most `2k − 2` extra reads, and only in the poll
//! that finds the cause). What the search finds:
//!
//! - a **point** whose own read answers exception 2 is unreadable: it leaves the plan, the
//!   rest is planned without it, and it is read alone every [`RETRY_FACTOR`] poll intervals,
//!   doubling after each refusal up to [`RETRY_CAP`] (or the poll interval when longer);
//!   when it reads again it rejoins the plan;
//! - two halves that each read fine but not together: the addresses between them are
//!   unmapped or the device refuses reads across them. The two neighbouring points (the last
//!   of the lower half, the first of the upper) are never joined in one request again,
//!   until a retry on the same schedule reads them together.
//!
//! Each finding is reported once ([`Finding`], with the message naming the addresses), and
//! once more when it clears. Other exceptions and transport failures change nothing here.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use super::{BatchConfig, PointConfig, ReadRequest, plan_reads_with};

/// Retry delay of an unreadable point or a refused join, in poll intervals (first retry).
pub const RETRY_FACTOR: u32 = 10;
/// Longest retry delay, unless the poll interval is longer (then the interval).
pub const RETRY_CAP: Duration = Duration::from_secs(300);
/// The Modbus exception "illegal data address".
pub const ILLEGAL_DATA_ADDRESS: u8 = 2;

/// Why a read is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadKind {
    /// A request of the plan.
    Plan,
    /// Half of a request that answered "illegal data address" (the index of the split in
    /// the current poll).
    Split(usize),
    /// An unreadable point (its index), read alone at the slow rate.
    RetryPoint(usize),
    /// Two points (indices) the device would not read together, tried together again.
    RetryJoin(usize, usize),
}

/// One read to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// What to read.
    pub request: ReadRequest,
    /// Why.
    pub kind: ReadKind,
}

impl Job {
    /// Whether the values of a successful answer are samples to deliver. A join retry reads
    /// points the plan reads in the same poll anyway: delivering them would double them.
    pub fn delivers(&self) -> bool {
        !matches!(self.kind, ReadKind::RetryJoin(..))
    }
}

/// What a read got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Data (the answer fitted the request).
    Data,
    /// An exception response, by code.
    Exception(u8),
    /// No usable answer (timeout, broken connection, malformed answer).
    Failed,
}

/// A change in what the device refuses, to log once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finding {
    /// The point (index) answers "illegal data address" on its own: it is read alone from
    /// now on, first again after `retry_in`.
    PointUnreadable {
        /// Point index.
        point: usize,
        /// Delay of the first retry.
        retry_in: Duration,
    },
    /// The point reads again and is back in the plan.
    PointRecovered {
        /// Point index.
        point: usize,
    },
    /// The two points read apart but not together: they are read in separate requests
    /// from now on, tried together again after `retry_in`.
    JoinRefused {
        /// The point below the refused span.
        left: usize,
        /// The point above it.
        right: usize,
        /// Delay of the first retry.
        retry_in: Duration,
    },
    /// The two points read together again.
    JoinRecovered {
        /// The point below.
        left: usize,
        /// The point above.
        right: usize,
    },
}

impl Finding {
    /// Whether it is a recovery (logged at info) rather than a new refusal (a warning).
    pub fn is_recovery(&self) -> bool {
        matches!(
            self,
            Finding::PointRecovered { .. } | Finding::JoinRecovered { .. }
        )
    }

    /// The log message, naming the table, the addresses and the points' streams.
    pub fn message(&self, points: &[PointConfig]) -> String {
        let name = |i: usize| points.get(i).map_or("?", |p| p.name.as_str());
        let at = |i: usize| {
            points.get(i).map_or_else(
                || "?".to_string(),
                |p| {
                    if p.count() == 1 {
                        format!("{} address {}", p.table.as_str(), p.address)
                    } else {
                        format!(
                            "{} addresses {}..={}",
                            p.table.as_str(),
                            p.address,
                            p.end() - 1
                        )
                    }
                },
            )
        };
        match *self {
            Finding::PointUnreadable { point, retry_in } => format!(
                "{} (point {:?}) answers exception 2 (illegal data address): polling the other \
                 points without it, retrying it alone in {retry_in:?}",
                at(point),
                name(point)
            ),
            Finding::PointRecovered { point } => format!(
                "{} (point {:?}) reads again: back in the poll",
                at(point),
                name(point)
            ),
            Finding::JoinRefused {
                left,
                right,
                retry_in,
            } => {
                let between = match (points.get(left), points.get(right)) {
                    (Some(l), Some(r)) if l.end() < u32::from(r.address) => format!(
                        "{} addresses {}..={} between them are unmapped or refused",
                        l.table.as_str(),
                        l.end(),
                        u32::from(r.address) - 1
                    ),
                    _ => "the device refuses a read across them".to_string(),
                };
                format!(
                    "{} (point {:?}) and {} (point {:?}) read apart but one read of both answers \
                     exception 2 (illegal data address): {between}; reading them in separate \
                     requests, trying them together again in {retry_in:?}",
                    at(left),
                    name(left),
                    at(right),
                    name(right)
                )
            }
            Finding::JoinRecovered { left, right } => format!(
                "{} (point {:?}) and {} (point {:?}) read together again: joined in the poll",
                at(left),
                name(left),
                at(right),
                name(right)
            ),
        }
    }
}

/// When to retry, and the delay after the next refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Retry {
    next: Instant,
    delay: Duration,
}

/// One split in the current poll: its halves' meeting points and how many halves read.
#[derive(Debug, Clone, Copy)]
struct Split {
    left: usize,
    right: usize,
    halves_read: u8,
}

/// The reads of one poll group, poll after poll (see the module doc).
#[derive(Debug, Clone)]
pub struct ReadScheduler {
    points: Vec<PointConfig>,
    batch: BatchConfig,
    interval: Duration,
    plan: Vec<ReadRequest>,
    unreadable: BTreeMap<usize, Retry>,
    /// Pairs (lower, upper point index) never joined in one request.
    apart: BTreeMap<(usize, usize), Retry>,
    replan: bool,
    queue: VecDeque<Job>,
    splits: Vec<Split>,
}

impl ReadScheduler {
    /// A scheduler for points (validated with [`super::validate_points`]) polled every
    /// `interval`, starting from the plan [`super::plan_reads`] makes.
    pub fn new(points: Vec<PointConfig>, batch: BatchConfig, interval: Duration) -> Self {
        let mut s = ReadScheduler {
            points,
            batch,
            interval,
            plan: Vec::new(),
            unreadable: BTreeMap::new(),
            apart: BTreeMap::new(),
            replan: true,
            queue: VecDeque::new(),
            splits: Vec::new(),
        };
        s.make_plan();
        s
    }

    /// The points, as given (a request's `points` index into it).
    pub fn points(&self) -> &[PointConfig] {
        &self.points
    }

    /// The current plan: the requests each poll makes (besides splits and retries).
    pub fn plan(&self) -> &[ReadRequest] {
        &self.plan
    }

    /// Points currently left out of the plan as unreadable (indices, ascending).
    pub fn unreadable(&self) -> impl Iterator<Item = usize> + '_ {
        self.unreadable.keys().copied()
    }

    /// Pairs of points currently kept in separate requests.
    pub fn kept_apart(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.apart.keys().copied()
    }

    /// The first retry delay: [`RETRY_FACTOR`] intervals, at most the cap.
    fn first_delay(&self) -> Duration {
        self.interval.saturating_mul(RETRY_FACTOR).min(self.cap())
    }

    fn cap(&self) -> Duration {
        RETRY_CAP.max(self.interval)
    }

    /// Plans the readable points, keeping apart the pairs the device refuses together and
    /// never bridging a gap that holds an unreadable point's address.
    fn make_plan(&mut self) {
        let (points, unreadable, apart) = (&self.points, &self.unreadable, &self.apart);
        self.plan = plan_reads_with(
            points,
            &self.batch,
            |i| !unreadable.contains_key(&i),
            |members, end, p| {
                let Some(next) = points.get(p) else {
                    return false;
                };
                let gap = end..u32::from(next.address);
                let bridges_unreadable = unreadable.keys().any(|&u| {
                    points.get(u).is_some_and(|u| {
                        u.table == next.table
                            && u32::from(u.address) < gap.end
                            && u.end() > gap.start
                    })
                });
                !bridges_unreadable
                    && !members
                        .iter()
                        .any(|&m| apart.contains_key(&(m, p)) || apart.contains_key(&(p, m)))
            },
        );
        self.replan = false;
    }

    /// Starts a poll at `now`: the plan's requests, then the retries that are due. Reads
    /// left over from an unfinished poll are dropped.
    pub fn start_poll(&mut self, now: Instant) {
        if self.replan {
            self.make_plan();
        }
        self.queue.clear();
        self.splits.clear();
        self.queue.extend(self.plan.iter().map(|r| Job {
            request: r.clone(),
            kind: ReadKind::Plan,
        }));
        for (&p, r) in &self.unreadable {
            if r.next <= now {
                self.queue.push_back(Job {
                    request: request_of(&self.points, vec![p]),
                    kind: ReadKind::RetryPoint(p),
                });
            }
        }
        for (&(l, r), retry) in &self.apart {
            if retry.next <= now {
                self.queue.push_back(Job {
                    request: request_of(&self.points, vec![l, r]),
                    kind: ReadKind::RetryJoin(l, r),
                });
            }
        }
    }

    /// The next read of this poll, if any.
    pub fn next_read(&mut self) -> Option<Job> {
        self.queue.pop_front()
    }

    /// Takes the outcome of `job` (from [`Self::next_read`]) at `now`; may queue more reads
    /// in this poll (the halves of a refused request) and returns what changed.
    pub fn report(&mut self, job: &Job, outcome: Outcome, now: Instant) -> Option<Finding> {
        let refused = outcome == Outcome::Exception(ILLEGAL_DATA_ADDRESS);
        match job.kind {
            ReadKind::Plan | ReadKind::Split(_) if refused => {
                let members = &job.request.points;
                if let [p] = members[..] {
                    return self.mark_unreadable(p, now);
                }
                if members.is_empty() {
                    return None;
                }
                // Halves by address (a request's points are in address order); read at once.
                let mid = members.len() / 2;
                let (lo, hi) = (members[..mid].to_vec(), members[mid..].to_vec());
                let split = self.splits.len();
                self.splits.push(Split {
                    left: lo[lo.len() - 1],
                    right: hi[0],
                    halves_read: 0,
                });
                for half in [hi, lo] {
                    self.queue.push_front(Job {
                        request: request_of(&self.points, half),
                        kind: ReadKind::Split(split),
                    });
                }
                None
            }
            ReadKind::Split(i) if outcome == Outcome::Data => {
                let s = self.splits.get_mut(i)?;
                s.halves_read += 1;
                if s.halves_read < 2 {
                    return None;
                }
                let (left, right) = (s.left, s.right);
                if self.apart.contains_key(&(left, right)) {
                    return None;
                }
                let retry_in = self.first_delay();
                self.apart.insert(
                    (left, right),
                    Retry {
                        next: now + retry_in,
                        delay: retry_in,
                    },
                );
                self.replan = true;
                Some(Finding::JoinRefused {
                    left,
                    right,
                    retry_in,
                })
            }
            ReadKind::RetryPoint(p) => {
                if outcome == Outcome::Data {
                    self.unreadable.remove(&p)?;
                    self.replan = true;
                    return Some(Finding::PointRecovered { point: p });
                }
                let cap = self.cap();
                let r = self.unreadable.get_mut(&p)?;
                back_off(r, refused, now, cap);
                None
            }
            ReadKind::RetryJoin(left, right) => {
                if outcome == Outcome::Data {
                    self.apart.remove(&(left, right))?;
                    self.replan = true;
                    return Some(Finding::JoinRecovered { left, right });
                }
                let cap = self.cap();
                let r = self.apart.get_mut(&(left, right))?;
                back_off(r, refused, now, cap);
                None
            }
            _ => None,
        }
    }

    fn mark_unreadable(&mut self, p: usize, now: Instant) -> Option<Finding> {
        if self.unreadable.contains_key(&p) {
            return None;
        }
        let retry_in = self.first_delay();
        self.unreadable.insert(
            p,
            Retry {
                next: now + retry_in,
                delay: retry_in,
            },
        );
        self.replan = true;
        Some(Finding::PointUnreadable { point: p, retry_in })
    }
}

/// Schedules the next retry: after a refusal the delay doubles (up to `cap`); after any
/// other failure it stays.
fn back_off(r: &mut Retry, refused: bool, now: Instant, cap: Duration) {
    if refused {
        r.delay = r.delay.saturating_mul(2).min(cap);
    }
    r.next = now + r.delay;
}

/// The request reading exactly `members` (in address order, all of one table, spanning at
/// most what one request may: they come from a planned request or are two of its points).
fn request_of(points: &[PointConfig], members: Vec<usize>) -> ReadRequest {
    let mut start = u32::MAX;
    let mut end = 0u32;
    let mut table = super::Table::HoldingRegisters;
    for &i in &members {
        if let Some(p) = points.get(i) {
            start = start.min(u32::from(p.address));
            end = end.max(p.end());
            table = p.table;
        }
    }
    let start = start.min(65_535);
    ReadRequest {
        table,
        address: start as u16,
        count: u16::try_from(end.saturating_sub(start)).unwrap_or(u16::MAX),
        points: members,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modbus::{ByteOrder, DataType, Table, WordOrder};
    use std::collections::BTreeSet;

    fn hr(name: &str, address: u16, data_type: DataType) -> PointConfig {
        PointConfig {
            name: name.into(),
            table: Table::HoldingRegisters,
            address,
            data_type,
            word_order: WordOrder::Big,
            byte_order: ByteOrder::Big,
            scale: 1.0,
            offset: 0.0,
        }
    }

    /// A simulated device: the registers it refuses (exception 2 for any read touching
    /// one), and the reads it refuses though every register is mapped (spans across a
    /// block boundary).
    struct Device {
        refused: BTreeSet<u32>,
        boundary: Option<u32>,
    }

    impl Device {
        fn answer(&self, r: &ReadRequest) -> Outcome {
            let (s, e) = (
                u32::from(r.address),
                u32::from(r.address) + u32::from(r.count),
            );
            if self.refused.range(s..e).next().is_some()
                || self.boundary.is_some_and(|b| s < b && b < e)
            {
                Outcome::Exception(ILLEGAL_DATA_ADDRESS)
            } else {
                Outcome::Data
            }
        }
    }

    /// Runs one poll: (reads made, points delivered, findings).
    fn poll(
        s: &mut ReadScheduler,
        dev: &Device,
        now: Instant,
    ) -> (Vec<Job>, BTreeSet<usize>, Vec<Finding>) {
        s.start_poll(now);
        let (mut reads, mut delivered, mut findings) = (Vec::new(), BTreeSet::new(), Vec::new());
        while let Some(job) = s.next_read() {
            assert!(reads.len() < 1000, "unbounded poll");
            let out = dev.answer(&job.request);
            if out == Outcome::Data && job.delivers() {
                delivered.extend(job.request.points.iter().copied());
            }
            findings.extend(s.report(&job, out, now));
            reads.push(job);
        }
        (reads, delivered, findings)
    }

    fn points(n: u16) -> Vec<PointConfig> {
        (0..n)
            .map(|i| hr(&format!("p{i}"), 100 + i, DataType::U16))
            .collect()
    }

    fn batch(gap: u16) -> BatchConfig {
        BatchConfig {
            max_gap_registers: gap,
            ..BatchConfig::default()
        }
    }

    #[test]
    fn one_illegal_register_leaves_its_batched_neighbours_readable() {
        // Eleven contiguous registers in one request; register 105 is not mapped. The gap
        // allowance would bridge 105 once point 5 is left out: it must not.
        let t0 = Instant::now();
        let iv = Duration::from_secs(1);
        let mut s = ReadScheduler::new(points(11), batch(3), iv);
        assert_eq!(s.plan().len(), 1);
        let dev = Device {
            refused: [105].into(),
            boundary: None,
        };
        let (reads, delivered, findings) = poll(&mut s, &dev, t0);
        // Found in the same poll, by halving: everything but the bad point delivered.
        let all: BTreeSet<usize> = (0..11).collect();
        assert_eq!(delivered, &all - &[5].into());
        assert_eq!(
            findings,
            vec![Finding::PointUnreadable {
                point: 5,
                retry_in: iv * RETRY_FACTOR
            }]
        );
        assert!(reads.len() < 2 * 11, "{} reads", reads.len());
        let msg = findings[0].message(s.points());
        assert!(
            msg.contains("holding_registers address 105") && msg.contains("\"p5\""),
            "{msg}"
        );
        // From the next poll on: two requests around it, no exception, no retry yet.
        for k in 1..10 {
            let (reads, delivered, findings) = poll(&mut s, &dev, t0 + iv * k);
            assert_eq!(delivered, &all - &[5].into());
            assert!(findings.is_empty());
            let spans: Vec<(u16, u16)> = reads
                .iter()
                .map(|j| (j.request.address, j.request.count))
                .collect();
            assert_eq!(spans, vec![(100, 5), (106, 5)], "poll {k}");
        }
        // The retry is due after 10 intervals: one extra read of 105 alone, refused.
        let (reads, _, findings) = poll(&mut s, &dev, t0 + iv * 10);
        assert_eq!(reads.len(), 3);
        assert_eq!(reads[2].kind, ReadKind::RetryPoint(5));
        assert_eq!((reads[2].request.address, reads[2].request.count), (105, 1));
        assert!(findings.is_empty(), "a refusal is logged once");
        // Backed off: the next retry after 20 intervals, not 10.
        assert_eq!(poll(&mut s, &dev, t0 + iv * 29).0.len(), 2);
        assert_eq!(poll(&mut s, &dev, t0 + iv * 30).0.len(), 3);
        // The device maps it again: the retry delivers it, it rejoins one request.
        let fixed = Device {
            refused: BTreeSet::new(),
            boundary: None,
        };
        let (_, delivered, findings) = poll(&mut s, &fixed, t0 + iv * 70);
        assert!(delivered.contains(&5));
        assert_eq!(findings, vec![Finding::PointRecovered { point: 5 }]);
        assert!(findings[0].is_recovery());
        let (reads, delivered, _) = poll(&mut s, &fixed, t0 + iv * 71);
        assert_eq!(reads.len(), 1);
        assert_eq!(delivered, all);
    }

    #[test]
    fn retries_back_off_to_the_cap() {
        let t0 = Instant::now();
        let iv = Duration::from_secs(10);
        let mut s = ReadScheduler::new(points(2), batch(0), iv);
        let dev = Device {
            refused: [100].into(),
            boundary: None,
        };
        poll(&mut s, &dev, t0);
        // Retries at +100 s, +300 s (200 later), +600 s (300: the cap), +900 s, ...
        let mut retries = Vec::new();
        for k in 1..=100u32 {
            let (reads, _, _) = poll(&mut s, &dev, t0 + iv * k);
            if reads.iter().any(|j| j.kind == ReadKind::RetryPoint(0)) {
                retries.push(k * 10);
            }
        }
        assert_eq!(retries, vec![100, 300, 600, 900]);
        // A slow group is retried at its own interval at most.
        let slow = ReadScheduler::new(points(1), batch(0), Duration::from_secs(3600));
        assert_eq!(slow.first_delay(), Duration::from_secs(3600));
    }

    #[test]
    fn an_unmapped_gap_keeps_its_neighbours_apart() {
        // Points at 100 and 104, bridged by max_gap 3; 102 is not mapped.
        let t0 = Instant::now();
        let iv = Duration::from_millis(100);
        let pts = vec![hr("a", 100, DataType::U16), hr("b", 104, DataType::F32)];
        let mut s = ReadScheduler::new(pts, batch(3), iv);
        assert_eq!(s.plan().len(), 1);
        let dev = Device {
            refused: [102].into(),
            boundary: None,
        };
        let (reads, delivered, findings) = poll(&mut s, &dev, t0);
        assert_eq!(reads.len(), 3);
        assert_eq!(delivered, [0, 1].into());
        assert_eq!(
            findings,
            vec![Finding::JoinRefused {
                left: 0,
                right: 1,
                retry_in: Duration::from_secs(1)
            }]
        );
        let msg = findings[0].message(s.points());
        assert!(msg.contains("addresses 101..=103"), "{msg}");
        assert!(msg.contains("addresses 104..=105"), "{msg}");
        let (reads, delivered, findings) = poll(&mut s, &dev, t0 + iv);
        assert_eq!(reads.len(), 2);
        assert_eq!(delivered, [0, 1].into());
        assert!(findings.is_empty());
        assert_eq!(s.kept_apart().collect::<Vec<_>>(), vec![(0, 1)]);
        // The join is retried without delivering twice, and lifted when it reads.
        let ok = Device {
            refused: BTreeSet::new(),
            boundary: None,
        };
        let (reads, delivered, findings) = poll(&mut s, &ok, t0 + iv * 10);
        assert_eq!(reads.len(), 3);
        assert!(!reads[2].delivers());
        assert_eq!(delivered, [0, 1].into());
        assert_eq!(findings, vec![Finding::JoinRecovered { left: 0, right: 1 }]);
        assert_eq!(poll(&mut s, &ok, t0 + iv * 11).0.len(), 1);
    }

    #[test]
    fn a_refused_block_boundary_is_found_without_blaming_a_point() {
        let t0 = Instant::now();
        let mut s = ReadScheduler::new(points(8), batch(0), Duration::from_secs(1));
        let dev = Device {
            refused: BTreeSet::new(),
            boundary: Some(103),
        };
        let (_, delivered, findings) = poll(&mut s, &dev, t0);
        assert_eq!(delivered.len(), 8);
        assert!(matches!(
            findings[..],
            [Finding::JoinRefused {
                left: 2,
                right: 3,
                ..
            }]
        ));
        assert!(
            findings[0]
                .message(s.points())
                .contains("refuses a read across")
        );
        assert_eq!(s.unreadable().count(), 0);
        let (reads, _, _) = poll(&mut s, &dev, t0 + Duration::from_secs(1));
        let spans: Vec<(u16, u16)> = reads
            .iter()
            .map(|j| (j.request.address, j.request.count))
            .collect();
        assert_eq!(spans, vec![(100, 3), (103, 5)]);
    }

    #[test]
    fn other_answers_change_nothing() {
        let t0 = Instant::now();
        let mut s = ReadScheduler::new(points(4), batch(0), Duration::from_secs(1));
        for out in [
            Outcome::Exception(4),
            Outcome::Failed,
            Outcome::Exception(6),
        ] {
            s.start_poll(t0);
            let job = s.next_read().unwrap();
            assert_eq!(s.report(&job, out, t0), None);
            assert!(s.next_read().is_none(), "no split for {out:?}");
        }
        assert_eq!(s.plan().len(), 1);
    }

    /// Any set of refused registers, any points: every readable point delivers in every
    /// poll, from the first; a poll makes at most three reads per point; each refused read
    /// of the plan teaches the scheduler something, so the plan settles within a few polls
    /// and then makes no refused read.
    #[test]
    fn random_maps_deliver_every_readable_point_and_settle() {
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let types = [DataType::U16, DataType::U32, DataType::F64];
        for case in 0..400 {
            let n = 1 + (next() % 12) as usize;
            let pts: Vec<PointConfig> = (0..n)
                .map(|i| {
                    hr(
                        &format!("p{i}"),
                        (next() % 40) as u16,
                        types[(next() % 3) as usize],
                    )
                })
                .collect();
            let refused: BTreeSet<u32> = (0..(next() % 4)).map(|_| (next() % 44) as u32).collect();
            let dev = Device {
                refused,
                boundary: (case % 3 == 0).then(|| (next() % 44) as u32),
            };
            let readable: BTreeSet<usize> = (0..n)
                .filter(|&i| dev.answer(&request_of(&pts, vec![i])) == Outcome::Data)
                .collect();
            let gap = (next() % 8) as u16;
            let mut s = ReadScheduler::new(pts.clone(), batch(gap), Duration::from_secs(1));
            let t0 = Instant::now();
            // Polls 1 ms apart: no retry falls due.
            let mut settled = None;
            for k in 0..(3 * n as u64 + 2) {
                let (reads, delivered, findings) =
                    poll(&mut s, &dev, t0 + Duration::from_millis(k));
                assert_eq!(delivered, readable, "case {case}, poll {k}: {pts:?}");
                assert!(reads.len() <= 3 * n, "case {case}: {} reads", reads.len());
                let clean = findings.is_empty()
                    && reads.iter().all(|j| {
                        j.kind == ReadKind::Plan && dev.answer(&j.request) == Outcome::Data
                    });
                match settled {
                    None if clean => settled = Some(k),
                    None => {}
                    Some(_) => assert!(clean, "case {case}: unsettled again at poll {k}"),
                }
            }
            assert!(settled.is_some(), "case {case}: never settled");
            let unreadable: BTreeSet<usize> = s.unreadable().collect();
            let every: BTreeSet<usize> = (0..n).collect();
            assert_eq!(unreadable, &every - &readable);
        }
    }
}
