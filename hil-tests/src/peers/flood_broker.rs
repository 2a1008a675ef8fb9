//! A minimal MQTT broker that floods: it holds a fixed list of QoS 1 messages for one
//! persistent session and sends them as fast as the socket takes them, ignoring the
//! Receive Maximum the client announced (as Mosquitto 2.0.11 was seen doing), up to
//! `max_in_flight` unacknowledged messages of its own (at most 65,535: packet ids are 16
//! bits). A test peer, not a product: one session, one subscription list, no retained
//! messages, no QoS 2, no wills.
//!
//! It speaks MQTT 3.1.1 and 5, enough for a real client: CONNECT/CONNACK (session present
//! on a resumed session), SUBSCRIBE/SUBACK, PUBLISH QoS 1/PUBACK, PINGREQ/PINGRESP,
//! DISCONNECT. The session survives connections: on a new connection the messages still
//! unacknowledged are sent again first, in order, with their packet ids and the DUP flag.
//! A new connection takes over from an older one, which is closed.
//!
//! It keeps score: messages acknowledged, the most unacknowledged at once, redeliveries,
//! and acknowledgements for a packet id not sent on the connection that acknowledged it
//! (which would be an acknowledgement carried over from an ended connection — never
//! allowed). Messages are delivered once the client has subscribed; every message goes to
//! the session whatever the filter.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// The broker's score so far.
#[derive(Debug, Clone, Default)]
pub struct Score {
    /// Connections accepted (CONNACK sent).
    pub connections: u64,
    /// Messages the client acknowledged (each at most once).
    pub acked: usize,
    /// Messages sent for the first time.
    pub sent: usize,
    /// Messages sent again (DUP) on a later connection.
    pub redelivered: u64,
    /// Most messages sent and not yet acknowledged at once.
    pub peak_in_flight: usize,
    /// The Receive Maximum the client announced last (MQTT 5), if any.
    pub client_receive_maximum: Option<u16>,
    /// PUBACKs whose packet id was not sent on their connection.
    pub foreign_acks: u64,
}

#[derive(Default)]
struct Session {
    subscribed: bool,
    /// The connection currently served (0: none yet), and its socket.
    current: u64,
    socket: Option<TcpStream>,
    /// Next message never sent.
    next: usize,
    /// In flight: send order → (packet id, message index).
    in_flight: BTreeMap<u64, (u16, usize)>,
    by_pkid: HashMap<u16, u64>,
    order: u64,
    /// For the current connection: in-flight entries (send order) still to send again.
    resend: Vec<u64>,
    /// Packet ids sent on the current connection.
    sent_here: HashSet<u16>,
    last_pkid: u16,
    acked: Vec<bool>,
    score: Score,
}

struct Shared {
    messages: Vec<(String, Vec<u8>)>,
    max_in_flight: usize,
    session: Mutex<Session>,
    changed: Condvar,
    stop: AtomicBool,
}

