//! A load generator for reliability tests: a few app connections send requests through a
//! sidecar for the whole scenario and record every outcome, so a test can count failures
//! and report latency during an event (a rotation, a restart, an outage).
//!
//! ```no_run
//! # async fn f(mesh: trellis_tests::mesh::Mesh) -> anyhow::Result<()> {
//! use trellis_tests::load::{Load, LoadOpts};
//! let load = Load::start(LoadOpts::new(mesh.a.addrs.outbound["shared"], "b", "app-b"));
//! let event = load.mark("rotation");
//! // … act …
//! load.end(event);
//! let report = load.stop().await;
//! report.print("svid rotation");
//! report.assert_no_failures()?;
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use http::StatusCode;
use tokio::task::JoinHandle;

use crate::app_client::{AppConn, Proto};

/// Requests [`LoadReport::assert_no_failures`] wants sent over the run and in each event: a
/// few seconds of load send hundreds, so fewer means the load stalled or never started.
pub const MIN_REQUESTS_PER_WINDOW: usize = 20;

/// What to send and how hard.
#[derive(Debug, Clone)]
pub struct LoadOpts {
    /// The sidecar's outbound listener.
    pub target: SocketAddr,
    /// `Host` (HTTP/1.1) or `:authority` (h2c) that routes to the upstream.
    pub host: String,
    /// Request path.
    pub path: String,
    /// The `app` field app B's echo must carry (proves the request reached the right app).
    pub expect_app: String,
    /// Concurrent app connections, each sending one request at a time.
    pub connections: usize,
    /// Pause after each request on a connection (keeps 2-core machines usable by the
    /// processes under test).
    pub pause: Duration,
    /// HTTP/1.1 or h2c from the app.
    pub proto: Proto,
    /// A request without a complete answer within this is a failure.
    pub timeout: Duration,
}

impl LoadOpts {
    /// Four HTTP/1.1 connections, `GET /load`, 1 ms pause, 10 s timeout.
    pub fn new(target: SocketAddr, host: &str, expect_app: &str) -> Self {
        LoadOpts {
            target,
            host: host.to_string(),
            path: "/load".to_string(),
            expect_app: expect_app.to_string(),
            connections: 4,
            pause: Duration::from_millis(1),
            proto: Proto::H1,
            timeout: Duration::from_secs(10),
        }
    }
}

/// One request's outcome.
#[derive(Debug, Clone)]
pub struct Sample {
    /// When it was sent.
    pub sent: Instant,
    /// Until the body was read (or the failure).
    pub latency: Duration,
    /// `Err` says what went wrong: connect error, status, wrong app, timeout.
    pub result: Result<(), String>,
}

/// A named interval of the scenario (an outage, a rotation).
#[derive(Debug, Clone)]
pub struct Event {
    /// Name for the report.
    pub name: String,
    /// Start.
    pub from: Instant,
    /// End, once [`Load::end`] was called.
    pub to: Option<Instant>,
}

/// A running load; [`Load::stop`] collects the report.
pub struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<Vec<Sample>>>,
    started: Instant,
    events: Mutex<Vec<Event>>,
}

/// Handle of an event started by [`Load::mark`].
#[derive(Debug, Clone, Copy)]
pub struct EventId(usize);

