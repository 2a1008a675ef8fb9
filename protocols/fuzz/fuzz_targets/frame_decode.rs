//! Fuzz target for the frame decoder (`outpost_protocols::frame`) and the delta and summary
//! encodings (`outpost_protocols::encoding`): any byte string must decode to a message or an
//! error without panicking, the streaming helper must agree with `decode`, a raw-encoded frame
//! that decodes must re-encode to the same bytes (the encoding is canonical), and any decoded
//! frame must re-encode to bytes that decode to the same message (compared by bytes).
//!
//! Random bytes rarely pass the CRC and zstd layers, so an input whose first byte is `0xD0`
//! or `0xD1` is taken as a *decompressed* delta (`0xD0`) or summary (`0xD1`) block and wrapped
//! in a valid compressed frame, which sends the fuzzer straight into the block parsers.
//!
//! Run: `cd protocols/fuzz && cargo +nightly fuzz run frame_decode corpus/frame_decode seeds/frame_decode`
//! (`seeds/` holds committed delta, summary, ping and pong seeds).
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_protocols::frame::{self, EncodeError, Encoding, Message, Next};

/// A valid frame around a decompressed delta/summary block.
fn wrap_block(encoding: u8, block: &[u8]) -> Vec<u8> {
    let mut body = vec![2, encoding, 2, b'g', b'w'];
    body.extend_from_slice(&0u64.to_le_bytes());
    body.extend_from_slice(&u64::MAX.to_le_bytes());
    body.extend_from_slice(&(block.len() as u32).to_le_bytes());
    body.extend_from_slice(&zstd::bulk::compress(block, 1).expect("zstd compresses"));
    let mut f = frame::MAGIC.to_vec();
    f.push(frame::VERSION);
    f.push(2);
    f.extend_from_slice(&(body.len() as u32).to_le_bytes());
    f.extend_from_slice(&body);
    let c = frame::crc32c(&f);
    f.extend_from_slice(&c.to_le_bytes());
    f
}

fn check(data: &[u8]) {
    let decoded = frame::decode(data);
    if let Ok(m) = &decoded {
        let raw = !matches!(m, Message::Data(d) if d.encoding != Encoding::Raw);
        if raw {
            let again = frame::encode(m).expect("a decoded message must encode");
            assert_eq!(again, data, "decode is not canonical");
        } else {
            // Compressed encodings are not canonical (zstd, coding choices), but encoding is
            // a fixed point. A hostile block can be denser than our encoder's choice, so the
            // re-encoding may exceed the size limits; nothing else may fail.
            match frame::encode(m) {
                Ok(again) => {
                    let back = frame::decode(&again).expect("a re-encoded message must decode");
                    let third = frame::encode(&back).expect("encodes");
                    assert_eq!(third, again, "re-encoding drifts");
                }
                Err(EncodeError::TooLong { .. }) => {}
                Err(e) => panic!("a decoded message does not encode: {e}"),
            }
        }
    }
    match frame::next_frame(data) {
        Ok(Next::Frame { message, consumed }) => {
            assert_eq!(consumed == data.len(), decoded.is_ok());
            // Compare by bytes: f64 NaN values make `Message: PartialEq` unreliable.
            if !matches!(&message, Message::Data(d) if d.encoding != Encoding::Raw) {
                assert_eq!(frame::encode(&message).ok().as_deref(), Some(&data[..consumed]));
            }
        }
        Ok(Next::Incomplete(n)) => assert!(n > 0 && decoded.is_err()),
        Err(_) => assert!(decoded.is_err()),
    }
    let mut buf = frame::FrameBuffer::new();
    if buf.push(data).is_ok() {
        while let Ok(Some(_)) = buf.next_message() {}
    }
}

fuzz_target!(|data: &[u8]| {
    match data.first() {
        Some(0xD0) => check(&wrap_block(Encoding::Delta as u8, &data[1..])),
        Some(0xD1) => check(&wrap_block(Encoding::Summary as u8, &data[1..])),
        _ => check(data),
    }
});
