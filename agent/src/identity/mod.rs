//! Service identity: which endpoints belong to which named service, and which
//! counter slot each service owns.
//!
//! Sources, strongest first: the config's `[[service]]` tables, then Docker
//! containers (by address; a host-network container through its sockets'
//! cgroup), then the host's listening sockets (named after their process).
//! `desired` merges them into one endpoint table and one container address
//! table; `Identity::apply` writes it to the kernel
//! through `probe` and keeps the name ↔ slot mapping pinned, so a restarted
//! agent continues every service's counts.

pub mod sockets;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use agent_ebpf::{
    EndpointKey, FAMILY_V4, FAMILY_V6, FIRST_SERVICE_SLOT, MAX_SLOTS, PROTO_ICMP, PROTO_ICMPV6,
    PROTO_TCP, PROTO_UDP, ROLE_LOCAL, ROLE_REMOTE,
};
use tracing::{info, warn};

use crate::{
    config::{Proto, Service},
    docker::{self, Container},
    probe::{Probe, ProbeError},
};
use sockets::{Listener, Owner};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source {
    Config,
    Container,
    Socket,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Config => "config",
            Source::Container => "container",
            Source::Socket => "socket",
        }
    }
}

/// A container behind a service, as `netpulse_service_info` shows it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ContainerMeta {
    pub id: String,
    pub name: String,
    pub image: String,
    pub compose_project: String,
    pub compose_service: String,
    /// The allow-listed labels (config `docker.labels`), by label name.
    pub labels: BTreeMap<String, String>,
    /// `netpulse.check.<kind>` hints, by kind, for the checks engine.
    pub check_hints: BTreeMap<String, String>,
}

impl ContainerMeta {
    fn new(c: &Container, allow: &[String]) -> Self {
        Self {
            id: c.id.clone(),
            name: c.name.clone(),
            image: c.image.clone(),
            compose_project: c.label(docker::LABEL_COMPOSE_PROJECT).to_string(),
            compose_service: c.label(docker::LABEL_COMPOSE_SERVICE).to_string(),
            labels: allow
                .iter()
                .filter_map(|l| Some((l.clone(), c.labels.get(l)?.clone())))
                .collect(),
            check_hints: c.check_hints(),
        }
    }
}

/// What the agent knows about a service besides its counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceMeta {
    pub source: Source,
    pub remote: bool,
    /// The containers it counts for (replicas of a compose service share
    /// one service).
    pub containers: Vec<ContainerMeta>,
}

impl ServiceMeta {
    /// One field of its containers, the distinct values comma-separated
    /// (replicas of a compose service share one service).
    pub fn join(&self, field: impl Fn(&ContainerMeta) -> &str) -> String {
        let mut v: Vec<&str> = self
            .containers
            .iter()
            .map(field)
            .filter(|s| !s.is_empty())
            .collect();
        v.dedup();
        v.join(",")
    }

    fn new(source: Source, remote: bool) -> Self {
        Self {
            source,
            remote,
            containers: Vec::new(),
        }
    }
}

/// The tables the kernel should hold, by service name.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Desired {
    pub endpoints: BTreeMap<EndpointKey, String>,
    /// Container addresses: on the container's veth, every packet of the
    /// address is the service's.
    pub addrs: BTreeMap<IpAddr, String>,
    /// Containers' host-side veths (ifindex): every packet there is the
    /// container's.
    pub veths: BTreeMap<u32, String>,
    pub services: BTreeMap<String, ServiceMeta>,
    /// The network namespaces of the containers that claimed something:
    /// where the TCP health programs count too.
    pub netns: BTreeSet<u32>,
}

/// Everything `desired` merges.
pub struct Sources<'a> {
    pub config: &'a [Service],
    pub listeners: &'a [Listener],
    pub owners: &'a HashMap<u64, Owner>,
    pub containers: &'a [Container],
    /// Container labels exported on the info metric.
    pub labels: &'a [String],
}

