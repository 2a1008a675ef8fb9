use super::*;
use crate::fusion::sim::Noise;

fn cfg(method: VotingMethod, n: usize, f: usize) -> VotingConfig {
    VotingConfig {
        method,
        sensors: n,
        faults: f,
        fault_frames: 5,
        uncertainty: vec![1.0],
    }
}

#[test]
fn fault_bounds_checked_against_group_size() {
    assert!(cfg(VotingMethod::BrooksIyengar, 4, 1).validate().is_ok());
    let e = cfg(VotingMethod::BrooksIyengar, 3, 1)
        .validate()
        .unwrap_err();
    assert!(e.to_string().contains("needs 4 sensors"), "{e}");
    assert!(cfg(VotingMethod::Marzullo, 6, 2).validate().is_err());
    assert!(cfg(VotingMethod::Median, 3, 1).validate().is_ok());
    assert!(cfg(VotingMethod::Majority, 4, 2).validate().is_err());
    let mut c = cfg(VotingMethod::Median, 3, 1);
    c.uncertainty = vec![1.0, 2.0];
    assert!(c.validate().is_err());
    c.uncertainty = vec![1.0, -2.0, 1.0];
    assert!(c.validate().is_err());
    c.uncertainty = vec![1.0];
    c.fault_frames = 0;
    assert!(c.validate().is_err());
}

#[test]
fn marzullo_and_brooks_iyengar_by_hand() {
    // Intervals [0,2], [1,3], [1.5,2.5], [10,11] (uncertainty 1 / 1 / 0.5 / 0.5), n=4, f=1:
    // the only region covered by ≥ 3 intervals is [1.5, 2].
    for m in [VotingMethod::Marzullo, VotingMethod::BrooksIyengar] {
        let mut c = cfg(m, 4, 1);
        c.uncertainty = vec![1.0, 1.0, 0.5, 0.5];
        let mut v = Voter::new(c).unwrap();
        let out = v
            .vote(&[Some(1.0), Some(2.0), Some(2.0), Some(10.5)])
            .unwrap();
        assert_eq!(out.interval, Some((1.5, 2.0)));
        assert!((out.value - 1.75).abs() < 1e-12);
        assert_eq!(out.outvoted, vec![3]);
    }
    // Brooks–Iyengar weights regions by coverage; Marzullo takes the midpoint of the span.
    let mut bi = Voter::new(cfg(VotingMethod::BrooksIyengar, 4, 1)).unwrap();
    let mut mz = Voter::new(cfg(VotingMethod::Marzullo, 4, 1)).unwrap();
    let r = [Some(0.0), Some(0.5), Some(1.0), Some(1.5)];
    // Regions with ≥3: [0.5,1] (4 intervals... ) computed by the sweep.
    let (b, m) = (bi.vote(&r).unwrap(), mz.vote(&r).unwrap());
    assert_eq!(m.interval, Some((0.0, 1.5)));
    assert!((m.value - 0.75).abs() < 1e-12);
    assert!(
        (b.value - 0.75).abs() < 1e-12,
        "symmetric input: {}",
        b.value
    );
    assert!(b.outvoted.is_empty());
}

#[test]
fn median_and_majority_basics() {
    let mut v = Voter::new(cfg(VotingMethod::Median, 3, 1)).unwrap();
    let out = v.vote(&[Some(1.0), Some(100.0), Some(1.5)]).unwrap();
    assert_eq!(out.value, 1.5);
    assert_eq!(out.outvoted, vec![1]);
    assert!(matches!(
        v.vote(&[Some(1.0), None, None]),
        Err(VoteError::TooFewSensors { .. })
    ));
    assert!(matches!(
        v.vote(&[Some(1.0)]),
        Err(VoteError::WrongCount { .. })
    ));
    assert!(matches!(
        v.vote_discrete(&[Some(1), Some(1), Some(1)]),
        Err(VoteError::WrongKind(_))
    ));

    let mut m = Voter::new(cfg(VotingMethod::Majority, 5, 2)).unwrap();
    let out = m
        .vote_discrete(&[Some(3), Some(3), Some(7), Some(3), Some(9)])
        .unwrap();
    assert_eq!(out.value, 3);
    assert_eq!(out.outvoted, vec![2, 4]);
    assert_eq!(
        m.vote_discrete(&[Some(1), Some(2), Some(3), Some(1), Some(2)]),
        Err(VoteError::NoAgreement)
    );
}

