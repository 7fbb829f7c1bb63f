//! The host's listening sockets: `/proc/net/{tcp,udp}{,6}` for the endpoints,
//! `/proc/<pid>/fd` for the process that owns each socket inode.
//!
//! /proc/net is per network namespace: the agent sees the sockets of the
//! namespace it runs in, which is the one its probes watch.

use std::{
    collections::{HashMap, HashSet},
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use crate::config::Proto;

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Listener {
    pub proto: Proto,
    pub addr: IpAddr,
    pub port: u16,
    pub inode: u64,
}

const TCP_LISTEN: u8 = 0x0A;
const UDP_UNCONNECTED: u8 = 0x07;

/// Parses one /proc/net/{tcp,udp}{,6} table. UDP sockets count when bound
/// and unconnected, outside the ephemeral port range (a client's socket
/// is not a service).
pub fn parse_table(text: &str, proto: Proto, ephemeral: (u16, u16)) -> Vec<Listener> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 {
            continue;
        }
        let (Some((addr, port)), Some((_, rport)), Ok(st), Ok(inode)) = (
            parse_endpoint(f[1]),
            parse_endpoint(f[2]),
            u8::from_str_radix(f[3], 16),
            f[9].parse::<u64>(),
        ) else {
            continue;
        };
        let listening = match proto {
            Proto::Tcp => st == TCP_LISTEN,
            Proto::Udp => {
                st == UDP_UNCONNECTED
                    && rport == 0
                    && port != 0
                    && !(ephemeral.0..=ephemeral.1).contains(&port)
            }
            Proto::Icmp => false,
        };
        if listening {
            out.push(Listener {
                proto,
                addr,
                port,
                inode,
            });
        }
    }
    out
}

/// `0100007F:1F90` or the 32-hex-digit IPv6 form. The kernel prints each
/// 32-bit word of the address in host byte order.
fn parse_endpoint(s: &str) -> Option<(IpAddr, u16)> {
    let (a, p) = s.split_once(':')?;
    let port = u16::from_str_radix(p, 16).ok()?;
    let addr = match a.len() {
        8 => IpAddr::V4(Ipv4Addr::from(
            u32::from_str_radix(a, 16).ok()?.to_ne_bytes(),
        )),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                let w = u32::from_str_radix(a.get(i * 8..i * 8 + 8)?, 16).ok()?;
                b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some((addr, port))
}

fn ephemeral_range() -> (u16, u16) {
    fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|v| v.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999))
}

/// Every listening socket of this network namespace.
pub fn listeners(proc: &Path) -> Vec<Listener> {
    let eph = ephemeral_range();
    let mut out = Vec::new();
    for (file, proto) in [
        ("tcp", Proto::Tcp),
        ("tcp6", Proto::Tcp),
        ("udp", Proto::Udp),
        ("udp6", Proto::Udp),
    ] {
        if let Ok(text) = fs::read_to_string(proc.join("net").join(file)) {
            out.extend(parse_table(&text, proto, eph));
        }
    }
    out
}

/// The process holding a socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// Its `comm`.
    pub comm: String,
    /// The container it runs in, from its cgroup (a host-network
    /// container's sockets are the host's).
    pub container: Option<String>,
}

/// The 64-hex-digit container id in a `/proc/<pid>/cgroup` text, as Docker
/// names cgroups: `docker-<id>.scope` under the systemd driver,
/// `/docker/<id>` under cgroupfs (v1 or v2).
pub fn container_id(cgroup: &str) -> Option<String> {
    cgroup.lines().find_map(|line| {
        let path = line.splitn(3, ':').nth(2)?;
        path.split('/').rev().find_map(|part| {
            let id = part
                .strip_prefix("docker-")
                .and_then(|p| p.strip_suffix(".scope"))
                .unwrap_or(part);
            (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()))
                .then(|| id.to_ascii_lowercase())
        })
    })
}

