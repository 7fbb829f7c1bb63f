//! Capture files written byte by byte (pcap and pcapng, any link type), and
//! tshark's statistics read back, so `netpulse analyze` is held to what
//! Wireshark counts on the same file.

use std::{collections::BTreeMap, path::Path, process::Command};

pub const LINKTYPE_ETHERNET: u32 = 1;
pub const LINKTYPE_RAW: u32 = 101;
pub const LINKTYPE_LINUX_SLL: u32 = 113;
pub const LINKTYPE_LINUX_SLL2: u32 = 276;

/// One record: the captured bytes and the length the packet had on the wire.
#[derive(Debug, Clone)]
pub struct Rec {
    pub data: Vec<u8>,
    pub wire_len: u32,
    pub ts_usec: u64,
}

impl Rec {
    pub fn new(data: Vec<u8>, i: usize) -> Rec {
        Rec {
            wire_len: data.len() as u32,
            data,
            ts_usec: 1_700_000_000_000_000 + i as u64 * 1000,
        }
    }

    /// Captured only up to `snaplen` bytes, as a short snaplen would.
    pub fn snapped(mut self, snaplen: usize) -> Rec {
        self.data.truncate(snaplen);
        self
    }
}

/// A classic pcap file (microsecond timestamps, little-endian).
pub fn pcap(linktype: u32, recs: &[Rec]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&0xa1b2c3d4u32.to_le_bytes());
    f.extend_from_slice(&2u16.to_le_bytes());
    f.extend_from_slice(&4u16.to_le_bytes());
    f.extend_from_slice(&0i32.to_le_bytes());
    f.extend_from_slice(&0u32.to_le_bytes());
    f.extend_from_slice(&262_144u32.to_le_bytes());
    f.extend_from_slice(&linktype.to_le_bytes());
    for r in recs {
        f.extend_from_slice(&((r.ts_usec / 1_000_000) as u32).to_le_bytes());
        f.extend_from_slice(&((r.ts_usec % 1_000_000) as u32).to_le_bytes());
        f.extend_from_slice(&(r.data.len() as u32).to_le_bytes());
        f.extend_from_slice(&r.wire_len.to_le_bytes());
        f.extend_from_slice(&r.data);
    }
    f
}

/// Byte offset of record `i` in a file [`pcap`] wrote.
pub fn pcap_offset(recs: &[Rec], i: usize) -> usize {
    24 + recs[..i].iter().map(|r| 16 + r.data.len()).sum::<usize>()
}

fn block(f: &mut Vec<u8>, ty: u32, body: &[u8]) {
    let pad = body.len().next_multiple_of(4) - body.len();
    let total = (12 + body.len() + pad) as u32;
    f.extend_from_slice(&ty.to_le_bytes());
    f.extend_from_slice(&total.to_le_bytes());
    f.extend_from_slice(body);
    f.extend(std::iter::repeat_n(0u8, pad));
    f.extend_from_slice(&total.to_le_bytes());
}

/// A pcapng file: one section, one interface, enhanced packet blocks.
pub fn pcapng(linktype: u32, recs: &[Rec]) -> Vec<u8> {
    let mut f = Vec::new();
    let mut shb = Vec::new();
    shb.extend_from_slice(&0x1a2b3c4du32.to_le_bytes());
    shb.extend_from_slice(&1u16.to_le_bytes());
    shb.extend_from_slice(&0u16.to_le_bytes());
    shb.extend_from_slice(&(-1i64).to_le_bytes());
    block(&mut f, 0x0a0d0d0a, &shb);
    let mut idb = Vec::new();
    idb.extend_from_slice(&(linktype as u16).to_le_bytes());
    idb.extend_from_slice(&0u16.to_le_bytes());
    idb.extend_from_slice(&262_144u32.to_le_bytes());
    block(&mut f, 1, &idb);
    for r in recs {
        let mut epb = Vec::new();
        epb.extend_from_slice(&0u32.to_le_bytes());
        // Default resolution: microseconds.
        epb.extend_from_slice(&((r.ts_usec >> 32) as u32).to_le_bytes());
        epb.extend_from_slice(&(r.ts_usec as u32).to_le_bytes());
        epb.extend_from_slice(&(r.data.len() as u32).to_le_bytes());
        epb.extend_from_slice(&r.wire_len.to_le_bytes());
        epb.extend_from_slice(&r.data);
        block(&mut f, 6, &epb);
    }
    f
}

/// A Linux cooked (SLL) header before an IP packet.
pub fn sll(ethertype: u16, inner: &[u8]) -> Vec<u8> {
    let mut f = vec![0, 0, 0, 1, 0, 6, 2, 0, 0, 0, 0, 1, 0, 0];
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(inner);
    f
}

