//! The MQTT bytes the device client reads and writes (3.1.1 and 5), without I/O.
//!
//! [`Framer`] cuts the broker's byte stream into packets, one at a time and only when
//! asked, so that the connection loop decides when to take the next message. It never
//! buffers more than one packet of at most `max_packet` bytes: a PUBLISH announced larger
//! is *read past* — its topic and packet id are kept, the rest is discarded as it arrives —
//! and reported as [`Incoming::Oversized`], so it can be counted and acknowledged instead
//! of breaking the connection (over MQTT 3.1.1 the broker cannot be told a limit, and a
//! persistent session would otherwise redeliver it for ever). Every length comes from the
//! network and is checked before use.
//!
//! The packets the client sends (CONNECT, SUBSCRIBE, PUBACK, PINGREQ) are encoded here too;
//! CONNECT and SUBSCRIBE with rumqttc's packet codec.

use bytes::{Buf, Bytes, BytesMut};
use rumqttc::v5::mqttbytes::v5 as p5;

/// MQTT 3.1.1 or 5.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    V311,
    V5,
}

/// The stream from the broker is not MQTT we can follow; the connection must end.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("malformed {packet} packet: {reason}")]
    Malformed {
        packet: &'static str,
        reason: &'static str,
    },
    #[error("protocol violation: {0}")]
    Protocol(String),
}

fn malformed(packet: &'static str, reason: &'static str) -> WireError {
    WireError::Malformed { packet, reason }
}

/// One QoS 0 or 1 PUBLISH from the broker. `topic` and `payload` share one allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub topic: Bytes,
    pub payload: Bytes,
    pub qos: u8,
    pub dup: bool,
    pub retain: bool,
    /// 0 for QoS 0.
    pub pkid: u16,
}

/// A packet from the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    ConnAck {
        session_present: bool,
        /// The return (3.1.1) or reason (5) code: 0 is success.
        code: u8,
        /// MQTT 5: the keep-alive the broker imposes.
        server_keep_alive: Option<u16>,
        /// MQTT 5: the broker's reason string.
        reason: Option<String>,
    },
    Publish(Publish),
    /// A PUBLISH larger than `max_packet`: its payload was (or is being) discarded.
    Oversized {
        topic: Bytes,
        qos: u8,
        dup: bool,
        pkid: u16,
        /// The packet's remaining length, as announced.
        len: usize,
    },
    SubAck {
        pkid: u16,
        /// Return codes that refused a subscription.
        rejected: usize,
    },
    PingResp,
    /// MQTT 5: the broker ends the connection and says why.
    Disconnect {
        code: u8,
        reason: Option<String>,
    },
}

/// Cuts packets out of the bytes read from the broker.
#[derive(Debug)]
pub struct Framer {
    protocol: Protocol,
    max_packet: usize,
    /// Bytes of an oversized packet still to discard.
    skip: usize,
}

/// Longest variable header of a PUBLISH before its properties: topic length, topic
/// (at most 65,535 bytes) and packet id. All an oversized packet is buffered for.
const MAX_PUBLISH_HEAD: usize = 2 + 65_535 + 2;

const PUBLISH: u8 = 3;

impl Framer {
    /// A framer accepting packets of at most `max_packet` bytes (the whole packet, as MQTT
    /// 5's Maximum Packet Size counts); larger PUBLISH packets are read past.
    pub fn new(protocol: Protocol, max_packet: usize) -> Framer {
        Framer {
            protocol,
            max_packet,
            skip: 0,
        }
    }

    /// Whether the next packet in `buf` is known to be a PUBLISH (so taking it delivers a
    /// message). `false` while an oversized packet is being discarded or nothing is there.
    pub fn next_is_publish(&self, buf: &[u8]) -> bool {
        self.skip == 0 && buf.first().is_some_and(|b| b >> 4 == PUBLISH)
    }

    /// Whether an oversized packet is being discarded.
    pub fn skipping(&self) -> bool {
        self.skip > 0
    }

