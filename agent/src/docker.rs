//! The Docker source: which containers run, their addresses, published
//! ports and labels, kept current from the Engine API's event stream.
//!
//! `watch` owns the connection. It lists the running containers, then
//! follows container and network events, listing again after each burst;
//! the refresh loop reads the latest [`View`]. When dockerd is absent or
//! goes away the agent keeps counting: the view keeps what dockerd last said
//! (containers keep running without it under live-restore, and their
//! counts should not stop), `up` turns false, one warning is logged, and
//! the source reconnects with backoff.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use bollard::{
    API_DEFAULT_VERSION, Docker,
    models::{ContainerSummary, PortSummaryTypeEnum},
    query_parameters::{EventsOptions, ListContainersOptions},
};
use futures_util::StreamExt;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::config::Proto;

/// Label that names a container's service outright.
pub const LABEL_SERVICE: &str = "netpulse.service";
pub const LABEL_COMPOSE_SERVICE: &str = "com.docker.compose.service";
pub const LABEL_COMPOSE_PROJECT: &str = "com.docker.compose.project";
/// Labels `netpulse.check.<kind>=<target>` are check hints, kept on the
/// service for the checks engine (`netpulse.check.http=/healthz`).
pub const LABEL_CHECK_PREFIX: &str = "netpulse.check.";

/// The process Docker forwards published ports through (userland proxy).
pub const PROXY_COMM: &str = "docker-proxy";

const MIN_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Events come in bursts (create, connect, start); one listing after the
/// burst settles.
const SETTLE: Duration = Duration::from_millis(100);
/// Request timeout of the Engine API client, in seconds.
const API_TIMEOUT_SECS: u64 = 10;

/// Turns a process name into a valid service name.
pub fn name_from_process(comm: &str) -> String {
    let mut s: String = comm
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    s.truncate(agent_ebpf::NAME_LEN - 1);
    if s.is_empty() || s.starts_with('~') {
        s = format!("proc_{s}");
    }
    s
}

/// A running container, as far as naming its traffic goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    pub id: String,
    pub name: String,
    pub image: String,
    pub labels: BTreeMap<String, String>,
    /// `--network host`: no address of its own; its sockets are the host's.
    pub host_network: bool,
    /// Its addresses on every network it is attached to.
    pub addrs: Vec<IpAddr>,
    /// Host ports published for it: whatever listens there on the host
    /// (docker-proxy) is the container's, and is counted on its veth.
    pub published: Vec<(Proto, u16)>,
    /// The host-side ends of its veths (ifindexes in the host's namespace).
    pub veths: Vec<u32>,
    /// Its network namespace's inode number (what the TCP health programs
    /// compare sockets' namespaces with).
    pub netns: Option<u32>,
}

impl Container {
    /// The service it counts for, first that applies: the
    /// `netpulse.service` label, the compose service, the container name.
    /// A label that is not a valid service name falls through to the next.
    pub fn service(&self) -> String {
        [LABEL_SERVICE, LABEL_COMPOSE_SERVICE]
            .iter()
            .filter_map(|l| self.labels.get(*l))
            .find(|v| crate::config::bad_name(v).is_none())
            .cloned()
            .unwrap_or_else(|| name_from_process(&self.name))
    }

    pub fn label(&self, name: &str) -> &str {
        self.labels.get(name).map_or("", String::as_str)
    }

