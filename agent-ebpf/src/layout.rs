//! How the agent lays the service table (endpoint → slot) out in the
//! kernel's maps, written once: the agent's `Probe::sync_table` writes this
//! layout to the maps, and the agent's userspace classifier
//! (`packet::Table`) holds the same layout, so [`crate::classify`] reads
//! both the same way.
//!
//! - A local wildcard-address endpoint: its slot in the port index word.
//! - Address-specific local endpoints of one port: an address group when
//!   they fit ([`AddrGroup::CAP`]), else the family's hash table
//!   ([`PORT_LOCAL_HASH`](crate::PORT_LOCAL_HASH)).
//! - Remote endpoints: the family's hash table, flagged in the port word
//!   ([`PORT_REMOTE`](crate::PORT_REMOTE)).

use std::collections::BTreeMap;

use crate::{AddrGroup, EndpointKey, FAMILY_V4, Group4, Group6, PortEntry, ROLE_LOCAL, port_index};

/// The service table as the maps hold it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Port index words (`NP_PORTS`) of the ports some endpoint uses.
    pub ports: BTreeMap<u32, u64>,
    /// Entries of the per-family hash tables (`NP_SERVICES4`/`6`).
    pub hash: BTreeMap<EndpointKey, u32>,
    /// Address groups by id (`NP_GROUPS4`/`6`).
    pub groups4: BTreeMap<u32, Group4>,
    pub groups6: BTreeMap<u32, Group6>,
    /// Port index → its address group id.
    pub group_of: BTreeMap<u32, u32>,
}

/// Where address groups go. The agent's kernel side keeps ids and
/// positions stable across updates, so a packet in flight never reads
/// another port's group or another address's slot; a fresh table needs
/// neither ([`Fresh`]).
pub trait GroupIds {
    /// A group id (never 0) for port index `index`, or `None` when none is
    /// free (its addresses then go to the hash table).
    fn id(&mut self, index: u32) -> Option<u32>;
    /// What group `g` held before, by position, if it was in use.
    fn previous(&self, g: u32, v6: bool) -> Option<Vec<Option<[u32; 4]>>>;
}

/// Group ids from 1 up, every group new.
#[derive(Debug, Default)]
pub struct Fresh {
    next: u32,
}

impl GroupIds for Fresh {
    fn id(&mut self, _index: u32) -> Option<u32> {
        self.next += 1;
        (self.next < crate::MAX_GROUPS).then_some(self.next)
    }
    fn previous(&self, _g: u32, _v6: bool) -> Option<Vec<Option<[u32; 4]>>> {
        None
    }
}

/// The positions group `g` holds, for [`GroupIds::previous`].
pub fn entries<G: AddrGroup>(g: &G) -> Vec<Option<[u32; 4]>> {
    (0..G::CAP).map(|n| g.entry(n)).collect()
}

/// Lays `want` (endpoint → slot) out. Endpoints of protocols services
/// cannot name are left out.
pub fn layout<'a>(
    want: impl IntoIterator<Item = (&'a EndpointKey, &'a u32)>,
    ids: &mut impl GroupIds,
) -> Layout {
    let mut out = Layout::default();
    let mut ports: BTreeMap<u32, PortEntry> = BTreeMap::new();
    let mut exact: BTreeMap<u32, Vec<(&EndpointKey, u32)>> = BTreeMap::new();
    for (k, slot) in want {
        let Some(i) = port_index(k.family, k.proto, k.port) else {
            continue;
        };
        let v = ports.entry(i).or_default();
        match (k.role, k.addr == [0; 4]) {
            (ROLE_LOCAL, true) => v.set_wildcard(*slot),
            (ROLE_LOCAL, false) => exact.entry(i).or_default().push((k, *slot)),
            _ => {
                v.set_remote();
                out.hash.insert(*k, *slot);
            }
        }
    }
    for (i, list) in exact {
        let v6 = list[0].0.family != FAMILY_V4;
        let cap = if v6 { Group6::CAP } else { Group4::CAP };
        let g = ids.id(i);
        let v = ports.entry(i).or_default();
        match g {
            Some(g) if list.len() <= cap => {
                let entries: Vec<([u32; 4], u32)> =
                    list.iter().map(|(k, slot)| (k.addr, *slot)).collect();
                let prev = ids.previous(g, v6);
                let pos = positions(prev.as_deref(), &entries, cap);
                if v6 {
                    out.groups6.insert(g, fill(&pos));
                } else {
                    out.groups4.insert(g, fill(&pos));
                }
                out.group_of.insert(i, g);
                v.set_group(g);
            }
            _ => {
                v.set_local_hash();
                out.hash.extend(list.iter().map(|(k, slot)| (**k, *slot)));
            }
        }
    }
    out.ports = ports.into_iter().map(|(i, v)| (i, v.0)).collect();
    out
}

