//! Supervision behaviour with real ractor actors: restarts after a panic, an `Err` and an
//! abnormal stop; transient and temporary children; one-for-one vs one-for-all; backoff;
//! restart storms escalating through two levels; metrics; ordered shutdown.
//!
//! Every wait is on a channel or an actor's exit, bounded by a timeout.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outpost_runtime::metrics::Metrics;
use outpost_runtime::supervisor::{
    BackoffPolicy, ChildInfo, ChildSpec, ESCALATIONS_METRIC, RESTARTS_METRIC, Restart, Strategy,
    SupervisorMsg, SupervisorSpec, children, shutdown,
};
use ractor::{
    Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, ActorStatus, SpawnErr,
    SupervisionEvent,
};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(2);

/// What the test workers report: starts (name, actor id) on a channel, start counts, and
/// the order of orderly stops.
#[derive(Clone)]
struct Probe {
    started: mpsc::UnboundedSender<(String, ActorId)>,
    starts: Arc<Mutex<HashMap<String, u32>>>,
    stopped: Arc<Mutex<Vec<String>>>,
}

impl Probe {
    fn new() -> (Probe, mpsc::UnboundedReceiver<(String, ActorId)>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let p = Probe {
            started: tx,
            starts: Arc::default(),
            stopped: Arc::default(),
        };
        (p, rx)
    }

    fn starts(&self, name: &str) -> u32 {
        self.starts.lock().unwrap().get(name).copied().unwrap_or(0)
    }

    fn stopped(&self) -> Vec<String> {
        self.stopped.lock().unwrap().clone()
    }
}

struct Worker;

struct WorkerArgs {
    name: String,
    probe: Probe,
    crash_on_start: bool,
}

enum WorkerMsg {
    Panic,
    Fail,
    Stop(Option<String>),
}

impl Actor for Worker {
    type Msg = WorkerMsg;
    type State = WorkerArgs;
    type Arguments = WorkerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<WorkerMsg>,
        args: WorkerArgs,
    ) -> Result<WorkerArgs, ActorProcessingErr> {
        *args
            .probe
            .starts
            .lock()
            .unwrap()
            .entry(args.name.clone())
            .or_default() += 1;
        let _ = args
            .probe
            .started
            .send((args.name.clone(), myself.get_id()));
        Ok(args)
    }

    async fn post_start(
        &self,
        _myself: ActorRef<WorkerMsg>,
        state: &mut WorkerArgs,
    ) -> Result<(), ActorProcessingErr> {
        if state.crash_on_start {
            return Err(format!("{} crashes on start", state.name).into());
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<WorkerMsg>,
        msg: WorkerMsg,
        state: &mut WorkerArgs,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            WorkerMsg::Panic => panic!("{} panics on purpose", state.name),
            WorkerMsg::Fail => Err(format!("{} fails on purpose", state.name).into()),
            WorkerMsg::Stop(reason) => {
                myself.stop(reason);
                Ok(())
            }
        }
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<WorkerMsg>,
        state: &mut WorkerArgs,
    ) -> Result<(), ActorProcessingErr> {
        state.probe.stopped.lock().unwrap().push(state.name.clone());
        Ok(())
    }
}

fn worker_spec(name: &str, restart: Restart, probe: &Probe, crash_on_start: bool) -> ChildSpec {
    let probe = probe.clone();
    let n = name.to_owned();
    ChildSpec::actor(name, restart, move || {
        (
            Worker,
            WorkerArgs {
                name: n.clone(),
                probe: probe.clone(),
                crash_on_start,
            },
        )
    })
}

fn worker(name: &str, restart: Restart, probe: &Probe) -> ChildSpec {
    worker_spec(name, restart, probe, false)
}

fn fast_backoff() -> BackoffPolicy {
    BackoffPolicy::new(
        Duration::from_millis(2),
        Duration::from_millis(20),
        2.0,
        0.5,
    )
}

fn sup(name: &str, strategy: Strategy, metrics: &Metrics) -> SupervisorSpec {
    SupervisorSpec::new(name, strategy, metrics.clone())
        .with_intensity(10, Duration::from_secs(10))
        .with_backoff(fast_backoff())
}

async fn next_start(rx: &mut mpsc::UnboundedReceiver<(String, ActorId)>) -> (String, ActorId) {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("no child start within the timeout")
        .expect("probe channel closed")
}

