//! In-process fan-out of samples to the actors that consume streams (aligners, training,
//! later anything else). The outbox holds the durable copy of every sample; the bus is
//! best-effort: a subscriber that does not keep up loses samples, and each loss is counted.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use outpost_runtime::metrics::Metrics;
use outpost_runtime::model::{Sample, StreamId};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;

/// Cheap-to-clone handle; all clones share the subscriptions.
#[derive(Clone)]
pub struct Bus {
    subs: Arc<RwLock<HashMap<StreamId, Vec<mpsc::Sender<Sample>>>>>,
    dropped: Counter,
}

impl Bus {
    pub fn new(metrics: &Metrics) -> Bus {
        Bus {
            subs: Arc::default(),
            dropped: metrics.counter(
                "outpost_bus_dropped",
                "Samples a slow in-process subscriber (aligner, training) did not take",
                &[],
            ),
        }
    }

    /// A receiver of every sample published on `streams`, buffering at most `capacity`.
    pub fn subscribe(&self, streams: &[StreamId], capacity: usize) -> mpsc::Receiver<Sample> {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let mut subs = self.subs.write().unwrap_or_else(|e| e.into_inner());
        for s in streams {
            subs.entry(*s).or_default().push(tx.clone());
        }
        rx
    }

    /// Whether anyone listens to `stream` (lets publishers skip the clone).
    pub fn has_subscribers(&self, stream: StreamId) -> bool {
        let subs = self.subs.read().unwrap_or_else(|e| e.into_inner());
        subs.get(&stream).is_some_and(|v| !v.is_empty())
    }

    /// Hands `samples` to their subscribers without waiting; closed subscribers are
    /// forgotten.
    pub fn publish(&self, samples: &[Sample]) {
        let subs = self.subs.read().unwrap_or_else(|e| e.into_inner());
        if subs.is_empty() {
            return;
        }
        let mut closed = false;
        for s in samples {
            if let Some(list) = subs.get(&s.stream) {
                for tx in list {
                    match tx.try_send(s.clone()) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            self.dropped.inc();
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => closed = true,
                    }
                }
            }
        }
        drop(subs);
        if closed {
            let mut subs = self.subs.write().unwrap_or_else(|e| e.into_inner());
            for list in subs.values_mut() {
                list.retain(|tx| !tx.is_closed());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_runtime::model::Value;

    #[tokio::test]
    async fn fans_out_by_stream_and_counts_drops() {
        let m = Metrics::new();
        let bus = Bus::new(&m);
        let a = StreamId::intern("bus/a").unwrap();
        let b = StreamId::intern("bus/b").unwrap();
        let mut ra = bus.subscribe(&[a], 1);
        let mut rab = bus.subscribe(&[a, b], 8);
        assert!(bus.has_subscribers(a));
        let s = |st, v| Sample::new(st, 1, Value::I64(v));
        bus.publish(&[s(a, 1), s(b, 2), s(a, 3)]);
        assert_eq!(ra.recv().await.unwrap().value, Value::I64(1));
        assert!(
            ra.try_recv().is_err(),
            "capacity 1: the second `a` was dropped"
        );
        assert_eq!(m.counter_value("outpost_bus_dropped", &[]), 1);
        let got: Vec<_> = (0..3).map(|_| rab.try_recv().unwrap().value).collect();
        assert_eq!(got, vec![Value::I64(1), Value::I64(2), Value::I64(3)]);
        drop(ra);
        bus.publish(&[s(a, 4)]);
        assert_eq!(rab.recv().await.unwrap().value, Value::I64(4));
    }
}