fn key(addr: Option<IpAddr>, family: u8, proto: Proto, port: u16, role: u8) -> EndpointKey {
    let mut k = EndpointKey {
        family,
        proto: match (proto, family) {
            (Proto::Tcp, _) => PROTO_TCP,
            (Proto::Udp, _) => PROTO_UDP,
            (Proto::Icmp, FAMILY_V4) => PROTO_ICMP,
            (Proto::Icmp, _) => PROTO_ICMPV6,
        },
        port,
        role,
        ..Default::default()
    };
    match addr {
        Some(IpAddr::V4(a)) => k.set_addr(&a.octets()),
        Some(IpAddr::V6(a)) => k.set_addr(&a.octets()),
        None => {}
    }
    k
}

/// Keys for one address (None = wildcard in both families).
fn keys_for(addr: Option<IpAddr>, proto: Proto, port: u16, role: u8) -> Vec<EndpointKey> {
    match addr {
        None => vec![
            key(None, FAMILY_V4, proto, port, role),
            key(None, FAMILY_V6, proto, port, role),
        ],
        Some(IpAddr::V4(a)) => vec![key(Some(IpAddr::V4(a)), FAMILY_V4, proto, port, role)],
        Some(IpAddr::V6(a)) => match a.to_ipv4_mapped() {
            // A v4-mapped listener receives plain IPv4 packets.
            Some(v4) => vec![key(Some(IpAddr::V4(v4)), FAMILY_V4, proto, port, role)],
            // [::] on a dual-stack socket takes IPv4 too.
            None if a.is_unspecified() => keys_for(None, proto, port, role),
            None => vec![key(Some(IpAddr::V6(a)), FAMILY_V6, proto, port, role)],
        },
    }
}

/// Turns a process name into a valid service name (shared with the Docker
/// source, which names containers the same way).
pub use crate::docker::name_from_process;

/// Merges the sources. Config services keep their endpoints. A container
/// (not on the host network) claims its addresses. A listening socket adds
/// its endpoints unless the config already covers that endpoint (exactly,
/// or by the config's wildcard), named after its host-network container if
/// it runs in one, else its process; sockets on a container's published
/// ports (docker-proxy) are left out, as that traffic is counted for the
/// container on its veth.
pub fn desired(src: &Sources) -> Desired {
    let mut d = Desired::default();
    for s in src.config {
        let role = if s.remote { ROLE_REMOTE } else { ROLE_LOCAL };
        for e in &s.endpoints {
            let addrs: Vec<Option<IpAddr>> = if e.wildcard {
                vec![None]
            } else {
                e.addrs.iter().copied().map(Some).collect()
            };
            for a in addrs {
                for k in keys_for(a, e.proto, e.port, role) {
                    d.endpoints.entry(k).or_insert_with(|| s.name.clone());
                }
            }
        }
        d.services
            .insert(s.name.clone(), ServiceMeta::new(Source::Config, s.remote));
    }
    let mut published: BTreeSet<(Proto, u16)> = BTreeSet::new();
    let mut by_id: HashMap<&str, &Container> = HashMap::new();
    for c in src.containers {
        published.extend(c.published.iter().copied());
        by_id.insert(c.id.as_str(), c);
        if c.host_network {
            continue;
        }
        let name = c.service();
        let mut claimed = false;
        for a in &c.addrs {
            d.addrs.entry(*a).or_insert_with(|| {
                claimed = true;
                name.clone()
            });
        }
        for v in &c.veths {
            d.veths.entry(*v).or_insert_with(|| {
                claimed = true;
                name.clone()
            });
        }
        if claimed {
            d.netns.extend(c.netns);
            d.services
                .entry(name)
                .or_insert_with(|| ServiceMeta::new(Source::Container, false))
                .containers
                .push(ContainerMeta::new(c, src.labels));
        }
    }
    let mut host_net: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
    for l in src.listeners {
        let owner = src.owners.get(&l.inode);
        // docker-proxy only ever forwards to a container; checking its name
        // too covers the moment between its start and the container listing
        // that shows the port.
        if published.contains(&(l.proto, l.port))
            || owner.is_some_and(|o| o.comm == docker::PROXY_COMM)
        {
            continue;
        }
        let container = owner
            .and_then(|o| o.container.as_deref())
            .and_then(|id| by_id.get(id));
        let (name, source) = match (container, owner) {
            (Some(c), _) => (c.service(), Source::Container),
            (None, Some(o)) => (name_from_process(&o.comm), Source::Socket),
            (None, None) => (format!("{}-{}", l.proto, l.port), Source::Socket),
        };
        let mut added = false;
        for k in keys_for(Some(l.addr), l.proto, l.port, ROLE_LOCAL) {
            let wild = EndpointKey { addr: [0; 4], ..k };
            let covered = d
                .endpoints
                .get(&k)
                .or_else(|| d.endpoints.get(&wild))
                .is_some_and(|owner| {
                    d.services.get(owner).map(|m| m.source) == Some(Source::Config)
                });
            if !covered {
                d.endpoints.entry(k).or_insert_with(|| name.clone());
                added = true;
            }
        }
        if added {
            d.services
                .entry(name.clone())
                .or_insert_with(|| ServiceMeta::new(source, false));
            if let Some(c) = container {
                host_net.entry(name).or_default().insert(c.id.as_str());
            }
        }
    }
    for (name, ids) in host_net {
        if let Some(meta) = d.services.get_mut(&name) {
            for id in ids {
                if let Some(c) = by_id.get(id)
                    && !meta.containers.iter().any(|m| m.id == id)
                {
                    meta.containers.push(ContainerMeta::new(c, src.labels));
                }
            }
        }
    }
    for meta in d.services.values_mut() {
        meta.containers.sort();
    }
    d
}

