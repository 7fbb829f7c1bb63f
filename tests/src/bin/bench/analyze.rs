//! `netpulse analyze` against the decoders people reach for (issue 6):
//! `tcpdump -nr F > /dev/null` and `tshark -r F -q -z conv,tcp`, on one
//! file of at least a million packets written here, each pinned to the
//! same CPU, median wall time of `rounds` runs. Target: at least 3 Mpps,
//! faster than tcpdump, at least 10× tshark.

use std::{
    io::{BufWriter, Write},
    path::Path,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

const TARGET_MPPS: f64 = 3.0;
const TARGET_VS_TSHARK: f64 = 10.0;

/// xorshift64: the same file on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

const TCP4_FLOWS: u64 = 4000;
const UDP4_FLOWS: u64 = 1000;
const TCP6_FLOWS: u64 = 500;

/// A classic pcap of `packets` frames: 4,000 IPv4 TCP conversations to
/// four service ports, 1,000 UDP ones, 500 IPv6 TCP ones, one frame in
/// twenty VLAN-tagged; 70% bare ACKs, 20% full-size, 10% in between, as
/// a busy server's uplink looks.
pub fn generate(path: &Path, packets: u64) -> Result<u64> {
    let mut w = BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    w.write_all(&0xa1b2c3d4u32.to_le_bytes())?;
    w.write_all(&[2, 0, 4, 0])?;
    w.write_all(&[0; 8])?;
    w.write_all(&262_144u32.to_le_bytes())?;
    w.write_all(&1u32.to_le_bytes())?;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut frame = vec![0u8; 1600];
    let mut bytes = 0u64;
    for i in 0..packets {
        let r = rng.next();
        let flow = (r >> 8) % (TCP4_FLOWS + UDP4_FLOWS + TCP6_FLOWS);
        let reply = r & 1 == 1;
        let vlan = (r >> 1).is_multiple_of(20);
        let size_class = (r >> 40) % 10;
        let (v6, proto) = if flow < TCP4_FLOWS {
            (false, 6u8)
        } else if flow < TCP4_FLOWS + UDP4_FLOWS {
            (false, 17)
        } else {
            (true, 6)
        };
        let l4_hdr = if proto == 6 { 20 } else { 8 };
        let ip_hdr = if v6 { 40 } else { 20 };
        let l2 = if vlan { 18 } else { 14 };
        let min = l2 + ip_hdr + l4_hdr;
        let len = match size_class {
            0..=6 => min,
            7 | 8 => 1514 + if vlan { 4 } else { 0 },
            _ => min + ((r >> 48) % 500) as usize,
        };
        let f = &mut frame[..len];
        f.fill(0);
        f[..6].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
        let mut o = 12;
        if vlan {
            f[o..o + 4].copy_from_slice(&[0x81, 0, 0, 100]);
            o += 4;
        }
        f[o..o + 2].copy_from_slice(if v6 { &[0x86, 0xdd] } else { &[0x08, 0x00] });
        o += 2;
        let client_port = 20_000 + (flow % 40_000) as u16;
        let server_port = 19_601 + (flow % 4) as u16 + if proto == 17 { 4 } else { 0 };
        let (sport, dport) = if reply {
            (server_port, client_port)
        } else {
            (client_port, server_port)
        };
        let ip_len = len - o;
        if v6 {
            let mut client = [0u8; 16];
            client[..2].copy_from_slice(&[0xfd, 0x86]);
            client[14..].copy_from_slice(&(flow as u16).to_be_bytes());
            let mut server = [0u8; 16];
            server[..2].copy_from_slice(&[0xfd, 0x86]);
            server[15] = 1;
            let (s, d) = if reply {
                (server, client)
            } else {
                (client, server)
            };
            f[o] = 0x60;
            f[o + 4..o + 6].copy_from_slice(&((ip_len - 40) as u16).to_be_bytes());
            f[o + 6] = proto;
            f[o + 7] = 64;
            f[o + 8..o + 24].copy_from_slice(&s);
            f[o + 24..o + 40].copy_from_slice(&d);
        } else {
            let client = [10, 86, 100 + (flow >> 8) as u8, (flow & 0xff) as u8];
            let server = [10, 86, 0, 1 + (flow % 8) as u8];
            let (s, d) = if reply {
                (server, client)
            } else {
                (client, server)
            };
            f[o] = 0x45;
            f[o + 2..o + 4].copy_from_slice(&(ip_len as u16).to_be_bytes());
            f[o + 8] = 64;
            f[o + 9] = proto;
            f[o + 12..o + 16].copy_from_slice(&s);
            f[o + 16..o + 20].copy_from_slice(&d);
        }
        o += ip_hdr;
        f[o..o + 2].copy_from_slice(&sport.to_be_bytes());
        f[o + 2..o + 4].copy_from_slice(&dport.to_be_bytes());
        if proto == 6 {
            f[o + 12] = 0x50;
            // ACK, with a SYN or FIN now and then.
            f[o + 13] = 0x10
                | match (r >> 20) % 64 {
                    0 => 0x02,
                    1 => 0x01,
                    _ => 0,
                };
            f[o + 14..o + 16].copy_from_slice(&[0xff, 0xff]);
        } else {
            f[o + 4..o + 6].copy_from_slice(&((len - o) as u16).to_be_bytes());
        }
        let ts = 1_700_000_000_000_000u64 + i * 10;
        w.write_all(&((ts / 1_000_000) as u32).to_le_bytes())?;
        w.write_all(&((ts % 1_000_000) as u32).to_le_bytes())?;
        w.write_all(&(len as u32).to_le_bytes())?;
        w.write_all(&(len as u32).to_le_bytes())?;
        w.write_all(f)?;
        bytes += len as u64;
    }
    w.flush()?;
    Ok(bytes)
}

/// The CPU every tool is pinned to: the last one this process may use.
fn cpu() -> Result<usize> {
    // SAFETY: a zeroed cpu_set_t filled by the kernel.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        bail!("sched_getaffinity: {}", std::io::Error::last_os_error());
    }
    (0..libc::CPU_SETSIZE as usize)
        .rev()
        .find(|c| unsafe { libc::CPU_ISSET(*c, &set) })
        .context("no CPU in the affinity mask")
}

