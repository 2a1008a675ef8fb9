//! `bench -- sync_bytes [MINUTES]`: bytes on the wire per sample for each sync mode,
//! on a seeded plant data set, against what JSON-per-sample gateways send.
//!
//! # Data set (seed `0x5eed_b17e`, default 10 minutes, 200 streams, 1,010 samples/s)
//!
//! Streams are read by simulated Modbus devices of 10 registers each, polled on a fixed period
//! with a per-device phase and a poll jitter (exponential, mean 0.4 ms, in ns); all registers of
//! one poll share its timestamp, as a batched Modbus read gives them. Values are what the
//! gateway's Modbus mapping computes, `raw × scale` (`protocols::modbus`), from quantized raw
//! registers:
//!
//! | streams | rate | raw register | scale | signal |
//! |--------:|-----:|--------------|------:|--------|
//! | 60 temperatures `plant/tt-DNN/temp` | 1 Hz | °C × 10 | 0.1 | 20–80 °C base, sinusoidal drift (±0.5–2 °C over 20–60 min), random walk, white noise σ 0.04 °C |
//! | 50 pressures `plant/pt-DNN/pressure` | 10 Hz | 12-bit ADC count, 0–10 bar | 10/4095 | 2–8 bar base, AR(1) process swing σ ≈ 0.01 bar, ADC noise σ 1.2 counts |
//! | 40 vibration RMS `plant/vt-DNN/rms` | 10 Hz | mm/s × 100 | 0.01 | 1–5 mm/s base, slow modulation, 4 % multiplicative noise |
//! | 30 counters `plant/ct-DNN/count` | 1 Hz | u32 count | — (i64) | monotonic, Poisson increments, mean 0.2–5 per second |
//! | 20 booleans `plant/xv-DNN/open` | 1 Hz | coil | — (bool) | valves/motors, toggle with probability 1/300 per second |
//!
//! One pressure device loses its link for 5 s at minute 3 (its samples are `bad`, value
//! held). Records enter the outbox (their sequence) in timestamp order, device by device, in
//! register order. Twelve critical alarm records (a string stream `plant/alarm`) are spread
//! over the run and travel in their own critical frames in every mode.
//!
//! # Modes (each figure: total bytes on the wire ÷ samples in the data set)
//!
//! - `json_b_per_sample`: one JSON object per sample, as ThingsBoard/Greengrass-style
//!   gateways publish: `{"ts":<ms since epoch>,"values":{"<stream name>":<value>}}`
//!   (serde_json; shortest round-trip floats; no envelope counted).
//! - `full`, `full_zstd`: frames of 1,000 outbox records (≈ 1 s), raw and zstd (level 3).
//! - `delta`: the same 1,000-record batches through the [`DeadbandFilter`] (one filter for
//!   the whole run, as the sync actor keeps it), then [`Encoding::Delta`] frames of what
//!   passed. Deadband: 1.5 quantization steps for temperatures, pressures and vibration (a
//!   one-step ADC flicker is not sent, two steps are), exact for counters and booleans,
//!   heartbeat every 60 s. `delta_per_sent` and `delta_sent_fraction` qualify it.
//! - `summary`: [`SummaryAggregator`] with 10 s windows, closed with a 1 s watermark lag,
//!   one [`Encoding::Summary`] frame per batch of closed windows; measured per *original*
//!   sample.
//!
//! Also reported: where the delta bytes go (each column zstd-compressed alone, per sent
//! sample), and the timestamp coding measured three ways on the delta frames: our times
//! column (zstd), per-stream delta-of-delta varints (zstd), and Gorilla's bit-packed
//! delta-of-delta buckets (computed bit count; bit-packed output does not compress further).

use std::collections::BTreeMap;

use outpost_protocols::encoding::{
    Deadband, DeadbandConfig, DeadbandFilter, FilterOutcome, StreamSummary, SummaryAggregator,
    SummaryConfig, Verdict, delta,
};
use outpost_protocols::frame::{self, DataFrame, Encoding, Message};
use outpost_runtime::model::{Priority, Quality, Sample, StreamId, Value};
use serde_json::{Value as Json, json};

const SEED: u64 = 0x5eed_b17e;
const T0: i64 = 1_700_000_000_000_000_000;
const SEC: i64 = 1_000_000_000;
const FRAME_RECORDS: usize = 1000;
const GATEWAY: &str = "gw-bench";

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Temp,
    Pressure,
    Vibration,
    Counter,
    Valve,
}