/// A Linux cooked v2 (SLL2) header before an IP packet.
pub fn sll2(ethertype: u16, inner: &[u8]) -> Vec<u8> {
    let mut f = ethertype.to_be_bytes().to_vec();
    f.extend_from_slice(&[0, 0, 0, 0, 0, 2, 0, 1, 0, 6, 2, 0, 0, 0, 0, 1, 0, 0]);
    f.extend_from_slice(inner);
    f
}

/// Bytes as tshark prints them: exact ("1234 bytes"), or rounded to a
/// unit ("12 kB").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bytes {
    pub value: u64,
    pub unit: u64,
}

impl Bytes {
    /// Whether `n` prints as this.
    pub fn matches(&self, n: u64) -> bool {
        if self.unit == 1 {
            n == self.value
        } else {
            (n as f64 / self.unit as f64 - self.value as f64).abs() <= 1.0
        }
    }
}

/// One row of `tshark -z conv,tcp|udp`: `a` and `b` as "addr:port";
/// `b_to_a` is the "<-" column, `a_to_b` the "->" one.
#[derive(Debug, Clone)]
pub struct TsharkConv {
    pub a: (String, u16),
    pub b: (String, u16),
    pub b_to_a: (u64, Bytes),
    pub a_to_b: (u64, Bytes),
    pub total: (u64, Bytes),
}

fn tshark(file: &Path, stat: &str) -> String {
    let out = Command::new("tshark")
        .arg("-r")
        .arg(file)
        .args(["-q", "-z", stat])
        .output()
        .expect("spawn tshark");
    assert!(
        out.status.success(),
        "tshark -z {stat}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn endpoint(s: &str) -> (String, u16) {
    let (a, p) = s.rsplit_once(':').expect("tshark endpoint is addr:port");
    (
        a.trim_start_matches('[').trim_end_matches(']').to_string(),
        p.parse().expect("tshark port"),
    )
}

/// `tshark -r FILE -q -z conv,PROTO` (tcp or udp), row by row.
pub fn tshark_conv(file: &Path, proto: &str) -> Vec<TsharkConv> {
    let text = tshark(file, &format!("conv,{proto}"));
    let mut out = Vec::new();
    for line in text.lines() {
        let t: Vec<&str> = line.split_whitespace().collect();
        if t.len() < 3 || t[1] != "<->" {
            continue;
        }
        // frames, size, unit: three times; then start, duration.
        let mut nums = Vec::new();
        let mut i = 3;
        while nums.len() < 3 && i + 2 < t.len() {
            let frames: u64 = t[i].parse().expect("tshark frames");
            let value: u64 = t[i + 1].replace(',', "").parse().expect("tshark bytes");
            let unit = match t[i + 2] {
                "bytes" => 1,
                "kB" => 1_000,
                "MB" => 1_000_000,
                "GB" => 1_000_000_000,
                u => panic!("tshark unit {u} in {line}"),
            };
            nums.push((frames, Bytes { value, unit }));
            i += 3;
        }
        assert_eq!(nums.len(), 3, "tshark conv row: {line}");
        out.push(TsharkConv {
            a: endpoint(t[0]),
            b: endpoint(t[2]),
            b_to_a: nums[0],
            a_to_b: nums[1],
            total: nums[2],
        });
    }
    out
}

/// `tshark -z endpoints,ip`: address → (packets, bytes, tx packets, tx
/// bytes, rx packets, rx bytes).
pub fn tshark_endpoints(file: &Path) -> BTreeMap<String, [u64; 6]> {
    let text = tshark(file, "endpoints,ip");
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let t: Vec<&str> = line.split_whitespace().collect();
        if t.len() != 7 || t[0].parse::<std::net::Ipv4Addr>().is_err() {
            continue;
        }
        let mut v = [0u64; 6];
        for (i, x) in t[1..].iter().enumerate() {
            v[i] = x.replace(',', "").parse().expect("tshark endpoint number");
        }
        out.insert(t[0].to_string(), v);
    }
    out
}

/// `tshark -z io,stat,0,FILTER...`: (frames, bytes) matching each display
/// filter over the whole file, exact (unlike the conversation tables).
pub fn tshark_io(file: &Path, filters: &[&str]) -> Vec<(u64, u64)> {
    let text = tshark(file, &format!("io,stat,0,{}", filters.join(",")));
    let row = text
        .lines()
        .find(|l| l.contains("<>"))
        .unwrap_or_else(|| panic!("no interval row in tshark io,stat:\n{text}"));
    let cells: Vec<u64> = row
        .split('|')
        .skip(2)
        .filter_map(|c| c.trim().parse().ok())
        .collect();
    assert_eq!(cells.len(), 2 * filters.len(), "tshark io,stat row: {row}");
    cells.chunks(2).map(|c| (c[0], c[1])).collect()
}