/// Seconds one run of `cmd` takes, pinned to `cpu`, stdout discarded.
fn time(cpu: usize, cmd: &[&str]) -> Result<f64> {
    let start = Instant::now();
    let out = Command::new("taskset")
        .args(["-c", &cpu.to_string()])
        .args(cmd)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("running {}", cmd.join(" ")))?;
    let secs = start.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            cmd.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(secs)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(netpulse: &str, packets: u64, rounds: usize) -> Result<()> {
    for tool in ["tcpdump", "tshark", "taskset"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            bail!("{tool} is not installed (cargo xtask setup installs it)");
        }
    }
    let dir = std::env::temp_dir().join(format!("netpulse-bench-analyze-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("bench.pcap");
    let result = (|| -> Result<()> {
        let t = Instant::now();
        let bytes = generate(&file, packets)?;
        eprintln!(
            "bench: wrote {packets} packets ({:.0} MB) in {:.1} s",
            bytes as f64 / 1e6,
            t.elapsed().as_secs_f64()
        );
        let f = file.to_str().context("temp path is not UTF-8")?;
        // The file as a check: netpulse reads every packet of it.
        let out = Command::new(netpulse)
            .args(["analyze", f, "--output", "json", "--top", "1"])
            .output()?;
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!("netpulse analyze: {}", String::from_utf8_lossy(&out.stderr))
        })?;
        if report["packets"].as_u64() != Some(packets) {
            bail!(
                "netpulse analyze read {} packets of {packets}",
                report["packets"]
            );
        }
        let cpu = cpu()?;
        let services = [
            "--service",
            "web=tcp/19601",
            "--service",
            "api=tcp/19602",
            "--service",
            "grpc=tcp/19603",
            "--service",
            "db=tcp/19604",
            "--service",
            "dns=udp/19605",
        ];
        let mut np = vec![netpulse, "analyze", f];
        np.extend(services);
        let tools: [(&str, Vec<&str>); 3] = [
            ("netpulse analyze F (table, 5 services)", np),
            ("tcpdump -nr F > /dev/null", vec!["tcpdump", "-nr", f]),
            (
                "tshark -r F -q -z conv,tcp",
                vec!["tshark", "-r", f, "-q", "-z", "conv,tcp"],
            ),
        ];
        let mut secs = Vec::new();
        for (_, cmd) in &tools {
            // One warm-up run: the file is in the page cache for all.
            time(cpu, cmd)?;
            let mut v = Vec::new();
            for _ in 0..rounds {
                v.push(time(cpu, cmd)?);
            }
            secs.push(median(v));
        }
        let mpps = |s: f64| packets as f64 / s / 1e6;
        println!(
            "\n### `netpulse analyze` vs tcpdump and tshark ({packets} packets, {:.0} MB, pinned to CPU {cpu}, median of {rounds})\n",
            bytes as f64 / 1e6
        );
        println!("| tool | seconds | Mpps | netpulse is × faster |");
        println!("|---|---:|---:|---:|");
        for ((name, _), s) in tools.iter().zip(&secs) {
            println!("| {name} | {s:.2} | {:.2} | {:.1} |", mpps(*s), s / secs[0]);
        }
        let ok = mpps(secs[0]) >= TARGET_MPPS
            && secs[0] < secs[1]
            && secs[2] / secs[0] >= TARGET_VS_TSHARK;
        println!(
            "\ntarget: ≥ {TARGET_MPPS} Mpps, faster than tcpdump, ≥ {TARGET_VS_TSHARK}× tshark: {}",
            if ok { "met" } else { "NOT met" }
        );
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}