    /// Takes the next packet out of `buf`. `Ok(None)`: more bytes are needed (the bytes
    /// of an oversized packet's tail are consumed as they come).
    pub fn next(&mut self, buf: &mut BytesMut) -> Result<Option<Incoming>, WireError> {
        if self.skip > 0 {
            let n = self.skip.min(buf.len());
            buf.advance(n);
            self.skip -= n;
            if self.skip > 0 {
                return Ok(None);
            }
        }
        let Some((header_len, remaining)) = fixed_header(buf)? else {
            return Ok(None);
        };
        let byte1 = buf[0];
        if header_len + remaining > self.max_packet {
            return self.oversized(buf, byte1, header_len, remaining);
        }
        let frame_len = header_len + remaining;
        if buf.len() < frame_len {
            return Ok(None);
        }
        // One copy per packet: `buf` keeps its own allocation for the next reads, and the
        // message owns exactly its bytes.
        let frame = Bytes::copy_from_slice(&buf[..frame_len]);
        buf.advance(frame_len);
        decode(self.protocol, byte1, frame.slice(header_len..)).map(Some)
    }

    fn oversized(
        &mut self,
        buf: &mut BytesMut,
        byte1: u8,
        header_len: usize,
        remaining: usize,
    ) -> Result<Option<Incoming>, WireError> {
        if byte1 >> 4 != PUBLISH {
            return Err(WireError::Protocol(format!(
                "a packet of type {} announces {remaining} bytes, over the {}-byte limit",
                byte1 >> 4,
                self.max_packet
            )));
        }
        let (qos, dup) = publish_flags(byte1)?;
        let body = &buf[header_len..];
        if body.len() < 2 {
            return Ok(None);
        }
        let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
        let head = 2 + topic_len + if qos > 0 { 2 } else { 0 };
        debug_assert!(head <= MAX_PUBLISH_HEAD);
        if head > remaining {
            return Err(malformed("PUBLISH", "topic longer than the packet"));
        }
        if body.len() < head {
            return Ok(None);
        }
        let topic = Bytes::copy_from_slice(&body[2..2 + topic_len]);
        let pkid = if qos > 0 {
            u16::from_be_bytes([body[2 + topic_len], body[3 + topic_len]])
        } else {
            0
        };
        if qos > 0 && pkid == 0 {
            return Err(malformed("PUBLISH", "packet id 0"));
        }
        buf.advance(header_len + head);
        self.skip = remaining - head;
        let n = self.skip.min(buf.len());
        buf.advance(n);
        self.skip -= n;
        Ok(Some(Incoming::Oversized {
            topic,
            qos,
            dup,
            pkid,
            len: remaining,
        }))
    }
}

/// `(fixed header length, remaining length)`, or `None` if `buf` does not hold the whole
/// fixed header yet.
fn fixed_header(buf: &[u8]) -> Result<Option<(usize, usize)>, WireError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    match varint(&buf[1..]) {
        Ok(Some((value, len))) => Ok(Some((1 + len, value))),
        Ok(None) => Ok(None),
        Err(()) => Err(malformed("fixed header", "remaining length over 4 bytes")),
    }
}