#[test]
fn majority_flags_stuck_sensor_after_k_frames_and_excludes_it() {
    let mut m = Voter::new(cfg(VotingMethod::Majority, 3, 1)).unwrap();
    for k in 0..10i64 {
        let out = m
            .vote_discrete(&[Some(k % 2), Some(k % 2), Some(5)])
            .unwrap();
        assert_eq!(out.value, k % 2);
        if k == 4 {
            assert_eq!(
                out.alarms,
                vec![FaultAlarm {
                    sensor: 2,
                    frames: 5
                }]
            );
        } else {
            assert!(out.alarms.is_empty());
        }
        if k > 4 {
            assert!(out.outvoted.is_empty(), "excluded sensors are not voted on");
        }
    }
    assert_eq!(m.faulty(), &[false, false, true]);
    m.clear_fault(2);
    assert_eq!(m.faulty(), &[false, false, false]);
}

/// Voting accuracy and fault detection with `f` faulty sensors out of `3f + 1`.
///
/// Generator (seed 0x7070 + f): truth `x(k) = 20 + 5 sin(0.05 k)`; honest sensors read
/// `x + U(−0.5, 0.5)` with uncertainty 1 (so `x ± 1` always holds the truth). Faulty sensor j
/// (j = 0..f) behaves by `j mod 4`: stuck at 40; drifting `x + 0.2 k`; spiking `x ± U(10, 20)`;
/// an inconsistent liar `x ± U(3, 4)` with a random sign each frame. 200 frames, K = 5.
///
/// Checked: every fused value lies within the honest sensors' range (values for median, the
/// hull of their intervals for marzullo / brooks_iyengar); no honest sensor is flagged; every
/// faulty sensor is flagged at most K − 1 frames after the first frame in which it is
/// detectably wrong (its interval misses the honest hull: always for stuck/spike/liar, once the
/// drift exceeds 2.5 for the drifting one).
#[test]
fn f_faulty_of_3f_plus_1_bounded_and_flagged_within_k() {
    for method in [
        VotingMethod::Median,
        VotingMethod::Marzullo,
        VotingMethod::BrooksIyengar,
    ] {
        for f in 1..=3usize {
            let n = 3 * f + 1;
            let mut noise = Noise::new(0x7070 + f as u64);
            let mut v = Voter::new(cfg(method, n, f)).unwrap();
            // Faulty sensors at the end of the group, honest first.
            let mut flagged_at = vec![None; n];
            let mut detectable_from = vec![None; n];
            for k in 0..200usize {
                let x = 20.0 + 5.0 * (0.05 * k as f64).sin();
                let mut r = vec![None; n];
                for (i, slot) in r.iter_mut().enumerate().take(n - f) {
                    let _ = i;
                    *slot = Some(x + noise.uniform() - 0.5);
                }
                for j in 0..f {
                    let i = n - f + j;
                    let sign = if noise.uniform() < 0.5 { -1.0 } else { 1.0 };
                    let val = match j % 4 {
                        0 => 40.0,
                        1 => x + 0.2 * k as f64,
                        2 => x + sign * (10.0 + 10.0 * noise.uniform()),
                        _ => x + sign * (3.0 + noise.uniform()),
                    };
                    if detectable_from[i].is_none() && (j % 4 != 1 || 0.2 * k as f64 > 2.5) {
                        detectable_from[i] = Some(k);
                    }
                    r[i] = Some(val);
                }
                let out = v.vote(&r).unwrap();
                let honest: Vec<f64> = r[..n - f].iter().map(|v| v.unwrap()).collect();
                let (lo, hi) = honest
                    .iter()
                    .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
                        (a.min(*v), b.max(*v))
                    });
                let (lo, hi) = if method == VotingMethod::Median {
                    (lo, hi)
                } else {
                    (lo - 1.0, hi + 1.0)
                };
                assert!(
                    out.value >= lo && out.value <= hi,
                    "{method:?} f={f} frame {k}: {} outside honest [{lo}, {hi}]",
                    out.value
                );
                for a in &out.alarms {
                    assert!(
                        a.sensor >= n - f,
                        "{method:?} f={f}: honest sensor {} flagged",
                        a.sensor
                    );
                    flagged_at[a.sensor] = Some(k);
                }
            }
            for i in n - f..n {
                let (Some(d), Some(fl)) = (detectable_from[i], flagged_at[i]) else {
                    panic!("{method:?} f={f}: sensor {i} not flagged");
                };
                // Flagging earlier than `d` is fine (the median's test is stricter); later than
                // K − 1 frames after it is not.
                assert!(
                    fl < d + 5,
                    "{method:?} f={f}: sensor {i} detectable at {d}, flagged at {fl}"
                );
            }
        }
    }
}
