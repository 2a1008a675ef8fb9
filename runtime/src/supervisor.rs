//! OTP-style supervision over ractor.
//!
//! ractor has no restart strategy: its default `handle_supervisor_evt` stops the supervisor
//! as soon as any child stops or fails. [`Supervisor`] replaces that with Erlang/OTP
//! semantics:
//!
//! - **Strategies**: [`Strategy::OneForOne`] restarts only the child that exited;
//!   [`Strategy::OneForAll`] stops the other running children (in reverse start order) and
//!   restarts every non-temporary child in start order.
//! - **Restart types**: [`Restart::Permanent`] children are always restarted,
//!   [`Restart::Transient`] ones only after an abnormal exit (a panic, an `Err`, or a stop
//!   whose reason is not one of [`NORMAL_REASONS`]), [`Restart::Temporary`] ones never.
//! - **Restart intensity**: at most `max_restarts` restarts within `period`, counted per
//!   supervisor (a one-for-all group restart counts once). One more and the supervisor stops
//!   its children in reverse start order and fails, so ractor reports `ActorFailed` to its
//!   parent: the failure escalates.
//! - **Backoff**: each restart is delayed by an exponential backoff with jitter, scheduled
//!   with `send_after` so the supervisor's mailbox keeps flowing. A child's backoff goes back
//!   to the initial delay when its last run lasted at least [`BackoffPolicy::reset_after`]
//!   (by default the maximum delay: a child that outlived the longest pause we would impose
//!   counts as having been stable). A one-for-all group restart waits for the backoff of the
//!   child whose exit triggered it. A restart whose start function fails counts as another
//!   abnormal exit: it uses up intensity and is retried after the next backoff.
//! - **Observability**: every restart decision is logged (child, reason, attempt, delay);
//!   every restart attempt increments `outpost_restarts{supervisor,child}` and every
//!   escalation `outpost_supervisor_escalations{supervisor}`.
//! - **Shutdown**: stopping the supervisor (see [`shutdown`]) stops its children in reverse
//!   start order, each within its own shutdown timeout (then killed), before the supervisor
//!   itself exits; awaiting [`shutdown`] awaits the whole subtree.
//!
//! The decisions (intensity window, backoff, which children to restart) live in plain types
//! ([`RestartWindow`], [`Backoff`], [`plan`]) with no I/O; the actor only wires them to ractor.
//! Supervisors nest: [`SupervisorSpec::into_child`] turns one into a child spec.
//!
//! Children must be spawned *linked* to the supervisor cell their start function receives,
//! otherwise their exits are never seen. Supervisors and the children started through
//! [`ChildSpec::actor`] are not registered by name (ractor's registry is process-global).

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use ractor::concurrency::JoinHandle;
use ractor::{
    Actor, ActorCell, ActorProcessingErr, ActorRef, MessagingErr, RactorErr, RpcReplyPort,
    SpawnErr, SupervisionEvent,
};

use crate::metrics::Metrics;

/// Metric counting restart attempts, labelled `supervisor` and `child`.
pub const RESTARTS_METRIC: &str = "outpost_restarts";
/// Metric counting supervisors that exceeded their restart intensity, labelled `supervisor`.
pub const ESCALATIONS_METRIC: &str = "outpost_supervisor_escalations";
/// Stop reasons that count as a normal exit (besides no reason at all). `Drained` is what
/// ractor reports after a deliberate drain.
pub const NORMAL_REASONS: [&str; 3] = ["normal", "shutdown", "Drained"];
/// The reason the supervisor gives when it stops a child itself.
pub const SHUTDOWN_REASON: &str = "shutdown";

// ---------------------------------------------------------------------------------------
// Pure decision logic
// ---------------------------------------------------------------------------------------

/// Which children a supervisor restarts when one of them has to be restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Only the child that exited.
    OneForOne,
    /// All non-temporary children, after stopping the ones still running.
    OneForAll,
}

/// When a child is restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// Always.
    Permanent,
    /// Only after an abnormal exit.
    Transient,
    /// Never; forgotten once it exits.
    Temporary,
}

/// How a child exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Stopped with no reason or one of [`NORMAL_REASONS`].
    Normal,
    /// Panicked, returned `Err`, failed to start, was killed, or stopped with another reason.
    Abnormal,
}

impl Exit {
    /// Classifies the reason carried by ractor's `ActorTerminated`.
    pub fn from_stop_reason(reason: Option<&str>) -> Exit {
        match reason {
            None => Exit::Normal,
            Some(r) if NORMAL_REASONS.contains(&r) => Exit::Normal,
            Some(_) => Exit::Abnormal,
        }
    }
}

