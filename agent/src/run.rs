//! `netpulse run`: load and attach the probes, keep the service table and the
//! interface set current, serve HTTP, and detach cleanly on SIGINT/SIGTERM.
//! SIGHUP reloads the config; a broken one is logged and the old one kept.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{error, info, warn};

use crate::{
    caps,
    checks::engine::Engine,
    config::{self, ConfigError},
    docker::{self, Container},
    history::{self, Totals},
    identity::{self, Identity, sockets},
    interfaces,
    probe::{Probe, ProbeError, Zone},
    settings::{self, Settings},
    state::{AppState, Datapath, Reloadable},
    web,
};

/// The settings a SIGHUP replaces, from a loaded config.
fn reloadable(cfg: &Settings) -> Reloadable {
    Reloadable {
        max_series: cfg.agent().max_series(),
        map_top_k: cfg.agent().map_top_k(),
        docker_enabled: cfg.raw.docker.enabled,
        docker_labels: docker_labels(cfg),
        api_token: cfg.api_token.clone(),
        hooks: cfg.hooks.clone(),
        web_users: Arc::new(crate::websec::Users::new(cfg.basic_auth_users.clone())),
        capture: cfg.capture,
    }
}

/// Checks running at once, at most.
const CHECK_CONCURRENCY: usize = 32;

/// Starts the config's checks and those container labels ask for (the
/// config wins a name both use) on `tasks`; cancelling the returned token
/// (a child of `stop`) stops them.
/// A service's TCP results, retransmits and drops now, for the checks'
/// evidence (both sides of its slot summed).
fn service_figures(dp: Arc<crate::state::Datapath>) -> crate::checks::engine::ServiceFigures {
    Arc::new(move |name: &str| {
        let view = dp.view();
        let slot = view.services.get(name)?.slot;
        let counters = dp.counters();
        let tcp = counters.tcp(slot, false)?;
        let mut w = crate::api_types::ServiceWindow {
            name: name.to_string(),
            refused: tcp.counts[agent_ebpf::TCP_REFUSED],
            reset: tcp.counts[agent_ebpf::TCP_RESET],
            timeout: tcp.counts[agent_ebpf::TCP_TIMEOUT],
            retransmits: crate::health::retransmits(&tcp),
            ..Default::default()
        };
        for (k, n) in counters.drops() {
            if k.slot == slot {
                let reason = crate::health::reason_name(&view.drop_reasons, k.reason);
                *w.drops.entry(reason).or_default() += n;
            }
        }
        Some(w)
    })
}

fn start_checks(
    cfg: &Settings,
    hinted: &[crate::checks::Spec],
    keep: BTreeMap<String, crate::checks::engine::Status>,
    sink: crate::checks::engine::Sink,
    tasks: &TaskTracker,
    stop: &CancellationToken,
) -> (Arc<Engine>, CancellationToken) {
    let mut specs = cfg.checks.clone();
    for h in hinted {
        if !specs.iter().any(|s| s.name == h.name) {
            specs.push(h.clone());
        }
    }
    let n = specs.len();
    let engine = Engine::new(specs, CHECK_CONCURRENCY, keep, sink);
    let token = stop.child_token();
    engine.spawn(tasks, &token);
    if n > 0 {
        info!(
            checks = n,
            from_labels = hinted.len(),
            "health checks scheduled"
        );
    }
    (engine, token)
}

/// The checks container labels ask for now; each label that does not
/// parse is logged once.
fn hinted_checks(
    docker: &docker::Shared,
    warned: &mut HashSet<String>,
) -> Vec<crate::checks::Spec> {
    let containers = docker::lock(docker).containers.clone();
    crate::checks::hints::specs(&containers, &mut |c, label, why| {
        if warned.insert(format!("{c} {label}")) {
            warn!(container = c, label, "ignoring a check label: {why}");
        }
    })
}

