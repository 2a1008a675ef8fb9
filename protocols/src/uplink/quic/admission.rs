//! Which QUIC handshakes the hub takes on (pure: no sockets, the caller passes the time).
//!
//! A handshake in progress holds state until it finishes or times out, so a peer that starts
//! handshakes and never finishes them could fill every slot and lock real gateways out.
//! [`Admission`] decides for each client that starts one:
//!
//! - **Address validation under load.** A client whose source address is not validated
//!   (it has not shown that it receives what the hub sends there) is taken on only while
//!   fewer than `retry_above` handshakes are in progress and its source has fewer than
//!   `max_pending_per_source` unvalidated ones; otherwise it is sent a QUIC Retry, which
//!   costs the hub no state: a real client answers it (one more round trip) and comes back
//!   validated, a spoofed or replayed Initial never does.
//! - **Per source.** A source (an IPv4 address, or an IPv6 /64) has at most
//!   `max_pending_per_source` validated handshakes in progress, counted apart from its
//!   unvalidated ones, so Initials spoofed with a gateway's address cannot use up that
//!   gateway's share. Beyond it the client is refused.
//! - **Room for known sources.** `reserved_for_known` of the `max_pending` slots are kept for
//!   sources that completed an authenticated handshake in the last [`KNOWN_FOR`] (at most
//!   [`MAX_KNOWN_SOURCES`] remembered), so that gateways that were connected get back in
//!   while unknown peers hold every other slot.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// How long a source that authenticated counts as known.
pub const KNOWN_FOR: Duration = Duration::from_secs(24 * 3600);
/// Known sources remembered at most (the oldest forgotten first).
pub const MAX_KNOWN_SOURCES: usize = 4_096;

/// The limits (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// Handshakes in progress at most.
    pub max_pending: usize,
    /// Handshakes in progress per source at most, validated and unvalidated each.
    pub max_pending_per_source: usize,
    /// From this many handshakes in progress on, unvalidated clients are sent a Retry
    /// (0: always).
    pub retry_above: usize,
    /// Slots of `max_pending` only sources known from an earlier handshake may use.
    pub reserved_for_known: usize,
}

impl Default for AdmissionLimits {
    fn default() -> Self {
        AdmissionLimits {
            max_pending: 64,
            max_pending_per_source: 8,
            retry_above: 16,
            reserved_for_known: 16,
        }
    }
}

impl AdmissionLimits {
    /// Why these limits cannot work, if they cannot.
    pub fn problem(&self) -> Option<String> {
        if self.max_pending == 0 || self.max_pending_per_source == 0 {
            return Some(
                "max_pending_handshakes and max_pending_per_source must be at least 1".into(),
            );
        }
        if self.reserved_for_known >= self.max_pending {
            return Some(format!(
                "reserved_for_known ({}) must be smaller than max_pending_handshakes ({})",
                self.reserved_for_known, self.max_pending
            ));
        }
        None
    }
}

/// Where a handshake comes from, for the per-source limit: an IPv4 address (also when
/// mapped into IPv6), or the /64 prefix of an IPv6 address (what one host usually holds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    V4(u32),
    V6(u64),
}