/// A running flood broker on `127.0.0.1`; stopped on `Drop`.
pub struct FloodBroker {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl FloodBroker {
    /// Starts a broker holding `messages` (topic, payload) for its one session, with at
    /// most `max_in_flight` (≤ 65,535) sent and unacknowledged.
    pub fn start(messages: Vec<(String, Vec<u8>)>, max_in_flight: usize) -> FloodBroker {
        let listener = TcpListener::bind("127.0.0.1:0").expect("cannot bind the flood broker");
        let addr = listener.local_addr().expect("no local address");
        let n = messages.len();
        let shared = Arc::new(Shared {
            messages,
            max_in_flight: max_in_flight.clamp(1, 65_535),
            session: Mutex::new(Session {
                acked: vec![false; n],
                ..Session::default()
            }),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        std::thread::spawn(move || {
            let mut id = 0u64;
            for stream in listener.incoming() {
                if s.stop.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                id += 1;
                let s = s.clone();
                std::thread::spawn(move || serve(s, stream, id));
            }
        });
        FloodBroker { addr, shared }
    }

    /// `127.0.0.1:PORT`, as a device's `broker` setting.
    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    /// The score so far.
    pub fn score(&self) -> Score {
        self.shared.lock().score.clone()
    }

    /// Whether every message was acknowledged.
    pub fn done(&self) -> bool {
        let s = self.shared.lock();
        s.score.acked == self.shared.messages.len()
    }
}

impl Drop for FloodBroker {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.changed.notify_all();
        // Wake the accept loop.
        let _ = TcpStream::connect(self.addr);
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Session> {
        self.session.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Reads one packet: (first byte, body). `None` at the end of the stream or on garbage.
fn read_packet(r: &mut impl Read) -> Option<(u8, Vec<u8>)> {
    let mut b = [0u8; 1];
    r.read_exact(&mut b).ok()?;
    let first = b[0];
    let mut len = 0usize;
    for i in 0..4 {
        r.read_exact(&mut b).ok()?;
        len |= usize::from(b[0] & 0x7f) << (7 * i);
        if b[0] & 0x80 == 0 {
            let mut body = vec![0u8; len];
            r.read_exact(&mut body).ok()?;
            return Some((first, body));
        }
    }
    None
}

fn put_len(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return;
        }
    }
}

fn packet(out: &mut Vec<u8>, first: u8, body: &[u8]) {
    out.push(first);
    put_len(out, body.len());
    out.extend_from_slice(body);
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// A variable byte integer at `b[at..]`: (value, bytes).
fn varint(b: &[u8], at: usize) -> Option<(usize, usize)> {
    let mut v = 0usize;
    for i in 0..4 {
        let x = *b.get(at + i)?;
        v |= usize::from(x & 0x7f) << (7 * i);
        if x & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

struct Connect {
    v5: bool,
    receive_maximum: Option<u16>,
}

fn parse_connect(b: &[u8]) -> Option<Connect> {
    let name_len = usize::from(u16_at(b, 0)?);
    let level = *b.get(2 + name_len)?;
    let v5 = level == 5;
    let mut at = 2 + name_len + 1 + 1 + 2; // level, flags, keep alive
    let mut receive_maximum = None;
    if v5 {
        let (plen, n) = varint(b, at)?;
        let props = b.get(at + n..at + n + plen)?;
        // Receive Maximum (0x21) is all we look for; stop at the first unknown id.
        let mut p = 0;
        while p < props.len() {
            match props[p] {
                0x21 => {
                    receive_maximum = u16_at(props, p + 1);
                    p += 3;
                }
                0x11 | 0x27 => p += 5,
                0x22 => p += 3,
                0x17 | 0x19 => p += 2,
                _ => break,
            }
        }
        at += n + plen;
    }
    let _client_id_len = u16_at(b, at)?;
    Some(Connect {
        v5,
        receive_maximum,
    })
}

fn serve(s: Arc<Shared>, stream: TcpStream, id: u64) {
    let _ = stream.set_nodelay(true);
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::with_capacity(64 * 1024, read_half);
    let Some((first, body)) = read_packet(&mut reader) else {
        return;
    };
    let Some(connect) = (first >> 4 == 1).then(|| parse_connect(&body)).flatten() else {
        return;
    };
    let v5 = connect.v5;
    let session_present = {
        let mut g = s.lock();
        let present = g.score.connections > 0;
        g.score.connections += 1;
        g.score.client_receive_maximum = connect.receive_maximum;
        g.current = id;
        // Take over: the older connection is closed.
        if let Ok(mine) = stream.try_clone()
            && let Some(old) = g.socket.replace(mine)
        {
            let _ = old.shutdown(Shutdown::Both);
        }
        g.resend = g.in_flight.keys().copied().collect();
        g.resend.reverse(); // popped from the end: oldest first
        g.sent_here.clear();
        present
    };
    s.changed.notify_all();
    let mut connack = Vec::new();
    let ack_body: &[u8] = if v5 {
        &[session_present as u8, 0, 0]
    } else {
        &[session_present as u8, 0]
    };
    packet(&mut connack, 0x20, ack_body);
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    if writer.write_all(&connack).is_err() {
        return;
    }
    // Control replies from the reader go through here, to the writer thread.
    let replies: Arc<Mutex<Vec<u8>>> = Arc::default();
    let r2 = replies.clone();
    let s2 = s.clone();
    let writer_thread = std::thread::spawn(move || write_loop(s2, writer, id, v5, r2));
    while let Some((first, body)) = read_packet(&mut reader) {
        if s.stop.load(Ordering::Relaxed) {
            break;
        }
        match first >> 4 {
            // PUBACK
            4 => {
                let Some(pkid) = u16_at(&body, 0) else { break };
                let mut g = s.lock();
                if g.current != id {
                    break;
                }
                if !g.sent_here.contains(&pkid) {
                    g.score.foreign_acks += 1;
                    continue;
                }
                if let Some(order) = g.by_pkid.remove(&pkid)
                    && let Some((_, idx)) = g.in_flight.remove(&order)
                    && !g.acked[idx]
                {
                    g.acked[idx] = true;
                    g.score.acked += 1;
                }
                g.sent_here.remove(&pkid);
                drop(g);
                s.changed.notify_all();
            }
            // SUBSCRIBE
            8 => {
                let Some(pkid) = u16_at(&body, 0) else { break };
                let mut at = 2;
                if v5 {
                    let Some((plen, n)) = varint(&body, at) else {
                        break;
                    };
                    at += n + plen;
                }
                let mut codes = Vec::new();
                while at + 2 <= body.len() {
                    let len = usize::from(u16_at(&body, at).unwrap_or(0));
                    at += 2 + len;
                    let opts = body.get(at).copied().unwrap_or(0);
                    codes.push((opts & 0b11).min(1));
                    at += 1;
                }
                let mut reply = pkid.to_be_bytes().to_vec();
                if v5 {
                    reply.push(0);
                }
                reply.extend(codes);
                let mut out = Vec::new();
                packet(&mut out, 0x90, &reply);
                replies
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend(out);
                s.lock().subscribed = true;
                s.changed.notify_all();
            }
            // PINGREQ
            12 => {
                replies
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend([0xD0, 0]);
                s.changed.notify_all();
            }
            // DISCONNECT
            14 => break,
            _ => break,
        }
    }
    {
        let mut g = s.lock();
        if g.current == id {
            g.current = 0;
            g.socket = None;
        }
    }
    s.changed.notify_all();
    let _ = stream.shutdown(Shutdown::Both);
    let _ = writer_thread.join();
}

/// Sends control replies and publishes (redeliveries first) while this connection is the
/// session's, as fast as the socket takes them.
fn write_loop(s: Arc<Shared>, mut w: TcpStream, id: u64, v5: bool, replies: Arc<Mutex<Vec<u8>>>) {
    let mut out = Vec::with_capacity(64 * 1024);
    loop {
        {
            let mut g = s.lock();
            loop {
                if s.stop.load(Ordering::Relaxed) || g.current != id {
                    return;
                }
                out.append(&mut replies.lock().unwrap_or_else(|e| e.into_inner()));
                let can_send = g.subscribed
                    && (!g.resend.is_empty()
                        || (g.next < s.messages.len() && g.in_flight.len() < s.max_in_flight));
                if can_send || !out.is_empty() {
                    break;
                }
                g = s
                    .changed
                    .wait_timeout(g, Duration::from_millis(100))
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
            // Up to 256 publishes per write.
            for _ in 0..256 {
                if !g.subscribed {
                    break;
                }
                let (pkid, idx, dup) = if let Some(order) = g.resend.pop() {
                    let Some(&(pkid, idx)) = g.in_flight.get(&order) else {
                        continue;
                    };
                    g.score.redelivered += 1;
                    (pkid, idx, true)
                } else if g.next < s.messages.len() && g.in_flight.len() < s.max_in_flight {
                    let idx = g.next;
                    g.next += 1;
                    let mut pkid = g.last_pkid;
                    loop {
                        pkid = pkid.wrapping_add(1).max(1);
                        if !g.by_pkid.contains_key(&pkid) {
                            break;
                        }
                    }
                    g.last_pkid = pkid;
                    let order = g.order;
                    g.order += 1;
                    g.in_flight.insert(order, (pkid, idx));
                    g.by_pkid.insert(pkid, order);
                    g.score.sent += 1;
                    g.score.peak_in_flight = g.score.peak_in_flight.max(g.in_flight.len());
                    (pkid, idx, false)
                } else {
                    break;
                };
                g.sent_here.insert(pkid);
                let (topic, payload) = &s.messages[idx];
                let mut body = Vec::with_capacity(topic.len() + payload.len() + 5);
                body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
                body.extend_from_slice(topic.as_bytes());
                body.extend_from_slice(&pkid.to_be_bytes());
                if v5 {
                    body.push(0);
                }
                body.extend_from_slice(payload);
                packet(&mut out, 0x32 | if dup { 0x08 } else { 0 }, &body);
            }
        }
        if w.write_all(&out).is_err() {
            return;
        }
        out.clear();
    }
}
