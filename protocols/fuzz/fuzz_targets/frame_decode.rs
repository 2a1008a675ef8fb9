//! Fuzz target for the frame decoder (`outpost_protocols::frame`): any byte string must
//! decode to a message or an error without panicking, the streaming helper must agree
//! with `decode`, and a raw-encoded frame that decodes must re-encode to the same bytes
//! (the encoding is canonical).
//!
//! Run: `cd protocols/fuzz && cargo +nightly fuzz run frame_decode`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_protocols::frame::{self, Encoding, Message, Next};

fuzz_target!(|data: &[u8]| {
    let decoded = frame::decode(data);
    if let Ok(m) = &decoded {
        let raw = !matches!(m, Message::Data(d) if d.encoding != Encoding::Raw);
        if raw {
            let again = frame::encode(m).expect("a decoded message must encode");
            assert_eq!(again, data, "decode is not canonical");
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
});