/// A variable byte integer: `(value, bytes)`; `None` if incomplete, `Err` if over 4 bytes.
fn varint(b: &[u8]) -> Result<Option<(usize, usize)>, ()> {
    let mut value = 0usize;
    for (i, byte) in b.iter().enumerate().take(4) {
        value |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    if b.len() >= 4 { Err(()) } else { Ok(None) }
}

fn publish_flags(byte1: u8) -> Result<(u8, bool), WireError> {
    let qos = (byte1 >> 1) & 0b11;
    match qos {
        0 | 1 => Ok((qos, byte1 & 0b1000 != 0)),
        // Subscriptions ask for QoS 0 or 1: a broker must downgrade.
        2 => Err(WireError::Protocol(
            "a QoS 2 PUBLISH on QoS ≤ 1 subscriptions".into(),
        )),
        _ => Err(malformed("PUBLISH", "QoS 3")),
    }
}

fn u16_at(b: &[u8], at: usize, packet: &'static str) -> Result<u16, WireError> {
    match b.get(at..at + 2) {
        Some(s) => Ok(u16::from_be_bytes([s[0], s[1]])),
        None => Err(malformed(packet, "truncated")),
    }
}

/// The MQTT 5 properties at `body[at..]`: `(properties, offset after them)`.
fn properties<'a>(
    body: &'a [u8],
    at: usize,
    packet: &'static str,
) -> Result<(&'a [u8], usize), WireError> {
    let rest = body.get(at..).unwrap_or(&[]);
    let (len, n) = match varint(rest) {
        Ok(Some(v)) => v,
        _ => return Err(malformed(packet, "bad property length")),
    };
    let props = rest
        .get(n..n + len)
        .ok_or_else(|| malformed(packet, "properties longer than the packet"))?;
    Ok((props, at + n + len))
}

/// Walks MQTT 5 properties, calling `f(id, value)` for each.
fn each_property(
    mut props: &[u8],
    packet: &'static str,
    mut f: impl FnMut(u8, &[u8]) -> Result<(), WireError>,
) -> Result<(), WireError> {
    let bad = || malformed(packet, "bad property");
    while let Some((&id, rest)) = props.split_first() {
        let len = match id {
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => 1,
            0x13 | 0x21 | 0x22 | 0x23 => 2,
            0x02 | 0x11 | 0x18 | 0x27 => 4,
            0x0B => match varint(rest) {
                Ok(Some((_, n))) => n,
                _ => return Err(bad()),
            },
            0x03 | 0x08 | 0x09 | 0x12 | 0x15 | 0x16 | 0x1A | 0x1C | 0x1F => {
                2 + usize::from(u16_at(rest, 0, packet)?)
            }
            0x26 => {
                let k = 2 + usize::from(u16_at(rest, 0, packet)?);
                k + 2 + usize::from(u16_at(rest, k, packet)?)
            }
            _ => return Err(bad()),
        };
        let value = rest.get(..len).ok_or_else(bad)?;
        f(id, value)?;
        props = &rest[len..];
    }
    Ok(())
}

fn reason_string(value: &[u8]) -> String {
    String::from_utf8_lossy(value.get(2..).unwrap_or(&[]))
        .chars()
        .take(200)
        .collect()
}