impl Restart {
    /// Whether a child of this type is restarted after `exit`.
    pub fn should_restart(self, exit: Exit) -> bool {
        match self {
            Restart::Permanent => true,
            Restart::Transient => exit == Exit::Abnormal,
            Restart::Temporary => false,
        }
    }
}

/// What the supervisor does after child `who` exited. Indices refer to the children in
/// start order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Leave the child down; `forget` removes it (temporary children).
    Leave { forget: bool },
    /// Stop `stop` (in that order: reverse start order), forget `forget` (temporary
    /// children caught in a group restart), then after the backoff start `start` in order.
    Restart {
        stop: Vec<usize>,
        forget: Vec<usize>,
        start: Vec<usize>,
    },
}

/// Decides what to do when child `who` (of `kinds`, in start order; `running[i]` tells
/// whether child `i` is currently running) exits with `exit`.
///
/// Under one-for-all, as in OTP, every non-temporary child is restarted, including transient
/// children that had finished normally earlier; temporary children are stopped and forgotten.
pub fn plan(
    strategy: Strategy,
    kinds: &[Restart],
    running: &[bool],
    who: usize,
    exit: Exit,
) -> Plan {
    let kind = kinds.get(who).copied().unwrap_or(Restart::Temporary);
    if !kind.should_restart(exit) {
        return Plan::Leave {
            forget: kind == Restart::Temporary,
        };
    }
    match strategy {
        Strategy::OneForOne => Plan::Restart {
            stop: Vec::new(),
            forget: Vec::new(),
            start: vec![who],
        },
        Strategy::OneForAll => {
            let stop = (0..kinds.len())
                .rev()
                .filter(|&i| i != who && running.get(i).copied().unwrap_or(false))
                .collect();
            let forget = (0..kinds.len())
                .filter(|&i| kinds[i] == Restart::Temporary)
                .collect();
            let start = (0..kinds.len())
                .filter(|&i| kinds[i] != Restart::Temporary)
                .collect();
            Plan::Restart {
                stop,
                forget,
                start,
            }
        }
    }
}

/// Restart intensity: at most `max_restarts` restarts within `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Intensity {
    pub max_restarts: u32,
    pub period: Duration,
}

impl Default for Intensity {
    /// 3 restarts in 5 seconds.
    fn default() -> Self {
        Intensity {
            max_restarts: 3,
            period: Duration::from_secs(5),
        }
    }
}

/// Sliding window of recent restart times enforcing an [`Intensity`].
#[derive(Debug, Clone)]
pub struct RestartWindow {
    limit: Intensity,
    stamps: VecDeque<Instant>,
}

impl RestartWindow {
    pub fn new(limit: Intensity) -> Self {
        RestartWindow {
            limit,
            stamps: VecDeque::new(),
        }
    }

    /// Records a restart at `now`. Returns `false` when it is one too many: more than
    /// `max_restarts` restarts within the last `period` (the supervisor must escalate).
    pub fn record(&mut self, now: Instant) -> bool {
        while let Some(&first) = self.stamps.front() {
            if now.saturating_duration_since(first) >= self.limit.period {
                self.stamps.pop_front();
            } else {
                break;
            }
        }
        self.stamps.push_back(now);
        // Never hold more than max_restarts + 1 stamps, whatever the caller does.
        let cap = usize::try_from(self.limit.max_restarts)
            .unwrap_or(usize::MAX)
            .saturating_add(1);
        while self.stamps.len() > cap {
            self.stamps.pop_front();
        }
        self.stamps.len() < cap
    }

    /// Restarts currently inside the window (as of the last `record`).
    pub fn len(&self) -> usize {
        self.stamps.len()
    }

    /// Whether no restart is inside the window.
    pub fn is_empty(&self) -> bool {
        self.stamps.is_empty()
    }
}

/// Exponential backoff between restarts of one child.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackoffPolicy {
    /// Delay before the first restart.
    pub initial: Duration,
    /// Cap on the delay.
    pub max: Duration,
    /// Factor between successive delays (≥ 1).
    pub multiplier: f64,
    /// Fraction in `[0, 1]` by which a delay is randomly shortened: the delay is drawn from
    /// `(base × (1 − jitter), base]`, so it never exceeds `max`.
    pub jitter: f64,
    /// A run at least this long resets the child's backoff to `initial`.
    pub reset_after: Duration,
}

