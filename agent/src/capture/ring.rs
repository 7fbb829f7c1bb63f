//! Capture on failure: a bounded pre-trigger ring per service (its last N
//! packets or seconds, in memory), kept by a capture that runs while some
//! check's `capture` action may need it. When the check goes down, the
//! ring is written to a new capture file, and the capture goes on into it
//! for the action's `seconds`: the file holds the packets from before the
//! failure as well as after. The file is a capture job like any other
//! (`GET /api/v1/captures`), recorded as running, so no worker takes it.

use std::{
    collections::{BTreeMap, VecDeque},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering::Relaxed},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde_json::json;
use tracing::{info, warn};

use super::{Pcapng, Settings, file_name, make_room};
use crate::{
    config::{ActionConfig, Diagnostics},
    store::Store,
};

/// A `capture` action, as configured.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub interface: String,
    /// None: the check's service's endpoints.
    pub filter: Option<String>,
    pub service: Option<String>,
    /// Captured after the failure.
    pub seconds: f64,
    pub ring_packets: usize,
    pub ring_seconds: f64,
}

impl Spec {
    /// A check's `capture` action (`service`: the check's); problems go to
    /// `d`.
    pub fn from_config(
        a: &ActionConfig,
        service: Option<&toml::Spanned<String>>,
        d: &mut Diagnostics,
    ) -> Option<Spec> {
        let seconds = a.seconds.as_ref().map_or(10.0, |v| *v.get_ref());
        let ring_seconds = a.ring_seconds.as_ref().map_or(30.0, |v| *v.get_ref());
        let ring_packets = a.ring_packets.as_ref().map_or(1000, |v| *v.get_ref());
        let mut ok = true;
        for (what, v, x, hi) in [
            ("seconds", &a.seconds, seconds, super::MAX_SECONDS),
            ("ring_seconds", &a.ring_seconds, ring_seconds, 3600.0),
        ] {
            if !(x.is_finite() && x > 0.0 && x <= hi) {
                let span = v.as_ref().map_or(a.kind.span(), |v| v.span());
                d.at(span, format!("{what} = {x} is out of range (0, {hi}]"));
                ok = false;
            }
        }
        if !(1..=100_000).contains(&ring_packets) {
            let span = a.ring_packets.as_ref().map_or(a.kind.span(), |v| v.span());
            d.at(
                span,
                format!("ring_packets = {ring_packets} is out of range 1-100000"),
            );
            ok = false;
        }
        let filter = a.filter.as_ref().map(|f| f.get_ref().clone());
        if let (Some(f), Some(span)) = (&filter, a.filter.as_ref().map(|f| f.span())) {
            let compiles = pcap::Capture::dead(pcap::Linktype::ETHERNET)
                .map_err(|e| e.to_string())
                .and_then(|d| d.compile(f, true).map(|_| ()).map_err(|e| e.to_string()));
            if let Err(e) = compiles {
                d.at(span, format!("filter `{f}`: {e}"));
                ok = false;
            }
        }
        if filter.is_none() && service.is_none() {
            d.at(
                a.kind.span(),
                "a capture action needs `filter`, or a `service` on its check",
            );
            ok = false;
        }
        ok.then(|| Spec {
            interface: a
                .interface
                .as_ref()
                .map_or_else(|| "any".to_string(), |i| i.get_ref().clone()),
            filter,
            service: service.map(|s| s.get_ref().clone()),
            seconds,
            ring_packets: ring_packets as usize,
            ring_seconds,
        })
    }
}

/// Bytes a ring holds at most, whatever its packet count.
const RING_BYTES: usize = 32 << 20;
/// Bytes of each packet kept (the one capture opener's whole-packet size).
const SNAPLEN: i32 = crate::pcap_backend::FULL_SNAPLEN;

/// What a trigger hands the ring's thread.
struct Trigger {
    id: i64,
    seconds: f64,
    dir: PathBuf,
    settings: Settings,
    store: Arc<Store>,
    check: String,
    /// Why the check failed: the file's comment.
    explanation: Option<String>,
}

struct Ring {
    stop: Arc<AtomicBool>,
    tx: mpsc::Sender<Trigger>,
    thread: JoinHandle<()>,
}

#[derive(Default)]
struct Inner {
    /// Rings by (interface, filter), with the ring sizes they were made with.
    rings: BTreeMap<(String, String), (usize, u64, Ring)>,
    /// Services' filters (from the datapath's table), for actions without
    /// one of their own.
    services: BTreeMap<String, String>,
    /// Actions already warned about, so a missing service is logged once.
    warned: std::collections::BTreeSet<String>,
    dir: Option<PathBuf>,
    store: Option<Arc<Store>>,
    settings: Settings,
}

/// Every ring the config's capture actions need.
#[derive(Clone, Default)]
pub struct Rings(Arc<Mutex<Inner>>);

impl std::fmt::Debug for Rings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Rings")
    }
}

