//! Frame codec v1: the versioned, length-prefixed, checksummed binary frames that carry
//! samples from a gateway to the hub and acknowledgements back,
//! and the RTT pings of the link monitor.
//!
//! This module is a pure codec: no I/O, no global state. The same bytes travel as QUIC stream
//! data and as MQTT payloads; [`next_frame`] and [`FrameBuffer`] cut a byte stream into frames,
//! [`decode`] reads exactly one frame, [`encode`] writes one.
//!
//! # Hostile input
//!
//! The hub decodes frames from the network, so [`decode`] is **total**: every byte string gives
//! a [`Message`] or a [`FrameError`], never a panic. Every count and length read from the wire is
//! checked against a declared limit ([`MAX_FRAME_LEN`], [`MAX_BLOCK_LEN`],
//! [`MAX_SAMPLES_PER_FRAME`], [`MAX_STREAMS_PER_FRAME`], [`MAX_ACK_RANGES`],
//! [`MAX_PING_PAD`]) *before* anything is
//! allocated for it, and the zstd body is decompressed into a buffer of at most
//! [`MAX_BLOCK_LEN`] bytes. Decoding one frame therefore allocates at most
//! [`MAX_DECODE_ALLOC`] bytes on the Rust heap (plus zstd's own fixed-size decompression
//! context for compressed frames).
//!
//! A decoded [`DataFrame`] holds stream **names** (a per-frame stream table), not interned
//! [`StreamId`]s: the process-global interner is bounded, and a peer must not be able to fill
//! it before it is authenticated. Intern with [`DataFrame::to_samples`] once the sender is
//! known to be a legitimate gateway.
//!
//! The encoding is canonical: varints are minimal, reserved bits are zero, and the decoder
//! rejects anything else. So for a raw-encoded frame, `encode(decode(b)) == b` for every `b`
//! that decodes (the fuzz target checks this). Compressed frames (zstd, delta, summary) are
//! not canonical, but `decode(encode(m)) == m` holds for all of them, floats bit for bit.
//!
//! The delta and summary encodings (sync modes `delta` and `summary`) live in
//! [`crate::encoding`]; their block layouts are in its `delta` and `summary` modules and in `FRAME_FORMAT.md`.
//!
//! # Byte layout (all fixed-width integers little-endian)
//!
//! Frame envelope. The magic, version and length keep their offsets in every future version,
//! so an old decoder can always reject a newer frame cleanly and skip it in a stream.
//!
//! | offset | size | field |
//! |-------:|-----:|-------|
//! | 0 | 2 | magic `"OP"` (`0x4F 0x50`) |
//! | 2 | 1 | version, `1` ([`VERSION`]) |
//! | 3 | 1 | message type: `1` Hello, `2` Data, `3` Ack, `4` Ping, `5` Pong ([`MessageType`]) |
//! | 4 | 4 | `N`: body length in bytes (u32); `12 + N` ≤ [`MAX_FRAME_LEN`] |
//! | 8 | N | body (depends on the message type) |
//! | 8+N | 4 | CRC-32C (Castagnoli) of bytes `0 .. 8+N` (u32) |
//!
//! Hello body (gateway → hub, first message on a connection; no authentication: that is
//! TLS's job):
//!
//! | offset | size | field |
//! |-------:|-----:|-------|
//! | 0 | 1 | `G`: gateway id length (1..=[`MAX_GATEWAY_ID_LEN`]) |
//! | 1 | G | gateway id, ASCII `[A-Za-z0-9._-]`, first character alphanumeric |
//! | 1+G | 1 | highest frame version the sender speaks (≥ 1) |
//!
//! Data body (gateway → hub):
//!
//! | offset | size | field |
//! |-------:|-----:|-------|
//! | 0 | 1 | priority class: `0` control, `1` critical, `2` normal, `3` bulk |
//! | 1 | 1 | encoding: `0` raw, `1` zstd, `2` delta, `3` summary |
//! | 2 | 1 | `G`: gateway id length |
//! | 3 | G | gateway id (as in Hello) |
//! | 3+G | 8 | first sequence number in the frame (u64) |
//! | 11+G | 8 | last sequence number in the frame (u64), ≥ first |
//! | 19+G | … | payload: the sample block (raw), or for zstd, delta and summary: u32 `U` = block length (≤ [`MAX_BLOCK_LEN`]) followed by one or more zstd frames that decompress to exactly `U` bytes: the sample block (zstd), a delta block (delta), the sample block then a summaries section (summary) |
//!
//! Sample block (≤ [`MAX_BLOCK_LEN`] bytes, consumed exactly; `varint` is unsigned LEB128,
//! minimal, ≤ 10 bytes; `zigzag` is a varint of the zigzag-mapped signed value):
//!
//! | size | field |
//! |-----:|-------|
//! | varint | `S`: number of streams (≤ [`MAX_STREAMS_PER_FRAME`]) |
//! | S × (1 + L) | stream table: u8 name length `L` (1..=255), then the UTF-8 name (no control characters, no duplicates) |
//! | varint | `M`: number of samples (≤ [`MAX_SAMPLES_PER_FRAME`]) |
//! | M × … | samples, each: |
//! | varint | · stream index into the table (< S) |
//! | zigzag | · sequence − previous sample's sequence (wrapping; the first is against *first sequence*); every sequence lies in `first ..= last` |
//! | zigzag | · timestamp ns − previous sample's timestamp (wrapping; the first is against 0) |
//! | 1 | · tag: bits 0-3 value kind (`0` f64, `1` i64, `2` false, `3` true, `4` string), bits 4-5 quality (`0` good, `1` uncertain, `2` bad), bits 6-7 zero |
//! | 0 / 8 / varint / 1+L | · value: f64 as 8 bytes (IEEE-754 bits), i64 as zigzag, bools none, string as u8 length + UTF-8 bytes |
//!
//! Ack body (hub → gateway; the gateway deletes the acknowledged sequences from its outbox):
//!
//! | size | field |
//! |-----:|-------|
//! | 1 + G | gateway id (as in Hello) |
//! | varint | `R`: number of ranges (≤ [`MAX_ACK_RANGES`]) |
//! | R × … | inclusive ranges in increasing order, each: |
//! | varint | · gap: first of the range − (last of the previous range + 1); for the first range, its first sequence itself |
//! | varint | · last − first of the range |
//!
//! Ping body (gateway → hub; an RTT probe, optionally padded as a small throughput probe):
//!
//! | offset | size | field |
//! |-------:|-----:|-------|
//! | 0 | 8 | nonce (u64), chosen by the sender |
//! | 8 | 8 | sent_ns (u64): the sender's clock, echoed back unchanged |
//! | 16 | 4 | `P`: padding length (u32, ≤ [`MAX_PING_PAD`]) |
//! | 20 | P | padding: `P` zero bytes (anything else is malformed) |
//!
//! Pong body (hub → gateway; the answer to a Ping, never padded):
//!
//! | offset | size | field |
//! |-------:|-----:|-------|
//! | 0 | 8 | nonce of the Ping |
//! | 8 | 8 | sent_ns of the Ping |
//!
//! Ping and Pong are version-1 message types assigned after Hello, Data and Ack: a decoder
//! built before them answers [`FrameError::UnknownMessageType`] (4 or 5) — which on a stream
//! means "close it" — so a gateway should send pings on a stream of their own and stop
//! probing a hub that closes it that way.
//!
//! The same layout is described in `protocols/FRAME_FORMAT.md`.

use std::collections::{HashMap, HashSet};

use outpost_runtime::config::GatewayId;
use outpost_runtime::model::{
    MAX_STR_LEN, Priority, Quality, Sample, StreamId, StreamNameError, Value,
};

use crate::encoding::delta;
use crate::encoding::summary::{self, FrameSummary, MAX_SUMMARIES_PER_FRAME};

/// Frame format version written by this build.
pub const VERSION: u8 = 1;
/// The two magic bytes every frame starts with.
pub const MAGIC: [u8; 2] = *b"OP";
/// Bytes before the body: magic, version, message type, body length.
pub const HEADER_LEN: usize = 8;
/// Bytes after the body: the CRC-32C.
pub const TRAILER_LEN: usize = 4;
/// Largest frame (header + body + checksum) on the wire, in bytes.
pub const MAX_FRAME_LEN: usize = 1 << 20;
/// Largest body, in bytes.
pub const MAX_BODY_LEN: usize = MAX_FRAME_LEN - HEADER_LEN - TRAILER_LEN;
/// Largest (uncompressed) sample block, in bytes; also the zstd decompression capacity.
pub const MAX_BLOCK_LEN: usize = 1 << 20;
/// Most samples in one Data frame.
pub const MAX_SAMPLES_PER_FRAME: usize = 65_536;
/// Most entries in one Data frame's stream table.
pub const MAX_STREAMS_PER_FRAME: usize = 4_096;
/// Most sequence ranges in one Ack.
pub const MAX_ACK_RANGES: usize = 16_384;
/// Longest gateway id, in bytes ([`GatewayId::MAX_LEN`]).
pub const MAX_GATEWAY_ID_LEN: usize = GatewayId::MAX_LEN;
/// Most padding bytes in a [`Ping`] (64 KiB: a throughput probe, not a bulk transfer).
pub const MAX_PING_PAD: u32 = 64 * 1024;
/// Bytes of a Ping body before its padding: nonce, sent_ns, padding length.
pub const PING_BODY_LEN: usize = 20;
/// Bytes of a Pong body: nonce, sent_ns.
pub const PONG_BODY_LEN: usize = 16;
/// Most bytes [`FrameBuffer`] holds before [`FrameBuffer::push`] refuses more.
pub const MAX_BUFFERED: usize = 2 * MAX_FRAME_LEN;
/// zstd level used by [`encode`].
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

/// Upper bound of the Rust-heap bytes one [`decode`] call requests (allocator overhead
/// aside): the decompressed block, the sample vector, string values and stream names (whose
/// bytes all come from the block, so they sum to at most one block), the stream table and its
/// duplicate check, the ack ranges, the delta decoder's per-stream state, scale table and
/// column readers, and the summary vector (summary frames hold samples and summaries).
pub const MAX_DECODE_ALLOC: usize = MAX_BLOCK_LEN
    + MAX_SAMPLES_PER_FRAME * std::mem::size_of::<FrameSample>()
    + MAX_BLOCK_LEN
    + MAX_STREAMS_PER_FRAME * (std::mem::size_of::<String>() + 2 * std::mem::size_of::<&str>() + 8)
    + MAX_ACK_RANGES * std::mem::size_of::<SeqRange>()
    + MAX_STREAMS_PER_FRAME * delta::STATE_BYTES
    + delta::MAX_SCALES * 24
    + COLUMNS_ALLOC
    + MAX_SUMMARIES_PER_FRAME * std::mem::size_of::<FrameSummary>();

/// The delta decoder's column readers.
const COLUMNS_ALLOC: usize = 16 * std::mem::size_of::<Reader<'static>>();

const CRC32C: crc::Crc<u32, crc::Table<16>> =
    crc::Crc::<u32, crc::Table<16>>::new(&crc::CRC_32_ISCSI);

/// CRC-32C (Castagnoli) of `bytes`, as used in the frame trailer.
pub fn crc32c(bytes: &[u8]) -> u32 {
    CRC32C.checksum(bytes)
}

/// The message type byte (offset 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MessageType {
    /// Gateway announces itself and its highest version.
    Hello = 1,
    /// Samples, gateway → hub.
    Data = 2,
    /// Acknowledged sequences, hub → gateway.
    Ack = 3,
    /// RTT (and small throughput) probe, gateway → hub.
    Ping = 4,
    /// Answer to a Ping, hub → gateway.
    Pong = 5,
}

impl MessageType {
    /// The type for a wire code, if known.
    pub fn from_u8(v: u8) -> Option<MessageType> {
        match v {
            1 => Some(MessageType::Hello),
            2 => Some(MessageType::Data),
            3 => Some(MessageType::Ack),
            4 => Some(MessageType::Ping),
            5 => Some(MessageType::Pong),
            _ => None,
        }
    }
}

/// How a Data frame's samples are encoded (one per sync mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Encoding {
    /// Every sample, uncompressed (sync mode `full`).
    Raw = 0,
    /// The raw sample block, zstd-compressed (sync mode `full_zstd`).
    Zstd = 1,
    /// The deadband's choice of samples, delta/XOR/scaled-integer columns, then zstd (sync
    /// mode `delta`; see [`crate::encoding::delta`]).
    Delta = 2,
    /// Per-window aggregates (plus optional raw samples), zstd-compressed (sync mode
    /// `summary`; see [`crate::encoding::summary`]).
    Summary = 3,
}

impl Encoding {
    /// The encoding for a wire code, if the code is assigned (supported or reserved).
    pub fn from_u8(v: u8) -> Option<Encoding> {
        match v {
            0 => Some(Encoding::Raw),
            1 => Some(Encoding::Zstd),
            2 => Some(Encoding::Delta),
            3 => Some(Encoding::Summary),
            _ => None,
        }
    }

    /// Whether this build can encode and decode it (every assigned code since the delta and
    /// summary encodings landed).
    pub fn is_supported(self) -> bool {
        matches!(
            self,
            Encoding::Raw | Encoding::Zstd | Encoding::Delta | Encoding::Summary
        )
    }
}