/// A service with a counter slot: live, or retired and waiting out its grace
/// period with its last counts still readable.
#[derive(Debug, Clone)]
pub struct Slotted {
    pub slot: u32,
    pub meta: Option<ServiceMeta>,
    pub retired_at: Option<Instant>,
}

pub struct Identity {
    slots: BTreeMap<String, Slotted>,
    retire_after: Duration,
    warned_full: bool,
}

impl Identity {
    /// Takes over the slots pinned by a previous agent. Until the sources
    /// name them again they count as retired, so they leave after the grace
    /// period like any other vanished service.
    pub fn restore(probe: &Probe, retire_after: Duration) -> Result<Self, ProbeError> {
        let now = Instant::now();
        let slots = probe
            .slot_names()?
            .into_iter()
            .map(|(slot, name)| {
                (
                    name,
                    Slotted {
                        slot,
                        meta: None,
                        retired_at: Some(now),
                    },
                )
            })
            .collect::<BTreeMap<_, _>>();
        if !slots.is_empty() {
            info!(
                services = slots.len(),
                "continuing counters pinned by a previous run"
            );
        }
        Ok(Self {
            slots,
            retire_after,
            warned_full: false,
        })
    }

    pub fn set_retire_after(&mut self, d: Duration) {
        self.retire_after = d;
    }

    /// Services that have a slot, by name.
    pub fn services(&self) -> &BTreeMap<String, Slotted> {
        &self.slots
    }

    fn allocate(
        &mut self,
        probe: &mut Probe,
        name: &str,
        used: &mut HashSet<u32>,
    ) -> Result<Option<u32>, ProbeError> {
        let Some(slot) = (FIRST_SERVICE_SLOT..MAX_SLOTS).find(|s| !used.contains(s)) else {
            if !self.warned_full {
                warn!(
                    max = MAX_SLOTS - FIRST_SERVICE_SLOT,
                    service = name,
                    "service slots exhausted; new services count as unclassified"
                );
                self.warned_full = true;
            }
            return Ok(None);
        };
        // Whatever a previous owner left (or an in-flight packet added after
        // it retired) must not show up as this service's traffic.
        probe.zero(slot)?;
        probe.set_slot_name(slot, Some(name))?;
        used.insert(slot);
        Ok(Some(slot))
    }