fn docker_labels(cfg: &Settings) -> Vec<String> {
    cfg.raw
        .docker
        .labels
        .iter()
        .map(|l| l.get_ref().clone())
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error(
        "missing capabilities: {}. netpulse loads eBPF programs and attaches them to interfaces: run it as root, or grant {} (systemd: AmbientCapabilities=)",
        .0.join(", "), .0.join(" ")
    )]
    Capabilities(Vec<&'static str>),
    #[error("interface `{0}` named in the config does not exist")]
    MissingInterface(String),
    #[error(
        "interface `{0}` named in the config does not carry Ethernet frames (tun, WireGuard, ...); netpulse parses Ethernet"
    )]
    NotEthernet(String),
    #[error(transparent)]
    Probe(#[from] ProbeError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

impl RunError {
    /// Exit code: 2 for a config the user must fix, 1 for everything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            RunError::Config(_) | RunError::MissingInterface(_) | RunError::NotEthernet(_) => 2,
            _ => 1,
        }
    }
}

/// Resolves `--config`: an explicit path, else the system path if present,
/// else the embedded defaults.
pub fn config_path(arg: Option<PathBuf>) -> Option<PathBuf> {
    arg.or_else(|| {
        let p = PathBuf::from(config::DEFAULT_PATH);
        p.exists().then_some(p)
    })
}

fn want_interfaces(cfg: &Settings) -> Vec<(String, Zone)> {
    let all = interfaces::list(Path::new("/sys/class/net"));
    if cfg.agent().interfaces.is_empty() {
        interfaces::default_set(&all)
    } else {
        cfg.agent()
            .interfaces
            .iter()
            .map(|s| {
                let zone = all
                    .iter()
                    .find(|i| &i.name == s.get_ref())
                    .map_or(Zone::Host, |i| i.zone());
                (s.get_ref().clone(), zone)
            })
            .collect()
    }
}

/// Attaches to interfaces that appeared, detaches from those that went.
fn sync_interfaces(probe: &mut Probe, cfg: &Settings, warned: &mut HashSet<String>) {
    let want = want_interfaces(cfg);
    let stale: Vec<String> = probe
        .attachments()
        .iter()
        .filter(|(name, a)| {
            !want.contains(&((*name).clone(), a.zone))
                || crate::probe::ifindex(name) != Some(a.ifindex)
        })
        .map(|(n, _)| n.clone())
        .collect();
    for name in stale {
        probe.detach(&name);
    }
    for (name, zone) in want {
        if probe.attachments().contains_key(&name) {
            continue;
        }
        match probe.attach(&name, zone) {
            Ok(_) => {
                warned.remove(&name);
            }
            Err(e) => {
                if warned.insert(name.clone()) {
                    warn!(interface = %name, error = %e, "cannot attach; will retry");
                }
            }
        }
    }
}

/// What the refresh loop remembers between rounds.
#[derive(Default)]
struct Refresher {
    /// Interfaces already warned about, so a missing one is logged once.
    warned: HashSet<String>,
    /// Socket inode → owning process name (None: no visible owner). Inodes
    /// are unique while the socket lives, so /proc/*/fd is scanned only
    /// when a listener appears that was not seen before, and every
    /// `OWNER_RETRY` rounds for those without a known owner (the process
    /// may not have been visible yet).
    owners: HashMap<u64, Option<sockets::Owner>>,
    rounds: u64,
    /// The last table error logged.
    table_error: Option<String>,
}

const OWNER_RETRY: u64 = 30;