/// Drains the start events of the initial children.
async fn initial_starts(rx: &mut mpsc::UnboundedReceiver<(String, ActorId)>, n: usize) {
    for _ in 0..n {
        next_start(rx).await;
    }
}

async fn child_infos(s: &ActorRef<SupervisorMsg>) -> Vec<ChildInfo> {
    children(s, WAIT).await.unwrap()
}

async fn cell_of(s: &ActorRef<SupervisorMsg>, name: &str) -> ActorCell {
    child_infos(s)
        .await
        .into_iter()
        .find(|c| c.name == name)
        .and_then(|c| c.cell)
        .unwrap_or_else(|| panic!("child {name} is not running"))
}

fn restarts(m: &Metrics, supervisor: &str, child: &str) -> u64 {
    m.counter_value(
        RESTARTS_METRIC,
        &[("supervisor", supervisor), ("child", child)],
    )
}

fn escalations(m: &Metrics, supervisor: &str) -> u64 {
    m.counter_value(ESCALATIONS_METRIC, &[("supervisor", supervisor)])
}

#[tokio::test]
async fn child_that_panics_in_handle_is_restarted() {
    let m = Metrics::new();
    let (probe, mut rx) = Probe::new();
    let (s, _) = sup("panic-sup", Strategy::OneForOne, &m)
        .child(worker("w", Restart::Permanent, &probe))
        .spawn()
        .await
        .unwrap();
    let (_, first) = next_start(&mut rx).await;

    cell_of(&s, "w")
        .await
        .send_message(WorkerMsg::Panic)
        .unwrap();
    let (name, second) = next_start(&mut rx).await;

    assert_eq!(name, "w");
    assert_ne!(first, second);
    assert_eq!(cell_of(&s, "w").await.get_id(), second);
    assert_eq!(probe.starts("w"), 2);
    assert_eq!(restarts(&m, "panic-sup", "w"), 1);
    assert!(
        m.encode()
            .contains(r#"outpost_restarts_total{supervisor="panic-sup",child="w"} 1"#),
        "{}",
        m.encode()
    );
    shutdown(&s, WAIT).await.unwrap();
}

#[tokio::test]
async fn child_that_returns_err_is_restarted() {
    let m = Metrics::new();
    let (probe, mut rx) = Probe::new();
    let (s, _) = sup("err-sup", Strategy::OneForOne, &m)
        .child(worker("w", Restart::Transient, &probe))
        .spawn()
        .await
        .unwrap();
    let (_, first) = next_start(&mut rx).await;

    cell_of(&s, "w")
        .await
        .send_message(WorkerMsg::Fail)
        .unwrap();
    let (_, second) = next_start(&mut rx).await;

    assert_ne!(first, second);
    assert_eq!(probe.starts("w"), 2);
    assert_eq!(restarts(&m, "err-sup", "w"), 1);
    shutdown(&s, WAIT).await.unwrap();
}

#[tokio::test]
async fn transient_child_that_stops_normally_is_not_restarted() {
    let m = Metrics::new();
    let (probe, mut rx) = Probe::new();
    let (s, _) = sup("transient-sup", Strategy::OneForOne, &m)
        .child(worker("t", Restart::Transient, &probe))
        .child(worker("p", Restart::Permanent, &probe))
        .spawn()
        .await
        .unwrap();
    initial_starts(&mut rx, 2).await;

    let t = cell_of(&s, "t").await;
    t.send_message(WorkerMsg::Stop(None)).unwrap();
    t.wait(Some(WAIT)).await.unwrap();
    // The exit event is in the supervisor's supervision port (which it serves before
    // ordinary messages) by the time `t` reports Stopped, so this query sees its effect.
    let infos = child_infos(&s).await;
    let t_info = infos.iter().find(|c| c.name == "t").unwrap();
    assert!(t_info.cell.is_none());
    assert!(
        !t_info.restart_pending,
        "a normal exit of a transient child must not schedule a restart"
    );
    assert_eq!(probe.starts("t"), 1);
    assert_eq!(restarts(&m, "transient-sup", "t"), 0);
    assert!(rx.try_recv().is_err());

    // The supervisor kept running (ractor's default would have stopped it).
    assert_eq!(s.get_status(), ActorStatus::Running);
    shutdown(&s, WAIT).await.unwrap();
}

#[tokio::test]
async fn transient_child_stopped_with_an_abnormal_reason_is_restarted() {
    let m = Metrics::new();
    let (probe, mut rx) = Probe::new();
    let (s, _) = sup("transient-abn-sup", Strategy::OneForOne, &m)
        .child(worker("t", Restart::Transient, &probe))
        .spawn()
        .await
        .unwrap();
    initial_starts(&mut rx, 1).await;

    cell_of(&s, "t")
        .await
        .send_message(WorkerMsg::Stop(Some("device unreachable".into())))
        .unwrap();
    let (name, _) = next_start(&mut rx).await;
    assert_eq!(name, "t");
    assert_eq!(restarts(&m, "transient-abn-sup", "t"), 1);
    shutdown(&s, WAIT).await.unwrap();
}

#[tokio::test]
async fn temporary_child_is_never_restarted_and_is_forgotten() {
    let m = Metrics::new();
    let (probe, mut rx) = Probe::new();
    let (s, _) = sup("temp-sup", Strategy::OneForOne, &m)
        .child(worker("tmp", Restart::Temporary, &probe))
        .child(worker("p", Restart::Permanent, &probe))
        .spawn()
        .await
        .unwrap();
    initial_starts(&mut rx, 2).await;

    let tmp = cell_of(&s, "tmp").await;
    tmp.send_message(WorkerMsg::Fail).unwrap();
    tmp.wait(Some(WAIT)).await.unwrap();
    let names: Vec<String> = child_infos(&s).await.into_iter().map(|c| c.name).collect();
    assert_eq!(names, vec!["p".to_owned()]);
    assert_eq!(probe.starts("tmp"), 1);
    assert_eq!(restarts(&m, "temp-sup", "tmp"), 0);
    shutdown(&s, WAIT).await.unwrap();
}

#[tokio::test]
async fn one_for_one_leaves_siblings_untouched() {
    let m = Metrics::new();
    let (probe, mut rx) = Probe::new();
    let (s, _) = sup("ofo-sup", Strategy::OneForOne, &m)
        .child(worker("a", Restart::Permanent, &probe))
        .child(worker("b", Restart::Permanent, &probe))
        .child(worker("c", Restart::Permanent, &probe))
        .spawn()
        .await
        .unwrap();
    initial_starts(&mut rx, 3).await;
    let a = cell_of(&s, "a").await.get_id();
    let b = cell_of(&s, "b").await.get_id();
    let c = cell_of(&s, "c").await.get_id();

    cell_of(&s, "b")
        .await
        .send_message(WorkerMsg::Fail)
        .unwrap();
    let (name, b2) = next_start(&mut rx).await;

    assert_eq!(name, "b");
    assert_ne!(b, b2);
    assert_eq!(cell_of(&s, "a").await.get_id(), a);
    assert_eq!(cell_of(&s, "c").await.get_id(), c);
    assert_eq!(
        (probe.starts("a"), probe.starts("b"), probe.starts("c")),
        (1, 2, 1)
    );
    assert!(probe.stopped().is_empty(), "no sibling was stopped");
    assert_eq!(restarts(&m, "ofo-sup", "a"), 0);
    assert_eq!(restarts(&m, "ofo-sup", "b"), 1);
    shutdown(&s, WAIT).await.unwrap();
}

#[tokio::test]
async fn one_for_all_restarts_every_child_in_start_order() {
    let m = Metrics::new();
    let (probe, mut rx) = Probe::new();
    let (s, _) = sup("ofa-sup", Strategy::OneForAll, &m)
        .child(worker("a", Restart::Permanent, &probe))
        .child(worker("b", Restart::Permanent, &probe))
        .child(worker("c", Restart::Permanent, &probe))
        .spawn()
        .await
        .unwrap();
    initial_starts(&mut rx, 3).await;
    let old: Vec<ActorCell> = child_infos(&s)
        .await
        .into_iter()
        .map(|c| c.cell.unwrap())
        .collect();

    old[1].send_message(WorkerMsg::Panic).unwrap();
    let mut order = Vec::new();
    for _ in 0..3 {
        order.push(next_start(&mut rx).await);
    }

    let names: Vec<&str> = order.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, vec!["a", "b", "c"]);
    for (old_cell, (_, new_id)) in old.iter().zip(&order) {
        assert_ne!(old_cell.get_id(), *new_id);
        assert_eq!(old_cell.get_status(), ActorStatus::Stopped);
    }
    // The running siblings were stopped in reverse start order (b had already failed).
    assert_eq!(probe.stopped(), vec!["c".to_owned(), "a".to_owned()]);
    assert_eq!(
        (probe.starts("a"), probe.starts("b"), probe.starts("c")),
        (2, 2, 2)
    );
    for child in ["a", "b", "c"] {
        assert_eq!(restarts(&m, "ofa-sup", child), 1);
    }
    shutdown(&s, WAIT).await.unwrap();
}