    /// Brings slots and the kernel table in line with `want`.
    pub fn apply(
        &mut self,
        probe: &mut Probe,
        want: &Desired,
        now: Instant,
    ) -> Result<(), ProbeError> {
        let mut used: HashSet<u32> = self.slots.values().map(|s| s.slot).collect();
        for (name, meta) in &want.services {
            match self.slots.get_mut(name) {
                Some(s) => {
                    s.meta = Some(meta.clone());
                    s.retired_at = None;
                }
                None => {
                    if let Some(slot) = self.allocate(probe, name, &mut used)? {
                        info!(service = %name, source = meta.source.as_str(), slot, "new service");
                        self.slots.insert(
                            name.clone(),
                            Slotted {
                                slot,
                                meta: Some(meta.clone()),
                                retired_at: None,
                            },
                        );
                    }
                }
            }
        }
        let mut expired = Vec::new();
        for (name, s) in self.slots.iter_mut() {
            if want.services.contains_key(name) {
                continue;
            }
            match s.retired_at {
                None => {
                    info!(service = %name, "service gone; keeping its counts for the grace period");
                    s.retired_at = Some(now);
                }
                Some(t) if now.duration_since(t) >= self.retire_after => {
                    expired.push((name.clone(), s.slot))
                }
                Some(_) => {}
            }
        }
        for (name, slot) in expired {
            probe.set_slot_name(slot, None)?;
            self.slots.remove(&name);
            info!(service = %name, "service retired");
        }
        let table: BTreeMap<EndpointKey, u32> = want
            .endpoints
            .iter()
            .filter_map(|(k, name)| self.slots.get(name).map(|s| (*k, s.slot)))
            .collect();
        probe.sync_table(table)?;
        let addrs: BTreeMap<IpAddr, u32> = want
            .addrs
            .iter()
            .filter_map(|(a, name)| self.slots.get(name).map(|s| (*a, s.slot)))
            .collect();
        probe.sync_addrs(&addrs)?;
        let veths: BTreeMap<u32, u32> = want
            .veths
            .iter()
            .filter_map(|(i, name)| self.slots.get(name).map(|s| (*i, s.slot)))
            .collect();
        probe.sync_veths(&veths)?;
        probe.sync_netns(&want.netns);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;
    use std::{collections::HashMap, path::Path};

    fn l(proto: Proto, addr: &str, port: u16, inode: u64) -> Listener {
        Listener {
            proto,
            addr: addr.parse().unwrap(),
            port,
            inode,
        }
    }

    #[test]
    fn config_wins_and_sockets_fill_in() {
        let cfg = parse(
            r#"
[[service]]
name = "web"
endpoints = [{ proto = "tcp", port = 80 }]
[[service]]
name = "db"
remote = true
endpoints = [{ proto = "tcp", port = 5432, addr = "10.0.0.5" }]
"#,
            Path::new("c"),
        )
        .unwrap();
        let ls = vec![
            l(Proto::Tcp, "0.0.0.0", 80, 1),
            l(Proto::Tcp, "::", 22, 2),
            l(Proto::Udp, "127.0.0.1", 53, 3),
            l(Proto::Tcp, "127.0.0.1", 9999, 4),
        ];
        let owners = HashMap::from([
            (1, owner("nginx", None)),
            (2, owner("sshd", None)),
            (3, owner("systemd-resolve", None)),
        ]);
        let d = desired(&Sources {
            config: &cfg.services,
            listeners: &ls,
            owners: &owners,
            containers: &[],
            labels: &[],
        });
        let names: Vec<&str> = d.services.keys().map(String::as_str).collect();
        assert_eq!(names, ["db", "sshd", "systemd-resolve", "tcp-9999", "web"]);
        // nginx's port 80 is the config's "web": no service named nginx.
        assert_eq!(d.services["web"].source, Source::Config);
        assert!(d.services["db"].remote);
        // sshd on [::] covers IPv4 too.
        let sshd: Vec<_> = d.endpoints.iter().filter(|(_, n)| *n == "sshd").collect();
        assert_eq!(sshd.len(), 2);
        assert!(sshd.iter().any(|(k, _)| k.family == FAMILY_V4));
        assert!(sshd.iter().all(|(k, _)| k.addr == [0; 4] && k.port == 22));
        let db: Vec<_> = d.endpoints.iter().filter(|(_, n)| *n == "db").collect();
        assert_eq!(db.len(), 1);
        assert_eq!(db[0].0.role, ROLE_REMOTE);
        assert_eq!(&db[0].0.addr_bytes()[..4], &[10, 0, 0, 5]);
    }

    fn owner(comm: &str, container: Option<&str>) -> Owner {
        Owner {
            comm: comm.into(),
            container: container.map(String::from),
        }
    }

    fn container(id: &str, name: &str, addrs: &[&str], labels: &[(&str, &str)]) -> Container {
        Container {
            id: id.into(),
            name: name.into(),
            image: "busybox:static".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            host_network: addrs.is_empty(),
            addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
            published: Vec::new(),
            veths: Vec::new(),
            netns: None,
        }
    }

    #[test]
    fn containers_claim_addresses_and_host_network_ones_their_sockets() {
        let mut web = container(
            "aa",
            "shop-web-1",
            &["172.17.0.2"],
            &[
                ("com.docker.compose.service", "web"),
                ("com.docker.compose.project", "shop"),
                ("team", "payments"),
                ("secret", "x"),
            ],
        );
        web.published = vec![(Proto::Tcp, 8080)];
        let web2 = container(
            "bb",
            "shop-web-2",
            &["172.17.0.3"],
            &[("com.docker.compose.service", "web")],
        );
        let agent = container("cc", "node-agent", &[], &[("netpulse.service", "edge")]);
        let ls = vec![
            // docker-proxy on the published port: the container's traffic.
            l(Proto::Tcp, "0.0.0.0", 8080, 1),
            l(Proto::Tcp, "::", 8080, 2),
            // A host-network container's socket.
            l(Proto::Tcp, "0.0.0.0", 9100, 3),
            l(Proto::Tcp, "0.0.0.0", 22, 4),
        ];
        let owners = HashMap::from([
            (1, owner("docker-proxy", None)),
            (2, owner("docker-proxy", None)),
            (3, owner("node_exporter", Some("cc"))),
            (4, owner("sshd", None)),
        ]);
        let d = desired(&Sources {
            config: &[],
            listeners: &ls,
            owners: &owners,
            containers: &[web, web2, agent],
            labels: &["team".to_string()],
        });
        let names: Vec<&str> = d.services.keys().map(String::as_str).collect();
        assert_eq!(names, ["edge", "sshd", "web"]);
        // Both replicas count for the compose service, by address.
        let addrs: Vec<(String, &str)> = d
            .addrs
            .iter()
            .map(|(a, n)| (a.to_string(), n.as_str()))
            .collect();
        assert_eq!(
            addrs,
            [("172.17.0.2".into(), "web"), ("172.17.0.3".into(), "web")]
        );
        let web = &d.services["web"];
        assert_eq!(web.source, Source::Container);
        assert_eq!(web.containers.len(), 2);
        assert_eq!(web.containers[0].compose_project, "shop");
        // Only allow-listed labels are kept.
        assert_eq!(
            web.containers[0].labels,
            BTreeMap::from([("team".to_string(), "payments".to_string())])
        );
        // No endpoint for docker-proxy's published port.
        assert!(!d.endpoints.keys().any(|k| k.port == 8080));
        // The host-network container is named through its socket's cgroup.
        let edge = &d.services["edge"];
        assert_eq!(edge.source, Source::Container);
        assert_eq!(edge.containers[0].name, "node-agent");
        assert!(
            d.endpoints
                .iter()
                .any(|(k, n)| k.port == 9100 && n == "edge")
        );
    }

    #[test]
    fn process_names_are_sanitized() {
        assert_eq!(name_from_process("kworker/0:1"), "kworker_0_1");
        assert_eq!(name_from_process(""), "proc_");
        assert_eq!(name_from_process("~x"), "_x");
    }
}