impl Refresher {
    /// The endpoint table the sources describe now. Runs before taking the
    /// datapath's writer: scanning /proc can take a while on a busy host.
    fn desired(&mut self, cfg: &Settings, containers: &[Container]) -> identity::Desired {
        let labels = docker_labels(cfg);
        if !cfg.agent().discover_sockets {
            return identity::desired(&identity::Sources {
                config: &cfg.services,
                listeners: &[],
                owners: &HashMap::new(),
                containers,
                labels: &labels,
            });
        }
        let proc = Path::new("/proc");
        let ls = sockets::listeners(proc);
        let live: HashSet<u64> = ls.iter().map(|l| l.inode).collect();
        self.owners.retain(|inode, _| live.contains(inode));
        self.rounds += 1;
        let retry = self.rounds.is_multiple_of(OWNER_RETRY);
        let unknown: HashSet<u64> = live
            .iter()
            .filter(|i| match self.owners.get(i) {
                None => true,
                Some(None) => retry,
                Some(Some(_)) => false,
            })
            .copied()
            .collect();
        if !unknown.is_empty() {
            let mut found = sockets::owners(proc, &unknown);
            for inode in unknown {
                self.owners.insert(inode, found.remove(&inode));
            }
        }
        let owners: HashMap<u64, sockets::Owner> = self
            .owners
            .iter()
            .filter_map(|(i, o)| o.clone().map(|o| (*i, o)))
            .collect();
        identity::desired(&identity::Sources {
            config: &cfg.services,
            listeners: &ls,
            owners: &owners,
            containers,
            labels: &labels,
        })
    }

    /// Brings the datapath in line with the sources. Readers (/metrics,
    /// the API) go on reading the published view and the counters while
    /// this holds the writer.
    fn refresh(&mut self, datapath: &Datapath, docker: &docker::Shared, cfg: &Settings) {
        let containers = docker::lock(docker).containers.clone();
        let want = self.desired(cfg, &containers);
        datapath.write(|w| self.apply(w, &want, cfg));
    }

    fn apply(&mut self, w: &mut crate::state::Writer, want: &identity::Desired, cfg: &Settings) {
        // The table first: a newly attached interface then counts correctly
        // from its first packet.
        match w.identity.apply(&mut w.probe, want, Instant::now()) {
            Ok(()) => self.table_error = None,
            Err(e) => {
                // Once per distinct error, not once a second.
                let text = crate::error_chain(&e);
                if self.table_error.as_deref() != Some(text.as_str()) {
                    error!(error = %text, "updating the service table; retrying each refresh");
                    self.table_error = Some(text);
                }
            }
        }
        sync_interfaces(&mut w.probe, cfg, &mut self.warned);
    }
}

/// Samples every service's counters into the history ring, every
/// [`history::INTERVAL`], until `stop`.
async fn sample_history(state: AppState, stop: CancellationToken) {
    let mut tick = tokio::time::interval(history::INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let s = state.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let view = s.datapath.view();
            let counters = s.datapath.counters();
            let now: BTreeMap<String, Totals> = view
                .services
                .iter()
                .filter_map(|(n, sl)| {
                    Some((n.clone(), Totals::from(&counters.counts(sl.slot).ok()?)))
                })
                .collect();
            s.history
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(Instant::now(), &now);
        })
        .await;
    }
}

/// Starts or stops the pre-trigger rings for the capture actions of the
/// config's checks, their service filters from the datapath's table (so a
/// socket or Docker service works as a config one does). Called at start,
/// on a reload and after each refresh.
fn sync_rings(
    rings: &crate::capture::ring::Rings,
    cfg: &Settings,
    datapath: &Datapath,
    store: Option<Arc<crate::store::Store>>,
) {
    let specs: Vec<crate::capture::ring::Spec> = cfg
        .checks
        .iter()
        .flat_map(|c| c.actions.iter())
        .filter_map(|a| match &a.what {
            crate::checks::actions::Do::Capture(s) => Some(s.clone()),
            _ => None,
        })
        .collect();
    if specs.is_empty() && rings.is_empty() {
        return;
    }
    let view = datapath.view();
    let filters = specs
        .iter()
        .filter(|s| s.filter.is_none())
        .filter_map(|s| s.service.as_ref())
        .filter_map(|name| {
            crate::capture::filter_for(&view.services, &view.table, &view.addrs, name)
                .ok()
                .map(|f| (name.clone(), f))
        })
        .collect();
    let dir = store.as_deref().and_then(crate::capture::dir);
    rings.sync(&specs, filters, dir, store, cfg.capture);
}