/// Decodes one whole packet; `body` is everything after the fixed header.
fn decode(protocol: Protocol, byte1: u8, body: Bytes) -> Result<Incoming, WireError> {
    let v5 = protocol == Protocol::V5;
    match byte1 >> 4 {
        PUBLISH => {
            let (qos, dup) = publish_flags(byte1)?;
            let topic_len = usize::from(u16_at(&body, 0, "PUBLISH")?);
            let mut at = 2 + topic_len;
            if body.len() < at {
                return Err(malformed("PUBLISH", "topic longer than the packet"));
            }
            let topic = body.slice(2..at);
            let pkid = if qos > 0 {
                let id = u16_at(&body, at, "PUBLISH")?;
                at += 2;
                if id == 0 {
                    return Err(malformed("PUBLISH", "packet id 0"));
                }
                id
            } else {
                0
            };
            if v5 {
                let (props, end) = properties(&body, at, "PUBLISH")?;
                each_property(props, "PUBLISH", |id, _| match id {
                    // We announce no topic aliases (maximum 0): a broker may not use any.
                    0x23 => Err(WireError::Protocol(
                        "a topic alias, though we allow none".into(),
                    )),
                    _ => Ok(()),
                })?;
                at = end;
            }
            if topic.is_empty() {
                return Err(malformed("PUBLISH", "empty topic"));
            }
            Ok(Incoming::Publish(Publish {
                topic,
                payload: body.slice(at..),
                qos,
                dup,
                retain: byte1 & 1 != 0,
                pkid,
            }))
        }
        2 => {
            if body.len() < 2 {
                return Err(malformed("CONNACK", "truncated"));
            }
            let session_present = body[0] & 1 != 0;
            let code = body[1];
            let (mut server_keep_alive, mut reason) = (None, None);
            if v5 && body.len() > 2 {
                let (props, _) = properties(&body, 2, "CONNACK")?;
                each_property(props, "CONNACK", |id, v| {
                    match id {
                        0x13 => server_keep_alive = Some(u16::from_be_bytes([v[0], v[1]])),
                        0x1F => reason = Some(reason_string(v)),
                        _ => {}
                    }
                    Ok(())
                })?;
            }
            Ok(Incoming::ConnAck {
                session_present,
                code,
                server_keep_alive,
                reason,
            })
        }
        9 => {
            let pkid = u16_at(&body, 0, "SUBACK")?;
            let codes = if v5 {
                let (_, end) = properties(&body, 2, "SUBACK")?;
                &body[end..]
            } else {
                &body[2..]
            };
            // Granted QoS 0-2 are successes; 0x80 and up are refusals (both versions).
            let rejected = codes.iter().filter(|c| **c >= 0x80).count();
            Ok(Incoming::SubAck { pkid, rejected })
        }
        13 => Ok(Incoming::PingResp),
        14 if v5 => {
            let code = body.first().copied().unwrap_or(0);
            let mut reason = None;
            if body.len() > 1 {
                let (props, _) = properties(&body, 1, "DISCONNECT")?;
                each_property(props, "DISCONNECT", |id, v| {
                    if id == 0x1F {
                        reason = Some(reason_string(v));
                    }
                    Ok(())
                })?;
            }
            Ok(Incoming::Disconnect { code, reason })
        }
        t => Err(WireError::Protocol(format!(
            "unexpected packet type {t} from the broker"
        ))),
    }
}

/// What a CONNECT says.
#[derive(Debug, Clone)]
pub struct ConnectOptions<'a> {
    pub client_id: &'a str,
    pub keep_alive_s: u16,
    pub credentials: Option<(&'a str, &'a str)>,
    /// MQTT 5 only.
    pub session_expiry_s: u32,
    /// MQTT 5 only: the Receive Maximum announced.
    pub receive_maximum: u16,
    /// MQTT 5 only: the Maximum Packet Size announced (whole packet, fixed header included).
    pub max_packet: u32,
}

/// A CONNECT that asks for the persistent session (3.1.1 `clean_session = 0`; 5
/// `clean_start = 0` with a session expiry).
pub fn connect(protocol: Protocol, o: &ConnectOptions<'_>) -> Result<BytesMut, String> {
    let mut out = BytesMut::with_capacity(64);
    match protocol {
        Protocol::V311 => {
            let mut c = rumqttc::mqttbytes::v4::Connect::new(o.client_id);
            c.keep_alive = o.keep_alive_s;
            c.clean_session = false;
            if let Some((u, p)) = o.credentials {
                c.set_login(u, p);
            }
            rumqttc::mqttbytes::v4::Packet::Connect(c)
                .write(&mut out, usize::MAX)
                .map_err(|e| e.to_string())?;
        }
        Protocol::V5 => {
            let mut props = p5::ConnectProperties::new();
            props.session_expiry_interval = Some(o.session_expiry_s);
            props.receive_maximum = Some(o.receive_maximum.max(1));
            props.max_packet_size = Some(o.max_packet);
            let c = p5::Connect {
                keep_alive: o.keep_alive_s,
                client_id: o.client_id.to_owned(),
                clean_start: false,
                properties: Some(props),
            };
            let login = o.credentials.map(|(u, p)| p5::Login::new(u, p));
            p5::Packet::Connect(c, None, login)
                .write(&mut out, None)
                .map_err(|e| e.to_string())?;
        }
    }
    Ok(out)
}