impl Rings {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn key(inner: &Inner, spec: &Spec) -> Option<(String, String)> {
        let filter = match (&spec.filter, &spec.service) {
            (Some(f), _) => f.clone(),
            (None, Some(s)) => inner.services.get(s)?.clone(),
            (None, None) => return None,
        };
        Some((spec.interface.clone(), filter))
    }

    /// Makes the running rings those `specs` need: new ones start, unused
    /// ones stop. `services` are the filters of the services the actions
    /// name (`capture::filter_for`); they change as the services' endpoints
    /// do, and a ring whose filter changed starts anew.
    pub fn sync(
        &self,
        specs: &[Spec],
        services: BTreeMap<String, String>,
        dir: Option<PathBuf>,
        store: Option<Arc<Store>>,
        settings: Settings,
    ) {
        let mut inner = self.lock();
        // A service that just lost its endpoints (its listener went away:
        // the very failure a capture action is for) keeps its last filter.
        inner.services.extend(services);
        inner.dir = dir;
        inner.store = store;
        inner.settings = settings;
        let mut want: BTreeMap<(String, String), (usize, u64)> = BTreeMap::new();
        for s in specs {
            match Self::key(&inner, s) {
                Some(k) => {
                    let e = want.entry(k).or_default();
                    e.0 = e.0.max(s.ring_packets);
                    e.1 = e.1.max((s.ring_seconds * 1e6) as u64);
                }
                None => {
                    let service = s.service.clone().unwrap_or_default();
                    if inner.warned.insert(service.clone()) {
                        warn!(
                            service,
                            "capture action: the service has no endpoints or addresses to filter by (yet); give the action a filter"
                        );
                    }
                }
            }
        }
        let stale: Vec<(String, String)> = inner
            .rings
            .iter()
            .filter(|(k, (n, age, _))| want.get(*k) != Some(&(*n, *age)))
            .map(|(k, _)| k.clone())
            .collect();
        for k in stale {
            if let Some((_, _, r)) = inner.rings.remove(&k) {
                r.stop.store(true, Relaxed);
                let _ = r.thread.join();
            }
        }
        for (k, (n, age)) in want {
            if inner.rings.contains_key(&k) {
                continue;
            }
            match start(&k.0, &k.1, n, age) {
                Ok(r) => {
                    info!(interface = %k.0, filter = %k.1, packets = n, "pre-trigger ring started");
                    inner.rings.insert(k, (n, age, r));
                }
                Err(e) => {
                    warn!(interface = %k.0, filter = %k.1, error = %e, "cannot start a pre-trigger ring")
                }
            }
        }
    }

    /// The check failed: its ring goes to a new capture file, and the
    /// capture goes on for `spec.seconds`.
    pub fn trigger(
        &self,
        spec: &Spec,
        check: &str,
        explanation: Option<&str>,
    ) -> Result<(), String> {
        let inner = self.lock();
        let key = Self::key(&inner, spec).ok_or("no filter for this capture action")?;
        let (_, _, ring) = inner
            .rings
            .get(&key)
            .ok_or_else(|| format!("no pre-trigger ring on {} for `{}`", key.0, key.1))?;
        let store = inner
            .store
            .clone()
            .ok_or("no store, so no capture folder")?;
        let dir = inner.dir.clone().ok_or("no capture folder")?;
        let arg = json!({
            "interface": key.0,
            "filter": key.1,
            "seconds": spec.seconds,
            "packets": null,
            "bytes": null,
            "check": check,
            "trigger": "check failed",
            "explanation": explanation,
        });
        let id = store
            .record_running("capture", &arg.to_string())
            .ok_or("the store cannot write")?;
        ring.tx
            .send(Trigger {
                id,
                seconds: spec.seconds,
                dir,
                settings: inner.settings,
                store,
                check: check.to_string(),
                explanation: explanation.map(String::from),
            })
            .map_err(|_| "the ring's capture has stopped".to_string())?;
        info!(check, capture = id, "capture on failure started");
        Ok(())
    }

    /// No ring runs.
    pub fn is_empty(&self) -> bool {
        self.lock().rings.is_empty()
    }

    pub fn stop_all(&self) {
        let mut inner = self.lock();
        for (_, (_, _, r)) in std::mem::take(&mut inner.rings) {
            r.stop.store(true, Relaxed);
            let _ = r.thread.join();
        }
    }
}