impl Load {
    /// Starts `opts.connections` load tasks on the current runtime.
    pub fn start(opts: LoadOpts) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let opts = Arc::new(opts);
        let tasks = (0..opts.connections)
            .map(|_| tokio::spawn(run_connection(Arc::clone(&opts), Arc::clone(&stop))))
            .collect();
        Load {
            stop,
            tasks,
            started: Instant::now(),
            events: Mutex::new(Vec::new()),
        }
    }

    /// Starts a named event now.
    pub fn mark(&self, name: &str) -> EventId {
        let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        events.push(Event {
            name: name.to_string(),
            from: Instant::now(),
            to: None,
        });
        EventId(events.len() - 1)
    }

    /// Ends an event now.
    pub fn end(&self, id: EventId) {
        let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = events.get_mut(id.0) {
            e.to = Some(Instant::now());
        }
    }

    /// Stops every connection after its current request and returns every outcome.
    pub async fn stop(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        let mut samples = Vec::new();
        for t in self.tasks {
            match t.await {
                Ok(s) => samples.extend(s),
                Err(e) => samples.push(Sample {
                    sent: Instant::now(),
                    latency: Duration::ZERO,
                    result: Err(format!("load task panicked: {e}")),
                }),
            }
        }
        samples.sort_by_key(|s| s.sent);
        let events = self.events.into_inner().unwrap_or_else(|e| e.into_inner());
        LoadReport {
            started: self.started,
            stopped: Instant::now(),
            samples,
            events,
        }
    }
}

async fn run_connection(opts: Arc<LoadOpts>, stop: Arc<AtomicBool>) -> Vec<Sample> {
    let mut out = Vec::new();
    let mut conn: Option<AppConn> = None;
    while !stop.load(Ordering::Relaxed) {
        let sent = Instant::now();
        let result = tokio::time::timeout(opts.timeout, one_request(&opts, &mut conn))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {:?}", opts.timeout)));
        if result.is_err() {
            // A failed request may leave the connection unusable; the app would reconnect.
            conn = None;
        }
        out.push(Sample {
            sent,
            latency: sent.elapsed(),
            result,
        });
        if out.last().is_some_and(|s| s.result.is_err()) {
            // Do not spin on a refused port.
            tokio::time::sleep(Duration::from_millis(10)).await;
        } else if !opts.pause.is_zero() {
            tokio::time::sleep(opts.pause).await;
        }
    }
    out
}

async fn one_request(opts: &LoadOpts, conn: &mut Option<AppConn>) -> Result<(), String> {
    let c = match conn {
        Some(c) => c,
        None => conn.insert(
            AppConn::connect(opts.target, opts.proto)
                .await
                .map_err(|e| format!("connect: {e:#}"))?,
        ),
    };
    let reply = c
        .get(&opts.host, &opts.path, &[])
        .await
        .map_err(|e| format!("{e:#}"))?;
    if reply.status != StatusCode::OK {
        return Err(format!("status: {}", reply.summary()));
    }
    match reply.json() {
        Ok(v) if v["app"] == opts.expect_app.as_str() => Ok(()),
        _ => Err(format!(
            "not {}'s echo: {}",
            opts.expect_app,
            reply.summary()
        )),
    }
}

/// Every outcome of a load run, sorted by send time.
#[derive(Debug)]
pub struct LoadReport {
    /// When the load started.
    pub started: Instant,
    /// When it stopped.
    pub stopped: Instant,
    /// Every request.
    pub samples: Vec<Sample>,
    /// The events marked during the run.
    pub events: Vec<Event>,
}

impl LoadReport {
    /// Requests sent.
    pub fn sent(&self) -> usize {
        self.samples.len()
    }

    /// Failed requests.
    pub fn failures(&self) -> impl Iterator<Item = &Sample> {
        self.samples.iter().filter(|s| s.result.is_err())
    }

    /// Failed requests sent in `[from, to)`.
    pub fn failures_between(&self, from: Instant, to: Instant) -> usize {
        self.failures()
            .filter(|s| s.sent >= from && s.sent < to)
            .count()
    }

    /// Requests sent in `[from, to)`.
    pub fn sent_between(&self, from: Instant, to: Instant) -> usize {
        self.samples
            .iter()
            .filter(|s| s.sent >= from && s.sent < to)
            .count()
    }

