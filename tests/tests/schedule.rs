//! The check scheduler as the README describes it, through the real agent
//! against an HTTP server made here that records when each request arrives:
//! `retries` with doubling `retry_backoff_seconds` inside one run,
//! `failure_threshold`/`success_threshold` above one, `jitter_seconds` as a
//! stable offset of the first run, at most 32 checks at once, and a missed
//! tick skipped, never queued.

use std::{
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, TcpListener},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use netpulse_tests::{
    agent::{Live, live_prerequisites},
    netns::Pair,
    scrape::Metrics,
};

/// What the server saw and how it answers.
#[derive(Default)]
struct Server {
    /// (path, arrival) of every request, in order.
    seen: Mutex<Vec<(String, Instant)>>,
    /// The status `/flaky` answers.
    flaky: AtomicU16,
    /// Milliseconds `/slow` waits before answering 200.
    slow_ms: AtomicU64,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

impl Server {
    /// Arrivals of requests whose path starts with `prefix`.
    fn arrivals(&self, prefix: &str) -> Vec<Instant> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p.starts_with(prefix))
            .map(|(_, t)| *t)
            .collect()
    }
}

/// An HTTP/1.1 server on 127.0.0.1:`port` in namespace a, a thread per
/// connection: `/fail…` 503, `/flaky…` the status set, `/slow…` 200 after
/// the delay set, anything else 200.
fn serve(pair: &Pair, port: u16) -> Arc<Server> {
    let server = Arc::new(Server {
        flaky: AtomicU16::new(200),
        ..Default::default()
    });
    let s = server.clone();
    let (bound, ready) = std::sync::mpsc::channel();
    pair.a.spawn(move || {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).unwrap();
        bound.send(()).unwrap();
        for conn in l.incoming() {
            let Ok(mut c) = conn else { break };
            let s = s.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(c.try_clone().unwrap());
                let mut first = String::new();
                if r.read_line(&mut first).is_err() {
                    return;
                }
                let now = Instant::now();
                loop {
                    let mut l = String::new();
                    if r.read_line(&mut l).map_or(true, |n| n == 0) || l == "\r\n" {
                        break;
                    }
                }
                let path = first.split_whitespace().nth(1).unwrap_or("").to_string();
                s.seen.lock().unwrap().push((path.clone(), now));
                let n = s.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                s.max_in_flight.fetch_max(n, Ordering::SeqCst);
                let status = if path.starts_with("/fail") {
                    503
                } else if path.starts_with("/flaky") {
                    s.flaky.load(Ordering::SeqCst)
                } else {
                    if path.starts_with("/slow") {
                        std::thread::sleep(Duration::from_millis(s.slow_ms.load(Ordering::SeqCst)));
                    }
                    200
                };
                s.in_flight.fetch_sub(1, Ordering::SeqCst);
                let _ = write!(
                    c,
                    "HTTP/1.1 {status} X\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"
                );
            });
        }
    });
    ready.recv().unwrap();
    server
}

fn check(name: &str, target: &str, extra: &str) -> String {
    format!("[[check]]\nname = \"{name}\"\nkind = \"http\"\ntarget = \"{target}\"\n{extra}\n")
}

fn runs(m: &Metrics, check: &str, result: &str) -> u64 {
    m.sum(
        "netpulse_check_runs_total",
        &[("check", check), ("result", result)],
    )
}

fn state(m: &Metrics, check: &str) -> &'static str {
    for s in ["up", "down", "blocked", "unknown"] {
        if m.sum("netpulse_check_state", &[("check", check), ("state", s)]) == 1 {
            return s;
        }
    }
    panic!("no state for {check}")
}

fn gaps(t: &[Instant]) -> Vec<f64> {
    t.windows(2).map(|w| (w[1] - w[0]).as_secs_f64()).collect()
}