fn fill<G: AddrGroup>(pos: &[(usize, ([u32; 4], u32))]) -> G {
    let mut g = G::default();
    for (n, (addr, slot)) in pos {
        g.set(*n, addr, *slot);
    }
    g
}

/// Places `entries` (address, slot) in a group of `cap` positions, keeping
/// each address that was in `prev` at its old position. Returns
/// (position, (address, slot)).
pub fn positions(
    prev: Option<&[Option<[u32; 4]>]>,
    entries: &[([u32; 4], u32)],
    cap: usize,
) -> Vec<(usize, ([u32; 4], u32))> {
    let mut taken = vec![false; cap];
    let mut out = Vec::with_capacity(entries.len());
    let mut rest = Vec::new();
    for e in entries {
        match prev.and_then(|p| p.iter().position(|a| *a == Some(e.0))) {
            Some(n) if n < cap && !taken[n] => {
                taken[n] = true;
                out.push((n, *e));
            }
            _ => rest.push(*e),
        }
    }
    // New addresses take positions nobody held before where possible.
    let was_free = |n: usize| prev.is_none_or(|p| p.get(n).is_none_or(Option::is_none));
    for e in rest {
        let n = (0..cap)
            .find(|n| !taken[*n] && was_free(*n))
            .or_else(|| (0..cap).find(|n| !taken[*n]));
        if let Some(n) = n {
            taken[n] = true;
            out.push((n, e));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        DIR_EGRESS, DIR_INGRESS, FAMILY_V6, Key4, Key6, PROTO_TCP, ROLE_REMOTE, SLOT_NO_MATCH,
        classify::{Tables, classify, classify_file},
        parse::Flow,
    };

    fn a(x: u32) -> [u32; 4] {
        [x, 0, 0, 0]
    }

    #[test]
    fn group_positions_are_kept_for_addresses_that_stay() {
        let prev = [Some(a(1)), Some(a(2)), Some(a(3)), None];
        // 2 leaves, 4 and 5 arrive: 1 and 3 keep 0 and 2; 4 takes the never
        // used 3, then 5 the freed 1.
        let mut got = positions(
            Some(&prev),
            &[(a(1), 10), (a(3), 30), (a(4), 40), (a(5), 50)],
            4,
        );
        got.sort();
        assert_eq!(
            got,
            [
                (0, (a(1), 10)),
                (1, (a(5), 50)),
                (2, (a(3), 30)),
                (3, (a(4), 40))
            ]
        );
        // No history: first come, first placed.
        let got = positions(None, &[(a(7), 70), (a(8), 80)], 2);
        assert_eq!(got, [(0, (a(7), 70)), (1, (a(8), 80))]);
    }

    /// The layout read back through `Tables`, as the kernel reads its maps.
    impl Tables for Layout {
        fn port(&self, index: u32) -> u64 {
            self.ports.get(&index).copied().unwrap_or(0)
        }
        fn group4(&self, g: u32) -> Option<&Group4> {
            self.groups4.get(&g)
        }
        fn group6(&self, g: u32) -> Option<&Group6> {
            self.groups6.get(&g)
        }
        fn service4(&self, key: &Key4) -> Option<u32> {
            self.hash
                .iter()
                .find(|(k, _)| k.family == FAMILY_V4 && k.key4() == *key)
                .map(|(_, s)| *s)
        }
        fn service6(&self, key: &Key6) -> Option<u32> {
            self.hash
                .iter()
                .find(|(k, _)| k.family == FAMILY_V6 && k.key6() == *key)
                .map(|(_, s)| *s)
        }
    }

    fn key(family: u8, port: u16, role: u8, addr: u32) -> EndpointKey {
        EndpointKey {
            family,
            proto: PROTO_TCP,
            port,
            role,
            addr: if family == FAMILY_V4 {
                a(addr)
            } else {
                [0xfd, 0, 0, addr]
            },
            ..Default::default()
        }
    }

    #[test]
    fn every_kind_of_endpoint_is_found_where_it_was_put() {
        let mut want = BTreeMap::new();
        // Port 80: wildcard 20, and two addresses (a group).
        want.insert(key(FAMILY_V4, 80, ROLE_LOCAL, 0), 20);
        want.insert(key(FAMILY_V4, 80, ROLE_LOCAL, 1), 21);
        want.insert(key(FAMILY_V4, 80, ROLE_LOCAL, 2), 22);
        // Port 81: five addresses, more than a group holds.
        for i in 1..=5 {
            want.insert(key(FAMILY_V4, 81, ROLE_LOCAL, i), 30 + i);
        }
        // IPv6 port 80: three addresses, more than an IPv6 group holds.
        for i in 1..=3 {
            want.insert(key(FAMILY_V6, 80, ROLE_LOCAL, i), 40 + i);
        }
        // A remote service on 5432 at one address.
        want.insert(key(FAMILY_V4, 5432, ROLE_REMOTE, 9), 50);
        let l = layout(&want, &mut Fresh::default());
        assert_eq!(l.groups4.len(), 1);
        assert!(l.groups6.is_empty());
        let p80 = PortEntry(l.ports[&port_index(FAMILY_V4, PROTO_TCP, 80).unwrap()]);
        assert_eq!((p80.wildcard(), p80.local_hash()), (20, false));
        assert_ne!(p80.group(), 0);
        let p81 = PortEntry(l.ports[&port_index(FAMILY_V4, PROTO_TCP, 81).unwrap()]);
        assert!(p81.local_hash() && p81.group() == 0);
        assert!(PortEntry(l.ports[&port_index(FAMILY_V4, PROTO_TCP, 5432).unwrap()]).remote());

        let flow = |family: u8, dport: u16, dst: u32, sport: u16, src: u32| {
            let k = |x| key(family, 0, 0, x).addr;
            Flow {
                family,
                proto: PROTO_TCP,
                dst: k(dst),
                src: k(src),
                dport,
                sport,
                ..Default::default()
            }
        };
        let cases = [
            (flow(FAMILY_V4, 80, 1, 40000, 7), (21, DIR_INGRESS)),
            (flow(FAMILY_V4, 80, 3, 40000, 7), (20, DIR_INGRESS)),
            (flow(FAMILY_V4, 81, 4, 40000, 7), (34, DIR_INGRESS)),
            (
                flow(FAMILY_V4, 81, 6, 40000, 7),
                (SLOT_NO_MATCH, DIR_INGRESS),
            ),
            (flow(FAMILY_V6, 80, 2, 40000, 7), (42, DIR_INGRESS)),
            // To the remote service: its view is the opposite.
            (flow(FAMILY_V4, 40000, 7, 5432, 9), (50, DIR_EGRESS)),
            (
                flow(FAMILY_V4, 40000, 7, 5432, 8),
                (SLOT_NO_MATCH, DIR_INGRESS),
            ),
        ];
        for (f, want) in cases {
            assert_eq!(classify(&l, &f, DIR_INGRESS), want, "{f:?}");
        }
        // From a file, either end.
        let mut f = flow(FAMILY_V4, 40000, 7, 80, 2);
        assert_eq!(classify_file(&l, &f), (22, DIR_EGRESS));
        f.sport = 1;
        assert_eq!(classify_file(&l, &f), (SLOT_NO_MATCH, DIR_INGRESS));
    }
}