impl std::fmt::Display for Encoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Encoding::Raw => "raw",
            Encoding::Zstd => "zstd",
            Encoding::Delta => "delta",
            Encoding::Summary => "summary",
        })
    }
}

/// One decoded message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`DataFrame`].
    Data(DataFrame),
    /// See [`Ack`].
    Ack(Ack),
    /// See [`Ping`].
    Ping(Ping),
    /// See [`Pong`].
    Pong(Pong),
}

impl Message {
    /// The message's type byte.
    pub fn message_type(&self) -> MessageType {
        match self {
            Message::Hello(_) => MessageType::Hello,
            Message::Data(_) => MessageType::Data,
            Message::Ack(_) => MessageType::Ack,
            Message::Ping(_) => MessageType::Ping,
            Message::Pong(_) => MessageType::Pong,
        }
    }
}

/// First message of a gateway on a connection: who it says it is and what it speaks.
/// Not an authentication: the hub must check the id against the TLS client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The gateway's id.
    pub gateway_id: GatewayId,
    /// Highest frame version the sender can decode (≥ 1).
    pub max_version: u8,
}

/// An RTT probe from a gateway: the hub answers at once with a [`Pong`] echoing `nonce` and
/// `sent_ns`. With `pad > 0` the frame carries that many zero bytes (a short throughput
/// probe); the Pong does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ping {
    /// Chosen by the sender to match the Pong to its Ping.
    pub nonce: u64,
    /// The sender's clock when it sent the Ping (any unit and epoch the sender likes: only
    /// the sender reads it back).
    pub sent_ns: u64,
    /// Zero bytes of padding in the frame, ≤ [`MAX_PING_PAD`].
    pub pad: u32,
}

impl Ping {
    /// The answer to this Ping.
    pub fn pong(&self) -> Pong {
        Pong {
            nonce: self.nonce,
            sent_ns: self.sent_ns,
        }
    }

    /// Length of this Ping's frame on the wire, in bytes.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + PING_BODY_LEN + self.pad as usize + TRAILER_LEN
    }
}

/// The hub's answer to a [`Ping`]: its nonce and timestamp, unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Pong {
    /// The Ping's nonce.
    pub nonce: u64,
    /// The Ping's `sent_ns`.
    pub sent_ns: u64,
}

/// One sample of a [`DataFrame`].
#[derive(Debug, Clone, PartialEq)]
pub struct FrameSample {
    /// Index into [`DataFrame::streams`].
    pub stream: u32,
    /// The gateway's outbox sequence number of this sample.
    pub seq: u64,
    /// Source timestamp, ns since the Unix epoch (UTC).
    pub ts_ns: i64,
    /// Quality of the reading.
    pub quality: Quality,
    /// The reading (strings at most [`MAX_STR_LEN`] bytes).
    pub value: Value,
}

/// Samples from one gateway, of one priority class.
#[derive(Debug, Clone, PartialEq)]
pub struct DataFrame {
    /// The sending gateway's id.
    pub gateway_id: GatewayId,
    /// Priority class of every sample in the frame.
    pub priority: Priority,
    /// Body encoding on the wire. [`Encoding::Delta`] needs strictly increasing sequences
    /// (the outbox order).
    pub encoding: Encoding,
    /// Lowest sequence number the frame may hold. The range is a bound, not a claim that
    /// every sequence in it is present (other priority classes interleave): acknowledge the
    /// samples' own sequences ([`Ack::for_frame`]).
    pub first_seq: u64,
    /// Highest sequence number the frame may hold, ≥ `first_seq`.
    pub last_seq: u64,
    /// Stream table: the samples' stream names, referenced by index.
    pub streams: Vec<String>,
    /// The samples, in wire order.
    pub samples: Vec<FrameSample>,
    /// Per-window aggregates; only in [`Encoding::Summary`] frames (empty otherwise). Not
    /// acknowledged: the raw samples they summarize stay in the gateway's outbox for backfill.
    pub summaries: Vec<FrameSummary>,
}

impl DataFrame {
    /// Builds a frame from outbox records `(sequence, sample)`, in the given order; the
    /// stream table and the sequence bounds are derived from them (an empty frame gets
    /// bounds `0 ..= 0`). The result is checked by [`encode`], not here.
    pub fn from_samples<'a>(
        gateway_id: &GatewayId,
        priority: Priority,
        encoding: Encoding,
        samples: impl IntoIterator<Item = (u64, &'a Sample)>,
    ) -> DataFrame {
        let mut index: HashMap<StreamId, u32> = HashMap::new();
        let mut streams = Vec::new();
        let mut out = Vec::new();
        let (mut lo, mut hi) = (u64::MAX, u64::MIN);
        for (seq, s) in samples {
            let next = streams.len() as u32;
            let idx = *index.entry(s.stream).or_insert_with(|| {
                streams.push(s.stream.name().to_string());
                next
            });
            lo = lo.min(seq);
            hi = hi.max(seq);
            out.push(FrameSample {
                stream: idx,
                seq,
                ts_ns: s.ts_ns,
                quality: s.quality,
                value: s.value.clone(),
            });
        }
        if out.is_empty() {
            (lo, hi) = (0, 0);
        }
        DataFrame {
            gateway_id: gateway_id.clone(),
            priority,
            encoding,
            first_seq: lo,
            last_seq: hi,
            streams,
            samples: out,
            summaries: Vec::new(),
        }
    }

    /// The stream name of `sample` (empty if its index is out of range, which a decoded
    /// frame never has).
    pub fn stream_name(&self, sample: &FrameSample) -> &str {
        self.streams
            .get(sample.stream as usize)
            .map_or("", String::as_str)
    }

    /// Interns the stream table (once per name) and returns `(sequence, sample)` pairs.
    /// Call it only for authenticated senders: interning is process-global and bounded.
    /// Samples whose index is outside the table (never the case in a decoded frame) are
    /// skipped.
    pub fn to_samples(&self) -> Result<Vec<(u64, Sample)>, StreamNameError> {
        let ids = self
            .streams
            .iter()
            .map(|n| StreamId::intern(n))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(self
            .samples
            .iter()
            .filter_map(|s| {
                let stream = *ids.get(s.stream as usize)?;
                Some((
                    s.seq,
                    Sample {
                        stream,
                        ts_ns: s.ts_ns,
                        value: s.value.clone(),
                        quality: s.quality,
                    },
                ))
            })
            .collect())
    }
}

/// An inclusive range of sequence numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqRange {
    /// First sequence in the range.
    pub first: u64,
    /// Last sequence in the range, ≥ `first`.
    pub last: u64,
}

impl SeqRange {
    /// Whether `seq` lies in the range.
    pub fn contains(&self, seq: u64) -> bool {
        self.first <= seq && seq <= self.last
    }
}

/// A set of sequences (any order, duplicates allowed) as sorted, merged inclusive ranges.
pub fn seq_ranges(seqs: impl IntoIterator<Item = u64>) -> Vec<SeqRange> {
    let mut v: Vec<u64> = seqs.into_iter().collect();
    v.sort_unstable();
    v.dedup();
    let mut ranges: Vec<SeqRange> = Vec::new();
    for s in v {
        match ranges.last_mut() {
            Some(r) if r.last.checked_add(1) == Some(s) => r.last = s,
            _ => ranges.push(SeqRange { first: s, last: s }),
        }
    }
    ranges
}

/// The hub's acknowledgement: these sequences of this gateway are durable at the hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// The gateway the sequences belong to.
    pub gateway_id: GatewayId,
    /// Disjoint inclusive ranges in increasing order.
    pub ranges: Vec<SeqRange>,
}

impl Ack {
    /// Acknowledges a set of sequences (any order, duplicates allowed), merged into ranges.
    pub fn from_seqs(gateway_id: &GatewayId, seqs: impl IntoIterator<Item = u64>) -> Ack {
        Ack {
            gateway_id: gateway_id.clone(),
            ranges: seq_ranges(seqs),
        }
    }

    /// Acknowledges every sample of `frame`.
    pub fn for_frame(frame: &DataFrame) -> Ack {
        Ack::from_seqs(&frame.gateway_id, frame.samples.iter().map(|s| s.seq))
    }

    /// Whether `seq` is acknowledged.
    pub fn contains(&self, seq: u64) -> bool {
        let i = self.ranges.partition_point(|r| r.last < seq);
        self.ranges.get(i).is_some_and(|r| r.contains(seq))
    }

    /// Number of acknowledged sequences.
    pub fn count(&self) -> u128 {
        self.ranges
            .iter()
            .map(|r| u128::from(r.last - r.first) + 1)
            .sum()
    }
}

/// Why bytes are not a valid frame. Every variant is a property of the input, never of the
/// decoder's state; [`FrameError::label`] gives a short name for a metrics counter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The first two bytes are not [`MAGIC`] (not a frame, or a stream lost sync).
    #[error("bad magic {0:02x?}: not an Outpost frame, or the stream lost sync")]
    BadMagic([u8; 2]),
    /// The version byte is not one this build decodes.
    #[error("unsupported frame version {0} (this build decodes version {VERSION})")]
    UnsupportedVersion(u8),
    /// The length prefix announces more than [`MAX_FRAME_LEN`].
    #[error("frame of {0} bytes exceeds the maximum of {MAX_FRAME_LEN}")]
    TooLong(u64),
    /// The input ends before the frame does.
    #[error("truncated frame: {needed} bytes needed, {have} present")]
    Truncated {
        /// Bytes the frame needs.
        needed: usize,
        /// Bytes present.
        have: usize,
    },
    /// [`decode`] was given bytes after the end of the frame.
    #[error("{0} bytes after the end of the frame")]
    TrailingBytes(usize),
    /// The CRC-32C does not match: corrupted in transit.
    #[error("checksum mismatch: frame carries {carried:#010x}, content gives {computed:#010x}")]
    Checksum {
        /// CRC in the trailer.
        carried: u32,
        /// CRC of the content.
        computed: u32,
    },
    /// The message type byte is not assigned (by this build: a newer peer may know it).
    #[error("unknown message type {0} (this build knows 1 to 5)")]
    UnknownMessageType(u8),
    /// The encoding byte is not assigned.
    #[error("unknown encoding {0}")]
    UnknownEncoding(u8),
    /// The encoding is reserved (delta, summary) and not implemented by this build.
    #[error("unsupported encoding {0}: reserved for a later version of the codec")]
    UnsupportedEncoding(Encoding),
    /// The priority byte is not a class.
    #[error("unknown priority class {0}")]
    UnknownPriority(u8),
    /// A count exceeds its declared limit.
    #[error("{what}: {count} exceeds the limit of {max}")]
    LimitExceeded {
        /// Which count.
        what: &'static str,
        /// The count on the wire.
        count: u64,
        /// The limit.
        max: usize,
    },
    /// The zstd payload does not decompress to the declared sample block.
    #[error("zstd payload: {0}")]
    Decompress(String),
    /// A field is malformed.
    #[error("malformed {field}: {reason}")]
    Malformed {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
}

impl FrameError {
    /// A short, fixed label for a metrics counter (`frame_errors_total{kind=...}`).
    pub fn label(&self) -> &'static str {
        match self {
            FrameError::BadMagic(_) => "bad_magic",
            FrameError::UnsupportedVersion(_) => "version",
            FrameError::TooLong(_) => "too_long",
            FrameError::Truncated { .. } => "truncated",
            FrameError::TrailingBytes(_) => "trailing_bytes",
            FrameError::Checksum { .. } => "checksum",
            FrameError::UnknownMessageType(_) => "message_type",
            FrameError::UnknownEncoding(_) | FrameError::UnsupportedEncoding(_) => "encoding",
            FrameError::UnknownPriority(_) => "priority",
            FrameError::LimitExceeded { .. } => "limit",
            FrameError::Decompress(_) => "decompress",
            FrameError::Malformed { .. } => "malformed",
        }
    }
}