    /// The `q` quantile (0..=1) of successful requests' latency sent in `[from, to)`.
    pub fn quantile_between(&self, q: f64, from: Instant, to: Instant) -> Option<Duration> {
        let mut l: Vec<Duration> = self
            .samples
            .iter()
            .filter(|s| s.result.is_ok() && s.sent >= from && s.sent < to)
            .map(|s| s.latency)
            .collect();
        if l.is_empty() {
            return None;
        }
        l.sort_unstable();
        let i = ((l.len() as f64 - 1.0) * q).round() as usize;
        l.get(i.min(l.len() - 1)).copied()
    }

    /// p99 of the whole run.
    pub fn p99(&self) -> Option<Duration> {
        self.quantile_between(0.99, self.started, self.stopped)
    }

    /// p99 during event `name` (until its end, or the end of the run).
    pub fn p99_during(&self, name: &str) -> Option<Duration> {
        let e = self.events.iter().find(|e| e.name == name)?;
        self.quantile_between(0.99, e.from, e.to.unwrap_or(self.stopped))
    }

    /// One line: `sent=… failed=… rate=…/s p50=… p99=…`, then one line per event.
    pub fn summary(&self) -> String {
        let secs = (self.stopped - self.started).as_secs_f64().max(1e-9);
        let ms = |d: Option<Duration>| {
            d.map(|d| format!("{:.1}ms", d.as_secs_f64() * 1e3))
                .unwrap_or_else(|| "-".into())
        };
        let mut s = format!(
            "sent={} failed={} rate={:.0}/s p50={} p99={}",
            self.sent(),
            self.failures().count(),
            self.sent() as f64 / secs,
            ms(self.quantile_between(0.5, self.started, self.stopped)),
            ms(self.p99()),
        );
        for e in &self.events {
            let to = e.to.unwrap_or(self.stopped);
            s.push_str(&format!(
                "\n  during {} ({:.1}s): sent={} failed={} p99={}",
                e.name,
                (to - e.from).as_secs_f64(),
                self.sent_between(e.from, to),
                self.failures_between(e.from, to),
                ms(self.quantile_between(0.99, e.from, to)),
            ));
        }
        s
    }

    /// Prints `[load] <scenario>: <summary>` to stdout (shown with `--nocapture`, and kept in
    /// the test's output on failure).
    pub fn print(&self, scenario: &str) {
        println!("[load] {scenario}: {}", self.summary());
    }

    /// Errors unless at least `min` requests were sent over the run and in each marked event:
    /// "nothing failed" means little for a window the load did not run through.
    pub fn assert_ran(&self, min: usize) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.sent() >= min,
            "only {} requests sent in the whole run (want ≥ {min}): the load did not run",
            self.sent()
        );
        for e in &self.events {
            let to = e.to.unwrap_or(self.stopped);
            let sent = self.sent_between(e.from, to);
            anyhow::ensure!(
                sent >= min,
                "only {sent} requests sent during `{}` ({:.1}s; want ≥ {min}): the load did not \
                 run through it ({})",
                e.name,
                (to - e.from).as_secs_f64(),
                self.summary()
            );
        }
        Ok(())
    }

    /// Errors listing the first failures (time since start and reason) if any request failed,
    /// or if fewer than [`MIN_REQUESTS_PER_WINDOW`] were sent over the run or in any event.
    pub fn assert_no_failures(&self) -> anyhow::Result<()> {
        self.assert_ran(MIN_REQUESTS_PER_WINDOW)?;
        let failed: Vec<&Sample> = self.failures().collect();
        if failed.is_empty() {
            return Ok(());
        }
        let list: Vec<String> = failed
            .iter()
            .take(10)
            .map(|s| {
                format!(
                    "  +{:.3}s: {}",
                    (s.sent - self.started).as_secs_f64(),
                    s.result.as_ref().err().map(String::as_str).unwrap_or("")
                )
            })
            .collect();
        bail!(
            "{} of {} requests failed ({}); first ones:\n{}",
            failed.len(),
            self.sent(),
            self.summary(),
            list.join("\n")
        )
    }
}