impl Default for BackoffPolicy {
    /// 100 ms doubling up to 10 s, 20 % jitter, reset after 10 s of stable running.
    fn default() -> Self {
        BackoffPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
            multiplier: 2.0,
            jitter: 0.2,
            reset_after: Duration::from_secs(10),
        }
    }
}

impl BackoffPolicy {
    /// A policy whose `reset_after` equals `max`.
    pub fn new(initial: Duration, max: Duration, multiplier: f64, jitter: f64) -> Self {
        BackoffPolicy {
            initial,
            max,
            multiplier,
            jitter,
            reset_after: max,
        }
    }

    /// Checks the invariants (`initial ≤ max`, finite `multiplier ≥ 1`, `jitter` in `[0, 1]`).
    pub fn validate(&self) -> Result<(), SupervisorError> {
        let bad = |what: &str| Err(SupervisorError::InvalidSpec(what.to_owned()));
        if self.initial > self.max {
            return bad("backoff initial delay exceeds the maximum delay");
        }
        if !(self.multiplier.is_finite() && self.multiplier >= 1.0) {
            return bad("backoff multiplier must be a finite number >= 1");
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return bad("backoff jitter must be within [0, 1]");
        }
        Ok(())
    }

    /// The delay before restart number `attempt` (0-based) without jitter:
    /// `min(max, initial × multiplier^attempt)`.
    pub fn base_delay(&self, attempt: u32) -> Duration {
        let exp = i32::try_from(attempt).unwrap_or(i32::MAX);
        let secs = self.initial.as_secs_f64() * self.multiplier.powi(exp);
        match Duration::try_from_secs_f64(secs) {
            Ok(d) => d.min(self.max),
            Err(_) => self.max,
        }
    }

    /// The delay for `attempt` with jitter; `unit` is a uniform random number in `[0, 1)`.
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let base = self.base_delay(attempt);
        let jitter = self.jitter.clamp(0.0, 1.0);
        let factor = (1.0 - jitter * unit.clamp(0.0, 1.0)).clamp(0.0, 1.0);
        base.mul_f64(factor)
    }
}

/// Backoff state of one child.
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: BackoffPolicy,
    attempt: u32,
}

impl Backoff {
    pub fn new(policy: BackoffPolicy) -> Self {
        Backoff { policy, attempt: 0 }
    }

    /// Restarts since the backoff was last reset.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The delay before the next restart, given how long the child ran (`None`: it never
    /// started) and a uniform random `unit` in `[0, 1)`. Returns the 1-based attempt number
    /// since the last reset and the delay.
    pub fn next_delay(&mut self, ran_for: Option<Duration>, unit: f64) -> (u32, Duration) {
        if ran_for.is_some_and(|d| d >= self.policy.reset_after) {
            self.attempt = 0;
        }
        let delay = self.policy.delay(self.attempt, unit);
        self.attempt = self.attempt.saturating_add(1);
        (self.attempt, delay)
    }
}

// ---------------------------------------------------------------------------------------
// Specs
// ---------------------------------------------------------------------------------------

/// Future returned by a child's start function.
pub type StartFuture = Pin<Box<dyn Future<Output = Result<ActorCell, SpawnErr>> + Send>>;
/// A child's start function: spawns the child linked to the given supervisor cell.
pub type StartFn = Arc<dyn Fn(ActorCell) -> StartFuture + Send + Sync>;

/// How to start one child and when to restart it.
#[derive(Clone)]
pub struct ChildSpec {
    /// Name used in logs and metric labels (unique within its supervisor, by convention).
    pub name: String,
    pub restart: Restart,
    /// How long an orderly stop may take before the child is killed.
    pub shutdown: Duration,
    start: StartFn,
}

impl fmt::Debug for ChildSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChildSpec")
            .field("name", &self.name)
            .field("restart", &self.restart)
            .field("shutdown", &self.shutdown)
            .finish_non_exhaustive()
    }
}

impl ChildSpec {
    /// Default orderly-stop timeout of a child.
    pub const DEFAULT_SHUTDOWN: Duration = Duration::from_secs(5);

    /// A child started by `start`, which must spawn it linked to the cell it is given.
    pub fn new<F, Fut>(name: impl Into<String>, restart: Restart, start: F) -> Self
    where
        F: Fn(ActorCell) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<ActorCell, SpawnErr>> + Send + 'static,
    {
        ChildSpec {
            name: name.into(),
            restart,
            shutdown: Self::DEFAULT_SHUTDOWN,
            start: Arc::new(move |sup| Box::pin(start(sup))),
        }
    }