fn notify_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "sd_notify socket");
            return;
        }
    };
    let bytes = path.as_encoded_bytes();
    let res = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|a| sock.send_to_addr(b"READY=1", &a))
    } else {
        sock.send_to(b"READY=1", Path::new(&path))
    };
    if let Err(e) = res {
        warn!(error = %e, "sd_notify READY=1");
    }
}

/// The counting backend: what `want` says; with `auto`, eBPF, else pcap
/// with the reason logged (a missing capability, an old kernel, a binary
/// built without the programs).
fn open_probe(want: config::Backend, pin_dir: &Path) -> Result<Probe, RunError> {
    let missing = caps::missing_for_probes();
    let pcap = |why: &str| {
        if !caps::can_capture() {
            return Err(RunError::Capabilities(vec!["CAP_NET_RAW"]));
        }
        warn!(
            reason = why,
            "eBPF is not available: counting with the pcap backend (libpcap)"
        );
        Ok(Probe::pcap())
    };
    match want {
        config::Backend::Pcap => {
            if !caps::can_capture() {
                return Err(RunError::Capabilities(vec!["CAP_NET_RAW"]));
            }
            info!("counting with the pcap backend (libpcap), as configured");
            Ok(Probe::pcap())
        }
        config::Backend::Ebpf | config::Backend::Auto if !missing.is_empty() => {
            if want == config::Backend::Auto && caps::can_capture() {
                pcap(&format!("missing capabilities: {}", missing.join(", ")))
            } else {
                Err(RunError::Capabilities(missing))
            }
        }
        config::Backend::Ebpf => Ok(Probe::load(pin_dir)?),
        config::Backend::Auto => match Probe::load(pin_dir) {
            Ok(p) => Ok(p),
            Err(e) if caps::can_capture() => pcap(&crate::error_chain(&e)),
            Err(e) => Err(e.into()),
        },
    }
}

