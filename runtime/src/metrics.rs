//! One metrics registry for the whole process, exported in the Prometheus text format
//! over HTTP (`GET /metrics`).
//!
//! Actors ask the [`Metrics`] handle for a counter or gauge by name and label set, keep the
//! returned handle, and update it lock-free. A name has one kind and one help text, so
//! one meaning: registering it again as another kind or with another help is a bug
//! (a panic in debug builds, an error log once in release builds, the first kept). Metric names are `'static` literals chosen by
//! our code; label values may come from config or the network (stream names), which are
//! bounded by the stream interner.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Label set of a metric: `(name, value)` pairs.
pub type Labels = Vec<(String, String)>;
/// A floating-point gauge.
pub type FloatGauge = Gauge<f64, AtomicU64>;

#[derive(Default)]
struct Inner {
    registry: Registry,
    /// Kind and help of every name registered, to keep each name to one meaning.
    meanings: HashMap<&'static str, (&'static str, &'static str)>,
    /// Names already logged as registered with two meanings.
    conflicts: std::collections::HashSet<&'static str>,
    counters: HashMap<&'static str, Family<Labels, Counter>>,
    gauges: HashMap<&'static str, Family<Labels, Gauge>>,
    fgauges: HashMap<&'static str, Family<Labels, FloatGauge>>,
}

/// Cheap-to-clone handle on the process's metric registry.
#[derive(Clone, Default)]
pub struct Metrics {
    inner: Arc<Mutex<Inner>>,
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks that `name` keeps the kind and help it was first registered with.
    fn one_meaning(inner: &mut Inner, name: &'static str, kind: &'static str, help: &'static str) {
        let first = *inner.meanings.entry(name).or_insert((kind, help));
        if first != (kind, help) {
            debug_assert!(
                false,
                "metric {name} registered with two meanings: {first:?} and {:?}",
                (kind, help)
            );
            // Logged once per name: the rest would repeat it.
            if !inner.conflicts.insert(name) {
                return;
            }
            tracing::error!(
                metric = name,
                first = ?first,
                again = ?(kind, help),
                "a metric name registered with two meanings"
            );
        }
    }

    /// A counter (exported as `NAME_total`). Same name and labels → same counter. `help` is
    /// a phrase without a final period (the encoder adds one).
    pub fn counter(&self, name: &'static str, help: &'static str, l: &[(&str, &str)]) -> Counter {
        let mut inner = self.lock();
        let inner = &mut *inner;
        Self::one_meaning(inner, name, "counter", help);
        let fam = inner.counters.entry(name).or_insert_with(|| {
            let f = Family::<Labels, Counter>::default();
            inner.registry.register(name, help, f.clone());
            f
        });
        fam.get_or_create(&labels(l)).clone()
    }

    /// An integer gauge.
    pub fn gauge(&self, name: &'static str, help: &'static str, l: &[(&str, &str)]) -> Gauge {
        let mut inner = self.lock();
        let inner = &mut *inner;
        Self::one_meaning(inner, name, "gauge", help);
        let fam = inner.gauges.entry(name).or_insert_with(|| {
            let f = Family::<Labels, Gauge>::default();
            inner.registry.register(name, help, f.clone());
            f
        });
        fam.get_or_create(&labels(l)).clone()
    }

    /// A floating-point gauge.
    pub fn float_gauge(
        &self,
        name: &'static str,
        help: &'static str,
        l: &[(&str, &str)],
    ) -> FloatGauge {
        let mut inner = self.lock();
        let inner = &mut *inner;
        Self::one_meaning(inner, name, "float gauge", help);
        let fam = inner.fgauges.entry(name).or_insert_with(|| {
            let f = Family::<Labels, FloatGauge>::default();
            inner.registry.register(name, help, f.clone());
            f
        });
        fam.get_or_create(&labels(l)).clone()
    }

    /// Current value of a counter, or 0 if it was never created (for tests and reports).
    pub fn counter_value(&self, name: &'static str, l: &[(&str, &str)]) -> u64 {
        let inner = self.lock();
        inner
            .counters
            .get(name)
            .and_then(|f| f.get(&labels(l)).map(|c| c.get()))
            .unwrap_or(0)
    }