/// Why a message cannot be encoded (a bug or bad configuration on the sending side; the
/// encoder refuses anything the decoder would reject).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A stream table entry is not a valid stream name.
    #[error("invalid stream name {name:?}: {reason}")]
    StreamName {
        /// The name.
        name: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// A count exceeds its limit.
    #[error("{what}: {count} exceeds the limit of {max}")]
    LimitExceeded {
        /// Which count.
        what: &'static str,
        /// The count.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A sample references a stream index outside the table.
    #[error("sample {index} references stream {stream}, but the table has {streams} entries")]
    StreamIndex {
        /// Position of the sample.
        index: usize,
        /// Its stream index.
        stream: u32,
        /// Size of the stream table.
        streams: usize,
    },
    /// A sequence lies outside `first_seq ..= last_seq`, or the bounds are inverted.
    #[error("sequence {seq} outside the frame's bounds {first}..={last}")]
    SeqOutOfRange {
        /// The sequence.
        seq: u64,
        /// Frame's first sequence.
        first: u64,
        /// Frame's last sequence.
        last: u64,
    },
    /// A string value is longer than [`MAX_STR_LEN`].
    #[error("string value of {0} bytes exceeds {MAX_STR_LEN}")]
    StringTooLong(usize),
    /// The encoding is reserved and not implemented (no assigned code is, today).
    #[error("encoding {0} is not implemented yet")]
    UnsupportedEncoding(Encoding),
    /// A delta frame's samples are not in strictly increasing sequence order.
    #[error("delta frames need strictly increasing sequences: sample {index} has {seq}")]
    SeqOrder {
        /// Position of the sample.
        index: usize,
        /// Its sequence.
        seq: u64,
    },
    /// Summaries in a frame whose encoding is not [`Encoding::Summary`].
    #[error("only summary-encoded frames carry summaries")]
    SummariesNeedSummaryEncoding,
    /// A window summary is inconsistent.
    #[error("invalid window summary: {0}")]
    Summary(&'static str),
    /// Ack ranges are not increasing, disjoint, with first ≤ last.
    #[error("ack ranges must be increasing and disjoint, each with first <= last")]
    AckRanges,
    /// Hello's max_version must be at least 1.
    #[error("hello max_version must be at least 1")]
    HelloVersion,
    /// The encoded frame would exceed [`MAX_FRAME_LEN`] (or the block [`MAX_BLOCK_LEN`]).
    #[error("{what} of {len} bytes exceeds the maximum of {max}")]
    TooLong {
        /// Frame or block.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// zstd failed.
    #[error("zstd compression failed: {0}")]
    Compress(String),
}

/// The checks `StreamId::intern` applies, so a decoded name always interns.
pub(crate) fn validate_stream_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty");
    }
    if name.len() > MAX_STR_LEN {
        return Err("longer than 255 bytes");
    }
    if name.chars().any(char::is_control) {
        return Err("contains a control character");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Encoding

pub(crate) const KIND_F64: u8 = 0;
pub(crate) const KIND_I64: u8 = 1;
pub(crate) const KIND_FALSE: u8 = 2;
pub(crate) const KIND_TRUE: u8 = 3;
pub(crate) const KIND_STR: u8 = 4;

pub(crate) fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

pub(crate) fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub(crate) fn put_short_str(out: &mut Vec<u8>, s: &str) {
    // Callers have checked s.len() <= 255.
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

/// Encodes `msg` into one frame, compressing zstd bodies at [`DEFAULT_ZSTD_LEVEL`].
pub fn encode(msg: &Message) -> Result<Vec<u8>, EncodeError> {
    encode_with_level(msg, DEFAULT_ZSTD_LEVEL)
}

/// Encodes `msg` into one frame, compressing zstd bodies at `zstd_level`.
pub fn encode_with_level(msg: &Message, zstd_level: i32) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(msg.message_type() as u8);
    out.extend_from_slice(&[0; 4]);
    match msg {
        Message::Hello(h) => {
            if h.max_version == 0 {
                return Err(EncodeError::HelloVersion);
            }
            put_short_str(&mut out, &h.gateway_id);
            out.push(h.max_version);
        }
        Message::Data(d) => encode_data(&mut out, d, zstd_level)?,
        Message::Ack(a) => encode_ack(&mut out, a)?,
        Message::Ping(p) => {
            if p.pad > MAX_PING_PAD {
                return Err(EncodeError::LimitExceeded {
                    what: "ping padding",
                    count: p.pad as usize,
                    max: MAX_PING_PAD as usize,
                });
            }
            out.extend_from_slice(&p.nonce.to_le_bytes());
            out.extend_from_slice(&p.sent_ns.to_le_bytes());
            out.extend_from_slice(&p.pad.to_le_bytes());
            out.resize(out.len() + p.pad as usize, 0);
        }
        Message::Pong(p) => {
            out.extend_from_slice(&p.nonce.to_le_bytes());
            out.extend_from_slice(&p.sent_ns.to_le_bytes());
        }
    }
    let total = out.len() + TRAILER_LEN;
    if total > MAX_FRAME_LEN {
        return Err(EncodeError::TooLong {
            what: "frame",
            len: total,
            max: MAX_FRAME_LEN,
        });
    }
    let body_len = (out.len() - HEADER_LEN) as u32;
    out[4..8].copy_from_slice(&body_len.to_le_bytes());
    let crc = crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

fn encode_data(out: &mut Vec<u8>, d: &DataFrame, zstd_level: i32) -> Result<(), EncodeError> {
    if !d.encoding.is_supported() {
        return Err(EncodeError::UnsupportedEncoding(d.encoding));
    }
    if d.first_seq > d.last_seq {
        return Err(EncodeError::SeqOutOfRange {
            seq: d.first_seq,
            first: d.first_seq,
            last: d.last_seq,
        });
    }
    out.push(d.priority as u8);
    out.push(d.encoding as u8);
    put_short_str(out, &d.gateway_id);
    out.extend_from_slice(&d.first_seq.to_le_bytes());
    out.extend_from_slice(&d.last_seq.to_le_bytes());
    if !d.summaries.is_empty() && d.encoding != Encoding::Summary {
        return Err(EncodeError::SummariesNeedSummaryEncoding);
    }
    match d.encoding {
        Encoding::Raw => {
            let start = out.len();
            encode_block(out, d)?;
            check_block_len(out.len() - start)?;
        }
        _ => {
            let mut block = Vec::with_capacity(16 * d.samples.len() + 64);
            match d.encoding {
                Encoding::Delta => delta::encode_block(&mut block, d)?,
                Encoding::Summary => {
                    encode_block(&mut block, d)?;
                    summary::encode_summaries(&mut block, d)?;
                }
                _ => encode_block(&mut block, d)?,
            }
            check_block_len(block.len())?;
            let z = zstd::bulk::compress(&block, zstd_level)
                .map_err(|e| EncodeError::Compress(e.to_string()))?;
            out.extend_from_slice(&(block.len() as u32).to_le_bytes());
            if out.len() + z.len() + TRAILER_LEN > MAX_FRAME_LEN {
                return Err(EncodeError::TooLong {
                    what: "frame",
                    len: out.len() + z.len() + TRAILER_LEN,
                    max: MAX_FRAME_LEN,
                });
            }
            out.extend_from_slice(&z);
        }
    }
    Ok(())
}

fn check_block_len(len: usize) -> Result<(), EncodeError> {
    if len > MAX_BLOCK_LEN {
        return Err(EncodeError::TooLong {
            what: "sample block",
            len,
            max: MAX_BLOCK_LEN,
        });
    }
    Ok(())
}

/// Checks what every sample-carrying encoding requires of a frame's samples: the counts, the
/// stream indices, the sequence bounds and the string lengths.
pub(crate) fn check_samples(d: &DataFrame) -> Result<(), EncodeError> {
    if d.samples.len() > MAX_SAMPLES_PER_FRAME {
        return Err(EncodeError::LimitExceeded {
            what: "samples per frame",
            count: d.samples.len(),
            max: MAX_SAMPLES_PER_FRAME,
        });
    }
    for (index, s) in d.samples.iter().enumerate() {
        if s.stream as usize >= d.streams.len() {
            return Err(EncodeError::StreamIndex {
                index,
                stream: s.stream,
                streams: d.streams.len(),
            });
        }
        if s.seq < d.first_seq || s.seq > d.last_seq {
            return Err(EncodeError::SeqOutOfRange {
                seq: s.seq,
                first: d.first_seq,
                last: d.last_seq,
            });
        }
        if let Value::Str(t) = &s.value
            && t.len() > MAX_STR_LEN
        {
            return Err(EncodeError::StringTooLong(t.len()));
        }
    }
    Ok(())
}

/// Writes the stream table: count, then each name (validated, no duplicates).
pub(crate) fn encode_stream_table(
    out: &mut Vec<u8>,
    streams: &[String],
) -> Result<(), EncodeError> {
    if streams.len() > MAX_STREAMS_PER_FRAME {
        return Err(EncodeError::LimitExceeded {
            what: "streams per frame",
            count: streams.len(),
            max: MAX_STREAMS_PER_FRAME,
        });
    }
    let mut seen = HashSet::with_capacity(streams.len());
    put_varint(out, streams.len() as u64);
    for name in streams {
        validate_stream_name(name).map_err(|reason| EncodeError::StreamName {
            name: name.clone(),
            reason,
        })?;
        if !seen.insert(name.as_str()) {
            return Err(EncodeError::StreamName {
                name: name.clone(),
                reason: "listed twice in the stream table",
            });
        }
        put_short_str(out, name);
    }
    Ok(())
}

/// The tag byte of a value: kind in bits 0-3, quality in bits 4-5.
pub(crate) fn value_tag(quality: Quality, value: &Value) -> u8 {
    let kind = match value {
        Value::F64(_) => KIND_F64,
        Value::I64(_) => KIND_I64,
        Value::Bool(false) => KIND_FALSE,
        Value::Bool(true) => KIND_TRUE,
        Value::Str(_) => KIND_STR,
    };
    ((quality as u8) << 4) | kind
}

/// Writes a value's payload as in the raw sample block (the tag is written by the caller).
/// Strings must have been checked against [`MAX_STR_LEN`] ([`check_samples`]).
pub(crate) fn put_value_payload(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::F64(v) => out.extend_from_slice(&v.to_bits().to_le_bytes()),
        Value::I64(v) => put_varint(out, zigzag(*v)),
        Value::Bool(_) => {}
        Value::Str(t) => put_short_str(out, t),
    }
}

fn encode_block(out: &mut Vec<u8>, d: &DataFrame) -> Result<(), EncodeError> {
    check_samples(d)?;
    encode_stream_table(out, &d.streams)?;
    put_varint(out, d.samples.len() as u64);
    let mut prev_seq = d.first_seq;
    let mut prev_ts = 0i64;
    for s in &d.samples {
        put_varint(out, u64::from(s.stream));
        put_varint(out, zigzag(s.seq.wrapping_sub(prev_seq) as i64));
        put_varint(out, zigzag(s.ts_ns.wrapping_sub(prev_ts)));
        prev_seq = s.seq;
        prev_ts = s.ts_ns;
        out.push(value_tag(s.quality, &s.value));
        put_value_payload(out, &s.value);
    }
    Ok(())
}

fn encode_ack(out: &mut Vec<u8>, a: &Ack) -> Result<(), EncodeError> {
    if a.ranges.len() > MAX_ACK_RANGES {
        return Err(EncodeError::LimitExceeded {
            what: "ack ranges",
            count: a.ranges.len(),
            max: MAX_ACK_RANGES,
        });
    }
    put_short_str(out, &a.gateway_id);
    put_varint(out, a.ranges.len() as u64);
    let mut next_free: Option<u64> = Some(0); // smallest first the next range may have
    for r in &a.ranges {
        let lo = next_free.ok_or(EncodeError::AckRanges)?;
        if r.first < lo || r.last < r.first {
            return Err(EncodeError::AckRanges);
        }
        put_varint(out, r.first - lo);
        put_varint(out, r.last - r.first);
        next_free = r.last.checked_add(1);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Decoding

/// A bounds-checked cursor over untrusted bytes.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn truncated(field: &'static str) -> FrameError {
        FrameError::Malformed {
            field,
            reason: "ends early",
        }
    }

    pub(crate) fn bytes(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], FrameError> {
        if n > self.remaining() {
            return Err(Self::truncated(field));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, FrameError> {
        Ok(self.bytes(1, field)?[0])
    }

    pub(crate) fn array<const N: usize>(
        &mut self,
        field: &'static str,
    ) -> Result<[u8; N], FrameError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N, field)?);
        Ok(a)
    }

    pub(crate) fn varint(&mut self, field: &'static str) -> Result<u64, FrameError> {
        let mut v = 0u64;
        for i in 0..10 {
            let b = self.u8(field)?;
            if i == 9 && b > 1 {
                return Err(FrameError::Malformed {
                    field,
                    reason: "varint overflows 64 bits",
                });
            }
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                if b == 0 && i > 0 {
                    return Err(FrameError::Malformed {
                        field,
                        reason: "varint is not minimally encoded",
                    });
                }
                return Ok(v);
            }
        }
        Err(FrameError::Malformed {
            field,
            reason: "varint longer than 10 bytes",
        })
    }

    /// A count bounded by `max`, and by the bytes left (each item takes at least
    /// `min_item_len` bytes), so a hostile count cannot make us reserve memory.
    pub(crate) fn count(
        &mut self,
        field: &'static str,
        max: usize,
        min_item_len: usize,
    ) -> Result<usize, FrameError> {
        let n = self.varint(field)?;
        if n > max as u64 {
            return Err(FrameError::LimitExceeded {
                what: field,
                count: n,
                max,
            });
        }
        let n = n as usize;
        if n.saturating_mul(min_item_len) > self.remaining() {
            return Err(Self::truncated(field));
        }
        Ok(n)
    }

    pub(crate) fn short_str(&mut self, field: &'static str) -> Result<&'a str, FrameError> {
        let len = self.u8(field)? as usize;
        let b = self.bytes(len, field)?;
        std::str::from_utf8(b).map_err(|_| FrameError::Malformed {
            field,
            reason: "not valid UTF-8",
        })
    }

    fn gateway_id(&mut self) -> Result<GatewayId, FrameError> {
        let id = self.short_str("gateway id")?;
        GatewayId::parse(id).map_err(|e| FrameError::Malformed {
            field: "gateway id",
            reason: e.reason(),
        })
    }

    pub(crate) fn finish(&self, field: &'static str) -> Result<(), FrameError> {
        if self.remaining() != 0 {
            return Err(FrameError::Malformed {
                field,
                reason: "trailing bytes",
            });
        }
        Ok(())
    }
}

/// Validates the 8-byte header and returns the total frame length it announces.
/// Needs at least [`HEADER_LEN`] bytes (fewer is `Truncated`).
pub fn frame_len(header: &[u8]) -> Result<usize, FrameError> {
    if header.len() < HEADER_LEN {
        // Reject garbage as early as the bytes allow.
        if let Some(&b0) = header.first()
            && b0 != MAGIC[0]
        {
            return Err(FrameError::BadMagic([
                b0,
                header.get(1).copied().unwrap_or(0),
            ]));
        }
        if header.len() >= 2 && header[1] != MAGIC[1] {
            return Err(FrameError::BadMagic([header[0], header[1]]));
        }
        return Err(FrameError::Truncated {
            needed: HEADER_LEN,
            have: header.len(),
        });
    }
    if header[0..2] != MAGIC {
        return Err(FrameError::BadMagic([header[0], header[1]]));
    }
    if header[2] != VERSION {
        return Err(FrameError::UnsupportedVersion(header[2]));
    }
    let body = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    let total = u64::from(body) + (HEADER_LEN + TRAILER_LEN) as u64;
    if total > MAX_FRAME_LEN as u64 {
        return Err(FrameError::TooLong(total));
    }
    Ok(total as usize)
}

/// Decodes exactly one frame; `bytes` must hold the whole frame and nothing after it.
pub fn decode(bytes: &[u8]) -> Result<Message, FrameError> {
    let total = frame_len(bytes)?;
    if bytes.len() < total {
        return Err(FrameError::Truncated {
            needed: total,
            have: bytes.len(),
        });
    }
    if bytes.len() > total {
        return Err(FrameError::TrailingBytes(bytes.len() - total));
    }
    let content = &bytes[..total - TRAILER_LEN];
    let carried = u32::from_le_bytes([
        bytes[total - 4],
        bytes[total - 3],
        bytes[total - 2],
        bytes[total - 1],
    ]);
    let computed = crc32c(content);
    if carried != computed {
        return Err(FrameError::Checksum { carried, computed });
    }
    let ty = MessageType::from_u8(bytes[3]).ok_or(FrameError::UnknownMessageType(bytes[3]))?;
    let mut r = Reader::new(&content[HEADER_LEN..]);
    let msg = match ty {
        MessageType::Hello => {
            let gateway_id = r.gateway_id()?;
            let max_version = r.u8("hello max_version")?;
            if max_version == 0 {
                return Err(FrameError::Malformed {
                    field: "hello max_version",
                    reason: "must be at least 1",
                });
            }
            r.finish("hello body")?;
            Message::Hello(Hello {
                gateway_id,
                max_version,
            })
        }
        MessageType::Data => Message::Data(decode_data(&mut r)?),
        MessageType::Ack => Message::Ack(decode_ack(&mut r)?),
        MessageType::Ping => Message::Ping(decode_ping(&mut r)?),
        MessageType::Pong => {
            let nonce = u64::from_le_bytes(r.array("pong nonce")?);
            let sent_ns = u64::from_le_bytes(r.array("pong sent_ns")?);
            r.finish("pong body")?;
            Message::Pong(Pong { nonce, sent_ns })
        }
    };
    Ok(msg)
}

fn decode_data(r: &mut Reader<'_>) -> Result<DataFrame, FrameError> {
    let p = r.u8("priority")?;
    let priority = Priority::from_u8(p).ok_or(FrameError::UnknownPriority(p))?;
    let e = r.u8("encoding")?;
    let encoding = Encoding::from_u8(e).ok_or(FrameError::UnknownEncoding(e))?;
    if !encoding.is_supported() {
        return Err(FrameError::UnsupportedEncoding(encoding));
    }
    let gateway_id = r.gateway_id()?;
    let first_seq = u64::from_le_bytes(r.array("first sequence")?);
    let last_seq = u64::from_le_bytes(r.array("last sequence")?);
    if first_seq > last_seq {
        return Err(FrameError::Malformed {
            field: "sequence bounds",
            reason: "first sequence is after last sequence",
        });
    }
    let mut frame = DataFrame {
        gateway_id,
        priority,
        encoding,
        first_seq,
        last_seq,
        streams: Vec::new(),
        samples: Vec::new(),
        summaries: Vec::new(),
    };
    match encoding {
        Encoding::Raw => {
            let block = r.bytes(r.remaining(), "sample block")?;
            if block.len() > MAX_BLOCK_LEN {
                return Err(FrameError::LimitExceeded {
                    what: "sample block bytes",
                    count: block.len() as u64,
                    max: MAX_BLOCK_LEN,
                });
            }
            decode_block(block, &mut frame)?;
        }
        _ => {
            let declared = u32::from_le_bytes(r.array("zstd block length")?);
            if declared as usize > MAX_BLOCK_LEN {
                return Err(FrameError::LimitExceeded {
                    what: "sample block bytes",
                    count: u64::from(declared),
                    max: MAX_BLOCK_LEN,
                });
            }
            let z = r.bytes(r.remaining(), "zstd payload")?;
            let block = decompress_bounded(z, declared as usize)?;
            match encoding {
                Encoding::Delta => delta::decode_block(&block, &mut frame)?,
                Encoding::Summary => {
                    let mut r = Reader::new(&block);
                    frame.streams = decode_stream_table(&mut r)?;
                    decode_raw_samples(&mut r, &mut frame)?;
                    summary::decode_summaries(&mut r, &mut frame)?;
                    r.finish("summary block")?;
                }
                _ => decode_block(&block, &mut frame)?,
            }
        }
    }
    Ok(frame)
}

/// Decompresses into a buffer of at most `declared` (≤ [`MAX_BLOCK_LEN`]) bytes and checks
/// that exactly `declared` bytes come out. One-shot decompression writes straight into that
/// buffer, so zstd allocates no window buffer sized by the (untrusted) frame header.
fn decompress_bounded(z: &[u8], declared: usize) -> Result<Vec<u8>, FrameError> {
    let mut d =
        zstd::bulk::Decompressor::new().map_err(|e| FrameError::Decompress(e.to_string()))?;
    let block = d
        .decompress(z, declared)
        .map_err(|e| FrameError::Decompress(e.to_string()))?;
    if block.len() != declared {
        return Err(FrameError::Decompress(format!(
            "decompressed to {} bytes, {} declared",
            block.len(),
            declared
        )));
    }
    Ok(block)
}

/// Reads a stream table (count, then names; validated, no duplicates).
pub(crate) fn decode_stream_table(r: &mut Reader<'_>) -> Result<Vec<String>, FrameError> {
    // A stream entry takes at least 2 bytes.
    let n_streams = r.count("streams per frame", MAX_STREAMS_PER_FRAME, 2)?;
    let mut streams = Vec::with_capacity(n_streams);
    let mut seen = HashSet::with_capacity(n_streams);
    for _ in 0..n_streams {
        let name = r.short_str("stream name")?;
        validate_stream_name(name).map_err(|reason| FrameError::Malformed {
            field: "stream name",
            reason,
        })?;
        if !seen.insert(name) {
            return Err(FrameError::Malformed {
                field: "stream table",
                reason: "a name is listed twice",
            });
        }
        streams.push(name.to_string());
    }
    Ok(streams)
}

/// Splits a tag byte into quality and value kind (checking reserved bits and codes).
pub(crate) fn parse_tag(tag: u8) -> Result<(Quality, u8), FrameError> {
    if tag & 0xC0 != 0 {
        return Err(FrameError::Malformed {
            field: "sample tag",
            reason: "reserved bits set",
        });
    }
    let quality = Quality::from_u8(tag >> 4).ok_or(FrameError::Malformed {
        field: "sample quality",
        reason: "unknown quality code",
    })?;
    let kind = tag & 0x0F;
    if kind > KIND_STR {
        return Err(FrameError::Malformed {
            field: "sample tag",
            reason: "unknown value kind",
        });
    }
    Ok((quality, kind))
}

/// Reads a value payload of `kind` (a kind accepted by [`parse_tag`]) as in the raw block.
pub(crate) fn read_value_payload(r: &mut Reader<'_>, kind: u8) -> Result<Value, FrameError> {
    Ok(match kind {
        KIND_F64 => Value::F64(f64::from_bits(u64::from_le_bytes(r.array("f64 value")?))),
        KIND_I64 => Value::I64(unzigzag(r.varint("i64 value")?)),
        KIND_FALSE => Value::Bool(false),
        KIND_TRUE => Value::Bool(true),
        _ => Value::Str(r.short_str("string value")?.into()),
    })
}

/// Reads the samples part of a raw sample block (after the stream table) into `frame`.
pub(crate) fn decode_raw_samples(
    r: &mut Reader<'_>,
    frame: &mut DataFrame,
) -> Result<(), FrameError> {
    // A sample takes at least 4 bytes.
    let n_samples = r.count("samples per frame", MAX_SAMPLES_PER_FRAME, 4)?;
    let mut samples = Vec::with_capacity(n_samples);
    let mut prev_seq = frame.first_seq;
    let mut prev_ts = 0i64;
    for _ in 0..n_samples {
        let stream = r.varint("sample stream index")?;
        if stream >= frame.streams.len() as u64 {
            return Err(FrameError::Malformed {
                field: "sample stream index",
                reason: "outside the stream table",
            });
        }
        let seq = prev_seq.wrapping_add(unzigzag(r.varint("sample sequence")?) as u64);
        if seq < frame.first_seq || seq > frame.last_seq {
            return Err(FrameError::Malformed {
                field: "sample sequence",
                reason: "outside the frame's sequence bounds",
            });
        }
        let ts_ns = prev_ts.wrapping_add(unzigzag(r.varint("sample timestamp")?));
        prev_seq = seq;
        prev_ts = ts_ns;
        let (quality, kind) = parse_tag(r.u8("sample tag")?)?;
        let value = read_value_payload(r, kind)?;
        samples.push(FrameSample {
            stream: stream as u32,
            seq,
            ts_ns,
            quality,
            value,
        });
    }
    frame.samples = samples;
    Ok(())
}

fn decode_block(block: &[u8], frame: &mut DataFrame) -> Result<(), FrameError> {
    let mut r = Reader::new(block);
    frame.streams = decode_stream_table(&mut r)?;
    decode_raw_samples(&mut r, frame)?;
    r.finish("sample block")
}

fn decode_ping(r: &mut Reader<'_>) -> Result<Ping, FrameError> {
    let nonce = u64::from_le_bytes(r.array("ping nonce")?);
    let sent_ns = u64::from_le_bytes(r.array("ping sent_ns")?);
    let pad = u32::from_le_bytes(r.array("ping padding length")?);
    if pad > MAX_PING_PAD {
        return Err(FrameError::LimitExceeded {
            what: "ping padding",
            count: u64::from(pad),
            max: MAX_PING_PAD as usize,
        });
    }
    // Borrowed from the frame: checking the padding allocates nothing.
    if r.bytes(pad as usize, "ping padding")?
        .iter()
        .any(|&b| b != 0)
    {
        return Err(FrameError::Malformed {
            field: "ping padding",
            reason: "not all zero",
        });
    }
    r.finish("ping body")?;
    Ok(Ping {
        nonce,
        sent_ns,
        pad,
    })
}

fn decode_ack(r: &mut Reader<'_>) -> Result<Ack, FrameError> {
    let gateway_id = r.gateway_id()?;
    // A range takes at least 2 bytes.
    let n = r.count("ack ranges", MAX_ACK_RANGES, 2)?;
    let mut ranges = Vec::with_capacity(n);
    let mut next_free: Option<u64> = Some(0);
    for _ in 0..n {
        let overflow = FrameError::Malformed {
            field: "ack range",
            reason: "sequence overflows 64 bits",
        };
        let lo = next_free.ok_or(overflow.clone())?;
        let first = lo
            .checked_add(r.varint("ack range gap")?)
            .ok_or(overflow.clone())?;
        let last = first
            .checked_add(r.varint("ack range length")?)
            .ok_or(overflow)?;
        ranges.push(SeqRange { first, last });
        next_free = last.checked_add(1);
    }
    r.finish("ack body")?;
    Ok(Ack { gateway_id, ranges })
}

// ---------------------------------------------------------------------------------------------
// Streaming

/// Result of looking for a frame at the start of a buffer.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// A complete, valid frame: the message, and how many bytes of the buffer it used.
    Frame {
        /// The decoded message.
        message: Message,
        /// Bytes to drop from the front of the buffer.
        consumed: usize,
    },
    /// The buffer holds only part of a frame: at least this many more bytes are needed
    /// (first the header, then — once the length prefix is known — the rest of the frame).
    Incomplete(usize),
}

/// Extracts the frame at the start of `buf`, if it is complete. The length prefix is
/// checked against [`MAX_FRAME_LEN`] as soon as the header is present, before the caller
/// buffers any more. An error means the stream is unusable (lost sync or hostile): close it.
pub fn next_frame(buf: &[u8]) -> Result<Next, FrameError> {
    let total = match frame_len(buf) {
        Ok(t) => t,
        Err(FrameError::Truncated { needed, have }) => return Ok(Next::Incomplete(needed - have)),
        Err(e) => return Err(e),
    };
    if buf.len() < total {
        return Ok(Next::Incomplete(total - buf.len()));
    }
    let message = decode(&buf[..total])?;
    Ok(Next::Frame {
        message,
        consumed: total,
    })
}

/// An owned, bounded reassembly buffer for a byte stream of frames (a QUIC stream). Push
/// what the transport delivers, then take messages until `Ok(None)`.
#[derive(Debug, Default)]
pub struct FrameBuffer {
    buf: Vec<u8>,
    start: usize,
}

impl FrameBuffer {
    /// An empty buffer.
    pub fn new() -> FrameBuffer {
        FrameBuffer::default()
    }

    /// Bytes buffered and not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Appends received bytes. Refuses (with `LimitExceeded`) to hold more than
    /// [`MAX_BUFFERED`] bytes: drain with [`FrameBuffer::next_message`] between pushes.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), FrameError> {
        let after = self.buffered().saturating_add(bytes.len());
        if after > MAX_BUFFERED {
            return Err(FrameError::LimitExceeded {
                what: "buffered stream bytes",
                count: after as u64,
                max: MAX_BUFFERED,
            });
        }
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
        Ok(())
    }

    /// The next complete message, `Ok(None)` if more bytes are needed, or the error that
    /// makes the stream unusable.
    pub fn next_message(&mut self) -> Result<Option<Message>, FrameError> {
        match next_frame(&self.buf[self.start..])? {
            Next::Frame { message, consumed } => {
                self.start += consumed;
                if self.start == self.buf.len() {
                    self.buf.clear();
                    self.start = 0;
                }
                Ok(Some(message))
            }
            Next::Incomplete(_) => Ok(None),
        }
    }

    /// How many more bytes the next frame needs (0 if a complete frame is buffered or the
    /// buffer is invalid; the error then comes from [`FrameBuffer::next_message`]).
    pub fn needed(&self) -> usize {
        match frame_len(&self.buf[self.start..]) {
            Ok(total) => total.saturating_sub(self.buffered()),
            Err(FrameError::Truncated { needed, have }) => needed - have,
            Err(_) => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn gw(id: &str) -> GatewayId {
        GatewayId::parse(id).unwrap()
    }

    fn sample(name: &str, ts: i64, value: Value, quality: Quality) -> Sample {
        Sample {
            stream: StreamId::intern(name).unwrap(),
            ts_ns: ts,
            value,
            quality,
        }
    }

    fn all_kinds() -> Vec<(u64, Sample)> {
        vec![
            (
                10,
                sample(
                    "plant/a/temp",
                    1_700_000_000_000_000_000,
                    Value::F64(21.5),
                    Quality::Good,
                ),
            ),
            (
                11,
                sample(
                    "plant/a/count",
                    1_700_000_000_000_000_100,
                    Value::I64(-42),
                    Quality::Uncertain,
                ),
            ),
            (
                13,
                sample(
                    "plant/a/run",
                    1_699_999_999_000_000_000,
                    Value::Bool(true),
                    Quality::Bad,
                ),
            ),
            (
                14,
                sample(
                    "plant/a/run",
                    1_700_000_001_000_000_000,
                    Value::Bool(false),
                    Quality::Good,
                ),
            ),
            (
                15,
                sample(
                    "plant/a/state",
                    i64::MIN,
                    Value::text("éè running"),
                    Quality::Good,
                ),
            ),
            (
                16,
                sample(
                    "plant/a/temp",
                    i64::MAX,
                    Value::F64(f64::NEG_INFINITY),
                    Quality::Good,
                ),
            ),
            (
                12,
                sample("plant/a/count", 0, Value::I64(i64::MAX), Quality::Good),
            ),
            (
                17,
                sample("plant/a/count", -5, Value::I64(i64::MIN), Quality::Good),
            ),
            (
                18,
                sample(
                    "plant/a/state",
                    7,
                    Value::text(&"x".repeat(255)),
                    Quality::Good,
                ),
            ),
            (
                19,
                sample("plant/a/state", 8, Value::text(""), Quality::Good),
            ),
        ]
    }

    fn data(encoding: Encoding) -> DataFrame {
        let recs = all_kinds();
        DataFrame::from_samples(
            &gw("gw-01"),
            Priority::Normal,
            encoding,
            recs.iter().map(|(q, s)| (*q, s)),
        )
    }

    /// Wraps `body` in a valid envelope (header + correct CRC), to reach the body parser.
    fn envelope(version: u8, ty: u8, body: &[u8]) -> Vec<u8> {
        let mut f = MAGIC.to_vec();
        f.push(version);
        f.push(ty);
        f.extend_from_slice(&(body.len() as u32).to_le_bytes());
        f.extend_from_slice(body);
        let c = crc32c(&f);
        f.extend_from_slice(&c.to_le_bytes());
        f
    }

    /// Data body prefix up to (not including) the payload.
    fn data_prefix(encoding: u8, first: u64, last: u64) -> Vec<u8> {
        let mut b = vec![Priority::Normal as u8, encoding, 2, b'g', b'w'];
        b.extend_from_slice(&first.to_le_bytes());
        b.extend_from_slice(&last.to_le_bytes());
        b
    }

    /// Comparable form of a message: f64 values by their bits, so NaN payloads compare.
    fn key(m: &Message) -> String {
        match m {
            Message::Data(d) => {
                let mut d = d.clone();
                for s in &mut d.samples {
                    if let Value::F64(v) = s.value {
                        s.value = Value::Str(format!("f64:{:016x}", v.to_bits()).into());
                    }
                }
                format!("{d:?}")
            }
            other => format!("{other:?}"),
        }
    }

    /// A Data frame built by an independent implementation (a Python script written from
    /// `FRAME_FORMAT.md` alone, CRC from `crcmod`'s `crc-32c`): the document and
    /// the code agree.
    #[test]
    fn decodes_a_frame_built_from_the_document() {
        let hex = "4f5001025100000002000567772d303164000000000000006800000000000000020474656d700372\
                   756e0400008080d0e2c6bfce972f0000000000008035400102e807130004c701210d01029586d0\
                   e2c6bfce972f0402686942ef7ef8";
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let Message::Data(d) = decode(&bytes).unwrap() else {
            panic!("not data")
        };
        assert_eq!(d.gateway_id, "gw-01");
        assert_eq!((d.priority, d.encoding), (Priority::Normal, Encoding::Raw));
        assert_eq!((d.first_seq, d.last_seq), (100, 104));
        assert_eq!(d.streams, vec!["temp".to_string(), "run".to_string()]);
        let got: Vec<(u32, u64, i64, Quality, Value)> = d
            .samples
            .iter()
            .map(|s| (s.stream, s.seq, s.ts_ns, s.quality, s.value.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    0,
                    100,
                    1_700_000_000_000_000_000,
                    Quality::Good,
                    Value::F64(21.5)
                ),
                (
                    1,
                    101,
                    1_700_000_000_000_000_500,
                    Quality::Uncertain,
                    Value::Bool(true)
                ),
                (
                    0,
                    103,
                    1_700_000_000_000_000_400,
                    Quality::Bad,
                    Value::I64(-7)
                ),
                (1, 104, 5, Quality::Good, Value::text("hi")),
            ]
        );
        assert_eq!(encode(&Message::Data(d)).unwrap(), bytes);
    }

    #[test]
    fn crc32c_is_castagnoli() {
        // The standard check value of CRC-32C.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn data_round_trips_all_value_kinds_raw_and_zstd() {
        for enc in [Encoding::Raw, Encoding::Zstd] {
            let d = data(enc);
            assert_eq!(d.streams.len(), 4);
            assert_eq!((d.first_seq, d.last_seq), (10, 19));
            let bytes = encode(&Message::Data(d.clone())).unwrap();
            let back = decode(&bytes).unwrap();
            assert_eq!(back, Message::Data(d.clone()));
            let Message::Data(back) = back else {
                unreachable!()
            };
            let samples = back.to_samples().unwrap();
            let orig = all_kinds();
            assert_eq!(samples, orig);
            assert_eq!(back.stream_name(&back.samples[4]), "plant/a/state");
        }
    }

    #[test]
    fn delta_and_summary_frames_round_trip_exactly() {
        let d = delta_data();
        let bytes = encode(&Message::Data(d.clone())).unwrap();
        assert_eq!(bytes[HEADER_LEN + 1], Encoding::Delta as u8);
        let back = decode(&bytes).unwrap();
        assert_eq!(key(&back), key(&Message::Data(d.clone())));
        assert_eq!(encode(&back).unwrap(), bytes);
        let Message::Data(back) = back else {
            unreachable!()
        };
        // The hub gets the very samples the gateway chose to send.
        let mut want = all_kinds();
        want.sort_by_key(|(q, _)| *q);
        assert_eq!(back.to_samples().unwrap(), want);
        assert_eq!(Ack::for_frame(&back).count(), 10);

        let d = summary_data();
        let bytes = encode(&Message::Data(d.clone())).unwrap();
        let back = decode(&bytes).unwrap();
        assert_eq!(back, Message::Data(d.clone()));
        assert_eq!(encode(&back).unwrap(), bytes);
        // Only the raw sample is acknowledged; summarized sequences stay for backfill.
        let Message::Data(back) = back else {
            unreachable!()
        };
        assert_eq!(
            Ack::for_frame(&back).ranges,
            vec![SeqRange {
                first: 10,
                last: 10
            }]
        );

        // Summaries only travel in summary frames; delta needs increasing sequences.
        let mut bad = summary_data();
        bad.encoding = Encoding::Zstd;
        assert_eq!(
            encode(&Message::Data(bad)),
            Err(EncodeError::SummariesNeedSummaryEncoding)
        );
        let mut bad = summary_data();
        bad.summaries[0].summary.count = 0;
        assert!(matches!(
            encode(&Message::Data(bad)),
            Err(EncodeError::Summary(_))
        ));
        let mut bad = summary_data();
        bad.summaries[1].summary.last_seq = 31;
        assert!(matches!(
            encode(&Message::Data(bad)),
            Err(EncodeError::SeqOutOfRange { .. })
        ));
        // The widest sequence span: first 0, samples at the very top.
        let mut wide = delta_data();
        wide.first_seq = 0;
        wide.last_seq = u64::MAX;
        let n = wide.samples.len() as u64;
        for (i, smp) in wide.samples.iter_mut().enumerate() {
            smp.seq = u64::MAX - (n - 1 - i as u64);
        }
        let m = Message::Data(wide);
        assert_eq!(key(&decode(&encode(&m).unwrap()).unwrap()), key(&m));
        let mut bad = delta_data();
        bad.samples[3].seq = bad.samples[2].seq;
        assert!(matches!(
            encode(&Message::Data(bad)),
            Err(EncodeError::SeqOrder { index: 3, .. })
        ));
    }

    /// A realistic frame: 3 quantized streams polled together, deadband gaps in sequences.
    fn quantized_frame() -> DataFrame {
        let names = ["q/temp", "q/pressure", "q/count", "q/valve"];
        let mut samples = Vec::new();
        let mut seq = 1000u64;
        let scale = 10.0 / 4095.0;
        for k in 0..200i64 {
            let ts = 1_700_000_000_000_000_000 + k * 100_000_000 + (k * 7919 % 1000) * 1000;
            for (i, _) in names.iter().enumerate() {
                seq += 1;
                if (k + i as i64) % 3 == 0 {
                    continue; // skipped by a deadband
                }
                let value = match i {
                    0 => Value::F64((215 + k % 4) as f64 * 0.1),
                    1 => Value::F64((2048 + (k * 13 % 9) - 4) as f64 * scale),
                    2 => Value::I64(100_000 + k),
                    _ => Value::Bool(k % 50 < 25),
                };
                samples.push(FrameSample {
                    stream: i as u32,
                    seq,
                    ts_ns: ts,
                    quality: Quality::Good,
                    value,
                });
            }
        }
        DataFrame {
            gateway_id: gw("gw"),
            priority: Priority::Normal,
            encoding: Encoding::Delta,
            first_seq: 1000,
            last_seq: seq,
            streams: names.iter().map(|s| s.to_string()).collect(),
            samples,
            summaries: vec![],
        }
    }

    #[test]
    fn delta_finds_decimal_and_adc_scales_and_beats_zstd() {
        let d = quantized_frame();
        let delta = encode(&Message::Data(d.clone())).unwrap();
        assert_eq!(
            key(&decode(&delta).unwrap()),
            key(&Message::Data(d.clone()))
        );
        let mut z = d.clone();
        z.encoding = Encoding::Zstd;
        let zl = encode(&Message::Data(z)).unwrap().len();
        let sizes = delta::column_sizes(&d, DEFAULT_ZSTD_LEVEL).unwrap();
        let get = |n: &str| sizes.iter().find(|c| c.0 == n).unwrap().1;
        // Both float streams are scaled integers: no XOR bytes, all-zero corrections.
        assert_eq!(get("xors"), 0, "{sizes:?}");
        let corr = delta::column_sizes(&d, DEFAULT_ZSTD_LEVEL).unwrap();
        assert!(corr.iter().any(|c| c.0 == "corrections" && c.1 > 0));
        assert!(
            delta.len() * 2 < zl,
            "delta {} bytes vs zstd {zl} bytes: {sizes:?}",
            delta.len()
        );
    }

    #[test]
    fn zstd_shrinks_repetitive_frames() {
        let recs: Vec<(u64, Sample)> = (0..2000)
            .map(|i| {
                (
                    i,
                    sample(
                        "plant/b/temp",
                        1_000_000 * i as i64,
                        Value::F64(20.0 + (i % 7) as f64),
                        Quality::Good,
                    ),
                )
            })
            .collect();
        let raw = DataFrame::from_samples(
            &gw("gw"),
            Priority::Bulk,
            Encoding::Raw,
            recs.iter().map(|(q, s)| (*q, s)),
        );
        let mut z = raw.clone();
        z.encoding = Encoding::Zstd;
        let raw_len = encode(&Message::Data(raw)).unwrap().len();
        let zb = encode(&Message::Data(z.clone())).unwrap();
        assert!(zb.len() * 4 < raw_len, "zstd {} vs raw {raw_len}", zb.len());
        assert_eq!(decode(&zb).unwrap(), Message::Data(z));
    }

    #[test]
    fn empty_frames_round_trip() {
        for enc in [Encoding::Raw, Encoding::Zstd] {
            let d = DataFrame::from_samples(&gw("gw"), Priority::Control, enc, []);
            assert_eq!((d.first_seq, d.last_seq), (0, 0));
            let bytes = encode(&Message::Data(d.clone())).unwrap();
            assert_eq!(decode(&bytes).unwrap(), Message::Data(d));
        }
        let a = Ack::from_seqs(&gw("gw"), []);
        assert_eq!(
            decode(&encode(&Message::Ack(a.clone())).unwrap()).unwrap(),
            Message::Ack(a)
        );
        let h = Hello {
            gateway_id: gw("gw"),
            max_version: 1,
        };
        assert_eq!(
            decode(&encode(&Message::Hello(h.clone())).unwrap()).unwrap(),
            Message::Hello(h)
        );
    }

    #[test]
    fn ack_merges_sequences_into_ranges() {
        let a = Ack::from_seqs(&gw("gw"), [5, 3, 4, 9, 10, 3, u64::MAX, 0]);
        assert_eq!(
            a.ranges,
            vec![
                SeqRange { first: 0, last: 0 },
                SeqRange { first: 3, last: 5 },
                SeqRange { first: 9, last: 10 },
                SeqRange {
                    first: u64::MAX,
                    last: u64::MAX
                },
            ]
        );
        assert!(a.contains(4) && a.contains(u64::MAX) && !a.contains(6) && !a.contains(11));
        assert_eq!(a.count(), 7);
        let back = decode(&encode(&Message::Ack(a.clone())).unwrap()).unwrap();
        assert_eq!(back, Message::Ack(a));
        let whole = Ack {
            gateway_id: gw("gw"),
            ranges: vec![SeqRange {
                first: 0,
                last: u64::MAX,
            }],
        };
        assert_eq!(whole.count(), 1u128 << 64);
        assert_eq!(
            decode(&encode(&Message::Ack(whole.clone())).unwrap()).unwrap(),
            Message::Ack(whole)
        );
        let f = data(Encoding::Raw);
        let fa = Ack::for_frame(&f);
        assert_eq!(
            fa.ranges,
            vec![SeqRange {
                first: 10,
                last: 19
            }]
        );
    }

    #[test]
    fn encoder_refuses_what_the_decoder_would_reject() {
        let bad_ack = Ack {
            gateway_id: gw("gw"),
            ranges: vec![
                SeqRange { first: 5, last: 9 },
                SeqRange { first: 9, last: 12 },
            ],
        };
        assert_eq!(encode(&Message::Ack(bad_ack)), Err(EncodeError::AckRanges));
        let after_max = Ack {
            gateway_id: gw("gw"),
            ranges: vec![
                SeqRange {
                    first: 0,
                    last: u64::MAX,
                },
                SeqRange { first: 1, last: 1 },
            ],
        };
        assert_eq!(
            encode(&Message::Ack(after_max)),
            Err(EncodeError::AckRanges)
        );
        let mut d = data(Encoding::Raw);
        d.encoding = Encoding::Delta;
        assert_eq!(
            encode(&Message::Data(d)),
            Err(EncodeError::SeqOrder { index: 6, seq: 12 })
        );
        let mut d = data(Encoding::Raw);
        d.samples[0].seq = 9;
        assert!(matches!(
            encode(&Message::Data(d)),
            Err(EncodeError::SeqOutOfRange { seq: 9, .. })
        ));
        let mut d = data(Encoding::Raw);
        d.samples[0].stream = 4;
        assert!(matches!(
            encode(&Message::Data(d)),
            Err(EncodeError::StreamIndex { .. })
        ));
        let mut d = data(Encoding::Raw);
        d.streams[1] = d.streams[0].clone();
        assert!(matches!(
            encode(&Message::Data(d)),
            Err(EncodeError::StreamName { .. })
        ));
        let mut d = data(Encoding::Raw);
        d.streams[1] = "a\u{7}b".into();
        assert!(matches!(
            encode(&Message::Data(d)),
            Err(EncodeError::StreamName { .. })
        ));
        let mut d = data(Encoding::Raw);
        d.samples[0].value = Value::Str("y".repeat(256).into());
        assert_eq!(
            encode(&Message::Data(d)),
            Err(EncodeError::StringTooLong(256))
        );
    }

    #[test]
    fn max_sizes_round_trip_and_one_more_is_refused() {
        // The most samples, each as small as possible.
        let mut d = DataFrame {
            gateway_id: gw(&"g".repeat(MAX_GATEWAY_ID_LEN)),
            priority: Priority::Bulk,
            encoding: Encoding::Raw,
            first_seq: u64::MAX - MAX_SAMPLES_PER_FRAME as u64,
            last_seq: u64::MAX,
            streams: vec!["s".into()],
            samples: (0..MAX_SAMPLES_PER_FRAME as u64)
                .map(|i| FrameSample {
                    stream: 0,
                    seq: u64::MAX - i,
                    ts_ns: i as i64,
                    quality: Quality::Good,
                    value: Value::Bool(i % 2 == 0),
                })
                .collect(),
            summaries: vec![],
        };
        for enc in [Encoding::Raw, Encoding::Zstd] {
            d.encoding = enc;
            let b = encode(&Message::Data(d.clone())).unwrap();
            assert_eq!(decode(&b).unwrap(), Message::Data(d.clone()));
        }
        d.samples.push(d.samples[0].clone());
        assert!(matches!(
            encode(&Message::Data(d)),
            Err(EncodeError::LimitExceeded {
                what: "samples per frame",
                ..
            })
        ));

        // The most streams, with the longest names.
        let mut d = DataFrame {
            gateway_id: gw("gw"),
            priority: Priority::Normal,
            encoding: Encoding::Raw,
            first_seq: 0,
            last_seq: 0,
            streams: (0..MAX_STREAMS_PER_FRAME)
                .map(|i| format!("{i:0>250}"))
                .collect(),
            samples: vec![],
            summaries: vec![],
        };
        let b = encode(&Message::Data(d.clone())).unwrap();
        assert!(b.len() > MAX_STREAMS_PER_FRAME * 251);
        assert_eq!(decode(&b).unwrap(), Message::Data(d.clone()));
        d.streams.push("one-more".into());
        assert!(matches!(
            encode(&Message::Data(d)),
            Err(EncodeError::LimitExceeded {
                what: "streams per frame",
                ..
            })
        ));

        // The most ack ranges.
        let mut a = Ack {
            gateway_id: gw("gw"),
            ranges: (0..MAX_ACK_RANGES as u64)
                .map(|i| SeqRange {
                    first: 3 * i,
                    last: 3 * i + 1,
                })
                .collect(),
        };
        assert_eq!(
            decode(&encode(&Message::Ack(a.clone())).unwrap()).unwrap(),
            Message::Ack(a.clone())
        );
        a.ranges.push(SeqRange {
            first: u64::MAX,
            last: u64::MAX,
        });
        assert!(matches!(
            encode(&Message::Ack(a)),
            Err(EncodeError::LimitExceeded { .. })
        ));

        // A block over MAX_BLOCK_LEN: long strings.
        let s = Value::text(&"z".repeat(255));
        let d = DataFrame {
            gateway_id: gw("gw"),
            priority: Priority::Normal,
            encoding: Encoding::Zstd,
            first_seq: 0,
            last_seq: 0,
            streams: vec!["s".into()],
            samples: (0..5000)
                .map(|_| FrameSample {
                    stream: 0,
                    seq: 0,
                    ts_ns: 0,
                    quality: Quality::Good,
                    value: s.clone(),
                })
                .collect(),
            summaries: vec![],
        };
        assert!(matches!(
            encode(&Message::Data(d)),
            Err(EncodeError::TooLong {
                what: "sample block",
                ..
            })
        ));
    }

    /// The all-kinds frame in sequence order, delta-encoded.
    fn delta_data() -> DataFrame {
        let mut d = data(Encoding::Delta);
        d.samples.sort_by_key(|s| s.seq);
        d
    }

    /// A summary frame: two windows and one raw (pass-through) sample.
    fn summary_data() -> DataFrame {
        use crate::encoding::summary::{NumericStats, WindowSummary};
        let w = |start: i64, last: Value, numeric| WindowSummary {
            window_start_ns: start,
            window_ns: 10_000_000_000,
            first_ts_ns: start + 5,
            last_ts_ns: start + 9_999_999_999,
            first_seq: 20,
            last_seq: 29,
            count: 10,
            last,
            last_quality: Quality::Uncertain,
            numeric,
        };
        let mut d = data(Encoding::Summary);
        d.samples.truncate(1);
        d.first_seq = 10;
        d.last_seq = 30;
        d.summaries = vec![
            FrameSummary {
                stream: 0,
                summary: w(
                    1_700_000_000_000_000_000,
                    Value::F64(21.5),
                    Some(NumericStats {
                        n: 9,
                        min: -0.0,
                        max: f64::INFINITY,
                        mean: 21.25,
                        stddev: 0.5,
                    }),
                ),
            },
            FrameSummary {
                stream: 3,
                summary: w(-10_000_000_000, Value::text("stopped"), None),
            },
        ];
        d
    }

    fn sample_frames() -> Vec<Vec<u8>> {
        vec![
            encode(&Message::Data(data(Encoding::Raw))).unwrap(),
            encode(&Message::Data(data(Encoding::Zstd))).unwrap(),
            encode(&Message::Data(delta_data())).unwrap(),
            encode(&Message::Data(summary_data())).unwrap(),
            encode(&Message::Ack(Ack::from_seqs(
                &gw("gw-01"),
                [1, 2, 3, 7, 1000],
            )))
            .unwrap(),
            encode(&Message::Hello(Hello {
                gateway_id: gw("gw-01"),
                max_version: 1,
            }))
            .unwrap(),
            encode(&Message::Ping(Ping {
                nonce: 7,
                sent_ns: 1_700_000_000_000_000_000,
                pad: 0,
            }))
            .unwrap(),
            encode(&Message::Ping(Ping {
                nonce: u64::MAX,
                sent_ns: 0,
                pad: 100,
            }))
            .unwrap(),
            encode(&Message::Pong(Pong {
                nonce: 7,
                sent_ns: 1_700_000_000_000_000_000,
            }))
            .unwrap(),
        ]
    }

    #[test]
    fn ping_and_pong_round_trip_and_match_the_documented_layout() {
        for (nonce, sent_ns, pad) in [
            (0, 0, 0),
            (1, 2, 1),
            (u64::MAX, u64::MAX, 4096),
            (42, 1_700_000_000_123_456_789, MAX_PING_PAD),
        ] {
            let p = Ping {
                nonce,
                sent_ns,
                pad,
            };
            let bytes = encode(&Message::Ping(p)).unwrap();
            assert_eq!(bytes.len(), p.frame_len());
            assert_eq!(bytes[3], MessageType::Ping as u8);
            assert_eq!(decode(&bytes).unwrap(), Message::Ping(p));
            let pong = p.pong();
            assert_eq!((pong.nonce, pong.sent_ns), (nonce, sent_ns));
            let pb = encode(&Message::Pong(pong)).unwrap();
            // The answer is never padded.
            assert_eq!(pb.len(), HEADER_LEN + PONG_BODY_LEN + TRAILER_LEN);
            assert_eq!(decode(&pb).unwrap(), Message::Pong(pong));
        }
        // The body byte for byte, as FRAME_FORMAT.md describes it.
        let p = Ping {
            nonce: 0x0102_0304_0506_0708,
            sent_ns: 0x1122_3344_5566_7788,
            pad: 3,
        };
        let mut body = vec![8, 7, 6, 5, 4, 3, 2, 1];
        body.extend_from_slice(&[0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]);
        body.extend_from_slice(&[3, 0, 0, 0, 0, 0, 0]);
        assert_eq!(encode(&Message::Ping(p)).unwrap(), envelope(1, 4, &body));
        assert_eq!(
            encode(&Message::Pong(p.pong())).unwrap(),
            envelope(1, 5, &body[..16])
        );
    }

    #[test]
    fn malformed_pings_and_pongs_are_clear_errors() {
        let body = |pad_len: u32, pad: &[u8]| {
            let mut b = 9u64.to_le_bytes().to_vec();
            b.extend_from_slice(&5u64.to_le_bytes());
            b.extend_from_slice(&pad_len.to_le_bytes());
            b.extend_from_slice(pad);
            b
        };
        assert!(decode(&envelope(1, 4, &body(2, &[0, 0]))).is_ok());
        // Padding over the limit: refused from the length alone, on both sides.
        let e = decode(&envelope(1, 4, &body(MAX_PING_PAD + 1, &[]))).unwrap_err();
        assert!(
            matches!(
                e,
                FrameError::LimitExceeded {
                    what: "ping padding",
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(matches!(
            decode(&envelope(1, 4, &body(u32::MAX, &[]))),
            Err(FrameError::LimitExceeded { .. })
        ));
        assert!(matches!(
            encode(&Message::Ping(Ping {
                nonce: 0,
                sent_ns: 0,
                pad: MAX_PING_PAD + 1,
            })),
            Err(EncodeError::LimitExceeded {
                what: "ping padding",
                ..
            })
        ));
        // Padding that is not zeros, shorter or longer than declared.
        assert_eq!(
            decode(&envelope(1, 4, &body(2, &[0, 1]))),
            Err(FrameError::Malformed {
                field: "ping padding",
                reason: "not all zero"
            })
        );
        assert_eq!(
            decode(&envelope(1, 4, &body(3, &[0, 0]))),
            Err(FrameError::Malformed {
                field: "ping padding",
                reason: "ends early"
            })
        );
        assert_eq!(
            decode(&envelope(1, 4, &body(1, &[0, 0]))),
            Err(FrameError::Malformed {
                field: "ping body",
                reason: "trailing bytes"
            })
        );
        // Short bodies, a padded Pong.
        let full = body(0, &[]);
        for cut in 0..full.len() {
            assert!(decode(&envelope(1, 4, &full[..cut])).is_err(), "{cut}");
        }
        assert!(decode(&envelope(1, 5, &full[..16])).is_ok());
        for cut in 0..16 {
            assert!(decode(&envelope(1, 5, &full[..cut])).is_err(), "{cut}");
        }
        assert_eq!(
            decode(&envelope(1, 5, &full)),
            Err(FrameError::Malformed {
                field: "pong body",
                reason: "trailing bytes"
            })
        );
        // The next unassigned type is still a clear error, as 4 and 5 were for older builds.
        let e = decode(&envelope(1, 6, &full)).unwrap_err();
        assert_eq!(e, FrameError::UnknownMessageType(6));
        assert_eq!(e.label(), "message_type");
        assert!(e.to_string().contains("unknown message type 6"));
    }

    /// The committed fuzz seeds for Ping and Pong are frames this build decodes (and, being
    /// canonical, re-encodes to the same bytes).
    #[test]
    fn ping_and_pong_fuzz_seeds_decode() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/frame_decode");
        let mut kinds = Vec::new();
        for name in ["seed-ping", "seed-ping-pad", "seed-pong"] {
            let bytes = std::fs::read(dir.join(name)).unwrap();
            let m = decode(&bytes).unwrap();
            assert_eq!(encode(&m).unwrap(), bytes, "{name}");
            kinds.push(m.message_type());
        }
        assert_eq!(
            kinds,
            vec![MessageType::Ping, MessageType::Ping, MessageType::Pong]
        );
    }

    #[test]
    fn every_truncation_is_an_error_and_incomplete() {
        for f in sample_frames() {
            for cut in 0..f.len() {
                let part = &f[..cut];
                assert!(decode(part).is_err(), "prefix of {cut} bytes decoded");
                match next_frame(part).unwrap() {
                    Next::Incomplete(n) => {
                        let want = if cut < HEADER_LEN {
                            HEADER_LEN - cut
                        } else {
                            f.len() - cut
                        };
                        assert_eq!(n, want);
                    }
                    other => panic!("prefix of {cut} gave {other:?}"),
                }
            }
            assert!(decode(&f).is_ok());
        }
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        for f in sample_frames() {
            for i in 0..f.len() {
                for bit in 0..8 {
                    let mut g = f.clone();
                    g[i] ^= 1 << bit;
                    assert!(
                        decode(&g).is_err(),
                        "flip of byte {i} bit {bit} went unnoticed"
                    );
                }
            }
        }
    }

    #[test]
    fn corrupted_checksum_is_reported_as_such() {
        let mut f = sample_frames().remove(0);
        let n = f.len();
        f[n - 1] ^= 0xFF;
        assert!(matches!(decode(&f), Err(FrameError::Checksum { .. })));
        let mut f = sample_frames().remove(0);
        f[HEADER_LEN + 4] ^= 0x01;
        let e = decode(&f).unwrap_err();
        assert!(matches!(e, FrameError::Checksum { .. }));
        assert_eq!(e.label(), "checksum");
    }

    #[test]
    fn wrong_magic_version_type_and_trailing_bytes() {
        let f = sample_frames().remove(3);
        let mut g = f.clone();
        g[2] = 2;
        assert_eq!(decode(&g), Err(FrameError::UnsupportedVersion(2)));
        assert_eq!(next_frame(&g), Err(FrameError::UnsupportedVersion(2)));
        let mut g = f.clone();
        g[0] = b'{';
        assert!(matches!(decode(&g), Err(FrameError::BadMagic(_))));
        // Garbage is rejected from the first byte, without waiting for a header.
        assert!(matches!(next_frame(b"{"), Err(FrameError::BadMagic(_))));
        assert!(matches!(next_frame(b"Ox"), Err(FrameError::BadMagic(_))));
        assert_eq!(
            decode(&envelope(1, 9, b"")),
            Err(FrameError::UnknownMessageType(9))
        );
        let mut g = f.clone();
        g.push(0);
        assert_eq!(decode(&g), Err(FrameError::TrailingBytes(1)));
        assert_eq!(
            decode(&[]),
            Err(FrameError::Truncated {
                needed: HEADER_LEN,
                have: 0
            })
        );
    }

    #[test]
    fn oversized_length_is_refused_from_the_header_alone() {
        let mut h = MAGIC.to_vec();
        h.extend_from_slice(&[VERSION, 2]);
        h.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            frame_len(&h),
            Err(FrameError::TooLong(u64::from(u32::MAX) + 12))
        );
        assert!(matches!(next_frame(&h), Err(FrameError::TooLong(_))));
        let mut fb = FrameBuffer::new();
        fb.push(&h).unwrap();
        assert!(matches!(fb.next_message(), Err(FrameError::TooLong(_))));
        // Exactly the maximum is accepted as a length.
        let body = (MAX_FRAME_LEN - 12) as u32;
        h[4..8].copy_from_slice(&body.to_le_bytes());
        assert_eq!(frame_len(&h), Ok(MAX_FRAME_LEN));
        h[4..8].copy_from_slice(&(body + 1).to_le_bytes());
        assert!(frame_len(&h).is_err());
    }

    #[test]
    fn unknown_encodings_are_clear_errors() {
        let mut b = data_prefix(4, 0, 0);
        b.extend_from_slice(&[0, 0]);
        assert_eq!(
            decode(&envelope(1, 2, &b)),
            Err(FrameError::UnknownEncoding(4))
        );
        // Delta and summary payloads start with the zstd block length, like zstd.
        for code in [2, 3] {
            let mut b = data_prefix(code, 0, 0);
            b.extend_from_slice(&[0, 0]);
            assert!(matches!(
                decode(&envelope(1, 2, &b)),
                Err(FrameError::Malformed {
                    field: "zstd block length",
                    ..
                })
            ));
        }
        assert!(
            FrameError::UnsupportedEncoding(Encoding::Delta)
                .to_string()
                .contains("delta")
        );
        let mut b = data_prefix(0, 0, 0);
        b[0] = 4;
        assert_eq!(
            decode(&envelope(1, 2, &b)),
            Err(FrameError::UnknownPriority(4))
        );
    }

    #[test]
    fn hostile_counts_and_fields_are_rejected_before_allocating() {
        // Claims the maximum number of samples with nothing behind it.
        let mut b = data_prefix(0, 0, 0);
        b.extend_from_slice(&[0]); // no streams
        put_varint(&mut b, MAX_SAMPLES_PER_FRAME as u64);
        assert!(matches!(
            decode(&envelope(1, 2, &b)),
            Err(FrameError::Malformed {
                reason: "ends early",
                ..
            })
        ));
        let mut b = data_prefix(0, 0, 0);
        b.extend_from_slice(&[0]);
        put_varint(&mut b, MAX_SAMPLES_PER_FRAME as u64 + 1);
        assert!(matches!(
            decode(&envelope(1, 2, &b)),
            Err(FrameError::LimitExceeded { .. })
        ));
        let mut b = data_prefix(0, 0, 0);
        put_varint(&mut b, u64::MAX);
        assert!(matches!(
            decode(&envelope(1, 2, &b)),
            Err(FrameError::LimitExceeded { .. })
        ));
        // Non-minimal and overflowing varints.
        let mut b = data_prefix(0, 0, 0);
        b.extend_from_slice(&[0x80, 0x00, 0]);
        assert!(matches!(
            decode(&envelope(1, 2, &b)),
            Err(FrameError::Malformed {
                reason: "varint is not minimally encoded",
                ..
            })
        ));
        let mut b = data_prefix(0, 0, 0);
        b.extend_from_slice(&[0xFF; 9]);
        b.push(0x02);
        assert!(matches!(
            decode(&envelope(1, 2, &b)),
            Err(FrameError::Malformed {
                reason: "varint overflows 64 bits",
                ..
            })
        ));
        // Inverted sequence bounds; a sample outside them.
        assert!(
            decode(&envelope(1, 2, &{
                let mut b = data_prefix(0, 5, 4);
                b.extend_from_slice(&[0, 0]);
                b
            }))
            .is_err()
        );
        let mut b = data_prefix(0, 5, 6);
        b.extend_from_slice(&[1, 1, b's', 1, 0, 4, 0, 0x03]); // 1 stream, 1 sample, seq 5+2=7
        assert!(matches!(
            decode(&envelope(1, 2, &b)),
            Err(FrameError::Malformed {
                field: "sample sequence",
                ..
            })
        ));
        let n = b.len();
        b[n - 3] = 2; // seq 6: fine
        assert!(decode(&envelope(1, 2, &b)).is_ok());
        let n = b.len();
        b[n - 1] = 0x43; // reserved tag bit
        assert!(matches!(
            decode(&envelope(1, 2, &b)),
            Err(FrameError::Malformed {
                reason: "reserved bits set",
                ..
            })
        ));
        b[n - 1] = 0x33; // quality 3
        assert!(matches!(
            decode(&envelope(1, 2, &b)),
            Err(FrameError::Malformed {
                field: "sample quality",
                ..
            })
        ));
        b[n - 1] = 0x05; // value kind 5
        assert!(matches!(
            decode(&envelope(1, 2, &b)),
            Err(FrameError::Malformed {
                reason: "unknown value kind",
                ..
            })
        ));
        // Invalid UTF-8 and a control character in a stream name; a bad gateway id.
        let mut b = data_prefix(0, 0, 0);
        b.extend_from_slice(&[1, 2, 0xC3, 0x28, 0]);
        assert!(matches!(
            decode(&envelope(1, 2, &b)),
            Err(FrameError::Malformed {
                reason: "not valid UTF-8",
                ..
            })
        ));
        let mut b = data_prefix(0, 0, 0);
        b.extend_from_slice(&[1, 2, b'a', b'\n', 0]);
        assert!(matches!(
            decode(&envelope(1, 2, &b)),
            Err(FrameError::Malformed {
                field: "stream name",
                ..
            })
        ));
        // A Hello naming an id outside the gateway id rule.
        for id in ["_gw", "../etc", "gw/1", "-gw", ".", "gw+"] {
            let mut b = vec![id.len() as u8];
            b.extend_from_slice(id.as_bytes());
            b.push(1);
            assert!(
                matches!(
                    decode(&envelope(1, 1, &b)),
                    Err(FrameError::Malformed {
                        field: "gateway id",
                        ..
                    })
                ),
                "{id:?}"
            );
        }
        let mut b = data_prefix(0, 0, 0);
        b[3] = b'.';
        b.extend_from_slice(&[0, 0]);
        assert!(matches!(
            decode(&envelope(1, 2, &b)),
            Err(FrameError::Malformed {
                field: "gateway id",
                ..
            })
        ));
        // Ack ranges running past u64::MAX.
        let mut b = vec![2, b'g', b'w', 2];
        put_varint(&mut b, u64::MAX);
        b.push(0);
        b.extend_from_slice(&[0, 0]);
        assert!(matches!(
            decode(&envelope(1, 3, &b)),
            Err(FrameError::Malformed {
                field: "ack range",
                ..
            })
        ));
    }

    #[test]
    fn zstd_payload_is_bounded_by_its_declared_size() {
        // A block that decompresses to more than declared, and one to less.
        let mut block = vec![0u8]; // no streams
        put_varint(&mut block, 0);
        let big = zstd::bulk::compress(&vec![0u8; MAX_BLOCK_LEN + 1], 3).unwrap();
        let mut b = data_prefix(1, 0, 0);
        b.extend_from_slice(&(MAX_BLOCK_LEN as u32).to_le_bytes());
        b.extend_from_slice(&big);
        assert!(matches!(
            decode(&envelope(1, 2, &b)),
            Err(FrameError::Decompress(_))
        ));
        let mut b = data_prefix(1, 0, 0);
        b.extend_from_slice(&((MAX_BLOCK_LEN + 1) as u32).to_le_bytes());
        b.extend_from_slice(&big);
        assert!(matches!(
            decode(&envelope(1, 2, &b)),
            Err(FrameError::LimitExceeded { .. })
        ));
        let small = zstd::bulk::compress(&block, 3).unwrap();
        let mut b = data_prefix(1, 0, 0);
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&small);
        assert!(matches!(
            decode(&envelope(1, 2, &b)),
            Err(FrameError::Decompress(_))
        ));
        let mut b = data_prefix(1, 0, 0);
        b.extend_from_slice(&2u32.to_le_bytes());
        b.extend_from_slice(&small);
        assert!(decode(&envelope(1, 2, &b)).is_ok());
        // Not zstd at all.
        let mut b = data_prefix(1, 0, 0);
        b.extend_from_slice(&2u32.to_le_bytes());
        b.extend_from_slice(b"plain");
        assert!(matches!(
            decode(&envelope(1, 2, &b)),
            Err(FrameError::Decompress(_))
        ));
    }

    #[test]
    fn frame_buffer_reassembles_a_byte_stream() {
        let frames = sample_frames();
        let stream: Vec<u8> = frames.concat();
        for chunk in [1, 3, 7, 64, stream.len()] {
            let mut fb = FrameBuffer::new();
            let mut got = Vec::new();
            for c in stream.chunks(chunk) {
                fb.push(c).unwrap();
                while let Some(m) = fb.next_message().unwrap() {
                    got.push(m);
                }
            }
            assert_eq!(fb.buffered(), 0);
            assert_eq!(fb.needed(), HEADER_LEN);
            let want: Vec<Message> = frames.iter().map(|f| decode(f).unwrap()).collect();
            assert_eq!(got, want, "chunk size {chunk}");
        }
        // next_frame reports how much of the buffer a frame used.
        match next_frame(&stream).unwrap() {
            Next::Frame { consumed, .. } => assert_eq!(consumed, frames[0].len()),
            other => panic!("{other:?}"),
        }
        let mut fb = FrameBuffer::new();
        fb.push(&frames[0][..10]).unwrap();
        assert_eq!(fb.needed(), frames[0].len() - 10);
        assert!(fb.push(&vec![0; MAX_BUFFERED]).is_err());
    }

    fn arb_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<f64>().prop_map(Value::F64),
            any::<i64>().prop_map(Value::I64),
            any::<bool>().prop_map(Value::Bool),
            ".{0,80}".prop_map(|s| Value::text(&s)),
        ]
    }

    fn arb_data() -> impl Strategy<Value = DataFrame> {
        (
            proptest::collection::hash_set("[a-z/_]{1,12}", 1..6),
            any::<u64>(),
            0u64..1000,
            proptest::collection::vec(
                (any::<u32>(), 0u64..1000, any::<i64>(), 0u8..3, arb_value()),
                0..60,
            ),
            0u8..4,
            any::<bool>(),
        )
            .prop_map(|(names, first, span, raw, prio, z)| {
                let first = first.min(u64::MAX - span);
                let streams: Vec<String> = names.into_iter().collect();
                let samples = raw
                    .into_iter()
                    .map(|(st, off, ts, q, value)| FrameSample {
                        stream: st % streams.len() as u32,
                        seq: first + off.min(span),
                        ts_ns: ts,
                        quality: Quality::from_u8(q).unwrap(),
                        value,
                    })
                    .collect();
                DataFrame {
                    gateway_id: gw("gw-prop"),
                    priority: Priority::from_u8(prio).unwrap(),
                    encoding: if z { Encoding::Zstd } else { Encoding::Raw },
                    first_seq: first,
                    last_seq: first + span,
                    streams,
                    samples,
                    summaries: vec![],
                }
            })
    }

    fn arb_delta_f64() -> impl Strategy<Value = f64> {
        prop_oneof![
            any::<f64>(),
            Just(f64::NAN),
            Just(-f64::NAN),
            Just(f64::from_bits(0x7ff0_0000_dead_beef)),
            Just(-0.0),
            Just(0.0),
            Just(f64::INFINITY),
            Just(f64::NEG_INFINITY),
            Just(f64::MIN_POSITIVE / 4.0),
            (-5000i64..5000).prop_map(|n| n as f64 * 0.1),
            (0i64..4096).prop_map(|n| n as f64 * (10.0 / 4095.0)),
            (-100i64..100).prop_map(|n| n as f64 / 100.0),
        ]
    }

    fn arb_delta_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            3 => arb_delta_f64().prop_map(Value::F64),
            1 => prop_oneof![any::<i64>(), Just(i64::MIN), Just(i64::MAX), -3i64..3]
                .prop_map(Value::I64),
            1 => any::<bool>().prop_map(Value::Bool),
            1 => ".{0,40}".prop_map(|s| Value::text(&s)),
        ]
    }

    /// Random series for delta frames: strictly increasing sequences with random gaps,
    /// timestamps that repeat, step, jump backwards and hit the extremes.
    fn arb_delta() -> impl Strategy<Value = DataFrame> {
        (
            proptest::collection::hash_set("[a-z/_]{1,12}", 1..8),
            any::<u64>(),
            proptest::collection::vec(
                (
                    any::<u32>(),
                    prop_oneof![
                        4 => Just(1u64),
                        4 => 1u64..5,
                        2 => 1u64..100_000,
                        1 => 1u64 << 40..1u64 << 63,
                        1 => Just(u64::MAX),
                    ],
                    prop_oneof![
                        Just(0i64),
                        Just(100_000_000i64),
                        -1_000_000_000i64..1_000_000_000,
                        any::<i64>(),
                        Just(i64::MIN),
                        Just(i64::MAX)
                    ],
                    0u8..3,
                    arb_delta_value(),
                ),
                0..120,
            ),
            0u8..4,
        )
            .prop_map(|(names, first, raw, prio)| {
                let streams: Vec<String> = names.into_iter().collect();
                let total = raw.iter().fold(0u64, |a, r| a.saturating_add(r.1));
                let first = first.min(u64::MAX - total.min(u64::MAX / 2));
                let mut seq = first;
                let mut ts = 1_700_000_000_000_000_000i64;
                let samples = raw
                    .into_iter()
                    .enumerate()
                    .map_while(|(i, (st, gap, dts, q, value))| {
                        if i > 0 {
                            seq = seq.checked_add(gap)?;
                        }
                        ts = if dts == i64::MIN || dts == i64::MAX {
                            dts
                        } else {
                            ts.wrapping_add(dts)
                        };
                        Some(FrameSample {
                            stream: st % streams.len() as u32,
                            seq,
                            ts_ns: ts,
                            quality: Quality::from_u8(q).unwrap(),
                            value,
                        })
                    })
                    .collect();
                DataFrame {
                    gateway_id: gw("gw-prop"),
                    priority: Priority::from_u8(prio).unwrap(),
                    encoding: Encoding::Delta,
                    first_seq: first,
                    last_seq: seq.max(first),
                    streams,
                    samples,
                    summaries: vec![],
                }
            })
    }

    fn arb_summary() -> impl Strategy<Value = DataFrame> {
        use crate::encoding::summary::{NumericStats, WindowSummary};
        (
            arb_data(),
            proptest::collection::vec(
                (
                    any::<u32>(),
                    any::<i64>(),
                    1u64..u64::MAX,
                    any::<i64>(),
                    any::<u32>(),
                    (any::<u64>(), any::<u64>()),
                    1u64..1_000_000,
                    (0u8..3, arb_delta_value()),
                    proptest::option::of((
                        any::<u64>(),
                        arb_delta_f64(),
                        arb_delta_f64(),
                        arb_delta_f64(),
                        arb_delta_f64(),
                    )),
                ),
                0..20,
            ),
        )
            .prop_map(|(mut d, raw)| {
                d.encoding = Encoding::Summary;
                let span = d.last_seq - d.first_seq;
                d.summaries = raw
                    .into_iter()
                    .map(
                        |(st, start, wn, first_ts, dur, (a, b), count, (q, last), num)| {
                            let lo = d.first_seq + a % (span + 1);
                            let hi = lo + b % (d.last_seq - lo + 1);
                            FrameSummary {
                                stream: st % d.streams.len() as u32,
                                summary: WindowSummary {
                                    window_start_ns: start,
                                    window_ns: wn,
                                    first_ts_ns: first_ts,
                                    last_ts_ns: first_ts.saturating_add(i64::from(dur)),
                                    first_seq: lo,
                                    last_seq: hi,
                                    count,
                                    last,
                                    last_quality: Quality::from_u8(q).unwrap(),
                                    numeric: num.map(|(n, min, max, mean, stddev)| NumericStats {
                                        n: 1 + n % count,
                                        min,
                                        max,
                                        mean,
                                        stddev,
                                    }),
                                },
                            }
                        },
                    )
                    .collect();
                d
            })
    }

    /// Wraps a (decompressed) block as a zstd-style payload of `encoding`.
    fn compressed_frame(encoding: u8, first: u64, last: u64, block: &[u8]) -> Vec<u8> {
        let mut b = data_prefix(encoding, first, last);
        b.extend_from_slice(&(block.len() as u32).to_le_bytes());
        b.extend_from_slice(&zstd::bulk::compress(block, 1).unwrap());
        envelope(1, 2, &b)
    }

    proptest! {
        #[test]
        fn delta_encode_decode_is_identity(d in arb_delta()) {
            let m = Message::Data(d);
            let bytes = encode(&m).unwrap();
            let back = decode(&bytes).unwrap();
            prop_assert_eq!(key(&back), key(&m));
            prop_assert_eq!(encode(&back).unwrap(), bytes);
        }

        #[test]
        fn summary_encode_decode_is_identity(d in arb_summary()) {
            let m = Message::Data(d);
            let bytes = encode(&m).unwrap();
            let back = decode(&bytes).unwrap();
            prop_assert_eq!(format!("{back:?}"), format!("{m:?}"));
            prop_assert_eq!(encode(&back).unwrap(), bytes);
        }

        #[test]
        fn random_and_mutated_delta_and_summary_blocks_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..512),
            d in arb_delta(),
            edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
        ) {
            // Random blocks, correctly compressed, reach the block parsers.
            for enc in [2u8, 3] {
                let _ = decode(&compressed_frame(enc, 0, u64::MAX, &bytes));
            }
            // A valid delta block with a few bytes changed.
            let mut block = Vec::new();
            delta::encode_block(&mut block, &d).unwrap();
            for (i, v) in edits {
                if !block.is_empty() {
                    let n = block.len();
                    block[i % n] = v;
                }
            }
            let _ = decode(&compressed_frame(2, d.first_seq, d.last_seq, &block));
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes);
            let _ = next_frame(&bytes);
            // Random bodies behind a valid envelope reach the body parsers.
            for ty in 1..=5 {
                let _ = decode(&envelope(1, ty, &bytes));
            }
        }

        #[test]
        fn pings_round_trip(nonce in any::<u64>(), sent_ns in any::<u64>(), pad in 0u32..2048) {
            let p = Ping { nonce, sent_ns, pad };
            let bytes = encode(&Message::Ping(p)).unwrap();
            prop_assert_eq!(decode(&bytes).unwrap(), Message::Ping(p));
            let q = encode(&Message::Pong(p.pong())).unwrap();
            prop_assert_eq!(decode(&q).unwrap(), Message::Pong(Pong { nonce, sent_ns }));
        }

        #[test]
        fn encode_decode_is_identity(d in arb_data()) {
            let m = Message::Data(d);
            let bytes = encode(&m).unwrap();
            let back = decode(&bytes).unwrap();
            prop_assert_eq!(key(&back), key(&m));
            prop_assert_eq!(encode(&back).unwrap(), bytes);
        }

        #[test]
        fn ack_round_trips(seqs in proptest::collection::vec(any::<u64>(), 0..200)) {
            let a = Ack::from_seqs(&gw("gw"), seqs.iter().copied());
            for s in &seqs { prop_assert!(a.contains(*s)); }
            let m = Message::Ack(a);
            prop_assert_eq!(decode(&encode(&m).unwrap()).unwrap(), m);
        }

        #[test]
        fn mutated_frames_never_panic_and_raw_decodes_are_canonical(
            d in arb_data(), edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4)
        ) {
            let bytes = encode(&Message::Data(d)).unwrap();
            // Mutate the body and fix up the CRC so the parser sees the damage.
            let mut body = bytes[HEADER_LEN..bytes.len() - TRAILER_LEN].to_vec();
            for (i, v) in edits {
                if !body.is_empty() {
                    let n = body.len();
                    body[i % n] = v;
                }
            }
            let f = envelope(1, 2, &body);
            if let Ok(m) = decode(&f)
                && let Message::Data(d) = &m
                && d.encoding == Encoding::Raw
            {
                prop_assert_eq!(encode(&m).unwrap(), f);
            }
        }
    }
}