    /// A child actor of type `A`, built afresh by `make` at every (re)start and spawned
    /// unnamed, linked to the supervisor.
    pub fn actor<A, F>(name: impl Into<String>, restart: Restart, make: F) -> Self
    where
        A: Actor,
        F: Fn() -> (A, A::Arguments) + Send + Sync + 'static,
    {
        let make = Arc::new(make);
        ChildSpec::new(name, restart, move |sup: ActorCell| {
            let make = Arc::clone(&make);
            async move {
                let (actor, args) = make();
                let (r, _join) = A::spawn_linked(None, actor, args, sup).await?;
                Ok(r.get_cell())
            }
        })
    }

    /// Sets the orderly-stop timeout.
    pub fn with_shutdown(mut self, shutdown: Duration) -> Self {
        self.shutdown = shutdown;
        self
    }
}

/// A supervisor: its name (for logs and metrics), strategy, limits and children.
#[derive(Clone)]
pub struct SupervisorSpec {
    pub name: String,
    pub strategy: Strategy,
    pub intensity: Intensity,
    pub backoff: BackoffPolicy,
    /// Children in start order.
    pub children: Vec<ChildSpec>,
    pub metrics: Metrics,
}

impl fmt::Debug for SupervisorSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SupervisorSpec")
            .field("name", &self.name)
            .field("strategy", &self.strategy)
            .field("intensity", &self.intensity)
            .field("backoff", &self.backoff)
            .field("children", &self.children)
            .finish_non_exhaustive()
    }
}

impl SupervisorSpec {
    /// A supervisor with the default intensity and backoff and no children yet.
    pub fn new(name: impl Into<String>, strategy: Strategy, metrics: Metrics) -> Self {
        SupervisorSpec {
            name: name.into(),
            strategy,
            intensity: Intensity::default(),
            backoff: BackoffPolicy::default(),
            children: Vec::new(),
            metrics,
        }
    }

    /// Appends a child (children start in the order they are added).
    pub fn child(mut self, child: ChildSpec) -> Self {
        self.children.push(child);
        self
    }

    pub fn with_intensity(mut self, max_restarts: u32, period: Duration) -> Self {
        self.intensity = Intensity {
            max_restarts,
            period,
        };
        self
    }

    pub fn with_backoff(mut self, backoff: BackoffPolicy) -> Self {
        self.backoff = backoff;
        self
    }

    /// Checks the backoff policy and that child names are unique.
    pub fn validate(&self) -> Result<(), SupervisorError> {
        self.backoff.validate()?;
        for (i, c) in self.children.iter().enumerate() {
            if self.children[..i].iter().any(|o| o.name == c.name) {
                return Err(SupervisorError::InvalidSpec(format!(
                    "supervisor {}: duplicate child name {:?}",
                    self.name, c.name
                )));
            }
        }
        Ok(())
    }

    /// This supervisor as a child of another one. Its shutdown timeout covers its own
    /// children's timeouts plus one second.
    pub fn into_child(self, restart: Restart) -> ChildSpec {
        let shutdown = self.children.iter().fold(Duration::from_secs(1), |acc, c| {
            acc.saturating_add(c.shutdown)
        });
        let name = self.name.clone();
        ChildSpec::new(name, restart, move |sup: ActorCell| {
            let spec = self.clone();
            async move { Ok(spec.spawn_linked(sup).await?.0.get_cell()) }
        })
        .with_shutdown(shutdown)
    }

    /// Starts the supervisor without a parent (the root of a tree). Fails if a child fails to
    /// start (the children already started are stopped first).
    pub async fn spawn(self) -> Result<(ActorRef<SupervisorMsg>, JoinHandle<()>), SpawnErr> {
        Supervisor::spawn(None, Supervisor, self).await
    }

    /// Starts the supervisor linked to `parent`.
    pub async fn spawn_linked(
        self,
        parent: ActorCell,
    ) -> Result<(ActorRef<SupervisorMsg>, JoinHandle<()>), SpawnErr> {
        Supervisor::spawn_linked(None, Supervisor, self, parent).await
    }
}