/// A SUBSCRIBE for `(filter, qos ≤ 1)` pairs. MQTT 5 asks for retained messages only with
/// a new subscription, not on every reconnection of a persistent session.
pub fn subscribe(
    protocol: Protocol,
    pkid: u16,
    filters: &[(String, u8)],
) -> Result<BytesMut, String> {
    let mut out = BytesMut::with_capacity(64);
    match protocol {
        Protocol::V311 => {
            let qos = |q: u8| {
                if q == 0 {
                    rumqttc::QoS::AtMostOnce
                } else {
                    rumqttc::QoS::AtLeastOnce
                }
            };
            let mut s = rumqttc::mqttbytes::v4::Subscribe::new_many(
                filters
                    .iter()
                    .map(|(t, q)| rumqttc::SubscribeFilter::new(t.clone(), qos(*q))),
            );
            s.pkid = pkid;
            rumqttc::mqttbytes::v4::Packet::Subscribe(s)
                .write(&mut out, usize::MAX)
                .map_err(|e| e.to_string())?;
        }
        Protocol::V5 => {
            let qos = |q: u8| {
                if q == 0 {
                    rumqttc::v5::mqttbytes::QoS::AtMostOnce
                } else {
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce
                }
            };
            let s = p5::Subscribe {
                pkid,
                filters: filters
                    .iter()
                    .map(|(t, q)| {
                        let mut f = p5::Filter::new(t.clone(), qos(*q));
                        f.retain_forward_rule = p5::RetainForwardRule::OnNewSubscribe;
                        f
                    })
                    .collect(),
                properties: None,
            };
            p5::Packet::Subscribe(s)
                .write(&mut out, None)
                .map_err(|e| e.to_string())?;
        }
    }
    Ok(out)
}

/// Appends a PUBACK (success; the same 4 bytes in 3.1.1 and 5).
pub fn puback(out: &mut BytesMut, pkid: u16) {
    out.extend_from_slice(&[0x40, 0x02]);
    out.extend_from_slice(&pkid.to_be_bytes());
}

