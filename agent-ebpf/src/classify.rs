//! The classifier, written once: which counter slot a parsed [`Flow`]
//! belongs to, from the port index, the address groups and the service
//! tables as the `layout` module lays them out. Generic over how the tables
//! are looked up ([`Tables`]): the kernel programs' maps, or the agent's
//! copy of them (`packet::Table`).

use crate::{
    AddrGroup, DIR_EGRESS, DIR_INGRESS, FAMILY_V4, Group4, Group6, Key4, Key6, PortEntry,
    ROLE_LOCAL, ROLE_REMOTE, SLOT_NO_MATCH, parse::Flow, port_index,
};

/// The service table's look-ups.
pub trait Tables {
    /// The port index word at `index` (0 when unset).
    fn port(&self, index: u32) -> u64;
    /// IPv4 address group `g`.
    fn group4(&self, g: u32) -> Option<&Group4>;
    /// IPv6 address group `g`.
    fn group6(&self, g: u32) -> Option<&Group6>;
    /// The slot of an IPv4 endpoint in the hash table.
    fn service4(&self, key: &Key4) -> Option<u32>;
    /// The slot of an IPv6 endpoint in the hash table.
    fn service6(&self, key: &Key6) -> Option<u32>;
}

/// The container tables, for the programs on containers' host-side veths.
pub trait ContainerTables: Tables {
    /// The container behind the veth of `ifindex`.
    fn veth(&self, ifindex: u32) -> Option<u32>;
    /// The container with this IPv4 address (wire bytes as a word).
    fn addr4(&self, addr: u32) -> Option<u32>;
    /// The container with this IPv6 address.
    fn addr6(&self, addr: &[u32; 4]) -> Option<u32>;
}

#[inline(always)]
fn ports<T: Tables>(t: &T, family: u8, proto: u8, port: u16) -> PortEntry {
    match port_index(family, proto, port) {
        Some(i) => PortEntry(t.port(i)),
        None => PortEntry(0),
    }
}

/// Address-specific (or remote) look-up in the family's hash table; a zero
/// address is the wildcard.
#[inline(always)]
fn table<T: Tables>(
    t: &T,
    family: u8,
    proto: u8,
    port: u16,
    role: u8,
    addr: &[u32; 4],
) -> Option<u32> {
    if family == FAMILY_V4 {
        t.service4(&Key4 {
            addr: addr[0],
            port,
            proto,
            role,
        })
    } else {
        t.service6(&Key6 {
            addr: *addr,
            port,
            proto,
            role,
        })
    }
}

/// An address-specific local service on `port` at `addr`: the port's
/// group, else (for ports with more than a group holds) the hash table.
#[inline(always)]
fn exact<T: Tables>(
    t: &T,
    family: u8,
    proto: u8,
    port: u16,
    v: PortEntry,
    addr: &[u32; 4],
) -> Option<u32> {
    let g = v.group();
    if g != 0 {
        let found = if family == FAMILY_V4 {
            t.group4(g).and_then(|grp| grp.find(addr))
        } else {
            t.group6(g).and_then(|grp| grp.find(addr))
        };
        if found.is_some() {
            return found;
        }
    }
    if v.local_hash() {
        return table(t, family, proto, port, ROLE_LOCAL, addr);
    }
    None
}

/// A local service at `addr`:`port`: an address-specific one, then the
/// wildcard-address one.
#[inline(always)]
pub fn local<T: Tables>(t: &T, family: u8, proto: u8, port: u16, addr: &[u32; 4]) -> Option<u32> {
    let v = ports(t, family, proto, port);
    if let Some(slot) = exact(t, family, proto, port, v, addr) {
        return Some(slot);
    }
    let w = v.wildcard();
    (w != 0).then_some(w)
}

/// A remote service at `addr`:`port`: that address, then any address.
#[inline(always)]
pub fn remote<T: Tables>(t: &T, family: u8, proto: u8, port: u16, addr: &[u32; 4]) -> Option<u32> {
    if !ports(t, family, proto, port).remote() {
        return None;
    }
    if let Some(slot) = table(t, family, proto, port, ROLE_REMOTE, addr) {
        return Some(slot);
    }
    table(t, family, proto, port, ROLE_REMOTE, &[0; 4])
}

/// Slot and direction (in the service's view) of a flow seen on a host
/// interface's hook of direction `hook_dir`. Local end first (an
/// address-specific service, then the wildcard one); then, for ports remote
/// services use, the other end, whose view is the opposite.
#[inline(always)]
pub fn classify<T: Tables>(t: &T, flow: &Flow, hook_dir: usize) -> (u32, usize) {
    let (local_addr, lport, remote_addr, rport) = if hook_dir == DIR_INGRESS {
        (&flow.dst, flow.dport, &flow.src, flow.sport)
    } else {
        (&flow.src, flow.sport, &flow.dst, flow.dport)
    };
    let (family, proto) = (flow.family, flow.proto);
    if let Some(slot) = local(t, family, proto, lport, local_addr) {
        return (slot, hook_dir);
    }
    if let Some(slot) = remote(t, family, proto, rport, remote_addr) {
        return (slot, hook_dir ^ 1);
    }
    (SLOT_NO_MATCH, hook_dir)
}

/// On a container's host-side veth, `dir` is the container's view. Only the
/// container's end is looked at: an address-specific service on its address
/// and port first, then the container behind this veth, else by address.
/// Host and remote services are counted on the host's interfaces, so a
/// packet between two containers, or from a container to the outside, is
/// counted once per service.
#[inline(always)]
pub fn classify_container<T: ContainerTables>(
    t: &T,
    flow: &Flow,
    dir: usize,
    ifindex: u32,
) -> Option<u32> {
    let (addr, port) = if dir == DIR_INGRESS {
        (&flow.dst, flow.dport)
    } else {
        (&flow.src, flow.sport)
    };
    let family = flow.family;
    let v = ports(t, family, flow.proto, port);
    if let Some(slot) = exact(t, family, flow.proto, port, v, addr) {
        return Some(slot);
    }
    // Unicast only: multicast the host sends down every veth (IPv6
    // neighbour discovery, MLD) is not the container's traffic.
    let first = addr[0].to_ne_bytes()[0];
    let multicast = if family == FAMILY_V4 {
        first & 0xf0 == 0xe0
    } else {
        first == 0xff
    };
    if !multicast && let Some(slot) = t.veth(ifindex) {
        return Some(slot);
    }
    if family == FAMILY_V4 {
        t.addr4(addr[0])
    } else {
        t.addr6(addr)
    }
}

/// Slot and direction of a flow read from a file, where no hook says which
/// end is this host's: a service at the destination sees the packet come
/// in, one at the source sees it go out; local services before remote ones.
#[inline]
pub fn classify_file<T: Tables>(t: &T, flow: &Flow) -> (u32, usize) {
    let (family, proto) = (flow.family, flow.proto);
    if let Some(slot) = local(t, family, proto, flow.dport, &flow.dst) {
        return (slot, DIR_INGRESS);
    }
    if let Some(slot) = local(t, family, proto, flow.sport, &flow.src) {
        return (slot, DIR_EGRESS);
    }
    if let Some(slot) = remote(t, family, proto, flow.dport, &flow.dst) {
        return (slot, DIR_INGRESS);
    }
    if let Some(slot) = remote(t, family, proto, flow.sport, &flow.src) {
        return (slot, DIR_EGRESS);
    }
    (SLOT_NO_MATCH, DIR_INGRESS)
}