    /// `netpulse.check.<kind>` labels, by kind.
    pub fn check_hints(&self) -> BTreeMap<String, String> {
        self.labels
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(LABEL_CHECK_PREFIX)?.to_string(), v.clone())))
            .collect()
    }

    /// From one entry of `GET /containers/json`; None without an id.
    pub fn from_summary(c: &ContainerSummary) -> Option<Self> {
        let id = c.id.clone()?;
        let name = c
            .names
            .as_ref()
            .and_then(|n| n.first())
            .map(|n| n.trim_start_matches('/').to_string())
            .unwrap_or_else(|| id.chars().take(12).collect());
        let host_network = c
            .host_config
            .as_ref()
            .and_then(|h| h.network_mode.as_deref())
            == Some("host");
        let mut addrs: Vec<IpAddr> = c
            .network_settings
            .as_ref()
            .and_then(|n| n.networks.as_ref())
            .into_iter()
            .flat_map(|nets| nets.values())
            .flat_map(|e| [e.ip_address.as_deref(), e.global_ipv6_address.as_deref()])
            .flatten()
            .filter_map(|a| a.parse().ok())
            .collect();
        addrs.sort();
        addrs.dedup();
        let mut published: Vec<(Proto, u16)> = c
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                let proto = match p.typ {
                    Some(PortSummaryTypeEnum::TCP) => Proto::Tcp,
                    Some(PortSummaryTypeEnum::UDP) => Proto::Udp,
                    _ => return None,
                };
                Some((proto, p.public_port.filter(|p| *p != 0)?))
            })
            .collect();
        published.sort();
        published.dedup();
        Some(Self {
            id,
            name,
            image: c.image.clone().unwrap_or_default(),
            labels: c
                .labels
                .as_ref()
                .map(|l| l.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                .unwrap_or_default(),
            host_network,
            addrs,
            published,
            veths: Vec::new(),
            netns: None,
        })
    }
}

/// What the source knows now.
#[derive(Debug, Default, Clone)]
pub struct View {
    /// dockerd answered and the event stream is open.
    pub up: bool,
    /// The running containers, as dockerd last listed them.
    pub containers: Vec<Container>,
}

pub type Shared = Arc<Mutex<View>>;

pub fn lock(v: &Shared) -> MutexGuard<'_, View> {
    v.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why dockerd cannot be used, in words that say what to do.
pub fn describe(e: &bollard::errors::Error, socket: &Path) -> String {
    if let bollard::errors::Error::SocketNotFoundError(_) = e {
        return format!(
            "no Docker socket at {}: containers are named once dockerd runs",
            socket.display()
        );
    }
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = src {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            match io.kind() {
                std::io::ErrorKind::PermissionDenied => {
                    return format!(
                        "permission denied on the Docker socket {}: run netpulse as root or give its user access to the socket (the docker group)",
                        socket.display()
                    );
                }
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound => {
                    return format!("dockerd is not answering on {}", socket.display());
                }
                _ => {}
            }
        }
        src = err.source();
    }
    format!(
        "Docker API on {}: {}",
        socket.display(),
        crate::error_chain(e)
    )
}

/// The host-side peers of a process's network interfaces: each of its
/// interfaces' `iflink`, read through /proc/<pid>/root/sys (Docker mounts
/// sysfs in containers).
pub fn veth_peers(proc: &Path, pid: i64) -> Vec<u32> {
    let dir = proc.join(pid.to_string()).join("root/sys/class/net");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out: Vec<u32> = entries
        .flatten()
        .filter(|e| e.file_name() != "lo")
        .filter_map(|e| {
            let read = |f: &str| -> Option<u32> {
                std::fs::read_to_string(e.path().join(f))
                    .ok()?
                    .trim()
                    .parse()
                    .ok()
            };
            let (ifindex, iflink) = (read("ifindex")?, read("iflink")?);
            (ifindex != iflink).then_some(iflink)
        })
        .collect();
    out.sort();
    out
}

