//! Self-checking records for the outbox crash test: shared by the writer program
//! (`src/bin/outbox_writer.rs`) and the test that kills it (`tests/outbox_crash.rs`).
//!
//! A record of batch `b`, index `i` is `b u64 | i u32 | count u32 | payload | fnv64`, all
//! big-endian, where the payload length and bytes, the batch size and the record's priority
//! class are all derived from `(b, i)`: a reader can tell a torn, mixed-up or corrupted
//! record from a good one without any other information.

use outpost_runtime::Priority;

/// The writer keeps this many batches: after appending batch `b` it removes batch
/// `b - WINDOW` (the ack path).
pub const WINDOW: u64 = 20;

/// Half-way through the window the writer acknowledges the even-indexed records of a
/// batch (a partial acknowledgement of its segments): after appending batch `b` it removes
/// the even records of every batch up to `b - HALF_ACK`.
pub const HALF_ACK: u64 = WINDOW / 2;

const HEADER: usize = 16;
const TRAILER: usize = 8;

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn fnv64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

/// Number of records in batch `b` (1..=40).
pub fn batch_len(b: u64) -> u32 {
    1 + (splitmix(b) % 40) as u32
}

/// The priority class of record `i` of batch `b` (a mix of critical, normal and bulk, so
/// one batch spans several key ranges).
pub fn class_of(b: u64, i: u32) -> Priority {
    match splitmix(b ^ (u64::from(i) << 40)) % 10 {
        0 => Priority::Critical,
        1..=2 => Priority::Bulk,
        3 => Priority::Control,
        _ => Priority::Normal,
    }
}

fn payload_len(b: u64, i: u32) -> usize {
    8 + (splitmix(b.wrapping_mul(31) ^ u64::from(i)) % 41) as usize
}

/// The encoded record `i` of batch `b`.
pub fn encode(b: u64, i: u32) -> Vec<u8> {
    let count = batch_len(b);
    let n = payload_len(b, i);
    let mut v = Vec::with_capacity(HEADER + n + TRAILER);
    v.extend_from_slice(&b.to_be_bytes());
    v.extend_from_slice(&i.to_be_bytes());
    v.extend_from_slice(&count.to_be_bytes());
    let mut x = splitmix(b ^ 0xA5A5 ^ (u64::from(i) << 32));
    for _ in 0..n {
        x = splitmix(x);
        v.push(x as u8);
    }
    let sum = fnv64(&v);
    v.extend_from_slice(&sum.to_be_bytes());
    v
}

/// Batch and index of a record, after checking every byte of it.
pub fn decode(v: &[u8]) -> Result<(u64, u32), String> {
    if v.len() < HEADER + TRAILER {
        return Err(format!("record of {} bytes is too short", v.len()));
    }
    let b = u64::from_be_bytes(v[..8].try_into().map_err(|_| "header")?);
    let i = u32::from_be_bytes(v[8..12].try_into().map_err(|_| "header")?);
    let expected = encode(b, i);
    if v != expected.as_slice() {
        return Err(format!(
            "record claims batch {b} index {i} but its bytes differ from what was written \
             ({} bytes, expected {})",
            v.len(),
            expected.len()
        ));
    }
    Ok((b, i))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_detects_damage() {
        for b in 0..50 {
            for i in 0..batch_len(b) {
                let mut v = encode(b, i);
                assert_eq!(decode(&v), Ok((b, i)));
                let last = v.len() - 1;
                v[last] ^= 1;
                assert!(decode(&v).is_err());
            }
        }
        assert!(decode(&[0; 10]).is_err());
    }
}