#[tokio::test]
async fn restarts_wait_for_a_growing_backoff() {
    let m = Metrics::new();
    let (probe, mut rx) = Probe::new();
    let backoff = BackoffPolicy::new(Duration::from_millis(150), Duration::from_secs(1), 2.0, 0.0);
    let (s, _) = sup("backoff-sup", Strategy::OneForOne, &m)
        .with_backoff(backoff)
        .child(worker("w", Restart::Permanent, &probe))
        .spawn()
        .await
        .unwrap();
    initial_starts(&mut rx, 1).await;

    let t0 = Instant::now();
    cell_of(&s, "w")
        .await
        .send_message(WorkerMsg::Fail)
        .unwrap();
    next_start(&mut rx).await;
    let first = t0.elapsed();
    let t1 = Instant::now();
    cell_of(&s, "w")
        .await
        .send_message(WorkerMsg::Fail)
        .unwrap();
    // During the backoff the supervisor keeps answering (the delay does not block its
    // mailbox) and reports the restart as pending.
    let w = cell_of_maybe_pending(&s, "w").await;
    assert!(w.restart_pending && w.cell.is_none());
    next_start(&mut rx).await;
    let second = t1.elapsed();

    assert!(
        first >= Duration::from_millis(150),
        "first restart after {first:?}"
    );
    assert!(
        second >= Duration::from_millis(300),
        "second restart after {second:?}"
    );
    assert_eq!(restarts(&m, "backoff-sup", "w"), 2);
    shutdown(&s, WAIT).await.unwrap();
}

