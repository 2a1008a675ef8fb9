//! Flow control of the MQTT device client (pure: no I/O, no clock).
//!
//! [`Flow`] is the gate between the broker connection and the consumer. A QoS 1 message
//! taken off the connection holds one *credit* until its acknowledgement is written (or
//! found stale, or its token dropped); the connection reads the next message only while
//! fewer than `max_in_flight` are held and fewer than `byte_budget` bytes wait for the
//! consumer. So the gateway never holds more than `max_in_flight` unacknowledged messages,
//! whatever the broker sends: beyond that it stops reading, the broker keeps the rest and
//! TCP pushes back. Acknowledgements never wait for credit: [`Flow::take_acks`] hands over
//! every ready one at once, in the order the consumer gave them.
//!
//! Packet ids are per connection. Each connection has an epoch; an acknowledgement given
//! for an earlier epoch is never written (on a new connection the same id may name another
//! message): it is dropped and its credit returned — the broker redelivers that message.

use std::collections::VecDeque;

/// Outcome of [`Flow::ack`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOutcome {
    /// Queued for the connection the message came on.
    Queued,
    /// That connection has ended: the broker will redeliver the message.
    Stale,
}

/// Credits, bytes and acknowledgements of one client.
#[derive(Debug)]
pub struct Flow {
    max_in_flight: usize,
    byte_budget: usize,
    epoch: u64,
    /// QoS 1 messages taken off a connection whose credit has not come back.
    held: usize,
    /// Bytes of messages handed over but not yet taken by the consumer.
    queued_bytes: usize,
    /// Acknowledgements (packet ids) for the current connection, oldest first.
    ready: VecDeque<u16>,
    /// Most messages held at once (for tests and metrics).
    peak_held: usize,
}

impl Flow {
    /// `max_in_flight` ≥ 1 QoS 1 messages held at most; the consumer's queue is refilled
    /// while it holds fewer than `byte_budget` bytes (so at most one packet more).
    pub fn new(max_in_flight: usize, byte_budget: usize) -> Flow {
        Flow {
            max_in_flight: max_in_flight.max(1),
            byte_budget: byte_budget.max(1),
            epoch: 0,
            held: 0,
            queued_bytes: 0,
            ready: VecDeque::new(),
            peak_held: 0,
        }
    }

    /// The current connection's epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// May the connection take the next message?
    pub fn may_deliver(&self) -> bool {
        self.held < self.max_in_flight && self.queued_bytes < self.byte_budget
    }

    /// A message of `bytes` was handed to the consumer; a QoS 1 one takes a credit.
    /// Returns the epoch its acknowledgement belongs to.
    pub fn delivered(&mut self, qos1: bool, bytes: usize) -> u64 {
        if qos1 {
            self.held += 1;
            self.peak_held = self.peak_held.max(self.held);
        }
        self.queued_bytes += bytes;
        self.epoch
    }

    /// The consumer took a message of `bytes` out of its queue. Returns whether that made
    /// room where there was none (the connection may be waiting for it).
    pub fn taken(&mut self, bytes: usize) -> bool {
        let was_full = self.queued_bytes >= self.byte_budget;
        self.queued_bytes = self.queued_bytes.saturating_sub(bytes);
        was_full && self.queued_bytes < self.byte_budget
    }

    /// The consumer acknowledges a message of connection `epoch`.
    pub fn ack(&mut self, epoch: u64, pkid: u16) -> AckOutcome {
        if epoch == self.epoch {
            self.ready.push_back(pkid);
            AckOutcome::Queued
        } else {
            self.release();
            AckOutcome::Stale
        }
    }

    /// A token was dropped without an acknowledgement: its credit comes back (the broker
    /// redelivers the message on the next connection).
    pub fn abandon(&mut self) {
        self.release();
    }

    fn release(&mut self) {
        self.held = self.held.saturating_sub(1);
    }

    /// Moves every ready acknowledgement into `out` (to be written now, in this order)
    /// and returns their credits.
    pub fn take_acks(&mut self, out: &mut Vec<u16>) {
        self.held = self.held.saturating_sub(self.ready.len());
        out.extend(self.ready.drain(..));
    }

    /// Are acknowledgements waiting to be written?
    pub fn has_acks(&self) -> bool {
        !self.ready.is_empty()
    }