impl Source {
    pub fn of(ip: IpAddr) -> Source {
        match ip {
            IpAddr::V4(v4) => Source::V4(u32::from(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source::V4(u32::from(v4)),
                None => Source::V6((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

/// Why a client is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Every slot it may use is taken.
    Busy,
    /// Its source has `max_pending_per_source` validated handshakes in progress.
    PerSource,
}

/// A handshake taken on; give it back with [`Admission::finished`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    source: Source,
    validated: bool,
}

/// What to do with a client that starts a handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Take the handshake on (it now counts as in progress).
    Accept(Ticket),
    /// Ask the client to prove its address first (QUIC Retry, no state kept).
    Retry,
    /// Refuse it.
    Refuse(Refused),
}

#[derive(Debug, Default, Clone, Copy)]
struct PerSource {
    unvalidated: usize,
    validated: usize,
}

/// The handshakes in progress and the sources known (see the module documentation).
#[derive(Debug)]
pub struct Admission {
    limits: AdmissionLimits,
    pending: HashMap<Source, PerSource>,
    total: usize,
    known: HashMap<Source, Instant>,
}

impl Admission {
    pub fn new(limits: AdmissionLimits) -> Admission {
        Admission {
            limits,
            pending: HashMap::new(),
            total: 0,
            known: HashMap::new(),
        }
    }

    /// Handshakes in progress.
    pub fn pending(&self) -> usize {
        self.total
    }

    /// Whether `ip`'s source completed an authenticated handshake within [`KNOWN_FOR`]
    /// before `now`.
    pub fn is_known(&self, ip: IpAddr, now: Instant) -> bool {
        self.known
            .get(&Source::of(ip))
            .is_some_and(|t| now.saturating_duration_since(*t) < KNOWN_FOR)
    }

    /// Decides for a client from `ip` whose address is `validated` (or not) at `now`.
    pub fn decide(&mut self, ip: IpAddr, validated: bool, now: Instant) -> Decision {
        let l = self.limits;
        let source = Source::of(ip);
        let room = if self.is_known(ip, now) {
            l.max_pending
        } else {
            l.max_pending - l.reserved_for_known.min(l.max_pending)
        };
        let per = self.pending.get(&source).copied().unwrap_or_default();
        if !validated {
            if self.total >= l.retry_above
                || self.total >= room
                || per.unvalidated >= l.max_pending_per_source
            {
                return Decision::Retry;
            }
        } else {
            if per.validated >= l.max_pending_per_source {
                return Decision::Refuse(Refused::PerSource);
            }
            if self.total >= room {
                return Decision::Refuse(Refused::Busy);
            }
        }
        let p = self.pending.entry(source).or_default();
        if validated {
            p.validated += 1;
        } else {
            p.unvalidated += 1;
        }
        self.total += 1;
        Decision::Accept(Ticket { source, validated })
    }

    /// A handshake taken on has ended; `authenticated` when it yielded a gateway, whose
    /// source is then known from `now`.
    pub fn finished(&mut self, ticket: Ticket, authenticated: bool, now: Instant) {
        if let Some(p) = self.pending.get_mut(&ticket.source) {
            let n = if ticket.validated {
                &mut p.validated
            } else {
                &mut p.unvalidated
            };
            if *n > 0 {
                *n -= 1;
                self.total = self.total.saturating_sub(1);
            }
            if p.validated == 0 && p.unvalidated == 0 {
                self.pending.remove(&ticket.source);
            }
        }
        if authenticated {
            if !self.known.contains_key(&ticket.source) && self.known.len() >= MAX_KNOWN_SOURCES {
                self.known
                    .retain(|_, t| now.saturating_duration_since(*t) < KNOWN_FOR);
                if self.known.len() >= MAX_KNOWN_SOURCES
                    && let Some(oldest) =
                        self.known.iter().min_by_key(|(_, t)| **t).map(|(s, _)| *s)
                {
                    self.known.remove(&oldest);
                }
            }
            self.known.insert(ticket.source, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn v4(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, last))
    }

    fn limits() -> AdmissionLimits {
        AdmissionLimits {
            max_pending: 10,
            max_pending_per_source: 3,
            retry_above: 4,
            reserved_for_known: 2,
        }
    }

    fn accept(d: Decision) -> Ticket {
        match d {
            Decision::Accept(t) => t,
            other => panic!("expected accept, got {other:?}"),
        }
    }

    #[test]
    fn sources_are_ipv4_addresses_and_ipv6_slash_64s() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(Source::of(a), Source::of(b));
        assert_ne!(Source::of(a), Source::of(c));
        let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped());
        assert_eq!(Source::of(mapped), Source::of(v4(1)));
        assert_ne!(
            Source::of(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            Source::of(v4(1))
        );
    }

    #[test]
    fn unvalidated_clients_get_a_retry_under_load_or_beyond_their_source_share() {
        let now = Instant::now();
        let mut a = Admission::new(limits());
        // One source: three unvalidated handshakes, then Retry.
        for _ in 0..3 {
            accept(a.decide(v4(1), false, now));
        }
        assert_eq!(a.decide(v4(1), false, now), Decision::Retry);
        // Another source: one more, then the load threshold (4) is reached: Retry for all.
        accept(a.decide(v4(2), false, now));
        assert_eq!(a.decide(v4(3), false, now), Decision::Retry);
        assert_eq!(a.pending(), 4);
        // A validated client of the flooded source still gets in: its share is its own.
        accept(a.decide(v4(1), true, now));
        assert_eq!(a.pending(), 5);
    }

    #[test]
    fn validated_clients_are_limited_per_source_and_in_all() {
        let now = Instant::now();
        let mut a = Admission::new(limits());
        let mut tickets: Vec<Ticket> = (0..3).map(|_| accept(a.decide(v4(1), true, now))).collect();
        assert_eq!(
            a.decide(v4(1), true, now),
            Decision::Refuse(Refused::PerSource)
        );
        // Others fill the general room: 10 slots, 2 reserved.
        for i in 0..5 {
            tickets.push(accept(a.decide(v4(10 + i), true, now)));
        }
        assert_eq!(a.pending(), 8);
        assert_eq!(a.decide(v4(30), true, now), Decision::Refuse(Refused::Busy));
        // A slot given back is free again.
        a.finished(tickets.pop().unwrap(), false, now);
        accept(a.decide(v4(30), true, now));
        assert_eq!(a.decide(v4(31), true, now), Decision::Refuse(Refused::Busy));
    }

    #[test]
    fn sources_that_authenticated_before_may_use_the_reserved_slots() {
        let t0 = Instant::now();
        let mut a = Admission::new(limits());
        // A gateway connects once: its source is known.
        let t = accept(a.decide(v4(7), false, t0));
        a.finished(t, true, t0);
        assert!(a.is_known(v4(7), t0));
        // Unknown peers hold every slot they may use.
        for i in 0..8 {
            accept(a.decide(v4(100 + i), true, t0));
        }
        assert_eq!(a.decide(v4(50), true, t0), Decision::Refuse(Refused::Busy));
        // The known gateway is taken on in the reserve (validated first: the load is high).
        assert_eq!(a.decide(v4(7), false, t0), Decision::Retry);
        accept(a.decide(v4(7), true, t0));
        accept(a.decide(v4(7), true, t0));
        assert_eq!(a.pending(), 10);
        assert_eq!(a.decide(v4(7), true, t0), Decision::Refuse(Refused::Busy));
        // Known only for a while.
        assert!(!a.is_known(v4(7), t0 + KNOWN_FOR));
        // A failed handshake makes nobody known.
        let mut b = Admission::new(limits());
        let t = accept(b.decide(v4(8), true, t0));
        b.finished(t, false, t0);
        assert!(!b.is_known(v4(8), t0));
        assert_eq!(b.pending(), 0);
    }

    #[test]
    fn retry_above_zero_validates_everyone_and_known_sources_are_bounded() {
        let now = Instant::now();
        let mut a = Admission::new(AdmissionLimits {
            retry_above: 0,
            ..limits()
        });
        assert_eq!(a.decide(v4(1), false, now), Decision::Retry);
        accept(a.decide(v4(1), true, now));
        for i in 0..(MAX_KNOWN_SOURCES as u32 + 10) {
            let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
            let t = accept(a.decide(ip, true, now + Duration::from_millis(u64::from(i))));
            a.finished(t, true, now + Duration::from_millis(u64::from(i)));
        }
        assert_eq!(a.known.len(), MAX_KNOWN_SOURCES);
        assert!(!a.is_known(IpAddr::V4(Ipv4Addr::from(0x0a00_0000)), now));
    }

    #[test]
    fn limits_that_cannot_work_are_named() {
        assert!(AdmissionLimits::default().problem().is_none());
        let bad = AdmissionLimits {
            reserved_for_known: 64,
            ..AdmissionLimits::default()
        };
        assert!(bad.problem().unwrap().contains("reserved_for_known"));
        let zero = AdmissionLimits {
            max_pending_per_source: 0,
            ..AdmissionLimits::default()
        };
        assert!(zero.problem().is_some());
    }
}
