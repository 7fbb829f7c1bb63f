//! The last 15 minutes of every service's counters, in memory: the rates
//! over 1 and 5 minutes and the sparklines of the status page and the JSON
//! API come from here. One sample every [`INTERVAL`]; a service's ring is
//! aligned with the shared timestamps, `None` where it had no slot.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    time::{Duration, Instant},
};

use agent_ebpf::{DIR_EGRESS, DIR_INGRESS, SlotCounters};

/// Time between samples.
pub const INTERVAL: Duration = Duration::from_secs(5);
/// How far back the ring reaches.
pub const SPAN: Duration = Duration::from_secs(15 * 60);
/// Samples kept: the span, plus one so the oldest interval is whole.
const CAP: usize = (SPAN.as_secs() / INTERVAL.as_secs()) as usize + 1;

/// Received and sent packets and bytes (the service's ingress and egress).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
}

impl From<&SlotCounters> for Totals {
    fn from(c: &SlotCounters) -> Self {
        Totals {
            rx_packets: c.dir[DIR_INGRESS].packets,
            rx_bytes: c.dir[DIR_INGRESS].bytes,
            tx_packets: c.dir[DIR_EGRESS].packets,
            tx_bytes: c.dir[DIR_EGRESS].bytes,
        }
    }
}

/// Per-second rates over some window.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Rates {
    pub rx_packets_per_second: f64,
    pub rx_bytes_per_second: f64,
    pub tx_packets_per_second: f64,
    pub tx_bytes_per_second: f64,
}

impl Rates {
    /// From two readings `secs` apart. A counter that went backwards (a
    /// slot reused) counts as no traffic, not as a negative rate.
    fn between(old: &Totals, new: &Totals, secs: f64) -> Self {
        let r = |a: u64, b: u64| b.saturating_sub(a) as f64 / secs;
        Rates {
            rx_packets_per_second: r(old.rx_packets, new.rx_packets),
            rx_bytes_per_second: r(old.rx_bytes, new.rx_bytes),
            tx_packets_per_second: r(old.tx_packets, new.tx_packets),
            tx_bytes_per_second: r(old.tx_bytes, new.tx_bytes),
        }
    }
}

#[derive(Debug, Default)]
pub struct History {
    times: VecDeque<Instant>,
    series: HashMap<String, VecDeque<Option<Totals>>>,
}

impl History {
    /// Adds one sample of every service; services absent from `now` get a
    /// gap, and those with nothing left in the ring are forgotten.
    pub fn push(&mut self, at: Instant, now: &BTreeMap<String, Totals>) {
        let full = self.times.len() == CAP;
        if full {
            self.times.pop_front();
        }
        let len = self.times.len();
        self.times.push_back(at);
        for ring in self.series.values_mut() {
            if full {
                ring.pop_front();
            }
        }
        for (name, t) in now {
            let ring = self.series.entry(name.clone()).or_insert_with(|| {
                let mut r = VecDeque::with_capacity(CAP);
                r.resize(len, None);
                r
            });
            ring.push_back(Some(*t));
        }
        for ring in self.series.values_mut() {
            if ring.len() == len {
                ring.push_back(None);
            }
        }
        self.series.retain(|_, r| r.iter().any(Option::is_some));
    }

    /// Rates of `name` from the sample nearest `window` before `at` to the
    /// live reading `now`. None until a sample at least one second old
    /// exists (a young ring gives the rate over what it has).
    pub fn rate(&self, name: &str, now: &Totals, at: Instant, window: Duration) -> Option<Rates> {
        let ring = self.series.get(name)?;
        let since = at.checked_sub(window);
        let (t, old) = self
            .times
            .iter()
            .zip(ring)
            .filter_map(|(t, v)| Some((*t, (*v)?)))
            .find(|(t, _)| since.is_none_or(|s| *t >= s))?;
        let secs = at.saturating_duration_since(t).as_secs_f64();
        (secs >= 1.0).then(|| Rates::between(&old, now, secs))
    }

    /// Rates of each interval of the ring, oldest first: the sparkline.
    /// Intervals where the service had no slot are zero.
    pub fn sparkline(&self, name: &str) -> Vec<Rates> {
        let Some(ring) = self.series.get(name) else {
            return Vec::new();
        };
        let times: Vec<&Instant> = self.times.iter().collect();
        ring.iter()
            .zip(ring.iter().skip(1))
            .enumerate()
            .map(|(i, pair)| match pair {
                (Some(a), Some(b)) => {
                    let secs = times[i + 1]
                        .saturating_duration_since(*times[i])
                        .as_secs_f64()
                        .max(0.001);
                    Rates::between(a, b, secs)
                }
                _ => Rates::default(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(rx: u64, tx: u64) -> Totals {
        Totals {
            rx_packets: rx,
            rx_bytes: rx * 100,
            tx_packets: tx,
            tx_bytes: tx * 100,
        }
    }

    #[test]
    fn rates_and_sparkline_from_the_ring() {
        let mut h = History::default();
        let t0 = Instant::now();
        let s = |name: &str, v: Totals| BTreeMap::from([(name.to_string(), v)]);
        // 10 packets/s in, 2 out, for 10 minutes.
        for i in 0..=120u64 {
            h.push(t0 + INTERVAL * i as u32, &s("web", t(i * 50, i * 10)));
        }
        let at = t0 + INTERVAL * 120;
        let now = t(120 * 50, 120 * 10);
        let r = h.rate("web", &now, at, Duration::from_secs(60)).unwrap();
        assert_eq!(r.rx_packets_per_second, 10.0);
        assert_eq!(r.tx_bytes_per_second, 200.0);
        let r5 = h.rate("web", &now, at, Duration::from_secs(300)).unwrap();
        assert_eq!(r5.rx_packets_per_second, 10.0);
        let line = h.sparkline("web");
        assert_eq!(line.len(), 120);
        assert!(line.iter().all(|r| r.rx_packets_per_second == 10.0));
        assert!(h.rate("nope", &now, at, Duration::from_secs(60)).is_none());
    }

    #[test]
    fn the_ring_is_bounded_and_forgets_gone_services() {
        let mut h = History::default();
        let t0 = Instant::now();
        h.push(t0, &BTreeMap::from([("gone".to_string(), t(1, 1))]));
        for i in 1..=(CAP as u32 + 10) {
            h.push(
                t0 + INTERVAL * i,
                &BTreeMap::from([("web".to_string(), t(u64::from(i), 0))]),
            );
        }
        assert_eq!(h.times.len(), CAP);
        assert_eq!(h.series["web"].len(), CAP);
        assert!(!h.series.contains_key("gone"));
        // Only the span is left: the 1-minute rate uses a sample 60 s back,
        // the 1-hour one the oldest there is.
        let at = t0 + INTERVAL * (CAP as u32 + 10);
        let now = t(u64::from(CAP as u32 + 10), 0);
        let r = h.rate("web", &now, at, Duration::from_secs(3600)).unwrap();
        assert!((r.rx_packets_per_second - 0.2).abs() < 1e-9);
    }

    #[test]
    fn a_counter_reset_is_no_traffic_and_a_young_ring_has_no_rate() {
        let mut h = History::default();
        let t0 = Instant::now();
        h.push(t0, &BTreeMap::from([("web".to_string(), t(1000, 0))]));
        assert!(
            h.rate("web", &t(1000, 0), t0, Duration::from_secs(60))
                .is_none()
        );
        h.push(
            t0 + INTERVAL,
            &BTreeMap::from([("web".to_string(), t(5, 0))]),
        );
        assert_eq!(h.sparkline("web")[0].rx_packets_per_second, 0.0);
    }
}
