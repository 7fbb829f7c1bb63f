//! The handles the agent's parts share, and nothing else. There is no
//! agent-wide lock: each part has its own handle, and the HTTP handlers
//! take the ones they need (axum's `FromRef`).
//!
//! - [`Datapath`]: the writer (the probe and the service slots) is the only
//!   thing behind a mutex, held by the refresh loop and at shutdown. Readers
//!   get the counters through a read-only handle ([`Counters`]) and what the
//!   writer last published ([`View`]), so a slow attach or a long table
//!   update never holds up `/metrics` or the API.
//! - [`Reloadable`]: what a SIGHUP replaces, swapped as one value.
//! - The check engine: replaced whole on a reload or when container labels
//!   change; handlers load the current one.
//! - The store, the job queue's wake-up, the Docker view and the history
//!   ring each own their synchronisation.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, RwLock},
};

use agent_ebpf::EndpointKey;
use axum::extract::FromRef;

use crate::{
    capture,
    checks::engine::Engine,
    config, docker,
    history::History,
    identity::{Identity, Slotted},
    interfaces::Zone,
    probe::{Counters, Probe, ProbeError},
    store::Store,
    websec,
};

/// A value readers load and a writer replaces whole. Readers hold the
/// read lock only to clone the `Arc`.
pub struct Swap<T>(RwLock<Arc<T>>);

impl<T> Swap<T> {
    pub fn new(v: impl Into<Arc<T>>) -> Self {
        Swap(RwLock::new(v.into()))
    }

    pub fn load(&self) -> Arc<T> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn store(&self, v: impl Into<Arc<T>>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = v.into();
    }
}

/// The settings a SIGHUP replaces, as one value.
#[derive(Default)]
pub struct Reloadable {
    /// The series budget of /metrics (agent.max_series).
    pub max_series: usize,
    /// Unknown peers shown per service in the map (agent.map_top_k; 0:
    /// the default).
    pub map_top_k: usize,
    /// Whether the Docker source runs (`docker.enabled`; a restart changes it).
    pub docker_enabled: bool,
    /// Container labels exported on the info metric (`docker.labels`).
    pub docker_labels: Vec<String>,
    pub api_token: Option<String>,
    pub hooks: BTreeMap<String, config::Hook>,
    /// `[web.basic_auth_users]`; empty: no basic auth.
    pub web_users: Arc<websec::Users>,
    /// The capture folder's limits (`[capture]`).
    pub capture: capture::Settings,
}

/// One interface with probes, as the writer last published it.
#[derive(Debug, Clone)]
pub struct Attached {
    pub name: String,
    pub ifindex: u32,
    pub zone: Zone,
    /// (hook, mode) of each program, as in `netpulse_probe_attached`.
    pub hooks: [(&'static str, &'static str); 2],
}

