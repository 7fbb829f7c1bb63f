//! Which interfaces the probes go on: the configured list, or every
//! interface that is up. Read from /sys/class/net, which `ip netns exec`
//! remounts for the namespace the agent runs in.

use std::{fs, path::Path};

/// Which programs an interface gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Zone {
    /// The host's own interfaces: XDP in, TC out, services matched by the
    /// packet's local end (and remote services by the other end).
    Host,
    /// A container's host-side veth: TC both ways, counting only for the
    /// container behind it (by its address), so each packet is counted once
    /// per host. XDP stays off veths: it would switch the container's
    /// datapath to NAPI mode.
    Container,
}

impl Zone {
    pub fn as_str(self) -> &'static str {
        match self {
            Zone::Host => "host",
            Zone::Container => "container",
        }
    }
}

const IFF_UP: u32 = 0x1;
const ARPHRD_ETHER: u32 = 1;
const ARPHRD_LOOPBACK: u32 = 772;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub up: bool,
    /// Ethernet framing (or loopback's): what the programs parse.
    pub ethernet: bool,
    pub bridge: bool,
    /// A bridge member (a container's host-side veth, say).
    pub bridge_port: bool,
    /// Stacked on another device (VLAN, bond, macvlan): its traffic also
    /// crosses the lower device.
    pub stacked: bool,
    /// One end of a pair whose other end is another device (veth): `iflink`
    /// differs from `ifindex`.
    pub paired: bool,
}

impl Interface {
    /// A bridge member with a peer: a container's host-side veth.
    pub fn zone(&self) -> Zone {
        if self.bridge_port && self.paired {
            Zone::Container
        } else {
            Zone::Host
        }
    }
}

fn read_num(p: &Path) -> Option<u32> {
    let s = fs::read_to_string(p).ok()?;
    let s = s.trim();
    match s.strip_prefix("0x") {
        Some(h) => u32::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// The driver behind `ifname`, as `ethtool -i` reports it (SIOCETHTOOL,
/// ETHTOOL_GDRVINFO); None if the device has none or is gone.
pub fn driver(ifname: &str) -> Option<String> {
    const ETHTOOL_GDRVINFO: u32 = 0x3;
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        version: [u8; 32],
        fw_version: [u8; 32],
        bus_info: [u8; 32],
        erom_version: [u8; 32],
        reserved2: [u8; 12],
        n_priv_flags: u32,
        n_stats: u32,
        testinfo_len: u32,
        eedump_len: u32,
        regdump_len: u32,
    }
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        data: *mut DrvInfo,
        _pad: [u8; 16],
    }
    let bytes = ifname.as_bytes();
    if bytes.len() >= libc::IFNAMSIZ {
        return None;
    }
    // SAFETY: all-zero is a valid DrvInfo (integers and byte arrays).
    let mut info: DrvInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: &mut info,
        _pad: [0; 16],
    };
    req.name[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: a datagram socket for the ioctl, closed below; the request
    // points at `info`, which outlives the call.
    let ok = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return None;
        }
        let rc = libc::ioctl(fd, libc::SIOCETHTOOL, &mut req);
        libc::close(fd);
        rc == 0
    };
    if !ok {
        return None;
    }
    let end = info.driver.iter().position(|b| *b == 0).unwrap_or(32);
    Some(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

pub fn list(sys_class_net: &Path) -> Vec<Interface> {
    let Ok(dir) = fs::read_dir(sys_class_net) else {
        return Vec::new();
    };
    let mut out: Vec<Interface> = dir
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            let p = e.path();
            let flags = read_num(&p.join("flags"))?;
            let ty = read_num(&p.join("type")).unwrap_or(0);
            let stacked = fs::read_dir(&p).ok()?.flatten().any(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| n.starts_with("lower_"))
            });
            let paired = match (read_num(&p.join("ifindex")), read_num(&p.join("iflink"))) {
                (Some(i), Some(l)) => i != l,
                _ => false,
            };
            Some(Interface {
                paired,
                up: flags & IFF_UP != 0,
                ethernet: ty == ARPHRD_ETHER || ty == ARPHRD_LOOPBACK,
                bridge: p.join("bridge").exists(),
                bridge_port: p.join("brport").exists(),
                stacked,
                name,
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The default set: up, Ethernet-framed, and where a packet is seen once
/// per host: the host's own interfaces, and containers' host-side veths
/// (bridge members with a peer), where only the container behind each is
/// counted. Left out: bridges (what they carry crossed a member or the host
/// stack already), other bridge members (a NIC enslaved to a bridge), and
/// devices stacked on another (VLAN, bond, macvlan), whose packets the
/// lower device carries too.
pub fn default_set(all: &[Interface]) -> Vec<(String, Zone)> {
    all.iter()
        .filter(|i| {
            i.up && i.ethernet
                && !i.bridge
                && !i.stacked
                && (!i.bridge_port || i.zone() == Zone::Container)
        })
        .map(|i| (i.name.clone(), i.zone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_in_the_default_set() {
        let all = list(Path::new("/sys/class/net"));
        let lo = all
            .iter()
            .find(|i| i.name == "lo")
            .expect("lo in /sys/class/net");
        assert!(lo.up && lo.ethernet && !lo.bridge && !lo.stacked);
        assert!(default_set(&all).contains(&("lo".to_string(), Zone::Host)));
    }

    #[test]
    fn bridges_nic_members_and_stacked_devices_are_left_out_container_veths_kept() {
        let base = Interface {
            name: "eth0".into(),
            up: true,
            ethernet: true,
            bridge: false,
            bridge_port: false,
            stacked: false,
            paired: false,
        };
        let all = [
            base.clone(),
            Interface {
                name: "docker0".into(),
                bridge: true,
                ..base.clone()
            },
            Interface {
                name: "veth1a2b".into(),
                bridge_port: true,
                paired: true,
                ..base.clone()
            },
            Interface {
                name: "enp1s0".into(),
                bridge_port: true,
                ..base.clone()
            },
            Interface {
                name: "veth-solo".into(),
                paired: true,
                ..base.clone()
            },
            Interface {
                name: "eth0.100".into(),
                stacked: true,
                ..base.clone()
            },
            Interface {
                name: "wg0".into(),
                ethernet: false,
                ..base.clone()
            },
            Interface {
                name: "eth1".into(),
                up: false,
                ..base.clone()
            },
        ];
        assert_eq!(
            default_set(&all),
            [
                ("eth0".to_string(), Zone::Host),
                ("veth1a2b".to_string(), Zone::Container),
                ("veth-solo".to_string(), Zone::Host),
            ]
        );
    }
}