/// Queries the supervisor until the child shows up as down with a restart pending.
async fn cell_of_maybe_pending(s: &ActorRef<SupervisorMsg>, name: &str) -> ChildInfo {
    let deadline = Instant::now() + WAIT;
    loop {
        let info = child_infos(s)
            .await
            .into_iter()
            .find(|c| c.name == name)
            .unwrap();
        if info.restart_pending || Instant::now() > deadline {
            return info;
        }
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn failed_restart_is_retried_with_backoff() {
    let m = Metrics::new();
    let (probe, mut rx) = Probe::new();
    let attempts = Arc::new(AtomicU32::new(0));
    let (p, a) = (probe.clone(), Arc::clone(&attempts));
    // The second start (the first restart) is refused; the third succeeds.
    let flaky = ChildSpec::new("flaky", Restart::Permanent, move |sup: ActorCell| {
        let n = a.fetch_add(1, Ordering::SeqCst);
        let p = p.clone();
        async move {
            if n == 1 {
                return Err(SpawnErr::StartupFailed("device refused the session".into()));
            }
            let args = WorkerArgs {
                name: "flaky".into(),
                probe: p,
                crash_on_start: false,
            };
            let (r, _) = Worker::spawn_linked(None, Worker, args, sup).await?;
            Ok(r.get_cell())
        }
    });
    let (s, _) = sup("flaky-sup", Strategy::OneForOne, &m)
        .child(flaky)
        .spawn()
        .await
        .unwrap();
    initial_starts(&mut rx, 1).await;

    cell_of(&s, "flaky")
        .await
        .send_message(WorkerMsg::Fail)
        .unwrap();
    next_start(&mut rx).await;

    assert_eq!(attempts.load(Ordering::SeqCst), 3);
    assert_eq!(restarts(&m, "flaky-sup", "flaky"), 2);
    shutdown(&s, WAIT).await.unwrap();
}

/// Stands in for the parent of a supervisor tree: reports its children's exits.
struct Observer;

impl Actor for Observer {
    type Msg = ();
    type State = mpsc::UnboundedSender<String>;
    type Arguments = (SupervisorSpec, mpsc::UnboundedSender<String>);

    async fn pre_start(
        &self,
        myself: ActorRef<()>,
        (spec, tx): Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        spec.spawn_linked(myself.get_cell()).await?;
        Ok(tx)
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<()>,
        evt: SupervisionEvent,
        tx: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match evt {
            SupervisionEvent::ActorFailed(_, e) => {
                let _ = tx.send(format!("failed: {e}"));
            }
            SupervisionEvent::ActorTerminated(_, _, r) => {
                let _ = tx.send(format!("terminated: {r:?}"));
            }
            _ => {}
        }
        Ok(())
    }
}

#[tokio::test]
async fn restart_storm_escalates_through_two_levels() {
    let m = Metrics::new();
    let (probe, _rx) = Probe::new();
    // inner: a child that fails right after every start; 2 restarts allowed.
    let inner = sup("storm-inner", Strategy::OneForOne, &m)
        .with_intensity(2, Duration::from_secs(10))
        .child(worker_spec("crashy", Restart::Permanent, &probe, true))
        .child(worker("steady", Restart::Permanent, &probe));
    // middle: restarts inner once, then gives up too.
    let middle = sup("storm-middle", Strategy::OneForOne, &m)
        .with_intensity(1, Duration::from_secs(10))
        .child(inner.into_child(Restart::Permanent));
    let (tx, mut events) = mpsc::unbounded_channel();
    let (observer, _) = Actor::spawn(None, Observer, (middle, tx)).await.unwrap();

    let event = tokio::time::timeout(WAIT, events.recv())
        .await
        .expect("the top of the tree saw no escalation")
        .unwrap();

    assert!(event.starts_with("failed:"), "{event}");
    assert!(
        event.contains("storm-middle") && event.contains("intensity"),
        "{event}"
    );
    // inner escalated twice (its first incarnation and the one middle restarted), each
    // after 2 restarts of crashy; middle restarted inner once and then escalated.
    assert_eq!(restarts(&m, "storm-inner", "crashy"), 4);
    assert_eq!(escalations(&m, "storm-inner"), 2);
    assert_eq!(restarts(&m, "storm-middle", "storm-inner"), 1);
    assert_eq!(escalations(&m, "storm-middle"), 1);
    assert_eq!(probe.starts("crashy"), 6);
    // Escalating supervisors stop their remaining children in an orderly way first.
    assert_eq!(probe.stopped().iter().filter(|n| *n == "steady").count(), 2);
    observer.stop(None);
}

#[tokio::test]
async fn shutdown_stops_children_in_reverse_start_order_recursively() {
    let m = Metrics::new();
    let (probe, mut rx) = Probe::new();
    let nested = sup("shut-nested", Strategy::OneForAll, &m)
        .child(worker("x", Restart::Permanent, &probe))
        .child(worker("y", Restart::Permanent, &probe));
    let (s, join) = sup("shut-root", Strategy::OneForOne, &m)
        .child(worker("a", Restart::Permanent, &probe))
        .child(worker("b", Restart::Permanent, &probe))
        .child(nested.into_child(Restart::Permanent))
        .spawn()
        .await
        .unwrap();
    initial_starts(&mut rx, 4).await;
    let cells: Vec<ActorCell> = child_infos(&s)
        .await
        .into_iter()
        .map(|c| c.cell.unwrap())
        .collect();

    shutdown(&s, WAIT).await.unwrap();
    tokio::time::timeout(WAIT, join).await.unwrap().unwrap();

    assert_eq!(probe.stopped(), vec!["y", "x", "b", "a"]);
    assert_eq!(s.get_status(), ActorStatus::Stopped);
    for c in cells {
        assert_eq!(c.get_status(), ActorStatus::Stopped);
    }
    for child in ["a", "b", "x", "y"] {
        assert_eq!(
            probe.starts(child),
            1,
            "{child} was restarted during shutdown"
        );
    }
    // Shutting down an already stopped supervisor is fine.
    shutdown(&s, WAIT).await.unwrap();
}

#[tokio::test]
async fn a_child_failing_to_start_fails_the_supervisor_start() {
    let m = Metrics::new();
    let (probe, mut rx) = Probe::new();
    let refuse = ChildSpec::new("refuse", Restart::Permanent, |_sup: ActorCell| async {
        Err(SpawnErr::StartupFailed("no such device".into()))
    });
    let res = sup("start-fail-sup", Strategy::OneForOne, &m)
        .child(worker("a", Restart::Permanent, &probe))
        .child(refuse)
        .spawn()
        .await;
    let err = res.expect_err("the supervisor must not start").to_string();
    assert!(err.contains("refuse"), "{err}");
    initial_starts(&mut rx, 1).await;
    assert_eq!(probe.stopped(), vec!["a"]);
}