/// Errors of the supervisor (also what it fails with when it escalates).
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("invalid supervisor spec: {0}")]
    InvalidSpec(String),
    #[error(
        "supervisor {supervisor}: restart intensity exceeded ({max_restarts} restarts in {period:?}), last exit of child {child}: {reason}"
    )]
    IntensityExceeded {
        supervisor: String,
        child: String,
        reason: String,
        max_restarts: u32,
        period: Duration,
    },
    #[error("supervisor {supervisor}: child {child} failed to start: {reason}")]
    StartFailed {
        supervisor: String,
        child: String,
        reason: String,
    },
    #[error("supervisor did not stop within {0:?}; it was killed")]
    ShutdownTimeout(Duration),
    #[error("supervisor did not answer: {0}")]
    Unreachable(String),
}

// ---------------------------------------------------------------------------------------
// The actor
// ---------------------------------------------------------------------------------------

/// Messages a supervisor accepts.
pub enum SupervisorMsg {
    /// Replies with the children in start order.
    Children(RpcReplyPort<Vec<ChildInfo>>),
    /// Internal: a backoff delay elapsed (cannot be built outside this module).
    Restart(RestartDue),
}

/// Token of a scheduled restart.
pub struct RestartDue {
    keys: Vec<u64>,
}

/// A child as reported by [`SupervisorMsg::Children`].
#[derive(Debug, Clone)]
pub struct ChildInfo {
    pub name: String,
    /// The running actor, if any.
    pub cell: Option<ActorCell>,
    /// Whether a restart is scheduled.
    pub restart_pending: bool,
}

/// The supervisor actor; start it through [`SupervisorSpec::spawn`] or `spawn_linked`.
pub struct Supervisor;

struct Slot {
    key: u64,
    spec: ChildSpec,
    cell: Option<ActorCell>,
    started_at: Option<Instant>,
    backoff: Backoff,
    pending: bool,
}

/// State of a running supervisor.
pub struct SupervisorState {
    name: String,
    strategy: Strategy,
    intensity: Intensity,
    metrics: Metrics,
    slots: Vec<Slot>,
    window: RestartWindow,
    timers: Vec<JoinHandle<Result<(), MessagingErr<SupervisorMsg>>>>,
}

impl SupervisorState {
    fn restarts_counter(&self, child: &str) -> Counter {
        self.metrics.counter(
            RESTARTS_METRIC,
            "Child actor restarts attempted by a supervisor",
            &[("supervisor", &self.name), ("child", child)],
        )
    }