/// What readers see of the datapath: a copy the writer publishes after
/// every change. Counters are not in it; they are read live.
pub struct View {
    pub backend: &'static str,
    /// Services that have a counter slot, by name.
    pub services: BTreeMap<String, Slotted>,
    /// The endpoint table: key → slot.
    pub table: BTreeMap<EndpointKey, u32>,
    /// Container addresses counted by address: address → slot.
    pub addrs: BTreeMap<std::net::IpAddr, u32>,
    pub attachments: Vec<Attached>,
    /// (map, entries, capacity) of each table.
    pub table_sizes: [(&'static str, usize, u32); 8],
    /// TCP health: which features are on, the kernel's drop reason names,
    /// and the open-connection seeds.
    pub features: Vec<crate::health::Feature>,
    pub drop_reasons: Arc<BTreeMap<u64, String>>,
    pub open_seed: Arc<BTreeMap<u32, i64>>,
    /// This host's addresses, as the service map names them.
    pub host_addrs: Arc<std::collections::BTreeSet<std::net::IpAddr>>,
}

/// The writer's half: only the refresh loop and shutdown use it.
pub struct Writer {
    pub probe: Probe,
    pub identity: Identity,
}

impl Writer {
    fn view(&self) -> View {
        View {
            backend: self.probe.backend(),
            services: self.identity.services().clone(),
            table: self.probe.table().clone(),
            addrs: self.probe.addrs().clone(),
            attachments: self
                .probe
                .attachments()
                .iter()
                .map(|(name, a)| Attached {
                    name: name.clone(),
                    ifindex: a.ifindex,
                    zone: a.zone,
                    hooks: a.hooks(),
                })
                .collect(),
            table_sizes: self.probe.table_sizes(),
            features: self.probe.features(),
            drop_reasons: self.probe.drop_reasons(),
            open_seed: self.probe.open_seed(),
            host_addrs: self.probe.host_addrs(),
        }
    }
}

/// The datapath: the writer behind its mutex, the published view and the
/// read-only counters.
pub struct Datapath {
    writer: Mutex<Writer>,
    view: Swap<View>,
    counters: Counters,
}

impl Datapath {
    pub fn new(probe: Probe, identity: Identity) -> Result<Self, ProbeError> {
        let counters = probe.counters()?;
        let writer = Writer { probe, identity };
        Ok(Datapath {
            view: Swap::new(writer.view()),
            writer: Mutex::new(writer),
            counters,
        })
    }

    /// Changes the datapath; readers see the result when `f` returns. A
    /// panic in an earlier writer (a bug) does not stop the next one: the
    /// state is the kernel's maps and a copy of them.
    pub fn write<R>(&self, f: impl FnOnce(&mut Writer) -> R) -> R {
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let out = f(&mut w);
        self.view.store(w.view());
        out
    }

    /// What the writer last published.
    pub fn view(&self) -> Arc<View> {
        self.view.load()
    }

    /// The live counters (read-only).
    pub fn counters(&self) -> &Counters {
        &self.counters
    }
}

/// Everything a handler or a task may need, each part with its own handle.
#[derive(Clone)]
pub struct AppState {
    pub datapath: Arc<Datapath>,
    pub settings: Arc<Swap<Reloadable>>,
    /// The health checks and their states.
    pub checks: Arc<Swap<Engine>>,
    /// Check history and the job queue; None if it could not be opened.
    pub store: Option<Arc<Store>>,
    /// Wakes the job workers when a job is queued.
    pub jobs_wake: Arc<tokio::sync::Notify>,
    /// What the Docker source last saw.
    pub docker: docker::Shared,
    /// The last 15 minutes of every service's counters (rates, sparklines).
    pub history: Arc<Mutex<History>>,
}

impl AppState {
    /// The state of an agent with this datapath, settings, check engine and
    /// store; no Docker source yet, an empty history.
    pub fn new(
        datapath: Datapath,
        settings: Reloadable,
        checks: Arc<Engine>,
        store: Option<Arc<Store>>,
    ) -> Self {
        AppState {
            datapath: Arc::new(datapath),
            settings: Arc::new(Swap::new(settings)),
            checks: Arc::new(Swap::new(checks)),
            store,
            jobs_wake: Default::default(),
            docker: Default::default(),
            history: Default::default(),
        }
    }

    pub fn settings(&self) -> Arc<Reloadable> {
        self.settings.load()
    }

    pub fn checks(&self) -> Arc<Engine> {
        self.checks.load()
    }
}

impl FromRef<AppState> for Arc<Datapath> {
    fn from_ref(s: &AppState) -> Self {
        s.datapath.clone()
    }
}

impl FromRef<AppState> for Arc<Swap<Reloadable>> {
    fn from_ref(s: &AppState) -> Self {
        s.settings.clone()
    }
}

impl FromRef<AppState> for Arc<Swap<Engine>> {
    fn from_ref(s: &AppState) -> Self {
        s.checks.clone()
    }
}

impl FromRef<AppState> for Option<Arc<Store>> {
    fn from_ref(s: &AppState) -> Self {
        s.store.clone()
    }
}