    /// Current value of an integer gauge, or `None` if it was never created.
    pub fn gauge_value(&self, name: &'static str, l: &[(&str, &str)]) -> Option<i64> {
        let inner = self.lock();
        inner
            .gauges
            .get(name)
            .and_then(|f| f.get(&labels(l)).map(|g| g.get()))
    }

    /// The whole registry in the Prometheus text exposition format.
    pub fn encode(&self) -> String {
        let inner = self.lock();
        let mut out = String::new();
        if encode(&mut out, &inner.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Serves `GET /metrics` on `addr` until the returned task is aborted. Returns the bound
/// address (useful with port 0).
pub async fn serve(
    metrics: Metrics,
    addr: SocketAddr,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::service::service_fn;
    use hyper::{Request, Response, StatusCode};
    use hyper_util::rt::TokioIo;

    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics endpoint: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let metrics = metrics.clone();
                    async move {
                        let resp = if req.uri().path() == "/metrics" {
                            Response::builder()
                                .header(
                                    "content-type",
                                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                )
                                .body(Full::new(Bytes::from(metrics.encode())))
                        } else {
                            Response::builder()
                                .status(StatusCode::NOT_FOUND)
                                .body(Full::new(Bytes::from_static(b"try /metrics\n")))
                        };
                        resp.map_err(std::io::Error::other)
                    }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .max_buf_size(16 * 1024)
                    .serve_connection(TokioIo::new(stream), svc);
                if let Err(e) = tokio::time::timeout(std::time::Duration::from_secs(30), conn)
                    .await
                    .unwrap_or(Ok(()))
                {
                    tracing::debug!(error = %e, "metrics endpoint: connection error");
                }
            });
        }
    });
    Ok((local, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "registered with two meanings")]
    fn a_name_registered_with_another_help_is_a_bug() {
        let m = Metrics::new();
        m.counter("outpost_test_samples", "Samples read", &[("device", "a")]);
        m.counter("outpost_test_samples", "Samples stored", &[("device", "b")]);
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "registered with two meanings")]
    fn a_name_registered_as_another_kind_is_a_bug() {
        let m = Metrics::new();
        m.counter("outpost_test_depth", "Depth", &[]);
        m.gauge("outpost_test_depth", "Depth", &[]);
    }

    #[test]
    fn gauge_values_are_read_back() {
        let m = Metrics::new();
        assert_eq!(m.gauge_value("outpost_test_level", &[]), None);
        m.gauge("outpost_test_level", "Level", &[]).set(3);
        assert_eq!(m.gauge_value("outpost_test_level", &[]), Some(3));
    }

    #[test]
    fn counters_and_gauges_encode() {
        let m = Metrics::new();
        m.counter("outpost_test_events", "Test events", &[("stream", "a")])
            .inc_by(3);
        m.counter("outpost_test_events", "Test events", &[("stream", "a")])
            .inc();
        m.gauge("outpost_test_depth", "Depth", &[]).set(7);
        m.float_gauge("outpost_test_ratio", "Ratio", &[("x", "y")])
            .set(0.5);
        let text = m.encode();
        assert!(
            text.contains("outpost_test_events_total{stream=\"a\"} 4"),
            "{text}"
        );
        assert!(text.contains("outpost_test_depth{} 7"), "{text}");
        assert!(text.contains("outpost_test_ratio{x=\"y\"} 0.5"), "{text}");
        assert_eq!(
            m.counter_value("outpost_test_events", &[("stream", "a")]),
            4
        );
        assert_eq!(
            m.counter_value("outpost_test_events", &[("stream", "b")]),
            0
        );
    }

    #[tokio::test]
    async fn http_endpoint_serves_metrics() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let m = Metrics::new();
        m.counter("outpost_http_test", "Test", &[]).inc();
        let (addr, task) = serve(m, "127.0.0.1:0".parse().unwrap()).await.unwrap();
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).await.unwrap();
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        assert!(body.contains("outpost_http_test_total{} 1"), "{body}");
        task.abort();
    }
}