    /// Starts the child in slot `i`; on success records it as running.
    async fn start_slot(&mut self, i: usize, myself: &ActorCell) -> Result<(), String> {
        let start = Arc::clone(&self.slots[i].spec.start);
        match start(myself.clone()).await {
            Ok(cell) => {
                let slot = &mut self.slots[i];
                slot.cell = Some(cell);
                slot.started_at = Some(Instant::now());
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// Stops the given running children in the given order, each within its shutdown
    /// timeout, killing it if it does not stop in time.
    async fn stop_slots(&mut self, order: &[usize]) {
        for &i in order {
            let Some(slot) = self.slots.get_mut(i) else {
                continue;
            };
            let Some(cell) = slot.cell.take() else {
                continue;
            };
            slot.started_at = None;
            let timeout = slot.spec.shutdown;
            let res = cell
                .stop_and_wait(Some(SHUTDOWN_REASON.to_owned()), Some(timeout))
                .await;
            if let Err(RactorErr::Timeout) = res {
                tracing::warn!(supervisor = %self.name, child = %slot.spec.name, ?timeout,
                    "child did not stop in time; killing it");
                let _ = cell.kill_and_wait(Some(timeout)).await;
            }
        }
    }

    fn running_reverse(&self) -> Vec<usize> {
        (0..self.slots.len())
            .rev()
            .filter(|&i| self.slots[i].cell.is_some())
            .collect()
    }

    async fn stop_all(&mut self) {
        for t in self.timers.drain(..) {
            t.abort();
        }
        let order = self.running_reverse();
        self.stop_slots(&order).await;
    }

    /// Handles the exit of the child in slot `i`. `Err` means the supervisor must fail.
    async fn on_exit(
        &mut self,
        i: usize,
        exit: Exit,
        reason: String,
        myself: &ActorCell,
    ) -> Result<(), SupervisorError> {
        let now = Instant::now();
        let ran_for = self.slots[i]
            .started_at
            .take()
            .map(|t| now.saturating_duration_since(t));
        self.slots[i].cell = None;
        let kinds: Vec<Restart> = self.slots.iter().map(|s| s.spec.restart).collect();
        let running: Vec<bool> = self.slots.iter().map(|s| s.cell.is_some()).collect();
        let child = self.slots[i].spec.name.clone();
        match plan(self.strategy, &kinds, &running, i, exit) {
            Plan::Leave { forget } => {
                tracing::info!(supervisor = %self.name, %child, %reason, ?exit,
                    "child exited; not restarting it");
                if forget {
                    self.slots.remove(i);
                }
                Ok(())
            }
            Plan::Restart {
                stop,
                forget,
                start,
            } => {
                if !self.window.record(now) {
                    tracing::error!(supervisor = %self.name, %child, %reason,
                        max_restarts = self.intensity.max_restarts,
                        period = ?self.intensity.period,
                        "restart intensity exceeded; stopping children and escalating");
                    self.metrics
                        .counter(
                            ESCALATIONS_METRIC,
                            "Supervisors that exceeded their restart intensity and failed",
                            &[("supervisor", &self.name)],
                        )
                        .inc();
                    self.stop_all().await;
                    return Err(SupervisorError::IntensityExceeded {
                        supervisor: self.name.clone(),
                        child,
                        reason,
                        max_restarts: self.intensity.max_restarts,
                        period: self.intensity.period,
                    });
                }
                self.stop_slots(&stop).await;
                let (attempt, delay) = self.slots[i].backoff.next_delay(ran_for, fastrand::f64());
                let keys: Vec<u64> = start.iter().map(|&j| self.slots[j].key).collect();
                for &j in &start {
                    self.slots[j].pending = true;
                }
                let restarting: Vec<&str> = start
                    .iter()
                    .map(|&j| self.slots[j].spec.name.as_str())
                    .collect();
                tracing::warn!(supervisor = %self.name, %child, %reason, attempt,
                    delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                    restarting = ?restarting, "scheduling restart");
                for &j in forget.iter().rev() {
                    self.slots.remove(j);
                }
                self.timers.retain(|t| !t.is_finished());
                let timer = ractor::time::send_after(delay, myself.clone(), move || {
                    SupervisorMsg::Restart(RestartDue { keys })
                });
                self.timers.push(timer);
                Ok(())
            }
        }
    }

    /// Performs a scheduled restart of the children with these keys, in order.
    async fn restart(&mut self, keys: &[u64], myself: &ActorCell) -> Result<(), SupervisorError> {
        for (n, key) in keys.iter().enumerate() {
            let Some(i) = self.slots.iter().position(|s| s.key == *key) else {
                continue;
            };
            if !self.slots[i].pending || self.slots[i].cell.is_some() {
                continue;
            }
            self.slots[i].pending = false;
            let child = self.slots[i].spec.name.clone();
            self.restarts_counter(&child).inc();
            match self.start_slot(i, myself).await {
                Ok(()) => {
                    tracing::info!(supervisor = %self.name, %child, "child restarted");
                }
                Err(e) => {
                    // A failed restart is an abnormal exit: it counts towards the intensity
                    // and is retried after the backoff (for one-for-all, as a group).
                    for s in &mut self.slots {
                        if keys[n..].contains(&s.key) {
                            s.pending = false;
                        }
                    }
                    let reason = format!("restart failed: {e}");
                    return self.on_exit(i, Exit::Abnormal, reason, myself).await;
                }
            }
        }
        Ok(())
    }
}

impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorSpec;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        spec: SupervisorSpec,
    ) -> Result<Self::State, ActorProcessingErr> {
        spec.validate()?;
        let mut state = SupervisorState {
            name: spec.name,
            strategy: spec.strategy,
            intensity: spec.intensity,
            metrics: spec.metrics,
            window: RestartWindow::new(spec.intensity),
            timers: Vec::new(),
            slots: spec
                .children
                .into_iter()
                .zip(0u64..)
                .map(|(child, key)| Slot {
                    key,
                    spec: child,
                    cell: None,
                    started_at: None,
                    backoff: Backoff::new(spec.backoff),
                    pending: false,
                })
                .collect(),
        };
        let me = myself.get_cell();
        for i in 0..state.slots.len() {
            if let Err(reason) = state.start_slot(i, &me).await {
                let child = state.slots[i].spec.name.clone();
                tracing::error!(supervisor = %state.name, %child, %reason,
                    "child failed to start; stopping the ones already started");
                state.stop_all().await;
                return Err(Box::new(SupervisorError::StartFailed {
                    supervisor: state.name,
                    child,
                    reason,
                }));
            }
        }
        tracing::debug!(supervisor = %state.name, children = state.slots.len(), "supervisor started");
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Children(reply) => {
                let info = state
                    .slots
                    .iter()
                    .map(|s| ChildInfo {
                        name: s.spec.name.clone(),
                        cell: s.cell.clone(),
                        restart_pending: s.pending,
                    })
                    .collect();
                let _ = reply.send(info);
            }
            SupervisorMsg::Restart(due) => {
                state.restart(&due.keys, &myself.get_cell()).await?;
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, exit, reason) = match evt {
            SupervisionEvent::ActorFailed(cell, err) => (cell, Exit::Abnormal, err.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                let exit = Exit::from_stop_reason(reason.as_deref());
                (cell, exit, reason.unwrap_or_else(|| "normal".to_owned()))
            }
            _ => return Ok(()),
        };
        // Exits of children we stopped or replaced ourselves no longer match a slot.
        let id = cell.get_id();
        let Some(i) = state
            .slots
            .iter()
            .position(|s| s.cell.as_ref().is_some_and(|c| c.get_id() == id))
        else {
            return Ok(());
        };
        state.on_exit(i, exit, reason, &myself.get_cell()).await?;
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.stop_all().await;
        tracing::debug!(supervisor = %state.name, "supervisor stopped");
        Ok(())
    }
}

/// Orderly shutdown: stops the supervisor, which first stops its children in reverse start
/// order (recursively for nested supervisors), and waits for it all within `timeout`. After
/// the timeout the supervisor is killed (its remaining children with it) and
/// [`SupervisorError::ShutdownTimeout`] is returned. A supervisor that already exited is Ok.
pub async fn shutdown(
    sup: &ActorRef<SupervisorMsg>,
    timeout: Duration,
) -> Result<(), SupervisorError> {
    match sup
        .stop_and_wait(Some(SHUTDOWN_REASON.to_owned()), Some(timeout))
        .await
    {
        Ok(()) | Err(RactorErr::Messaging(_)) => Ok(()),
        Err(RactorErr::Timeout) => {
            let _ = sup.kill_and_wait(Some(timeout)).await;
            Err(SupervisorError::ShutdownTimeout(timeout))
        }
        Err(e) => Err(SupervisorError::Unreachable(e.to_string())),
    }
}

/// The supervisor's children, in start order.
pub async fn children(
    sup: &ActorRef<SupervisorMsg>,
    timeout: Duration,
) -> Result<Vec<ChildInfo>, SupervisorError> {
    match sup.call(SupervisorMsg::Children, Some(timeout)).await {
        Ok(ractor::rpc::CallResult::Success(v)) => Ok(v),
        Ok(ractor::rpc::CallResult::Timeout) => {
            Err(SupervisorError::Unreachable("timed out".to_owned()))
        }
        Ok(ractor::rpc::CallResult::SenderError) => {
            Err(SupervisorError::Unreachable("reply dropped".to_owned()))
        }
        Err(e) => Err(SupervisorError::Unreachable(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::{prop_assert, proptest};

    const P: Restart = Restart::Permanent;
    const TR: Restart = Restart::Transient;
    const TE: Restart = Restart::Temporary;

    #[test]
    fn stop_reasons_are_classified() {
        assert_eq!(Exit::from_stop_reason(None), Exit::Normal);
        assert_eq!(Exit::from_stop_reason(Some("normal")), Exit::Normal);
        assert_eq!(Exit::from_stop_reason(Some("shutdown")), Exit::Normal);
        assert_eq!(Exit::from_stop_reason(Some("killed")), Exit::Abnormal);
        assert_eq!(Exit::from_stop_reason(Some("socket gone")), Exit::Abnormal);
    }

    #[test]
    fn restart_types_decide_by_exit_kind() {
        assert!(P.should_restart(Exit::Normal));
        assert!(P.should_restart(Exit::Abnormal));
        assert!(!TR.should_restart(Exit::Normal));
        assert!(TR.should_restart(Exit::Abnormal));
        assert!(!TE.should_restart(Exit::Normal));
        assert!(!TE.should_restart(Exit::Abnormal));
    }

    #[test]
    fn one_for_one_restarts_only_the_exited_child() {
        let p = plan(
            Strategy::OneForOne,
            &[P, P, P],
            &[true, false, true],
            1,
            Exit::Abnormal,
        );
        assert_eq!(
            p,
            Plan::Restart {
                stop: vec![],
                forget: vec![],
                start: vec![1]
            }
        );
    }

    #[test]
    fn one_for_all_stops_others_in_reverse_and_restarts_non_temporary_in_order() {
        let kinds = [P, TE, TR, P];
        let running = [true, true, false, true];
        let p = plan(Strategy::OneForAll, &kinds, &running, 0, Exit::Abnormal);
        assert_eq!(
            p,
            Plan::Restart {
                stop: vec![3, 1],
                forget: vec![1],
                start: vec![0, 2, 3]
            }
        );
    }

    #[test]
    fn children_that_must_not_restart_are_left_alone_under_both_strategies() {
        for s in [Strategy::OneForOne, Strategy::OneForAll] {
            assert_eq!(
                plan(s, &[P, TR], &[true, false], 1, Exit::Normal),
                Plan::Leave { forget: false }
            );
            assert_eq!(
                plan(s, &[TE, P], &[false, true], 0, Exit::Abnormal),
                Plan::Leave { forget: true }
            );
        }
    }

    #[test]
    fn intensity_window_allows_max_then_refuses() {
        let mut w = RestartWindow::new(Intensity {
            max_restarts: 2,
            period: Duration::from_secs(1),
        });
        let t0 = Instant::now();
        assert!(w.record(t0));
        assert!(w.record(t0 + Duration::from_millis(100)));
        assert!(!w.record(t0 + Duration::from_millis(200)));
        assert_eq!(w.len(), 3);
    }

    #[test]
    fn intensity_window_forgets_restarts_older_than_the_period() {
        let mut w = RestartWindow::new(Intensity {
            max_restarts: 2,
            period: Duration::from_secs(1),
        });
        let t0 = Instant::now();
        for k in 0..10u64 {
            // One restart every 600 ms: never more than 2 within a second.
            assert!(w.record(t0 + Duration::from_millis(600 * k)), "restart {k}");
        }
        assert!(w.len() <= 2);
    }

    #[test]
    fn zero_intensity_escalates_on_the_first_restart() {
        let mut w = RestartWindow::new(Intensity {
            max_restarts: 0,
            period: Duration::from_secs(1),
        });
        assert!(!w.record(Instant::now()));
        assert!(w.len() <= 1);
    }

    fn policy() -> BackoffPolicy {
        BackoffPolicy::new(Duration::from_millis(100), Duration::from_secs(1), 2.0, 0.0)
    }

    #[test]
    fn backoff_grows_exponentially_and_is_capped() {
        let p = policy();
        let got: Vec<u128> = (0..6).map(|a| p.base_delay(a).as_millis()).collect();
        assert_eq!(got, vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(p.base_delay(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn backoff_state_advances_and_resets_after_a_stable_run() {
        let mut b = Backoff::new(policy());
        let short = Some(Duration::from_millis(10));
        assert_eq!(b.next_delay(short, 0.5), (1, Duration::from_millis(100)));
        assert_eq!(b.next_delay(short, 0.5), (2, Duration::from_millis(200)));
        // A failed start (no run at all) keeps growing.
        assert_eq!(b.next_delay(None, 0.5), (3, Duration::from_millis(400)));
        // Ran for reset_after (= max = 1 s): back to the initial delay.
        let stable = Some(Duration::from_secs(1));
        assert_eq!(b.next_delay(stable, 0.5), (1, Duration::from_millis(100)));
    }

    #[test]
    fn invalid_backoff_policies_are_rejected() {
        let ok = policy();
        assert!(ok.validate().is_ok());
        let mut p = ok;
        p.initial = Duration::from_secs(2);
        assert!(p.validate().is_err());
        let mut p = ok;
        p.multiplier = 0.5;
        assert!(p.validate().is_err());
        let mut p = ok;
        p.multiplier = f64::NAN;
        assert!(p.validate().is_err());
        let mut p = ok;
        p.jitter = 1.5;
        assert!(p.validate().is_err());
    }

    proptest! {
        #[test]
        fn jittered_delay_stays_within_bounds(
            initial_ms in 0u64..5_000,
            extra_ms in 0u64..60_000,
            multiplier in 1.0f64..10.0,
            jitter in 0.0f64..=1.0,
            attempt in 0u32..200,
            unit in 0.0f64..1.0,
        ) {
            let p = BackoffPolicy::new(
                Duration::from_millis(initial_ms),
                Duration::from_millis(initial_ms + extra_ms),
                multiplier,
                jitter,
            );
            let base = p.base_delay(attempt);
            let d = p.delay(attempt, unit);
            prop_assert!(d <= base);
            prop_assert!(base <= p.max);
            prop_assert!(d >= base.mul_f64(1.0 - jitter).saturating_sub(Duration::from_nanos(1)));
            prop_assert!(p.base_delay(attempt.saturating_add(1)) >= base);
        }
    }
}
