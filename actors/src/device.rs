//! The device-stream actor: one per configured device connection, under the devices'
//! supervisor. It runs its protocol driver as a task; when the driver returns an error (or
//! panics) the actor fails, and the supervisor restarts it with backoff — a device fault
//! never reaches another device. Drivers are plain async functions given a
//! [`DeviceContext`]; everything protocol-specific lives in them.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use outpost_runtime::config::GatewayId;
use outpost_runtime::metrics::Metrics;
use outpost_runtime::model::Priority;
use outpost_runtime::supervisor::{ChildSpec, Restart};
use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::ingest::Ingest;

/// What a driver gets: where samples go and how to report.
#[derive(Clone)]
pub struct DeviceContext {
    /// Device name from config (metric label `device`).
    pub name: String,
    /// Priority class of the device's samples.
    pub priority: Priority,
    pub ingest: Ingest,
    pub metrics: Metrics,
    /// The gateway's id (e.g. for MQTT client ids).
    pub gateway_id: GatewayId,
}

/// A driver run: resolves when the device connection ends. `Err` makes the actor fail and
/// be restarted (with backoff); `Ok` ends it normally.
pub type DriverFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// Builds a driver run for a (re)started actor.
pub type DriverFn = Arc<dyn Fn(DeviceContext) -> DriverFuture + Send + Sync>;

/// Builds a run of any supervised task (a device driver with its context, the sync loop...).
pub type TaskFn = Arc<dyn Fn() -> DriverFuture + Send + Sync>;

/// The actor: owns one task (a device driver, the sync loop); fails when the task fails so
/// that its supervisor restarts it.
pub struct DeviceActor;

/// Messages the actor handles (only from its own driver task).
pub enum DeviceMsg {
    /// The driver task ended.
    Exited(Result<(), String>),
}

pub struct DeviceState {
    /// The driver task itself.
    driver: tokio::task::AbortHandle,
    /// Awaits the driver and reports its end to the actor.
    watcher: tokio::task::JoinHandle<()>,
}

impl Actor for DeviceActor {
    type Msg = DeviceMsg;
    type State = DeviceState;
    type Arguments = (String, TaskFn);

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        (name, task): Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let driver = tokio::spawn(task());
        let driver_abort = driver.abort_handle();
        let watcher = tokio::spawn(async move {
            // A panic in the driver is caught here and reported as a failure.
            let res = match driver.await {
                Ok(r) => r,
                Err(e) if e.is_panic() => Err(format!("driver panicked: {e}")),
                Err(_) => return, // aborted: the actor is stopping
            };
            if let Err(e) = &res {
                tracing::warn!(task = %name, error = %e, "supervised task failed");
            }
            let _ = myself.cast(DeviceMsg::Exited(res));
        });
        Ok(DeviceState {
            driver: driver_abort,
            watcher,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        _state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            DeviceMsg::Exited(Ok(())) => {
                myself.stop(Some("normal".into()));
                Ok(())
            }
            DeviceMsg::Exited(Err(e)) => Err(e.into()),
        }
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // Stop the driver and wait until it is gone (its resources — connections, the
        // outbox handle — are released when this returns).
        state.driver.abort();
        let _ = (&mut state.watcher).await;
        Ok(())
    }
}

/// The supervisor child spec of a device.
pub fn child_spec(ctx: DeviceContext, driver: DriverFn) -> ChildSpec {
    let name = format!("device:{}", ctx.name);
    let task: TaskFn = Arc::new(move || driver(ctx.clone()));
    task_child_spec(&name, task)
}

/// The supervisor child spec of any task run by a [`DeviceActor`].
pub fn task_child_spec(name: &str, task: TaskFn) -> ChildSpec {
    let n = name.to_owned();
    ChildSpec::actor(name, Restart::Permanent, move || {
        (DeviceActor, (n.clone(), task.clone()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Bus;
    use crate::ingest::IngestConfig;
    use outpost_runtime::model::{Sample, StreamId, Value};
    use outpost_runtime::storage::open_gateway_outbox;
    use outpost_runtime::supervisor::{BackoffPolicy, Strategy, SupervisorSpec};
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn a_failing_driver_is_restarted_and_a_panicking_one_too() {
        let dir = tempfile::tempdir().unwrap();
        let ob = Arc::new(open_gateway_outbox(dir.path(), 1 << 30, None).unwrap());
        let m = Metrics::new();
        let (ingest, _w) = Ingest::start(
            ob,
            IngestConfig::default(),
            Bus::new(&m),
            &m,
            Default::default(),
        );
        let runs = Arc::new(AtomicU32::new(0));
        let (done_tx, mut done_rx) = tokio::sync::mpsc::channel(1);
        let r = runs.clone();
        let driver: DriverFn = Arc::new(move |ctx: DeviceContext| {
            let n = r.fetch_add(1, Ordering::SeqCst);
            let done = done_tx.clone();
            Box::pin(async move {
                match n {
                    0 => Err("connection refused".into()),
                    1 => panic!("driver bug"),
                    _ => {
                        let s = StreamId::intern("device/test").unwrap();
                        ctx.ingest
                            .submit_durable(ctx.priority, vec![Sample::new(s, 1, Value::I64(1))])
                            .await
                            .map_err(|e| e.to_string())?;
                        let _ = done.send(()).await;
                        std::future::pending().await
                    }
                }
            })
        });
        let ctx = DeviceContext {
            name: "dev1".into(),
            priority: Priority::Normal,
            ingest,
            metrics: m.clone(),
            gateway_id: "gw".parse().unwrap(),
        };
        let spec = SupervisorSpec::new("devices-test", Strategy::OneForOne, m.clone())
            .with_backoff(BackoffPolicy::new(
                Duration::from_millis(10),
                Duration::from_millis(50),
                2.0,
                0.0,
            ))
            .child(child_spec(ctx, driver));
        let (sup, _join) = spec.spawn().await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), done_rx.recv())
            .await
            .unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        assert_eq!(
            m.counter_value(
                "outpost_restarts",
                &[("supervisor", "devices-test"), ("child", "device:dev1")]
            ),
            2
        );
        outpost_runtime::supervisor::shutdown(&sup, Duration::from_secs(5))
            .await
            .unwrap();
    }
}
