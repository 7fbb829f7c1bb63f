//! `netpulse analyze` against what reading the same file costs at the
//! least, and against the tools a user runs for the same answer.
//!
//! The floor: `cat F > /dev/null` (the bytes alone) and a bare libpcap
//! read loop (`pcap_next_ex` and nothing else, in this binary: `bench
//! --pcap-loop F`) with three stdio buffers: libpcap's own open (4 KiB),
//! 64 KiB as netpulse reads, and 1 MiB; the fastest is the reference.
//! The same answer: `tshark -q -z conv,tcp -z conv,udp
//! -z endpoints,ip -r F` (conversations and endpoints) and `capinfos F`
//! (the file's counts, sizes and times). Two files: a synthetic one of a
//! million packets written here, and real traffic captured here
//! (`traffic`). Every tool pinned to the same CPU, rounds interleaved,
//! median wall time. Target: netpulse within 1.5× of the bare loop.

use std::{
    io::{BufWriter, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::traffic;

/// netpulse's time over the bare libpcap loop's, at most.
const TARGET_VS_LOOP: f64 = 1.5;

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
    let mut rng = netpulse_tests::Rng(0x9e37_79b9_7f4a_7c15);
    let mut frame = vec![0u8; 1600];
    let mut bytes = 0u64;
    for i in 0..packets {
        let r = rng.u64();
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
fn time(cpu: usize, cmd: &[String]) -> Result<f64> {
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

#[repr(C)]
struct PktHdr {
    ts: libc::timeval,
    caplen: u32,
    len: u32,
}

#[link(name = "pcap")]
unsafe extern "C" {
    fn pcap_open_offline(
        fname: *const libc::c_char,
        errbuf: *mut libc::c_char,
    ) -> *mut libc::c_void;
    fn pcap_fopen_offline(fp: *mut libc::FILE, errbuf: *mut libc::c_char) -> *mut libc::c_void;
    fn pcap_next_ex(
        p: *mut libc::c_void,
        header: *mut *mut PktHdr,
        data: *mut *const u8,
    ) -> libc::c_int;
    fn pcap_close(p: *mut libc::c_void);
}

/// The bare read loop (`bench --pcap-loop FILE`): libpcap opens `file`
/// (through a stdio stream with a `buffer`-byte buffer, or libpcap's own
/// open for 0) and `pcap_next_ex` runs until the end; returns the count.
pub fn pcap_loop(file: &Path, buffer: usize) -> Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(file.as_os_str().as_bytes())?;
    let mut err = [0 as libc::c_char; 257];
    let mut buf = vec![0u8; buffer];
    // SAFETY: C strings and buffers that outlive the calls; the stream is
    // libpcap's once pcap_fopen_offline succeeds, else closed here; `buf`
    // outlives the capture (closed below).
    let p = unsafe {
        if buffer == 0 {
            pcap_open_offline(path.as_ptr(), err.as_mut_ptr())
        } else {
            let f = libc::fopen(path.as_ptr(), c"r".as_ptr());
            if f.is_null() {
                bail!("{}: {}", file.display(), std::io::Error::last_os_error());
            }
            libc::setvbuf(f, buf.as_mut_ptr().cast(), libc::_IOFBF, buffer);
            let p = pcap_fopen_offline(f, err.as_mut_ptr());
            if p.is_null() {
                libc::fclose(f);
            }
            p
        }
    };
    if p.is_null() {
        // SAFETY: libpcap NUL-terminates its error (and the last byte is 0).
        let msg = unsafe { std::ffi::CStr::from_ptr(err.as_ptr()) };
        bail!("{}: {}", file.display(), msg.to_string_lossy());
    }
    let mut n = 0u64;
    let rc = loop {
        let mut h = std::ptr::null_mut();
        let mut d = std::ptr::null();
        // SAFETY: an open capture; libpcap fills both pointers.
        let rc = unsafe { pcap_next_ex(p, &mut h, &mut d) };
        if rc != 1 {
            break rc;
        }
        n += 1;
    };
    // SAFETY: the capture we opened, closed once (it closes the stream).
    unsafe { pcap_close(p) };
    drop(buf);
    if rc != -2 {
        bail!(
            "{}: pcap_next_ex returned {rc} after {n} packets",
            file.display()
        );
    }
    Ok(n)
}

/// One file to read: where, what, how many packets and bytes, and the
/// services netpulse is told about.
struct Input {
    title: String,
    path: PathBuf,
    packets: u64,
    services: Vec<String>,
}

/// The bare loops' rows: the fastest is the reference.
const BARE: std::ops::Range<usize> = 1..4;
/// netpulse's, capinfos's and tshark's rows.
const NETPULSE: usize = 4;
const CAPINFOS: usize = 5;
const TSHARK: usize = 6;

/// The rows: name, what it does, the command.
fn tools(
    netpulse: &str,
    bench: &str,
    f: &str,
    services: &[String],
) -> Vec<(String, &'static str, Vec<String>)> {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let mut np = s(&[netpulse, "analyze", f]);
    for x in services {
        np.push("--service".into());
        np.push(x.clone());
    }
    vec![
        (
            "`cat F > /dev/null`".into(),
            "the bytes, nothing else",
            s(&["cat", f]),
        ),
        (
            "bare libpcap loop, libpcap's own open".into(),
            "`pcap_open_offline`, then `pcap_next_ex` until the end (stdio's 4 KiB buffer)",
            s(&[bench, "--pcap-loop", f, "--pcap-loop-buffer", "0"]),
        ),
        (
            "bare libpcap loop, 64 KiB stdio buffer".into(),
            "`pcap_fopen_offline` on a stream with a 64 KiB buffer (as netpulse reads), then `pcap_next_ex`",
            s(&[bench, "--pcap-loop", f, "--pcap-loop-buffer", "65536"]),
        ),
        (
            "bare libpcap loop, 1 MiB stdio buffer".into(),
            "the same with a 1 MiB buffer (as netpulse read before)",
            s(&[bench, "--pcap-loop", f, "--pcap-loop-buffer", "1048576"]),
        ),
        (
            format!("`netpulse analyze F` ({} services)", services.len()),
            "services, conversations, talkers, protocols",
            np,
        ),
        (
            "`capinfos F`".into(),
            "counts, sizes, times, data rates, the file's hashes",
            s(&["capinfos", f]),
        ),
        (
            "`tshark -q -z conv,tcp -z conv,udp -z endpoints,ip -r F`".into(),
            "TCP and UDP conversations and IP endpoints",
            s(&[
                "tshark",
                "-q",
                "-z",
                "conv,tcp",
                "-z",
                "conv,udp",
                "-z",
                "endpoints,ip",
                "-r",
                f,
            ]),
        ),
    ]
}

/// Times every tool on `input` and prints its table; whether netpulse met
/// the target.
fn measure(netpulse: &str, cpu: usize, input: &Input, rounds: usize) -> Result<bool> {
    let bench = std::env::current_exe()?;
    let bench = bench.to_str().context("the bench's path is not UTF-8")?;
    let f = input.path.to_str().context("temp path is not UTF-8")?;
    let bytes = std::fs::metadata(&input.path)?.len();
    // The file as a check: netpulse and the bare loop read every packet.
    let out = Command::new(netpulse)
        .args(["analyze", f, "--output", "json", "--top", "1"])
        .output()?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("netpulse analyze: {}", String::from_utf8_lossy(&out.stderr)))?;
    if report["packets"].as_u64() != Some(input.packets) {
        bail!(
            "netpulse analyze read {} packets of {}",
            report["packets"],
            input.packets
        );
    }
    let tools = tools(netpulse, bench, f, &input.services);
    // Warm-up: the file in the page cache, tshark's libraries too.
    time(cpu, &tools[0].2)?;
    time(cpu, &["tshark".to_string(), "-v".to_string()])?;
    // Rounds interleave the tools, so drift in the machine's load spreads
    // over all of them.
    let mut secs: Vec<Vec<f64>> = tools.iter().map(|_| Vec::new()).collect();
    for _ in 0..rounds {
        for (i, (_, _, cmd)) in tools.iter().enumerate() {
            secs[i].push(time(cpu, cmd)?);
        }
    }
    let secs: Vec<f64> = secs.into_iter().map(median).collect();
    let reference = BARE
        .clone()
        .min_by(|a, b| secs[*a].total_cmp(&secs[*b]))
        .context("no bare loop")?;
    let bare = secs[reference];
    let mpps = |s: f64| input.packets as f64 / s / 1e6;
    println!(
        "\n### `netpulse analyze` on {}: {} packets, {:.0} MB (pinned to CPU {cpu}, median of {rounds})\n",
        input.title,
        input.packets,
        bytes as f64 / 1e6
    );
    println!("| tool | what it does | seconds | Mpps | × the fastest bare loop |");
    println!("|---|---|---:|---:|---:|");
    for (i, ((name, what, _), s)) in tools.iter().zip(&secs).enumerate() {
        println!(
            "| {name}{} | {what} | {s:.3} | {:.2} | {:.2} |",
            if i == reference {
                " (the reference)"
            } else {
                ""
            },
            mpps(*s),
            s / bare
        );
    }
    let ratio = secs[NETPULSE] / bare;
    let ok = ratio <= TARGET_VS_LOOP;
    println!(
        "\nnetpulse analyze takes {ratio:.2}× the fastest bare libpcap loop (target ≤ {TARGET_VS_LOOP}×): {}; {:.2}× the loop with its own 1 MiB buffer; tshark takes {:.0}× netpulse's time, capinfos {:.1}×",
        if ok { "met" } else { "missed" },
        secs[NETPULSE] / secs[3],
        secs[TSHARK] / secs[NETPULSE],
        secs[CAPINFOS] / secs[NETPULSE]
    );
    Ok(ok)
}

/// The analyze benchmark on the synthetic file and, with `real`, on real
/// traffic captured here (root: it makes network namespaces).
pub fn run(netpulse: &str, packets: u64, rounds: usize, real: Option<&traffic::Mix>) -> Result<()> {
    for tool in ["tshark", "capinfos", "taskset", "cat"] {
        if !netpulse_tests::netns::have(tool) {
            bail!("{tool} is not installed (cargo xtask setup installs it)");
        }
    }
    let dir = std::env::temp_dir().join(format!("netpulse-bench-analyze-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = (|| -> Result<()> {
        let cpu = cpu()?;
        let file = dir.join("synthetic.pcap");
        let t = Instant::now();
        let bytes = generate(&file, packets)?;
        eprintln!(
            "bench: wrote {packets} packets ({:.0} MB) in {:.1} s",
            bytes as f64 / 1e6,
            t.elapsed().as_secs_f64()
        );
        let synthetic = Input {
            title: "a synthetic file (5,500 TCP and UDP conversations to 8 ports, IPv4 and IPv6, 1 in 20 VLAN-tagged, zeroed payloads)".into(),
            path: file,
            packets,
            services: [
                "web=tcp/19601",
                "api=tcp/19602",
                "grpc=tcp/19603",
                "db=tcp/19604",
                "dns=udp/19605",
            ]
            .map(String::from)
            .to_vec(),
        };
        let mut met = vec![measure(netpulse, cpu, &synthetic, rounds)?];
        std::fs::remove_file(&synthetic.path)?;
        match real {
            Some(mix) => {
                let c = traffic::capture(&dir, mix)?;
                let n = pcap_loop(&c.path, 1 << 20)?;
                let real = Input {
                    title: format!(
                        "real traffic ({}; tcpdump dropped {})",
                        c.summary, c.dropped
                    ),
                    path: c.path,
                    packets: n,
                    services: traffic::services(),
                };
                met.push(measure(netpulse, cpu, &real, rounds)?);
            }
            None => println!("\n(real traffic: skipped, capturing it needs root)"),
        }
        println!(
            "\nanalyze target (≤ {TARGET_VS_LOOP}× the bare loop): {}",
            if met.iter().all(|m| *m) {
                "met on every file"
            } else {
                "missed"
            }
        );
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}