#[test]
fn retries_back_off_doubling_inside_one_run() {
    if !live_prerequisites() {
        return;
    }
    let pair = Pair::new("sched-retry", 71);
    let web = 7601;
    let server = serve(&pair, web);
    let mut fx = Live::start_with(
        pair,
        "sched-retry",
        19521,
        &[],
        &check(
            "retrying",
            &format!("http://127.0.0.1:{web}/fail"),
            "interval_seconds = 30\njitter_seconds = 0\ntimeout_seconds = 1\nretries = 3\nretry_backoff_seconds = 0.2",
        ),
    );
    let m = fx
        .agent
        .wait_for("one failed run", |m| runs(m, "retrying", "failure") >= 1);
    let t = server.arrivals("/fail");
    let g = gaps(&t);
    assert_eq!(t.len(), 4, "one try and three retries; gaps {g:?}");
    for (gap, want) in g.iter().zip([0.2, 0.4, 0.8]) {
        assert!(
            (want - 0.01..want + 0.15).contains(gap),
            "retry gaps {g:?}, want 0.2, 0.4, 0.8"
        );
    }
    // The retries are one run: one failure, and the check is down.
    assert_eq!(runs(&m, "retrying", "failure"), 1);
    assert_eq!(runs(&m, "retrying", "success"), 0);
    assert_eq!(state(&m, "retrying"), "down");
}