    /// The connection ended: its unwritten acknowledgements are dropped (their credits
    /// return) and a new epoch begins.
    pub fn connection_ended(&mut self) {
        self.held = self.held.saturating_sub(self.ready.len());
        self.ready.clear();
        self.epoch = self.epoch.wrapping_add(1);
    }

    /// QoS 1 messages held now.
    pub fn held(&self) -> usize {
        self.held
    }

    /// Most QoS 1 messages held at once so far.
    pub fn peak_held(&self) -> usize {
        self.peak_held
    }

    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reading_stops_at_the_limit_and_resumes_when_acks_are_written() {
        let mut f = Flow::new(3, 1 << 20);
        let e = f.epoch();
        for _ in 0..3 {
            assert!(f.may_deliver());
            f.delivered(true, 10);
        }
        assert!(!f.may_deliver(), "3 held: stop reading");
        f.taken(30);
        assert_eq!(f.ack(e, 1), AckOutcome::Queued);
        assert!(!f.may_deliver(), "an ack counts once written, not before");
        let mut out = Vec::new();
        f.take_acks(&mut out);
        assert_eq!(out, [1]);
        assert!(f.may_deliver());
        // QoS 0 takes no credit.
        f.delivered(false, 10);
        assert_eq!(f.held(), 2);
    }

    #[test]
    fn bytes_waiting_for_the_consumer_stop_reading() {
        let mut f = Flow::new(100, 1000);
        f.delivered(false, 600);
        assert!(f.may_deliver());
        f.delivered(false, 600);
        assert!(!f.may_deliver());
        f.taken(600);
        assert!(f.may_deliver());
    }

    #[test]
    fn acks_of_an_ended_connection_are_never_written() {
        let mut f = Flow::new(10, 1 << 20);
        let e0 = f.epoch();
        f.delivered(true, 1);
        f.delivered(true, 1);
        f.delivered(true, 1);
        f.ack(e0, 1);
        f.connection_ended();
        let mut out = Vec::new();
        f.take_acks(&mut out);
        assert!(out.is_empty(), "queued before the end: dropped");
        assert_eq!(
            f.ack(e0, 2),
            AckOutcome::Stale,
            "given after the end: dropped"
        );
        f.abandon();
        assert_eq!(f.held(), 0, "every credit came back");
        let e1 = f.epoch();
        f.delivered(true, 1);
        assert_eq!(f.ack(e1, 2), AckOutcome::Queued);
        f.take_acks(&mut out);
        assert_eq!(out, [2]);
    }

    proptest! {
        /// Whatever the interleaving, held messages never exceed the limit, every credit
        /// comes back once each message is acknowledged or abandoned, and acknowledgements
        /// come out in the order given, only for their own connection.
        #[test]
        fn credits_are_conserved(ops in proptest::collection::vec(0u8..6, 1..400), limit in 1usize..20) {
            let mut f = Flow::new(limit, usize::MAX);
            let mut tokens: VecDeque<(u64, u16)> = VecDeque::new();
            let mut next_id = 1u16;
            let mut given: Vec<(u64, u16)> = Vec::new();
            let mut written: Vec<(u64, u16)> = Vec::new();
            for op in ops {
                match op {
                    0 | 1 if f.may_deliver() => {
                        let e = f.delivered(true, 0);
                        tokens.push_back((e, next_id));
                        next_id = next_id.wrapping_add(1).max(1);
                    }
                    2 => {
                        if let Some((e, id)) = tokens.pop_front()
                            && f.ack(e, id) == AckOutcome::Queued
                        {
                            given.push((e, id));
                        }
                    }
                    3 if tokens.pop_back().is_some() => f.abandon(),
                    4 => {
                        let mut out = Vec::new();
                        let e = f.epoch();
                        f.take_acks(&mut out);
                        written.extend(out.into_iter().map(|id| (e, id)));
                    }
                    5 => f.connection_ended(),
                    _ => {}
                }
                prop_assert!(f.held() <= limit);
            }
            for (e, id) in tokens.drain(..) {
                if f.ack(e, id) == AckOutcome::Queued { given.push((e, id)); }
            }
            let e = f.epoch();
            let mut out = Vec::new();
            f.take_acks(&mut out);
            written.extend(out.into_iter().map(|id| (e, id)));
            prop_assert_eq!(f.held(), 0);
            // Written acks are a subsequence of those given, each on its own epoch.
            let mut it = given.iter();
            for w in &written {
                prop_assert!(it.any(|g| g == w));
            }
        }
    }
}