fn start(interface: &str, filter: &str, packets: usize, age_us: u64) -> Result<Ring, String> {
    let mut cap = crate::pcap_backend::open_live(interface, true)
        .and_then(|c| c.setnonblock())
        .map_err(|e| format!("opening {interface}: {e}"))?;
    cap.filter(filter, true)
        .map_err(|e| format!("filter `{filter}`: {e}"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let s = stop.clone();
    let thread = std::thread::Builder::new()
        .name(format!("ring-{interface}"))
        .spawn(move || run(cap, rx, &s, packets, age_us))
        .map_err(|e| e.to_string())?;
    Ok(Ring { stop, tx, thread })
}

/// A capture file being written after a trigger.
struct Writing {
    t: Trigger,
    file: Pcapng,
    until: Instant,
    before: u64,
    packets: u64,
    bytes: u64,
    stopped_by: &'static str,
}

impl Writing {
    fn finish(self) {
        let (ok, result) = match self.file.finish() {
            Ok(()) => (
                true,
                json!({
                    "packets": self.packets,
                    "bytes": self.bytes,
                    "packets_before_trigger": self.before,
                    "parts": [0],
                    "stopped_by": self.stopped_by,
                    "check": self.t.check,
                    "explanation": self.t.explanation,
                }),
            ),
            Err(e) => (false, json!({ "error": e.to_string() })),
        };
        info!(
            capture = self.t.id,
            packets = self.packets,
            before = self.before,
            "capture on failure finished"
        );
        self.t.store.finish(self.t.id, ok, &result);
    }
}

fn run(
    mut cap: pcap::Capture<pcap::Active>,
    rx: mpsc::Receiver<Trigger>,
    stop: &AtomicBool,
    max_packets: usize,
    max_age_us: u64,
) {
    let fd = std::os::fd::AsRawFd::as_raw_fd(&cap);
    let linktype = cap.get_datalink().0 as u16;
    let mut ring: VecDeque<(u64, u32, Vec<u8>)> = VecDeque::new();
    let mut ring_bytes = 0usize;
    let mut writing: Option<Writing> = None;
    while !stop.load(Relaxed) {
        if writing.is_none()
            && let Ok(t) = rx.try_recv()
        {
            let path = t.dir.join(file_name(t.id, 0));
            let created = std::fs::create_dir_all(&t.dir)
                .map_err(|e| e.to_string())
                .and_then(|()| {
                    if make_room(&t.dir, t.settings.max_disk_bytes, super::ROOM, (t.id, 0), 0) {
                        Ok(())
                    } else {
                        Err("the capture folder is at its disk cap".to_string())
                    }
                })
                .and_then(|()| {
                    let comment = t
                        .explanation
                        .as_ref()
                        .map(|e| format!("{} failed: {e}", t.check));
                    Pcapng::create(&path, linktype, SNAPLEN as u32, comment.as_deref())
                        .map_err(|e| e.to_string())
                });
            match created {
                Ok(mut file) => {
                    // The ring first: the packets from before the failure.
                    let mut w_err = None;
                    let (mut packets, mut bytes) = (0u64, 0u64);
                    for (ts, orig, data) in &ring {
                        if let Err(e) = file.packet(*ts, data, *orig) {
                            w_err = Some(e);
                            break;
                        }
                        packets += 1;
                        bytes += u64::from(*orig);
                    }
                    match w_err {
                        Some(e) => t
                            .store
                            .finish(t.id, false, &json!({ "error": e.to_string() })),
                        None => {
                            writing = Some(Writing {
                                until: Instant::now() + Duration::from_secs_f64(t.seconds),
                                t,
                                file,
                                before: packets,
                                packets,
                                bytes,
                                stopped_by: "seconds",
                            })
                        }
                    }
                }
                Err(e) => {
                    warn!(capture = t.id, error = %e, "capture on failure");
                    t.store.finish(t.id, false, &json!({ "error": e }));
                }
            }
        }
        if writing.as_ref().is_some_and(|w| Instant::now() >= w.until)
            && let Some(w) = writing.take()
        {
            w.finish();
        }
        let p = match cap.next_packet() {
            Ok(p) => p,
            Err(pcap::Error::TimeoutExpired) => {
                let mut pfd = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd; the descriptor is the capture's.
                unsafe { libc::poll(&mut pfd, 1, 100) };
                continue;
            }
            Err(e) => {
                warn!(error = %e, "pre-trigger ring stopped");
                break;
            }
        };
        let ts = p.header.ts.tv_sec as u64 * 1_000_000 + p.header.ts.tv_usec as u64;
        let orig = p.header.len;
        if let Some(w) = writing.as_mut() {
            match w.file.packet(ts, p.data, orig) {
                Ok(()) => {
                    w.packets += 1;
                    w.bytes += u64::from(orig);
                }
                Err(e) => {
                    warn!(capture = w.t.id, error = %e, "writing a capture file");
                    w.stopped_by = "write error";
                    w.until = Instant::now();
                }
            }
        }
        ring_bytes += p.data.len();
        ring.push_back((ts, orig, p.data.to_vec()));
        while ring.len() > max_packets
            || ring_bytes > RING_BYTES
            || ring.front().is_some_and(|f| f.0 + max_age_us < ts)
        {
            match ring.pop_front() {
                Some(f) => ring_bytes -= f.2.len(),
                None => break,
            }
        }
    }
    if let Some(w) = writing.take() {
        w.finish();
    }
}
