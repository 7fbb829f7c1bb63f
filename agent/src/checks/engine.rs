//! The check scheduler: one task per check on its own interval (missed
//! ticks are skipped, never queued), a global bound on checks running at
//! once, retries with backoff inside a run, thresholds across runs, and
//! `blocked` for checks whose dependencies are down.

use std::{
    collections::{BTreeMap, HashMap},
    hash::{Hash, Hasher},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant, SystemTime},
};

use tokio::sync::Semaphore;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use super::{Outcome, Spec, actions, kinds};
use crate::store::{ResultRow, Store};

/// Where results go besides the engine's memory: the store (history), and
/// what actions need.
#[derive(Clone, Default)]
pub struct Sink {
    pub store: Option<Arc<Store>>,
    pub actions: Arc<actions::Context>,
    /// A service's figures now, by name (the datapath's counters): read
    /// before and after each run, for the run's evidence.
    pub service: Option<ServiceFigures>,
}

/// A service's counters at one moment, by service name.
pub type ServiceFigures =
    Arc<dyn Fn(&str) -> Option<crate::api_types::ServiceWindow> + Send + Sync>;

/// Upper bounds of `netpulse_check_duration_seconds`, in seconds.
pub const BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum State {
    Unknown,
    Up,
    Down,
    Blocked,
}

impl State {
    pub const ALL: [State; 4] = [State::Up, State::Down, State::Blocked, State::Unknown];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Unknown => "unknown",
            State::Up => "up",
            State::Down => "down",
            State::Blocked => "blocked",
        }
    }
}

/// What the engine remembers of one check.
#[derive(Debug, Clone)]
pub struct Status {
    /// From its own results and thresholds: unknown, up or down.
    pub own: State,
    pub consecutive_failures: u32,
    pub consecutive_successes: u32,
    pub last: Option<Outcome>,
    pub last_run: Option<SystemTime>,
    pub last_success: Option<SystemTime>,
    pub runs_ok: u64,
    pub runs_failed: u64,
    /// Cumulative counts per bucket of [`BUCKETS`] (then +Inf = count).
    pub buckets: [u64; BUCKETS.len()],
    pub duration_sum: f64,
}

impl Default for Status {
    fn default() -> Self {
        Status {
            own: State::Unknown,
            consecutive_failures: 0,
            consecutive_successes: 0,
            last: None,
            last_run: None,
            last_success: None,
            runs_ok: 0,
            runs_failed: 0,
            buckets: [0; BUCKETS.len()],
            duration_sum: 0.0,
        }
    }
}

/// One check as a reader sees it.
#[derive(Debug, Clone)]
pub struct View {
    pub spec: Arc<Spec>,
    pub status: Status,
    /// Its state with dependencies applied.
    pub state: State,
}

pub struct Engine {
    specs: BTreeMap<String, Arc<Spec>>,
    status: Mutex<BTreeMap<String, Status>>,
    running: Semaphore,
    sink: Sink,
    /// When each (check, action index) last fired.
    fired: Mutex<HashMap<(String, usize), Instant>>,
}