async fn list(docker: &Docker) -> Result<Vec<Container>, bollard::errors::Error> {
    let opts = ListContainersOptions {
        all: false,
        ..Default::default()
    };
    let mut out: Vec<Container> = docker
        .list_containers(Some(opts))
        .await?
        .iter()
        .filter_map(Container::from_summary)
        .collect();
    // Which veth is whose: the container's process shows its interfaces.
    for c in out.iter_mut().filter(|c| !c.host_network) {
        let pid = docker
            .inspect_container(&c.id, None)
            .await
            .ok()
            .and_then(|i| i.state)
            .and_then(|s| s.pid)
            .filter(|p| *p > 0);
        if let Some(pid) = pid {
            c.veths = veth_peers(Path::new("/proc"), pid);
            c.netns = std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .ok()
                .map(|m| std::os::unix::fs::MetadataExt::ino(&m) as u32);
        }
    }
    Ok(out)
}

fn publish(view: &Shared, changed: &Notify, containers: Vec<Container>) {
    let mut v = lock(view);
    let differs = v.containers != containers || !v.up;
    v.up = true;
    v.containers = containers;
    drop(v);
    if differs {
        changed.notify_one();
    }
}

/// One connection: list, then follow events until the stream ends.
async fn session(
    socket: &Path,
    view: &Shared,
    changed: &Notify,
    connected: &mut bool,
    down_logged: &mut bool,
) -> Result<(), bollard::errors::Error> {
    let path = socket.to_string_lossy();
    let docker = Docker::connect_with_unix(&path, API_TIMEOUT_SECS, API_DEFAULT_VERSION)?
        .negotiate_version()
        .await?;
    // Subscribe before listing, so no change falls between the two.
    let filters = [
        (
            "type".to_string(),
            vec!["container".into(), "network".into()],
        ),
        (
            "event".to_string(),
            ["start", "die", "destroy", "rename", "connect", "disconnect"]
                .map(String::from)
                .to_vec(),
        ),
    ]
    .into_iter()
    .collect();
    let mut events = docker.events(Some(EventsOptions {
        filters: Some(filters),
        ..Default::default()
    }));
    let containers = list(&docker).await?;
    info!(
        socket = %socket.display(),
        containers = containers.len(),
        "following dockerd"
    );
    publish(view, changed, containers);
    *connected = true;
    *down_logged = false;
    loop {
        match events.next().await {
            Some(Ok(ev)) => debug!(action = ?ev.action, "docker event"),
            Some(Err(e)) => return Err(e),
            None => return Ok(()),
        }
        // Let the burst settle, then list once.
        let settle = tokio::time::sleep(SETTLE);
        tokio::pin!(settle);
        loop {
            tokio::select! {
                _ = &mut settle => break,
                ev = events.next() => match ev {
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(e),
                    None => return Ok(()),
                },
            }
        }
        publish(view, changed, list(&docker).await?);
    }
}