/// Maps socket inodes to a process holding them. Inodes no visible process
/// holds are absent.
pub fn owners(proc: &Path, inodes: &HashSet<u64>) -> HashMap<u64, Owner> {
    let mut out = HashMap::new();
    if inodes.is_empty() {
        return out;
    }
    let Ok(dir) = fs::read_dir(proc) else {
        return out;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(fds) = fs::read_dir(proc.join(pid).join("fd")) else {
            continue;
        };
        let mut owner: Option<Owner> = None;
        for fd in fds.flatten() {
            let Ok(target) = fs::read_link(fd.path()) else {
                continue;
            };
            let Some(inode) = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok())
            else {
                continue;
            };
            if inodes.contains(&inode) && !out.contains_key(&inode) {
                if owner.is_none() {
                    owner = fs::read_to_string(proc.join(pid).join("comm"))
                        .ok()
                        .map(|c| Owner {
                            comm: c.trim().to_string(),
                            container: fs::read_to_string(proc.join(pid).join("cgroup"))
                                .ok()
                                .and_then(|g| container_id(&g)),
                        });
                }
                if let Some(o) = &owner {
                    out.insert(inode, o.clone());
                }
            }
        }
        if out.len() == inodes.len() {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0
   1: 0100007F:9C40 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 12346 1 0000000000000000 100 0 0 10 0
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:0016 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 222 1 0000000000000000 100 0 0 10 0
   1: 0000000000000000FFFF00000100007F:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 223 1 0000000000000000 100 0 0 10 0
";
    const UDP: &str = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  1: 00000000:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 333 2 0000000000000000 0
  2: 00000000:9C41 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 334 2 0000000000000000 0
  3: 0100007F:0036 0100007F:0035 01 00000000:00000000 00:00000000 00000000     0        0 335 2 0000000000000000 0
";

    #[test]
    fn tcp_listeners_only() {
        let l = parse_table(TCP, Proto::Tcp, (32768, 60999));
        assert_eq!(
            l,
            vec![Listener {
                proto: Proto::Tcp,
                addr: "127.0.0.1".parse().unwrap(),
                port: 8080,
                inode: 12345
            }]
        );
    }

    #[test]
    fn tcp6_wildcard_and_mapped() {
        let l = parse_table(TCP6, Proto::Tcp, (32768, 60999));
        assert_eq!(l.len(), 2);
        assert_eq!(l[0].addr, "::".parse::<IpAddr>().unwrap());
        assert_eq!(l[0].port, 22);
        assert_eq!(l[1].addr, "::ffff:127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(l[1].port, 80);
    }

    #[test]
    fn udp_skips_connected_and_ephemeral() {
        let l = parse_table(UDP, Proto::Udp, (32768, 60999));
        assert_eq!(l.len(), 1, "{l:?}");
        assert_eq!(l[0].port, 53);
    }

    #[test]
    fn fuzz_corpus_replays() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/proc_net");
        let mut listeners = 0;
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let text = String::from_utf8_lossy(&std::fs::read(e.path()).unwrap()).into_owned();
            listeners += parse_table(&text, Proto::Tcp, (32768, 60999)).len();
            listeners += parse_table(&text, Proto::Udp, (32768, 60999)).len();
        }
        assert!(listeners >= 3, "seed corpus missing in {}", dir.display());
    }

    #[test]
    fn finds_our_own_listening_socket_and_process() {
        let sock = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = sock.local_addr().unwrap().port();
        let ls = listeners(Path::new("/proc"));
        let me = ls
            .iter()
            .find(|l| l.port == port && l.proto == Proto::Tcp)
            .expect("our listener in /proc/net/tcp");
        let owners = owners(Path::new("/proc"), &HashSet::from([me.inode]));
        let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
        assert_eq!(
            owners.get(&me.inode).map(|o| o.comm.as_str()),
            Some(comm.trim())
        );
    }

    #[test]
    fn container_ids_from_cgroup_paths() {
        let id = "3f4e5d6c7b8a99aabbccddeeff00112233445566778899aabbccddeeff001122";
        for text in [
            format!("0::/system.slice/docker-{id}.scope\n"),
            format!("12:pids:/docker/{id}\n0::/docker/{id}\n"),
            format!("0::/docker/{id}/init.scope\n"),
        ] {
            assert_eq!(container_id(&text).as_deref(), Some(id), "{text}");
        }
        assert_eq!(container_id("0::/user.slice/session-3.scope\n"), None);
        assert_eq!(container_id("0::/\n"), None);
        assert_eq!(container_id(""), None);
    }
}