struct Device {
    kind: Kind,
    period_ns: i64,
    phase_ns: i64,
    streams: Vec<StreamId>,
    state: Vec<[f64; 4]>,
}

fn gauss(rng: &mut fastrand::Rng) -> f64 {
    let u1 = rng.f64().max(1e-300);
    let u2 = rng.f64();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn poisson(rng: &mut fastrand::Rng, lambda: f64) -> i64 {
    let l = (-lambda).exp();
    let (mut k, mut p) = (0, 1.0);
    loop {
        p *= rng.f64();
        if p <= l {
            return k;
        }
        k += 1;
    }
}

/// Quantization steps (engineering units) of the float kinds.
const PRESSURE_SCALE: f64 = 10.0 / 4095.0;

/// The data set: `(outbox sequence, priority, sample)` in outbox order.
fn data_set(seconds: i64) -> Result<Vec<(u64, Priority, Sample)>, String> {
    let mut rng = fastrand::Rng::with_seed(SEED);
    let intern = |n: String| StreamId::intern(&n).map_err(|e| e.to_string());
    let layout = [
        (Kind::Temp, 6, SEC, "tt", "temp"),
        (Kind::Pressure, 5, SEC / 10, "pt", "pressure"),
        (Kind::Vibration, 4, SEC / 10, "vt", "rms"),
        (Kind::Counter, 3, SEC, "ct", "count"),
        (Kind::Valve, 2, SEC, "xv", "open"),
    ];
    let mut devices = Vec::new();
    for (kind, n_dev, period_ns, tag, what) in layout {
        for d in 0..n_dev {
            let mut streams = Vec::new();
            let mut state = Vec::new();
            for r in 0..10 {
                streams.push(intern(format!("plant/{tag}-{d}{r:02}/{what}"))?);
                state.push(match kind {
                    // base, drift amplitude, drift period (s), random walk
                    Kind::Temp => [
                        20.0 + 60.0 * rng.f64(),
                        0.5 + 1.5 * rng.f64(),
                        1200.0 + 2400.0 * rng.f64(),
                        0.0,
                    ],
                    // base, AR(1) state, -, -
                    Kind::Pressure => [2.0 + 6.0 * rng.f64(), 0.0, 0.0, 0.0],
                    // base, modulation period, -, -
                    Kind::Vibration => [1.0 + 4.0 * rng.f64(), 30.0 + 90.0 * rng.f64(), 0.0, 0.0],
                    // count, rate, -, -
                    Kind::Counter => [rng.u32(..1_000_000) as f64, 0.2 + 4.8 * rng.f64(), 0.0, 0.0],
                    Kind::Valve => [f64::from(u8::from(rng.bool())), 0.0, 0.0, 0.0],
                });
            }
            devices.push(Device {
                kind,
                period_ns,
                phase_ns: rng.i64(0..period_ns),
                streams,
                state,
            });
        }
    }
    let alarm = intern("plant/alarm".into())?;
    // (ts, device index or usize::MAX for an alarm, poll index)
    let mut polls: Vec<(i64, usize, i64)> = Vec::new();
    for (i, d) in devices.iter().enumerate() {
        let n = seconds * SEC / d.period_ns;
        for k in 0..n {
            let jitter = (-(rng.f64().max(1e-12)).ln() * 400_000.0) as i64;
            polls.push((T0 + d.phase_ns + k * d.period_ns + jitter, i, k));
        }
    }
    for a in 0..12 {
        polls.push((T0 + (a * seconds * SEC) / 12 + 123_456_789, usize::MAX, a));
    }
    polls.sort();
    let mut out = Vec::new();
    let mut seq = 0u64;
    let outage_dev = devices
        .iter()
        .position(|d| d.kind == Kind::Pressure)
        .unwrap_or(0)
        + 2;
    let mut held: BTreeMap<usize, Vec<Value>> = BTreeMap::new();
    for (ts, di, k) in polls {
        if di == usize::MAX {
            seq += 1;
            let text = format!(
                "PAH pt-2{:02} high pressure {}",
                k % 10,
                if k % 2 == 0 { "raised" } else { "cleared" }
            );
            out.push((
                seq,
                Priority::Critical,
                Sample::new(alarm, ts, Value::text(&text)),
            ));
            continue;
        }
        let d = &mut devices[di];
        let t = (ts - T0) as f64 / SEC as f64;
        let outage = di == outage_dev && (180.0..185.0).contains(&t);
        let mut values = Vec::with_capacity(10);
        for st in d.state.iter_mut() {
            let v = match d.kind {
                Kind::Temp => {
                    st[3] += 0.002 * gauss(&mut rng);
                    let x = st[0]
                        + st[1] * (std::f64::consts::TAU * t / st[2]).sin()
                        + st[3]
                        + 0.04 * gauss(&mut rng);
                    Value::F64((x / 0.1).round() * 0.1)
                }
                Kind::Pressure => {
                    st[1] = 0.98 * st[1] + 0.002 * gauss(&mut rng);
                    let counts = (st[0] + st[1]) / 10.0 * 4095.0 + 1.2 * gauss(&mut rng);
                    let c = counts.round().clamp(0.0, 4095.0);
                    Value::F64(c * PRESSURE_SCALE)
                }
                Kind::Vibration => {
                    let base = st[0] * (1.0 + 0.2 * (std::f64::consts::TAU * t / st[1]).sin());
                    let x = base * (1.0 + 0.04 * gauss(&mut rng));
                    Value::F64((x / 0.01).round().max(0.0) * 0.01)
                }
                Kind::Counter => {
                    if k > 0 {
                        st[0] += poisson(&mut rng, st[1]) as f64;
                    }
                    Value::I64(st[0] as i64)
                }
                Kind::Valve => {
                    if rng.f64() < 1.0 / 300.0 {
                        st[0] = 1.0 - st[0];
                    }
                    Value::Bool(st[0] > 0.5)
                }
            };
            values.push(v);
        }
        if outage {
            values = held.get(&di).cloned().unwrap_or(values);
        } else {
            held.insert(di, values.clone());
        }
        for (r, v) in values.into_iter().enumerate() {
            seq += 1;
            let mut s = Sample::new(d.streams[r], ts, v);
            if outage {
                s.quality = Quality::Bad;
            }
            out.push((seq, Priority::Normal, s));
        }
    }
    Ok(out)
}

fn json_len(s: &Sample) -> Result<usize, String> {
    let ts_ms = s.ts_ns.div_euclid(1_000_000);
    let v = serde_json::to_value(&s.value).map_err(|e| e.to_string())?;
    let mut values = serde_json::Map::new();
    values.insert(s.stream.name().to_string(), v);
    let obj = json!({"ts": ts_ms, "values": values});
    Ok(serde_json::to_vec(&obj).map_err(|e| e.to_string())?.len())
}

fn frame_bytes(d: DataFrame) -> Result<usize, String> {
    frame::encode(&Message::Data(d))
        .map(|b| b.len())
        .map_err(|e| e.to_string())
}

/// Gorilla's bit-packed delta-of-delta timestamp buckets, per stream within a frame: the
/// first timestamp 64 bits, the first delta 64 bits, then 1 / 9 / 12 / 16 / 36 / 68 bits.
fn gorilla_ts_bits(d: &DataFrame) -> u64 {
    let mut per: BTreeMap<u32, Vec<i64>> = BTreeMap::new();
    for s in &d.samples {
        per.entry(s.stream).or_default().push(s.ts_ns);
    }
    let mut bits = 0u64;
    for ts in per.values() {
        bits += 64;
        if ts.len() > 1 {
            bits += 64;
        }
        for w in ts.windows(3) {
            let dod = (w[2].wrapping_sub(w[1])).wrapping_sub(w[1].wrapping_sub(w[0]));
            bits += match dod {
                0 => 1,
                -63..=64 => 9,
                -255..=256 => 12,
                -2047..=2048 => 16,
                _ if i32::try_from(dod).is_ok() => 36,
                _ => 68,
            };
        }
    }
    bits
}

/// Per-stream delta-of-delta timestamps as zigzag varints (first against 0), one column.
fn per_stream_dod_varints(d: &DataFrame) -> Vec<u8> {
    let mut last: BTreeMap<u32, (i64, i64)> = BTreeMap::new();
    let mut out = Vec::new();
    for s in &d.samples {
        let (prev, pdelta) = last.get(&s.stream).copied().unwrap_or((0, 0));
        let delta = s.ts_ns.wrapping_sub(prev);
        let dod = delta.wrapping_sub(pdelta);
        let mut z = ((dod << 1) ^ (dod >> 63)) as u64;
        while z >= 0x80 {
            out.push((z as u8) | 0x80);
            z >>= 7;
        }
        out.push(z as u8);
        last.insert(s.stream, (s.ts_ns, delta));
    }
    out
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Runs the benchmark; `args`: optional minutes of data (default 10).
pub fn run(args: &[String]) -> Result<Json, String> {
    let minutes: i64 = match args.first() {
        None => 10,
        Some(s) => s.parse().map_err(|e| format!("argument {s:?}: {e}"))?,
    };
    let recs = data_set(minutes.max(1) * 60)?;
    let normal: Vec<(u64, Sample)> = recs
        .iter()
        .filter(|r| r.1 == Priority::Normal)
        .map(|r| (r.0, r.2.clone()))
        .collect();
    let critical: Vec<(u64, Sample)> = recs
        .iter()
        .filter(|r| r.1 == Priority::Critical)
        .map(|r| (r.0, r.2.clone()))
        .collect();
    let n = recs.len() as f64;

    // Critical alarms: one frame each, in every mode (delta: not filtered; summary: zstd).
    let alarm_bytes = |enc: Encoding| -> Result<usize, String> {
        critical
            .iter()
            .map(|(q, s)| {
                frame_bytes(DataFrame::from_samples(
                    &GATEWAY.parse().unwrap(),
                    Priority::Critical,
                    enc,
                    [(*q, s)],
                ))
            })
            .sum()
    };

    let mut json_total = 0usize;
    for r in &recs {
        json_total += json_len(&r.2)?;
    }

    let mut full = alarm_bytes(Encoding::Raw)?;
    let mut full_zstd = alarm_bytes(Encoding::Zstd)?;
    let mut delta_total = alarm_bytes(Encoding::Delta)?;
    let mut summary_total = alarm_bytes(Encoding::Zstd)?;

    let step = |q: f64| Deadband::Absolute(1.5 * q);
    let mut streams_cfg = BTreeMap::new();
    let mut kinds: BTreeMap<&'static str, Deadband> = BTreeMap::new();
    kinds.insert("/temp", step(0.1));
    kinds.insert("/pressure", step(PRESSURE_SCALE));
    kinds.insert("/rms", step(0.01));
    for (_, s) in &normal {
        let name = s.stream.name().to_string();
        if let Some((_, d)) = kinds.iter().find(|(k, _)| name.ends_with(*k)) {
            streams_cfg.insert(name, *d);
        }
    }
    let dcfg = DeadbandConfig {
        default: None,
        max_silence_ms: Some(60_000),
        streams: streams_cfg,
    };
    let mut filter = DeadbandFilter::new(&dcfg).map_err(|e| e.to_string())?;
    // Variant: frames of 1,000 *sent* samples (the filter runs until that many passed).
    let mut filter2 = DeadbandFilter::new(&dcfg).map_err(|e| e.to_string())?;
    let mut delta_sent_frames = alarm_bytes(Encoding::Delta)?;
    let mut pending: Vec<(u64, &Sample)> = Vec::new();
    let mut pending_send: Vec<usize> = Vec::new();
    let flush_pending =
        |pending: &mut Vec<(u64, &Sample)>, send: &mut Vec<usize>| -> Result<usize, String> {
            let outcome = FilterOutcome {
                send: std::mem::take(send),
                skipped: Vec::new(),
            };
            let d = DataFrame::from_filtered(
                &GATEWAY.parse().unwrap(),
                Priority::Normal,
                Encoding::Delta,
                pending.drain(..),
                &outcome,
            );
            if d.samples.is_empty() {
                return Ok(0);
            }
            frame_bytes(d)
        };
    for (q, s) in &normal {
        if filter2.check(s) == Verdict::Send {
            pending_send.push(pending.len());
        }
        pending.push((*q, s));
        if pending_send.len() == FRAME_RECORDS {
            delta_sent_frames += flush_pending(&mut pending, &mut pending_send)?;
        }
    }
    delta_sent_frames += flush_pending(&mut pending, &mut pending_send)?;
    let mut agg =
        SummaryAggregator::new(&SummaryConfig { window_ms: 10_000 }).map_err(|e| e.to_string())?;

    let mut sent = 0usize;
    let mut columns: BTreeMap<&'static str, usize> = BTreeMap::new();
    let (mut ts_ours, mut ts_dod, mut ts_gorilla_bits) = (0usize, 0usize, 0u64);
    let mut summary_frames = 0usize;
    let mut summaries = 0usize;
    let mut emit_summaries = |closed: Vec<StreamSummary>| -> Result<usize, String> {
        if closed.is_empty() {
            return Ok(0);
        }
        summary_frames += 1;
        summaries += closed.len();
        frame_bytes(DataFrame::from_summaries(
            &GATEWAY.parse().unwrap(),
            Priority::Normal,
            &closed,
        ))
    };
    for batch in normal.chunks(FRAME_RECORDS) {
        let refs = || batch.iter().map(|(q, s)| (*q, s));
        full += frame_bytes(DataFrame::from_samples(
            &GATEWAY.parse().unwrap(),
            Priority::Normal,
            Encoding::Raw,
            refs(),
        ))?;
        full_zstd += frame_bytes(DataFrame::from_samples(
            &GATEWAY.parse().unwrap(),
            Priority::Normal,
            Encoding::Zstd,
            refs(),
        ))?;

        let outcome = filter.filter(refs());
        let d = DataFrame::from_filtered(
            &GATEWAY.parse().unwrap(),
            Priority::Normal,
            Encoding::Delta,
            refs(),
            &outcome,
        );
        sent += d.samples.len();
        for (name, _, z) in
            delta::column_sizes(&d, frame::DEFAULT_ZSTD_LEVEL).map_err(|e| e.to_string())?
        {
            *columns.entry(name).or_default() += z;
            if name == "times" {
                ts_ours += z;
            }
        }
        ts_dod += zstd::bulk::compress(&per_stream_dod_varints(&d), frame::DEFAULT_ZSTD_LEVEL)
            .map_err(|e| e.to_string())?
            .len();
        ts_gorilla_bits += gorilla_ts_bits(&d);
        let bytes = frame::encode(&Message::Data(d.clone())).map_err(|e| e.to_string())?;
        // The hub must get exactly what was sent.
        match frame::decode(&bytes).map_err(|e| e.to_string())? {
            Message::Data(back) if format!("{back:?}") == format!("{d:?}") => {}
            _ => return Err("delta frame did not decode to the frame sent".into()),
        }
        delta_total += bytes.len();

        for (q, s) in refs() {
            if let Some(early) = agg.push(q, s) {
                summary_total += emit_summaries(vec![early])?;
            }
        }
        let watermark = batch.last().map_or(i64::MIN, |r| r.1.ts_ns) - SEC;
        summary_total += emit_summaries(agg.close_until(watermark))?;
    }
    summary_total += emit_summaries(agg.flush())?;

    let json_b = json_total as f64 / n;
    let per = |b: usize| round3(b as f64 / n);
    let cols: serde_json::Map<String, Json> = columns
        .iter()
        .map(|(k, v)| (k.to_string(), json!(round3(*v as f64 / sent.max(1) as f64))))
        .collect();
    let sentf = sent.max(1) as f64;
    eprintln!(
        "sync_bytes: {} samples ({} normal, {} critical), {} streams; delta sent {sent}; {summaries} summaries in {summary_frames} frames",
        recs.len(),
        normal.len(),
        critical.len(),
        201
    );
    eprintln!(
        "delta columns, zstd alone, bytes per sent sample: {}",
        Json::Object(cols.clone())
    );
    eprintln!(
        "timestamps per sent sample: ours (global delta, zstd) {:.3}, per-stream dod varint+zstd {:.3}, Gorilla bit-packed dod {:.3}",
        ts_ours as f64 / sentf,
        ts_dod as f64 / sentf,
        ts_gorilla_bits as f64 / 8.0 / sentf
    );
    Ok(json!({
        "bench": "sync_bytes",
        "json_b_per_sample": round3(json_b),
        "full": per(full),
        "full_zstd": per(full_zstd),
        "delta": per(delta_total),
        "summary": per(summary_total),
        "delta_per_sent": round3(delta_total as f64 / sentf),
        "delta_frames_of_1000_sent": per(delta_sent_frames),
        "delta_sent_fraction": round3(sent as f64 / n),
        "json_over_summary": round3(json_total as f64 / summary_total.max(1) as f64),
        "samples": recs.len(),
        "ts_b_per_sent": {
            "ours_zstd": round3(ts_ours as f64 / sentf),
            "dod_varint_zstd": round3(ts_dod as f64 / sentf),
            "gorilla_bits": round3(ts_gorilla_bits as f64 / 8.0 / sentf),
        },
    }))
}