impl Engine {
    /// `keep`: statuses of a previous engine (a config reload), by name.
    pub fn new(
        specs: Vec<Spec>,
        concurrency: usize,
        keep: BTreeMap<String, Status>,
        sink: Sink,
    ) -> Arc<Self> {
        let status = specs
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    keep.get(&s.name).cloned().unwrap_or_default(),
                )
            })
            .collect();
        Arc::new(Engine {
            specs: specs
                .into_iter()
                .map(|s| (s.name.clone(), Arc::new(s)))
                .collect(),
            status: Mutex::new(status),
            running: Semaphore::new(concurrency.max(1)),
            sink,
            fired: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Status>> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The checks it runs.
    pub fn specs(&self) -> Vec<Spec> {
        self.specs.values().map(|s| (**s).clone()).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.specs.is_empty()
    }

    pub fn statuses(&self) -> BTreeMap<String, Status> {
        self.lock().clone()
    }

    /// States with dependencies applied: blocked while any dependency is
    /// down or blocked. The config guarantees no cycles.
    fn states(&self, status: &BTreeMap<String, Status>) -> BTreeMap<String, State> {
        fn state_of(
            n: &str,
            specs: &BTreeMap<String, Arc<Spec>>,
            status: &BTreeMap<String, Status>,
            memo: &mut BTreeMap<String, State>,
            depth: usize,
        ) -> State {
            if let Some(s) = memo.get(n) {
                return *s;
            }
            let own = status.get(n).map_or(State::Unknown, |s| s.own);
            let blocked = depth < specs.len()
                && specs.get(n).is_some_and(|spec| {
                    spec.depends_on.iter().any(|d| {
                        matches!(
                            state_of(d, specs, status, memo, depth + 1),
                            State::Down | State::Blocked
                        )
                    })
                });
            let s = if blocked { State::Blocked } else { own };
            memo.insert(n.to_string(), s);
            s
        }
        let mut memo = BTreeMap::new();
        for n in self.specs.keys() {
            state_of(n, &self.specs, status, &mut memo, 0);
        }
        memo
    }

    pub fn state(&self, name: &str) -> State {
        let status = self.lock();
        self.states(&status)
            .get(name)
            .copied()
            .unwrap_or(State::Unknown)
    }

    /// Every check, by name.
    pub fn view(&self) -> Vec<View> {
        let status = self.lock();
        let states = self.states(&status);
        self.specs
            .iter()
            .map(|(n, spec)| View {
                spec: spec.clone(),
                status: status.get(n).cloned().unwrap_or_default(),
                state: states.get(n).copied().unwrap_or(State::Unknown),
            })
            .collect()
    }

    /// One run: the probe, retried with doubling backoff up to the check's
    /// `retries`.
    pub async fn attempt(spec: &Spec) -> Outcome {
        let mut backoff = spec.retry_backoff;
        let mut out = kinds::run(spec).await;
        for _ in 0..spec.retries {
            if out.ok {
                break;
            }
            tokio::time::sleep(backoff).await;
            backoff = backoff.saturating_mul(2);
            out = kinds::run(spec).await;
        }
        out
    }

    /// Runs `name` now (outside its schedule, within the concurrency
    /// bound) and records the result.
    pub async fn run_now(&self, name: &str) -> Option<Outcome> {
        let spec = self.specs.get(name)?.clone();
        let _permit = self.running.acquire().await.ok()?;
        let out = self.attempt_watched(&spec).await;
        self.record(&spec, &out);
        Some(out)
    }

    /// [`Self::attempt`], and on failure what the check's service went
    /// through meanwhile (added to the evidence, and to the explanation
    /// when anything happened).
    async fn attempt_watched(&self, spec: &Spec) -> Outcome {
        let figures = match (&self.sink.service, &spec.service) {
            (Some(f), Some(name)) => Some((f, name)),
            _ => None,
        };
        let before = figures.and_then(|(f, name)| f(name));
        let mut out = Self::attempt(spec).await;
        if out.ok {
            return out;
        }
        let (Some((f, name)), Some(before)) = (figures, before) else {
            return out;
        };
        let Some(after) = f(name) else {
            return out;
        };
        let window = crate::api_types::ServiceWindow {
            name: name.clone(),
            drops: after
                .drops
                .iter()
                .map(|(r, n)| {
                    (
                        r.clone(),
                        n.saturating_sub(*before.drops.get(r).unwrap_or(&0)),
                    )
                })
                .filter(|(_, n)| *n > 0)
                .collect(),
            refused: after.refused.saturating_sub(before.refused),
            reset: after.reset.saturating_sub(before.reset),
            timeout: after.timeout.saturating_sub(before.timeout),
            retransmits: after.retransmits.saturating_sub(before.retransmits),
        };
        if !window.is_quiet()
            && let Some(line) = &mut out.explanation
        {
            let mut parts: Vec<String> = window
                .drops
                .iter()
                .map(|(r, n)| format!("{n} dropped ({r})"))
                .collect();
            for (n, what) in [
                (window.refused, "refused"),
                (window.reset, "reset"),
                (window.timeout, "timed out"),
                (window.retransmits, "retransmitted"),
            ] {
                if n > 0 {
                    parts.push(format!("{n} {what}"));
                }
            }
            line.push_str(&format!(
                "; service {name} meanwhile (all its traffic): {}",
                parts.join(", ")
            ));
        }
        if let Some(ev) = &mut out.evidence {
            ev.service = Some(window);
        }
        out
    }

    /// Applies one run's result: counters, histogram, thresholds.
    pub fn record(&self, spec: &Spec, out: &Outcome) {
        let now = SystemTime::now();
        let mut all = self.lock();
        let before = self.states(&all);
        let s = all.entry(spec.name.clone()).or_default();
        let secs = out.duration.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                s.buckets[i] += 1;
            }
        }
        s.duration_sum += secs;
        s.last_run = Some(now);
        if out.ok {
            s.runs_ok += 1;
            s.last_success = Some(now);
            s.consecutive_successes += 1;
            s.consecutive_failures = 0;
            if s.own != State::Up && s.consecutive_successes >= spec.success_threshold {
                s.own = State::Up;
            }
        } else {
            s.runs_failed += 1;
            s.consecutive_failures += 1;
            s.consecutive_successes = 0;
            if s.own != State::Down && s.consecutive_failures >= spec.failure_threshold {
                s.own = State::Down;
            }
        }
        s.last = Some(out.clone());
        let failures = s.consecutive_failures;
        let after = self.states(&all);
        drop(all);
        if let Some(store) = &self.sink.store {
            store.add_result(
                &spec.name,
                &ResultRow {
                    at_ms: crate::store::now_ms(),
                    ok: out.ok,
                    duration_ms: out.duration.as_secs_f64() * 1000.0,
                    error: out.error.clone(),
                    explanation: out.explanation.clone(),
                    cause: out.evidence.as_ref().map(|e| e.cause.as_str().to_string()),
                },
            );
        }
        // Actions fire once per run of failures, when it reaches `after`.
        for (i, a) in spec.actions.iter().enumerate() {
            if out.ok || failures != a.after {
                continue;
            }
            let mut fired = self.fired.lock().unwrap_or_else(|p| p.into_inner());
            let key = (spec.name.clone(), i);
            if fired.get(&key).is_some_and(|t| t.elapsed() < a.cooldown) {
                continue;
            }
            fired.insert(key, Instant::now());
            drop(fired);
            let event = serde_json::json!({
                "check": spec.name,
                "kind": spec.kind.as_str(),
                "target": spec.target(),
                "service": spec.service,
                "state": after.get(&spec.name).copied().unwrap_or(State::Unknown).as_str(),
                "previous": before.get(&spec.name).copied().unwrap_or(State::Unknown).as_str(),
                "consecutive_failures": failures,
                "error": out.error,
                "explanation": out.explanation,
                "evidence": out.evidence,
                "at_ms": crate::store::now_ms(),
            });
            actions::fire(a, &spec.name, event, &self.sink.actions);
        }
        for (n, new) in &after {
            let old = before.get(n).copied().unwrap_or(State::Unknown);
            if old == *new {
                continue;
            }
            let err = if n == &spec.name {
                out.error.as_deref().unwrap_or("")
            } else {
                ""
            };
            match new {
                State::Down => {
                    warn!(check = %n, from = old.as_str(), error = err, "check down")
                }
                State::Blocked => {
                    warn!(check = %n, from = old.as_str(), "check blocked by a dependency")
                }
                _ => info!(check = %n, from = old.as_str(), to = new.as_str(), "check state"),
            }
        }
    }

    /// Whether any dependency of `spec` is down or blocked.
    fn blocked(&self, spec: &Spec) -> bool {
        let status = self.lock();
        let states = self.states(&status);
        spec.depends_on
            .iter()
            .any(|d| matches!(states.get(d), Some(State::Down | State::Blocked)))
    }

    /// One task per check on `tasks`, until `stop` is cancelled (an
    /// attempt in flight is abandoned).
    pub fn spawn(self: &Arc<Self>, tasks: &TaskTracker, stop: &CancellationToken) {
        for spec in self.specs.values() {
            let (engine, spec, stop) = (self.clone(), spec.clone(), stop.clone());
            tasks.spawn(async move {
                // A stable offset within the jitter, so checks of one
                // interval do not all fire together, restart after restart.
                let mut h = std::collections::hash_map::DefaultHasher::new();
                spec.name.hash(&mut h);
                let span = spec.jitter.min(spec.interval).as_millis() as u64;
                let first = Duration::from_millis(if span == 0 { 0 } else { h.finish() % span });
                tokio::select! {
                    _ = tokio::time::sleep(first) => {}
                    _ = stop.cancelled() => return,
                }
                let mut tick = tokio::time::interval(spec.interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = stop.cancelled() => return,
                    }
                    if !spec.run_when_blocked && engine.blocked(&spec) {
                        continue;
                    }
                    let Ok(_permit) = engine.running.acquire().await else {
                        return;
                    };
                    let out = tokio::select! {
                        o = engine.attempt_watched(&spec) => o,
                        _ = stop.cancelled() => return,
                    };
                    engine.record(&spec, &out);
                }
            });
        }
    }
}
