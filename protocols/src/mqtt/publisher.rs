//! A small MQTT publisher (rumqttc, MQTT 3.1.1) for best-effort fan-out, such as the hub
//! republishing samples for other consumers. Publishing never blocks the caller: messages
//! go through a bounded queue, and when the broker is slow or away the newest are dropped
//! and counted (the caller's durable store — the hub's sink — remains the record).
//! Reconnects with exponential backoff and jitter (rumqttc has none of its own).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;

/// Where to publish.
#[derive(Debug, Clone)]
pub struct PublisherOptions {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    pub credentials: Option<(String, String)>,
    /// 0 or 1.
    pub qos: u8,
    /// Messages queued before new ones are dropped.
    pub queue: usize,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

/// Counters of a publisher.
#[derive(Debug, Default)]
pub struct PublisherStats {
    pub queued: AtomicU64,
    pub dropped: AtomicU64,
    pub reconnects: AtomicU64,
}

/// Handle; dropping every clone stops the publisher.
#[derive(Clone)]
pub struct MqttPublisher {
    tx: mpsc::Sender<(String, Vec<u8>)>,
    stats: Arc<PublisherStats>,
}

impl MqttPublisher {
    /// Starts the publisher's tasks (needs a tokio runtime).
    pub fn start(opts: PublisherOptions) -> MqttPublisher {
        let (tx, rx) = mpsc::channel(opts.queue.max(1));
        let stats = Arc::new(PublisherStats::default());
        tokio::spawn(run(opts, rx, stats.clone()));
        MqttPublisher { tx, stats }
    }

    /// Queues a message; returns false (and counts it) when the queue is full.
    pub fn publish(&self, topic: String, payload: Vec<u8>) -> bool {
        match self.tx.try_send((topic, payload)) {
            Ok(()) => {
                self.stats.queued.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(_) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    pub fn stats(&self) -> &PublisherStats {
        &self.stats
    }
}

async fn run(
    opts: PublisherOptions,
    mut rx: mpsc::Receiver<(String, Vec<u8>)>,
    stats: Arc<PublisherStats>,
) {
    let mut o = rumqttc::MqttOptions::new(&opts.client_id, &opts.host, opts.port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(1 << 20, 1 << 20);
    if let Some((u, p)) = &opts.credentials {
        o.set_credentials(u, p);
    }
    let (client, mut eventloop) = rumqttc::AsyncClient::new(o, 256);
    // Nagle's algorithm (rumqttc's default) would hold small publishes back.
    let mut net = eventloop.network_options();
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
    let qos = if opts.qos == 0 {
        rumqttc::QoS::AtMostOnce
    } else {
        rumqttc::QoS::AtLeastOnce
    };
    // The event loop runs in its own task, with backoff between failed polls.
    let poller = {
        let stats = stats.clone();
        tokio::spawn(async move {
            let mut delay = opts.backoff_initial;
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        delay = opts.backoff_initial;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        stats.reconnects.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(error = %e, retry_in = ?delay, "republish: MQTT connection failed");
                        let jitter = 0.8 + 0.2 * fastrand::f64();
                        tokio::time::sleep(delay.mul_f64(jitter)).await;
                        delay = (delay * 2).min(opts.backoff_max);
                    }
                }
            }
        })
    };
    while let Some((topic, payload)) = rx.recv().await {
        if client.publish(topic, qos, false, payload).await.is_err() {
            break;
        }
    }
    let _ = client.disconnect().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    poller.abort();
}