#[test]
fn thresholds_above_one_hold_the_state_until_reached() {
    if !live_prerequisites() {
        return;
    }
    let pair = Pair::new("sched-thr", 72);
    let web = 7602;
    let server = serve(&pair, web);
    let mut fx = Live::start_with(
        pair,
        "sched-thr",
        19522,
        &[],
        &check(
            "flappy",
            &format!("http://127.0.0.1:{web}/flaky"),
            "interval_seconds = 0.3\njitter_seconds = 0\ntimeout_seconds = 0.3\nfailure_threshold = 3\nsuccess_threshold = 2",
        ),
    );
    // Each scrape is one snapshot of the engine: its state must follow the
    // runs it counts. Record the pairs seen while starting, failing, then
    // recovering.
    let watch = |fx: &mut Live, result: &str, base: u64, until: u64| -> Vec<(u64, &'static str)> {
        let mut pairs = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(m) = fx.agent.metrics()
                && m.has("netpulse_check_state", &[("check", "flappy")])
            {
                let n = runs(&m, "flappy", result) - base;
                pairs.push((n, state(&m, "flappy")));
                if n >= until {
                    return pairs;
                }
            }
            assert!(Instant::now() < deadline, "stuck at {pairs:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    // Unknown until the second success.
    let starting = watch(&mut fx, "success", 0, 3);
    for (n, s) in &starting {
        let want = if *n < 2 { "unknown" } else { "up" };
        assert_eq!(*s, want, "after {n} successes: {starting:?}");
    }
    assert!(
        starting.iter().any(|(n, _)| *n == 1),
        "never saw the check after exactly one success: {starting:?}"
    );
    let m = fx.agent.metrics().expect("metrics");
    let failed_before = runs(&m, "flappy", "failure");
    server.flaky.store(503, Ordering::SeqCst);
    let failing = watch(&mut fx, "failure", failed_before, 4);
    for (n, s) in &failing {
        let want = if *n < 3 { "up" } else { "down" };
        assert_eq!(*s, want, "after {n} failures in a row: {failing:?}");
    }
    assert!(
        failing.iter().any(|(n, _)| (1..3).contains(n)),
        "never saw the check between its first and third failure: {failing:?}"
    );
    let m = fx.agent.metrics().expect("metrics");
    let ok_before = runs(&m, "flappy", "success");
    server.flaky.store(200, Ordering::SeqCst);
    let recovering = watch(&mut fx, "success", ok_before, 3);
    for (n, s) in &recovering {
        let want = if *n < 2 { "down" } else { "up" };
        assert_eq!(*s, want, "after {n} successes in a row: {recovering:?}");
    }
    assert!(
        recovering.iter().any(|(n, _)| *n == 1),
        "never saw the check after exactly one success: {recovering:?}"
    );
}

/// Two checks of one interval start apart by their jitter offsets, and by
/// the same offsets after a restart: stable, not random, and within
/// `jitter_seconds`.
#[test]
fn jitter_is_a_stable_offset_of_the_first_run() {
    if !live_prerequisites() {
        return;
    }
    let web = 7603;
    let names = ["jitter-alpha", "jitter-omega"];
    let checks: String = names
        .iter()
        .map(|n| {
            check(
                n,
                &format!("http://127.0.0.1:{web}/{n}"),
                "interval_seconds = 5\njitter_seconds = 1.5\ntimeout_seconds = 1",
            )
        })
        .collect();
    let mut offsets = Vec::new();
    for round in 0..2 {
        let pair = Pair::new("sched-jit", 73);
        let server = serve(&pair, web);
        let mut fx = Live::start_with(pair, "sched-jit", 19523, &[], &checks);
        let started = Instant::now();
        fx.agent.wait_for("both checks run", |m| {
            names.iter().all(|n| runs(m, n, "success") >= 1)
        });
        let first: Vec<f64> = names
            .iter()
            .map(|n| (server.arrivals(&format!("/{n}"))[0] - started).as_secs_f64())
            .collect();
        let diff = first[1] - first[0];
        eprintln!("round {round}: first runs at {first:?} (difference {diff:.3} s)");
        offsets.push(diff);
        drop(fx);
    }
    assert!(
        (offsets[0] - offsets[1]).abs() < 0.1,
        "the offsets moved between starts: {offsets:?}"
    );
    assert!(
        offsets[0].abs() > 0.1 && offsets[0].abs() < 1.5,
        "two checks of one interval should start apart by their offsets within the 1.5 s jitter: {offsets:?}"
    );
}

#[test]
fn at_most_32_checks_run_at_once() {
    if !live_prerequisites() {
        return;
    }
    let pair = Pair::new("sched-32", 74);
    let web = 7604;
    let server = serve(&pair, web);
    server.slow_ms.store(1500, Ordering::SeqCst);
    let checks: String = (0..40)
        .map(|i| {
            check(
                &format!("slow-{i}"),
                &format!("http://127.0.0.1:{web}/slow/{i}"),
                "interval_seconds = 10\njitter_seconds = 0\ntimeout_seconds = 5",
            )
        })
        .collect();
    let mut fx = Live::start_with(pair, "sched-32", 19524, &[], &checks);
    fx.agent.wait_for("all 40 checks ran once", |m| {
        (0..40).all(|i| runs(m, &format!("slow-{i}"), "success") >= 1)
    });
    let t = server.arrivals("/slow/");
    assert_eq!(t.len(), 40, "each check once");
    // 32 at once, then the other 8 as the first finish (1.5 s later).
    assert_eq!(server.max_in_flight.load(Ordering::SeqCst), 32);
    let first = t[0];
    let early = t
        .iter()
        .filter(|a| (**a - first) < Duration::from_millis(1000))
        .count();
    assert_eq!(early, 32, "requests in the first second");
}

/// A run longer than the interval (a failing target retried after 1 s)
/// misses ticks; when the target recovers the runs go on at the interval,
/// not in a burst making up the missed ones.
#[test]
fn a_missed_tick_is_skipped_never_queued() {
    if !live_prerequisites() {
        return;
    }
    let pair = Pair::new("sched-skip", 75);
    let web = 7605;
    let server = serve(&pair, web);
    server.flaky.store(503, Ordering::SeqCst);
    let mut fx = Live::start_with(
        pair,
        "sched-skip",
        19525,
        &[],
        &check(
            "behind",
            &format!("http://127.0.0.1:{web}/flaky"),
            "interval_seconds = 0.25\njitter_seconds = 0\ntimeout_seconds = 0.25\nretries = 1\nretry_backoff_seconds = 1",
        ),
    );
    // Three slow runs: ~3 s, some 12 ticks, 9 of them missed.
    fx.agent
        .wait_for("three slow runs", |m| runs(m, "behind", "failure") >= 3);
    server.flaky.store(200, Ordering::SeqCst);
    let switched = Instant::now();
    std::thread::sleep(Duration::from_millis(1600));
    let m = fx.agent.metrics().expect("metrics");
    let after: Vec<Instant> = server
        .arrivals("/flaky")
        .into_iter()
        .filter(|t| *t > switched)
        .collect();
    let g = gaps(&after);
    // The first request after the switch may still be a slow run's retry;
    // from then on one run per tick.
    assert!(
        g.iter().skip(1).all(|gap| *gap > 0.15),
        "runs closer than the interval (queued ticks catching up): {g:?}"
    );
    let ok = runs(&m, "behind", "success");
    assert!(
        (4..=8).contains(&ok),
        "{ok} successful runs in 1.6 s at a 0.25 s interval"
    );
}
