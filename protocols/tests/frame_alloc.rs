//! Checks the frame decoder's declared allocation bound (`MAX_DECODE_ALLOC`) with a counting
//! global allocator: the peak of live heap bytes requested by the decoding thread, for the
//! largest frames of each kind, stays under the bound. Its own test binary, because the
//! allocator is process-wide.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use outpost_protocols::encoding::summary::{
    FrameSummary, MAX_SUMMARIES_PER_FRAME, NumericStats, WindowSummary,
};
use outpost_protocols::frame::{
    self, Ack, DataFrame, Encoding, FrameSample, MAX_ACK_RANGES, MAX_DECODE_ALLOC,
    MAX_SAMPLES_PER_FRAME, MAX_STREAMS_PER_FRAME, Message, SeqRange,
};
use outpost_runtime::model::{Priority, Quality, Value};

struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn track(delta: isize) {
    let _ = LIVE.try_with(|l| {
        let v = l.get() + delta;
        l.set(v);
        let _ = PEAK.try_with(|p| p.set(p.get().max(v)));
    });
}

// SAFETY: forwards to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        track(layout.size() as isize);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        track(-(layout.size() as isize));
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // Count the old and the new block as live together, as a moving realloc needs.
        track(new_size as isize);
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        track(-(layout.size() as isize));
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Peak live bytes requested while decoding `bytes`, above what was live before.
fn decode_peak(bytes: &[u8]) -> usize {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let m = frame::decode(bytes).expect("valid frame");
    let peak = PEAK.with(Cell::get) - base;
    drop(m);
    peak as usize
}

fn frame(streams: Vec<String>, samples: Vec<FrameSample>, encoding: Encoding) -> Vec<u8> {
    let d = DataFrame {
        gateway_id: "gw".parse().unwrap(),
        priority: Priority::Normal,
        encoding,
        first_seq: 0,
        last_seq: u64::MAX,
        streams,
        samples,
        summaries: vec![],
    };
    frame::encode(&Message::Data(d)).expect("encodable")
}

#[test]
fn largest_frames_decode_within_the_declared_bound() {
    let bool_sample = |i: u64| FrameSample {
        stream: 0,
        seq: i,
        ts_ns: i as i64,
        quality: Quality::Good,
        value: Value::Bool(true),
    };
    let str_sample = |i: u64| FrameSample {
        stream: 0,
        seq: i,
        ts_ns: 0,
        quality: Quality::Good,
        value: Value::Str("s".repeat(255).into()),
    };
    // Delta: the most streams and the most samples, values spread over all columns.
    let delta_sample = |i: u64| FrameSample {
        stream: (i % MAX_STREAMS_PER_FRAME as u64) as u32,
        seq: i,
        ts_ns: (i / 16) as i64,
        quality: Quality::Good,
        value: match i % 4 {
            0 => Value::F64(i as f64 * 0.1),
            1 => Value::F64(f64::from_bits(i.wrapping_mul(0x9E37_79B9_7F4A_7C15))),
            2 => Value::I64(i as i64),
            _ => Value::Bool(i % 8 == 3),
        },
    };
    let summary_frame = {
        let summaries = (0..MAX_SUMMARIES_PER_FRAME as u64)
            .map(|i| FrameSummary {
                stream: (i % MAX_STREAMS_PER_FRAME as u64) as u32,
                summary: WindowSummary {
                    window_start_ns: (i / 4096) as i64 * 10_000_000_000,
                    window_ns: 10_000_000_000,
                    first_ts_ns: (i / 4096) as i64 * 10_000_000_000 + 5,
                    last_ts_ns: (i / 4096) as i64 * 10_000_000_000 + 9_000_000_000,
                    first_seq: i,
                    last_seq: i + 100,
                    count: 100,
                    last: if i % 64 == 0 {
                        Value::Str("s".repeat(255).into())
                    } else {
                        Value::F64(i as f64 * 0.01)
                    },
                    last_quality: Quality::Good,
                    numeric: Some(NumericStats {
                        n: 100,
                        min: 0.5,
                        max: i as f64,
                        mean: 1.0 / (i + 1) as f64,
                        stddev: 0.25,
                    }),
                },
            })
            .collect();
        let d = DataFrame {
            gateway_id: "gw".parse().unwrap(),
            priority: Priority::Normal,
            encoding: Encoding::Summary,
            first_seq: 0,
            last_seq: u64::MAX,
            streams: (0..MAX_STREAMS_PER_FRAME)
                .map(|i| format!("{i:0>30}"))
                .collect(),
            samples: (0..700).map(str_sample).collect(),
            summaries,
        };
        frame::encode(&Message::Data(d)).expect("encodable")
    };
    let cases = [
        (
            "max streams and samples, delta",
            frame(
                (0..MAX_STREAMS_PER_FRAME)
                    .map(|i| format!("{i:0>100}"))
                    .collect(),
                (0..MAX_SAMPLES_PER_FRAME as u64)
                    .map(delta_sample)
                    .collect(),
                Encoding::Delta,
            ),
        ),
        ("max summaries and long strings, summary", summary_frame),
        (
            "max samples, zstd",
            frame(
                vec!["a".into()],
                (0..MAX_SAMPLES_PER_FRAME as u64).map(bool_sample).collect(),
                Encoding::Zstd,
            ),
        ),
        (
            "long strings filling the block, zstd",
            frame(
                vec!["a".into()],
                (0..4000).map(str_sample).collect(),
                Encoding::Zstd,
            ),
        ),
        (
            "max streams with long names",
            frame(
                (0..MAX_STREAMS_PER_FRAME)
                    .map(|i| format!("{i:0>250}"))
                    .collect(),
                vec![],
                Encoding::Raw,
            ),
        ),
        (
            "max ack ranges",
            frame::encode(&Message::Ack(Ack {
                gateway_id: "gw".parse().unwrap(),
                ranges: (0..MAX_ACK_RANGES as u64)
                    .map(|i| SeqRange {
                        first: 2 * i,
                        last: 2 * i,
                    })
                    .collect(),
            }))
            .expect("encodable"),
        ),
    ];
    for (what, bytes) in cases {
        let peak = decode_peak(&bytes);
        println!(
            "{what}: {} frame bytes, peak {peak} decode bytes",
            bytes.len()
        );
        assert!(
            peak <= MAX_DECODE_ALLOC,
            "{what}: peak {peak} > bound {MAX_DECODE_ALLOC}"
        );
        assert!(peak > 0);
    }
    println!("MAX_DECODE_ALLOC = {MAX_DECODE_ALLOC}");
}