/// Appends a PINGREQ.
pub fn pingreq(out: &mut BytesMut) {
    out.extend_from_slice(&[0xC0, 0x00]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish_v4(topic: &str, payload: &[u8], qos: u8, pkid: u16, dup: bool) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        body.extend_from_slice(topic.as_bytes());
        if qos > 0 {
            body.extend_from_slice(&pkid.to_be_bytes());
        }
        body.extend_from_slice(payload);
        frame(0x30 | (qos << 1) | if dup { 8 } else { 0 }, &body)
    }

    fn frame(byte1: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![byte1];
        let mut n = body.len();
        loop {
            let mut b = (n % 128) as u8;
            n /= 128;
            if n > 0 {
                b |= 0x80;
            }
            out.push(b);
            if n == 0 {
                break;
            }
        }
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn publishes_come_out_whole_and_one_at_a_time() {
        let mut f = Framer::new(Protocol::V311, 1024);
        let mut bytes = publish_v4("a/b", b"21.5", 1, 7, true);
        bytes.extend(publish_v4("c", b"x", 0, 0, false));
        bytes.extend(frame(0xD0, &[]));
        // Byte by byte: nothing until a packet is complete.
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in bytes {
            buf.extend_from_slice(&[b]);
            while let Some(p) = f.next(&mut buf).unwrap() {
                got.push(p);
            }
        }
        assert_eq!(got.len(), 3);
        let Incoming::Publish(p) = &got[0] else {
            panic!("{got:?}")
        };
        assert_eq!(
            (&p.topic[..], &p.payload[..], p.qos, p.pkid, p.dup),
            (&b"a/b"[..], &b"21.5"[..], 1, 7, true)
        );
        assert!(matches!(&got[1], Incoming::Publish(p) if p.qos == 0 && &p.payload[..] == b"x"));
        assert_eq!(got[2], Incoming::PingResp);
        assert!(buf.is_empty());
    }

    #[test]
    fn an_oversized_publish_is_read_past_and_the_next_one_arrives() {
        let mut f = Framer::new(Protocol::V311, 100);
        let big = vec![b'9'; 100_000];
        let mut bytes = publish_v4("big/t", &big, 1, 3, false);
        bytes.extend(publish_v4("small", b"1", 1, 4, false));
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut most_buffered = 0;
        for chunk in bytes.chunks(4096) {
            buf.extend_from_slice(chunk);
            most_buffered = most_buffered.max(buf.len());
            while let Some(p) = f.next(&mut buf).unwrap() {
                got.push(p);
            }
        }
        assert_eq!(
            got[0],
            Incoming::Oversized {
                topic: Bytes::from_static(b"big/t"),
                qos: 1,
                dup: false,
                pkid: 3,
                len: 2 + 5 + 2 + 100_000
            }
        );
        assert!(matches!(&got[1], Incoming::Publish(p) if p.pkid == 4 && &p.topic[..] == b"small"));
        assert_eq!(got.len(), 2);
        assert!(most_buffered <= 4096, "never buffers the big payload");
        assert!(!f.skipping());
    }

    #[test]
    fn v5_publish_properties_are_skipped_and_topic_aliases_refused() {
        let mut body = Vec::new();
        body.extend_from_slice(&3u16.to_be_bytes());
        body.extend_from_slice(b"t/x");
        body.extend_from_slice(&9u16.to_be_bytes());
        // Properties: payload format (1 byte), user property ("k","v"), subscription id 300.
        let props = [
            0x01, 1, 0x26, 0, 1, b'k', 0, 1, b'v', 0x0B, 0xAC, 0x02, //
        ];
        body.push(props.len() as u8);
        body.extend_from_slice(&props);
        body.extend_from_slice(b"{\"v\":1}");
        let mut buf = BytesMut::from(&frame(0x32, &body)[..]);
        let mut f = Framer::new(Protocol::V5, 1024);
        let Some(Incoming::Publish(p)) = f.next(&mut buf).unwrap() else {
            panic!()
        };
        assert_eq!(
            (&p.topic[..], &p.payload[..]),
            (&b"t/x"[..], &b"{\"v\":1}"[..])
        );

        let mut aliased = Vec::new();
        aliased.extend_from_slice(&3u16.to_be_bytes());
        aliased.extend_from_slice(b"t/x");
        aliased.extend_from_slice(&[3, 0x23, 0, 1]);
        let mut buf = BytesMut::from(&frame(0x30, &aliased)[..]);
        assert!(matches!(f.next(&mut buf), Err(WireError::Protocol(_))));
    }

    #[test]
    fn hostile_bytes_are_errors_not_panics() {
        let cases: Vec<Vec<u8>> = vec![
            vec![0x30, 0xff, 0xff, 0xff, 0xff, 0x01], // 5-byte remaining length
            frame(0x32, &[0, 10, b'a']),              // topic longer than packet
            frame(0x32, &[0, 1, b'a', 0, 0]),         // packet id 0
            frame(0x34, &[0, 1, b'a', 0, 1]),         // QoS 2
            frame(0x36, &[0, 1, b'a', 0, 1]),         // QoS 3
            frame(0x40, &[0, 1]),                     // PUBACK: we never publish
            frame(0x20, &[0]),                        // truncated CONNACK
            frame(0x90, &[0]),                        // truncated SUBACK
            frame(0x80, &[0; 200]),                   // oversized non-PUBLISH
            frame(0x32, &[0, 1, b'a', 0, 1, 5, 0x26, 0]), // v5: broken property
        ];
        for c in cases {
            let mut f = Framer::new(Protocol::V5, 100);
            let mut buf = BytesMut::from(&c[..]);
            assert!(f.next(&mut buf).is_err(), "{c:?}");
        }
        // Random bytes: errors or waits, never a panic.
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..20_000 {
            let n = rng.usize(0..40);
            let bytes: Vec<u8> = (0..n).map(|_| rng.u8(..)).collect();
            for p in [Protocol::V311, Protocol::V5] {
                let mut f = Framer::new(p, 16);
                let mut buf = BytesMut::from(&bytes[..]);
                while let Ok(Some(_)) = f.next(&mut buf) {}
            }
        }
    }

    #[test]
    fn connack_suback_and_disconnect() {
        let mut f = Framer::new(Protocol::V5, 1024);
        // CONNACK: session present, success, server keep alive 20 s, reason string "ok".
        let connack = frame(0x20, &[1, 0, 8, 0x13, 0, 20, 0x1F, 0, 2, b'o', b'k']);
        let suback = frame(0x90, &[0, 1, 0, 1, 0x80, 0]);
        let disconnect = frame(0xE0, &[0x95, 5, 0x1F, 0, 2, b'n', b'o']);
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&connack);
        buf.extend_from_slice(&suback);
        buf.extend_from_slice(&disconnect);
        assert_eq!(
            f.next(&mut buf).unwrap(),
            Some(Incoming::ConnAck {
                session_present: true,
                code: 0,
                server_keep_alive: Some(20),
                reason: Some("ok".into())
            })
        );
        assert_eq!(
            f.next(&mut buf).unwrap(),
            Some(Incoming::SubAck {
                pkid: 1,
                rejected: 1
            })
        );
        assert_eq!(
            f.next(&mut buf).unwrap(),
            Some(Incoming::Disconnect {
                code: 0x95,
                reason: Some("no".into())
            })
        );
        let mut v4 = Framer::new(Protocol::V311, 1024);
        let mut buf = BytesMut::from(&frame(0x20, &[0, 5])[..]);
        assert!(matches!(
            v4.next(&mut buf).unwrap(),
            Some(Incoming::ConnAck { code: 5, .. })
        ));
    }

    #[test]
    fn client_packets_round_trip_through_rumqttc() {
        for p in [Protocol::V311, Protocol::V5] {
            let c = connect(
                p,
                &ConnectOptions {
                    client_id: "gw-dev",
                    keep_alive_s: 30,
                    credentials: Some(("u", "p")),
                    session_expiry_s: 3600,
                    receive_maximum: 512,
                    max_packet: 4096,
                },
            )
            .unwrap();
            let s = subscribe(p, 1, &[("a/+".into(), 1), ("b/#".into(), 0)]).unwrap();
            match p {
                Protocol::V311 => {
                    use rumqttc::mqttbytes::v4::Packet;
                    let Packet::Connect(c) = Packet::read(&mut c.clone(), 1 << 20).unwrap() else {
                        panic!()
                    };
                    assert!(!c.clean_session && c.keep_alive == 30 && c.client_id == "gw-dev");
                    let Packet::Subscribe(s) = Packet::read(&mut s.clone(), 1 << 20).unwrap()
                    else {
                        panic!()
                    };
                    assert_eq!((s.pkid, s.filters.len()), (1, 2));
                }
                Protocol::V5 => {
                    let p5::Packet::Connect(c, _, login) =
                        p5::Packet::read(&mut c.clone(), None).unwrap()
                    else {
                        panic!()
                    };
                    let props = c.properties.unwrap();
                    assert!(!c.clean_start);
                    assert_eq!(props.receive_maximum, Some(512));
                    assert_eq!(props.max_packet_size, Some(4096));
                    assert_eq!(props.session_expiry_interval, Some(3600));
                    assert_eq!(login.unwrap().username, "u");
                    let p5::Packet::Subscribe(s) = p5::Packet::read(&mut s.clone(), None).unwrap()
                    else {
                        panic!()
                    };
                    assert_eq!(s.filters.len(), 2);
                }
            }
        }
        let mut out = BytesMut::new();
        puback(&mut out, 0x1234);
        pingreq(&mut out);
        assert_eq!(&out[..], &[0x40, 2, 0x12, 0x34, 0xC0, 0]);
    }
}
