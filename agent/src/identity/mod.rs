//! Service identity: which endpoints belong to which named service, and which
//! counter slot each service owns.
//!
//! Sources, strongest first: the config's `[[service]]` tables, then the
//! host's listening sockets (named after their process). `desired` merges
//! them into one endpoint table; `Identity::apply` writes it to the kernel
//! through `probe` and keeps the name ↔ slot mapping pinned, so a restarted
//! agent continues every service's counts.

pub mod sockets;

use std::{
    collections::{BTreeMap, HashSet},
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
    probe::{Probe, ProbeError},
};
use sockets::Listener;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source {
    Config,
    Socket,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Config => "config",
            Source::Socket => "socket",
        }
    }
}

/// What the agent knows about a service besides its counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceMeta {
    pub source: Source,
    pub remote: bool,
}

/// The endpoint table the kernel should hold, by service name.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Desired {
    pub endpoints: BTreeMap<EndpointKey, String>,
    pub services: BTreeMap<String, ServiceMeta>,
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

/// Merges the sources. Config services keep their endpoints; a listening
/// socket adds its endpoints under its process name unless the config already
/// covers that endpoint (exactly, or by the config's wildcard).
pub fn desired(
    config: &[Service],
    listeners: &[Listener],
    owners: &std::collections::HashMap<u64, String>,
) -> Desired {
    let mut d = Desired::default();
    for s in config {
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
        d.services.insert(
            s.name.clone(),
            ServiceMeta {
                source: Source::Config,
                remote: s.remote,
            },
        );
    }
    for l in listeners {
        let name = match owners.get(&l.inode) {
            Some(comm) => name_from_process(comm),
            None => format!("{}-{}", l.proto, l.port),
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
            d.services.entry(name).or_insert(ServiceMeta {
                source: Source::Socket,
                remote: false,
            });
        }
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
            (1, "nginx".to_string()),
            (2, "sshd".to_string()),
            (3, "systemd-resolve".to_string()),
        ]);
        let d = desired(&cfg.services, &ls, &owners);
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

    #[test]
    fn process_names_are_sanitized() {
        assert_eq!(name_from_process("kworker/0:1"), "kworker_0_1");
        assert_eq!(name_from_process(""), "proc_");
        assert_eq!(name_from_process("~x"), "_x");
    }
}