pub async fn run(
    config_arg: Option<PathBuf>,
    backend: Option<config::Backend>,
) -> Result<(), RunError> {
    let path = config_path(config_arg);
    let mut cfg = settings::load(path.as_deref())?;
    info!(
        config = %path.as_deref().map_or("<embedded default>".into(), |p| p.display().to_string()),
        "netpulse {} starting",
        env!("CARGO_PKG_VERSION")
    );
    let backend = backend.unwrap_or(cfg.agent().backend());
    let all = interfaces::list(Path::new("/sys/class/net"));
    for i in &cfg.agent().interfaces {
        let name = i.get_ref();
        match all.iter().find(|x| &x.name == name) {
            None => return Err(RunError::MissingInterface(name.clone())),
            Some(x) if !x.ethernet => return Err(RunError::NotEthernet(name.clone())),
            Some(_) => {}
        }
    }
    // Handlers first: a SIGHUP or SIGTERM during start-up must not kill the
    // agent with probes half attached.
    let mut sigint = signal(SignalKind::interrupt()).map_err(|e| RunError::Other(e.to_string()))?;
    let mut sigterm =
        signal(SignalKind::terminate()).map_err(|e| RunError::Other(e.to_string()))?;
    let mut sighup = signal(SignalKind::hangup()).map_err(|e| RunError::Other(e.to_string()))?;
    let probe = open_probe(backend, &cfg.agent().pin_dir)?;
    if let Some(pin) = probe.pin_dir() {
        info!(pin_dir = %pin.display(), "eBPF programs loaded");
    }
    let retire = cfg.agent().retire();
    let identity = Identity::restore(&probe, retire)?;
    let store = match crate::store::Store::open(&cfg.agent().state_dir) {
        Ok(s) => {
            info!(store = %s.path().display(), "store open");
            Some(Arc::new(s))
        }
        Err(e) => {
            warn!(
                error = %crate::error_chain(&e),
                "no store: check history and jobs are off; counting and checks go on"
            );
            None
        }
    };
    let docker_view = docker::Shared::default();
    let docker_changed = Arc::new(tokio::sync::Notify::new());
    let docker_enabled = cfg.raw.docker.enabled;
    let mut state = AppState::new(
        Datapath::new(probe, identity)?,
        reloadable(&cfg),
        Engine::new(Vec::new(), 1, Default::default(), Default::default()),
        store.clone(),
    );
    state.docker = docker_view.clone();
    // Every task the agent starts runs on `tasks` and stops when `stop` is
    // cancelled (at SIGINT/SIGTERM); shutdown waits for them.
    let tasks = TaskTracker::new();
    let stop = CancellationToken::new();
    // Pre-trigger rings for the checks' capture actions.
    let rings = crate::capture::ring::Rings::default();
    let sink = crate::checks::engine::Sink {
        store: store.clone(),
        actions: Arc::new(crate::checks::actions::Context {
            rings: rings.clone(),
            docker_socket: cfg.raw.docker.socket.clone(),
        }),
        service: Some(service_figures(state.datapath.clone())),
    };
    let mut hint_warned = HashSet::new();
    let mut hinted: Vec<crate::checks::Spec> = Vec::new();
    let (checks, mut checks_stop) = start_checks(
        &cfg,
        &hinted,
        Default::default(),
        sink.clone(),
        &tasks,
        &stop,
    );
    state.checks.store(checks);
    // Only now: jobs a previous run left pending name these checks, and a
    // worker that claimed one before they were loaded would fail it. Jobs
    // (a capture can run for hours) are not waited for at shutdown.
    let jobs = TaskTracker::new();
    crate::jobs::spawn(state.clone(), &jobs, stop.clone());
    if docker_enabled {
        let socket = cfg.raw.docker.socket.clone();
        let (view, changed) = (docker_view.clone(), docker_changed.clone());
        let stop = stop.clone();
        tasks.spawn(async move {
            tokio::select! {
                _ = docker::watch(socket, view, changed) => {}
                _ = stop.cancelled() => {}
            }
        });
        // The first listing names containers from the first refresh, when
        // dockerd answers quickly.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), docker_changed.notified())
            .await;
    }

    let mut refresher = Refresher::default();
    refresher.refresh(&state.datapath, &state.docker, &cfg);
    // After the first refresh: the rings filter by the services' endpoints.
    sync_rings(&rings, &cfg, &state.datapath, store.clone());

    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| RunError::Listen {
            addr: cfg.listen,
            source,
        })?;
    let tls = match &cfg.tls {
        Some(t) => Some(crate::websec::server_config(t).map_err(RunError::Other)?),
        None => None,
    };
    info!(
        listen = %cfg.listen,
        tls = tls.is_some(),
        basic_auth = !cfg.basic_auth_users.is_empty(),
        "serving HTTP: the status page, /metrics, /api/v1"
    );
    let (tls_tx, tls_rx) = tokio::sync::watch::channel(tls);
    tasks.spawn(sample_history(state.clone(), stop.clone()));
    tasks.spawn(web::serve(
        listener,
        web::router(state.clone()),
        stop.clone(),
        tls_rx,
    ));
    notify_ready();

    // Results are written once a second; history older than history_days
    // goes hourly.
    if let Some(store) = store.clone() {
        let keep = cfg.agent().history();
        let stop = stop.clone();
        tasks.spawn(async move {
            let mut second = tokio::time::interval(std::time::Duration::from_secs(1));
            second.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut last_prune: Option<std::time::Instant> = None;
            loop {
                tokio::select! {
                    _ = second.tick() => {}
                    _ = stop.cancelled() => return,
                }
                let prune =
                    last_prune.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(3600));
                if prune {
                    last_prune = Some(std::time::Instant::now());
                }
                let s = store.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    s.flush();
                    if prune {
                        s.prune(keep);
                    }
                })
                .await;
            }
        });
    }
    let mut tick = tokio::time::interval(cfg.agent().refresh());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let refresh = tokio::select! {
            _ = tick.tick() => true,
            // A container change is applied at once, not at the next tick.
            _ = docker_changed.notified() => true,
            _ = sighup.recv() => match settings::load(path.as_deref()) {
                Ok(new) => {
                    if new.listen != cfg.listen {
                        warn!("a new listen address takes effect at the next restart");
                    }
                    if new.agent().pin_dir != cfg.agent().pin_dir {
                        warn!("a new pin_dir takes effect at the next restart");
                    }
                    if new.agent().refresh() != cfg.agent().refresh() {
                        tick = tokio::time::interval(new.agent().refresh());
                        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    }
                    let retire = new.agent().retire();
                    state.datapath.write(|w| w.identity.set_retire_after(retire));
                    if new.raw.docker.enabled != cfg.raw.docker.enabled
                        || new.raw.docker.socket != cfg.raw.docker.socket
                    {
                        warn!("docker.enabled and docker.socket take effect at the next restart");
                    }
                    {
                        let keep = state.checks().statuses();
                        checks_stop.cancel();
                        let (engine, token) =
                            start_checks(&new, &hinted, keep, sink.clone(), &tasks, &stop);
                        checks_stop = token;
                        state.checks.store(engine);
                        // docker.enabled keeps its value until a restart.
                        let mut s = reloadable(&new);
                        s.docker_enabled = docker_enabled;
                        state.settings.store(s);
                    }
                    if new.tls != cfg.tls {
                        match new.tls.as_ref().map(crate::websec::server_config).transpose() {
                            Ok(t) => {
                                info!(tls = t.is_some(), "TLS settings reloaded");
                                let _ = tls_tx.send(t);
                            }
                            Err(e) => error!(error = %e, "TLS settings not reloaded; keeping the old ones"),
                        }
                    }
                    sync_rings(&rings, &new, &state.datapath, store.clone());
                    info!("config reloaded");
                    cfg = new;
                    true
                }
                Err(e) => {
                    error!("config reload failed, keeping the running config:\n{e}");
                    false
                }
            },
            _ = sigint.recv() => { info!("SIGINT: shutting down"); break; }
            _ = sigterm.recv() => { info!("SIGTERM: shutting down"); break; }
        };
        if refresh {
            let (dp, dk, c) = (state.datapath.clone(), state.docker.clone(), cfg.clone());
            let mut r = std::mem::take(&mut refresher);
            match tokio::task::spawn_blocking(move || {
                r.refresh(&dp, &dk, &c);
                r
            })
            .await
            {
                Ok(r) => refresher = r,
                Err(e) => error!(error = %e, "refresh task failed"),
            }
            // The services' endpoints may have changed: the rings' filters.
            sync_rings(&rings, &cfg, &state.datapath, store.clone());
            // Containers came or went: the checks their labels ask for too.
            let now = hinted_checks(&state.docker, &mut hint_warned);
            if crate::checks::hints::fingerprint(&now) != crate::checks::hints::fingerprint(&hinted)
            {
                hinted = now;
                let keep = state.checks().statuses();
                checks_stop.cancel();
                let (engine, token) =
                    start_checks(&cfg, &hinted, keep, sink.clone(), &tasks, &stop);
                checks_stop = token;
                state.checks.store(engine);
            }
        }
    }
    stop.cancel();
    tasks.close();
    jobs.close();
    tasks.wait().await;
    rings.stop_all();
    state.datapath.write(|w| w.probe.detach_all());
    if let Some(s) = &store {
        s.flush();
    }
    info!("probes detached; counters stay pinned for the next run");
    Ok(())
}