/// Follows dockerd for as long as the agent runs.
pub async fn watch(socket: PathBuf, view: Shared, changed: Arc<Notify>) {
    let mut backoff = MIN_BACKOFF;
    // Whether the current outage has been reported.
    let mut down_logged = false;
    loop {
        let mut was_connected = false;
        let result = session(
            &socket,
            &view,
            &changed,
            &mut was_connected,
            &mut down_logged,
        )
        .await;
        if was_connected {
            backoff = MIN_BACKOFF;
        }
        let why = match &result {
            Ok(()) => format!("dockerd closed the event stream on {}", socket.display()),
            Err(e) => describe(e, &socket),
        };
        lock(&view).up = false;
        // Also ends the agent's wait for a first listing at start-up.
        changed.notify_one();
        if !down_logged {
            warn!(
                "{why}; counting goes on, containers keep the names last seen; retrying with backoff"
            );
            down_logged = true;
        } else {
            debug!(error = %why, "docker source still down");
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::{ContainerSummaryHostConfig, EndpointSettings, PortSummary};
    use std::collections::HashMap;

    fn summary(labels: &[(&str, &str)]) -> ContainerSummary {
        ContainerSummary {
            id: Some("abc".into()),
            names: Some(vec!["/shop-web-1".into()]),
            image: Some("nginx:1.27".into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            network_settings: Some(bollard::models::ContainerSummaryNetworkSettings {
                networks: Some(HashMap::from([
                    (
                        "bridge".to_string(),
                        EndpointSettings {
                            ip_address: Some("172.17.0.2".into()),
                            global_ipv6_address: Some(String::new()),
                            ..Default::default()
                        },
                    ),
                    (
                        "shop_default".to_string(),
                        EndpointSettings {
                            ip_address: Some("172.18.0.5".into()),
                            global_ipv6_address: Some("fd00::5".into()),
                            ..Default::default()
                        },
                    ),
                ])),
            }),
            ports: Some(vec![
                PortSummary {
                    ip: Some("0.0.0.0".into()),
                    private_port: 80,
                    public_port: Some(8080),
                    typ: Some(PortSummaryTypeEnum::TCP),
                },
                PortSummary {
                    ip: Some("::".into()),
                    private_port: 80,
                    public_port: Some(8080),
                    typ: Some(PortSummaryTypeEnum::TCP),
                },
                PortSummary {
                    ip: None,
                    private_port: 443,
                    public_port: None,
                    typ: Some(PortSummaryTypeEnum::TCP),
                },
            ]),
            ..Default::default()
        }
    }

    #[test]
    fn naming_label_then_compose_then_container_name() {
        let c = Container::from_summary(&summary(&[])).unwrap();
        assert_eq!(c.service(), "shop-web-1");
        let c = Container::from_summary(&summary(&[(LABEL_COMPOSE_SERVICE, "web")])).unwrap();
        assert_eq!(c.service(), "web");
        let c = Container::from_summary(&summary(&[
            (LABEL_COMPOSE_SERVICE, "web"),
            (LABEL_SERVICE, "storefront"),
        ]))
        .unwrap();
        assert_eq!(c.service(), "storefront");
        // An unusable label value falls through to the next rule.
        let c = Container::from_summary(&summary(&[
            (LABEL_SERVICE, "~bad name"),
            (LABEL_COMPOSE_SERVICE, "web"),
        ]))
        .unwrap();
        assert_eq!(c.service(), "web");
    }

    #[test]
    fn addresses_published_ports_and_check_hints() {
        let c = Container::from_summary(&summary(&[
            ("netpulse.check.http", "/healthz"),
            ("netpulse.check.tcp", "5432"),
            ("team", "payments"),
        ]))
        .unwrap();
        let addrs: Vec<String> = c.addrs.iter().map(ToString::to_string).collect();
        assert_eq!(addrs, ["172.17.0.2", "172.18.0.5", "fd00::5"]);
        // Published on both families: one host port. Unpublished ports are
        // not the host's business.
        assert_eq!(c.published, [(Proto::Tcp, 8080)]);
        assert!(!c.host_network);
        let hints = c.check_hints();
        assert_eq!(hints.get("http").map(String::as_str), Some("/healthz"));
        assert_eq!(hints.get("tcp").map(String::as_str), Some("5432"));
        assert_eq!(hints.len(), 2);
    }

    #[test]
    fn host_network_containers_have_no_addresses_of_their_own() {
        let mut s = summary(&[]);
        s.host_config = Some(ContainerSummaryHostConfig {
            network_mode: Some("host".into()),
            ..Default::default()
        });
        s.network_settings = None;
        let c = Container::from_summary(&s).unwrap();
        assert!(c.host_network);
        assert!(c.addrs.is_empty());
    }

    #[tokio::test]
    async fn a_missing_socket_is_reported_by_path() {
        let p = Path::new("/nonexistent/netpulse-test/docker.sock");
        let e = Docker::connect_with_unix(&p.to_string_lossy(), 1, API_DEFAULT_VERSION)
            .err()
            .unwrap();
        let msg = describe(&e, p);
        assert!(
            msg.contains("/nonexistent/netpulse-test/docker.sock"),
            "{msg}"
        );
        assert!(msg.contains("no Docker socket"), "{msg}");
    }
}
